"""Tenant schema migrations, run in-process with Alembic.

The Alembic environment (sample or the operator's own) receives a live
SQLAlchemy connection in ``config.attributes["connection"]``, already inside a
transaction we own, with ``SET LOCAL ROLE`` to the tenant's owner role — so a
failed migration rolls back whole and every object is owned by the owner role.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from psycopg import sql
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.pool import NullPool

_target_dsn: ContextVar[str] = ContextVar("tenant_dsn")


def alembic_config(script_location: Path) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(script_location))
    return cfg


@functools.lru_cache(maxsize=8)
def script_directory(script_location: Path) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(script_location))


def head_revision(script_location: Path) -> str | None:
    return script_directory(script_location).get_current_head()


def _connect() -> psycopg.Connection:
    return psycopg.connect(_target_dsn.get(), connect_timeout=10,
                           application_name="tenantctl-migrate")


@functools.cache
def _engine() -> Engine:
    # One engine for every tenant database: NullPool, and the DSN of the database
    # at hand comes from a context variable. The dialect initialises once, and no
    # connection outlives the migration of its tenant.
    return create_engine("postgresql+psycopg://", creator=_connect, poolclass=NullPool)


@contextmanager
def tenant_connection(dsn: str) -> Iterator[Connection]:
    token = _target_dsn.set(dsn)
    try:
        with _engine().connect() as conn:
            yield conn
    finally:
        _target_dsn.reset(token)


def current_revision(conn: Connection) -> str | None:
    if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None:
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(conn: Connection, script_location: Path, target: str, *, as_role: str) -> str | None:
    """Upgrade (or downgrade) the database behind ``conn`` to ``target`` as
    ``as_role``, in one transaction. Returns the revision reached."""
    with conn.begin():
        role = sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(as_role))
        conn.exec_driver_sql(role.as_string(None))
        current = current_revision(conn)
        acfg = alembic_config(script_location)
        acfg.attributes["connection"] = conn
        script = script_directory(script_location)
        if is_downgrade(script, current, target):
            command.downgrade(acfg, target)
        else:
            command.upgrade(acfg, target)
        return current_revision(conn)


def is_downgrade(script: ScriptDirectory, current: str | None, target: str) -> bool:
    """True when ``target`` lies strictly below ``current`` in the history."""
    if current is None or target in ("head", "heads", current):
        return False
    if target == "base":
        return True
    return any(rev.revision == target for rev in script.iterate_revisions(current, "base"))
