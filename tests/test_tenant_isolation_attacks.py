"""Attack and bad-input suite, part 2: a tenant's own login role attacks from inside
its own database. It tries to reach another tenant's database, the catalog and the
maintenance/template databases; to read role secrets and server files; to create
databases and roles or become someone else; to run programs through COPY; to load
dblink / postgres_fdw or reach other databases through them; to see or kill other
sessions. Every attempt must fail with the specific refusal (a privilege error, a
refused connection), and nothing may change on any server.

The attacker lives on eu-central-1, the server that also holds the catalog, next to
a victim tenant; another victim lives in ap-south.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.adapters.postgres import revision_marks
from orchestrator.api import Fleet
from orchestrator.domain.names import CATALOG_DB, TEMPLATE_DB
from tests.conftest import PgFleet, connect_as, private_catalog

ALL_SERVERS = ("eu-central-1", "eu-central-2", "ap-south-1")
DENIED = psycopg.errors.InsufficientPrivilege
# dblink and postgres_fdw reach other databases; file_fdw reads server files
REMOTE_EXTENSIONS = ("dblink", "postgres_fdw", "file_fdw")


@dataclass
class Scene:
    fleet: Fleet
    attacker: dict[str, str]  # tenant_json plus "dsn"
    neighbour: dict[str, str]  # same server as the attacker
    faraway: dict[str, str]  # another region
    secret: str  # a value only the victims' tables hold


def _tenant(fleet: Fleet, slug: str, region: str, secret: str) -> dict[str, str]:
    res = fleet.provision(slug, region)
    with connect_as(res.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) VALUES (%s, %s)",
                     (f"{slug}@victim.test", secret))
    return {**res.tenant, "dsn": res.dsn}


@pytest.fixture(scope="module")
def scene(test_fleet: PgFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    # A catalog of this module's own: placement then starts from empty servers and
    # alternates eu-central-1, eu-central-2, eu-central-1 (ties go by name), so the
    # attacker and its neighbour both land on the server that holds the catalogs.
    tag = uuid.uuid4().hex[:6]
    secret = f"victim-secret-{uuid.uuid4().hex}"
    with private_catalog(test_fleet, tmp_path_factory.mktemp("isolation") / "own.toml") as own:
        fleet = own.fleet
        made = [_tenant(fleet, f"iso{tag}_{i}", "eu-central", secret) for i in range(3)]
        assert [t["server"] for t in made] == ["eu-central-1", "eu-central-2", "eu-central-1"]
        faraway = _tenant(fleet, f"iso{tag}_far", "ap-south", secret)
        with connect_as(made[0]["dsn"], autocommit=True) as conn:
            conn.execute("DELETE FROM customers")  # the attacker holds no secret itself
        yield Scene(fleet, made[0], made[2], faraway, secret)


@pytest.fixture
def attacker(scene: Scene) -> Iterator[psycopg.Connection]:
    with connect_as(scene.attacker["dsn"], autocommit=True) as conn:
        yield conn


def _server_state(test_fleet: PgFleet) -> dict[str, tuple[frozenset[str], ...]]:
    out = {}
    for server in ALL_SERVERS:
        with psycopg.connect(test_fleet.admin_dsn(server), autocommit=True) as conn:
            out[server] = (
                frozenset(r[0] for r in conn.execute("SELECT datname FROM pg_database")),
                frozenset(r[0] for r in conn.execute("SELECT rolname FROM pg_roles")),
                frozenset(r[0] for r in conn.execute(
                    "SELECT rolname || ':' || rolsuper || rolcreatedb || rolcreaterole "
                    "|| rolreplication || rolbypassrls || rolcanlogin FROM pg_roles")))
    return out


@pytest.fixture
def nothing_changes(test_fleet: PgFleet, scene: Scene) -> Iterator[None]:
    """No database, role or role attribute appears or changes anywhere, and the
    victims' data is intact."""
    before = _server_state(test_fleet)
    yield
    assert _server_state(test_fleet) == before
    for victim in (scene.neighbour, scene.faraway):
        with connect_as(victim["dsn"]) as conn:
            assert conn.execute("SELECT name FROM customers").fetchall() == [(scene.secret,)]


def denied(conn: psycopg.Connection, statement: str, needle: str = "permission denied",
           params: tuple[object, ...] | None = None) -> str:
    with pytest.raises(DENIED) as err:
        conn.execute(statement, params)  # type: ignore[arg-type]
    message = str(err.value)
    assert needle in message, (statement, message)
    return message


# -- connecting anywhere else ------------------------------------------------------------


def test_the_role_may_connect_to_its_own_database_and_nothing_else(
        test_fleet: PgFleet, scene: Scene) -> None:
    """Asked of the server itself, for every database that exists right now (other
    tests' tenants, scratch and side copies included): the attacker's role holds
    CONNECT on its own database only, and exists on its own server only."""
    role, own = scene.attacker["role"], scene.attacker["database"]
    for server in ALL_SERVERS:
        with psycopg.connect(test_fleet.admin_dsn(server), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                                  (role,)).fetchone() is not None
            assert exists == (server == scene.attacker["server"]), server
            public = {r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn AND "
                "has_database_privilege('public', datname, 'CONNECT')")}
            assert public == set(), (server, public)
            if exists:
                reachable = {r[0] for r in conn.execute(
                    "SELECT datname FROM pg_database WHERE datallowconn AND "
                    "has_database_privilege(%s, datname, 'CONNECT')", (role,))}
                assert reachable == {own}, reachable


@pytest.mark.parametrize("target", ["neighbour", "faraway", CATALOG_DB, TEMPLATE_DB,
                                    "postgres", "template0", "template1"])
def test_connecting_to_another_database_is_refused(test_fleet: PgFleet, scene: Scene,
                                                   target: str) -> None:
    info = conninfo_to_dict(scene.attacker["dsn"])
    dbname = {"neighbour": scene.neighbour["database"],
              "faraway": scene.faraway["database"]}.get(target, target)
    for server in ALL_SERVERS:
        dsn = make_conninfo(test_fleet.admin_dsn(server), user=info["user"],
                            password=info["password"], dbname=dbname, passfile="")
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(dsn, connect_timeout=5).close()
        message = str(err.value)
        if server != scene.attacker["server"]:
            assert "password authentication failed" in message, message  # no such role
        elif dbname in (TEMPLATE_DB, "template0"):
            assert "not currently accepting connections" in message, message
        elif dbname == scene.faraway["database"]:
            assert "does not exist" in message, message
        else:
            assert f'permission denied for database "{dbname}"' in message, message


# -- secrets and files of the server -------------------------------------------------------


def test_role_secrets_and_server_files_are_out_of_reach(attacker: psycopg.Connection,
                                                        nothing_changes: None) -> None:
    denied(attacker, "SELECT rolname, rolpassword FROM pg_authid", "table pg_authid")
    denied(attacker, "SELECT usename, passwd FROM pg_shadow", "view pg_shadow")
    # pg_roles is readable by design, with the verifiers masked
    shown = {r[0] for r in attacker.execute("SELECT rolpassword FROM pg_roles")}
    assert shown <= {"********", None}, shown
    for statement in ("SELECT pg_read_file('pg_hba.conf')",
                      "SELECT pg_read_file('/etc/passwd')",
                      "SELECT pg_read_binary_file('global/pg_control')",
                      "SELECT pg_ls_dir('.')",
                      "SELECT pg_stat_file('postgresql.conf')",
                      "SELECT * FROM pg_file_settings",
                      "SELECT * FROM pg_hba_file_rules",
                      "SELECT lo_import('/etc/passwd')",
                      "SELECT current_setting('data_directory')"):
        denied(attacker, statement)


# -- creating, becoming someone else ------------------------------------------------------


def test_no_database_no_role_no_escalation(attacker: psycopg.Connection, scene: Scene,
                                          nothing_changes: None) -> None:
    me, owner = scene.attacker["role"], scene.attacker["owner_role"]
    evil = f"evil_{uuid.uuid4().hex[:6]}"
    ident = sql.Identifier
    denied(attacker, f"CREATE DATABASE {evil}", "permission denied to create database")
    denied(attacker, f"CREATE ROLE {evil}", "permission denied to create role")
    denied(attacker, f"CREATE USER {evil} PASSWORD 'x'", "permission denied to create role")
    for attribute in ("SUPERUSER", "CREATEDB", "CREATEROLE", "REPLICATION", "BYPASSRLS"):
        denied(attacker, sql.SQL("ALTER ROLE {} " + attribute).format(ident(me))
               .as_string(attacker), "permission denied to alter role")
    for role in (owner, scene.neighbour["role"], scene.neighbour["owner_role"],
                 "tenantctl_admin", "pg_read_server_files", "pg_execute_server_program",
                 "pg_signal_backend"):
        denied(attacker, sql.SQL("SET ROLE {}").format(ident(role)).as_string(attacker),
               "permission denied to set role")
        denied(attacker, sql.SQL("GRANT {} TO {}").format(ident(role), ident(me))
               .as_string(attacker), "permission denied to grant role")
    denied(attacker, "SET SESSION AUTHORIZATION tenantctl_admin",
           "permission denied to set session authorization")
    denied(attacker, "ALTER SYSTEM SET log_statement = 'none'", "permission denied")
    denied(attacker, sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
        ident(scene.attacker["database"]), ident(me)).as_string(attacker),
        "must be owner of database")
    denied(attacker, sql.SQL("ALTER DATABASE {} SET search_path = evil").format(
        ident(scene.attacker["database"])).as_string(attacker), "must be owner of database")
    # nor fake the schema revision its database is marked with (what status reads)
    for database in (scene.attacker["database"], scene.neighbour["database"]):
        denied(attacker, sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            ident(database), sql.Literal(revision_marks.mark("0001_fake")))
            .as_string(attacker), "must be owner of database")
    denied(attacker, "CREATE SCHEMA evil")
    denied(attacker, "CREATE FUNCTION public.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    denied(attacker, "CREATE TABLE public.evil (id int)")


# -- programs, files and libraries -----------------------------------------------------------


def test_copy_to_program_and_server_files_are_refused(attacker: psycopg.Connection,
                                                      nothing_changes: None) -> None:
    marker = Path(f"/tmp/tenantctl-pwned-{uuid.uuid4().hex}")
    attacker.execute("CREATE TEMP TABLE loot (line text)")  # TEMPORARY is granted
    denied(attacker, f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
           "permission denied to COPY to or from an external program")
    denied(attacker, "COPY loot FROM PROGRAM 'cat /etc/passwd'",
           "permission denied to COPY to or from an external program")
    denied(attacker, "COPY loot FROM '/etc/passwd'", "permission denied to COPY from a file")
    denied(attacker, f"COPY (SELECT 1) TO '{marker}'", "permission denied to COPY to a file")
    denied(attacker, f"SELECT lo_export(lo_create(0), '{marker}')",
           "permission denied for function lo_export")
    assert not marker.exists()
    denied(attacker, "LOAD 'dblink'", 'access to library "dblink" is not allowed')
    denied(attacker, "CREATE FUNCTION pg_temp.connect(text) RETURNS text LANGUAGE c "
           "AS 'dblink', 'dblink_connect'", "permission denied for language c")


def test_no_way_to_other_databases_through_dblink_or_foreign_data_wrappers(
        test_fleet: PgFleet, scene: Scene, attacker: psycopg.Connection,
        nothing_changes: None) -> None:
    # the extension files are installed: the refusal below is a privilege, not luck
    available = {r[0] for r in attacker.execute(
        "SELECT name FROM pg_available_extensions WHERE name = ANY(%s)",
        (list(REMOTE_EXTENSIONS),))}
    assert available == set(REMOTE_EXTENSIONS), available
    for ext in REMOTE_EXTENSIONS:
        denied(attacker, f"CREATE EXTENSION {ext}",
               f'permission denied to create extension "{ext}"')
    # nor a trusted extension: the tenant has no CREATE on its database
    denied(attacker, "CREATE EXTENSION hstore", "permission denied")
    denied(attacker, "CREATE FOREIGN DATA WRAPPER evil",
           'permission denied to create foreign-data wrapper "evil"')
    assert attacker.execute("SELECT array_agg(extname) FROM pg_extension").fetchone() == (
        ["plpgsql"],)
    assert attacker.execute("SELECT (SELECT count(*) FROM pg_foreign_data_wrapper), "
                            "(SELECT count(*) FROM pg_foreign_server)").fetchone() == (0, 0)
    assert attacker.execute("SELECT to_regproc('dblink_connect')").fetchone() == (None,)
    with pytest.raises(psycopg.errors.FeatureNotSupported):
        attacker.execute(sql.SQL("SELECT name FROM {}.public.customers").format(
            sql.Identifier(scene.neighbour["database"])))
    # nor can anything tenantctl itself connects as put them there: the tenant's owner
    # (what migrations run as) and the admin role are no superusers either
    owner_dsn = make_conninfo(test_fleet.admin_dsn(scene.attacker["server"]),
                              dbname=scene.attacker["database"])
    with psycopg.connect(owner_dsn) as admin:
        for ext in REMOTE_EXTENSIONS:
            denied(admin, f"CREATE EXTENSION {ext}",
                   f'permission denied to create extension "{ext}"')
            admin.rollback()
            admin.execute(sql.SQL("SET ROLE {}").format(
                sql.Identifier(scene.attacker["owner_role"])))
            denied(admin, f"CREATE EXTENSION {ext}",
                   f'permission denied to create extension "{ext}"')
            admin.rollback()


# -- other sessions ---------------------------------------------------------------------------


def test_other_sessions_cannot_be_read_or_ended(test_fleet: PgFleet, scene: Scene,
                                               attacker: psycopg.Connection,
                                               nothing_changes: None) -> None:
    marker = f"query-text-{uuid.uuid4().hex}"
    with connect_as(scene.neighbour["dsn"], autocommit=True) as victim, \
            psycopg.connect(test_fleet.admin_dsn(scene.attacker["server"]),
                            autocommit=True) as admin:
        victim.execute(f"SELECT '{marker}'")  # now idle, its last query kept in the stats
        admin.execute(f"SELECT '{marker}'")
        victim_pid, admin_pid = victim.info.backend_pid, admin.info.backend_pid
        seen = attacker.execute(
            "SELECT pid, coalesce(query, ''), coalesce(datname, '') FROM pg_stat_activity"
        ).fetchall()
        assert not [r for r in seen if marker in r[1]], seen
        shown = {pid: query for pid, query, _ in seen}
        assert shown.get(victim_pid) in ("<insufficient privilege>", None), shown
        for pid in (victim_pid, admin_pid):
            denied(attacker, "SELECT pg_terminate_backend(%s)",
                   "permission denied to terminate process", (pid,))
            denied(attacker, "SELECT pg_cancel_backend(%s)",
                   "permission denied to cancel query", (pid,))
        assert victim.execute("SELECT 1").fetchone() == (1,)
        assert admin.execute("SELECT 1").fetchone() == (1,)
