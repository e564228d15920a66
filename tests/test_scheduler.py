"""`tenantctl scheduler run`: leader election, takeover, clean stop, metrics.

Real daemons (subprocesses of the CLI) against the session's real catalog. Every
process a test starts is killed in a `finally`, so a failing test leaves nothing
running (and no leader lock held for the next test).
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
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select

from orchestrator.adapters.catalog.db import lock_key
from orchestrator.adapters.catalog.models import Backup
from orchestrator.api import Fleet
from orchestrator.config import SchedulerConfig
from orchestrator.daemon.jobs import job_intervals, job_lock, parse_jobs
from orchestrator.daemon.leader import LEADER_LOCK
from orchestrator.daemon.metrics import (
    FleetGauges,
    JobStats,
    Metrics,
    MetricsSnapshot,
    render_metrics,
)
from tests.conftest import REPO, TENANTCTL, PgFleet


class Daemon:
    """One `tenantctl scheduler run` subprocess; its JSON log lines are collected
    by a reader thread (stderr goes to a file so no pipe ever fills up)."""

    def __init__(self, test_fleet: PgFleet, stderr_path: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        cmd = [*TENANTCTL, "--config", str(test_fleet.config_path), "scheduler", "run",
               "--standby-poll", "1", "--interval-seconds", "2", "--metrics-port", "0",
               *args]
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, cwd=REPO, env={**os.environ, **(env or {})})
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            try:
                self.lines.append(json.loads(line))
            except json.JSONDecodeError:
                self.lines.append({"event": "<not json>", "line": line})

    def events(self, name: str) -> list[dict[str, Any]]:
        return [ln for ln in list(self.lines) if ln.get("event") == name]

    def has(self, name: str) -> bool:
        return bool(self.events(name))

    @property
    def metrics_url(self) -> str:
        started = wait_for(lambda: self.events("started"), 30, "a started line", self)
        return f"http://{started[0]['metrics']}/metrics"

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            return str(resp.read().decode())

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        self._stderr.close()

    def describe(self) -> str:
        return f"pid {self.proc.pid} rc {self.proc.poll()}\nstdout:\n{''.join(self.raw)}" \
               f"\nstderr:\n{self.stderr()}"


def wait_for(cond: Callable[[], Any], timeout: float, what: str, *daemons: Daemon) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        for d in daemons:
            if d.proc.poll() is not None:
                pytest.fail(f"daemon exited while waiting for {what}: {d.describe()}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(d.describe() for d in daemons))


@pytest.fixture
def spawn(test_fleet: PgFleet, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(test_fleet, tmp_path / f"stderr-{len(started)}.txt", *args, env=env)
        started.append(d)
        return d

    try:
        yield start
    finally:
        for d in started:
            d.kill()


def _leader_lock_free(fleet: Fleet) -> bool:
    with fleet.catalog.advisory_lock(LEADER_LOCK) as got:
        return got


def _leader_and_standby(a: Daemon, b: Daemon) -> tuple[Daemon, Daemon]:
    def settled() -> tuple[Daemon, Daemon] | None:
        for lead, stand in ((a, b), (b, a)):
            if lead.has("leader") and lead.has("job") and stand.has("standby"):
                return lead, stand
        return None

    pair: tuple[Daemon, Daemon] = wait_for(settled, 240, "one leader with jobs, one standby",
                                           a, b)
    return pair


# -- two instances: one leads, the other takes over when it dies ------------------------


def test_one_leader_standby_takes_over_and_sigterm_stops_cleanly(
        spawn: Callable[..., Daemon], fleet: Fleet, slug: str) -> None:
    fleet.provision(slug, "eu-central")  # something the backups job must back up
    a = spawn()
    wait_for(lambda: a.has("started"), 30, "the first daemon to start", a)
    b = spawn()
    leader, standby = _leader_and_standby(a, b)
    time.sleep(3)  # a few more intervals: the standby still runs nothing
    assert not standby.has("leader") and not standby.has("job"), standby.describe()
    assert len(leader.events("leader")) == 1
    jobs = {ln["job"] for ln in leader.events("job")}
    assert jobs <= {"backups", "retention", "prune", "audit_purge", "usage"}
    for ln in leader.events("job"):
        assert {"ts", "level", "duration_ms", "outcome", "counts", "error"} <= set(ln)
        assert ln["outcome"] != "failed", leader.describe()
    # the first backups run takes every due tenant of the session (other test
    # modules' too): give it time
    wait_for(lambda: {ln["job"] for ln in leader.events("job")} >= {
        "backups", "retention", "prune", "audit_purge", "usage"}, 240, "every job once",
        leader)
    assert _backed_up(fleet, slug), leader.describe()

    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait(timeout=10)
    killed_at = time.monotonic()
    wait_for(lambda: standby.has("leader"), 30, "the standby to take over", standby)
    assert time.monotonic() - killed_at < 15
    wait_for(lambda: standby.has("job"), 30, "the new leader to run jobs", standby)

    standby.proc.send_signal(signal.SIGTERM)
    assert standby.proc.wait(timeout=90) == 0, standby.describe()
    standby._reader.join(timeout=10)
    assert standby.lines[-1]["event"] == "stopped", standby.describe()
    assert "Traceback" not in standby.stderr()
    # every line is JSON with the common fields
    assert all(ln.get("event") != "<not json>" and {"ts", "level", "event"} <= set(ln)
               for ln in standby.lines), standby.describe()
    assert _leader_lock_free(fleet)  # released on the way out


def _backed_up(fleet: Fleet, slug: str) -> bool:
    with fleet.catalog.session() as s:
        return s.scalar(select(Backup.id).where(Backup.slug == slug, Backup.kind == "scheduled",
                                                Backup.status == "completed")) is not None


# -- metrics ---------------------------------------------------------------------------------


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def test_metrics_endpoint_on_leader_and_standby(spawn: Callable[..., Daemon]) -> None:
    a = spawn("--jobs", "retention,prune,audit_purge")
    wait_for(lambda: a.has("started"), 30, "the first daemon to start", a)
    b = spawn("--jobs", "retention,prune,audit_purge")
    leader, standby = _leader_and_standby(a, b)

    def leader_metrics() -> str | None:
        text = leader.scrape()
        done = _metric(text, 'tenantctl_job_runs_total{job="retention"}')
        return text if done and _metric(text, "tenantctl_up") == 1 else None

    text = wait_for(leader_metrics, 30, "leader metrics after a job", leader)
    assert _metric(text, "tenantctl_scheduler_leader") == 1
    assert "# TYPE tenantctl_tenants gauge" in text
    for state in ("active", "cancelled", "deleted", "purged"):
        assert _metric(text, f'tenantctl_tenants{{state="{state}"}}') is not None, text
    assert _metric(text, "tenantctl_overdue_deletions") is not None
    assert _metric(text, "tenantctl_overdue_purges") is not None
    assert _metric(text, 'tenantctl_job_duration_seconds{job="retention"}') is not None
    assert _metric(text, 'tenantctl_job_failures_total{job="retention"}') == 0
    assert 'tenantctl_job_runs_total{job="backups"}' not in text  # not selected
    # the session has tenants in eu-central by now (the previous test made one)
    assert 'tenantctl_oldest_latest_backup_age_seconds{region="' in text

    other = wait_for(lambda: (t := standby.scrape()) and _metric(t, "tenantctl_up") == 1
                     and t, 30, "standby metrics", standby)
    assert _metric(other, "tenantctl_scheduler_leader") == 0
    assert _metric(other, 'tenantctl_job_runs_total{job="retention"}') == 0
    assert _metric(other, 'tenantctl_tenants{state="active"}') is not None
    assert urllib.request.urlopen(standby.metrics_url, timeout=5).status == 200


# -- safety: lost leadership, one job at a time -----------------------------------------


def test_leader_whose_lock_session_dies_steps_down(spawn: Callable[..., Daemon],
                                                   test_fleet: PgFleet, fleet: Fleet) -> None:
    """The leader's lock connection is terminated (as a failover or a network cut
    would): it stops leading at once, then leads again once it holds the lock."""
    d = spawn("--jobs", "retention")
    wait_for(lambda: d.has("leader") and d.has("job"), 60, "leadership", d)
    key = lock_key(LEADER_LOCK)
    with psycopg.connect(fleet.cfg.catalog_dsn, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid::bigint = %s AND objid::bigint = %s",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF))]
        assert len(pids) == 1
        conn.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
    wait_for(lambda: d.has("lost_leadership"), 20, "lost_leadership", d)
    wait_for(lambda: len(d.events("leader")) == 2, 20, "leading again", d)
    lost = d.lines.index(d.events("lost_leadership")[0])
    assert d.lines[lost]["level"] == "error"
    assert d.proc.poll() is None


def test_a_job_another_instance_still_runs_is_skipped(spawn: Callable[..., Daemon],
                                                      fleet: Fleet) -> None:
    with fleet.catalog.advisory_lock(job_lock("prune")) as got:
        assert got
        d = spawn("--jobs", "prune")
        job = wait_for(lambda: d.events("job"), 60, "a job line", d)[0]
        assert job["outcome"] == "skipped" and "still running" in job["error"]
    job = wait_for(lambda: [j for j in d.events("job") if j["outcome"] == "ok"], 30,
                   "a run once the lock is free", d)
    assert job[0]["job"] == "prune"


def test_one_tenant_failing_never_stops_the_job_or_the_daemon(
        spawn: Callable[..., Daemon], fleet: Fleet, slug: str) -> None:
    for i in range(3):
        fleet.provision(f"{slug}_{i}", "eu-central" if i % 2 else "ap-south")
    # the second backup of this process fails (after its upload, before its manifest)
    d = spawn("--jobs", "backups", "--backup-concurrency", "2",
              env={"TENANTCTL_FAULT": "backup.manifest:2", "TENANTCTL_FAULT_MODE": "raise"})
    job = wait_for(lambda: d.events("job"), 240, "the first backups run", d)[0]
    assert job["outcome"] == "partial" and job["level"] == "warning", d.describe()
    counts = job["counts"]
    assert counts["failed"] >= 1 and counts["completed"] >= 2, d.describe()
    assert counts["completed"] + counts["failed"] + counts["skipped"] == counts["due"]
    assert [f for f in d.events("backup_failed") if "injected fault" in f["error"]]
    text = wait_for(lambda: (t := d.scrape()) and 'tenantctl_job_failures_total{job="backups"} 1.0'
                    in t and t, 30, "the failure counted", d)
    assert (_metric(text, 'tenantctl_job_runs_total{job="backups"}') or 0) >= 1
    # the next run backs up the one that failed, and the daemon is still up
    wait_for(lambda: all(_backed_up(fleet, f"{slug}_{i}") for i in range(3)), 60,
             "every tenant backed up by the next runs", d)
    assert d.proc.poll() is None


def test_jobs_stop_between_tenants_once_halted(fleet: Fleet, slug: str) -> None:
    """What SIGTERM and a lost lock do to a job in flight: no new tenant/step
    starts (in-process, against the real catalog)."""
    from orchestrator.daemon.jobs import backups_job, retention_job
    from orchestrator.daemon.jsonlog import JsonLog

    fleet.provision(slug, "eu-central")
    halt = threading.Event()
    halt.set()
    with open(os.devnull, "w") as devnull:
        log = JsonLog(stream=devnull)
        result = backups_job(fleet, halt, 2, log)
        assert result.outcome == "interrupted"
        assert result.counts["not_started"] == result.counts["due"] >= 1
        assert result.counts["completed"] == 0
        assert not _backed_up(fleet, slug)
        assert retention_job(fleet, ("delete", "purge"), halt, log).outcome == "interrupted"


def test_catalog_down_standby_waits_and_metrics_still_answer(test_fleet: PgFleet) -> None:
    """With the catalog unreachable the daemon neither leads nor dies, and a scrape
    still answers, with tenantctl_up 0 (in-process; the catalog DSN points at a
    port nobody listens on)."""
    import dataclasses
    import io

    from orchestrator.adapters.catalog.db import with_dbname
    from orchestrator.daemon.jsonlog import JsonLog
    from orchestrator.daemon.metrics import MetricsServer
    from orchestrator.daemon.scheduler import SchedulerDaemon, SchedulerOptions
    from orchestrator.devfleet import localfleet

    port = localfleet.free_ports(1, start=31800)[0]
    cfg = dataclasses.replace(test_fleet.config(), catalog_dsn=with_dbname(
        f"postgresql://nobody@127.0.0.1:{port}/x?connect_timeout=2", "tenantctl_catalog"))
    down = Fleet(cfg)
    out = io.StringIO()
    metrics = Metrics(["retention"])
    server = MetricsServer("127.0.0.1", 0, metrics.render, metrics.health)
    daemon = SchedulerDaemon(down, SchedulerOptions({"retention": 1.0}, standby_poll=0.3,
                                                    metrics_refresh=0.3),
                             JsonLog(stream=out), metrics, server)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        def logged(event: str) -> bool:
            return any(json.loads(ln)["event"] == event for ln in out.getvalue().splitlines())

        deadline = time.monotonic() + 30
        while not (logged("catalog_unavailable") and logged("metrics_refresh_failed")):
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert resp.status == 200
        assert "tenantctl_up 0.0" in text.splitlines()
        assert "tenantctl_scheduler_leader 0.0" in text.splitlines()
        assert not logged("leader") and not logged("job")
        # /healthz: the loop is alive, the catalog is not: 503, and it says which
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            urllib.request.urlopen(f"http://{server.address}/healthz", timeout=5)
        assert unhealthy.value.code == 503
        verdict = json.loads(unhealthy.value.read())
        assert verdict["loop_alive"] is True and verdict["catalog_reachable"] is False
    finally:
        daemon.stop()
        runner.join(timeout=30)
        down.close()
    assert not runner.is_alive()
    assert json.loads(out.getvalue().splitlines()[-1])["event"] == "stopped"


def test_metrics_port_in_use_is_a_one_line_error(test_fleet: PgFleet) -> None:
    import socket

    from tests.conftest import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli(test_fleet, "scheduler", "run", "--metrics-port", str(port), timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith("error: --metrics-port: cannot listen on"), proc.stderr


def test_bad_options_are_one_line_errors(test_fleet: PgFleet) -> None:
    from tests.conftest import run_cli

    for args, needle in [(["--jobs", "backups,nope"], "unknown job nope"),
                         (["--standby-poll", "0"], "--standby-poll"),
                         (["--backup-concurrency", "0"], "--backup-concurrency")]:
        proc = run_cli(test_fleet, "scheduler", "run", *args, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and needle in proc.stderr, proc.stderr


# -- pure pieces -------------------------------------------------------------------------------


def test_render_metrics_text_format() -> None:
    snap = MetricsSnapshot(
        leader=True, up=True,
        fleet=FleetGauges(tenants={"active": 3, "deleted": 0},
                          oldest_backup_age={"eu-central": 90.5, 'we"ird\\': 1},
                          overdue_deletions=2, overdue_purges=0, refreshed_at=1700000000.0),
        jobs={"backups": JobStats(runs=4, failures=1, last_duration=1.25,
                                  last_success=1700000000.5, last_outcome="ok"),
              "prune": JobStats()})
    text = render_metrics(snap)
    lines = text.splitlines()
    assert text.endswith("\n")
    assert "tenantctl_up 1.0" in lines and "tenantctl_scheduler_leader 1.0" in lines
    assert 'tenantctl_tenants{state="active"} 3.0' in lines
    assert 'tenantctl_tenants{state="deleted"} 0.0' in lines
    assert 'tenantctl_oldest_latest_backup_age_seconds{region="eu-central"} 90.5' in lines
    assert 'tenantctl_oldest_latest_backup_age_seconds{region="we\\"ird\\\\"} 1.0' in lines
    assert "tenantctl_overdue_deletions 2.0" in lines and "tenantctl_overdue_purges 0.0" in lines
    assert 'tenantctl_job_duration_seconds{job="backups"} 1.25' in lines
    assert not any(ln.startswith('tenantctl_job_duration_seconds{job="prune"}') for ln in lines)
    assert 'tenantctl_job_runs_total{job="backups"} 4.0' in lines
    assert 'tenantctl_job_runs_total{job="prune"} 0.0' in lines
    assert 'tenantctl_job_failures_total{job="backups"} 1.0' in lines
    assert "# TYPE tenantctl_job_runs_total counter" in lines
    assert "# TYPE tenantctl_tenants gauge" in lines
    # every sample belongs to a family declared just before it
    declared: set[str] = set()
    for ln in lines:
        if ln.startswith("# TYPE "):
            declared.add(ln.split()[2])
        elif not ln.startswith("#"):
            assert ln.split("{")[0].split()[0] in declared, ln

    # the catalog down and never read: still a valid answer, up 0, no fleet gauges
    down = render_metrics(MetricsSnapshot(leader=False, up=False, fleet=None, jobs={}))
    assert "tenantctl_up 0.0" in down.splitlines()
    assert "tenantctl_scheduler_leader 0.0" in down.splitlines()
    assert "tenantctl_tenants" not in down


def test_metrics_registry_counts_failures_and_keeps_last_values() -> None:
    m = Metrics(["backups"])
    m.record_job("backups", 2.0, "ok", at=100.0)
    m.record_job("backups", 3.0, "partial", at=200.0)
    m.record_job("backups", 1.0, "skipped", at=300.0)
    s = m.snapshot().jobs["backups"]
    assert (s.runs, s.failures, s.last_duration, s.last_success) == (3, 1, 1.0, 100.0)
    m.set_fleet(FleetGauges({"active": 1}, {}, 0, 0, 1.0))
    m.set_leader(True)
    m.catalog_down()
    snap = m.snapshot()
    assert snap.leader and not snap.up and snap.fleet is not None  # last values kept


def test_intervals_and_job_selection() -> None:
    sc = SchedulerConfig(backups_minutes=15, retention_minutes=10, prune_minutes=60,
                         audit_purge_minutes=1440, usage_minutes=30)
    assert job_intervals(sc) == {"backups": 900.0, "retention": 600.0, "prune": 3600.0,
                                 "audit_purge": 86400.0, "usage": 1800.0}
    assert job_intervals(sc, 2, ("prune",)) == {"prune": 2.0}
    assert parse_jobs(None) == ("backups", "retention", "prune", "audit_purge", "usage")
    assert parse_jobs("prune, backups,prune") == ("prune", "backups")
    from orchestrator.domain.errors import InvalidInput

    with pytest.raises(InvalidInput, match="unknown job x"):
        parse_jobs("backups,x")
    with pytest.raises(InvalidInput):
        parse_jobs(" , ")
