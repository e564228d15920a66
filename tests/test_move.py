"""`tenant move` on real clusters: the session fleet's two eu-central servers are two
clusters, ap-south a third (tests/conftest.py). Each test moves a tenant of its own."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from orchestrator.adapters.catalog.models import Backup, TenantMove
from orchestrator.adapters.postgres import move_copy
from orchestrator.api import Fleet
from orchestrator.domain.errors import Conflict, ExitCode, InvalidInput
from orchestrator.domain.names import tenant_lock
from orchestrator.domain.statuses import BackupStatus
from orchestrator.services import move as move_service
from orchestrator.services import report
from tests.conftest import PgFleet, connect_as, run_cli, server_objects

BIG = "x" * 300_000  # a TOASTed value: large rows travel too


def _other(fleet: Fleet, slug: str) -> str:
    here = fleet.get_tenant(slug).server
    return next(s for s in ("eu-central-1", "eu-central-2") if s != here)


def _tenant_with_data(fleet: Fleet, slug: str, region: str = "eu-central") -> str:
    fleet.provision(slug, region)
    dsn = fleet.credentials(slug)
    with connect_as(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) SELECT 'c' || g || '@x.test', "
                     "'customer ' || g FROM generate_series(1, 300) g")
        conn.execute("INSERT INTO warehouses (code, name, address) SELECT 'W' || g, "
                     "'warehouse ' || g, %s || g FROM generate_series(1, 5) g", (BIG,))
        conn.execute("INSERT INTO suppliers (name) VALUES ('s1'), ('s2')")
    return dsn


def _count(dsn: str, table: str) -> int:
    with connect_as(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 - ours
    assert row is not None
    return int(row[0])


class Writer(threading.Thread):
    """Inserts one supplier per commit through the application's DSN until stopped;
    a refused or broken write is retried on a new connection (the move pauses
    writes, then the host changes). Records every name whose commit returned."""

    def __init__(self, fleet: Fleet, slug: str) -> None:
        super().__init__(daemon=True)
        self.fleet, self.slug = fleet, slug
        self.acked: list[str] = []
        self.stop = threading.Event()
        self.longest_gap = 0.0
        self.failures = 0

    def run(self) -> None:
        last_ok = time.monotonic()
        n = 0
        conn: psycopg.Connection | None = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect_as(self.fleet.credentials(self.slug), autocommit=True)
                name = f"w{n}"
                conn.execute("INSERT INTO suppliers (name) VALUES (%s)", (name,))
                self.acked.append(name)
                n += 1
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - last_ok)
                last_ok = now
                time.sleep(0.01)
            except psycopg.Error:
                self.failures += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()


def test_dump_move_keeps_every_commit_and_the_password(fleet: Fleet, test_fleet: PgFleet,
                                                       slug: str) -> None:
    old_dsn = _tenant_with_data(fleet, slug)
    source = fleet.get_tenant(slug).server
    target = _other(fleet, slug)
    writer = Writer(fleet, slug)
    writer.start()
    time.sleep(0.5)
    lines: list[str] = []
    try:
        res = move_service.move_tenant(fleet, slug, server=target, method="dump",
                                       progress=lines.append)
        time.sleep(0.5)  # the writer reconnects to the new host
    finally:
        writer.stop.set()
        writer.join(10)
    assert res.method == "dump" and res.outcome == "done"
    assert (res.old_server, res.new_server) == (source, target)
    assert res.bytes_copied > 1_000_000 and res.write_pause_s > 0
    assert res.checks["tables"] >= 10 and res.checks["rows"] >= 307
    assert any("cutover" in ln for ln in lines)
    t = fleet.get_tenant(slug)
    assert t.server == target and t.region == "eu-central" and t.state == "active"
    new_dsn = fleet.credentials(slug)
    # the host changed, the password did not
    old, new = conninfo_to_dict(old_dsn), conninfo_to_dict(new_dsn)
    assert old["password"] == new["password"] and old["port"] != new["port"]
    # every acknowledged commit is on the target, and the writer wrote on both sides
    with connect_as(new_dsn) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM suppliers")}
        # the sequences came along: a new row gets an id past every copied one
        conn.execute("INSERT INTO suppliers (name) VALUES ('after')")
        ids = [r[0] for r in conn.execute("SELECT id FROM suppliers ORDER BY id")]
        big = conn.execute("SELECT length(address) FROM warehouses WHERE code = 'W1'"
                           ).fetchone()
    assert set(writer.acked) <= names, "a commit acknowledged before the move is missing"
    assert len(writer.acked) > 10 and writer.failures > 0
    assert ids[-1] == max(ids) and len(ids) == len(set(ids))
    assert big is not None and big[0] == len(BIG) + 1
    # nothing of the tenant is left on the source
    dbs, roles = server_objects(test_fleet, source)
    assert f"tenant_{slug}" not in dbs
    assert not {f"tenant_{slug}", f"owner_{slug}"} & roles
    history = move_service.moves_of(fleet, slug)
    assert history[0]["outcome"] == "done" and history[0]["step"] == "done"
    assert history[0]["write_pause_ms"] == int(res.write_pause_s * 1000)


def test_refusals_change_nothing(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    fleet.provision(slug, "eu-central")
    # a large object: logical replication does not carry them, so `--method logical`
    # is refused and the automatic choice is dump (every test cluster could do logical)
    with connect_as(fleet.credentials(slug), autocommit=True) as conn:
        conn.execute("SELECT lo_from_bytea(0, 'x')")
    here = fleet.get_tenant(slug).server
    cases: list[tuple[list[str], int, str]] = [
        (["--server", here], ExitCode.INVALID, "already"),
        (["--server", "nope-9"], ExitCode.INVALID, "no server named"),
        (["--region", "nowhere"], ExitCode.INVALID, "unknown region"),
        ([], ExitCode.INVALID, "--server"),
        (["--server", "ap-south-1"], ExitCode.INVALID, "--reason"),
        (["--region", "ap-south"], ExitCode.INVALID, "--reason"),
        (["--server", "ap-south-1", "--reason", "x", "--method", "logical"],
         ExitCode.INVALID, "--method logical is not possible"),
        (["--server", "down-1", "--reason", "x"], ExitCode.UNAVAILABLE, "down-1"),
        (["--abort"], ExitCode.NOT_FOUND, "no unfinished move"),
    ]
    for args, code, text in cases:
        proc = run_cli(test_fleet, "tenant", "move", slug, *args, "--yes")
        assert proc.returncode == code, (args, proc.stderr)
        assert text in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            (args, proc.stderr)
    proc = run_cli(test_fleet, "tenant", "move", "no_such_one", "--server", "eu-central-1",
                   "--yes")
    assert proc.returncode == ExitCode.NOT_FOUND
    # no terminal and no --yes: refused before anything changes
    proc = run_cli(test_fleet, "tenant", "move", slug, "--server", _other(fleet, slug))
    assert proc.returncode == ExitCode.INVALID and "--yes" in proc.stderr
    # another process holds the tenant (a move running): exit 4
    with fleet.catalog.advisory_lock(tenant_lock(slug)) as got:
        assert got
        proc = run_cli(test_fleet, "tenant", "move", slug, "--server", _other(fleet, slug),
                       "--yes")
        assert proc.returncode == ExitCode.CONFLICT, proc.stderr
    assert fleet.get_tenant(slug).server == here
    assert move_service.moves_of(fleet, slug) == []
    # the dry run plans and changes nothing
    proc = run_cli(test_fleet, "tenant", "move", slug, "--server", _other(fleet, slug),
                   "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["dry_run"] and plan["method"] == "dump" and plan["plan"]["size_bytes"] > 0
    assert "cutover" in plan["plan"]["steps"]
    assert fleet.get_tenant(slug).server == here


def test_corrupted_copy_is_refused_and_undone(fleet: Fleet, test_fleet: PgFleet, slug: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = _tenant_with_data(fleet, slug)
    source, target = fleet.get_tenant(slug).server, _other(fleet, slug)
    real = move_copy.dump_restore

    def corrupting(*args: Any, **kw: Any) -> int:
        copied = real(*args, **kw)
        with psycopg.connect(args[3], autocommit=True) as conn:  # the target's DSN
            conn.execute("UPDATE customers SET name = 'tampered' WHERE id = 7")
        return copied

    monkeypatch.setattr(move_copy, "dump_restore", corrupting)
    with pytest.raises(move_service.MoveChecksFailed, match="customers: same row count"):
        move_service.move_tenant(fleet, slug, server=target, method="dump")
    assert fleet.get_tenant(slug).server == source
    dbs, roles = server_objects(test_fleet, target)
    assert f"tenant_{slug}" not in dbs and f"tenant_{slug}" not in roles
    with connect_as(dsn, autocommit=True) as conn:  # it writes again
        conn.execute("INSERT INTO suppliers (name) VALUES ('still here')")
    [row] = move_service.moves_of(fleet, slug)
    assert row["outcome"] == "aborted" and "does not match" in row["error"]


def test_states_travel_with_the_tenant(fleet: Fleet, slug: str) -> None:
    from orchestrator.services import lifecycle

    cancelled, suspended = slug + "c", slug + "s"
    for s in (cancelled, suspended):
        _tenant_with_data(fleet, s)
    dsn = fleet.credentials(cancelled)
    lifecycle.cancel(fleet, cancelled, backup=False)
    lifecycle.suspend(fleet, suspended)
    for s in (cancelled, suspended):
        move_service.move_tenant(fleet, s, server=_other(fleet, s), method="dump")
    assert fleet.get_tenant(cancelled).state == "cancelled"
    new_dsn = fleet.credentials(cancelled)
    assert new_dsn != dsn
    with connect_as(new_dsn, autocommit=True) as conn:  # readable, not writable
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (300,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO suppliers (name) VALUES ('no')")
    assert fleet.get_tenant(suspended).state == "suspended"
    with pytest.raises(psycopg.OperationalError):
        connect_as(fleet.credentials(suspended))
    lifecycle.resume(fleet, suspended)
    with connect_as(fleet.credentials(suspended), autocommit=True) as conn:
        conn.execute("INSERT INTO suppliers (name) VALUES ('yes')")


def _store_keys(fleet: Fleet, region: str, slug: str) -> set[str]:
    root = Path(fleet.cfg.region(region).backup_store.removeprefix("file://"))
    d = root / "tenants" / slug
    return {p.name for p in d.iterdir()} if d.exists() else set()


def _region_offenders(fleet: Fleet) -> set[str]:
    rep = report.build(fleet)
    region = next(p for p in rep["promises"] if p["promise"] == "region")
    return {f["subject"] for f in region["failures"]}


def test_region_move_keeps_the_residency_promise(fleet: Fleet, test_fleet: PgFleet,
                                                 slug: str) -> None:
    _tenant_with_data(fleet, slug)
    fleet.backup_jobs.run(slug, kind="manual")
    assert _store_keys(fleet, "eu-central", slug)
    proc = run_cli(test_fleet, "tenant", "move", slug, "--region", "ap-south", "--reason",
                   "customer asked for ap-south", "--yes", "--json", "--show-dsn")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["new_region"] == "ap-south" and out["new_server"] == "ap-south-1"
    assert out["backup_id"] and out["old_region_objects_deleted"] >= 2
    assert "@127.0.0.1:" in out["dsn"]
    t = fleet.get_tenant(slug)
    assert (t.server, t.region) == ("ap-south-1", "ap-south")
    assert _store_keys(fleet, "eu-central", slug) == set()
    assert _store_keys(fleet, "ap-south", slug)
    with fleet.catalog.session() as s:
        rows = list(s.query(Backup).filter(Backup.slug == slug))
        [moved] = s.query(TenantMove).filter(TenantMove.slug == slug).all()
    assert {(b.region, b.status) for b in rows} == {
        ("eu-central", BackupStatus.deleted), ("ap-south", BackupStatus.completed)}
    assert moved.reason == "customer asked for ap-south" and moved.from_region == "eu-central"
    assert slug not in _region_offenders(fleet)
    # an object of the tenant left in the old region's store breaks the promise, by name
    stray = Path(fleet.cfg.region("eu-central").backup_store.removeprefix("file://")) / \
        "tenants" / slug / "0000000001-stray.dump.age"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"left behind")
    try:
        assert slug in _region_offenders(fleet)
    finally:
        stray.unlink()


@pytest.mark.parametrize("fault", ["move.target", "move.paused", "move.copy_chunk",
                                   "move.copied", "move.checked"])
def test_killed_before_the_cutover_then_finished_or_aborted(
        fleet: Fleet, test_fleet: PgFleet, slug: str, fault: str) -> None:
    dsn = _tenant_with_data(fleet, slug)
    source, target = fleet.get_tenant(slug).server, _other(fleet, slug)
    args = ("tenant", "move", slug, "--server", target, "--yes", "--method", "dump")
    proc = run_cli(test_fleet, *args, env={"TENANTCTL_FAULT": fault})
    assert proc.returncode == -9, proc.stderr
    assert fleet.get_tenant(slug).server == source
    # a backup would dump a database that is being moved: refused until it is done
    proc = run_cli(test_fleet, "backup", "run", slug)
    assert proc.returncode == ExitCode.CONFLICT and "being moved" in proc.stderr
    if fault in ("move.paused", "move.checked"):
        proc = run_cli(test_fleet, "tenant", "move", slug, "--abort", "--yes", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["outcome"] == "aborted"
        assert fleet.get_tenant(slug).server == source
        dbs, roles = server_objects(test_fleet, target)
        assert f"tenant_{slug}" not in dbs and f"tenant_{slug}" not in roles
        with connect_as(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO suppliers (name) VALUES ('writes again')")
        return
    proc = run_cli(test_fleet, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["resumed"] and out["outcome"] == "done"
    assert fleet.get_tenant(slug).server == target
    assert _count(fleet.credentials(slug), "customers") == 300
    dbs, _ = server_objects(test_fleet, source)
    assert f"tenant_{slug}" not in dbs


@pytest.mark.parametrize("fault", ["move.cutover", "move.source_database_dropped"])
def test_killed_after_the_cutover_then_finished(fleet: Fleet, test_fleet: PgFleet, slug: str,
                                                fault: str) -> None:
    _tenant_with_data(fleet, slug)
    source, target = fleet.get_tenant(slug).server, _other(fleet, slug)
    proc = run_cli(test_fleet, "tenant", "move", slug, "--server", target, "--yes",
                   "--method", "dump", env={"TENANTCTL_FAULT": fault})
    assert proc.returncode == -9
    assert fleet.get_tenant(slug).server == target  # the catalog points there already
    proc = run_cli(test_fleet, "tenant", "move", slug, "--abort", "--yes")
    assert proc.returncode == ExitCode.CONFLICT and "cut over" in proc.stderr
    proc = run_cli(test_fleet, "tenant", "move", slug, "--server", target, "--yes")
    assert proc.returncode == 0, proc.stderr
    dbs, roles = server_objects(test_fleet, source)
    assert f"tenant_{slug}" not in dbs and f"owner_{slug}" not in roles
    with connect_as(fleet.credentials(slug), autocommit=True) as conn:
        conn.execute("INSERT INTO suppliers (name) VALUES ('on the target')")


def test_move_refused_while_a_backup_runs_and_rollout_waits(fleet: Fleet, slug: str) -> None:
    _tenant_with_data(fleet, slug)
    target = _other(fleet, slug)
    with fleet.catalog.session() as s, s.begin():
        t = fleet.get_tenant(slug)
        row = Backup(tenant_id=t.id, slug=slug, region=t.region, store_url="file:///x",
                     object_key="", manifest_key="", status=BackupStatus.running)
        s.add(row)
        s.flush()
        bid = row.id
    try:
        # its process is alive (holds the backup's lock): the move is refused
        with fleet.catalog.advisory_lock(f"backup:{bid}", wait=True), \
                pytest.raises(Conflict, match="backup of tenant"):
            move_service.move_tenant(fleet, slug, server=target)
    finally:
        with fleet.catalog.session() as s, s.begin():
            s.query(Backup).filter(Backup.id == bid).delete()
    assert move_service.moves_of(fleet, slug) == []
    with pytest.raises(InvalidInput):
        move_service.move_tenant(fleet, slug)
    move_service.move_tenant(fleet, slug, server=target, method="dump")
    assert fleet.get_tenant(slug).server == target


# -- the logical method: the eu-central clusters set up for it (as the local fleet
# and the Ansible role do) -----------------------------------------------------------

LOGICAL_SERVERS = ("eu-central-1", "eu-central-2")


@pytest.fixture(scope="module")
def logical_ready(test_fleet: PgFleet) -> None:
    """wal_level = logical (a restart) and the admin role's REPLICATION and
    pg_create_subscription on both eu-central clusters, as their superuser."""
    from orchestrator.devfleet import localfleet

    if test_fleet.external:
        pytest.skip("needs the embedded clusters' superuser")
    cfg = test_fleet.config()
    owner = localfleet._os_user()
    for name in LOGICAL_SERVERS:
        server = cfg.server(name)
        su = (test_fleet.state_dir / "secrets" / f"{name}.superuser").read_text().strip()
        with psycopg.connect(host="127.0.0.1", port=server.port, user="postgres",
                             password=su, dbname="postgres", autocommit=True) as conn:
            restart = conn.execute("SHOW wal_level").fetchone() != ("logical",)
            if restart:
                conn.execute("ALTER SYSTEM SET wal_level = logical")
                conn.execute("ALTER SYSTEM SET max_wal_senders = 10")
                conn.execute("ALTER SYSTEM SET max_replication_slots = 10")
            conn.execute("ALTER ROLE tenantctl_admin REPLICATION")
            conn.execute("GRANT pg_create_subscription TO tenantctl_admin")
        if restart:
            localfleet._stop(cfg, server, owner)
            localfleet._start(cfg, server, owner)


def _replication_leftovers(test_fleet: PgFleet, tenant_id: int) -> list[str]:
    name = f"tctl_move_{tenant_id}"
    found = []
    for server in LOGICAL_SERVERS:
        with psycopg.connect(test_fleet.admin_dsn(server), autocommit=True) as conn:
            for what, q in (("slot", "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s"),
                            ("subscription", "SELECT 1 FROM pg_subscription WHERE subname = %s"),
                            ("role", "SELECT 1 FROM pg_roles WHERE rolname = %s")):
                if conn.execute(q, (name,)).fetchone():
                    found.append(f"{what} on {server}")
    return found


def test_logical_move_pauses_writes_for_seconds(fleet: Fleet, test_fleet: PgFleet, slug: str,
                                                logical_ready: None) -> None:
    _tenant_with_data(fleet, slug)
    source, target = fleet.get_tenant(slug).server, _other(fleet, slug)
    plan = move_service.move_tenant(fleet, slug, server=target, dry_run=True)
    assert plan.method == "logical", plan.plan
    writer = Writer(fleet, slug)
    writer.start()
    time.sleep(0.5)
    try:
        res = move_service.move_tenant(fleet, slug, server=target)
        time.sleep(0.5)
    finally:
        writer.stop.set()
        writer.join(10)
    assert res.method == "logical" and res.outcome == "done"
    assert res.write_pause_s < 5, res.write_pause_s
    assert writer.longest_gap < 10, writer.longest_gap
    with connect_as(fleet.credentials(slug), autocommit=True) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM suppliers")}
        conn.execute("INSERT INTO suppliers (name) VALUES ('after')")  # sequence copied
        big = conn.execute("SELECT length(address) FROM warehouses WHERE code = 'W2'"
                           ).fetchone()
    assert set(writer.acked) <= names and len(writer.acked) > 10
    assert big == (len(BIG) + 1,)
    assert _replication_leftovers(test_fleet, fleet.get_tenant(slug).id) == []
    dbs, roles = server_objects(test_fleet, source)
    assert f"tenant_{slug}" not in dbs and f"owner_{slug}" not in roles


@pytest.mark.parametrize("tamper", ["row", "numeric_scale"])
def test_logical_copy_corrupted_while_streaming_is_refused(
        fleet: Fleet, test_fleet: PgFleet, slug: str, logical_ready: None,
        monkeypatch: pytest.MonkeyPatch, tamper: str) -> None:
    """A change made to the copy behind the subscription's back, after the initial copy
    and before the pause, is caught by the checks; so is one its type's hash alone
    could not see (numeric 1.0 against 1.00: equal values, different rows)."""
    dsn = _tenant_with_data(fleet, slug)
    t = fleet.get_tenant(slug)
    source, target = t.server, _other(fleet, slug)
    with psycopg.connect(test_fleet.admin_dsn(source, t.database), autocommit=True) as conn:
        conn.execute(f'SET ROLE "{t.owner_role}"')
        conn.execute("CREATE TABLE ledger (id int PRIMARY KEY, amount numeric NOT NULL)")
        conn.execute("INSERT INTO ledger VALUES (1, 1.0), (2, 2.5)")
    real = move_service._replicate

    def then_tamper(*args: Any, **kw: Any) -> None:
        real(*args, **kw)  # the subscription streams from here on
        with psycopg.connect(test_fleet.admin_dsn(target, t.database),
                             autocommit=True) as conn:
            conn.execute("UPDATE customers SET name = 'tampered' WHERE id = 7"
                         if tamper == "row" else "UPDATE ledger SET amount = 1.00 WHERE id = 1")

    monkeypatch.setattr(move_service, "_replicate", then_tamper)
    table = "customers" if tamper == "row" else "ledger"
    with pytest.raises(move_service.MoveChecksFailed, match=f"{table}: same row count"):
        move_service.move_tenant(fleet, slug, server=target, method="logical")
    assert fleet.get_tenant(slug).server == source
    assert _replication_leftovers(test_fleet, t.id) == []
    with connect_as(dsn, autocommit=True) as conn:  # it writes again
        conn.execute("INSERT INTO suppliers (name) VALUES ('still here')")


def test_logical_killed_while_replicating_then_aborted_or_finished(
        fleet: Fleet, test_fleet: PgFleet, slug: str, logical_ready: None) -> None:
    for n, fault in enumerate(("move.synced", "move.replicating")):
        s = f"{slug}{n}"
        dsn = _tenant_with_data(fleet, s)
        source, target = fleet.get_tenant(s).server, _other(fleet, s)
        tid = fleet.get_tenant(s).id
        args = ("tenant", "move", s, "--server", target, "--yes", "--method", "logical")
        proc = run_cli(test_fleet, *args, env={"TENANTCTL_FAULT": fault})
        assert proc.returncode == -9, proc.stderr
        assert "slot on " + source in _replication_leftovers(test_fleet, tid)
        if fault == "move.synced":
            proc = run_cli(test_fleet, "tenant", "move", s, "--abort", "--yes")
            assert proc.returncode == 0, proc.stderr
            assert fleet.get_tenant(s).server == source
            with connect_as(dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO suppliers (name) VALUES ('writes again')")
        else:
            proc = run_cli(test_fleet, *args)
            assert proc.returncode == 0, proc.stderr
            assert fleet.get_tenant(s).server == target
            assert _count(fleet.credentials(s), "customers") == 300
        assert _replication_leftovers(test_fleet, tid) == []
        dbs, _ = server_objects(test_fleet, target if fault == "move.synced" else source)
        assert f"tenant_{s}" not in dbs


def test_doctor_reports_and_fixes_stalled_moves_and_leftover_slots(
        fleet: Fleet, test_fleet: PgFleet, slug: str, logical_ready: None) -> None:
    from orchestrator.services import doctor

    def mine(findings: list[Any], subjects: set[str]) -> list[Any]:
        return [x for x in findings if x.subject in subjects]

    _tenant_with_data(fleet, slug)
    source, target = fleet.get_tenant(slug).server, _other(fleet, slug)
    tid = fleet.get_tenant(slug).id
    proc = run_cli(test_fleet, "tenant", "move", slug, "--server", target, "--yes",
                   "--method", "logical", env={"TENANTCTL_FAULT": "move.synced"})
    assert proc.returncode == -9
    # a slot nobody accounts for (a move whose catalog row is gone)
    with psycopg.connect(test_fleet.admin_dsn(source, f"tenant_{slug}"),
                         autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('tctl_move_999999', "
                     "'pgoutput')")
    stray = f"{source}/tctl_move_999999"
    found = mine(doctor.run(fleet), {slug, stray})
    codes = {(x.code, x.subject, x.severity) for x in found}
    assert codes == {("move-stalled", slug, "warning"), ("move-leftover", stray, "error")}
    # the copy on the target is the move's, not an orphan
    assert not [x for x in doctor.run(fleet) if x.code == "orphan-database"
                and slug in x.subject]
    for x in found:
        doctor.FIXES[x.fix](fleet, x)
    assert mine(doctor.run(fleet), {slug, stray}) == []
    assert _replication_leftovers(test_fleet, tid) == []
    assert fleet.get_tenant(slug).server == source
    with connect_as(fleet.credentials(slug), autocommit=True) as conn:
        conn.execute("INSERT INTO suppliers (name) VALUES ('writes again')")


def test_rollout_during_a_move_waits_or_fails_then_finds_the_new_server(
        fleet: Fleet, slug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rollout of a tenant being moved cannot take its lock (the schema stays as
    the move copies it); afterwards it migrates the tenant where it now lives."""
    from orchestrator.services.rollout import RolloutOptions, RolloutRun

    old_revision = "0005_reorder_level"
    _tenant_with_data(fleet, slug)
    RolloutRun(fleet, RolloutOptions(to=old_revision, tenants=[slug], concurrency=1,
                                     per_server=1, max_failures="100%")).run()
    assert fleet.get_tenant(slug).revision == old_revision
    target = _other(fleet, slug)
    real = move_copy.dump_restore
    copying = threading.Event()

    def slow(*args: Any, **kw: Any) -> int:
        copying.set()
        time.sleep(4)
        return real(*args, **kw)

    monkeypatch.setattr(move_copy, "dump_restore", slow)
    mover = threading.Thread(target=lambda: move_service.move_tenant(
        fleet, slug, server=target, method="dump"))
    mover.start()
    assert copying.wait(30)
    during = RolloutRun(fleet, RolloutOptions(to="head", tenants=[slug], concurrency=1,
                                              per_server=1, max_failures="100%",
                                              retries=0)).run()
    mover.join(60)
    [r] = during.results
    assert r.status == "failed" and "locked" in (r.error or "")
    t = fleet.get_tenant(slug)
    assert t.server == target and t.revision == old_revision
    after = RolloutRun(fleet, RolloutOptions(to="head", tenants=[slug], concurrency=1,
                                             per_server=1, max_failures="100%")).run()
    [r] = after.results
    assert r.status == "ok" and r.server == target, r
    assert fleet.get_tenant(slug).revision == fleet.head_revision
