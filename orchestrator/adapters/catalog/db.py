"""Catalog adapter: engine, schema upgrade, config sync, advisory locks, audit."""

from __future__ import annotations

import getpass
import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import Connection, Engine, create_engine, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.adapters.catalog.audit import redact as redact_detail
from orchestrator.adapters.catalog.models import AuditEvent, FleetSetting, Region, Server
from orchestrator.adapters.catalog.reads import CATALOG_HEAD
from orchestrator.adapters.postgres import alembic_threads
from orchestrator.adapters.postgres.libpq import redact, server_error, with_dbname
from orchestrator.config import Config
from orchestrator.domain.errors import Conflict, printable

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

FLEET_ID = "fleet_id"  # fleet_settings key of the fleet's identity
CATALOG_MIGRATIONS = Path(__file__).resolve().parents[3] / "migrations" / "catalog"


ACTOR_ENV = "TENANTCTL_ACTOR"


def default_actor(who: str | None = None) -> str:
    """Who the audit log says acted: ``who`` if given (the CLI's --actor), else
    $TENANTCTL_ACTOR, else the OS user@host."""
    who = who or os.environ.get(ACTOR_ENV)
    if not who:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid{os.getuid()}"
        who = f"{user}@{socket.gethostname()}"
    # recorded after the action: a name the catalog cannot store (not UTF-8, a NUL)
    # must not fail the audit record of something already done
    return printable(who)


class Catalog:
    def __init__(self, cfg: Config, *, actor: str | None = None) -> None:
        self.cfg = cfg
        self.dsn = cfg.catalog_dsn
        self.actor = default_actor(actor)  # for every audit record this catalog writes
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            dsn = self.dsn
            # A creator hands libpq the DSN untouched (passfile, sslmode, ...), rather
            # than round-tripping it through a SQLAlchemy URL.
            self._engine = create_engine(
                "postgresql+psycopg://",
                creator=lambda: psycopg.connect(dsn, connect_timeout=10,
                                                application_name="tenantctl"),
                # a rollout worker holds a lock connection and uses another
                pool_size=10, max_overflow=140,
            )
        return self._engine

    def session(self) -> Session:
        if self._sessions is None:
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        return self._sessions()

    def direct(self, application_name: str = "tenantctl") -> psycopg.Connection:
        """A connection of its own, outside the pool, in autocommit: for a worker that
        runs a few statements per item for as long as it lives (its statements get
        prepared; nothing is checked in and out per item)."""
        try:
            return psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                                   application_name=application_name)
        except psycopg.OperationalError as exc:
            raise server_error(f"the catalog at {redact(self.dsn)}", exc) from None

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            self._sessions = None

    # -- schema ------------------------------------------------------------

    def alembic_config(self) -> AlembicConfig:
        from alembic.config import Config as AlembicConfig  # start-up: see CATALOG_HEAD

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(CATALOG_MIGRATIONS))
        return cfg

    def head(self) -> str:
        """The revision this code expects the catalog at (``CATALOG_HEAD``)."""
        return CATALOG_HEAD

    def current(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                return _alembic_version(conn)
        except OperationalError as exc:
            raise server_error(f"the catalog at {redact(self.dsn)}", exc) from None

    def ensure_database(self) -> bool:
        """Create the catalog database if it is missing (the admin role has CREATEDB).
        True if created."""
        dbname = str(conninfo_to_dict(self.dsn).get("dbname") or "")
        assert dbname
        try:
            with psycopg.connect(with_dbname(self.dsn, "postgres"), autocommit=True,
                                 connect_timeout=10) as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (dbname,)).fetchone():
                    return False
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
                conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(
                    sql.Identifier(dbname)))
                return True
        except psycopg.OperationalError as exc:
            raise server_error(f"the catalog server at {redact(self.dsn)}", exc) from None

    def upgrade(self) -> tuple[str | None, str | None]:
        """Bring the catalog schema to head under an advisory lock. Returns (from, to)."""
        from alembic import command  # start-up: see CATALOG_HEAD

        alembic_threads.install()  # before any revision file is imported
        self.ensure_database()
        try:
            with self.engine.begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                             {"k": lock_key("catalog-upgrade")})
                before = _alembic_version(conn)
                acfg = self.alembic_config()
                acfg.attributes["connection"] = conn
                command.upgrade(acfg, "head")
                after = _alembic_version(conn)
        except OperationalError as exc:
            raise server_error(f"the catalog at {redact(self.dsn)}", exc) from None
        return before, after

    def require_current(self) -> None:
        cur, head = self.current(), self.head()
        if cur != head:
            raise Conflict(f"the catalog is at revision {cur or 'none'}, not {head}: "
                           "run `tenantctl catalog upgrade`")

    # -- regions and servers from the config ---------------------------------

    def sync_topology(self) -> list[str]:
        """Make the catalog's regions and servers match the config. Servers that left
        the config stay (their tenants still point at them) but take no new tenants."""
        done: list[str] = []
        with self.session() as s, s.begin():
            regions = {r.name: r for r in s.scalars(select(Region))}
            for rc in self.cfg.regions.values():
                region = regions.get(rc.name)
                if region is None:
                    s.add(Region(name=rc.name, backup_store=rc.backup_store))
                    done.append(f"region {rc.name}: added")
                elif region.backup_store != rc.backup_store:
                    region.backup_store = rc.backup_store
                    done.append(f"region {rc.name}: backup store changed")
            s.flush()
            servers = {sv.name: sv for sv in s.scalars(select(Server))}
            configured = {sc.name for sc in self.cfg.servers}
            for sc in self.cfg.servers:
                sv = servers.get(sc.name)
                if sv is None:
                    s.add(Server(name=sc.name, region=sc.region, capacity=sc.capacity,
                                 available=True))
                    done.append(f"server {sc.name}: added to {sc.region}")
                    continue
                if sv.region != sc.region:
                    raise Conflict(f"server {sc.name} is in region {sv.region} in the catalog "
                                   f"but in {sc.region} in {self.cfg.path}; a server never "
                                   "changes region")
                if sv.capacity != sc.capacity or not sv.available:
                    sv.capacity, sv.available = sc.capacity, True
                    done.append(f"server {sc.name}: capacity {sc.capacity}")
            for name, sv in servers.items():
                if name not in configured and sv.available:
                    sv.available = False
                    done.append(f"server {name}: not in the config, takes no new tenants")
        return done

    # -- the fleet's identity ---------------------------------------------------

    def fleet_id(self) -> str | None:
        """The fleet's random id, made once (None: not made yet). Each server carries
        it as a mark (pgserver.mark_fleet), so a server that is not this fleet's —
        another cluster now at its address — can be told apart."""
        with self.session() as s:
            return s.scalar(select(FleetSetting.value).where(FleetSetting.key == FLEET_ID))

    def adopt_fleet_id(self, candidate: str) -> str:
        """Record ``candidate`` as the fleet's id unless one is recorded; the id kept."""
        with self.session() as s, s.begin():
            s.execute(pg_insert(FleetSetting).values(key=FLEET_ID, value=candidate)
                      .on_conflict_do_nothing())
            return str(s.scalar(select(FleetSetting.value)
                                .where(FleetSetting.key == FLEET_ID)))

    # -- audit -----------------------------------------------------------------

    def audit(self, action: str, *, tenant: str | None = None, region: str | None = None,
              outcome: str = "ok", session: Session | None = None,
              at: datetime | None = None, **detail: Any) -> None:
        """One audit record (in ``session``'s transaction, else one of its own), at
        ``at`` (a run's ``now``: `retention run --now`) or else when the catalog records it."""
        event = AuditEvent(actor=self.actor, action=action, tenant=tenant, region=region,
                           outcome=outcome, detail=redact_detail(detail))
        if at is not None:
            event.at = at
        if session is not None:
            session.add(event)
            return
        with self.session() as s, s.begin():
            s.add(event)

    # -- locks -------------------------------------------------------------------

    @contextmanager
    def advisory_lock(self, name: str, *, shared: bool = False, wait: bool = False
                      ) -> Iterator[bool]:
        """A session-level advisory lock in the catalog database, held on a dedicated
        connection for the duration of the block. Yields whether it was acquired
        (always True with wait=True). Dies with the process, so a crash never
        leaves it held."""
        fn = {(False, False): "pg_try_advisory_lock", (True, False): "pg_try_advisory_lock_shared",
              (False, True): "pg_advisory_lock", (True, True): "pg_advisory_lock_shared"}[
            (shared, wait)]
        unlock = "pg_advisory_unlock_shared" if shared else "pg_advisory_unlock"
        key = lock_key(name)
        try:
            pooled = self.engine.raw_connection()
        except OperationalError as exc:
            raise server_error(f"the catalog at {redact(self.dsn)}", exc) from None
        conn = pooled.driver_connection
        assert isinstance(conn, psycopg.Connection)
        # Autocommit on the raw connection: lock and unlock are one round trip each,
        # with no transaction held open in between.
        conn.autocommit = True
        try:
            row = conn.execute(f"SELECT {fn}(%s)", (key,)).fetchone()  # type: ignore[call-overload]
            # the waiting variants return void: having returned means we hold it
            got = True if wait else bool(row and row[0])
            try:
                yield got
            finally:
                if got:
                    conn.execute(f"SELECT {unlock}(%s)", (key,))  # type: ignore[call-overload]
        finally:
            if not conn.closed:
                conn.autocommit = False
            pooled.close()


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for a name. Any name: a lock may be
    taken before the name is validated (an unencodable one is then refused there)."""
    raw = name.encode("utf-8", "surrogatepass")  # the same bytes for every valid name
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big", signed=True)


def lock_key_sql(name_expr: str) -> str:
    """``lock_key`` computed by Postgres from a SQL text expression (a column, say), so
    that one statement can claim a row and lock what it names. ``name_expr`` is SQL
    written by us, never user input."""
    return (f"('x' || left(encode(sha256(convert_to({name_expr}, 'UTF8')), 'hex'), 16))"
            "::bit(64)::bigint")


def _alembic_version(conn: Connection) -> str | None:
    exists = conn.execute(text("SELECT to_regclass('public.alembic_version')")).scalar()
    if exists is None:
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
