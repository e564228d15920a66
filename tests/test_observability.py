"""Observability: the scheduler's persisted cadence (a restart or failover keeps
it), the Prometheus endpoint (prometheus_client: names, build info, process
metrics, histograms, fleet gauges) and `/healthz`, and the logging every command
shares (`--log-level`, `--log-format`).

The pure pieces (next run, health verdict) and the endpoint over a bare Metrics
need no Postgres; the daemons run as real subprocesses of the CLI against a
catalog of the test's own, so the cadence they read is only this test's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.daemon.metrics import (
    FleetGauges,
    Metrics,
    MetricsServer,
    ServerGauge,
    judge_health,
)
from orchestrator.domain.jobs import next_run_at
from tests.conftest import REPO, TENANTCTL, OwnCatalog

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


# -- the cadence: pure -----------------------------------------------------------------


def test_next_run_from_the_last_run() -> None:
    assert next_run_at(None, HOUR, T0) == T0  # never run: now
    assert next_run_at(T0 - timedelta(minutes=10), HOUR, T0) == T0 + timedelta(minutes=50)
    assert next_run_at(T0 - HOUR, HOUR, T0) == T0  # exactly due
    assert next_run_at(T0 - 5 * HOUR, HOUR, T0) == T0  # overdue: now, once
    # a last run "in the future" (another host's clock ahead): at most one interval
    assert next_run_at(T0 + 3 * HOUR, HOUR, T0) == T0 + HOUR


# -- /healthz: pure verdict, and over HTTP on a bare Metrics ------------------------------


def test_health_verdict() -> None:
    def judge(**kw: Any) -> tuple[bool, str]:
        args = {"beat_age": 1.0, "loop_max": 60.0, "up": True, "refresh_age": 5.0,
                "refresh_max": 60.0, "leader": False, **kw}
        h = judge_health(**args)
        return h.ok, h.detail["status"]

    assert judge() == (True, "ok")
    assert judge(leader=True) == (True, "ok")  # leading or not, both healthy
    assert judge(beat_age=None) == (False, "unhealthy")  # the loop never ticked
    assert judge(beat_age=61.0) == (False, "unhealthy")  # stuck
    assert judge(up=False) == (False, "unhealthy")  # the last catalog read failed
    assert judge(refresh_age=None) == (False, "unhealthy")  # never read
    assert judge(refresh_age=120.0) == (False, "unhealthy")  # refresher stuck


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_endpoint_serves_metrics_and_healthz_over_http() -> None:
    from orchestrator.adapters.clock import utcnow

    m = Metrics(["backups", "prune"])
    server = MetricsServer("127.0.0.1", 0, m.render, m.health)
    server.start()
    base = f"http://{server.address}"
    try:
        status, ctype, body = _get(base + "/healthz")
        assert status == 503 and ctype == "application/json"
        verdict = json.loads(body)
        assert verdict["status"] == "unhealthy" and not verdict["loop_alive"]
        assert not verdict["catalog_reachable"]

        m.beat()
        m.set_fleet(FleetGauges({"active": 2}, {}, 0, 0, utcnow().timestamp(),
                                servers=(ServerGauge("s1", "eu", 100, 2, True),),
                                behind_target={"eu": 1}, migration_failed={"eu": 0}))
        status, _, body = _get(base + "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok", body
        m.catalog_down()
        assert _get(base + "/healthz")[0] == 503

        m.record_job("backups", 42.0, "ok")
        status, ctype, text = _get(base + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        lines = text.splitlines()
        assert 'tenantctl_job_run_duration_seconds_bucket{job="backups",le="30.0"} 0.0' in lines
        assert 'tenantctl_job_run_duration_seconds_bucket{job="backups",le="60.0"} 1.0' in lines
        assert 'tenantctl_job_run_duration_seconds_count{job="prune"} 0.0' in lines
        assert 'tenantctl_server_capacity{region="eu",server="s1"} 100.0' in lines
        assert 'tenantctl_tenants_behind_target{region="eu"} 1.0' in lines
        assert _get(base + "/nope")[0] == 404
    finally:
        server.stop()


# -- real daemons against a catalog of the test's own ------------------------------------


class Daemon:
    """One `tenantctl scheduler run` subprocess; its JSON log lines (stdout) are
    collected by a reader thread, stderr goes to a file."""

    def __init__(self, config: Path, stderr_path: Path, *args: str) -> None:
        cmd = [*TENANTCTL, "--config", str(config), "scheduler", "run",
               "--standby-poll", "1", "--metrics-port", "0", *args]
        self._stderr = stderr_path.open("w")
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, cwd=REPO)
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except json.JSONDecodeError:
                self.lines.append({"event": "<not json>", "line": line})

    def events(self, name: str) -> list[dict[str, Any]]:
        return [ln for ln in list(self.lines) if ln.get("event") == name]

    def wait(self, what: str, cond: Callable[[], Any], timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited waiting for {what}: {self.describe()}")
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}: {self.describe()}")

    @property
    def base_url(self) -> str:
        started = self.wait("started", lambda: self.events("started"))
        return f"http://{started[0]['metrics']}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        self._stderr.close()

    def describe(self) -> str:
        self._stderr.flush()
        return f"rc {self.proc.poll()}\nlines: {self.lines}\nstderr: " \
               f"{self.stderr_path.read_text()}"


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: Path, *args: str) -> Daemon:
        d = Daemon(config, tmp_path / f"stderr-{len(started)}.txt", *args)
        started.append(d)
        return d

    try:
        yield start
    finally:
        for d in started:
            d.kill()


def _cadence(own: OwnCatalog) -> dict[str, tuple[datetime, str]]:
    with psycopg.connect(own.fleet.cfg.catalog_dsn) as conn:
        return {job: (at, outcome) for job, at, outcome in conn.execute(
            "SELECT job, last_started_at, last_outcome FROM scheduler_jobs")}


def _seed(own: OwnCatalog, job: str, started: datetime) -> None:
    with psycopg.connect(own.fleet.cfg.catalog_dsn) as conn:
        conn.execute("INSERT INTO scheduler_jobs VALUES (%s, %s, %s, 'ok', 'seeded')",
                     (job, started, started + timedelta(seconds=1)))


def _metric_value(text: str, sample: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return None


def _at(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def test_failover_keeps_the_cadence_and_the_endpoint_reports_it(
        spawn: Callable[..., Daemon], own_catalog: OwnCatalog, slug: str) -> None:
    """prune ran a minute ago (within its hour), audit_purge two hours ago (overdue):
    the leader runs audit_purge at once and not prune. After the leader dies, the
    standby that takes over runs neither: both ran within their interval."""
    own = own_catalog
    own.fleet.provision(slug, "eu-central")
    with psycopg.connect(own.fleet.cfg.catalog_dsn) as conn:  # as a failed rollout leaves it
        conn.execute("UPDATE tenants SET revision = 'r_elsewhere', migration_error = 'boom' "
                     "WHERE slug = %s", (slug,))
    now = datetime.now(UTC)
    _seed(own, "prune", now - timedelta(minutes=1))
    _seed(own, "audit_purge", now - 2 * HOUR)
    jobs = ("--jobs", "prune,audit_purge", "--interval-seconds", "3600")

    a = spawn(own.config_path, *jobs)
    lead = a.wait("leadership", lambda: a.events("leader"))[0]
    assert abs(_at(lead["next_runs"]["prune"]) - (now + timedelta(minutes=59))) \
        < timedelta(seconds=5), lead
    assert _at(lead["next_runs"]["audit_purge"]) <= datetime.now(UTC)
    ran = a.wait("audit_purge to run", lambda: a.events("job"))[0]
    assert ran["job"] == "audit_purge" and ran["outcome"] == "ok", a.describe()
    purge_run = _cadence(own)["audit_purge"]
    assert purge_run[1] == "ok" and purge_run[0] > now - timedelta(seconds=1)

    # the endpoint: names kept, build info, process metrics, histograms, fleet gauges
    def scraped() -> str | None:
        status, _, text = _get(a.base_url + "/metrics")
        return text if status == 200 and "tenantctl_up 1.0" in text.splitlines() \
            and "tenantctl_server_capacity" in text else None

    lines = a.wait("a scrape with the catalog gauges", scraped, 30).splitlines()
    names = {ln.split("{")[0].split(" ")[0] for ln in lines if not ln.startswith("#")}
    assert {"tenantctl_up", "tenantctl_scheduler_leader", "tenantctl_tenants",
            "tenantctl_oldest_latest_backup_age_seconds", "tenantctl_overdue_deletions",
            "tenantctl_overdue_purges", "tenantctl_catalog_refresh_timestamp_seconds",
            "tenantctl_job_duration_seconds", "tenantctl_job_runs_total",
            "tenantctl_job_failures_total", "tenantctl_job_last_success_timestamp_seconds",
            "tenantctl_build_info", "process_cpu_seconds_total",
            "process_resident_memory_bytes", "python_info",
            "tenantctl_job_run_duration_seconds_bucket",
            "tenantctl_server_capacity", "tenantctl_server_tenants",
            "tenantctl_tenants_behind_target", "tenantctl_tenants_migration_failed"} <= names
    from orchestrator.adapters.package import installed_version

    assert [ln for ln in lines if ln.startswith("tenantctl_build_info{")
            and f'version="{installed_version()}"' in ln and ln.endswith(" 1.0")]
    assert installed_version() != "unknown"
    assert "# TYPE tenantctl_job_run_duration_seconds histogram" in lines
    buckets = [ln for ln in lines
               if ln.startswith('tenantctl_job_run_duration_seconds_bucket{job="audit_purge"')]
    assert [ln.split('le="')[1].split('"')[0] for ln in buckets][-1] == "+Inf"
    assert len(buckets) == 13 and buckets[-1].endswith(" 1.0"), buckets
    assert 'tenantctl_job_run_duration_seconds_count{job="prune"} 0.0' in lines
    for server in own.fleet.cfg.servers:
        cap = [ln for ln in lines if ln.startswith("tenantctl_server_capacity{")
               and f'server="{server.name}"' in ln]
        assert cap and cap[0].endswith(f" {float(server.capacity)}"), (server, cap)
    assert 'tenantctl_tenants_behind_target{region="eu-central"} 1.0' in lines
    assert 'tenantctl_tenants_migration_failed{region="eu-central"} 1.0' in lines
    assert 'tenantctl_tenants_migration_failed{region="ap-south"} 0.0' in lines
    status, _, body = _get(a.base_url + "/healthz")
    assert status == 200 and json.loads(body)["leader"] is True, body

    # failover: a standby takes over from the dead leader and keeps the cadence
    b = spawn(own.config_path, *jobs)
    b.wait("standby", lambda: b.events("standby"))
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(timeout=10)
    took = b.wait("the takeover", lambda: b.events("leader"), 30)[0]
    assert abs(_at(took["next_runs"]["audit_purge"]) - (purge_run[0] + HOUR)) \
        < timedelta(seconds=2), took
    assert abs(_at(took["next_runs"]["prune"]) - (now + timedelta(minutes=59))) \
        < timedelta(seconds=5), took
    # the last successes the catalog recorded, though this instance ran nothing
    text = _get(b.base_url + "/metrics")[2]
    seeded = {job: _metric_value(text, "tenantctl_job_last_success_timestamp_seconds"
                                 f'{{job="{job}"}}') for job in ("prune", "audit_purge")}
    assert seeded["prune"] == pytest.approx((now - timedelta(seconds=59)).timestamp(), abs=1)
    assert seeded["audit_purge"] is not None and \
        seeded["audit_purge"] >= purge_run[0].timestamp(), text
    time.sleep(4)  # several polls of the new leader: it runs neither job
    assert not b.events("job"), b.describe()
    assert b.proc.poll() is None
    assert _cadence(own)["prune"][0] < now  # prune never ran: still the seeded run


# -- logging: one format for every command -------------------------------------------------


def test_log_lines_json_and_text_mask_secrets() -> None:
    from orchestrator.daemon.jsonlog import format_line

    fields = {"tenant": "acme", "password": "hunter2", "counts": {"done": 2},
              "error": "connect to postgresql://admin:s3cret@db:5432/x failed",
              "passed": "kept", "detail": None}
    line = json.loads(format_line("json", T0, "info", "backup", fields))
    assert line == {"ts": "2026-03-10T12:00:00.000+00:00", "level": "info", "event": "backup",
                    "tenant": "acme", "password": "***", "counts": {"done": 2},
                    "error": "connect to postgresql://admin:***@db:5432/x failed",
                    "passed": "kept", "detail": None}
    text = format_line("text", T0, "warning", "backup", fields)
    assert text == ('2026-03-10T12:00:00.000+00:00 warning backup tenant=acme password=*** '
                    'counts={"done":2} error="connect to postgresql://admin:***@db:5432/x '
                    'failed" passed=kept\n')
    assert "hunter2" not in text and "s3cret" not in text


def test_command_path_names_the_command_never_its_arguments() -> None:
    from cli.logs import command_path
    from cli.main import app

    assert command_path(app, ["--config", "x.toml", "--log-level", "info", "retention",
                              "run", "--dry-run"]) == "retention run"
    assert command_path(app, ["tenant", "show", "acme", "--json"]) == "tenant show"
    assert command_path(app, ["--log-format=json", "doctor", "--fix"]) == "doctor"
    assert command_path(app, ["backup", "list"]) == "backup list"
    assert command_path(app, ["nosuch", "thing"]) == ""


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TENANTCTL_LOG_")}
    return subprocess.run([*TENANTCTL, *args], capture_output=True, text=True, cwd=REPO,
                          env={**clean, **(env or {})}, timeout=60)


def test_bad_log_options_are_one_line_errors() -> None:
    for args, env, needle in [(["--log-level", "loud"], {}, "--log-level: unknown level"),
                              (["--log-format", "xml"], {}, "--log-format: unknown format"),
                              ([], {"TENANTCTL_LOG_FORMAT": "xml"}, "--log-format"),
                              ([], {"TENANTCTL_LOG_LEVEL": "0"}, "--log-level")]:
        proc = _cli(*args, "region", "list", env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_json_logs_carry_a_failure_as_the_command_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.toml")
    proc = _cli("--log-format", "json", "--config", missing, "region", "list")
    assert proc.returncode == 2
    lines = [json.loads(ln) for ln in proc.stderr.splitlines()]  # every line is JSON
    assert len(lines) == 1, proc.stderr
    assert lines[0]["event"] == "command" and lines[0]["level"] == "error"
    assert lines[0]["command"] == "region list" and lines[0]["exit_code"] == 2
    assert "config file not found" in lines[0]["error"]
    # without either option a failure stays one `error:` line
    plain = _cli("--config", missing, "region", "list")
    assert plain.stderr.startswith("error: ") and len(plain.stderr.splitlines()) == 1


def test_a_cron_command_logs_like_the_daemon(test_fleet: Any, fleet: Any, slug: str) -> None:
    from tests.conftest import run_cli

    fleet.provision(slug, "eu-central")
    proc = run_cli(test_fleet, "--log-format", "json", "--log-level", "info", "backup", "run",
                   slug)
    assert proc.returncode == 0, proc.stderr
    assert slug in proc.stdout and "completed" in proc.stdout  # the output is unchanged
    lines = [json.loads(ln) for ln in proc.stderr.splitlines()]  # every stderr line: JSON
    assert all({"ts", "level", "event"} <= set(ln) for ln in lines)
    backup = [ln for ln in lines if ln["event"] == "backup"]
    assert len(backup) == 1 and backup[0]["tenant"] == slug, lines
    assert backup[0]["status"] == "completed" and backup[0]["level"] == "info"
    assert lines[-1]["event"] == "command" and lines[-1]["command"] == "backup run"
    assert lines[-1]["exit_code"] == 0 and lines[-1]["duration_ms"] >= 0

    # the environment instead of the options; --log-level filters the info lines out
    quiet = run_cli(test_fleet, "backup", "run", slug,
                    env={"TENANTCTL_LOG_LEVEL": "warning", "TENANTCTL_LOG_FORMAT": "json"})
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    # text: the same events, one line each
    text = run_cli(test_fleet, "--log-level", "debug", "backup", "run", slug,
                   env={"TENANTCTL_LOG_FORMAT": "text"})
    assert text.returncode == 0, text.stderr
    events = [ln.split()[2] for ln in text.stderr.splitlines()]
    assert events == ["backup", "command"], text.stderr
    assert f"tenant={slug}" in text.stderr.splitlines()[0]


def test_only_a_finished_run_moves_the_cadence(own_catalog: OwnCatalog) -> None:
    """An interrupted run (SIGTERM, lost lead) is not recorded: the next leader
    finishes that job at once. A finished one is, by its start."""
    from orchestrator.daemon.jsonlog import JsonLog
    from orchestrator.daemon.scheduler import SchedulerDaemon, SchedulerOptions

    own = own_catalog
    with open(os.devnull, "w") as devnull:
        daemon = SchedulerDaemon(own.fleet, SchedulerOptions({"prune": 3600.0}),
                                 JsonLog(stream=devnull))
        halted = threading.Event()
        halted.set()
        assert daemon.run_job("prune", halted).outcome == "interrupted"
        assert "prune" not in _cadence(own)
        before = datetime.now(UTC)
        assert daemon.run_job("prune", threading.Event()).outcome == "ok"
    started, outcome = _cadence(own)["prune"]
    assert outcome == "ok" and before - timedelta(seconds=1) <= started <= datetime.now(UTC)
