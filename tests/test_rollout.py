"""Fleet migrations against real Postgres: 30 tenants over two regions.

Every test first puts the module's tenants at a known revision (with a rollout
scoped to them), so tests do not depend on each other's order.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql
from sqlalchemy import func, select

from orchestrator.adapters.catalog.db import lock_key, lock_key_sql, with_dbname
from orchestrator.adapters.catalog.models import Rollout, RolloutTenant
from orchestrator.adapters.postgres import revision_marks
from orchestrator.api import Fleet
from orchestrator.domain.names import tenant_lock
from orchestrator.domain.rollout_plan import PlanTenant, interleave_by_server
from tests.conftest import TENANTCTL, PgFleet, connect_as, mark_and_version, run_cli

OLD = "0004_order_status_idx"
HEAD = "0006_customer_email_ci"
N_TENANTS = 30


@pytest.fixture(scope="module")
def tenants(test_fleet: PgFleet) -> Iterator[list[str]]:
    fleet = Fleet(test_fleet.config())
    slugs = []
    try:
        for i in range(N_TENANTS):
            slug = f"ro_{i:02d}"
            if fleet.find_tenant(slug) is None:
                fleet.provision(slug, "eu-central" if i % 2 else "ap-south")
            slugs.append(slug)
        yield slugs
    finally:
        fleet.close()


def _rollout(test_fleet: PgFleet, *args: str, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    return run_cli(test_fleet, "migrate", "rollout", *args, env=env)


def _reset(test_fleet: PgFleet, slugs: list[str], revision: str) -> None:
    proc = _rollout(test_fleet, "--tenants", ",".join(slugs), "--to", revision,
                    "--max-failures", "100%", "--concurrency", "8", "--yes")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(_live(test_fleet, slugs).values()) == {revision}


def _live(test_fleet: PgFleet, slugs: list[str]) -> dict[str, str | None]:
    """Each tenant's revision as its database says (not the catalog)."""
    fleet = Fleet(test_fleet.config())
    out = {}
    try:
        for slug in slugs:
            t = fleet.get_tenant(slug)
            dsn = with_dbname(fleet.cfg.server(t.server).admin_dsn, t.database)
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                out[slug] = row[0] if row else None
    finally:
        fleet.close()
    return out


def _plan_order(fleet: Fleet, slugs: list[str]) -> list[str]:
    rows = [fleet.get_tenant(s) for s in slugs]
    return [p.slug for p in interleave_by_server(
        [PlanTenant(t.id, t.slug, t.region, t.server, t.revision) for t in rows])]


def _poison(fleet: Fleet, slug: str, on: bool = True) -> None:
    """Two customers whose e-mails differ only in case: revision 0006 refuses them."""
    with connect_as(fleet.credentials(slug), autocommit=True) as conn:
        if on:
            conn.execute("INSERT INTO customers (email, name) VALUES "
                         "('Dup@Example.com', 'a'), ('dup@example.com', 'b')")
        else:
            conn.execute("DELETE FROM customers WHERE lower(email) = 'dup@example.com'")


def _json(proc: subprocess.CompletedProcess[str]) -> dict:  # type: ignore[type-arg]
    return json.loads(proc.stdout)


def test_downgrade_then_rollout_to_head(test_fleet: PgFleet, tenants: list[str]) -> None:
    _reset(test_fleet, tenants, HEAD)
    down = _rollout(test_fleet, "--tenants", ",".join(tenants), "--to", OLD, "--json",
                    "--yes")
    assert down.returncode == 0, down.stderr
    assert _json(down)["counts"] == {"ok": N_TENANTS}
    assert set(_live(test_fleet, tenants).values()) == {OLD}
    up = _rollout(test_fleet, "--tenants", ",".join(tenants), "--json")
    assert up.returncode == 0, up.stderr
    summary = _json(up)
    assert summary["status"] == "completed" and summary["counts"] == {"ok": N_TENANTS}
    assert {r["from_revision"] for r in summary["results"]} == {OLD}
    assert {r["to_revision"] for r in summary["results"]} == {HEAD}
    assert set(_live(test_fleet, tenants).values()) == {HEAD}
    # the same command again: everyone is at the target already
    again = _rollout(test_fleet, "--tenants", ",".join(tenants), "--json")
    assert again.returncode == 0 and _json(again)["counts"] == {"skipped": N_TENANTS}


def test_poisoned_tenant_fails_alone(fleet: Fleet, test_fleet: PgFleet,
                                     tenants: list[str]) -> None:
    _reset(test_fleet, tenants, OLD)
    poisoned = tenants[7]
    _poison(fleet, poisoned)
    try:
        proc = _rollout(test_fleet, "--tenants", ",".join(tenants), "--max-failures", "3",
                        "--json")
        assert proc.returncode == 1, proc.stderr
        summary = _json(proc)
        assert summary["status"] == "failed"
        assert summary["counts"] == {"ok": N_TENANTS - 1, "failed": 1}
        failed = [r for r in summary["results"] if r["status"] == "failed"]
        assert [r["slug"] for r in failed] == [poisoned]
        assert "ix_customers_email_lower" in failed[0]["error"]
        live = _live(test_fleet, tenants)
        assert live.pop(poisoned) == OLD  # left exactly where it was
        assert set(live.values()) == {HEAD}
        # its mark was rolled back with its migration
        assert mark_and_version(fleet, poisoned) == (OLD, OLD)
        status = run_cli(test_fleet, "migrate", "status", "--json")
        assert status.returncode == 0, status.stderr
        report = _json(status)
        assert poisoned in {f["slug"] for f in report["failed"]}
        assert poisoned in {b["slug"] for b in report["behind"]}
        assert {t["revision"] for t in report["templates"]} >= {HEAD}
    finally:
        _poison(fleet, poisoned, on=False)


def test_failure_budget_stops_the_rollout(fleet: Fleet, test_fleet: PgFleet,
                                          tenants: list[str]) -> None:
    _reset(test_fleet, tenants, OLD)
    first_two = _plan_order(fleet, tenants)[:2]
    for slug in first_two:
        _poison(fleet, slug)
    try:
        proc = _rollout(test_fleet, "--tenants", ",".join(tenants), "--max-failures", "1",
                        "--concurrency", "1", "--json")
        assert proc.returncode == 8, proc.stderr
        summary = _json(proc)
        assert summary["status"] == "stopped"
        assert "failure budget exceeded (2 failed, 1 allowed)" in summary["stopped_reason"]
        assert summary["counts"]["pending"] == N_TENANTS - 2  # no new tenant launched
        assert set(_live(test_fleet, tenants).values()) == {OLD}
    finally:
        for slug in first_two:
            _poison(fleet, slug, on=False)


def test_canary_failure_stops_before_the_first_wave(fleet: Fleet, test_fleet: PgFleet,
                                                    tenants: list[str]) -> None:
    _reset(test_fleet, tenants, OLD)
    canary = _plan_order(fleet, tenants)[0]
    _poison(fleet, canary)
    try:
        proc = _rollout(test_fleet, "--tenants", ",".join(tenants), "--canary", "1",
                        "--waves", "1,50%,100%", "--max-failures", "100%", "--json")
        assert proc.returncode == 8, proc.stderr
        summary = _json(proc)
        assert summary["stopped_reason"] == "canary failed"
        assert summary["waves"][0] == [canary]
        assert [r["slug"] for r in summary["results"]] == [canary]
        assert set(_live(test_fleet, tenants).values()) == {OLD}
    finally:
        _poison(fleet, canary, on=False)


def test_waves_run_in_order(fleet: Fleet, test_fleet: PgFleet, tenants: list[str]) -> None:
    _reset(test_fleet, tenants, OLD)
    proc = _rollout(test_fleet, "--tenants", ",".join(tenants), "--canary", "2",
                    "--waves", "1,10%,100%", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = _json(proc)
    assert [len(w) for w in summary["waves"]] == [2, 1, 2, 25]
    with fleet.catalog.session() as s:
        rows = s.execute(select(RolloutTenant.wave, func.min(RolloutTenant.started_at),
                                func.max(RolloutTenant.finished_at))
                         .where(RolloutTenant.rollout_id == summary["rollout_id"])
                         .group_by(RolloutTenant.wave).order_by(RolloutTenant.wave)).all()
    # every wave starts after the previous one has finished
    for (_, _, prev_end), (_, start, _) in zip(rows, rows[1:], strict=False):
        assert start >= prev_end


def test_kill_mid_rollout_then_rerun_finishes(fleet: Fleet, test_fleet: PgFleet,
                                              tenants: list[str]) -> None:
    _reset(test_fleet, tenants, OLD)
    args = ["--tenants", ",".join(tenants), "--concurrency", "2", "--json"]
    killed = _rollout(test_fleet, *args, env={"TENANTCTL_FAULT": "rollout.tenant_done:10"})
    assert killed.returncode == -9, killed.stderr
    midway = _live(test_fleet, tenants)
    assert OLD in midway.values() and HEAD in midway.values()
    again = _rollout(test_fleet, *args)
    assert again.returncode == 0, again.stderr
    summary = _json(again)
    assert set(_live(test_fleet, tenants).values()) == {HEAD}
    with fleet.catalog.session() as s:
        rollout = s.get(Rollout, summary["rollout_id"])
        assert rollout is not None and rollout.status == "completed"
        rows = s.scalars(select(RolloutTenant).where(
            RolloutTenant.rollout_id == rollout.id)).all()
    # one rollout, resumed: one row per tenant, each migrated from OLD exactly once
    assert len(rows) == N_TENANTS
    assert {r.status for r in rows} == {"ok"}
    assert {r.from_revision for r in rows} == {OLD}
    # the re-run took only what the first run had not finished; at most the two
    # in flight at the kill were found already migrated (their commit made it)
    first_run = {s for s, rev in midway.items() if rev == HEAD}
    second_run = {r["slug"] for r in summary["results"]}
    assert first_run | second_run == set(tenants)
    assert len(first_run & second_run) <= 2


def test_two_processes_divide_the_work(test_fleet: PgFleet, tenants: list[str]) -> None:
    _reset(test_fleet, tenants, OLD)
    cmd = [*TENANTCTL, "--config", str(test_fleet.config_path), "migrate", "rollout",
           "--tenants", ",".join(tenants), "--concurrency", "1", "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    done = [{r["slug"] for r in json.loads(out)["results"] if r["status"] == "ok"}
            for out, _ in outs]
    assert done[0].isdisjoint(done[1])  # no tenant migrated by both
    assert done[0] | done[1] == set(tenants)
    assert done[0] and done[1]  # both did a share
    assert json.loads(outs[0][0])["rollout_id"] == json.loads(outs[1][0])["rollout_id"]
    assert set(_live(test_fleet, tenants).values()) == {HEAD}


def test_dry_run_changes_nothing(fleet: Fleet, test_fleet: PgFleet,
                                 tenants: list[str]) -> None:
    _reset(test_fleet, tenants, OLD)
    with fleet.catalog.session() as s:
        rollouts_before = s.scalar(select(func.count()).select_from(Rollout))
    target_before = fleet.target_revision()
    proc = _rollout(test_fleet, "--dry-run", "--canary", "1", "--waves", "50%,100%")
    assert proc.returncode == 0, proc.stderr
    assert "canary: " in proc.stdout and "wave 1: " in proc.stdout
    assert "ALTER TABLE products ADD COLUMN reorder_level" in proc.stdout
    assert "CREATE UNIQUE INDEX ix_customers_email_lower" in proc.stdout
    with fleet.catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(Rollout)) == rollouts_before
    assert fleet.target_revision() == target_before
    assert set(_live(test_fleet, tenants).values()) == {OLD}


def test_tenant_created_mid_rollout_ends_at_target(fleet: Fleet, test_fleet: PgFleet,
                                                   tenants: list[str], slug: str) -> None:
    # the whole fleet to OLD, so new tenants are created at OLD ...
    down = _rollout(test_fleet, "--to", OLD, "--max-failures", "100%", "--yes")
    assert down.returncode == 0, down.stdout + down.stderr
    assert fleet.target_revision() == OLD
    # ... then to head, slowly, and a tenant is created while it runs
    proc = subprocess.Popen(
        [*TENANTCTL, "--config", str(test_fleet.config_path), "migrate", "rollout",
         "--concurrency", "1", "--per-server", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with fleet.catalog.session() as s:
            started = s.scalar(select(func.count()).select_from(RolloutTenant).join(Rollout)
                               .where(Rollout.target == HEAD, Rollout.status == "running",
                                      RolloutTenant.status == "ok"))
        if started:
            break
        time.sleep(0.05)
    created = fleet.provision(slug, "ap-south")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, out + err
    assert json.loads(out)["status"] == "completed"
    assert created.tenant["revision"] in (OLD, HEAD)
    assert _live(test_fleet, [slug]) == {slug: HEAD}
    assert fleet.target_revision() == HEAD


def test_locked_table_retries_then_fails_without_blocking(fleet: Fleet, test_fleet: PgFleet,
                                                          tenants: list[str]) -> None:
    victim = tenants[3]
    _reset(test_fleet, [victim], OLD)
    dsn = fleet.credentials(victim)
    holder = psycopg.connect(dsn)
    holder.execute("SELECT count(*) FROM products")  # ACCESS SHARE held: ALTER must wait
    reads: list[bool] = []
    stop = threading.Event()

    def app_reads() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET statement_timeout = '5s'")
            while not stop.is_set():
                try:
                    conn.execute("SELECT count(*) FROM products")
                    reads.append(True)
                except psycopg.errors.QueryCanceled:
                    reads.append(False)
                time.sleep(0.02)

    reader = threading.Thread(target=app_reads)
    reader.start()
    try:
        proc = run_cli(test_fleet, "migrate", "tenant", victim, "--to", HEAD,
                       "--lock-timeout", "200ms", "--retries", "2", "--json")
    finally:
        stop.set()
        reader.join()
        holder.close()
    assert proc.returncode == 1, proc.stderr
    (result,) = _json(proc)["results"]
    assert result["status"] == "failed" and result["attempts"] == 3
    assert "gave up after 3 attempts" in result["error"]
    assert "lock timeout" in result["error"]
    assert reads and all(reads)  # the application was never stuck behind the ALTER
    assert _live(test_fleet, [victim]) == {victim: OLD}
    # once the lock is gone, the same command succeeds
    ok = run_cli(test_fleet, "migrate", "tenant", victim, "--to", HEAD)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_tenant_held_by_another_operation_is_retried_then_fails(
        fleet: Fleet, test_fleet: PgFleet, tenants: list[str]) -> None:
    """The claim tries the tenant's lock in SQL (lock_key_sql): it must be the very
    lock provisioning, backups and restores take (lock_key in Python)."""
    victim = tenants[5]
    _reset(test_fleet, [victim], OLD)
    with fleet.catalog.advisory_lock(tenant_lock(victim)) as got:
        assert got
        proc = run_cli(test_fleet, "migrate", "tenant", victim, "--to", HEAD,
                       "--retries", "1", "--json")
    assert proc.returncode == 1, proc.stderr
    (result,) = _json(proc)["results"]
    assert result["status"] == "failed" and result["attempts"] == 2
    assert "tenant locked by another operation" in result["error"]
    assert _live(test_fleet, [victim]) == {victim: OLD}
    ok = run_cli(test_fleet, "migrate", "tenant", victim, "--to", HEAD)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert _live(test_fleet, [victim]) == {victim: HEAD}
    # and the rollout let go of it: another operation can take it at once
    with fleet.catalog.advisory_lock(tenant_lock(victim)) as got:
        assert got


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters="\x00"), max_size=60))
@settings(max_examples=60, deadline=None)
def test_lock_key_sql_is_lock_key(test_fleet: PgFleet, name: str) -> None:
    with psycopg.connect(test_fleet.config().catalog_dsn) as conn:
        row = conn.execute("SELECT " + lock_key_sql("%s"), (name,)).fetchone()
    assert row is not None and row[0] == lock_key(name)


def test_bad_rollout_input(fleet: Fleet, test_fleet: PgFleet, tenants: list[str]) -> None:
    target = fleet.target_revision()
    with fleet.catalog.session() as s:
        rollouts = s.scalar(select(func.count()).select_from(Rollout))
    for args, needle in [(["--to", OLD, "--max-failures", "10x"], "invalid --max-failures"),
                         (["--to", OLD, "--region", "mars"], "unknown region"),
                         (["--concurrency", "0"], "--concurrency must be"),
                         (["--to", "nosuchrev"], "unknown revision 'nosuchrev'"),
                         (["--waves", "ten"], "invalid --waves"),
                         (["--max-failures", "-1"], "invalid --max-failures"),
                         (["--lock-timeout", "soon"], "invalid --lock-timeout"),
                         (["--tenants", "nobody_here"], "no migratable tenant"),
                         (["--region", "mars"], "unknown region")]:
        proc = _rollout(test_fleet, *args)
        assert proc.returncode != 0
        assert proc.stderr.startswith("error: ") and needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    # bad input changes nothing: no rollout row, the fleet target where it was
    assert fleet.target_revision() == target
    with fleet.catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(Rollout)) == rollouts


def test_sigterm_finishes_in_flight_and_resumes(fleet: Fleet, test_fleet: PgFleet,
                                                tenants: list[str]) -> None:
    import signal

    _reset(test_fleet, tenants, OLD)
    cmd = [*TENANTCTL, "--config", str(test_fleet.config_path), "migrate", "rollout",
           "--tenants", ",".join(tenants), "--concurrency", "1", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with fleet.catalog.session() as s:
            done = s.scalar(select(func.count()).select_from(RolloutTenant).join(Rollout)
                            .where(Rollout.status == "running", Rollout.target == HEAD,
                                   RolloutTenant.status == "ok"))
        if done:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopping: no new tenant starts" in err
    summary = json.loads(out)
    assert summary["status"] == "interrupted"
    assert summary["counts"].get("pending", 0) > 0 and "running" not in summary["counts"]
    live = _live(test_fleet, tenants)
    assert sum(rev == HEAD for rev in live.values()) == summary["counts"]["ok"]
    again = _rollout(test_fleet, "--tenants", ",".join(tenants), "--json")
    assert again.returncode == 0, again.stderr
    assert _json(again)["rollout_id"] == summary["rollout_id"]  # the same rollout, resumed
    assert set(_live(test_fleet, tenants).values()) == {HEAD}


# -- migrate status's reader --------------------------------------------------------


def test_status_reader_says_base_unreachable_and_timeout(fleet: Fleet, slug: str) -> None:
    """The status reader is libpq driven by hand: base (no alembic_version), a server
    that refuses, and one that accepts and never answers each give one clear line,
    alone or among other reads."""
    import socket

    from psycopg.conninfo import make_conninfo

    from orchestrator.services.migrate_status import read_version, read_versions
    from tests.conftest import _closed_port

    admin_dsn = fleet.cfg.server("ap-south-1").admin_dsn
    base = sql.Identifier(f"{slug}_base")
    with fleet.server_connection("ap-south-1") as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(base))
    try:
        at_base = make_conninfo(admin_dsn, dbname=f"{slug}_base")
        assert read_version(at_base) == (None, None)
        # many at once, one selector: answers come back in the jobs' order, each its own
        refused = make_conninfo(admin_dsn, port=_closed_port())
        reads = read_versions([("ap", at_base), ("down", refused), ("ap", at_base),
                               ("ap", make_conninfo(admin_dsn, dbname="postgres"))],
                              concurrency=2, per_server=1)
        assert reads[0] == reads[2] == reads[3] == (None, None)
        assert reads[1][0] is None and "refused" in (reads[1][1] or "")
    finally:
        with fleet.server_connection("ap-south-1") as conn:
            conn.execute(sql.SQL("DROP DATABASE {}").format(base))
    revision, error = read_version(make_conninfo(admin_dsn, port=_closed_port()))
    assert revision is None and error and "\n" not in error and "refused" in error
    with socket.socket() as silent:  # accepts, then says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        revision, error = read_version(
            make_conninfo(admin_dsn, port=silent.getsockname()[1]), timeout=0.5)
        assert (revision, error) == (None, "connection timed out after 0.5 s")
        assert time.monotonic() - started < 5


def test_admin_reads_versions_through_direct_grants(tenants: list[str],
                                                    test_fleet: PgFleet) -> None:
    """The admin holds USAGE on public and SELECT on alembic_version in its own name,
    so a status read never walks its memberships (one per tenant on the server)."""
    fleet = Fleet(test_fleet.config())
    try:
        t = fleet.get_tenant(tenants[0])
        dsn = with_dbname(fleet.cfg.server(t.server).admin_dsn, t.database)
        with psycopg.connect(dsn) as conn:
            acls = conn.execute(
                "SELECT (SELECT nspacl::text[] FROM pg_namespace WHERE nspname = 'public'),"
                " (SELECT relacl::text[] FROM pg_class"
                "  WHERE oid = 'public.alembic_version'::regclass), current_user").fetchone()
    finally:
        fleet.close()
    assert acls is not None
    schema_acl, table_acl, admin = acls
    assert any(a.startswith(f"{admin}=U/") for a in schema_acl), schema_acl
    assert any(a.startswith(f"{admin}=r/") for a in table_acl), table_acl


# -- migrate status's sources: each database's mark, or a live read ------------------


def _status(test_fleet: PgFleet, *args: str) -> dict:  # type: ignore[type-arg]
    proc = run_cli(test_fleet, "migrate", "status", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return _json(proc)


def _same_answer(a: dict, b: dict) -> bool:  # type: ignore[type-arg]
    return all(a[k] == b[k] for k in ("tenants", "revisions", "behind", "failed",
                                      "unreachable"))


def test_status_from_marks_is_what_every_database_says(fleet: Fleet, test_fleet: PgFleet,
                                                       tenants: list[str]) -> None:
    """Every tenant database in the test fleet (provisioned, restored, rolled up and
    down by the tests so far) is marked with the revision it holds: status from the
    marks and status reading every database agree. A tenant without a mark is read
    live and marked again; a mark set wrong by hand is what --live exists to catch,
    and it rewrites it."""
    _reset(test_fleet, tenants, OLD)
    for slug in tenants:
        assert mark_and_version(fleet, slug) == (OLD, OLD)
    marked, live = _status(test_fleet), _status(test_fleet, "--live")
    assert _same_answer(marked, live)
    assert marked["sources"] == {"mark": marked["tenants"], "live": 0}
    assert live["sources"] == {"mark": 0, "live": live["tenants"]}
    assert marked["revisions"][OLD] >= N_TENANTS
    assert marked["remarked"] == live["remarked"] == []

    first, second = (fleet.get_tenant(s) for s in tenants[:2])
    with psycopg.connect(fleet.cfg.server(first.server).admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(
            sql.Identifier(first.database)))
    with psycopg.connect(fleet.cfg.server(second.server).admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(second.database), sql.Literal(revision_marks.mark(HEAD))))
    marked = _status(test_fleet)
    assert marked["sources"] == {"mark": marked["tenants"] - 1, "live": 1}
    behind = {b["slug"]: b["revision"] for b in marked["behind"]}
    assert behind[first.slug] == OLD  # unmarked: read from the database itself ...
    assert marked["remarked"] == [{"slug": first.slug, "server": first.server,
                                   "marked": False, "mark": None, "revision": OLD}]
    assert mark_and_version(fleet, first.slug) == (OLD, OLD)  # ... and marked again
    assert second.slug not in behind  # the mark says HEAD ...
    live = _status(test_fleet, "--live")
    assert {b["slug"]: b["revision"] for b in live["behind"]}[second.slug] == OLD  # ... no
    assert live["remarked"] == [{"slug": second.slug, "server": second.server,
                                 "marked": True, "mark": HEAD, "revision": OLD}]
    assert mark_and_version(fleet, second.slug) == (OLD, OLD)
    assert _same_answer(_status(test_fleet), _status(test_fleet, "--live"))


def test_a_mark_rewritten_during_a_migration_waits_for_it(test_fleet: PgFleet) -> None:
    """republish takes the database's comment before it reads alembic_version: a
    migration that has written its mark but not committed holds that lock, so the
    rewrite waits and then marks what the migration left, never the old revision."""
    admin = test_fleet.admin_dsn("eu-central-1")
    scratch = f"marks_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(scratch)))
    try:
        with psycopg.connect(with_dbname(admin, scratch), autocommit=True) as migration, \
                psycopg.connect(with_dbname(admin, scratch), autocommit=True) as status:
            migration.execute("CREATE TABLE public.alembic_version (version_num text)")
            migration.execute("INSERT INTO public.alembic_version VALUES ('v1')")
            with migration.transaction():
                migration.execute("UPDATE public.alembic_version SET version_num = 'v2'")
                revision_marks.publish(migration, "v2")
                got: list[str | None] = []
                rewrite = threading.Thread(
                    target=lambda: got.append(revision_marks.republish(status)))
                rewrite.start()
                rewrite.join(1.0)
                assert rewrite.is_alive()  # waiting on the migration's lock
            rewrite.join(10)
            assert got == ["v2"]
            with psycopg.connect(admin) as conn:
                assert revision_marks.published(conn, [scratch]) == {scratch: "v2"}
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(scratch)))
