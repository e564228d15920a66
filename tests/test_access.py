"""Time-limited support access: one tenant's data, for a while, audited."""

from __future__ import annotations

import json
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import OwnCatalog, PgFleet, connect_as, run_cli


def cli_json(test_fleet: PgFleet, own: OwnCatalog, *args: str) -> object:
    proc = run_cli(test_fleet, *args, "--json", config=own.config_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _tenant(own: OwnCatalog, slug: str) -> str:
    own.fleet.provision(slug, "ap-south")
    dsn = own.fleet.credentials(slug)
    with connect_as(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) VALUES ('x@y.z', 'Xavier')")
    return dsn


def test_read_only_grant_sees_one_tenant_then_revoke(test_fleet: PgFleet,
                                                     own_catalog: OwnCatalog,
                                                     slug: str) -> None:
    own = own_catalog
    _tenant(own, slug)
    _tenant(own, f"{slug}_other")
    g = cli_json(test_fleet, own, "access", "grant", slug, "--to", "sam@support",
                 "--ttl", "2h", "--reason", "ticket 123")
    assert isinstance(g, dict) and g["read_only"] and g["status"] == "active"
    session = connect_as(g["dsn"], autocommit=True)
    try:
        assert session.execute("SELECT name FROM customers").fetchall() == [("Xavier",)]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            session.execute("INSERT INTO customers (email, name) VALUES ('a@b.c', 'A')")
        session.execute("SET default_transaction_read_only = off")  # no way around it
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            session.execute("INSERT INTO customers (email, name) VALUES ('a@b.c', 'A')")
        info = conninfo_to_dict(g["dsn"])
        for db in (f"tenant_{slug}_other", "postgres", "tenantctl_template"):
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(make_conninfo(g["dsn"], dbname=db), connect_timeout=5).close()
        assert info["user"] == f"tenantctl_support_{g['id']}"
        listed = cli_json(test_fleet, own, "access", "list")
        assert isinstance(listed, list) and [r["id"] for r in listed] == [g["id"]]
        assert "dsn" not in listed[0]
        assert cli_json(test_fleet, own, "access", "revoke", str(g["id"])) == {
            "revoked": [g["id"]], "failed": []}
        with pytest.raises(psycopg.OperationalError):  # the open session was ended
            session.execute("SELECT 1")
    finally:
        session.close()
    with pytest.raises(psycopg.OperationalError):
        connect_as(g["dsn"]).close()
    with psycopg.connect(test_fleet.admin_dsn("ap-south-1")) as admin:
        assert admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                             (f"tenantctl_support_{g['id']}",)).fetchone() is None
    again = run_cli(test_fleet, "access", "revoke", str(g["id"]), config=own.config_path)
    assert again.returncode == 4 and "already ended" in again.stderr
    events = cli_json(test_fleet, own, "audit", "list", "--action", "access.")
    assert isinstance(events, list)
    assert {e["action"] for e in events} >= {"access.grant", "access.revoke"}
    granted = next(e for e in events if e["action"] == "access.grant")
    assert granted["detail"]["reason"] == "ticket 123" and granted["detail"]["to"] == \
        "sam@support"
    assert conninfo_to_dict(g["dsn"])["password"] not in json.dumps(events)


def test_grant_expires_by_itself_and_is_dropped(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                                slug: str) -> None:
    own = own_catalog
    _tenant(own, slug)
    rw = cli_json(test_fleet, own, "access", "grant", slug, "--to", "dev", "--ttl", "3s",
                  "--reason", "incident 9", "--read-write")
    assert isinstance(rw, dict)
    with connect_as(rw["dsn"], autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) VALUES ('fix@y.z', 'Fixed')")
        # but not the schema revision: tenantctl moves it, with the database's mark
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
        for statement in ("UPDATE alembic_version SET version_num = 'x'",
                          "DELETE FROM alembic_version"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    time.sleep(4)
    # VALID UNTIL: the password is dead even though nothing ran
    with pytest.raises(psycopg.OperationalError):
        connect_as(rw["dsn"]).close()
    done = run_cli(test_fleet, "retention", "run", "--only", "access", "--json",
                   config=own.config_path)
    assert done.returncode == 0, done.stderr
    assert [a["action"] for a in json.loads(done.stdout)["plan"]] == ["expire_grant"]
    ended = cli_json(test_fleet, own, "access", "list", "--all")
    assert isinstance(ended, list) and ended[0]["status"] == "dropped"
    assert cli_json(test_fleet, own, "access", "list") == []


def test_grant_never_outlives_its_tenant(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                         slug: str) -> None:
    own = own_catalog
    _tenant(own, slug)
    g = cli_json(test_fleet, own, "access", "grant", slug, "--to", "sam", "--ttl", "1d",
                 "--reason", "migration help")
    assert isinstance(g, dict)
    erased = run_cli(test_fleet, "tenant", "erase", slug, "--reason", "request", "--yes",
                     config=own.config_path)
    assert erased.returncode == 0, erased.stderr
    with psycopg.connect(test_fleet.admin_dsn("ap-south-1")) as admin:
        assert admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                             (g["role"],)).fetchone() is None
    assert cli_json(test_fleet, own, "access", "list") == []


def test_revoke_all(test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    _tenant(own, slug)
    made = [cli_json(test_fleet, own, "access", "grant", slug, "--to", who, "--ttl", "1h",
                     "--reason", "r") for who in ("a", "b")]
    revoked = cli_json(test_fleet, own, "access", "revoke", "--all")
    assert revoked == {"revoked": [g["id"] for g in made], "failed": []}  # type: ignore[index]
    for g in made:
        with pytest.raises(psycopg.OperationalError):
            connect_as(g["dsn"]).close()  # type: ignore[index]
    assert cli_json(test_fleet, own, "access", "list") == []
    assert run_cli(test_fleet, "access", "revoke", config=own.config_path).returncode == 2


@pytest.mark.parametrize("args, message", [
    (["--ttl", "8d"], "at most 7 days"), (["--ttl", "soon"], "use a number"),
    (["--ttl", "1h", "--reason", " "], "--reason is required"),
])
def test_bad_grants_change_nothing(test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str,
                                   args: list[str], message: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, "ap-south")
    full = ["access", "grant", slug, "--to", "sam", *args]
    if "--reason" not in args:
        full += ["--reason", "r"]
    proc = run_cli(test_fleet, *full, config=own.config_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert cli_json(test_fleet, own, "access", "list", "--all") == []


def test_fleet_wide_rotation_reports_failures_and_converges(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    slugs = [f"{slug}_{i}" for i in range(3)]
    old = {s: _tenant(own, s) for s in slugs}
    session = connect_as(old[slugs[0]], autocommit=True)
    # the second tenant's rotation fails after its new password is stored
    proc = run_cli(test_fleet, "tenant", "credentials", "--rotate", "--all", "--concurrency",
                   "1", "--kill-sessions", "--json", "--yes", config=own.config_path,
                   env={"TENANTCTL_FAULT": "credentials.stored:2",
                        "TENANTCTL_FAULT_MODE": "raise"})
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["rotated"] == 2 and report["failed"] == 1
    failed = [t["tenant"] for t in report["tenants"] if not t["ok"]]
    assert failed == [slugs[1]]
    assert all(conninfo_to_dict(d)["password"] not in proc.stdout for d in old.values())
    with pytest.raises(psycopg.OperationalError):  # --kill-sessions ended it
        session.execute("SELECT 1")
    session.close()
    for s in (slugs[0], slugs[2]):
        with pytest.raises(psycopg.OperationalError):
            connect_as(old[s]).close()
        connect_as(own.fleet.credentials(s)).close()
    again = run_cli(test_fleet, "tenant", "credentials", "--rotate", "--all", "--json",
                    "--yes", config=own.config_path)
    assert again.returncode == 0, again.stderr
    for s in slugs:
        with pytest.raises(psycopg.OperationalError):
            connect_as(old[s]).close()
        connect_as(own.fleet.credentials(s)).close()


def test_one_tenant_rotation_can_end_the_old_sessions(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    old = _tenant(own, slug)
    kept, ended = connect_as(old, autocommit=True), connect_as(old, autocommit=True)
    proc = run_cli(test_fleet, "tenant", "credentials", slug, "--rotate", "--json",
                   config=own.config_path)
    assert proc.returncode == 0, proc.stderr
    kept.execute("SELECT 1")  # without --kill-sessions an open session stays
    kept.close()
    proc = run_cli(test_fleet, "tenant", "credentials", slug, "--rotate", "--kill-sessions",
                   "--json", config=own.config_path)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(psycopg.OperationalError):  # ended by the rotation
        ended.execute("SELECT 1")
    ended.close()
    connect_as(json.loads(proc.stdout)["dsn"]).close()


def test_breach_drill_times_every_step(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                       slug: str, tmp_path: object) -> None:
    from pathlib import Path

    from orchestrator.adapters.crypto.masterkey import write_key_file
    from orchestrator.api import Fleet
    from orchestrator.config import load_config

    own = own_catalog
    old = _tenant(own, slug)
    g = cli_json(test_fleet, own, "access", "grant", slug, "--to", "sam", "--ttl", "1h",
                 "--reason", "r")
    assert isinstance(g, dict)
    new_key = Path(str(tmp_path)) / "new.key"
    write_key_file(new_key)
    report = cli_json(test_fleet, own, "breach", "drill", "--new-key-file", str(new_key),
                      "--yes")
    assert isinstance(report, dict)
    assert [s["step"] for s in report["steps"]] == [
        "rotate tenant passwords", "revoke support grants", "re-wrap under the new master key"]
    assert all(isinstance(s["seconds"], float) for s in report["steps"])
    assert [s["done"] for s in report["steps"]][:2] == [1, 1]
    with pytest.raises(psycopg.OperationalError):
        connect_as(old).close()
    with pytest.raises(psycopg.OperationalError):
        connect_as(g["dsn"]).close()
    text = own.config_path.read_text()
    old_key = str(test_fleet.state_dir / "master.key")
    assert old_key in text
    new_cfg = Path(str(tmp_path)) / "new.toml"
    new_cfg.write_text(text.replace(old_key, str(new_key)))
    fleet = Fleet(load_config(new_cfg))
    try:
        connect_as(fleet.credentials(slug)).close()
    finally:
        fleet.close()
