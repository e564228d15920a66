"""Provisioning against real Postgres: regions, placement, isolation, privileges."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import select

from orchestrator.adapters.catalog.models import AuditEvent, TenantCredential
from orchestrator.api import Fleet
from orchestrator.config import load_config
from orchestrator.domain.names import CATALOG_DB, TEMPLATE_DB
from tests.conftest import PgFleet, connect_as, mark_and_version, run_cli


def test_provision_in_each_region(fleet: Fleet, slug: str) -> None:
    for region in ("eu-central", "ap-south"):
        res = fleet.provision(f"{slug}_{region[:2]}", region)
        t = res.tenant
        assert t["state"] == "active" and t["region"] == region
        assert fleet.cfg.server(t["server"]).region == region
        assert t["revision"] == fleet.target_revision(region)
        with connect_as(res.dsn) as conn:
            assert conn.execute("SELECT current_user, current_database()").fetchone() == (
                t["role"], t["database"])
            assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (
                fleet.target_revision(region),)


def test_placement_spreads_a_region_over_its_servers(fleet: Fleet, slug: str) -> None:
    before = {s.name: s.tenants for s in fleet.servers("eu-central")}
    for i in range(4):
        fleet.provision(f"{slug}_p{i}", "eu-central")
    after = {s.name: s.tenants for s in fleet.servers("eu-central")}
    added = {name: after[name] - before[name] for name in after}
    assert set(added) == {"eu-central-1", "eu-central-2"}
    assert sum(added.values()) == 4
    # least-loaded first: the two servers end at most one tenant apart, or the
    # emptier one took them all
    assert abs(after["eu-central-1"] - after["eu-central-2"]) <= max(
        1, abs(before["eu-central-1"] - before["eu-central-2"]) - 4)


def test_password_is_strong_and_only_stored_wrapped(fleet: Fleet, slug: str) -> None:
    res = fleet.provision(slug, "ap-south")
    password = psycopg.conninfo.conninfo_to_dict(res.dsn)["password"]
    assert len(password) >= 43  # 32 random bytes, url-safe base64
    with fleet.catalog.session() as s:
        wrapped = s.scalars(select(TenantCredential.password_wrapped)).all()
        assert all(password not in w for w in wrapped)
        events = s.scalars(select(AuditEvent).where(AuditEvent.tenant == slug)).all()
        assert {e.action for e in events} >= {"tenant.provision.start", "tenant.provision"}
        assert all(password not in str(e.detail) for e in events)


def _connect_fails(dsn: str) -> str:
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(dsn, connect_timeout=5).close()
    return str(err.value)


def test_tenant_isolation(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    a = fleet.provision(f"{slug}_a", "eu-central")
    b = fleet.provision(f"{slug}_b", "eu-central")
    a_info = psycopg.conninfo.conninfo_to_dict(a.dsn)
    # A's role cannot reach B's database, the catalog, the template or postgres,
    # wherever they live
    for server in ("eu-central-1", "eu-central-2"):
        for db in (b.tenant["database"], CATALOG_DB, TEMPLATE_DB, "postgres", "template1"):
            target = psycopg.conninfo.make_conninfo(
                test_fleet.admin_dsn(server), user=a_info["user"],
                password=a_info["password"], dbname=db, passfile="")
            msg = _connect_fails(target)
            if server == a.tenant["server"]:
                assert "permission denied" in msg or "does not exist" in msg or \
                    "not currently accepting" in msg, msg
            else:  # the role does not even exist on the other server
                assert "password authentication failed" in msg, msg
    with connect_as(a.dsn, autocommit=True) as conn:
        # DML on its own tables works
        conn.execute("INSERT INTO warehouses (code, name) VALUES ('W1', 'one')")
        assert conn.execute("SELECT count(*) FROM warehouses").fetchone() == (1,)
        conn.execute("UPDATE warehouses SET name = 'uno'")
        conn.execute("DELETE FROM warehouses")
        # DDL does not
        for stmt in ("CREATE TABLE evil (id int)", "DROP TABLE warehouses",
                     "ALTER TABLE warehouses ADD COLUMN x int", "TRUNCATE warehouses",
                     "CREATE SCHEMA evil"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(stmt)
        # it may read its schema revision but never set it
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE alembic_version SET version_num = 'forged'")
        # without grant option, Postgres only warns "no privileges were granted"
        conn.execute("GRANT SELECT ON warehouses TO PUBLIC")
        assert conn.execute("SELECT has_table_privilege('public', 'warehouses', 'SELECT')"
                            ).fetchone() == (False,)
        # nor can it hand itself more rights
        row = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
            "FROM pg_roles WHERE rolname = current_user").fetchone()
        assert row == (False, False, False, False, False)
        owner = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall()
        assert owner == [(a.tenant["owner_role"],)]


def test_public_and_ungranted_roles_cannot_connect(fleet: Fleet, test_fleet: PgFleet,
                                                   slug: str) -> None:
    res = fleet.provision(slug, "ap-south")
    db = res.tenant["database"]
    stranger = f"stranger_{slug}"
    with psycopg.connect(test_fleet.admin_dsn("ap-south-1"), autocommit=True) as conn:
        assert conn.execute("SELECT has_database_privilege('public', %s, 'CONNECT')",
                            (db,)).fetchone() == (False,)
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'stranger-pass-123'").format(
            sql.Identifier(stranger)))
    try:
        target = psycopg.conninfo.make_conninfo(
            test_fleet.admin_dsn("ap-south-1"), user=stranger, password="stranger-pass-123",
            dbname=db, passfile="")
        assert "permission denied" in _connect_fails(target)
    finally:
        with psycopg.connect(test_fleet.admin_dsn("ap-south-1"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(stranger)))


def test_admin_role_is_not_superuser(test_fleet: PgFleet) -> None:
    with psycopg.connect(test_fleet.admin_dsn("eu-central-1")) as conn:
        row = conn.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
                           "WHERE rolname = current_user").fetchone()
    assert row == (False, True, True)


def test_naive_path_gives_the_same_result(test_fleet: PgFleet, slug: str) -> None:
    fleet = Fleet(load_config(test_fleet.state_dir / "notemplate.toml"))
    try:
        res = fleet.provision(slug, "ap-south")
    finally:
        fleet.close()
    assert res.via_template is False
    assert res.tenant["revision"] == fleet.target_revision("ap-south")
    # migrated from an empty database: marked with what the migration reached
    assert mark_and_version(fleet, slug) == (res.tenant["revision"],) * 2
    with connect_as(res.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) VALUES ('a@b.c', 'A')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE evil (id int)")
        owners = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall()
        assert owners == [(res.tenant["owner_role"],)]


def test_template_path_is_used_and_template_stays_closed(fleet: Fleet, test_fleet: PgFleet,
                                                         slug: str) -> None:
    res = fleet.provision(slug, "eu-central")
    assert res.via_template is True
    # a clone carries no comment of its template's: the take-over marks it
    assert mark_and_version(fleet, slug) == (res.tenant["revision"],) * 2
    with psycopg.connect(test_fleet.admin_dsn(res.tenant["server"])) as conn:
        row = conn.execute("SELECT datallowconn, pg_get_userbyid(datdba) FROM pg_database "
                           "WHERE datname = %s", (TEMPLATE_DB,)).fetchone()
        assert row is not None and row[0] is False
        # the template database is not handed to any tenant by REASSIGN OWNED
        assert row[1] == "tenantctl_admin"


def test_credentials_show_and_rotate(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    first = fleet.provision(slug, "ap-south").dsn
    assert fleet.credentials(slug) == first
    rotated = run_cli(test_fleet, "tenant", "credentials", slug, "--rotate", "--json")
    assert rotated.returncode == 0, rotated.stderr
    import json

    new = json.loads(rotated.stdout)["dsn"]
    assert new != first
    assert "password authentication failed" in _connect_fails(first)
    with connect_as(new) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert fleet.credentials(slug) == new


def test_psql_as_login_and_owner(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    fleet.provision(slug, "eu-central")
    who = run_cli(test_fleet, "tenant", "psql", slug, "-c", "SELECT current_user")
    assert who.returncode == 0, who.stderr
    assert f"tenant_{slug}" in who.stdout
    denied = run_cli(test_fleet, "tenant", "psql", slug, "-c", "CREATE TABLE x (id int)")
    assert denied.returncode != 0 and "permission denied" in denied.stderr
    owner = run_cli(test_fleet, "tenant", "psql", slug, "--owner", "-c",
                    "CREATE TABLE notes (id int); SELECT current_user")
    assert owner.returncode == 0, owner.stderr
    assert f"owner_{slug}" in owner.stdout
    # future tables get the login role's DML through default privileges
    ins = run_cli(test_fleet, "tenant", "psql", slug, "-c", "INSERT INTO notes VALUES (1)")
    assert ins.returncode == 0, ins.stderr
    with fleet.catalog.session() as s:
        actions = s.scalars(select(AuditEvent.detail).where(
            AuditEvent.tenant == slug, AuditEvent.action == "tenant.psql")
            .order_by(AuditEvent.id)).all()  # without ORDER BY, any order may come back
    assert [d["role"] for d in actions] == ["login", "login", "owner", "login"]


def test_show_and_list_json(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    import json

    fleet.provision(slug, "ap-south")
    show = run_cli(test_fleet, "tenant", "show", slug, "--json")
    assert show.returncode == 0, show.stderr
    data = json.loads(show.stdout)
    for key in ("slug", "region", "server", "database", "role", "state", "revision",
                "created_at"):
        assert key in data
    assert data["slug"] == slug and data["state"] == "active"
    assert "password" not in show.stdout
    listed = json.loads(run_cli(test_fleet, "tenant", "list", "--region", "ap-south",
                                "--json").stdout)
    assert slug in {t["slug"] for t in listed}
    assert all(t["region"] == "ap-south" for t in listed)
    regions = json.loads(run_cli(test_fleet, "region", "list", "--json").stdout)
    eu = next(r for r in regions if r["region"] == "eu-central")
    assert {s["name"] for s in eu["servers"]} == {"eu-central-1", "eu-central-2"}
