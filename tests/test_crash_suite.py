"""The whole system under SIGKILL and under concurrency, on a fleet of its own.

For every named step of provision, restore (as a new tenant and in place),
backup, rollout, cancel, deletion, purge and erasure: the real CLI is killed there
(TENANTCTL_FAULT=<step>, a SIGKILL: no cleanup runs), the same command is run
again and must succeed, and `doctor` must then find nothing wrong anywhere —
no orphan database, role or object, no backup left running, no tenant behind.
Then two processes doing the same thing at the same moment: it happens once.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import func, select

from backups.service import run_backup
from orchestrator.adapters import clock
from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.catalog.models import AuditEvent, Backup
from orchestrator.api import Fleet
from orchestrator.services import doctor, lifecycle, retention
from tests.conftest import REPO, TENANTCTL, CleanFleet, problems
from tests.test_doctor import cli

OLD_REVISION = "0005_reorder_level"
CLOCK_ENV = {"TENANTCTL_ALLOW_CLOCK_OVERRIDE": "1"}


def new_slug() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


def admin_db(fleet: Fleet, slug: str) -> psycopg.Connection:
    t = fleet.get_tenant(slug)
    return psycopg.connect(with_dbname(fleet.cfg.server(t.server).admin_dsn, t.database),
                           autocommit=True)


@dataclass
class Scenario:
    args: list[str]
    check: Callable[[Fleet], None]
    env: dict[str, str] = field(default_factory=dict)
    ctx: dict[str, Any] = field(default_factory=dict)


def _active(slug: str) -> Callable[[Fleet], None]:
    def check(fleet: Fleet) -> None:
        t = fleet.get_tenant(slug)
        assert t.state == "active" and t.revision == fleet.head_revision
        with psycopg.connect(fleet.credentials(slug), connect_timeout=5) as conn:
            conn.execute("INSERT INTO customers (name, email) VALUES ('n', %s)",
                         (f"{uuid.uuid4().hex}@example.com",))
    return check


def provision(fleet: Fleet) -> Scenario:
    slug = new_slug()
    return Scenario(["tenant", "create", slug, "--region", "eu-central"], _active(slug),
                    ctx={"slug": slug})


def backup(fleet: Fleet) -> Scenario:
    slug = fleet.provision(new_slug(), "ap-south").tenant["slug"]

    def check(fleet: Fleet) -> None:
        with fleet.catalog.session() as s:
            rows = list(s.scalars(select(Backup).where(Backup.slug == slug)))
        assert [b.status for b in rows].count("completed") == 1
        assert {b.status for b in rows} <= {"completed", "failed"}
    return Scenario(["backup", "run", slug], check)


def restore_as(fleet: Fleet) -> Scenario:
    src = fleet.provision(new_slug(), "eu-central").tenant["slug"]
    with admin_db(fleet, src) as conn:
        conn.execute("INSERT INTO customers (name, email) VALUES ('kept', 'k@example.com')")
    backup_id = run_backup(fleet, src).id
    new = new_slug()

    def check(fleet: Fleet) -> None:
        _active(new)(fleet)
        with admin_db(fleet, new) as conn:
            assert conn.execute("SELECT count(*) FROM customers WHERE name = 'kept'"
                                ).fetchone() == (1,)
    return Scenario(["backup", "restore", str(backup_id), "--as", new], check)


def restore_in_place(fleet: Fleet) -> Scenario:
    slug = fleet.provision(new_slug(), "eu-central").tenant["slug"]
    with admin_db(fleet, slug) as conn:
        conn.execute("INSERT INTO customers (name, email) VALUES ('before', 'b@example.com')")
    backup_id = run_backup(fleet, slug).id
    with admin_db(fleet, slug) as conn:
        conn.execute("INSERT INTO customers (name, email) VALUES ('after', 'a@example.com')")

    def check(fleet: Fleet) -> None:
        _active(slug)(fleet)
        with admin_db(fleet, slug) as conn:
            names = {r[0] for r in conn.execute("SELECT name FROM customers")}
        assert "before" in names and "after" not in names
    return Scenario(["backup", "restore", str(backup_id), "--in-place", "--yes"], check)


def rollout(fleet: Fleet) -> Scenario:
    slugs = [fleet.provision(new_slug(), r).tenant["slug"] for r in ("eu-central", "ap-south")]
    for slug in slugs:
        # a single-tenant migration keeps the fleet's target where it is
        from orchestrator.services.rollout import RolloutOptions, RolloutRun

        RolloutRun(fleet, RolloutOptions(to=OLD_REVISION, tenants=[slug], concurrency=1,
                                         per_server=1, max_failures="100%")).run()
        assert fleet.get_tenant(slug).revision == OLD_REVISION

    def check(fleet: Fleet) -> None:
        for slug in slugs:
            assert fleet.get_tenant(slug).revision == fleet.head_revision
    return Scenario(["migrate", "rollout", "--to", "head"], check)


def cancel(fleet: Fleet) -> Scenario:
    slug = fleet.provision(new_slug(), "eu-central").tenant["slug"]

    def check(fleet: Fleet) -> None:
        t = fleet.get_tenant(slug)
        assert t.state == "cancelled" and t.hold_until is not None
        with fleet.catalog.session() as s:
            kinds = [b.kind for b in s.scalars(select(Backup).where(
                Backup.slug == slug, Backup.status == "completed"))]
        assert kinds == ["cancel"]
        with psycopg.connect(fleet.credentials(slug), connect_timeout=5) as conn:
            assert conn.execute("SELECT count(*) FROM customers").fetchone() is not None
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO customers (name, email) VALUES ('x', 'x@x.org')")
    return Scenario(["tenant", "cancel", slug, "--yes"], check, ctx={"slug": slug})


def erase(fleet: Fleet) -> Scenario:
    slug = fleet.provision(new_slug(), "eu-central").tenant["slug"]
    run_backup(fleet, slug)

    def check(fleet: Fleet) -> None:
        t = fleet.get_tenant(slug)
        assert t.state == "purged"
        with fleet.server_connection(t.server) as conn:
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (t.database,)).fetchone() is None
        with fleet.catalog.session() as s:
            assert s.scalar(select(func.count()).select_from(Backup).where(
                Backup.slug == slug, Backup.status != "deleted")) == 0
    return Scenario(["tenant", "erase", slug, "--reason", "crash suite", "--yes"], check,
                    ctx={"slug": slug})


def _cancelled(fleet: Fleet) -> str:
    slug = fleet.provision(new_slug(), "ap-south").tenant["slug"]
    lifecycle.cancel(fleet, slug, backup=False)
    return slug


def delete(fleet: Fleet) -> Scenario:
    slug = _cancelled(fleet)
    when = clock.utcnow() + timedelta(days=fleet.cfg.lifecycle.hold_days + 1)

    def check(fleet: Fleet) -> None:
        t = fleet.get_tenant(slug)
        assert t.state == "deleted" and t.final_backup_id is not None
        with fleet.server_connection(t.server) as conn:
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (t.database,)).fetchone() is None
    return Scenario(["retention", "run", "--only", "delete", "--now", when.isoformat()],
                    check, env=CLOCK_ENV)


def purge(fleet: Fleet) -> Scenario:
    slug = _cancelled(fleet)
    deleted_at = clock.utcnow() + timedelta(days=fleet.cfg.lifecycle.hold_days + 1)
    assert retention.delete_tenant(fleet, slug, deleted_at)[0] == "done"
    when = deleted_at + timedelta(days=fleet.cfg.lifecycle.purge_days + 1)

    def check(fleet: Fleet) -> None:
        assert fleet.get_tenant(slug).state == "purged"
        with fleet.catalog.session() as s:
            assert s.scalar(select(func.count()).select_from(Backup).where(
                Backup.slug == slug, Backup.status != "deleted")) == 0
    return Scenario(["retention", "run", "--only", "purge", "--now", when.isoformat()],
                    check, env=CLOCK_ENV)


def move(fleet: Fleet, method: str = "dump") -> Scenario:
    """A region move (the clean fleet has one cluster per region), with a backup in
    the old region that must be gone from its store afterwards."""
    slug = fleet.provision(new_slug(), "eu-central").tenant["slug"]
    with admin_db(fleet, slug) as conn:
        conn.execute("INSERT INTO customers (name, email) VALUES ('kept', 'k@example.com')")
    run_backup(fleet, slug)

    def check(fleet: Fleet) -> None:
        _active(slug)(fleet)
        t = fleet.get_tenant(slug)
        assert (t.region, t.server) == ("ap-south", "ap-south-1")
        with admin_db(fleet, slug) as conn:
            assert conn.execute("SELECT count(*) FROM customers WHERE name = 'kept'"
                                ).fetchone() == (1,)
        with fleet.catalog.session() as s:
            live = {b.region for b in s.scalars(select(Backup).where(
                Backup.slug == slug, Backup.status == "completed"))}
        assert live == {"ap-south"}
    return Scenario(["tenant", "move", slug, "--region", "ap-south", "--reason", "crash suite",
                     "--method", method, "--yes"], check, ctx={"slug": slug})


def move_logical(fleet: Fleet) -> Scenario:
    """The same move by logical replication (every local cluster can do it)."""
    return move(fleet, "logical")


CASES: list[tuple[Callable[[Fleet], Scenario], str]] = [
    *[(provision, f"provision.{s}") for s in
      ("registered", "roles", "database", "schema", "privileges", "login")],
    (restore_as, "provision.database"), (restore_as, "provision.login"),
    (restore_in_place, "restore.ready"), (restore_in_place, "restore.swapped"),
    *[(backup, s) for s in ("backup.chunk", "backup.dumped", "backup.uploaded",
                            "backup.manifest")],
    (rollout, "rollout.tenant_done:1"),
    *[(cancel, s) for s in ("cancel.restricted", "cancel.state", "backup.uploaded")],
    *[(delete, s) for s in ("backup.manifest", "retention.final_backup",
                            "retention.dropped_database", "retention.dropped_roles")],
    *[(purge, s) for s in ("retention.backups_deleted", "retention.key_destroyed")],
    *[(erase, s) for s in ("erase.key_destroyed", "erase.dropped")],
    *[(move, f"move.{s}") for s in ("planned", "target", "paused", "copy_chunk", "copied",
                                    "checked", "cutover", "source_database_dropped",
                                    "source_dropped", "backed_up", "old_backup_deleted")],
    *[(move_logical, f"move.{s}") for s in ("replicating", "synced", "checked", "cutover",
                                            "source_dropped")],
]
# what doctor says while a step is left half-done (and no process is on it)
FOUND_AFTER_KILL = {"cancel.restricted": "cancel-unfinished", "move.checked": "move-stalled",
                    "move.synced": "move-stalled",
                    "erase.key_destroyed": "erase-unfinished"}


@pytest.mark.slow
@pytest.mark.parametrize(("make", "step"), CASES,
                         ids=[f"{m.__name__}@{s}" for m, s in CASES])
def test_kill_then_rerun_converges_and_doctor_finds_nothing(
        clean_fleet: CleanFleet, healthy: Fleet, make: Callable[[Fleet], Scenario],
        step: str) -> None:
    scenario = make(healthy)
    killed = cli(clean_fleet, *scenario.args,
                 env={**scenario.env, "TENANTCTL_FAULT": step})
    assert killed.returncode == -9, (step, killed.returncode, killed.stderr[-500:])
    if make is provision:
        # while it stays half-done, doctor says so and how to finish it
        assert ("provisioning-unfinished", scenario.ctx["slug"]) in \
            problems(doctor.run(healthy))
    if step in FOUND_AFTER_KILL:
        assert problems(doctor.run(healthy)) == [(FOUND_AFTER_KILL[step],
                                                  scenario.ctx["slug"])]
    again = cli(clean_fleet, *scenario.args, env=scenario.env)
    assert again.returncode == 0, (step, again.stdout[-800:], again.stderr[-800:])
    scenario.check(healthy)
    # `healthy` then asserts doctor finds nothing anywhere


# -- two at once ----------------------------------------------------------------------


def both(clean: CleanFleet, *args: str) -> list[subprocess.CompletedProcess[str]]:
    cmd = [*TENANTCTL, "--config", str(clean.config_path), *args]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, stdin=subprocess.DEVNULL) for _ in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert "Traceback" not in stderr, stderr
        out.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    return out


def audits(fleet: Fleet, action: str, tenant: str, outcome: str = "ok") -> int:
    with fleet.catalog.session() as s:
        return s.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == action, AuditEvent.tenant == tenant,
            AuditEvent.outcome == outcome)) or 0


def test_two_cancels_at_once_cancel_once(clean_fleet: CleanFleet, healthy: Fleet) -> None:
    slug = healthy.provision(new_slug(), "eu-central").tenant["slug"]
    results = both(clean_fleet, "tenant", "cancel", slug, "--yes", "--json")
    assert sorted(r.returncode for r in results)[0] == 0
    assert all(r.returncode in (0, 4) for r in results), [r.stderr for r in results]
    assert audits(healthy, "tenant.cancel", slug) == 1
    with healthy.catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(Backup).where(
            Backup.slug == slug, Backup.status == "completed")) == 1


def test_two_restores_as_the_same_name_make_one_tenant(clean_fleet: CleanFleet,
                                                       healthy: Fleet) -> None:
    src = healthy.provision(new_slug(), "eu-central").tenant["slug"]
    backup_id = run_backup(healthy, src).id
    new = new_slug()
    results = both(clean_fleet, "backup", "restore", str(backup_id), "--as", new, "--json")
    assert sorted(r.returncode for r in results) in ([0, 0], [0, 4]), \
        [r.stderr for r in results]
    assert healthy.get_tenant(new).state == "active"
    assert audits(healthy, "backup.restore", new) == 1


def test_two_due_backup_runs_back_up_each_tenant_once(clean_fleet: CleanFleet,
                                                      healthy: Fleet) -> None:
    slug = healthy.provision(new_slug(), "ap-south").tenant["slug"]  # never backed up: due
    results = both(clean_fleet, "backup", "run", "--due", "--json")
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    mine = [x for r in results for x in json.loads(r.stdout) if x["tenant"] == slug]
    # The second run skips it (it found it due while the first held it) or never
    # lists it (the first had finished when it looked): either way, one backup.
    assert sorted(x["status"] for x in mine) in (["completed"], ["completed", "skipped"])
    with healthy.catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(Backup).where(
            Backup.slug == slug, Backup.status == "completed")) == 1


def test_two_doctor_fixes_at_once_repair_once(clean_fleet: CleanFleet,
                                              healthy: Fleet) -> None:
    orphan = f"tenant_{new_slug()}"
    with healthy.server_connection("ap-south-1") as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(orphan)))
    results = both(clean_fleet, "doctor", "--fix", "--yes", "--json")
    assert sorted(r.returncode for r in results) in ([0, 0], [0, 4]), \
        [r.stderr for r in results]
    fixed = [x for r in results if r.returncode == 0 for x in json.loads(r.stdout)["fixes"]
             if x["code"] == "orphan-database" and x["subject"].endswith(orphan)]
    assert [x["outcome"] for x in fixed] == ["fixed"]
    from pathlib import Path

    store = Path(healthy.cfg.region("ap-south").backup_store.removeprefix("file://"))
    assert len(list((store / "orphans" / "ap-south-1").glob(f"{orphan}-*.dump.age"))) == 1
