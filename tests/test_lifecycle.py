"""The privacy-policy promises, on a real fleet with an injected clock: 30 days to
export after cancellation, then deleted; backups purged within 90 days of
deletion; never a day early; a legal hold stops both; a crash anywhere is
finished by the next run; two runs at once act once."""

from __future__ import annotations

import json
import subprocess
import uuid
import zipfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select

from backups import service as pipeline
from backups.stores import open_store
from orchestrator.adapters.catalog.models import AuditEvent, Backup, TenantKey
from tests.conftest import TENANTCTL, OwnCatalog, PgFleet, connect_as, run_cli, server_objects

ACT = {"TENANTCTL_ALLOW_CLOCK_OVERRIDE": "1"}


def cli(test_fleet: PgFleet, own: OwnCatalog, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return run_cli(test_fleet, *args, config=own.config_path, env=env)


def cli_json(test_fleet: PgFleet, own: OwnCatalog, *args: str,
             env: dict[str, str] | None = None) -> Any:
    proc = cli(test_fleet, own, *args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def retention(test_fleet: PgFleet, own: OwnCatalog, at: datetime, *extra: str) -> Any:
    return cli_json(test_fleet, own, "retention", "run", "--now", at.isoformat(), *extra,
                    env=ACT)


def show(test_fleet: PgFleet, own: OwnCatalog, slug: str) -> Any:
    return cli_json(test_fleet, own, "tenant", "show", slug)


def mine(report: Any, slug: str) -> list[str]:
    return [a["action"] for a in report["plan"] if a["tenant"] == slug]


def _make(own: OwnCatalog, slug: str) -> str:
    own.fleet.provision(slug, "ap-south")
    dsn = own.fleet.credentials(slug)
    with connect_as(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) VALUES ('ana@example.com', 'Ana "
                     "Émilie, \"quoted\"')")
    return dsn


def _objects(own: OwnCatalog, slug: str) -> list[str]:
    store = open_store(own.fleet.cfg.region("ap-south").backup_store)
    return [o.key for o in store.objects(f"tenants/{slug}/")]


def test_whole_timeline(test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str,
                        tmp_path: Path) -> None:
    own = own_catalog
    dsn = _make(own, slug)

    cancelled = cli_json(test_fleet, own, "tenant", "cancel", slug, "--yes")
    assert cancelled["state"] == "cancelled" and cancelled["backup_id"]
    with connect_as(dsn, autocommit=True) as conn:  # reads work, writes fail
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO customers (email, name) VALUES ('b@x.io', 'B')")
    out = tmp_path / "export.zip"
    exported = cli_json(test_fleet, own, "tenant", "export", slug, "--format", "csv",
                        "--output", str(out))
    with zipfile.ZipFile(out) as zf:
        text = zf.read("customers.csv").decode("utf-8")
        assert "email" in text.splitlines()[0] and "Ana Émilie" in text
        assert "alembic_version.csv" not in zf.namelist()
    assert exported["tables"] >= 10
    sql_out = tmp_path / "export.sql"
    cli_json(test_fleet, own, "tenant", "export", slug, "--format", "sql", "--output",
             str(sql_out))
    assert "CREATE TABLE public.customers" in sql_out.read_text()

    t0 = datetime.fromisoformat(show(test_fleet, own, slug)["cancelled_at"])
    assert mine(retention(test_fleet, own, t0 + timedelta(days=29)), slug) == []
    assert show(test_fleet, own, slug)["state"] == "cancelled"

    assert cli_json(test_fleet, own, "tenant", "reactivate", slug)["state"] == "active"
    with connect_as(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) VALUES ('c@x.io', 'C')")
    cli_json(test_fleet, own, "tenant", "cancel", slug, "--yes")
    t1 = datetime.fromisoformat(show(test_fleet, own, slug)["cancelled_at"])
    assert show(test_fleet, own, slug)["hold_until"] == (t1 + timedelta(days=30)).isoformat()

    # day 31, under legal hold: blocked, shown with its reason
    cli_json(test_fleet, own, "tenant", "legal-hold", slug, "--on", "--reason", "case 42")
    blocked = retention(test_fleet, own, t1 + timedelta(days=31))
    assert [(a["action"], "case 42" in a["detail"]) for a in blocked["plan"]
            if a["tenant"] == slug] == [("blocked", True)]
    assert f"tenant_{slug}" in server_objects(test_fleet, "ap-south-1")[0]
    cli_json(test_fleet, own, "tenant", "legal-hold", slug, "--off", "--reason", "closed")

    # day 31: database and role gone, a verified final backup exists
    day31 = t1 + timedelta(days=31)
    done = retention(test_fleet, own, day31)
    assert mine(done, slug) == ["delete"] and done["failed"] == 0
    dbs, roles = server_objects(test_fleet, "ap-south-1")
    assert f"tenant_{slug}" not in dbs and f"tenant_{slug}" not in roles \
        and f"owner_{slug}" not in roles
    shown = show(test_fleet, own, slug)
    assert shown["state"] == "deleted"
    assert shown["purge_after"] == (day31 + timedelta(days=90)).isoformat()
    final = pipeline.get_backup(own.fleet, own.fleet.get_tenant(slug).final_backup_id or 0)
    assert final.status == "completed" and final.verified_at is not None
    with pytest.raises(psycopg.OperationalError):
        connect_as(dsn).close()
    objects = _objects(own, slug)
    assert len(objects) >= 6  # three backups (two cancels, final), each with its manifest

    # day 89 after deletion: every backup still there
    assert mine(retention(test_fleet, own, day31 + timedelta(days=89)), slug) == []
    assert _objects(own, slug) == objects
    # legal hold blocks the purge as well
    cli_json(test_fleet, own, "tenant", "legal-hold", slug, "--on", "--reason", "audit")
    assert mine(retention(test_fleet, own, day31 + timedelta(days=91)), slug) == ["blocked"]
    assert _objects(own, slug) == objects
    cli_json(test_fleet, own, "tenant", "legal-hold", slug, "--off", "--reason", "done")

    # day 91: every object gone, key destroyed, tombstone only
    assert mine(retention(test_fleet, own, day31 + timedelta(days=91)), slug) == ["purge"]
    assert _objects(own, slug) == []
    shown = show(test_fleet, own, slug)
    assert shown["state"] == "purged"
    with own.fleet.catalog.session() as s:
        key = s.get(TenantKey, own.fleet.get_tenant(slug).id)
    assert key is not None and key.identity_wrapped is None and key.destroyed_at is not None
    assert own.fleet.get_tenant(slug).credential is None
    restore = cli(test_fleet, own, "backup", "restore", str(final.id), "--as", f"{slug}_r")
    assert restore.returncode != 0 and "not restorable" in restore.stderr
    assert "Traceback" not in restore.stderr and len(restore.stderr.strip().splitlines()) == 1
    verify = cli(test_fleet, own, "backup", "verify", str(cancelled["backup_id"]))
    assert verify.returncode != 0 and "not restorable" in verify.stderr
    # each step is in the audit log, with who did it
    actions = [e["action"] for e in cli_json(test_fleet, own, "audit", "list", "--tenant",
                                              slug)]
    for expected in ("tenant.cancel", "tenant.reactivate", "tenant.legal_hold.on",
                     "tenant.export", "tenant.delete", "tenant.purge"):
        assert expected in actions


def test_reactivate_after_hold_and_bad_transitions(test_fleet: PgFleet,
                                                   own_catalog: OwnCatalog, slug: str) -> None:
    from sqlalchemy import update

    from orchestrator.adapters.catalog.models import Tenant

    own = own_catalog
    _make(own, slug)
    again = cli(test_fleet, own, "tenant", "reactivate", slug)
    assert again.returncode == 4 and "is active" in again.stderr
    assert cli(test_fleet, own, "tenant", "cancel", slug).returncode == 2  # no tty, no --yes
    assert show(test_fleet, own, slug)["state"] == "active"
    cli_json(test_fleet, own, "tenant", "cancel", slug, "--yes")
    with own.fleet.catalog.session() as s, s.begin():  # the hold is over
        s.execute(update(Tenant).where(Tenant.slug == slug)
                  .values(hold_until=func.now() - timedelta(minutes=1)))
    late = cli(test_fleet, own, "tenant", "reactivate", slug)
    assert late.returncode == 4 and "can no longer be reactivated" in late.stderr
    assert show(test_fleet, own, slug)["state"] == "cancelled"
    refused = [e for e in cli_json(test_fleet, own, "audit", "list", "--tenant", slug)
               if e["action"] == "tenant.reactivate"]
    assert [e["outcome"] for e in refused] == ["refused", "refused"]
    assert "no longer be reactivated" in refused[0]["detail"]["error"]
    status = cli(test_fleet, own, "retention", "status", "--json",
                 "--now", (datetime.now().astimezone() + timedelta(hours=2)).isoformat())
    assert status.returncode == 11  # overdue: monitoring alerts
    assert json.loads(status.stdout)["overdue"]["deletions"][0]["tenant"] == slug


def test_suspend_blocks_connections_and_resume(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                               slug: str) -> None:
    own = own_catalog
    dsn = _make(own, slug)
    session = connect_as(dsn, autocommit=True)
    try:
        assert cli_json(test_fleet, own, "tenant", "suspend", slug)["state"] == "suspended"
        with pytest.raises(psycopg.OperationalError):  # the open session was ended
            session.execute("SELECT 1")
    finally:
        session.close()
    with pytest.raises(psycopg.OperationalError):
        connect_as(dsn).close()
    assert show(test_fleet, own, slug)["state"] == "suspended"
    assert cli_json(test_fleet, own, "tenant", "resume", slug)["state"] == "active"
    with connect_as(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) VALUES ('d@x.io', 'D')")


def test_future_now_only_plans(test_fleet: PgFleet, own_catalog: OwnCatalog) -> None:
    future = (datetime.now().astimezone() + timedelta(days=40)).isoformat()
    refused = cli(test_fleet, own_catalog, "retention", "run", "--now", future)
    assert refused.returncode == 2 and "in the future" in refused.stderr
    assert "Traceback" not in refused.stderr
    planned = cli(test_fleet, own_catalog, "retention", "run", "--now", future, "--dry-run",
                  "--json")
    assert planned.returncode == 0, planned.stderr
    bad = cli(test_fleet, own_catalog, "retention", "run", "--now", "next tuesday")
    assert bad.returncode == 2 and "ISO-8601" in bad.stderr


DELETE_STEPS = ["retention.final_backup", "retention.dropped_database",
                "retention.dropped_roles"]
PURGE_STEPS = ["retention.backups_deleted", "retention.key_destroyed"]


@pytest.mark.parametrize("step", DELETE_STEPS + PURGE_STEPS)
def test_crash_between_steps_converges(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                       slug: str, step: str) -> None:
    own = own_catalog
    _make(own, slug)
    cli_json(test_fleet, own, "tenant", "cancel", slug, "--yes")
    hold_until = datetime.fromisoformat(show(test_fleet, own, slug)["hold_until"])
    day31 = hold_until + timedelta(days=1)
    at = day31
    if step in PURGE_STEPS:
        retention(test_fleet, own, day31, "--only", "delete")
        at = day31 + timedelta(days=91)
    crashed = cli(test_fleet, own, "retention", "run", "--now", at.isoformat(),
                  env={**ACT, "TENANTCTL_FAULT": step})
    assert crashed.returncode == -9
    finished = retention(test_fleet, own, at)
    assert finished["failed"] == 0
    if step in DELETE_STEPS:
        assert show(test_fleet, own, slug)["state"] == "deleted"
        dbs, roles = server_objects(test_fleet, "ap-south-1")
        assert f"tenant_{slug}" not in dbs and f"owner_{slug}" not in roles
        final = own.fleet.get_tenant(slug).final_backup_id
        assert final is not None and pipeline.get_backup(own.fleet, final).verified_at
        # one final backup, even though the first run died after taking it
        with own.fleet.catalog.session() as s:
            finals = s.scalar(select(func.count()).select_from(Backup).where(
                Backup.slug == slug, Backup.kind == "final"))
        assert finals == 1
    else:
        assert show(test_fleet, own, slug)["state"] == "purged"
        assert _objects(own, slug) == []
        with own.fleet.catalog.session() as s:
            key = s.get(TenantKey, own.fleet.get_tenant(slug).id)
        assert key is not None and key.identity_wrapped is None


def test_two_concurrent_runs_act_once(test_fleet: PgFleet, own_catalog: OwnCatalog) -> None:
    own = own_catalog
    slugs = [f"cc{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for s in slugs:
        _make(own, s)
        cli_json(test_fleet, own, "tenant", "cancel", s, "--yes")
    at = datetime.fromisoformat(show(test_fleet, own, slugs[0])["hold_until"]) \
        + timedelta(days=1)
    argv = [*TENANTCTL, "--config", str(own.config_path), "retention", "run", "--now",
            at.isoformat(), "--json"]
    import os

    env = {**os.environ, **ACT}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    with own.fleet.catalog.session() as s:
        for slug in slugs:
            n = s.scalar(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.tenant == slug, AuditEvent.action == "tenant.delete"))
            assert n == 1
            assert own.fleet.get_tenant(slug).state == "deleted"


def test_audit_records_actor(test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    # what the audit log redacts: test_lifecycle_fast.py (no Postgres needed)
    own = own_catalog
    _make(own, slug)
    proc = cli(test_fleet, own, "--actor", "ops-jane", "tenant", "suspend", slug)
    assert proc.returncode == 0, proc.stderr
    events = cli_json(test_fleet, own, "audit", "list", "--tenant", slug, "--since", "1h")
    assert events[0]["action"] == "tenant.suspend" and events[0]["actor"] == "ops-jane"
    rows = cli_json(test_fleet, own, "audit", "list", "--since", "1d")
    assert any(r["action"] == "tenant.provision.start" and r["tenant"] == slug for r in rows)


def test_prune_reads_what_the_policy_needs(own_catalog: OwnCatalog) -> None:
    """Both prune commands judge the backups prune_facts reads (a narrowed query;
    narrower still for the planner, which reads only tenants that may have a
    prune); backups.policy.retention is the rule. Random fleets of backups, some
    on a week's edge to the microsecond: judging what the query read must choose
    the same backups as judging every backup."""
    import random
    from datetime import UTC

    from backups.policy import BackupFact, RetentionPolicy, retention

    rng = random.Random(7)
    fleet = own_catalog.fleet
    now = datetime.now(UTC)
    states = ["active", "active", "suspended", "cancelled"]
    with psycopg.connect(fleet.cfg.catalog_dsn, autocommit=True) as conn:
        server = conn.execute("SELECT name FROM servers WHERE region = 'ap-south'").fetchone()
        assert server is not None
        for i in range(40):
            state, hold = rng.choice(states), rng.random() < 0.1
            row = conn.execute(
                "INSERT INTO tenants (slug, region, server, database, login_role, owner_role,"
                " state, legal_hold) VALUES (%s, 'ap-south', %s, 'x', 'x', 'x', %s, %s) "
                "RETURNING id", (f"syn{i}", server[0], state, hold)).fetchone()
            assert row is not None
            for _ in range(rng.randrange(0, 16)):
                age = timedelta(hours=rng.uniform(0, 60 * 24))
                if rng.random() < 0.3:  # on a week's edge, where SQL and Python could part
                    age = timedelta(weeks=rng.randrange(1, 9),
                                    microseconds=rng.choice([-1, 0, 1]))
                conn.execute(
                    "INSERT INTO backups (tenant_id, slug, region, store_url, object_key, "
                    "manifest_key, status, started_at, finished_at) VALUES "
                    "(%s, %s, 'ap-south', 'file:///x', 'o', 'm', %s, %s, %s)",
                    (row[0], f"syn{i}", rng.choice(["completed"] * 5 + ["failed"]),
                     now - age, now - age))
        # two old backups in one week, the newer on the week's edge (exactly on it, a
        # microsecond inside it): only the microsecond decides that the older is pruned
        edges = {"synedge": (timedelta(weeks=2), timedelta(weeks=2, days=1)),
                 "synedge2": (timedelta(weeks=2, microseconds=-1),
                              timedelta(weeks=1, days=1))}
        for edge, ages in edges.items():
            row = conn.execute(
                "INSERT INTO tenants (slug, region, server, database, login_role, owner_role,"
                " state) VALUES (%s, 'ap-south', %s, 'x', 'x', 'x', 'active') "
                "RETURNING id", (edge, server[0])).fetchone()
            assert row is not None
            for age in (timedelta(hours=1), *ages):
                conn.execute(
                    "INSERT INTO backups (tenant_id, slug, region, store_url, object_key, "
                    "manifest_key, status, started_at, finished_at) VALUES "
                    "(%s, %s, 'ap-south', 'file:///x', 'o', 'm', 'completed', %s, %s)",
                    (row[0], edge, now - age, now - age))
        facts = [BackupFact(*r) for r in conn.execute(
            "SELECT b.id, b.slug, b.finished_at FROM backups b JOIN tenants t "
            "ON t.id = b.tenant_id WHERE b.status = 'completed' AND NOT t.legal_hold "
            "AND t.state IN ('active', 'suspended')")]
    for policy in (RetentionPolicy(7, 4), RetentionPolicy(3, 2), RetentionPolicy(1, 0)):
        expected = {v.backup_id for v in retention(facts, now, policy) if not v.keep}
        got = {v.backup_id for v in pipeline.prune_verdicts(fleet, now, policy)
               if not v.keep}
        assert got == expected and expected
        # the planner's read skips tenants with nothing to prune: never one with a prune
        planned = pipeline.prune_verdicts(fleet, now, policy, report_kept=False)
        assert {v.backup_id for v in planned} == expected
        assert all(not v.keep for v in planned)


def test_erase_on_request(test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    _make(own, slug)
    backup_id = pipeline.run_backup(own.fleet, slug).id
    assert _objects(own, slug)
    cli_json(test_fleet, own, "tenant", "legal-hold", slug, "--on", "--reason", "subpoena")
    refused = cli(test_fleet, own, "tenant", "erase", slug, "--reason", "GDPR art. 17", "--yes")
    assert refused.returncode == 4 and "legal hold" in refused.stderr
    assert f"tenant_{slug}" in server_objects(test_fleet, "ap-south-1")[0]
    cli_json(test_fleet, own, "tenant", "legal-hold", slug, "--off", "--reason", "lifted")
    assert cli(test_fleet, own, "tenant", "erase", slug, "--yes").returncode == 2  # no reason
    crashed = cli(test_fleet, own, "tenant", "erase", slug, "--reason", "GDPR art. 17",
                  "--yes", env={"TENANTCTL_FAULT": "erase.key_destroyed"})
    assert crashed.returncode == -9
    # from the moment the key is gone, no backup can be read, even before the rest
    unreadable = cli(test_fleet, own, "backup", "verify", str(backup_id))
    assert unreadable.returncode == 7 and "was destroyed" in unreadable.stderr
    done = cli_json(test_fleet, own, "tenant", "erase", slug, "--reason", "GDPR art. 17",
                    "--yes")
    assert done["state"] == "purged"
    assert _objects(own, slug) == []
    dbs, roles = server_objects(test_fleet, "ap-south-1")
    assert f"tenant_{slug}" not in dbs and f"owner_{slug}" not in roles
    restore = cli(test_fleet, own, "backup", "restore", str(backup_id), "--as", f"{slug}_r")
    assert restore.returncode != 0 and "Traceback" not in restore.stderr
    events = cli_json(test_fleet, own, "audit", "list", "--tenant", slug, "--action",
                      "tenant.erase")
    assert any(e["detail"].get("reason") == "GDPR art. 17" for e in events)


def test_retention_prunes_and_purges_old_audit(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                               slug: str) -> None:
    from datetime import UTC

    from sqlalchemy import update

    own = own_catalog
    _make(own, slug)
    ids = [pipeline.run_backup(own.fleet, slug).id for _ in range(3)]
    now = datetime.now(UTC)
    with own.fleet.catalog.session() as s, s.begin():
        s.execute(update(Backup).where(Backup.id == ids[0])
                  .values(finished_at=now - timedelta(days=60)))
        s.add(AuditEvent(actor="old", action="tenant.old", tenant=slug,
                         at=now - timedelta(days=400), recorded_at=now - timedelta(days=400)))
        # about 400 days ago but written today (a run at a past --now): kept, so no
        # --now can date evidence into the purge window
        s.add(AuditEvent(actor="backdated", action="tenant.delete", tenant=slug,
                         at=now - timedelta(days=400)))
    report = cli_json(test_fleet, own, "retention", "run", "--only", "prune", "--only",
                      "audit")
    assert [(r["action"], r["outcome"]) for r in report["results"]] == [
        ("prune", "done"), ("audit_purge", "done")]
    assert [pipeline.get_backup(own.fleet, i).status for i in ids] == [
        "deleted", "completed", "completed"]
    with own.fleet.catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent)
                        .where(AuditEvent.actor == "old")) == 0
        assert s.scalar(select(func.count()).select_from(AuditEvent)
                        .where(AuditEvent.actor == "backdated")) == 1
    assert len(_objects(own, slug)) == 4  # two backups left, each with its manifest


@pytest.mark.parametrize("args, code, message", [
    (["tenant", "cancel", "nosuchtenant", "--yes"], 3, "nosuchtenant"),
    (["tenant", "legal-hold", "{slug}", "--reason", "x"], 2, "--on or --off"),
    (["tenant", "legal-hold", "{slug}", "--on"], 2, "--reason is required"),
    (["tenant", "export", "{slug}", "--format", "xml", "--output", "{tmp}/x"], 2,
     "is not one of 'sql', 'csv'"),
    (["tenant", "export", "{slug}", "--format", "sql", "--output", "{tmp}/no/x.sql"], 2,
     "does not exist"),
    (["retention", "run", "--only", "everything"], 2, "'everything' is not one of 'delete'"),
    (["audit", "list", "--since", "last week"], 2, "ISO-8601"),
    (["tenant", "erase", "{slug}", "--reason", "r"], 2, "--yes"),
])
def test_lifecycle_bad_input_changes_nothing(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                             slug: str, tmp_path: Path, args: list[str],
                                             code: int, message: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, "ap-south")
    argv = [a.format(slug=slug, tmp=tmp_path) for a in args]
    proc = cli(test_fleet, own, *argv)
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    shown = show(test_fleet, own, slug)
    assert shown["state"] == "active" and not shown["legal_hold"]
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "own.toml"])


def test_now_reaches_every_time_retention_writes(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                                 slug: str) -> None:
    """`retention run --now T` writes T, never the real time: the final backup
    (started, finished, verified, its object's name and manifest), deleted_at,
    purge_after = T + purge_days, the support grant that goes with the tenant;
    then a purge at T2 writes purged_at and the key's destroyed_at = T2; the audit
    records of each run are at its T."""
    from datetime import UTC

    from sqlalchemy import update

    from orchestrator.adapters.catalog.models import SupportGrant, Tenant
    from orchestrator.services import access, lifecycle

    own = own_catalog
    _make(own, slug)
    lifecycle.cancel(own.fleet, slug, backup=False)
    grant = access.grant(own.fleet, slug, to="Sam Support", ttl=timedelta(days=400),
                         reason="ticket 7")
    # T well in the past (acting at it needs no override), just after the hold ended
    real = datetime.now(UTC)
    t = real.replace(microsecond=123456) - timedelta(days=200)
    with own.fleet.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.slug == slug)
                  .values(hold_until=t - timedelta(hours=1)))

    done = cli_json(test_fleet, own, "retention", "run", "--now", t.isoformat(),
                    "--only", "delete")
    assert [(r["action"], r["outcome"]) for r in done["results"]] == [("delete", "done")]
    tenant = own.fleet.get_tenant(slug)
    assert tenant.state == "deleted" and tenant.deleted_at == t
    assert tenant.purge_after == t + timedelta(days=own.fleet.cfg.lifecycle.purge_days)
    final = pipeline.get_backup(own.fleet, tenant.final_backup_id or 0)
    assert final.kind == "final" and final.status == "completed"
    assert (final.started_at, final.finished_at, final.verified_at) == (t, t, t)
    assert t.strftime("%Y%m%dT%H%M%SZ") in final.object_key
    manifest = json.loads(open_store(final.store_url).get_bytes(final.manifest_key))
    assert (manifest["started_at"], manifest["finished_at"]) == (t.isoformat(),) * 2
    with own.fleet.catalog.session() as s:
        dropped = s.get(SupportGrant, grant["id"])
        assert dropped is not None and dropped.dropped_at == t
        deleted_at = s.scalar(select(AuditEvent.at).where(
            AuditEvent.tenant == slug, AuditEvent.action == "tenant.delete"))
    assert deleted_at == t

    t2 = tenant.purge_after + timedelta(days=1)  # still in the past
    purged = cli_json(test_fleet, own, "retention", "run", "--now", t2.isoformat(),
                      "--only", "purge")
    assert [(r["action"], r["outcome"]) for r in purged["results"]] == [("purge", "done")]
    tenant = own.fleet.get_tenant(slug)
    assert tenant.state == "purged" and tenant.purged_at == t2
    assert (tenant.deleted_at, tenant.purge_after) == (t, t2 - timedelta(days=1))
    with own.fleet.catalog.session() as s:
        key = s.get(TenantKey, tenant.id)
    assert key is not None and key.identity_wrapped is None and key.destroyed_at == t2
    with own.fleet.catalog.session() as s:
        purged_at = s.scalar(select(AuditEvent.at).where(
            AuditEvent.tenant == slug, AuditEvent.action == "tenant.purge"))
    assert purged_at == t2


def test_a_far_future_now_dates_every_audit_record_of_the_run(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    """`retention run --now <far future>` (acting, with the override): every audit
    record the run writes is at that time, none at the real time: the support
    grant's expiry, the final backup's run and verification, the deletion, a prune
    (the backup pipeline's own records)."""
    from datetime import UTC

    from orchestrator.services import access, lifecycle

    own = own_catalog
    far = datetime(2999, 1, 1, 12, 0, tzinfo=UTC)
    _make(own, slug)
    lifecycle.cancel(own.fleet, slug, backup=False)
    access.grant(own.fleet, slug, to="Sam Support", ttl=timedelta(days=1), reason="ticket 8")
    kept = f"{slug}k"
    own.fleet.provision(kept, "ap-south")
    pipeline.run_backup(own.fleet, kept)
    pipeline.run_backup(own.fleet, kept)
    with own.fleet.catalog.session() as s:
        before = s.scalar(select(func.max(AuditEvent.id))) or 0

    done = retention(test_fleet, own, far, "--only", "access", "--only", "delete",
                     "--only", "prune")
    assert {(r["action"], r["outcome"]) for r in done["results"]} == {
        ("expire_grant", "done"), ("delete", "done"), ("prune", "done")}, done
    with own.fleet.catalog.session() as s:
        written = s.execute(select(AuditEvent.action, AuditEvent.tenant, AuditEvent.at)
                            .where(AuditEvent.id > before)).all()
    assert {(a, t) for a, t, _ in written} >= {
        ("access.expire", slug), ("backup.run", slug), ("backup.verify", slug),
        ("tenant.delete", slug), ("backup.prune", kept)}
    assert [(a, at) for a, _, at in written if at != far] == []
