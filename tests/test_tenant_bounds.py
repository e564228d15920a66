"""What a tenant can do to its own role and to its server (issue 20: High 1, Medium 8,
Medium 11), tried through the tenant's own connection string on real clusters.

- A tenant's login role has a CONNECTION LIMIT: a loop of connections with its DSN
  stops there; the neighbours, `doctor`, backups and `tenant suspend` go on, and
  suspend ends the flood. When tenants do fill a server, the admin still gets in
  through its reserved connections (Postgres >= 16, set by the local fleet).
- Time and space bounds by default: statement_timeout, idle_in_transaction_session_
  timeout and work_mem are defaults a session may change; temp_file_limit and the
  connection limit are bounds it cannot. The hold takes TEMPORARY away.
- A tenant may change its own password and role settings (Postgres lets every role
  do that); `doctor` sees it and `doctor --fix` puts tenantctl's back.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from backups import service as pipeline
from orchestrator.adapters.catalog.db import Catalog, with_dbname
from orchestrator.adapters.postgres import spare_pool
from orchestrator.api import Fleet
from orchestrator.config import TenantBounds, load_config, parse_config
from orchestrator.devfleet import localfleet
from orchestrator.domain.errors import ConfigError
from orchestrator.domain.names import ADMIN_ROLE
from orchestrator.services import doctor, lifecycle, report, spares
from tests.conftest import OwnCatalog, connect_as

DEFAULTS = TenantBounds()
FLOOD_CAP = 400  # a hostile loop, but a bounded one


def flood(dsn: str, stack: ExitStack) -> tuple[list[psycopg.Connection], str]:
    """Open connections with ``dsn`` until the server refuses one (at most FLOOD_CAP);
    every one is closed when ``stack`` closes. Returns them and the refusal."""
    conns: list[psycopg.Connection] = []
    for _ in range(FLOOD_CAP):
        try:
            conn = psycopg.connect(dsn, connect_timeout=5, autocommit=True)
        except psycopg.OperationalError as exc:
            return conns, str(exc)
        stack.callback(conn.close)
        conns.append(conn)
    raise AssertionError(f"{FLOOD_CAP} connections and no refusal: nothing bounds a tenant")


def alive(conn: psycopg.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def role_row(admin_dsn: str, role: str) -> tuple[int, set[str]]:
    """(CONNECTION LIMIT, every role setting as name=value, @db: for one database)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT r.rolconnlimit, coalesce((SELECT array_agg(CASE WHEN s.setdatabase = 0 "
            "THEN c ELSE '@' || s.setdatabase || ':' || c END) FROM pg_db_role_setting s "
            "CROSS JOIN unnest(s.setconfig) c WHERE s.setrole = r.oid), '{}') "
            "FROM pg_roles r WHERE r.rolname = %s", (role,)).fetchone()
    assert row is not None, f"no role {role}"
    return row[0], set(row[1])


def configured(bounds: TenantBounds) -> set[str]:
    return {f"{k}={v}" for k, v in bounds.role_settings.items()}


def with_tenants_options(config_path: Path, path: Path, **options: str | int) -> Fleet:
    """A Fleet whose config is ``config_path``'s with these [tenants] options."""
    lines = "".join(f"{k} = {v!r}\n" if isinstance(v, str) else f"{k} = {v}\n"
                    for k, v in options.items())
    text = config_path.read_text()
    assert "\n[tenants]\n" in text
    path.write_text(text.replace("\n[tenants]\n", "\n[tenants]\n" + lines, 1))
    return Fleet(load_config(path))


# -- configuration ---------------------------------------------------------------------


def _config(tenants: dict[str, object]) -> dict[str, object]:
    return {"catalog": {"dsn": "host=x dbname=c"}, "master_key": {"file": "k"},
            "tenants": tenants,
            "regions": {"eu": {"backup_store": "file:///tmp/x",
                               "servers": [{"name": "s1", "admin_dsn": "host=x"}]}}}


def test_bounds_have_defaults_and_bad_values_are_one_line_errors() -> None:
    cfg = parse_config(_config({}), Path("/etc/tenantctl.toml"))
    assert cfg.bounds == DEFAULTS
    assert DEFAULTS.connection_limit > 0 and DEFAULTS.temp_file_limit != "-1"
    cfg = parse_config(_config({"connection_limit": 50, "statement_timeout": "0",
                                "temp_file_limit": "-1", "work_mem": "64kB"}), Path("t"))
    assert (cfg.bounds.connection_limit, cfg.bounds.statement_timeout,
            cfg.bounds.temp_file_limit, cfg.bounds.work_mem) == (50, "0", "-1", "64kB")
    bads: list[dict[str, object]] = [
                {"connection_limit": 0}, {"connection_limit": "20"},
                {"support_connection_limit": -1}, {"statement_timeout": 300},
                {"statement_timeout": "5 minutes"}, {"temp_file_limit": "1 GB"},
                {"work_mem": "1kB"}, {"idle_in_transaction_session_timeout": "3000000d"},
                {"work_mem": "'; DROP ROLE x; --"}, {"connection_limt": 5}]
    for bad in bads:
        with pytest.raises(ConfigError) as err:
            parse_config(_config(bad), Path("t"))
        assert "\n" not in str(err.value) and "tenants." in str(err.value), bad


# -- bounds at provisioning, and what a tenant can change ------------------------------


def test_a_new_tenant_is_bounded_and_cannot_lift_its_hard_bounds(
        own_catalog: OwnCatalog, slug: str, tmp_path: Path) -> None:
    fleet = with_tenants_options(own_catalog.config_path, tmp_path / "bounds.toml",
                                 temp_file_limit="1MB", connection_limit=7)
    try:
        dsn = fleet.provision(slug, "eu-central").dsn
        tenant = fleet.get_tenant(slug)
        admin = fleet.cfg.server(tenant.server).admin_dsn
        bounds = fleet.cfg.bounds
        assert role_row(admin, tenant.login_role) == (7, configured(bounds))
        with connect_as(dsn, autocommit=True) as conn:
            shown = {name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                     for name in bounds.role_settings}
            assert shown == {"statement_timeout": "5min",
                             "idle_in_transaction_session_timeout": "5min",
                             "temp_file_limit": "1MB", "work_mem": "16MB"}
            # hard: a superuser-only setting, and a role attribute
            for stmt in ("SET temp_file_limit = -1",
                         f"ALTER ROLE {tenant.login_role} SET temp_file_limit = -1",
                         f"ALTER ROLE {tenant.login_role} RESET temp_file_limit",
                         f"ALTER ROLE {tenant.login_role} CONNECTION LIMIT -1"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(stmt)
            # a sort spilling more than temp_file_limit fails, whatever work_mem it asks
            conn.execute("SET work_mem = '64kB'")  # a default: the session may change it
            with pytest.raises(psycopg.errors.ConfigurationLimitExceeded,
                               match="temp_file_limit"):
                conn.execute("SELECT count(*) FROM (SELECT g::text || repeat('x', 50) "
                             "FROM generate_series(1, 200000) g ORDER BY 1 DESC) s")
            # a default: statement_timeout too
            conn.execute("SET statement_timeout = 0")
        assert role_row(admin, tenant.login_role) == (7, configured(bounds))

        # tenantctl's own work (as the admin, SET ROLE to the owner) is not the
        # tenant's: the login role's settings do not apply to it
        with psycopg.connect(with_dbname(admin, tenant.database), autocommit=True) as conn:
            conn.execute(f'SET ROLE "{tenant.owner_role}"')
            assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
            assert conn.execute("SHOW temp_file_limit").fetchone() == ("-1",)
        assert role_row(admin, tenant.owner_role)[1] == set()
    finally:
        fleet.close()


def test_a_tenant_made_from_a_spare_is_bounded(own_catalog: OwnCatalog, slug: str,
                                               tmp_path: Path) -> None:
    """A spare's roles are made ahead, under other names: the bounds come with the
    tenant's login step, whichever way its roles were made."""
    fleet = with_tenants_options(own_catalog.config_path, tmp_path / "spares.toml",
                                 spare_databases=1, connection_limit=9)
    server = ""
    try:
        fleet.provision(slug, "ap-south")
        server = fleet.get_tenant(slug).server
        fleet.wait_for_refills()
        spares.fill(fleet, server)
        admin = fleet.cfg.server(server).admin_dsn
        with psycopg.connect(admin, autocommit=True) as conn:
            (spare,) = [x for x in spare_pool.list_spares(conn) if x.ready]
        fleet.provision(slug + "_s", "ap-south")
        tenant = fleet.get_tenant(slug + "_s")
        with psycopg.connect(admin, autocommit=True) as conn:
            assert spare.database not in {x.database for x in spare_pool.list_spares(conn)}
        assert role_row(admin, tenant.login_role) == (9, configured(fleet.cfg.bounds))
    finally:
        fleet.close()  # waits for the refill
        if server:
            spares.fill(fleet, server, want=0)  # none left behind on the shared servers


def test_the_hold_takes_temporary_tables_away_until_reactivation(
        fleet: Fleet, slug: str) -> None:
    dsn = fleet.provision(slug, "eu-central").dsn
    with connect_as(dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE scratch (x int)")
    lifecycle.cancel(fleet, slug, backup=False)
    with connect_as(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="temporary"):
            conn.execute("CREATE TEMP TABLE scratch (x int)")
        assert conn.execute("SELECT count(*) FROM products").fetchone() is not None
    lifecycle.reactivate(fleet, slug)
    with connect_as(dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE scratch (x int)")


# -- one tenant floods its server --------------------------------------------------------


def test_a_connection_flood_stops_at_the_limit_and_suspend_ends_it(
        fleet: Fleet, slug: str) -> None:
    dsn = fleet.provision(slug, "eu-central").dsn
    tenant = fleet.get_tenant(slug)
    neighbour = fleet.provision(slug + "_n", tenant.region).dsn
    with ExitStack() as stack:
        conns, refusal = flood(dsn, stack)
        assert len(conns) == DEFAULTS.connection_limit
        assert "too many connections for role" in refusal
        # everybody else goes on: a neighbour, a backup (as the admin), doctor
        with connect_as(neighbour) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pipeline.run_backup(fleet, slug).id
        mine = [x for x in doctor.run(fleet) if x.subject in (slug, tenant.server)]
        assert mine == []
        lifecycle.suspend(fleet, slug)
        assert not any(alive(c) for c in conns)
    lifecycle.resume(fleet, slug)
    with connect_as(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- a tenant changes its own role ---------------------------------------------------------


def test_a_tenant_that_changes_its_password_and_settings_is_found_and_repaired(
        healthy: Fleet, slug: str) -> None:
    fleet = healthy
    dsn = fleet.provision(slug, "eu-central").dsn
    tenant = fleet.get_tenant(slug)
    admin = fleet.cfg.server(tenant.server).admin_dsn
    assert report.check_isolation(fleet, [report.tenant_row(tenant)]).ok
    with connect_as(dsn, autocommit=True) as conn:
        role = tenant.login_role
        conn.execute(f"ALTER ROLE {role} SET statement_timeout = 0")
        conn.execute(f"ALTER ROLE {role} SET work_mem = '2GB'")
        conn.execute(f"ALTER ROLE {role} IN DATABASE {tenant.database} "
                     "SET idle_in_transaction_session_timeout = 0")
        conn.execute(f"ALTER ROLE {role} PASSWORD 'mine now'")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect_as(dsn).close()

    # the report's live probe no longer calls refusals isolation
    isolation = report.check_isolation(fleet, [report.tenant_row(tenant)])
    assert not isolation.ok
    assert any("cannot log in to its own database" in line for line in isolation.offenders)

    found = {x.code: x for x in doctor.run(fleet) if x.subject == slug}
    assert set(found) == {"login-password-changed", "role-bounds-differ"}, found
    assert "statement_timeout=0" in found["role-bounds-differ"].message
    assert "mine now" not in str(found)

    results = doctor.repair(fleet, None, confirm=lambda _: False)
    assert {r.finding.code: r.outcome for r in results if r.finding.subject == slug} == \
        {"login-password-changed": "fixed", "role-bounds-differ": "fixed"}
    with connect_as(dsn, autocommit=True) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("5min",)
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == \
            ("5min",)
    assert role_row(admin, tenant.login_role) == (DEFAULTS.connection_limit,
                                                  configured(DEFAULTS))
    assert report.check_isolation(fleet, [report.tenant_row(tenant)]).ok


def test_doctor_fix_bounds_a_tenant_made_before_the_bounds(healthy: Fleet, slug: str) -> None:
    fleet = healthy
    fleet.provision(slug, "ap-south")
    tenant = fleet.get_tenant(slug)
    admin = fleet.cfg.server(tenant.server).admin_dsn
    with psycopg.connect(admin, autocommit=True) as conn:  # as every role was made before
        conn.execute(f"ALTER ROLE {tenant.login_role} CONNECTION LIMIT -1")
        conn.execute(f"ALTER ROLE {tenant.login_role} RESET ALL")
    found = [x for x in doctor.run(fleet) if x.subject == slug]
    assert [x.code for x in found] == ["role-bounds-differ"]
    assert "connection limit -1" in found[0].message
    doctor.repair(fleet, None, confirm=lambda _: False)
    assert role_row(admin, tenant.login_role) == (DEFAULTS.connection_limit,
                                                  configured(DEFAULTS))


# -- a server that tenants fill: the admin's reserve -----------------------------------------


@dataclass
class SmallFleet:
    config_path: Path
    up_lines: list[str]
    superuser_dsn: str


@pytest.fixture(scope="module")
def small_fleet() -> Iterator[SmallFleet]:
    """A one-cluster local fleet with max_connections = 40, made as a fleet from
    before the admin's reserve was (its postgresql.conf has none): `local up` must
    add it. Its tenants may each open 100 connections, so one of them fills it."""
    state = Path(tempfile.mkdtemp(prefix="tenantctl-small-", dir="/tmp"))
    os.chmod(state, 0o755)
    cfg = None
    try:
        res = localfleet.init_local(state / "tenantctl.toml", state, pooler=False)
        text = res.config_path.read_text()
        text = text[:text.index("\n[regions.ap-south]")] + "\n"
        text = text.replace("\nspare_databases = 2 ", "\nconnection_limit = 100\n"
                            "spare_databases = 0 ", 1)
        # a port away from the ones `init --local` starts from (other local fleets)
        (old,) = [s.port for s in load_config(res.config_path).servers if s.region ==
                  "eu-central"]
        assert old is not None
        port = localfleet.free_ports(1, start=31000 + random.randrange(0, 400, 10))[0]
        text = text.replace(f":{old}/", f":{port}/").replace(f"port = {old}\n",
                                                              f"port = {port}\n")
        pgpass = state / "pgpass"
        password = localfleet.read_pgpass_password(pgpass, old, ADMIN_ROLE)
        assert password is not None
        localfleet.ensure_pgpass_entry(pgpass, port, ADMIN_ROLE, password)
        res.config_path.write_text(text)
        cfg = load_config(res.config_path)
        (server,) = cfg.servers
        assert server.data_dir is not None
        localfleet._initdb(cfg, server, localfleet._os_user())
        conf = server.data_dir / "postgresql.conf"
        lines = conf.read_text().splitlines()
        assert any(x.startswith("reserved_connections") for x in lines)
        conf.write_text("\n".join(x for x in lines if not x.startswith("reserved_connections"))
                        + "\nmax_connections = 40\n")
        up_lines = list(localfleet.up(cfg))
        catalog = Catalog(cfg)
        catalog.upgrade()
        catalog.sync_topology()
        catalog.dispose()
        su = (state / "secrets" / f"{server.name}.superuser").read_text().strip()
        yield SmallFleet(res.config_path, up_lines,
                         f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres "
                         f"password={su}")
    finally:
        if cfg is not None:
            list(localfleet.down(cfg))
        shutil.rmtree(state, ignore_errors=True)


def test_local_up_reserves_connections_for_the_admin_of_an_older_fleet(
        small_fleet: SmallFleet) -> None:
    assert any("restarted to reserve" in line for line in small_fleet.up_lines)
    fleet = Fleet(load_config(small_fleet.config_path))
    try:
        with fleet.server_connection("eu-central-1") as conn:
            assert conn.execute(
                "SELECT current_setting('reserved_connections')::int, "
                "pg_has_role('pg_use_reserved_connections', 'USAGE'), "
                "has_parameter_privilege('temp_file_limit', 'SET')").fetchone() == \
                (localfleet.RESERVED_CONNECTIONS, True, True)
        assert [x for x in doctor.run(fleet) if x.code.startswith("server-")] == []
    finally:
        fleet.close()


def test_a_flooded_server_still_lets_the_admin_suspend_the_flooder(
        small_fleet: SmallFleet) -> None:
    fleet = Fleet(load_config(small_fleet.config_path))
    try:
        dsn = fleet.provision("flooder", "eu-central").dsn
        neighbour = fleet.provision("neighbour", "eu-central").dsn
        with ExitStack() as stack:
            conns, refusal = flood(dsn, stack)
            # the tenant took every slot but the admin's (and the superuser's)
            assert "reserved for roles with privileges of the " \
                   "\"pg_use_reserved_connections\" role" in refusal, refusal
            with pytest.raises(psycopg.OperationalError, match="reserved"):
                connect_as(neighbour).close()
            # the admin still gets in: doctor (which says the server is full) ...
            codes = {x.code for x in doctor.run(fleet)}
            assert "server-connections" in codes and "server-reserve-missing" not in codes
            # ... and suspend, which ends the flood
            lifecycle.suspend(fleet, "flooder")
            assert not any(alive(c) for c in conns)
        with connect_as(neighbour) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        lifecycle.resume(fleet, "flooder")
    finally:
        fleet.close()


def test_doctor_reports_a_missing_reserve_and_temp_bound_and_local_up_restores_them(
        small_fleet: SmallFleet) -> None:
    fleet = Fleet(load_config(small_fleet.config_path))
    try:
        with psycopg.connect(small_fleet.superuser_dsn, autocommit=True) as su:
            su.execute(f"REVOKE pg_use_reserved_connections FROM {ADMIN_ROLE}")
            su.execute(f"REVOKE SET ON PARAMETER temp_file_limit FROM {ADMIN_ROLE}")
        found = {x.code: x for x in doctor.run(fleet)}
        assert "pg_use_reserved_connections" in found["server-reserve-missing"].message
        assert "GRANT pg_use_reserved_connections" in found["server-reserve-missing"].remedy
        assert "GRANT SET ON PARAMETER temp_file_limit" in \
            found["server-temp-file-limit-unbounded"].remedy
        # without the right, a sign-up leaves the hard temp bound out instead of failing
        fleet.provision("unbounded", "eu-central")
        tenant = fleet.get_tenant("unbounded")
        admin = fleet.cfg.server(tenant.server).admin_dsn
        assert role_row(admin, tenant.login_role)[1] == \
            configured(DEFAULTS) - {f"temp_file_limit={DEFAULTS.temp_file_limit}"}
        assert "role-bounds-differ" not in {x.code for x in doctor.run(fleet)}

        lines = list(localfleet.up(fleet.cfg))
        assert not any("reserve" in line for line in lines)  # only the grants were gone
        found = {x.code: x for x in doctor.run(fleet)}
        assert "server-reserve-missing" not in found
        assert "server-temp-file-limit-unbounded" not in found
        assert "lacks temp_file_limit=1GB" in found["role-bounds-differ"].message
        doctor.repair(fleet, None, confirm=lambda _: False)
        assert role_row(admin, tenant.login_role) == (100, configured(DEFAULTS))
        assert "role-bounds-differ" not in {x.code for x in doctor.run(fleet)}
    finally:
        fleet.close()
