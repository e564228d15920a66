"""Spare tenants (tenants.spare_databases): clones of a server's template with their
own owner and login roles, taken over and granted ahead of demand, that
provisioning renames into place. On the clean fleet, so `doctor` checks that
spares are never taken for orphans and that nothing is left behind."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from orchestrator.adapters.faults import InjectedFault
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import spare_pool
from orchestrator.api import Fleet
from orchestrator.config import load_config
from orchestrator.domain.names import tenant_names
from orchestrator.services import doctor, spares, templates
from tests.conftest import CleanFleet, mark_and_version, problems
from tests.test_doctor import cli, new_slug

SERVER, REGION = "eu-central-1", "eu-central"


def _oids(fleet: Fleet) -> dict[str, int]:
    """The server's spares and tenant databases by name → OID (a rename keeps the OID)."""
    with psycopg.connect(fleet.cfg.server(SERVER).admin_dsn, autocommit=True) as conn:
        return {r[0]: r[1] for r in conn.execute(
            "SELECT datname, oid::int FROM pg_database "
            "WHERE datname LIKE 'tenantctl\\_spare\\_%' OR datname LIKE 'tenant\\_%'")}


def _spares(fleet: Fleet) -> dict[str, int]:
    return {n: o for n, o in _oids(fleet).items() if n.startswith(spare_pool.SPARE_PREFIX)}


def _roles(fleet: Fleet, *names: str) -> dict[str, int]:
    """Roles by name → OID: the given ones, and every spare's."""
    with psycopg.connect(fleet.cfg.server(SERVER).admin_dsn, autocommit=True) as conn:
        return {r[0]: r[1] for r in conn.execute(
            "SELECT rolname, oid::int FROM pg_roles "
            "WHERE starts_with(rolname, %s) OR rolname = ANY(%s)",
            (spare_pool.SPARE_PREFIX, list(names)))}


@pytest.fixture
def pooled(healthy: Fleet) -> Iterator[Fleet]:
    """The clean fleet with two spares per server; the pool is emptied afterwards."""
    fleet = Fleet(dataclasses.replace(healthy.cfg, spare_databases=2))
    try:
        for sc in fleet.cfg.servers:  # spares are made only from an up-to-date template
            templates.build(fleet, sc.name, fleet.target_revision(sc.region))
            spares.fill(fleet, sc.name)
        assert len(_spares(fleet)) == 2
        yield fleet
    finally:
        fleet.close()
        for sc in fleet.cfg.servers:
            spares.fill(fleet, sc.name, want=0)
        assert _spares(fleet) == {}
        fleet.catalog.dispose()


def test_a_sign_up_takes_a_spare_and_the_pool_refills(pooled: Fleet) -> None:
    before = _spares(pooled)
    assert len(before) == 2
    assert all(n.startswith(spare_pool.spare_prefix(pooled.target_revision(REGION)))
               for n in before)
    spare_roles = _roles(pooled)
    assert len(spare_roles) == 4  # an owner and a login role per spare
    slug = new_slug("sp")
    pooled.provision(slug, REGION)
    t = pooled.get_tenant(slug)
    assert t.step is None and t.state == "active"
    # the tenant's database and roles ARE one spare's, renamed (same OIDs): nothing
    # was cloned, taken over or granted on the sign-up's path
    taken = next(s for s, oid in before.items() if oid == _oids(pooled)[t.database])
    own = spare_pool.Spare(taken).names
    roles = _roles(pooled, t.owner_role, t.login_role)
    assert roles[t.owner_role] == spare_roles[own.owner_role]
    assert roles[t.login_role] == spare_roles[own.login_role]
    assert own.owner_role not in roles and own.login_role not in roles
    pooled.close()  # waits for the refill it scheduled
    assert len(_spares(pooled)) == 2 and len(_roles(pooled)) == 4
    # and it is a tenant like any other: marked as its own, the owner owns its
    # schema, the login role has DML and nothing more, PUBLIC cannot connect
    with psycopg.connect(pooled.cfg.server(SERVER).admin_dsn, autocommit=True) as conn:
        marker = pgserver.role_marker(t.id, slug)
        assert pgserver.role_comment(conn, t.owner_role) == marker
        assert pgserver.role_comment(conn, t.login_role) == marker
        assert pgserver.database_owner(conn, t.database) == t.owner_role
    with psycopg.connect(pooled.credentials(slug)) as conn:
        conn.execute("INSERT INTO categories (name) VALUES ('x')")
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
                            "AND tableowner <> %s", (t.owner_role,)).fetchone() == (0,)
        assert conn.execute("SELECT has_database_privilege('public', current_database(), "
                            "'CONNECT')").fetchone() == (False,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE mine (id int)")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE alembic_version SET version_num = 'x'")
    assert t.revision == pooled.target_revision(REGION)
    # the spare's revision mark, written when it was built, is the tenant's now
    assert mark_and_version(pooled, slug) == (t.revision, t.revision)
    assert problems(doctor.run(pooled)) == []


def test_a_sign_up_that_finds_the_pool_empty_refills_it(pooled: Fleet) -> None:
    spares.fill(pooled, SERVER, want=0)
    slug = new_slug("sp")
    pooled.provision(slug, REGION)  # clones on demand
    assert _oids(pooled)[pooled.get_tenant(slug).database] not in _spares(pooled).values()
    pooled.close()
    assert len(_spares(pooled)) == 2


@pytest.mark.parametrize("step", ["spare.roles", "spare.cloned"])
def test_a_fill_that_died_half_way_is_never_taken_and_is_cleared(
        pooled: Fleet, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spares.fill(pooled, SERVER, want=0)
    monkeypatch.setenv("TENANTCTL_FAULT", step)
    monkeypatch.setenv("TENANTCTL_FAULT_MODE", "raise")
    with pytest.raises(InjectedFault):
        spares.fill(pooled, SERVER)
    monkeypatch.delenv("TENANTCTL_FAULT")
    half = _spares(pooled)
    assert len(half) == (1 if step == "spare.cloned" else 0)
    assert len(_roles(pooled)) == 2
    with psycopg.connect(pooled.cfg.server(SERVER).admin_dsn, autocommit=True) as conn:
        assert not spare_pool.claim(conn, tenant_names(new_slug("sp")), "x",
                                pooled.target_revision(REGION))
    assert spares.fill(pooled, SERVER) == 2
    assert set(_spares(pooled).values()).isdisjoint(half.values())
    assert len(_roles(pooled)) == 4  # the half-built spare's roles went with it


def test_spares_of_another_revision_are_never_used_and_get_dropped(pooled: Fleet) -> None:
    with psycopg.connect(pooled.cfg.server(SERVER).admin_dsn, autocommit=True) as conn:
        for name in list(_spares(pooled)):  # as if cloned from an older template
            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(name), sql.Identifier(
                    spare_pool.spare_prefix("0001_old") + name[-8:])))
    stale = _spares(pooled)
    stale_roles = _roles(pooled)
    slug = new_slug("sp")
    pooled.provision(slug, REGION)
    assert _oids(pooled)[pooled.get_tenant(slug).database] not in stale.values()
    pooled.wait_for_refills()
    spares.fill(pooled, SERVER)
    assert len(_spares(pooled)) == 2
    assert set(_spares(pooled).values()).isdisjoint(stale.values())
    assert set(_roles(pooled).values()).isdisjoint(stale_roles.values())


def test_killed_while_taking_a_spare_then_rerun(pooled: Fleet, clean_fleet: CleanFleet,
                                                tmp_path: Path) -> None:
    config = tmp_path / "tenantctl.toml"
    config.write_text(clean_fleet.config_path.read_text().replace(
        "\nspare_databases = 0 ", "\nspare_databases = 2 ", 1))
    assert load_config(config).spare_databases == 2
    own = CleanFleet(config)
    slug = new_slug("sp")
    killed = cli(own, "tenant", "create", slug, "--region", REGION,
                 env={"TENANTCTL_FAULT": "provision.spare"})
    assert killed.returncode == -9, killed.stderr
    again = cli(own, "tenant", "create", slug, "--region", REGION)
    assert again.returncode == 0, again.stdout + again.stderr
    with psycopg.connect(pooled.credentials(slug)) as conn:
        assert conn.execute("SELECT count(*) FROM products").fetchone() == (0,)
    assert problems(doctor.run(pooled)) == []


def test_racing_sign_ups_share_out_the_last_spare(pooled: Fleet) -> None:
    import threading

    spares.fill(pooled, SERVER, want=1)
    slugs = [new_slug("sp") for _ in range(3)]
    errors: list[BaseException] = []

    def sign_up(s: str) -> None:
        fleet = Fleet(pooled.cfg)
        try:
            fleet.provision(s, REGION)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            fleet.close()

    threads = [threading.Thread(target=sign_up, args=(s,)) for s in slugs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for s in slugs:
        assert pooled.get_tenant(s).state == "active"
    # one of them got the spare; each login role reaches its own database only
    for s in slugs:
        for other in slugs:
            if other != s:
                dsn = make_conninfo(pooled.credentials(s), dbname=f"tenant_{other}")
                with pytest.raises(psycopg.OperationalError, match="permission denied"):
                    psycopg.connect(dsn).close()
