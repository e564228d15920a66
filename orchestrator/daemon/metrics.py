"""The scheduler's metrics: Prometheus text served by a ThreadingHTTPServer thread.
The catalog-derived gauges are read by the daemon's refresher thread (every
`metrics_refresh` seconds and after each job), so a scrape never touches the
catalog and never fails: if the catalog is down it still answers, with the last
known values and ``tenantctl_up 0``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from orchestrator.adapters.catalog.models import Backup, Tenant
from orchestrator.adapters.clock import utcnow
from orchestrator.daemon.jobs import FAILED_OUTCOMES, JOBS
from orchestrator.domain.errors import Conflict
from orchestrator.domain.states import HAS_DATABASE
from orchestrator.domain.statuses import BackupStatus
from orchestrator.domain.timeliness import latest_backup_age
from orchestrator.services import retention

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
