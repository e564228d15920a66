"""The one place things are wired: configuration -> adapters -> ``Deps``, the
dependencies every service takes (``f(deps, ...)``). Nothing here imports a
service; ``orchestrator.api.Fleet`` (the public facade) builds on ``Deps``."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Self

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import selectinload

from backups.stores import open_store
from orchestrator import ports
from orchestrator.adapters import clock
from orchestrator.adapters.catalog.db import Catalog
from orchestrator.adapters.catalog.models import (
    PLACED_STATES,
    UNSHOWN,
    FleetSetting,
    Server,
    Tenant,
    TenantState,
)
from orchestrator.adapters.catalog.reads import TARGET_KEY
from orchestrator.adapters.catalog.reads import ServerRow as ServerInfo  # the API's name
from orchestrator.adapters.catalog.repository import SqlCatalog
from orchestrator.adapters.clock import SystemClock
from orchestrator.adapters.crypto.masterkey import MasterKey, load_master_key
from orchestrator.adapters.crypto.tenant_keys import CatalogKeyVault
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import revision_files
from orchestrator.adapters.postgres.pgtools import ConfiguredPgTools
from orchestrator.adapters.postgres.server_admin import PgServerAdmin
from orchestrator.config import Config, load_config
from orchestrator.domain.errors import InvalidInput, NotFound
from orchestrator.domain.names import check_integrity, validate_slug


class Deps:
    """What every service takes: the configuration and the adapters built from it
    (catalog, server connections, master key), with the catalog reads services
    share. Built once per process (``Deps.from_config``); ``orchestrator.api.Fleet``
    is this plus the use cases, for callers of the Python API.

    The ports (``orchestrator.ports``) the lifecycle, retention and access services
    go through: ``records`` (the catalog's repositories, transactions, locks,
    audit), ``admin`` (statements on the servers), ``open_store`` (object stores),
    ``backup_jobs`` (the backup pipeline's entry points), ``clock``, ``pg_tools``
    (pg_dump, pg_restore, psql) and ``keys`` (the key vault: master key, tenant
    keys). Each is the real adapter unless given (the fast test tier gives
    in-memory ones)."""

    def __init__(self, cfg: Config, *, records: ports.CatalogPort | None = None,
                 admin: ports.ServerAdmin | None = None,
                 open_store: ports.StoreOpener | None = None,
                 backup_jobs: ports.BackupJobs | None = None,
                 clock: ports.Clock | None = None, pg_tools: ports.PgTools | None = None,
                 keys: ports.KeyVault | None = None, actor: str | None = None) -> None:
        self.cfg = cfg
        self.catalog = Catalog(cfg, actor=actor)
        self._server_conns = pgserver.ConnectionCache()
        self.records: ports.CatalogPort = records or SqlCatalog(self.catalog)
        self.admin: ports.ServerAdmin = admin or PgServerAdmin(cfg, self.server_connection)
        self.open_store: ports.StoreOpener = open_store or _open_store
        self._backup_jobs = backup_jobs
        self.clock: ports.Clock = clock or SystemClock()
        self.pg_tools: ports.PgTools = pg_tools or ConfiguredPgTools(cfg)
        # the master key is read when first needed (a command that needs none runs
        # without it), from ``master_key`` below
        self.keys: ports.KeyVault = keys or CatalogKeyVault(lambda: self.master_key)
        self._refills: ThreadPoolExecutor | None = None
        self._refilling: set[str] = set()
        self._refill_lock = threading.Lock()
        self._held: list[str] | None = None  # see refills_held
        # what tops a server's spare pool up: set by the facade (the spares service
        # sits above this module); None makes refill_spares a no-op
        self.refiller: Callable[[Deps, str], None] | None = None
        # one-line warnings of work that did not stop the command (a pooler that is
        # down during a sign-up): the CLI and API callers show them
        self.warnings: list[str] = []

    @property
    def backup_jobs(self) -> ports.BackupJobs:
        if self._backup_jobs is None:
            self._backup_jobs = self.pipeline_jobs()
        return self._backup_jobs

    def pipeline_jobs(self) -> ports.BackupJobs:
        """The backup pipeline's entry points: a service, which this module may not
        import; the facade (``orchestrator.api.Fleet``) wires them."""
        raise RuntimeError("no backup pipeline wired: build an orchestrator.api.Fleet, "
                           "or pass backup_jobs to Deps")

    @classmethod
    def from_config(cls, path: str | None = None) -> Self:
        return cls(load_config(path))

    def wait_for_refills(self) -> None:
        """Return once the spare refills scheduled so far have finished."""
        with self._refill_lock:
            pool, self._refills = self._refills, None
        if pool is not None:
            pool.shutdown(wait=True)

    def close(self) -> None:
        self.wait_for_refills()  # let spare refills in flight finish
        self._server_conns.close()
        self.catalog.dispose()

    @contextlib.contextmanager
    def refills_held(self) -> Iterator[None]:
        """Spare refills asked for inside start only when it ends: e.g. after a
        sign-up's output, which a refill (or a crash in one) must never hold up."""
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            for server in dict.fromkeys(held):
                self.refill_spares(server)

    def refill_spares(self, server: str) -> None:
        """Top the server's spare pool up in the background (off the sign-up's path);
        ``close()`` waits for it. A failure only leaves the pool short: the next
        sign-up clones on demand, and its refill (or `template build`) tries again."""
        if self.refiller is None:
            return
        if self._held is not None:
            self._held.append(server)
            return
        with self._refill_lock:
            if server in self._refilling:
                return
            self._refilling.add(server)
            if self._refills is None:
                self._refills = ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix="spares")
            self._refills.submit(self._refill, server)

    def _refill(self, server: str) -> None:
        try:
            assert self.refiller is not None
            self.refiller(self, server)
        except Exception:  # noqa: BLE001, S110 - see refill_spares
            pass
        finally:
            with self._refill_lock:
                self._refilling.discard(server)

    def server_connection(self, server: str) -> AbstractContextManager[psycopg.Connection]:
        """An autocommit admin connection to a server's maintenance database."""
        return self._server_conns.connection(server, self.cfg.server(server).admin_dsn)

    @functools.cached_property
    def master_key(self) -> MasterKey:
        return load_master_key(self.cfg.master_key)

    @functools.cached_property
    def head_revision(self) -> str | None:
        return revision_files.head_revision(self.cfg.tenant_migrations)

    def target_revision(self, region: str | None = None) -> str | None:
        """The revision new tenants are created at. A rollout of the whole fleet (or
        of one region) sets it, so tenants created during or after the rollout end
        where the fleet is going; until the first rollout it is head."""
        keys = [TARGET_KEY] + ([f"{TARGET_KEY}:{region}"] if region else [])
        with self.catalog.session() as s:
            rows = dict(s.execute(select(FleetSetting.key, FleetSetting.value)
                                  .where(FleetSetting.key.in_(keys))).all())
        value = rows.get(f"{TARGET_KEY}:{region}") or rows.get(TARGET_KEY)
        if value is None:
            return self.head_revision
        return None if value == "base" else value

    def set_target_revision(self, revision: str | None, region: str | None = None) -> None:
        """Whole fleet: set the fleet target and drop region overrides. One region:
        set that region's override."""
        value = revision or "base"
        with self.catalog.session() as s, s.begin():
            if region is None:
                s.execute(delete(FleetSetting).where(FleetSetting.key.like(f"{TARGET_KEY}:%")))
                key = TARGET_KEY
            else:
                key = f"{TARGET_KEY}:{region}"
            stmt = pg_insert(FleetSetting).values(key=key, value=value)
            s.execute(stmt.on_conflict_do_update(
                index_elements=[FleetSetting.key],
                set_={"value": value, "updated_at": clock.utcnow()}))

    # -- catalog reads ---------------------------------------------------------

    def find_tenant(self, slug: str) -> Tenant | None:
        with self.catalog.session() as s:
            return s.scalars(select(Tenant).options(selectinload(Tenant.credential))
                             .where(Tenant.slug == slug)).one_or_none()

    def get_tenant(self, slug: str) -> Tenant:
        validate_slug(slug)
        tenant = self.find_tenant(slug)
        if tenant is None:
            raise NotFound(f"no tenant {slug!r}")
        check_integrity(tenant)
        return tenant

    def tenants(self, region: str | None = None, state: str | None = None) -> list[Tenant]:
        if region is not None:
            self.cfg.region(region)
        if state is not None and state not in TenantState.__members__:
            raise InvalidInput(f"unknown state {state!r} (one of: "
                           f"{', '.join(TenantState.__members__)})")
        q = select(Tenant).order_by(Tenant.region, Tenant.slug)
        if region:
            q = q.where(Tenant.region == region)
        if state:
            q = q.where(Tenant.state == state)
        with self.catalog.session() as s:
            return list(s.scalars(q))

    def servers(self, region: str | None = None) -> list[ServerInfo]:
        if region is not None:
            self.cfg.region(region)
        with self.catalog.session() as s:
            counts = dict(s.execute(
                select(Tenant.server, func.count()).where(Tenant.state.in_(PLACED_STATES))
                .group_by(Tenant.server)).all())
            q = select(Server).order_by(Server.region, Server.name)
            if region:
                q = q.where(Server.region == region)
            return [ServerInfo(sv.name, sv.region, counts.get(sv.name, 0), sv.capacity,
                               sv.available, sv.template_revision, sv.accepting,
                               sv.retired_at) for sv in s.scalars(q)]

    def credentials_shown(self, slug: str) -> None:
        """The tenant's connection string reached its reader: a re-run of its create
        now says "already exists" (`tenant credentials` shows it again)."""
        with self.catalog.session() as s, s.begin():
            s.execute(update(Tenant).where(Tenant.slug == slug, Tenant.step == UNSHOWN)
                      .values(step=None))

    def tenant_dsn(self, tenant: ports.TenantRecord, password: str, role: str | None = None,
                   *, direct: bool = False) -> str:
        """What the tenant's application connects with: its login role (or ``role``,
        e.g. a support grant's), its database, the server's address (and TLS mode)
        from the admin DSN; the pooler's address when the server has one (not for
        ``role``: support grants connect directly), unless ``direct``."""
        server = self.cfg.server(tenant.server)
        admin = conninfo_to_dict(server.admin_dsn)
        host, port = admin.get("host", "localhost"), admin.get("port", 5432)
        if server.pooler is not None and role is None and not direct:
            host, port = server.pooler.host, server.pooler.port
        user = role or tenant.login_role
        dsn = f"postgresql://{user}:{password}@{host}:{port}/{tenant.database}"
        if admin.get("sslmode"):
            dsn += f"?sslmode={admin['sslmode']}"
        return dsn


def _open_store(url: str) -> ports.ObjectStore:
    return open_store(url)
