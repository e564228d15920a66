"""The scheduler's metrics, through prometheus_client on a registry of its own
(never the global one: two daemons in one test process stay apart), served with
`/healthz` by a ThreadingHTTPServer thread. The catalog-derived gauges are read by
the daemon's refresher thread (every `metrics_refresh` seconds and after each
job), so a scrape never touches the catalog and never fails: if the catalog is
down it still answers, with the last known values and ``tenantctl_up 0``."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select

from orchestrator.adapters.catalog.models import Backup, Tenant
from orchestrator.adapters.clock import utcnow
from orchestrator.adapters.package import installed_version
from orchestrator.daemon.jobs import FAILED_OUTCOMES, JOBS
from orchestrator.domain.errors import Conflict
from orchestrator.domain.quota import server_counts
from orchestrator.domain.states import HAS_DATABASE
from orchestrator.domain.statuses import BackupStatus
from orchestrator.domain.timeliness import latest_backup_age
from orchestrator.services import quota, retention
from orchestrator.services.usage import UsageGauges
from orchestrator.services.usage import gauges as usage_gauges

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps


@dataclass(frozen=True)
class JobStats:
    runs: int = 0
    failures: int = 0
    last_duration: float | None = None  # seconds
    last_success: float | None = None  # unix time
    last_outcome: str | None = None


@dataclass(frozen=True)
class ServerGauge:
    name: str
    region: str
    capacity: int
    tenants: int  # tenants placed on it (provisioning, active, suspended, cancelled)
    available: bool  # takes new tenants


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
    servers: tuple[ServerGauge, ...] = ()
    # region -> tenants with a database whose catalog revision is not the target
    behind_target: Mapping[str, int] = field(default_factory=dict)
    # region -> tenants whose last migration failed (migration_error set)
    migration_failed: Mapping[str, int] = field(default_factory=dict)
    # usage metering over the last day (services/usage.py gauges)
    usage: UsageGauges | None = None
    # (server, over|warning) -> tenants over their storage quota or near it
    quota: Mapping[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsSnapshot:
    leader: bool
    up: bool  # the last read of the catalog succeeded
    fleet: FleetGauges | None
    jobs: Mapping[str, JobStats] = field(default_factory=dict)


# seconds: a job is a retention pass over a few rows or backups of a whole fleet
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
               14400.0, float("inf"))


def _families(snap: MetricsSnapshot) -> Iterator[Metric]:
    """The snapshot's metric families, by the names the endpoint always had."""
    def gauge(name: str, help_: str, labels: Iterable[str] = (),
              samples: Iterable[tuple[list[str], float]] = ()) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, help_, labels=list(labels))
        for values, value in samples:
            g.add_metric(values, float(value))
        return g

    def counter(name: str, help_: str, samples: Iterable[tuple[list[str], float]]
                ) -> CounterMetricFamily:
        c = CounterMetricFamily(name, help_, labels=["job"])
        for values, value in samples:
            c.add_metric(values, float(value))
        return c

    yield gauge("tenantctl_up", "1 if the last read of the catalog for these metrics "
                "succeeded.", samples=[([], snap.up)])
    yield gauge("tenantctl_scheduler_leader", "1 if this scheduler instance is the leader "
                "(runs the jobs).", samples=[([], snap.leader)])
    f = snap.fleet
    if f is not None:
        yield gauge("tenantctl_tenants", "Tenants per state.", ["state"],
                    [([s], n) for s, n in sorted(f.tenants.items())])
        yield gauge("tenantctl_oldest_latest_backup_age_seconds",
                    "Per region, over tenants backed up on schedule, the age of the oldest "
                    "latest completed backup (never backed up: since activation).", ["region"],
                    [([r], a) for r, a in sorted(f.oldest_backup_age.items())])
        yield gauge("tenantctl_overdue_deletions", "Tenants whose hold ended over an hour ago "
                    "and are not deleted (legal holds excluded).",
                    samples=[([], f.overdue_deletions)])
        yield gauge("tenantctl_overdue_purges", "Deleted tenants whose purge date passed over "
                    "an hour ago and are not purged (legal holds excluded).",
                    samples=[([], f.overdue_purges)])
        yield gauge("tenantctl_catalog_refresh_timestamp_seconds",
                    "When the catalog gauges above were last read.",
                    samples=[([], f.refreshed_at)])
        servers = sorted(f.servers, key=lambda sv: (sv.region, sv.name))
        yield gauge("tenantctl_server_capacity", "Tenants the server may hold (config).",
                    ["server", "region"], [([sv.name, sv.region], sv.capacity)
                                           for sv in servers])
        yield gauge("tenantctl_server_tenants", "Tenants placed on the server (provisioning, "
                    "active, suspended, cancelled).", ["server", "region"],
                    [([sv.name, sv.region], sv.tenants) for sv in servers])
        yield gauge("tenantctl_server_available", "1 if the server takes new tenants.",
                    ["server", "region"], [([sv.name, sv.region], sv.available)
                                           for sv in servers])
        yield gauge("tenantctl_tenants_behind_target", "Per region, tenants with a database "
                    "whose last known revision (catalog) is not the target revision.",
                    ["region"], [([r], n) for r, n in sorted(f.behind_target.items())])
        yield gauge("tenantctl_tenants_migration_failed", "Per region, tenants whose last "
                    "migration failed.", ["region"],
                    [([r], n) for r, n in sorted(f.migration_failed.items())])
        if f.usage is not None:
            yield from _usage_families(f.usage, gauge)
        yield gauge("tenantctl_quota_tenants", "Per server, tenants over their plan's "
                    "storage quota (status over: writes revoked while active) or at [usage] "
                    "quota_warning of it (status warning), by the last `usage collect`.",
                    ["server", "status"],
                    [([sv, st], n) for (sv, st), n in sorted(f.quota.items())])
    jobs = sorted(snap.jobs.items())
    yield gauge("tenantctl_job_duration_seconds", "Duration of the job's last run.", ["job"],
                [([j], s.last_duration) for j, s in jobs if s.last_duration is not None])
    yield counter("tenantctl_job_runs", "Runs of the job by this instance.",
                  [([j], s.runs) for j, s in jobs])
    yield counter("tenantctl_job_failures",
                  "Runs of the job that failed or in which a tenant/step failed.",
                  [([j], s.failures) for j, s in jobs])
    yield gauge("tenantctl_job_last_success_timestamp_seconds",
                "When the job last finished with outcome ok.", ["job"],
                [([j], s.last_success) for j, s in jobs if s.last_success is not None])


# usage metric -> (gauge name suffix, what it is over the last day)
USAGE_GAUGES = {"storage_bytes": ("storage_bytes", "last storage size in bytes"),
                "connections_peak": ("connections_peak", "peak of connections"),
                "transactions": ("transactions", "transactions (commits and rollbacks)"),
                "rows_written": ("rows_written", "rows inserted, updated and deleted"),
                "rows_read": ("rows_read", "rows read by scans")}


def _usage_families(u: UsageGauges, gauge: Callable[..., GaugeMetricFamily]
                    ) -> Iterator[Metric]:
    """Per server: its top tenants by each metric (rank and slug as labels: at most
    [usage] top series per server and metric, whatever the fleet's size) and the
    sums; one series per tenant only with [usage] per_tenant_metrics."""
    for metric, (name, what) in USAGE_GAUGES.items():
        yield gauge(f"tenantctl_usage_top_{name}",
                    f"Per server, the top tenants by {what} over the last day "
                    "(rank 1 = the largest).", ["server", "rank", "tenant"],
                    [([r.server, str(r.rank), r.slug], r.value) for r in u.top
                     if r.metric == metric])
        yield gauge(f"tenantctl_usage_server_{name}",
                    f"Per server, its tenants' {what} over the last day, summed.",
                    ["server"], [([sv], sums[metric]) for sv, sums in sorted(u.servers.items())])
        if u.tenants is not None:
            yield gauge(f"tenantctl_usage_tenant_{name}",
                        f"Per tenant, its {what} over the last day ([usage] "
                        "per_tenant_metrics).", ["server", "tenant"],
                        [([t.server, t.slug], getattr(t, metric) or 0) for t in u.tenants])


class _SnapshotCollector:
    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return _families(self.snapshot())


def render_metrics(snap: MetricsSnapshot) -> str:
    """The snapshot alone in Prometheus text format (no process metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(lambda: snap))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: dict[str, Any]


def judge_health(*, beat_age: float | None, loop_max: float, up: bool,
                 refresh_age: float | None, refresh_max: float, leader: bool) -> Health:
    """`/healthz`: healthy (200) when the daemon's loop ticked within `loop_max`
    seconds and the last read of the catalog succeeded within `refresh_max`
    seconds; else 503. Leading or standing by is no matter: both are healthy."""
    loop_alive = beat_age is not None and beat_age <= loop_max
    catalog = up and refresh_age is not None and refresh_age <= refresh_max
    return Health(loop_alive and catalog, {
        "status": "ok" if loop_alive and catalog else "unhealthy",
        "loop_alive": loop_alive, "catalog_reachable": catalog, "leader": leader,
        "loop_seconds_ago": None if beat_age is None else round(beat_age, 3),
        "catalog_read_seconds_ago": None if refresh_age is None else round(refresh_age, 3)})


class Metrics:
    """The live values behind the endpoint, and its registry; every method is
    thread-safe."""

    def __init__(self, jobs: Iterable[str] = JOBS, *, loop_max: float = 60.0,
                 refresh_max: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._leader = False
        self._up = False
        self._fleet: FleetGauges | None = None
        self._jobs = {j: JobStats() for j in jobs}
        self._beat: float | None = None  # monotonic: the daemon loop's last tick
        self.loop_max, self.refresh_max = loop_max, refresh_max
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SnapshotCollector(self.snapshot))  # type: ignore[arg-type]
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        info = Gauge("tenantctl_build_info", "The running tenantctl: version and Python.",
                     ["version", "python"], registry=self.registry)
        info.labels(installed_version(), ".".join(map(str, sys.version_info[:3]))).set(1)
        self._runs = Histogram("tenantctl_job_run_duration_seconds",
                               "Durations of the job's runs by this instance.", ["job"],
                               buckets=JOB_BUCKETS, registry=self.registry)
        for j in self._jobs:
            self._runs.labels(j)  # every selected job's buckets, at 0 until it runs

    def set_leader(self, leader: bool) -> None:
        with self._lock:
            self._leader = leader

    def beat(self) -> None:
        """The daemon's loop is alive (see judge_health)."""
        self._beat = time.monotonic()

    def record_job(self, job: str, duration: float, outcome: str,
                   at: float | None = None) -> None:
        with self._lock:
            s = self._jobs.get(job, JobStats())
            self._jobs[job] = replace(
                s, runs=s.runs + 1, failures=s.failures + (outcome in FAILED_OUTCOMES),
                last_duration=duration, last_outcome=outcome,
                last_success=(at or utcnow().timestamp()) if outcome == "ok" else s.last_success)
        self._runs.labels(job).observe(duration)

    def seed_last_success(self, job: str, at: float) -> None:
        """The last success the catalog recorded (by any instance), unless this one
        knows a later one."""
        with self._lock:
            s = self._jobs.get(job, JobStats())
            if s.last_success is None or s.last_success < at:
                self._jobs[job] = replace(s, last_success=at)

    def set_fleet(self, gauges: FleetGauges) -> None:
        with self._lock:
            self._fleet, self._up = gauges, True

    def catalog_down(self) -> None:
        with self._lock:
            self._up = False

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(self._leader, self._up, self._fleet, dict(self._jobs))

    def render(self) -> bytes:
        """Everything: the snapshot, process and platform metrics, build info and the
        job-duration histograms."""
        return generate_latest(self.registry)

    def health(self) -> Health:
        snap = self.snapshot()
        beat = self._beat
        return judge_health(
            beat_age=None if beat is None else time.monotonic() - beat,
            loop_max=self.loop_max, up=snap.up,
            refresh_age=None if snap.fleet is None
            else utcnow().timestamp() - snap.fleet.refreshed_at,
            refresh_max=self.refresh_max, leader=snap.leader)


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
    with fleet.catalog.session() as s:
        revisions = s.execute(select(Tenant.region, Tenant.revision,
                                     Tenant.migration_error.is_not(None), func.count())
                              .where(Tenant.state.in_(HAS_DATABASE))
                              .group_by(Tenant.region, Tenant.revision,
                                        Tenant.migration_error.is_not(None))).all()
    targets = {r: fleet.target_revision(r) for r in {row[0] for row in revisions}}
    behind: dict[str, int] = dict.fromkeys(fleet.cfg.regions, 0)
    failed: dict[str, int] = dict.fromkeys(fleet.cfg.regions, 0)
    for region, revision, has_failed, n in revisions:
        if revision != targets[region]:
            behind[region] = behind.get(region, 0) + n
        if has_failed:
            failed[region] = failed.get(region, 0) + n
    servers = tuple(ServerGauge(sv.name, sv.region, sv.capacity, sv.tenants, sv.available)
                    for sv in fleet.servers())
    return FleetGauges(tenants=dict(st["states"]), oldest_backup_age=ages,
                       overdue_deletions=len(st["overdue"]["deletions"]),
                       overdue_purges=len(st["overdue"]["purges"]),
                       refreshed_at=now.timestamp(), servers=servers,
                       behind_target=behind, migration_failed=failed,
                       usage=usage_gauges(fleet, now),
                       quota=server_counts(quota.standings(fleet),
                                           fleet.cfg.usage.quota_warning))


class _MetricsHandler(BaseHTTPRequestHandler):
    render: Callable[[], str | bytes]
    health: Callable[[], Health] | None

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            health = type(self).health
            verdict = health() if health is not None else Health(True, {"status": "ok"})
            self._send(200 if verdict.ok else 503, "application/json",
                       json.dumps(verdict.detail).encode() + b"\n")
            return
        if path not in ("/metrics", "/"):
            self.send_error(404, "try /metrics or /healthz")
            return
        body = type(self).render()
        self._send(200, "text/plain; version=0.0.4; charset=utf-8",
                   body.encode() if isinstance(body, str) else body)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # scrapes are not worth a log line


class MetricsServer:
    """GET /metrics and /healthz on host:port (port 0: any free port; see .port)."""

    def __init__(self, host: str, port: int, render: Callable[[], str | bytes],
                 health: Callable[[], Health] | None = None) -> None:
        handler = type("Handler", (_MetricsHandler,), {
            "render": staticmethod(render),
            "health": staticmethod(health) if health is not None else None})
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
