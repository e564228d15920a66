"""Tenant schema migrations, run in-process with Alembic.

The Alembic environment (sample or the operator's own) receives a live
SQLAlchemy connection in ``config.attributes["connection"]``, already inside a
transaction we own, with ``SET LOCAL ROLE`` to the tenant's owner role — so a
failed migration rolls back whole and every object is owned by the owner role.
"""

from __future__ import annotations

import functools
import io
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.ddl.postgresql import PostgresqlImpl
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import Connection, Engine, Table, create_engine, text
from sqlalchemy.pool import NullPool

from orchestrator.adapters.postgres import alembic_threads, revision_marks
from orchestrator.domain.errors import InvalidInput
from orchestrator.domain.revisions import Revision

alembic_threads.install()  # before any revision file is imported


class _PostgresqlImpl(PostgresqlImpl):
    """Alembic's Postgres dialect support, building the version table's ``Table``
    once per (name, schema, pk) rather than once per migration context (Alembic's
    documented ``version_table_impl`` hook): a rollout opens a context per tenant,
    and one shared Table also lets SQLAlchemy reuse the compiled version-table
    statements. Registering it replaces Alembic's impl for "postgresql"."""

    __dialect__ = "postgresql"
    _version_tables: dict[tuple[str, str | None, bool], Table] = {}
    _version_tables_lock = threading.Lock()

    def version_table_impl(self, *, version_table: str, version_table_schema: str | None,
                           version_table_pk: bool, **kw: Any) -> Table:
        if kw:  # a hook argument from a newer Alembic: build it the normal way
            return super().version_table_impl(
                version_table=version_table, version_table_schema=version_table_schema,
                version_table_pk=version_table_pk, **kw)
        key = (version_table, version_table_schema, version_table_pk)
        with self._version_tables_lock:
            table = self._version_tables.get(key)
            if table is None:
                table = self._version_tables[key] = super().version_table_impl(
                    version_table=version_table, version_table_schema=version_table_schema,
                    version_table_pk=version_table_pk)
            return table


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


def revisions(script_location: Path) -> list[Revision]:
    """Every revision (id, parents, message), as Alembic reads the files."""
    out = []
    for script in script_directory(script_location).walk_revisions():
        down = script.down_revision
        parents = (down,) if isinstance(down, str) else tuple(down or ())
        out.append(Revision(script.revision, parents, " ".join((script.doc or "").split())))
    return out


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


def known_revision(script_location: Path, revision: str | None) -> bool:
    """Whether ``revision`` (None: base) is in these revision files: a database marked
    with one that is not (a newer deploy's) cannot be planned, only failed."""
    if revision is None:
        return True
    try:
        return script_directory(script_location).get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - Alembic raises several kinds for "no such revision"
        return False


def _connect() -> psycopg.Connection:
    return psycopg.connect(_target_dsn.get(), connect_timeout=10,
                           application_name="tenantctl-migrate")


@functools.cache
def _engine() -> Engine:
    # One engine for every tenant database: NullPool, and the DSN of the database
    # at hand comes from a context variable. The dialect initialises once, and no
    # connection outlives the migration of its tenant.
    return create_engine("postgresql+psycopg://", creator=_connect, poolclass=NullPool)


def session_options(dsn: str, settings: dict[str, str | None]) -> str:
    """``dsn`` with ``settings`` applied at session start (libpq ``options``, after any
    the DSN has). A fresh backend pays about a millisecond of server CPU for its
    first statement; settings in the startup packet cost nothing extra."""
    given = {name: value for name, value in settings.items() if value}  # None/"": unset
    if not given:
        return dsn
    escaped = " ".join(f"-c {name}=" + value.replace("\\", "\\\\").replace(" ", "\\ ")
                       for name, value in given.items())
    before = conninfo_to_dict(dsn).get("options")
    return make_conninfo(dsn, options=f"{before} {escaped}" if before else escaped)


@contextmanager
def tenant_connection(dsn: str, *, role: str | None = None, lock_timeout: str | None = None,
                      statement_timeout: str | None = None) -> Iterator[Connection]:
    """A connection to one tenant database; with ``role`` and timeouts, its session
    starts as that role with them (for ``migrate(..., as_role=None)``)."""
    dsn = session_options(dsn, {"role": role, "lock_timeout": lock_timeout,
                                "statement_timeout": statement_timeout})
    token = _target_dsn.set(dsn)
    try:
        with _engine().connect() as conn:
            yield conn
    finally:
        _target_dsn.reset(token)


def backend_pid(conn: Connection) -> int:
    """The server process of ``conn`` (libpq knows it: no round trip)."""
    pconn = conn.connection.driver_connection
    assert isinstance(pconn, psycopg.Connection)
    return pconn.info.backend_pid


def current_revision(conn: Connection) -> str | None:
    if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None:
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(conn: Connection, script_location: Path, target: str, *, as_role: str | None,
            lock_timeout: str | None = None, statement_timeout: str | None = None
            ) -> str | None:
    """Upgrade (or downgrade) the database behind ``conn`` to ``target`` as
    ``as_role``, in one transaction. Returns the revision reached."""
    return migrate_from(conn, script_location, target, as_role=as_role,
                        lock_timeout=lock_timeout, statement_timeout=statement_timeout)[1]


def migrate_from(conn: Connection, script_location: Path, target: str, *, as_role: str | None,
                 lock_timeout: str | None = None, statement_timeout: str | None = None
                 ) -> tuple[str | None, str | None]:
    """Like ``migrate``; returns (revision before, revision after).

    Alembic reads the revision the database is at anyway: we take "before" from
    what it found rather than asking the database a second time (a rollout runs
    this once per tenant, so every round trip and every Python frame counts)."""
    script = script_directory(script_location)
    with conn.begin():
        # set_config(..., true) is SET LOCAL; the names are constants, the values
        # (the role too) travel as parameters, never as SQL text. as_role=None: the
        # session already runs as the owner (tenant_connection(role=...)).
        settings = {"role": as_role, "lock_timeout": lock_timeout,
                    "statement_timeout": statement_timeout}
        given = [(name, value) for name, value in settings.items() if value]
        if given:
            conn.exec_driver_sql(
                "SELECT " + ", ".join(f"set_config('{name}', %s, true)" for name, _ in given),
                tuple(value for _, value in given))
        found: list[str | None] = []
        _run(conn, script, script_location, target, found)
        if not found:  # env.py never asked for the migrations to run
            before = after = current_revision(conn)
        else:
            # Alembic ran every step to the target and moved the version with them
            # (or raised, and the transaction rolls back): the target is where it is.
            before, after = found[0], resolve_revision(script_location, target)
        pconn = conn.connection.driver_connection
        assert isinstance(pconn, psycopg.Connection)
        revision_marks.publish(pconn, after)  # commits with the migration or not at all
        return before, after


def _run(conn: Connection, script: ScriptDirectory, location: Path, target: str,
         found: list[str | None]) -> None:
    """What alembic's command.upgrade/downgrade do, with the parsed script directory
    and the compiled env.py reused (command.* re-reads every revision file on each
    call). ``found`` receives the revision the database was at."""
    acfg = alembic_config(location)
    acfg.attributes["connection"] = conn

    def step(heads: Any, context: Any) -> Any:
        current = heads[0] if heads else None
        found.append(current)
        if _is_downgrade(location, current, target):
            return script._downgrade_revs(target, heads)
        return script._upgrade_revs(target, heads)

    with EnvironmentContext(acfg, script, fn=step, destination_rev=target):
        _run_env(script)


@functools.lru_cache(maxsize=8)
def _env_code(path: Path) -> types.CodeType | None:
    return compile(path.read_bytes(), str(path), "exec", dont_inherit=True) \
        if path.is_file() else None


def _run_env(script: ScriptDirectory) -> None:
    """``ScriptDirectory.run_env()`` — a fresh module executing env.py — without
    compiling env.py again for every tenant."""
    path = Path(script.dir) / "env.py"
    code = _env_code(path)
    if code is None:  # e.g. a sourceless env.pyc: let Alembic find and load it
        script.run_env()
        return
    module = types.ModuleType("env_py")
    module.__file__ = str(path)
    exec(code, module.__dict__)  # noqa: S102 - the operator's own env.py, as Alembic does


@functools.lru_cache(maxsize=256)
def _is_downgrade(location: Path, current: str | None, target: str) -> bool:
    return is_downgrade(script_directory(location), current, target)


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
    out = io.StringIO()
    acfg = alembic_config(script_location, out)
    script = script_directory(script_location)
    if is_downgrade(script, current, target):
        command.downgrade(acfg, f"{current}:{target if target else 'base'}", sql=True)
    else:
        command.upgrade(acfg, f"{current}:{target}" if current else target, sql=True)
    return out.getvalue()
