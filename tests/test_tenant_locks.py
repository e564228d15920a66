"""A tenant's transaction holding a lock (idle, or active in a long statement) never
hangs tenantctl: every wait on a tenant's objects is bounded by
tenants.lock_wait_seconds, the tenant whose wait ran out is that command's or that
fleet step's failure with who held the lock, and transitions that need the
tenant's sessions gone (cancel, the final backup before deletion) end them first.

Hostile sessions use the tenant's own connection string, on the real test
clusters; the fleet here waits 1 s for a lock, so the tests are quick. No
assertion is on time: each asserts what happened."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select

from backups import service as pipeline
from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.catalog.models import Backup
from orchestrator.api import Fleet
from orchestrator.config import load_config
from orchestrator.daemon import jsonlog, scheduler
from orchestrator.services import lifecycle, retention
from tests.conftest import PgFleet, connect_as, private_catalog, run_cli

ACT = {"TENANTCTL_ALLOW_CLOCK_OVERRIDE": "1"}


@dataclass
class LockFleet:
    config_path: Path
    fleet: Fleet


@pytest.fixture
def locks(test_fleet: PgFleet, tmp_path: Path) -> Iterator[LockFleet]:
    """A catalog of the test's own (fleet-wide commands see only its tenants) whose
    config waits 1 s for a tenant's locks."""
    with private_catalog(test_fleet, tmp_path / "own.toml") as own:
        text = own.config_path.read_text()
        assert "[tenants]\n" in text
        own.config_path.write_text(text.replace("[tenants]\n",
                                                "[tenants]\nlock_wait_seconds = 1\n", 1))
        fleet = Fleet(load_config(own.config_path))
        assert fleet.cfg.lock_wait_seconds == 1
        try:
            yield LockFleet(own.config_path, fleet)
        finally:
            fleet.close()


def cli(test_fleet: PgFleet, lf: LockFleet, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return run_cli(test_fleet, *args, config=lf.config_path, env=env)


class LockHolder:
    """A session holding ACCESS EXCLUSIVE on `products` in an open transaction:
    idle in it, or (active) running a long pg_sleep while holding it."""

    def __init__(self, dsn: str, *, active: bool = False) -> None:
        self.conn = connect_as(dsn)
        # a tenant may override whatever idle/statement timeouts its role carries
        with contextlib.suppress(psycopg.Error):
            self.conn.execute("SET idle_in_transaction_session_timeout = 0")
            self.conn.execute("SET statement_timeout = 0")
        self.conn.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        self.pid = self.conn.info.backend_pid
        self.role = self.conn.info.user
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        if active:
            self.thread = threading.Thread(target=self._sleep, daemon=True)
            self.thread.start()

    def _sleep(self) -> None:
        try:
            self.conn.execute("SELECT pg_sleep(600)")
        except psycopg.Error as exc:
            self.error = exc

    def was_ended(self) -> bool:
        """Whether the server ended this session (tenantctl terminated it)."""
        if self.thread is not None:
            self.thread.join(timeout=60)
            return isinstance(self.error, psycopg.OperationalError)
        try:
            self.conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return True
        return False

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.cancel_safe()
        if self.thread is not None:
            self.thread.join(timeout=60)
        with contextlib.suppress(psycopg.Error):
            self.conn.close()


@contextlib.contextmanager
def holding_lock(dsn: str, *, active: bool = False) -> Iterator[LockHolder]:
    holder = LockHolder(dsn, active=active)
    try:
        yield holder
    finally:
        holder.close()


def _make(lf: LockFleet, slug: str) -> str:
    lf.fleet.provision(slug, "ap-south")
    dsn = lf.fleet.credentials(slug)
    with connect_as(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) VALUES ('ana@example.com', 'Ana')")
    return dsn


def _admin_dsn(lf: LockFleet, slug: str) -> str:
    """tenantctl's own role, in the tenant's database."""
    t = lf.fleet.get_tenant(slug)
    return with_dbname(lf.fleet.cfg.server(t.server).admin_dsn, t.database)


def _backups(lf: LockFleet, slug: str) -> list[Backup]:
    with lf.fleet.catalog.session() as s:
        return list(s.scalars(select(Backup).where(Backup.slug == slug).order_by(Backup.id)))


def _show(test_fleet: PgFleet, lf: LockFleet, slug: str) -> Any:
    proc = cli(test_fleet, lf, "tenant", "show", slug, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("active", [False, True], ids=["idle_in_transaction", "active"])
def test_backup_of_a_locked_tenant_fails_naming_the_holder_and_all_goes_on(
        test_fleet: PgFleet, locks: LockFleet, slug: str, active: bool) -> None:
    locked, other = f"{slug}_l", f"{slug}_o"
    dsn = _make(locks, locked)
    _make(locks, other)
    with holding_lock(dsn, active=active) as holder:
        one = cli(test_fleet, locks, "backup", "run", locked)
        assert one.returncode == 10, one.stderr
        lines = one.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), one.stderr
        assert "lock timeout" in lines[0]
        assert f"pid {holder.pid}" in lines[0] and f"role {holder.role}" in lines[0]
        assert ("active" if active else "idle in transaction") in lines[0]
        assert "Traceback" not in one.stderr
        failed = _backups(locks, locked)
        assert [b.status for b in failed] == ["failed"]
        assert failed[0].error and f"pid {holder.pid}" in failed[0].error

        every = cli(test_fleet, locks, "backup", "run", "--all", "--json")
        assert every.returncode != 0
        results = {r["tenant"]: r for r in json.loads(every.stdout)}
        assert results[other]["status"] == "completed"
        assert results[locked]["status"] == "failed"
        assert f"pid {holder.pid}" in results[locked]["error"]
        assert not holder.was_ended()  # a backup never ends a tenant's session
    # once the lock is gone, the same command backs it up
    again = cli(test_fleet, locks, "backup", "run", locked)
    assert again.returncode == 0, again.stderr
    assert _backups(locks, locked)[-1].status == "completed"


@pytest.mark.parametrize("active", [False, True], ids=["idle_in_transaction", "active"])
def test_cancel_with_a_lock_held_ends_the_session_and_backs_up(
        test_fleet: PgFleet, locks: LockFleet, slug: str, active: bool) -> None:
    dsn = _make(locks, slug)
    with holding_lock(dsn, active=active) as holder:
        proc = cli(test_fleet, locks, "tenant", "cancel", slug, "--yes", "--json")
        assert proc.returncode == 0, proc.stderr
        res = json.loads(proc.stdout)
        assert res["state"] == "cancelled" and res["backup_error"] is None
        assert res["backup_id"] is not None
        assert holder.was_ended()
    row = pipeline.get_backup(locks.fleet, res["backup_id"])
    assert row.status == "completed" and row.kind == "cancel"
    # the tenant can still read (the hold), not write
    with connect_as(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO customers (email, name) VALUES ('b@example.com', 'B')")


def test_cancel_whose_backup_still_fails_says_so_and_what_to_run(
        test_fleet: PgFleet, locks: LockFleet, slug: str) -> None:
    """A lock cancel does not end (another tenantctl process's, here the admin's own
    session): the cancellation stands, the backup fails within the bound, and the
    command says both and what to run next."""
    _make(locks, slug)
    with holding_lock(_admin_dsn(locks, slug)) as holder:
        proc = cli(test_fleet, locks, "tenant", "cancel", slug, "--yes")
        assert proc.returncode == 10, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "is cancelled, but its backup failed" in lines[0]
        assert f"pid {holder.pid}" in lines[0]
        assert f"tenantctl backup run {slug}" in lines[0]
    assert _show(test_fleet, locks, slug)["state"] == "cancelled"
    # the command it names finishes the job
    assert cli(test_fleet, locks, "backup", "run", slug).returncode == 0


def _cancelled(test_fleet: PgFleet, lf: LockFleet, slug: str) -> datetime:
    proc = cli(test_fleet, lf, "tenant", "cancel", slug, "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    return datetime.fromisoformat(json.loads(proc.stdout)["hold_until"])


def _retention(test_fleet: PgFleet, lf: LockFleet, at: datetime
               ) -> tuple[int, dict[str, Any]]:
    proc = cli(test_fleet, lf, "retention", "run", "--now", at.isoformat(), "--json", env=ACT)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _outcomes(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {r["tenant"]: (r["outcome"], r["message"]) for r in report["results"]
            if r["action"] == "delete"}


def test_retention_deletes_an_expired_tenant_whose_lock_predates_the_cancel(
        test_fleet: PgFleet, locks: LockFleet, slug: str) -> None:
    """The tenant locks a table, then its cancel dies before ending sessions (the
    lock survives into the hold): the deletion ends the session and goes on."""
    locked, other = f"{slug}_l", f"{slug}_o"
    dsn = _make(locks, locked)
    _make(locks, other)
    hold_until = _cancelled(test_fleet, locks, other)
    with holding_lock(dsn) as holder:
        crashed = cli(test_fleet, locks, "tenant", "cancel", locked, "--yes",
                      env={"TENANTCTL_FAULT": "cancel.state"})
        assert crashed.returncode == -9
        assert not holder.was_ended()  # the lock is held into the hold
        code, report = _retention(test_fleet, locks, hold_until + timedelta(days=2))
        assert code == 0, report
        assert _outcomes(report)[locked][0] == "done"
        assert _outcomes(report)[other][0] == "done"
        assert holder.was_ended()
    assert _show(test_fleet, locks, locked)["state"] == "deleted"
    assert _show(test_fleet, locks, other)["state"] == "deleted"


def test_retention_final_backup_failure_is_that_tenants_step(
        test_fleet: PgFleet, locks: LockFleet, slug: str) -> None:
    """A lock the deletion does not end (tenantctl's own role holds it): that tenant's
    step fails within the bound, naming the holder; the other deletion happens,
    the run exits 11; the next run, lock gone, deletes it."""
    locked, other = f"{slug}_l", f"{slug}_o"
    _make(locks, locked)
    _make(locks, other)
    _cancelled(test_fleet, locks, locked)
    hold_until = _cancelled(test_fleet, locks, other)
    at = hold_until + timedelta(days=2)
    with holding_lock(_admin_dsn(locks, locked)) as holder:
        code, report = _retention(test_fleet, locks, at)
        assert code == retention.RetentionError.exit_code
        outcome, message = _outcomes(report)[locked]
        assert outcome == "failed" and f"pid {holder.pid}" in message
        assert _outcomes(report)[other][0] == "done"
    assert _show(test_fleet, locks, locked)["state"] == "cancelled"
    code, report = _retention(test_fleet, locks, at)
    assert code == 0 and _outcomes(report)[locked][0] == "done"


def test_an_unexpected_error_in_one_step_is_that_steps_failure(
        locks: LockFleet, slug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in one tenant's step (here: an exception that is not one of ours) fails
    that step, not the run: retention and backup --all go on with the others."""
    broken, other = f"{slug}_b", f"{slug}_o"
    for s in (broken, other):
        _make(locks, s)
    real = pipeline.run_backup

    def run_backup(fleet: Fleet, s: str, **kw: Any) -> pipeline.BackupResult:
        if s == broken:
            raise RuntimeError("a bug")
        return real(fleet, s, **kw)

    monkeypatch.setattr(pipeline, "run_backup", run_backup)
    results = {r.tenant: r for r in pipeline.run_many(locks.fleet, [broken, other], 2)}
    assert results[broken].status == "failed" and "a bug" in (results[broken].error or "")
    assert results[other].status == "completed"

    hold_until = None
    for s in (broken, other):
        hold_until = lifecycle.cancel(locks.fleet, s, backup=False).hold_until
    assert hold_until is not None
    report = retention.run(locks.fleet, hold_until + timedelta(days=2), dry_run=False,
                           jobs=("delete",))
    outcomes = {r.action.tenant: r for r in report.results}
    assert outcomes[broken].outcome == "failed"
    assert "RuntimeError" in outcomes[broken].message
    assert outcomes[other].outcome == "done"
    assert locks.fleet.get_tenant(other).state == "deleted"
    assert locks.fleet.get_tenant(broken).state == "cancelled"


def test_scheduler_backups_job_ends_and_the_next_run_backs_up_the_others(
        locks: LockFleet, slug: str) -> None:
    """The scheduler's backup job with a locked tenant: each run ends (partial), and
    the next run still backs up the other tenants due."""
    locked, first, later = f"{slug}_l", f"{slug}_a", f"{slug}_b"
    dsn = _make(locks, locked)
    _make(locks, first)
    log_lines: list[str] = []

    class Sink:
        def write(self, s: str) -> None:
            log_lines.append(s)

        def flush(self) -> None:
            pass

    daemon = scheduler.SchedulerDaemon(
        locks.fleet, scheduler.SchedulerOptions(intervals={"backups": 3600.0}),
        jsonlog.JsonLog(stream=Sink()))  # type: ignore[arg-type]
    with holding_lock(dsn):
        run1 = daemon.run_job("backups", threading.Event())
        assert run1.outcome == "partial", run1
        assert run1.counts["failed"] == 1 and run1.counts["completed"] == 1
        assert run1.error and run1.error.startswith(f"{locked}: ") and "pid " in run1.error
        _make(locks, later)  # due at the next run
        run2 = daemon.run_job("backups", threading.Event())
        assert run2.outcome == "partial", run2
        assert run2.counts["completed"] == 1 and run2.counts["failed"] == 1
    assert [b.status for b in _backups(locks, first)] == ["completed"]
    assert [b.status for b in _backups(locks, later)] == ["completed"]
    assert [b.status for b in _backups(locks, locked)] == ["failed", "failed"]
    assert any('"backup_failed"' in line and locked in line for line in log_lines)


def test_export_of_a_locked_tenant_is_a_one_line_error_naming_the_holder(
        test_fleet: PgFleet, locks: LockFleet, slug: str, tmp_path: Path) -> None:
    dsn = _make(locks, slug)
    for fmt in ("csv", "sql"):
        out = tmp_path / f"export.{fmt}"
        with holding_lock(dsn) as holder:
            proc = cli(test_fleet, locks, "tenant", "export", slug, "--format", fmt,
                       "--output", str(out))
            assert proc.returncode == 10, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and ("lock timeout" in lines[0] or
                                        "could not obtain lock" in lines[0]), proc.stderr
            assert f"pid {holder.pid}" in lines[0]
        assert not out.exists()
