"""The server-administration port (``orchestrator.ports.ServerAdmin``) over the
statements of ``admin.py``: which connection each runs on (the server's
maintenance database, or the tenant's own database with the configured
lock_timeout), and the errors the services see."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime

import psycopg
from psycopg import sql

from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.config import Config
from orchestrator.domain.errors import first_line
from orchestrator.domain.names import TenantNames
from orchestrator.ports import ServerOperationFailed

Ident = sql.Identifier


@contextmanager
def _failing_as_ours() -> Iterator[None]:
    """A statement's failure as ServerOperationFailed (one line); connection failures
    are ours already (ServerUnavailable) and pass as they are."""
    try:
        yield
    except psycopg.Error as exc:
        raise ServerOperationFailed(first_line(exc)) from None


class PgServerAdmin:
    """``ports.ServerAdmin`` on the fleet's servers. ``connection(server)`` lends an
    autocommit admin connection to the server's maintenance database (``Deps``
    keeps them for reuse)."""

    def __init__(self, cfg: Config,
                 connection: Callable[[str], AbstractContextManager[psycopg.Connection]]
                 ) -> None:
        self._cfg = cfg
        self._connection = connection

    def _in_database(self, server: str, database: str
                     ) -> AbstractContextManager[psycopg.Connection]:
        # a tenant's transaction may hold its objects locked: no wait past lock_timeout
        return pgserver.connect(self._cfg.server(server).admin_dsn, database, server=server,
                                lock_timeout=self._cfg.lock_timeout)

    # -- a tenant's database and roles -------------------------------------------------

    def restrict_to_reads(self, server: str, names: TenantNames) -> None:
        with self._in_database(server, names.database) as conn:
            pgserver.restrict_to_reads(conn, names)

    def secure_tenant_database(self, server: str, names: TenantNames) -> None:
        with self._in_database(server, names.database) as conn:
            pgserver.secure_tenant_database(conn, names)

    def set_login(self, server: str, role: str, allowed: bool) -> None:
        with self._connection(server) as conn:
            pgserver.set_login(conn, role, allowed)

    def terminate_sessions(self, server: str, *, role: str | None = None,
                           database: str | None = None, wait: bool = False) -> int:
        with self._connection(server) as conn:
            return pgserver.terminate_sessions(conn, role=role, database=database, wait=wait)

    def terminate_other_sessions(self, server: str, database: str) -> int:
        with self._connection(server) as conn:
            return pgserver.terminate_other_sessions(conn, database)

    def database_owner(self, server: str, database: str) -> str | None:
        with self._connection(server) as conn:
            return pgserver.database_owner(conn, database)

    def role_exists(self, server: str, role: str) -> bool:
        with self._connection(server) as conn:
            return pgserver.role_exists(conn, role)

    def role_comment(self, server: str, role: str) -> str | None:
        with self._connection(server) as conn, _failing_as_ours():
            if not pgserver.role_exists(conn, role):
                return None
            return pgserver.role_comment(conn, role) or ""

    def drop_database(self, server: str, database: str) -> None:
        with self._connection(server) as conn:
            pgserver.drop_database(conn, database)

    def drop_marked_roles(self, server: str, names: TenantNames, marker: str) -> None:
        with self._connection(server) as conn:
            pgserver.drop_marked_roles(conn, names, marker)

    # -- support roles -----------------------------------------------------------------

    def create_support_role(self, server: str, names: TenantNames, role: str, password: str,
                            *, comment: str, connection_limit: int, valid_until: datetime,
                            settings: dict[str, str], read_only: bool) -> None:
        ident, db = Ident(role), Ident(names.database)
        with self._connection(server) as conn:
            verifier = pgserver.scram_verifier(conn, role, password)
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOINHERIT CONNECTION LIMIT {} "
                                 "PASSWORD {} VALID UNTIL {}").format(
                ident, sql.Literal(connection_limit), sql.Literal(verifier),
                sql.Literal(valid_until.isoformat())))
            conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(ident, sql.Literal(comment)))
            # the admin reads what the role may make (a large object needs no privilege),
            # so backups of the tenant still dump everything while the grant lasts
            conn.execute(pgserver.membership_grant(conn, role))
            for name, value in settings.items():
                conn.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(
                    ident, Ident(name), sql.Literal(value)))
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, ident))
        tables = sql.SQL("SELECT" if read_only else "SELECT, INSERT, UPDATE, DELETE")
        with self._in_database(server, names.database) as conn:
            stmts = [sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident),
                     sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA public TO {}").format(
                         tables, ident)]
            if not read_only:
                stmts.append(sql.SQL("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA "
                                     "public TO {}").format(ident))
                # the schema revision is tenantctl's to move (with the database's mark),
                # not support's: a hand edit would leave the mark, and status, wrong
                stmts.append(pgserver.on_alembic_version(sql.SQL(
                    "REVOKE INSERT, UPDATE, DELETE ON public.alembic_version FROM {}")
                    .format(ident)))
            conn.execute(sql.SQL(";\n").join(stmts))

    def lock_out_role(self, server: str, role: str) -> None:
        with self._connection(server) as conn, _failing_as_ours():
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(Ident(role)))
            pgserver.terminate_sessions(conn, role=role, wait=True)

    def drop_role_everywhere(self, server: str, role: str) -> None:
        with self._connection(server) as conn, _failing_as_ours():
            pgserver.drop_role_everywhere(conn, self._cfg.server(server).admin_dsn, role,
                                          server=server, lock_timeout=self._cfg.lock_timeout)

    def role_settings(self, server: str, roles: Sequence[str]) -> dict[str, list[str]]:
        with self._connection(server) as conn, _failing_as_ours():
            return dict(conn.execute(
                "SELECT r.rolname, coalesce(r.rolconfig, '{}') || coalesce("
                "(SELECT array_agg(c) FROM pg_db_role_setting s, unnest(s.setconfig) c "
                "WHERE s.setrole = r.oid AND s.setdatabase <> 0), '{}') "
                "FROM pg_roles r WHERE r.rolname = ANY(%s)", (list(roles),)).fetchall())
