"""`tenantctl scheduler run`: the daemon that runs due backups, retention, pruning
and the audit purge on intervals, with one leader per fleet.

Leader election: a session-level advisory lock in the catalog, taken with
pg_try_advisory_lock on a dedicated connection and held for as long as the
instance leads. Every other instance is a standby that retries every
`standby_poll` seconds; when the leader dies its session ends, Postgres releases
the lock and a standby takes over at its next poll. The leader checks its lock
connection every `heartbeat` seconds; the moment it is gone it stops scheduling,
tells running jobs to stop at their next tenant/step, and goes back to standby.
TCP keepalives on both ends make a silently dead network path count as gone
(the client side gives up sooner than the server releases the lock).

A job never runs twice at once: APScheduler's max_instances=1 within a process,
and a catalog advisory lock per job (`scheduler-job:NAME`) across processes, which
also covers a job still finishing in a leader that has just lost its lock.

Logs are JSON lines on stdout. Metrics (optional) are Prometheus text served by
a ThreadingHTTPServer thread; the catalog-derived gauges are read by a refresher
thread (every `metrics_refresh` seconds and after each job), so a scrape never
touches the catalog and never fails: if the catalog is down it still answers,
with the last known values and ``tenantctl_up 0``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TextIO

import psycopg
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import func, select

from backups import service as pipeline
from orchestrator.adapters.catalog.db import lock_key, redact
from orchestrator.adapters.catalog.models import Backup, SupportGrant, Tenant
from orchestrator.adapters.clock import utcnow
from orchestrator.config import SchedulerConfig
from orchestrator.domain.errors import Conflict, InvalidInput, first_line
from orchestrator.domain.errors import Conflict as TenantChanged
from orchestrator.domain.jobs import SCHEDULED, STEPS_OF, parse_scheduled
from orchestrator.domain.states import HAS_DATABASE
from orchestrator.domain.statuses import BackupStatus
from orchestrator.domain.timeliness import latest_backup_age
from orchestrator.services import retention

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps
    from orchestrator.services.retention import StepResult

JOBS = SCHEDULED  # the job vocabulary: orchestrator.domain.jobs
# what each retention-family job asks orchestrator.services.retention.run to do
RETENTION_KINDS: dict[str, tuple[str, ...]] = {j: s for j, s in STEPS_OF.items() if s}
LEADER_LOCK = "scheduler-leader"
OUTCOMES = ("ok", "partial", "failed", "skipped", "interrupted")
FAILED_OUTCOMES = ("partial", "failed")


def job_lock(job: str) -> str:
    return f"scheduler-job:{job}"


def job_intervals(sc: SchedulerConfig, override_seconds: float | None = None,
                  jobs: Iterable[str] = JOBS) -> dict[str, float]:
    """Seconds between runs of each job: the [scheduler] table (minutes), or one
    override for all (tests, drills)."""
    minutes = {"backups": sc.backups_minutes, "retention": sc.retention_minutes,
               "prune": sc.prune_minutes, "audit_purge": sc.audit_purge_minutes}
    return {j: float(override_seconds) if override_seconds else minutes[j] * 60.0
            for j in jobs}


def parse_jobs(text: str | None) -> tuple[str, ...]:
    """`backups,retention` → ("backups", "retention"); None → every job."""
    return parse_scheduled(text, "--jobs")


# -- JSON log lines ----------------------------------------------------------------


class JsonLog:
    """One JSON object per line: ts, level, event, then the fields. Thread-safe."""

    def __init__(self, stream: TextIO | None = None, **context: Any) -> None:
        self.stream = stream
        self.context = context
        self._lock = threading.Lock()

    def emit(self, level: str, event: str, **fields: Any) -> None:
        record = {"ts": utcnow().isoformat(timespec="milliseconds"),
                  "level": level, "event": event, **self.context, **fields}
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        stream = self.stream or sys.stdout
        with self._lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not kill a job thread

    def info(self, event: str, **fields: Any) -> None:
        self.emit("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit("error", event, **fields)


class _LoggingToJson(logging.Handler):
    """APScheduler's own warnings (a run skipped, a misfire) as JSON lines too."""

    def __init__(self, log: JsonLog) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.emit(record.levelname.lower(), "apscheduler", message=record.getMessage())


def route_apscheduler_logs(log: JsonLog) -> None:
    logger = logging.getLogger("apscheduler")
    logger.handlers[:] = [_LoggingToJson(log)]
    logger.setLevel(logging.WARNING)
    logger.propagate = False


# -- metrics -------------------------------------------------------------------------


@dataclass(frozen=True)
class JobStats:
    runs: int = 0
    failures: int = 0
    last_duration: float | None = None  # seconds
    last_success: float | None = None  # unix time
    last_outcome: str | None = None


@dataclass(frozen=True)
class FleetGauges:
    """What the catalog says, read at `refreshed_at` (unix time)."""

    tenants: Mapping[str, int]  # state -> count
    # region -> seconds: over the tenants that are backed up on schedule (active,
    # suspended, cancelled), the age of the oldest "latest completed backup"; a
    # tenant never backed up counts from its activation (else its creation)
    oldest_backup_age: Mapping[str, float]
    overdue_deletions: int
    overdue_purges: int
    refreshed_at: float


@dataclass(frozen=True)
class MetricsSnapshot:
    leader: bool
    up: bool  # the last read of the catalog succeeded
    fleet: FleetGauges | None
    jobs: Mapping[str, JobStats] = field(default_factory=dict)


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float | int | bool) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(round(float(v), 6))


def render_metrics(snap: MetricsSnapshot) -> str:
    """Prometheus text exposition format 0.0.4 (pure)."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str,
               samples: Iterable[tuple[dict[str, str], float | int | bool]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{lab}}} {_num(value)}" if lab else f"{name} {_num(value)}")

    family("tenantctl_up", "gauge",
           "1 if the last read of the catalog for these metrics succeeded.", [({}, snap.up)])
    family("tenantctl_scheduler_leader", "gauge",
           "1 if this scheduler instance is the leader (runs the jobs).", [({}, snap.leader)])
    f = snap.fleet
    if f is not None:
        family("tenantctl_tenants", "gauge", "Tenants per state.",
               [({"state": s}, n) for s, n in sorted(f.tenants.items())])
        family("tenantctl_oldest_latest_backup_age_seconds", "gauge",
               "Per region, over tenants backed up on schedule, the age of the oldest "
               "latest completed backup (never backed up: since activation).",
               [({"region": r}, a) for r, a in sorted(f.oldest_backup_age.items())])
        family("tenantctl_overdue_deletions", "gauge",
               "Tenants whose hold ended over an hour ago and are not deleted "
               "(legal holds excluded).", [({}, f.overdue_deletions)])
        family("tenantctl_overdue_purges", "gauge",
               "Deleted tenants whose purge date passed over an hour ago and are not "
               "purged (legal holds excluded).", [({}, f.overdue_purges)])
        family("tenantctl_catalog_refresh_timestamp_seconds", "gauge",
               "When the catalog gauges above were last read.", [({}, f.refreshed_at)])
    jobs = sorted(snap.jobs.items())
    family("tenantctl_job_duration_seconds", "gauge", "Duration of the job's last run.",
           [({"job": j}, s.last_duration) for j, s in jobs if s.last_duration is not None])
    family("tenantctl_job_runs_total", "counter", "Runs of the job by this instance.",
           [({"job": j}, s.runs) for j, s in jobs])
    family("tenantctl_job_failures_total", "counter",
           "Runs of the job that failed or in which a tenant/step failed.",
           [({"job": j}, s.failures) for j, s in jobs])
    family("tenantctl_job_last_success_timestamp_seconds", "gauge",
           "When the job last finished with outcome ok.",
           [({"job": j}, s.last_success) for j, s in jobs if s.last_success is not None])
    return "\n".join(out) + "\n"


class Metrics:
    """The live values behind the endpoint; every method is thread-safe."""

    def __init__(self, jobs: Iterable[str] = JOBS) -> None:
        self._lock = threading.Lock()
        self._leader = False
        self._up = False
        self._fleet: FleetGauges | None = None
        self._jobs = {j: JobStats() for j in jobs}

    def set_leader(self, leader: bool) -> None:
        with self._lock:
            self._leader = leader

    def record_job(self, job: str, duration: float, outcome: str,
                   at: float | None = None) -> None:
        with self._lock:
            s = self._jobs.get(job, JobStats())
            self._jobs[job] = replace(
                s, runs=s.runs + 1, failures=s.failures + (outcome in FAILED_OUTCOMES),
                last_duration=duration, last_outcome=outcome,
                last_success=(at or utcnow().timestamp()) if outcome == "ok" else s.last_success)

    def set_fleet(self, gauges: FleetGauges) -> None:
        with self._lock:
            self._fleet, self._up = gauges, True

    def catalog_down(self) -> None:
        with self._lock:
            self._up = False

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(self._leader, self._up, self._fleet, dict(self._jobs))


def read_fleet_gauges(fleet: Deps, now: datetime) -> FleetGauges:
    """A few queries on the catalog (each tenant's latest backup age is the
    domain's latest_backup_age)."""
    st = retention.status(fleet, now, limit=1)
    last = (select(Backup.tenant_id, func.max(Backup.finished_at).label("at"))
            .where(Backup.status == BackupStatus.completed).group_by(Backup.tenant_id)
            .subquery())
    with fleet.catalog.session() as s:
        rows = s.execute(select(Tenant.region, last.c.at, Tenant.activated_at,
                                Tenant.created_at)
                         .outerjoin(last, last.c.tenant_id == Tenant.id)
                         .where(Tenant.state.in_(HAS_DATABASE))).all()
    ages: dict[str, float] = {}
    for region, at, activated_at, created_at in rows:  # the oldest per region
        age = latest_backup_age(at, activated_at, created_at, now).total_seconds()
        ages[region] = max(ages.get(region, 0.0), age)
    return FleetGauges(tenants=dict(st["states"]), oldest_backup_age=ages,
                       overdue_deletions=len(st["overdue"]["deletions"]),
                       overdue_purges=len(st["overdue"]["purges"]),
                       refreshed_at=now.timestamp())


class _MetricsHandler(BaseHTTPRequestHandler):
    render: Callable[[], str]

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            self.send_error(404, "try /metrics")
            return
        body = type(self).render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # scrapes are not worth a log line


class MetricsServer:
    """GET /metrics on host:port (port 0: any free port; see .port)."""

    def __init__(self, host: str, port: int, render: Callable[[], str]) -> None:
        handler = type("Handler", (_MetricsHandler,), {"render": staticmethod(render)})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise Conflict(f"--metrics-port: cannot listen on {host}:{port}: "
                           f"{exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{host!s}:{port}"

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread = None
        self.httpd.server_close()


# -- leader election ---------------------------------------------------------------------


class LeaderLock:
    """The leader's session-level advisory lock, on a connection of its own."""

    # client side gives up on a dead path (~10 s) before the server does (~25 s)
    CLIENT = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3, "tcp_user_timeout": 10_000}
    SERVER = ("SET tcp_keepalives_idle = 10", "SET tcp_keepalives_interval = 5",
              "SET tcp_keepalives_count = 3", "SET tcp_user_timeout = 25000",
              "SET idle_session_timeout = 0", "SET statement_timeout = '10s'")

    def __init__(self, dsn: str, name: str = LEADER_LOCK) -> None:
        self.dsn = dsn
        self.key = lock_key(name)
        self.conn: psycopg.Connection[Any] | None = None
        self.held = False

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                               application_name="tenantctl-scheduler",
                               **self.CLIENT)  # type: ignore[arg-type]
        for stmt in self.SERVER:
            # older servers lack some of these; a Unix socket ignores keepalives
            with contextlib.suppress(psycopg.Error):
                conn.execute(stmt)
        return conn

    def try_acquire(self) -> bool:
        """True if this instance now leads. Raises psycopg.Error if the catalog
        cannot be reached (the connection is then closed)."""
        try:
            if self.conn is None or self.conn.closed:
                self.conn = self._connect()
            row = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        except psycopg.Error:
            self.close()
            raise
        self.held = bool(row and row[0])
        return self.held

    def alive(self) -> bool:
        """Whether we still hold it: the session is up and pg_locks shows the lock."""
        if self.conn is None or not self.held:
            return False
        classid, objid = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF
        try:
            row = self.conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND objsubid = 1 "
                "AND classid::bigint = %s AND objid::bigint = %s",
                (classid, objid)).fetchone()
        except psycopg.Error:
            self.close()
            return False
        if not (row and row[0]):
            self.close()
            return False
        return True

    def release(self) -> None:
        if self.conn is not None and self.held and not self.conn.closed:
            # if the session is gone, the lock went with it
            with contextlib.suppress(psycopg.Error):
                self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        self.held = False

    def close(self) -> None:
        self.held = False
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = None


# -- the jobs ----------------------------------------------------------------------------


@dataclass
class JobOutcome:
    outcome: str  # ok | partial | failed | skipped | interrupted
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None


class _Interrupted(Exception):
    """Raised between retention steps when the job must stop (SIGTERM, lost lead)."""


def backups_job(fleet: Deps, halt: threading.Event, concurrency: int,
                log: JsonLog) -> JobOutcome:
    """Reap backups a dead process left running, then back up every due tenant,
    `concurrency` at a time. One tenant's failure never stops the others; once
    `halt` is set no new backup starts (those in flight finish)."""
    reaped = pipeline.reap_dead(fleet)
    slugs = pipeline.due_tenants(fleet)
    counts: Counter[str] = Counter()
    errors: list[str] = []
    lock = threading.Lock()

    def one(slug: str) -> None:
        if halt.is_set():
            status = "not_started"
        else:
            try:
                status = pipeline.run_due_backup(fleet, slug).status
            except TenantChanged as exc:  # e.g. deleted since it was found due
                status = "skipped"
                log.info("backup_skipped", tenant=slug, reason=first_line(exc))
            except Exception as exc:  # noqa: BLE001 - one tenant never stops the job
                status = "failed"
                log.warning("backup_failed", tenant=slug, error=first_line(exc))
                with lock:
                    errors.append(f"{slug}: {first_line(exc)}")
        with lock:
            counts[status] += 1

    with ThreadPoolExecutor(max_workers=max(1, concurrency),
                            thread_name_prefix="backup") as pool:
        list(pool.map(one, slugs))
    result = {"due": len(slugs), "reaped": reaped, **{k: counts[k] for k in
              ("completed", "failed", "skipped", "not_started")}}
    outcome = "interrupted" if counts["not_started"] else \
        "partial" if counts["failed"] else "ok"
    return JobOutcome(outcome, result, errors[0] if errors else None)


def retention_job(fleet: Deps, kinds: tuple[str, ...], halt: threading.Event,
                  log: JsonLog, job: str = "retention") -> JobOutcome:
    """orchestrator.services.retention.run for some of its jobs; stops between steps when
    `halt` is set (each step is idempotent: the next run finishes the rest)."""
    counts: Counter[str] = Counter()

    def on_step(r: StepResult) -> None:
        counts[r.outcome] += 1
        log.emit("warning" if r.outcome == "failed" else "info", "retention_step",
                 job=job, **r.to_json())
        if halt.is_set():
            raise _Interrupted

    if halt.is_set():
        return JobOutcome("interrupted")
    try:
        report = retention.run(fleet, utcnow(), dry_run=False, jobs=kinds, on_step=on_step)
    except _Interrupted:
        return JobOutcome("interrupted", dict(counts))
    if report.skipped:
        return JobOutcome("skipped", {}, report.skipped)
    result = {"planned": len(report.plan), **{k: counts[k] for k in
              ("done", "skipped", "blocked", "failed")}}
    failed = report.failed
    if failed:
        return JobOutcome("partial", result,
                          f"{failed[0].action.describe()}: {failed[0].message}")
    return JobOutcome("ok", result)


# -- the daemon ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerOptions:
    intervals: Mapping[str, float]  # job -> seconds; only these jobs run
    standby_poll: float = 10.0  # a standby tries to take the lead this often
    heartbeat: float = 2.0  # the leader checks its lock this often
    backup_concurrency: int = 2
    metrics_refresh: float = 15.0  # catalog gauges re-read this often (and after jobs)
    # a support grant past its expiry brings the retention job (which ends it and its
    # sessions) forward: VALID UNTIL only stops new logins
    grant_poll: float = 15.0


@dataclass
class _Term:
    """One leadership term: its scheduler and the flag that stops its jobs."""

    scheduler: BackgroundScheduler
    halt: threading.Event = field(default_factory=threading.Event)


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class SchedulerDaemon:
    """Standby until it holds the leader lock, lead until it loses it or is told
    to stop; `stop()` (or a signal, see install_signal_handlers) ends `run()`."""

    def __init__(self, fleet: Deps, options: SchedulerOptions, log: JsonLog,
                 metrics: Metrics | None = None, metrics_server: MetricsServer | None = None,
                 lock: LeaderLock | None = None) -> None:
        self.fleet = fleet
        self.options = options
        self.log = log
        self.metrics = metrics or Metrics(options.intervals)
        self.metrics_server = metrics_server
        self.lock = lock or LeaderLock(fleet.cfg.catalog_dsn)
        self._stop_requested = False  # a plain flag: safe to set from a signal handler
        self._closing = threading.Event()
        self._refresh_now = threading.Event()
        self._retention_mutex = threading.Lock()  # the retention jobs share one catalog lock
        self._retention_started: datetime | None = None  # the last retention job's start
        self._running: set[str] = set()
        self._running_lock = threading.Lock()
        self._signals = 0

    # -- control --------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop_requested = True

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop cleanly. A second one: exit now (the next run
        reaps what is left)."""
        def handler(signum: int, frame: Any) -> None:
            self._signals += 1
            if self._signals > 1:
                os.write(1, (json.dumps({"ts": utcnow().isoformat(), "level": "error",
                                         "event": "forced_stop", "signal": signum}) + "\n")
                         .encode())
                os._exit(1)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; False if a stop was requested meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(0.2, left))
        return False

    # -- main loop ----------------------------------------------------------------------------

    def run(self) -> None:
        route_apscheduler_logs(self.log)
        self.log.info("started", jobs=dict(self.options.intervals),
                      standby_poll=self.options.standby_poll,
                      catalog=redact(self.fleet.cfg.catalog_dsn),
                      metrics=self.metrics_server.address if self.metrics_server else None)
        refresher = None
        if self.metrics_server is not None:
            refresher = threading.Thread(target=self._refresh_loop, name="metrics-refresh",
                                         daemon=True)
            refresher.start()
            self.metrics_server.start()
        try:
            while not self._stop_requested:
                if self._standby():
                    self._lead()
        finally:
            self.lock.release()
            self.lock.close()
            self._closing.set()
            self._refresh_now.set()
            if refresher is not None:
                refresher.join(timeout=15)
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.log.info("stopped")

    def _standby(self) -> bool:
        """Try for the lead every standby_poll seconds; True once leading, False
        when told to stop."""
        announced = outage = False
        while not self._stop_requested:
            try:
                if self.lock.try_acquire():
                    return True
                if not announced:
                    self.log.info("standby", poll_seconds=self.options.standby_poll)
                    announced = True
                if outage:
                    self.log.info("catalog_available")
                outage = False
            except psycopg.Error as exc:
                if not outage:
                    self.log.warning("catalog_unavailable", error=first_line(exc))
                outage = True
            self._sleep(self.options.standby_poll)
        return False

    def _lead(self) -> None:
        term = _Term(self._new_scheduler())
        self._add_jobs(term)
        term.scheduler.start()
        self.metrics.set_leader(True)
        self.log.info("leader", jobs=sorted(self.options.intervals))
        polled = time.monotonic()
        try:
            while self._sleep(self.options.heartbeat):
                if time.monotonic() - polled >= self.options.grant_poll:
                    polled = time.monotonic()
                    self._expire_grants_on_time(term)
                if not self.lock.alive():
                    # Never two leaders: stop at once, whatever is in flight stops
                    # at its next tenant/step (and holds its job lock until then).
                    term.halt.set()
                    self.metrics.set_leader(False)
                    term.scheduler.shutdown(wait=False)
                    self.log.error("lost_leadership", running=self._running_jobs())
                    return
            term.halt.set()
            self.log.info("stopping", running=self._running_jobs())
            term.scheduler.shutdown(wait=True)  # in-flight work finishes first
        finally:
            self.metrics.set_leader(False)
            if term.scheduler.running:
                term.scheduler.shutdown(wait=False)

    def _expire_grants_on_time(self, term: _Term) -> None:
        """A live support grant whose expiry has passed: run the retention job now
        rather than at its next interval (it ends the grant and its open sessions)."""
        job = term.scheduler.get_job("retention")
        if job is None or job.next_run_time is None or "retention" in self._running_jobs():
            return
        now = utcnow()
        if job.next_run_time <= now:
            return  # due anyway
        try:
            with self.fleet.catalog.session() as s:
                due = s.scalar(select(func.min(SupportGrant.expires_at)).where(
                    SupportGrant.dropped_at.is_(None)))
        except Exception as exc:  # noqa: BLE001 - the next poll tries again
            self.log.warning("grant_poll_failed", error=first_line(exc))
            return
        started = self._retention_started
        # once per expiry: a grant the last run could not end waits for the interval
        if due is not None and due <= now and (started is None or due > started):
            self.log.info("grant_expired", action="retention job brought forward")
            term.scheduler.modify_job("retention", next_run_time=now)

    def _running_jobs(self) -> list[str]:
        with self._running_lock:
            return sorted(self._running)

    def _new_scheduler(self) -> BackgroundScheduler:
        return BackgroundScheduler(timezone=UTC, daemon=True)

    def _add_jobs(self, term: _Term) -> None:
        now = utcnow()
        for job, seconds in self.options.intervals.items():
            term.scheduler.add_job(
                self.run_job, IntervalTrigger(seconds=seconds, timezone=UTC), args=(job, term.halt),
                id=job, name=job, max_instances=1, coalesce=True,
                misfire_grace_time=max(1, int(seconds)), next_run_time=now)

    # -- one job run ------------------------------------------------------------------------

    def job_body(self, job: str, halt: threading.Event) -> JobOutcome:
        if job == "backups":
            return backups_job(self.fleet, halt, self.options.backup_concurrency, self.log)
        if job in RETENTION_KINDS:
            # retention.run takes one catalog lock for all three: run them in turn
            # here rather than have two of them find it taken and skip
            while not self._retention_mutex.acquire(timeout=0.5):
                if halt.is_set():
                    return JobOutcome("interrupted")
            try:
                return retention_job(self.fleet, RETENTION_KINDS[job], halt, self.log, job)
            finally:
                self._retention_mutex.release()
        raise InvalidInput(f"unknown job {job!r}")

    def run_job(self, job: str, halt: threading.Event) -> JobOutcome:
        """Run one job under its catalog lock; never raises. Logs one `job` line and
        records metrics."""
        started = time.monotonic()
        if job == "retention":
            self._retention_started = utcnow()
        with self._running_lock:
            self._running.add(job)
        try:
            with self.fleet.catalog.advisory_lock(job_lock(job)) as got:
                result = self.job_body(job, halt) if got else JobOutcome(
                    "skipped", {}, "another instance is still running this job")
        except Exception as exc:  # noqa: BLE001 - a job never takes the daemon down
            result = JobOutcome("failed", {}, first_line(exc))
        finally:
            with self._running_lock:
                self._running.discard(job)
        duration = time.monotonic() - started
        self.metrics.record_job(job, duration, result.outcome)
        level = "error" if result.outcome == "failed" else \
            "warning" if result.outcome == "partial" else "info"
        self.log.emit(level, "job", job=job, outcome=result.outcome,
                      duration_ms=int(duration * 1000), counts=result.counts,
                      error=result.error)
        self._refresh_now.set()
        return result

    # -- metrics refresh -----------------------------------------------------------------------

    def refresh_metrics(self) -> str | None:
        """Re-read the catalog gauges; the error's first line if that failed."""
        try:
            self.metrics.set_fleet(read_fleet_gauges(self.fleet, utcnow()))
            return None
        except Exception as exc:  # noqa: BLE001 - the endpoint keeps answering
            self.metrics.catalog_down()
            return first_line(exc)

    def _refresh_loop(self) -> None:
        failing = False
        while not self._closing.is_set():
            self._refresh_now.clear()
            error = self.refresh_metrics()
            if error and not failing:
                self.log.warning("metrics_refresh_failed", error=error,
                                 detail="serving the last known values with tenantctl_up 0")
            elif failing and not error:
                self.log.info("metrics_refresh_ok")
            failing = error is not None
            self._refresh_now.wait(self.options.metrics_refresh)
