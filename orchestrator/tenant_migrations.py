"""Tenant schema migrations, run in-process with Alembic.

The Alembic environment (sample or the operator's own) receives a live
SQLAlchemy connection in ``config.attributes["connection"]``, already inside a
transaction we own, with ``SET LOCAL ROLE`` to the tenant's owner role — so a
failed migration rolls back whole and every object is owned by the owner role.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import psycopg
from alembic.config import Config as AlembicConfig
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from psycopg import sql
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.pool import NullPool

from orchestrator import alembic_threads
from orchestrator.errors import InvalidInput

alembic_threads.install()  # before any revision file is imported
_target_dsn: ContextVar[str] = ContextVar("tenant_dsn")


def alembic_config(script_location: Path, output: io.StringIO | None = None) -> AlembicConfig:
    cfg = AlembicConfig(output_buffer=output) if output is not None else AlembicConfig()
    cfg.set_main_option("script_location", str(script_location))
    return cfg


@functools.lru_cache(maxsize=8)
def script_directory(script_location: Path) -> ScriptDirectory:
    """Parsed once per process: the revision files are read once, not per tenant."""
    return ScriptDirectory.from_config(alembic_config(script_location))


def head_revision(script_location: Path) -> str | None:
    return script_directory(script_location).get_current_head()


def resolve_revision(script_location: Path, target: str) -> str | None:
    """``head`` / ``base`` / a revision id (or unique prefix) → a revision id (None for
    base). Unknown revisions are an InvalidInput, never a traceback."""
    script = script_directory(script_location)
    if target == "base":
        return None
    try:
        rev = script.get_revision(target)
    except CommandError as exc:
        raise InvalidInput(f"unknown revision {target!r}: {exc}") from None
    if rev is None:
        raise InvalidInput(f"unknown revision {target!r}")
    return rev.revision


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


def migrate(conn: Connection, script_location: Path, target: str, *, as_role: str,
            lock_timeout: str | None = None, statement_timeout: str | None = None
            ) -> str | None:
    """Upgrade (or downgrade) the database behind ``conn`` to ``target`` as
    ``as_role``, in one transaction. Returns the revision reached."""
    return migrate_from(conn, script_location, target, as_role=as_role,
                        lock_timeout=lock_timeout, statement_timeout=statement_timeout)[1]


def migrate_from(conn: Connection, script_location: Path, target: str, *, as_role: str,
                 lock_timeout: str | None = None, statement_timeout: str | None = None
                 ) -> tuple[str | None, str | None]:
    """Like ``migrate``; returns (revision before, revision after)."""
    script = script_directory(script_location)
    with conn.begin():
        settings = [sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(as_role))]
        if lock_timeout:
            settings.append(sql.SQL("SET LOCAL lock_timeout = {}").format(
                sql.Literal(lock_timeout)))
        if statement_timeout:
            settings.append(sql.SQL("SET LOCAL statement_timeout = {}").format(
                sql.Literal(statement_timeout)))
        conn.exec_driver_sql(sql.SQL("; ").join(settings).as_string(None))
        before = current_revision(conn)
        if before != target and not (target == "head" and before == script.get_current_head()):
            _run(conn, script, script_location, before, target)
        return before, current_revision(conn)


def _run(conn: Connection, script: ScriptDirectory, location: Path, current: str | None,
         target: str) -> None:
    """What alembic's command.upgrade/downgrade do, with the parsed script directory
    reused (command.* re-reads every revision file on each call)."""
    acfg = alembic_config(location)
    acfg.attributes["connection"] = conn
    down = is_downgrade(script, current, target)

    def step(rev: Any, context: Any) -> Any:
        if down:
            return script._downgrade_revs(target, rev)
        return script._upgrade_revs(target, rev)

    with EnvironmentContext(acfg, script, fn=step, destination_rev=target):
        script.run_env()


def is_downgrade(script: ScriptDirectory, current: str | None, target: str) -> bool:
    """True when ``target`` lies strictly below ``current`` in the history."""
    if current is None or target in ("head", "heads", current):
        return False
    if target == "base":
        return True
    return any(rev.revision == target for rev in script.iterate_revisions(current, "base"))


def offline_sql(script_location: Path, current: str | None, target: str) -> str:
    """The SQL a migration from ``current`` to ``target`` would run (Alembic offline
    mode), for dry runs. Touches no database."""
    from alembic import command

    out = io.StringIO()
    acfg = alembic_config(script_location, out)
    script = script_directory(script_location)
    if is_downgrade(script, current, target):
        command.downgrade(acfg, f"{current}:{target if target else 'base'}", sql=True)
    else:
        command.upgrade(acfg, f"{current}:{target}" if current else target, sql=True)
    return out.getvalue()
