"""Postgres server adapter: the statements that create and secure a tenant.

Every function here is idempotent (it checks before it acts), because the
provisioning state machine may re-run any step after a crash. Identifiers are
always composed with psycopg.sql.Identifier; passwords reach the server only
as SCRAM verifiers computed client-side, so the clear text is never in a
statement, a server log or pg_stat_activity.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from orchestrator.adapters.postgres import revision_marks
from orchestrator.adapters.postgres.childenv import child_env
from orchestrator.adapters.postgres.libpq import redact, server_error, with_dbname
from orchestrator.domain.bounds import SUSET_SETTINGS
from orchestrator.domain.errors import Conflict, first_line
from orchestrator.domain.marks import role_marker as role_marker  # callers say pgserver.role_marker
from orchestrator.domain.names import TEMPLATE_DB, TEMPLATE_OWNER, TenantNames
from orchestrator.domain.pooler import password_verifier
from orchestrator.domain.replication import LogicalReadiness

Ident = sql.Identifier
DML = sql.SQL("SELECT, INSERT, UPDATE, DELETE")
SEQ = sql.SQL("USAGE, SELECT, UPDATE")


LIBPQ_ENV = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
             "passfile": "PGPASSFILE", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
             "password": "PGPASSWORD"}


def libpq_env(dsn: str) -> dict[str, str]:
    """The whole environment of a client tool we run (psql, pg_dump, pg_restore):
    the allow-list of `childenv.child_env` plus the DSN as libpq variables (secrets
    travel in the environment, never in argv). Any PG* variable of our own
    environment is dropped, except a PGPASSWORD the operator gave when the DSN
    names none."""
    params = conninfo_to_dict(dsn) if dsn else {}
    pg = {var: str(params[key]) for key, var in LIBPQ_ENV.items() if params.get(key)}
    if "PGPASSWORD" in os.environ and "PGPASSWORD" not in pg:
        pg["PGPASSWORD"] = os.environ["PGPASSWORD"]
    return child_env(pg)


def _passfile_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


@contextmanager
def passfile_env(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """``env`` with its PGPASSWORD moved into a passfile of its own (mode 0600,
    removed afterwards): for a child that runs what a person types (psql's ``\\!``
    shows its environment), the password is then not in that environment."""
    password = env.get("PGPASSWORD")
    if password is None:
        yield env
        return
    fd, path = tempfile.mkstemp(prefix="tenantctl-pgpass-")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"*:*:*:*:{_passfile_field(password)}\n")
        out = {k: v for k, v in env.items() if k != "PGPASSWORD"}
        out["PGPASSFILE"] = path
        yield out
    finally:
        os.unlink(path)


def tool_error(stderr: str) -> str | None:
    """The line that says what went wrong in a client tool's (pg_dump's) stderr: its
    last `error:` line (a `detail:` with the whole query may follow it). pg_dump
    bounds its wait for table locks (--lock-wait-timeout) with a statement timeout
    on its LOCK TABLE: that one is said as what it is."""
    lines = stderr.strip().splitlines()
    if "statement timeout" in stderr and "Query was: LOCK TABLE" in stderr:
        return "could not obtain lock on the tables within --lock-wait-timeout"
    errors = [ln for ln in lines if " error: " in ln or ln.startswith("error: ")]
    return (errors or lines)[-1] if lines else None


def open_connection(admin_dsn: str, dbname: str | None = None, *, server: str = "",
                    autocommit: bool = True, lock_timeout: str | None = None
                    ) -> psycopg.Connection:
    """An admin connection; with ``lock_timeout`` (a Postgres duration) no statement
    of it waits longer than that for a lock: give it on every connection that
    touches a tenant's objects, which a tenant's transaction may hold locked."""
    dsn = with_dbname(admin_dsn, dbname) if dbname else admin_dsn
    extra = {"options": f"-c lock_timeout={lock_timeout}"} if lock_timeout else {}
    try:
        return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=5,
                               application_name="tenantctl", **extra)  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        raise server_error(f"server {server or redact(dsn)}", exc) from None


def connection_slots(conn: psycopg.Connection) -> tuple[int, int]:
    """The server's max_connections, and how many of them it keeps from ordinary
    roles (superuser_reserved_connections, and reserved_connections from Postgres 16):
    what a connection budget is cut from."""
    row = conn.execute(
        "SELECT current_setting('max_connections')::int, "
        "current_setting('superuser_reserved_connections')::int + coalesce("
        "(SELECT setting::int FROM pg_settings WHERE name = 'reserved_connections'), 0)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@contextmanager
def connect(admin_dsn: str, dbname: str | None = None, *, server: str = "",
            autocommit: bool = True, lock_timeout: str | None = None
            ) -> Iterator[psycopg.Connection]:
    with open_connection(admin_dsn, dbname, server=server, autocommit=autocommit,
                         lock_timeout=lock_timeout) as conn:
        try:
            yield conn
        except psycopg.errors.LockNotAvailable as exc:
            if not lock_timeout or not dbname:
                raise
            # a wait that reached lock_timeout: a Conflict (exit 4) naming the holder
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            holders = ", ".join(lock_holders(conn, dbname)) or "a session that has gone since"
            raise Conflict(f"database {dbname}: {first_line(exc)} after {lock_timeout} "
                           f"(tenants.lock_wait_seconds); locked by {holders}") from None


class ConnectionCache:
    """Idle admin connections to each server's maintenance database, reused by one
    Fleet across operations (a SCRAM handshake costs milliseconds on every
    provisioning otherwise). Thread-safe; a connection idle for a while is
    pinged before reuse, so a restarted server costs a reconnect, not an error."""

    PING_AFTER = 30.0

    def __init__(self) -> None:
        self._idle: dict[str, list[tuple[psycopg.Connection, float]]] = {}
        self._lock = threading.Lock()

    def _checkout(self, server: str) -> psycopg.Connection | None:
        while True:
            with self._lock:
                idle = self._idle.get(server)
                if not idle:
                    return None
                conn, since = idle.pop()
            if conn.closed:
                continue
            if time.monotonic() - since < self.PING_AFTER:
                return conn
            try:
                conn.execute("SELECT 1")
                return conn
            except psycopg.Error:
                conn.close()

    @contextmanager
    def connection(self, server: str, admin_dsn: str) -> Iterator[psycopg.Connection]:
        conn = self._checkout(server) or open_connection(admin_dsn, server=server)
        reusable = False
        try:
            yield conn
            reusable = (not conn.closed and conn.info.transaction_status
                        == psycopg.pq.TransactionStatus.IDLE)
        finally:
            if reusable:
                with self._lock:
                    self._idle.setdefault(server, []).append((conn, time.monotonic()))
            else:
                conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn, _ in conns:
                conn.close()


def server_version(conn: psycopg.Connection) -> int:
    return conn.info.server_version


def role_exists(conn: psycopg.Connection, role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() \
        is not None


def database_owner(conn: psycopg.Connection, dbname: str) -> str | None:
    row = conn.execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (dbname,)
    ).fetchone()
    return row[0] if row else None


def role_comment(conn: psycopg.Connection, role: str) -> str | None:
    row = conn.execute(
        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s",
        (role,)).fetchone()
    return row[0] if row else None


# -- the fleet's mark on a server ----------------------------------------------------

FLEET_ROLE = "tenantctl_fleet"  # NOLOGIN; its COMMENT names the fleet the server is of
_FLEET_MARK = "tenantctl fleet "


def server_fleet_id(conn: psycopg.Connection) -> str | None:
    """The id of the fleet this server belongs to, as its mark says (None: unmarked).
    Readable by any role: a shared catalog."""
    comment = role_comment(conn, FLEET_ROLE)
    return comment.removeprefix(_FLEET_MARK) if comment and \
        comment.startswith(_FLEET_MARK) else None


def mark_fleet(conn: psycopg.Connection, fleet_id: str) -> str:
    """Mark an unmarked server as this fleet's: a NOLOGIN role whose comment holds
    the fleet id (a CREATEROLE admin may comment on a role it created). Returns
    the id the server carries afterwards (another's, if it was marked already)."""
    try:
        with conn.transaction():
            if not role_exists(conn, FLEET_ROLE):
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN; COMMENT ON ROLE {} IS {}").format(
                    Ident(FLEET_ROLE), Ident(FLEET_ROLE), sql.Literal(_FLEET_MARK + fleet_id)))
    except psycopg.errors.DuplicateObject:
        pass  # marked by a concurrent run: read what it wrote
    return server_fleet_id(conn) or fleet_id


def membership_grant(conn: psycopg.Connection, role: str) -> sql.Composed:
    """The statement that makes the admin role a member of ``role`` so it can SET ROLE
    to it, own objects through it, read what it owns and REASSIGN OWNED. Since
    Postgres 16 a CREATEROLE creator holds only ADMIN OPTION on roles it creates;
    INHERIT and SET must be granted."""
    if server_version(conn) >= 160000:
        stmt = sql.SQL("GRANT {} TO CURRENT_USER WITH INHERIT TRUE, SET TRUE")
    else:
        stmt = sql.SQL("GRANT {} TO CURRENT_USER")
    return stmt.format(Ident(role))


def grant_membership(conn: psycopg.Connection, role: str) -> None:
    """Run ``membership_grant`` (doctor's repair, provisioning, the template)."""
    conn.execute(membership_grant(conn, role))


def ensure_roles(conn: psycopg.Connection, names: TenantNames, marker: str) -> None:
    """The NOLOGIN owner role and the (still NOLOGIN) login role, both marked as ours,
    created in one transaction (roles are transactional: both or neither)."""
    with conn.transaction():
        for role in (names.owner_role, names.login_role):
            if role_exists(conn, role):
                if role_comment(conn, role) != marker:
                    raise Conflict(f"role {role!r} already exists on the server and does not "
                                   "belong to this tenant; refusing to adopt it")
                continue
            conn.execute(sql.SQL(
                "CREATE ROLE {} NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "NOBYPASSRLS NOINHERIT; COMMENT ON ROLE {} IS {}").format(
                    Ident(role), Ident(role), sql.Literal(marker)))
        grant_membership(conn, names.owner_role)
        # the login role may own large objects (creating one needs no privilege):
        # the admin, which dumps the database, must be able to read them
        grant_membership(conn, names.login_role)


def ensure_database(conn: psycopg.Connection, names: TenantNames, *,
                    template: str | None) -> bool:
    """CREATE DATABASE owned by the tenant's owner role, cloned from ``template`` (the
    server's template database at head) or from template0. True if created now.

    CREATE DATABASE cannot run in a transaction and grants CONNECT to PUBLIC. So
    the database is born closed (ALLOW_CONNECTIONS false), PUBLIC is revoked, and
    only then is it opened: a crash in between leaves it closed, never open to
    every role on the server. A re-run repeats the revoke and the opening.
    """
    owner = database_owner(conn, names.database)
    created = owner is None
    if owner is not None and owner != names.owner_role:
        raise Conflict(f"database {names.database!r} already exists, owned by {owner!r}, "
                       "not by this tenant; refusing to adopt it")
    if created:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE {} STRATEGY WAL_LOG "
                             "ALLOW_CONNECTIONS false")
                     .format(Ident(names.database), Ident(names.owner_role),
                             Ident(template or "template0")))
    revoke_public(conn, names.database)
    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(
        Ident(names.database)))
    return created


def revoke_public(conn: psycopg.Connection, dbname: str) -> None:
    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(Ident(dbname)))


def set_connections(conn: psycopg.Connection, dbname: str, allow: bool) -> None:
    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
        Ident(dbname), sql.SQL("true" if allow else "false")))


def drop_database(conn: psycopg.Connection, dbname: str, *, if_exists: bool = False) -> None:
    """Dropped even with sessions open (WITH FORCE ends them)."""
    conn.execute(sql.SQL("DROP DATABASE {}{} WITH (FORCE)").format(
        sql.SQL("IF EXISTS " if if_exists else ""), Ident(dbname)))


def drop_marked_tenant(conn: psycopg.Connection, names: TenantNames, marker: str) -> None:
    """Remove a tenant that was never finished: its database if its owner role owns
    it, and its roles only if they carry ``marker`` (ours, for this tenant)."""
    if database_owner(conn, names.database) == names.owner_role:
        drop_database(conn, names.database)
    drop_marked_roles(conn, names, marker)


def drop_marked_roles(conn: psycopg.Connection, names: TenantNames, marker: str) -> None:
    """The tenant's login and owner roles, each only if it carries ``marker``."""
    for role in (names.login_role, names.owner_role):
        if role_exists(conn, role) and role_comment(conn, role) == marker:
            conn.execute(sql.SQL("DROP ROLE {}").format(Ident(role)))


def make_side_database(conn: psycopg.Connection, names: TenantNames, side: str,
                       leftovers: tuple[str, ...]) -> None:
    """An empty database ``side`` owned by the tenant's owner role, closed to PUBLIC,
    to restore into next to the live one; ``leftovers`` of a run that died (a side
    copy, a closed live database) go first and the live database is reopened."""
    for leftover in leftovers:
        drop_database(conn, leftover, if_exists=True)
    set_connections(conn, names.database, True)
    conn.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0 "
                         "ALLOW_CONNECTIONS false").format(Ident(side), Ident(names.owner_role)))
    revoke_public(conn, side)
    set_connections(conn, side, True)


def swap_in(conn: psycopg.Connection, live: str, side: str, old: str) -> None:
    """Close ``live`` and end its sessions, then, in one transaction, rename it to
    ``old`` and ``side`` to ``live``: a reader sees one database or the other."""
    set_connections(conn, live, False)
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE datname = %s AND pid <> pg_backend_pid()", (live,))
    with conn.transaction():
        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(Ident(live), Ident(old)))
        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(Ident(side), Ident(live)))


def revoke_connect(conn: psycopg.Connection, dbname: str, role: str) -> None:
    conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM {}").format(
        Ident(dbname), Ident(role)))


def strip_role_powers(conn: psycopg.Connection, role: str) -> None:
    conn.execute(sql.SQL("ALTER ROLE {} NOCREATEDB NOCREATEROLE").format(Ident(role)))


def revoke_membership(conn: psycopg.Connection, parent: str, role: str) -> None:
    conn.execute(sql.SQL("REVOKE {} FROM {}").format(Ident(parent), Ident(role)))


def drop_role(conn: psycopg.Connection, role: str) -> None:
    """DROP ROLE as it is: refused while the role owns anything or holds privileges
    elsewhere (then the remedy stays manual; nothing is forced)."""
    conn.execute(sql.SQL("DROP ROLE {}").format(Ident(role)))


def make_scratch_database(conn: psycopg.Connection, dbname: str) -> None:
    """An empty database only the admin may use, for a test restore (a leftover of
    a run that died goes first)."""
    drop_database(conn, dbname, if_exists=True)
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(Ident(dbname)))
    revoke_public(conn, dbname)


def reassign_from_template(conn: psycopg.Connection, names: TenantNames) -> None:
    """Run in a fresh clone: everything the template owner created becomes the
    tenant owner's. (The template database itself belongs to the admin role, so
    this never touches a shared object.)"""
    if not role_exists(conn, TEMPLATE_OWNER):
        return  # no template was ever built on this server: nothing to take over
    conn.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(
        Ident(TEMPLATE_OWNER), Ident(names.owner_role)))


def on_alembic_version(stmt: sql.Composable) -> sql.Composed:
    """``stmt`` as one statement that runs it only in a database that has an
    alembic_version table (no round trip to ask first)."""
    return sql.SQL("DO $$ BEGIN IF to_regclass('public.alembic_version') IS NOT NULL "
                   "THEN EXECUTE {}; END IF; END $$").format(sql.Literal(stmt.as_string(None)))


def secure_tenant_database(conn: psycopg.Connection, names: TenantNames,
                           dbname: str | None = None) -> None:
    """Run in the tenant's own database (one multi-statement query, so atomic even
    outside a transaction): lock PUBLIC out, give the login role DML, nothing else.

    The login role owns nothing and holds no grant option, so revoking its write
    privileges later (a hold) really takes them away.
    """
    owner, login = Ident(names.owner_role), Ident(names.login_role)
    # database-level grants belong to the database object: a side copy about to be
    # renamed into place needs its own
    db = Ident(dbname or names.database)
    stmts = [
        sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db),
        sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(db, login),
        sql.SQL("GRANT CONNECT ON DATABASE {} TO CURRENT_USER").format(db),
        sql.SQL("REVOKE ALL ON SCHEMA public FROM PUBLIC"),
        sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(login),
        # The admin holds these already, through the owner role. Granted directly,
        # Postgres's privilege check takes its fast path instead of walking every
        # role the admin belongs to (one per tenant on the server) in each fresh
        # backend: ~1.6 ms of server CPU per `migrate status` read at 500 tenants.
        sql.SQL("GRANT USAGE ON SCHEMA public TO CURRENT_USER"),
        sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA public TO {}").format(DML, login),
        sql.SQL("GRANT {} ON ALL SEQUENCES IN SCHEMA public TO {}").format(SEQ, login),
        sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public "
                "GRANT {} ON TABLES TO {}").format(owner, DML, login),
        sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public "
                "GRANT {} ON SEQUENCES TO {}").format(owner, SEQ, login),
        # the application may read its schema revision, never set it: a tenant that
        # wrote alembic_version could make rollouts skip it or fail on it
        on_alembic_version(sql.SQL("REVOKE ALL ON public.alembic_version FROM {}; "
                                   "GRANT SELECT ON public.alembic_version TO {}; "
                                   "GRANT SELECT ON public.alembic_version TO CURRENT_USER")
                           .format(login, login)),
        revision_marks.PUBLISH_CURRENT,  # the revision the database is at, as its mark
        large_objects_to_login(conn, names),  # after a hold, or restored as the owner's
    ]
    # one round trip: these run on every provisioning
    conn.execute(sql.SQL(";\n").join(stmts))


# -- large objects ------------------------------------------------------------------
#
# Creating a large object needs no privilege in Postgres and a non-superuser cannot
# take EXECUTE on lo_* away, so a tenant's login role (or a support role) may own
# some. The model: the application's large objects belong to its login role; the
# admin, which dumps the database, is a member of the login role (INHERIT), so it
# reads them. The hold takes them over (owner role, SELECT for the login role);
# `secure_tenant_database` hands them back, restored ones included (pg_restore
# --role makes them the owner role's).

_ROLE_OID = "(SELECT oid FROM pg_roles WHERE rolname = {})"


def _do(body: sql.Composable) -> sql.Composed:
    return sql.SQL("DO {}").format(sql.Literal(body.as_string(None)))


def large_objects_to_login(conn: psycopg.Connection, names: TenantNames) -> sql.Composed:
    """The statement (run in the tenant's database) that gives the login role back the
    large objects the owner role holds; nothing to do costs one index probe."""
    owner, login = sql.Literal(names.owner_role), sql.Literal(names.login_role)
    return _do(sql.SQL(
        "DECLARE o oid; BEGIN "
        "IF EXISTS (SELECT FROM pg_largeobject_metadata WHERE lomowner = " + _ROLE_OID + ") "
        "THEN EXECUTE {}; "
        "FOR o IN SELECT oid FROM pg_largeobject_metadata WHERE lomowner = " + _ROLE_OID +
        " LOOP EXECUTE format('ALTER LARGE OBJECT %s OWNER TO %I', o, {}); END LOOP; "
        "END IF; END").format(owner, sql.Literal(membership_grant(conn, names.login_role)
                                                 .as_string(None)), owner, login))


def large_objects_read_only(conn: psycopg.Connection, names: TenantNames) -> sql.Composed:
    """The statement (run in the tenant's database) that makes every large object of
    the tenant's roles the owner role's, readable but not writable (nor unlinkable)
    by the login role: the hold's share of large objects."""
    owner, login = sql.Literal(names.owner_role), sql.Literal(names.login_role)
    return _do(sql.SQL(
        "DECLARE o oid; BEGIN "
        "IF EXISTS (SELECT FROM pg_largeobject_metadata WHERE lomowner = " + _ROLE_OID + ") "
        "THEN EXECUTE {}; END IF; "
        "FOR o IN SELECT oid FROM pg_largeobject_metadata WHERE lomowner IN ("
        + _ROLE_OID + ", " + _ROLE_OID + ") LOOP "
        "EXECUTE format('ALTER LARGE OBJECT %s OWNER TO %I', o, {}); "
        "EXECUTE format('REVOKE ALL ON LARGE OBJECT %s FROM %I', o, {}); "
        "EXECUTE format('GRANT SELECT ON LARGE OBJECT %s TO %I', o, {}); "
        "END LOOP; END").format(login, sql.Literal(membership_grant(conn, names.login_role)
                                                   .as_string(None)),
                                login, owner, owner, login, login))


def restrict_large_objects(conn: psycopg.Connection, names: TenantNames) -> None:
    """Run in the tenant's database during the hold: large objects made since the hold
    began (creating one needs no privilege) become read-only like the rest."""
    conn.execute(large_objects_read_only(conn, names))


def restrict_to_reads(conn: psycopg.Connection, names: TenantNames,
                      dbname: str | None = None) -> None:
    """Run in the tenant's database: the login role keeps SELECT and loses every
    write, on existing tables and on those a migration creates later, on its large
    objects and its temporary tables. Open sessions feel it at their next statement.
    `secure_tenant_database` undoes it."""
    owner, login = Ident(names.owner_role), Ident(names.login_role)
    conn.execute(sql.SQL(";\n").join([
        large_objects_read_only(conn, names),
        sql.SQL("REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER "
                "ON ALL TABLES IN SCHEMA public FROM {}").format(login),
        sql.SQL("REVOKE USAGE, UPDATE ON ALL SEQUENCES IN SCHEMA public FROM {}").format(login),
        # temporary tables are writes too (and disk): gone for the hold, regranted by
        # secure_tenant_database
        sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM {}").format(
            Ident(dbname or names.database), login),
        sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public "
                "REVOKE INSERT, UPDATE, DELETE ON TABLES FROM {}").format(owner, login),
        sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public "
                "REVOKE USAGE, UPDATE ON SEQUENCES FROM {}").format(owner, login),
    ]))


def can_set_parameter(conn: psycopg.Connection, name: str) -> bool:
    if server_version(conn) >= 150000:
        stmt = "SELECT has_parameter_privilege(%s, 'SET')"
        row = conn.execute(stmt, (name,)).fetchone()
    else:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
                           ).fetchone()
    return bool(row and row[0])


_LOGICAL_READINESS = """
SELECT current_setting('server_version_num')::int, current_setting('wal_level'),
       coalesce((SELECT rolreplication FROM pg_roles WHERE rolname = current_user), false),
       CASE WHEN to_regrole('pg_create_subscription') IS NULL THEN false
            ELSE pg_has_role(to_regrole('pg_create_subscription'), 'USAGE') END,
       current_setting('max_replication_slots')::int,
       current_setting('max_wal_senders')::int,
       coalesce((SELECT pending_restart FROM pg_settings WHERE name = 'wal_level'), false)
"""


def logical_readiness(conn: psycopg.Connection) -> LogicalReadiness:
    """What the server and its admin role offer the logical move method (one query)."""
    row = conn.execute(_LOGICAL_READINESS).fetchone()
    assert row is not None
    return LogicalReadiness(*row)


def settable(conn: psycopg.Connection, settings: dict[str, str]) -> dict[str, str]:
    """The part of ``settings`` the admin may store on a role."""
    return {k: v for k, v in settings.items()
            if k not in SUSET_SETTINGS or can_set_parameter(conn, k)}


def bound_role(conn: psycopg.Connection, role: str, connection_limit: int,
               settings: dict[str, str]) -> None:
    """The role's CONNECTION LIMIT, and exactly ``settings`` as its role settings
    (every other one it carries, in any database, reset), in one transaction. Call
    with what ``settable`` left of the configured settings."""
    ident = Ident(role)
    per_db = [r[0] for r in conn.execute(
        "SELECT d.datname FROM pg_db_role_setting s JOIN pg_database d ON "
        "d.oid = s.setdatabase WHERE s.setrole = (SELECT oid FROM pg_roles WHERE "
        "rolname = %s)", (role,))]
    stmts = [sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(
                 ident, sql.Literal(connection_limit)),
             sql.SQL("ALTER ROLE {} RESET ALL").format(ident)]
    stmts += [sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(ident, Ident(db))
              for db in per_db]
    stmts += [sql.SQL("ALTER ROLE {} SET {} = {}").format(ident, Ident(name),
                                                          sql.Literal(value))
              for name, value in sorted(settings.items())]
    conn.execute(sql.SQL(";\n").join(stmts))


def role_works(dsn: str) -> bool | None:
    """Whether a login with this connection string works: True, False when the
    server refuses the password, None when it cannot tell (server full, the role's
    connection limit reached, NOLOGIN, the server unreachable)."""
    try:
        psycopg.connect(dsn, connect_timeout=5, application_name="tenantctl").close()
        return True
    except psycopg.OperationalError as exc:
        state = getattr(exc, "sqlstate", None)
        if state == "28P01" or (state is None and "password authentication failed"
                                in str(exc)):
            return False
        return None


def set_login(conn: psycopg.Connection, role: str, allowed: bool) -> None:
    """LOGIN or NOLOGIN; taking it away also ends the role's open sessions (NOLOGIN
    alone only stops new ones)."""
    conn.execute(sql.SQL("ALTER ROLE {} " + ("LOGIN" if allowed else "NOLOGIN")).format(
        Ident(role)))
    if not allowed:
        terminate_sessions(conn, role=role)


def terminate_sessions(conn: psycopg.Connection, *, role: str | None = None,
                       database: str | None = None, wait: bool = False) -> int:
    """End the sessions of a role, in a database, or of a role in a database (the
    admin role holds pg_signal_backend for this). With ``wait``, until they are
    gone, their locks released (a few seconds at most; Postgres ≥ 14)."""
    where = [sql.SQL("{} = %s").format(Ident(column)) for column, value in
             (("usename", role), ("datname", database)) if value is not None]
    assert where, "a role, a database or both"
    rows = conn.execute(
        sql.SQL("SELECT {} FROM pg_stat_activity WHERE {} AND pid <> pg_backend_pid()")
        .format(_terminate(conn, wait), sql.SQL(" AND ").join(where)),
        [v for v in (role, database) if v is not None]).fetchall()
    return len(rows)


# databases where a role owns objects or holds privileges: one shared catalog says
# it for the whole cluster; the admin may hand what it owns to the database's owner
# when it has that owner's privileges (a tenant database: the tenant's owner role)
_ROLE_DATABASES = """
SELECT DISTINCT d.datname, pg_get_userbyid(d.datdba), pg_has_role(d.datdba, 'USAGE')
FROM pg_shdepend s JOIN pg_database d ON d.oid = s.dbid
WHERE s.refclassid = 'pg_authid'::regclass
  AND s.refobjid = (SELECT oid FROM pg_roles WHERE rolname = %s)
ORDER BY 1
"""


def drop_role_everywhere(conn: psycopg.Connection, admin_dsn: str, role: str, *,
                         server: str = "", lock_timeout: str | None = None) -> None:
    """Drop a role that may own things (a support role that made a large object):
    in every database where it owns objects or holds privileges, REASSIGN OWNED
    BY it TO that database's owner (what it made in a tenant's database stays the
    tenant's), then DROP OWNED BY it (what is left, and its privileges); then
    DROP ROLE. Call it once the role's sessions are ended (terminate_sessions with
    ``wait``). Idempotent."""
    if not role_exists(conn, role):
        return
    ident = Ident(role)
    conn.execute(membership_grant(conn, role))  # REASSIGN/DROP OWNED need its privileges
    for dbname, heir, may_act_as_heir in conn.execute(_ROLE_DATABASES, (role,)).fetchall():
        stmts = []
        if may_act_as_heir and heir != role:
            stmts.append(sql.SQL("REASSIGN OWNED BY {} TO {}").format(ident, Ident(heir)))
        stmts.append(sql.SQL("DROP OWNED BY {}").format(ident))
        with connect(admin_dsn, dbname, server=server, lock_timeout=lock_timeout) as dconn:
            dconn.execute(sql.SQL(";\n").join(stmts))
    # privileges on shared objects (CONNECT on its database), and this database's
    conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))


def terminate_other_sessions(conn: psycopg.Connection, database: str) -> int:
    """End every session in ``database`` but the admin role's own (tenantctl's): the
    tenant's, a support role's, whoever may hold a lock there; and wait until they
    are gone (a few seconds at most; Postgres ≥ 14)."""
    rows = conn.execute(
        sql.SQL("SELECT {} FROM pg_stat_activity WHERE datname = %s "
                "AND usename <> current_user AND pid <> pg_backend_pid()")
        .format(_terminate(conn, True)), (database,)).fetchall()
    return len(rows)


def _terminate(conn: psycopg.Connection, wait: bool) -> sql.Composable:
    if wait and server_version(conn) >= 140000:
        return sql.SQL("pg_terminate_backend(pid, 5000)")  # bounded: a warning, not a hang
    return sql.SQL("pg_terminate_backend(pid)")


def lock_holders(conn: psycopg.Connection, database: str) -> list[str]:
    """Who holds a lock in ``database`` that blocks readers (an ACCESS EXCLUSIVE lock
    on a relation, granted, in another session): one line each — pid, role, state
    and since when — for the error of a wait that timed out."""
    rows = conn.execute(
        "SELECT DISTINCT a.pid, a.usename, a.state, coalesce(a.xact_start, a.backend_start) "
        "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "JOIN pg_database d ON d.oid = l.database "
        "WHERE d.datname = %s AND l.granted AND l.locktype = 'relation' "
        "AND l.mode = 'AccessExclusiveLock' AND l.pid <> pg_backend_pid() "
        "ORDER BY 1", (database,)).fetchall()
    return [f"pid {pid} (role {role}, {state} since {since.isoformat(timespec='seconds')})"
            if state and since else
            f"pid {pid} (role {role}; its state is hidden: grant pg_read_all_stats to the "
            "admin role)" for pid, role, state, since in rows]


def scram_verifier(conn: psycopg.Connection, role: str, password: str) -> str:
    """The verifier tenantctl computes itself (domain.pooler): the same string goes to
    a pooler's auth file, which PgBouncer needs to reach the server as the role."""
    return password_verifier(password)


def set_password(conn: psycopg.Connection, role: str, password: str) -> None:
    """Change the password only; whether the role may log in is left as it is."""
    verifier = scram_verifier(conn, role, password)
    conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
        Ident(role), sql.Literal(verifier)))


def enable_login(conn: psycopg.Connection, role: str, password: str) -> None:
    verifier = scram_verifier(conn, role, password)
    conn.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(
        Ident(role), sql.Literal(verifier)))


# -- the per-server template database ---------------------------------------------


def cluster_identity(conn: psycopg.Connection) -> str:
    """The cluster ``conn`` reached, the same whichever server entry or address led
    there: two entries of the config may name one cluster (a small region sharing
    another's), and the template database, its spares and its locks are the
    cluster's. Its system identifier (set by initdb; any role may read it unless an
    operator revoked pg_control_system), else the address the server reports."""
    query = "SELECT system_identifier FROM pg_control_system()"
    try:
        if conn.autocommit:  # one round trip
            row = conn.execute(query).fetchone()
        else:
            with conn.transaction():  # a savepoint: a refusal spoils no transaction
                row = conn.execute(query).fetchone()
        if row is not None and row[0] is not None:
            return f"sysid:{row[0]}"
    except psycopg.errors.InsufficientPrivilege:
        pass
    row = conn.execute("SELECT inet_server_addr()::text, inet_server_port()").fetchone()
    host, port = (row[0], row[1]) if row is not None and row[0] is not None else \
        (conn.info.host, conn.info.port)
    return f"addr:{host}:{port}"



def ensure_template_owner(conn: psycopg.Connection) -> None:
    if not role_exists(conn, TEMPLATE_OWNER):
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(Ident(TEMPLATE_OWNER)))
    grant_membership(conn, TEMPLATE_OWNER)


def ensure_template_database(conn: psycopg.Connection) -> bool:
    """The template database exists. True if created now.

    The database itself belongs to the admin role (it toggles ALLOW_CONNECTIONS);
    everything inside, public schema included, belongs to the template owner role.
    A clone then hands all of it to the tenant's owner with one REASSIGN OWNED,
    which never touches the template database itself.
    """
    admin = conn.execute("SELECT current_user").fetchone()
    assert admin is not None
    owner = database_owner(conn, TEMPLATE_DB)
    if owner is not None:
        if owner != admin[0]:
            raise Conflict(f"database {TEMPLATE_DB!r} exists but is owned by {owner!r}")
        return False
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(Ident(TEMPLATE_DB)))
    revoke_public(conn, TEMPLATE_DB)
    return True


def set_template_connections(conn: psycopg.Connection, allow: bool) -> None:
    """Templates stay closed (datallowconn = false) except during their own upgrade:
    CREATE DATABASE … TEMPLATE fails while anyone is connected to the template."""
    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
        Ident(TEMPLATE_DB), sql.SQL("true" if allow else "false")))
    if not allow:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (TEMPLATE_DB,))


def template_open(conn: psycopg.Connection) -> bool:
    """The template accepts connections (a build is under way, or one died)."""
    row = conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s",
                       (TEMPLATE_DB,)).fetchone()
    return bool(row and row[0])


def prepare_template_schema(conn: psycopg.Connection) -> None:
    """Run in the template: the template owner owns the public schema (so it can
    create objects there, and a clone's REASSIGN OWNED passes the schema on), and
    PUBLIC has no access to it in any future clone."""
    conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(Ident(TEMPLATE_OWNER)))
    conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
