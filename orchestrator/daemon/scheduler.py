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

The pieces live beside this loop: jobs.py (the jobs), leader.py (the lock),
metrics.py (gauges and the endpoint), jsonlog.py (the log lines).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import func, select

from orchestrator.adapters.catalog import job_runs
from orchestrator.adapters.catalog.db import redact
from orchestrator.adapters.catalog.models import SupportGrant
from orchestrator.adapters.clock import utcnow
from orchestrator.daemon.jobs import (
    RETENTION_KINDS,
    JobOutcome,
    backups_job,
    job_lock,
    retention_job,
    usage_job,
)
from orchestrator.daemon.jsonlog import JsonLog, route_apscheduler_logs
from orchestrator.daemon.leader import LeaderLock
from orchestrator.daemon.metrics import Metrics, MetricsServer, read_fleet_gauges
from orchestrator.domain.errors import InvalidInput, first_line
from orchestrator.domain.jobs import COUNTED_OUTCOMES, next_run_at

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps


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
            self.metrics.beat()  # /healthz: the loop is alive
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
        planned = self._add_jobs(term)
        term.scheduler.start()
        self.metrics.set_leader(True)
        self.log.info("leader", jobs=sorted(self.options.intervals), next_runs=planned)
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

    def _add_jobs(self, term: _Term) -> dict[str, str]:
        """Each job from its persisted cadence: a job that ran within its interval
        (before a restart, or on the old leader) waits for the rest of it; one never
        run, or overdue, runs now. Returns job -> next run (ISO), for the log."""
        now = utcnow()
        try:
            last = job_runs.last_runs(self.fleet.catalog, self.options.intervals)
        except Exception as exc:  # noqa: BLE001 - unknown cadence: run now, as before
            self.log.warning("schedule_read_failed", error=first_line(exc),
                             detail="every job runs now")
            last = {}
        planned: dict[str, str] = {}
        for job, seconds in self.options.intervals.items():
            run = last.get(job)
            if run is not None and run.outcome == "ok":  # last success survives failover
                self.metrics.seed_last_success(job, run.finished_at.timestamp())
            at = next_run_at(run.started_at if run else None, timedelta(seconds=seconds), now)
            planned[job] = at.isoformat(timespec="seconds")
            term.scheduler.add_job(
                self.run_job, IntervalTrigger(seconds=seconds, timezone=UTC), args=(job, term.halt),
                id=job, name=job, max_instances=1, coalesce=True,
                misfire_grace_time=max(1, int(seconds)), next_run_time=at)
        return planned

    # -- one job run ------------------------------------------------------------------------

    def job_body(self, job: str, halt: threading.Event) -> JobOutcome:
        if job == "backups":
            return backups_job(self.fleet, halt, self.options.backup_concurrency, self.log)
        if job == "usage":
            return usage_job(self.fleet, halt, self.log)
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
        started_at = utcnow()
        if job == "retention":
            self._retention_started = started_at
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
        if result.outcome in COUNTED_OUTCOMES:
            self._record_run(job, started_at, result.outcome)
        level = "error" if result.outcome == "failed" else \
            "warning" if result.outcome == "partial" else "info"
        self.log.emit(level, "job", job=job, outcome=result.outcome,
                      duration_ms=int(duration * 1000), counts=result.counts,
                      error=result.error)
        self._refresh_now.set()
        return result

    def _record_run(self, job: str, started_at: datetime, outcome: str) -> None:
        try:
            job_runs.record_run(self.fleet.catalog, job, started_at, utcnow(), outcome,
                                instance_name())
        except Exception as exc:  # noqa: BLE001 - the next leader then runs it sooner
            self.log.warning("schedule_record_failed", job=job, error=first_line(exc))

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
