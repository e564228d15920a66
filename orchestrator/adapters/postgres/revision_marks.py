"""A tenant database's schema revision, published on its server.

Reading ``alembic_version`` means a connection to each tenant database, and a
Postgres backend costs its server a few milliseconds of CPU to start and end:
at 1,000 tenants that is most of what `migrate status` spent. So every step
that can change a database's ``alembic_version`` through tenantctl (a
migration, taking over a clone or a spare, a restore) also writes the revision
it leaves as the database's COMMENT, in the same transaction. Database comments
live in a shared catalog (``pg_shdescription``), so one connection per server
reads them all.

The mark cannot disagree with ``alembic_version`` as tenantctl leaves it: both
commit together or not at all. It is written as the admin (the database owner
or a member of it); a tenant's login role can neither change
``alembic_version`` nor comment on its database. A database without a mark (a
tenant from before marks existed, or a clone not yet taken over) is read live.
``migrate status --live`` reads every database itself, the way to see an
``alembic_version`` changed by hand outside tenantctl, and rewrites any mark that
is missing or disagrees with what it read.
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg
from psycopg import sql

from orchestrator.domain.marks import BASE, PREFIX, mark, parse


def publish(conn: psycopg.Connection, revision: str | None) -> None:
    """Mark the database ``conn`` is connected to, inside the caller's transaction.
    Runs as the session user for the rest of that transaction: a migration runs
    as the owner role, and the template database belongs to the admin."""
    conn.execute(sql.SQL("SET LOCAL ROLE NONE; COMMENT ON DATABASE {} IS {}").format(
        sql.Identifier(conn.info.dbname), sql.Literal(mark(revision))))


# One statement run inside a database: mark it with what its alembic_version says
# now (base when it has none). secure_tenant_database runs it with its grants.
PUBLISH_CURRENT = sql.SQL(
    "DO $$ DECLARE rev text; BEGIN "
    "IF to_regclass('public.alembic_version') IS NOT NULL THEN "
    "SELECT version_num INTO rev FROM public.alembic_version LIMIT 1; END IF; "
    "EXECUTE format('COMMENT ON DATABASE %I IS %L', current_database(), "
    "{} || coalesce(rev, {})); END $$").format(sql.Literal(PREFIX), sql.Literal(BASE))


def republish(conn: psycopg.Connection) -> str | None:
    """Mark the database ``conn`` is connected to with what its alembic_version says
    now; returns that revision. For a mark found missing or wrong (`migrate status
    --live`). The database's comment is taken first: a migration that has already
    written its mark holds it, so this waits for that migration to commit and then
    reads what it left; one that has not yet written its mark writes it after us."""
    with conn.transaction():
        # Read committed: the read after the wait must see what committed meanwhile.
        # A lock timeout: a migration that altered alembic_version itself would wait
        # on us while we wait on it.
        conn.execute(sql.SQL("SET TRANSACTION ISOLATION LEVEL READ COMMITTED; "
                             "SET LOCAL lock_timeout = '5s'; "
                             "COMMENT ON DATABASE {} IS NULL").format(
            sql.Identifier(conn.info.dbname)))
        conn.execute(PUBLISH_CURRENT)
        row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                           "WHERE datname = current_database()").fetchone()
    return parse(row[0] if row else None)[1]


def published(conn: psycopg.Connection, databases: Iterable[str]) -> dict[str, str | None]:
    """The marked revision of each of ``databases`` on ``conn``'s server that has a
    mark (revision None: base); unmarked databases are left out."""
    rows = conn.execute(
        "SELECT d.datname, c.description FROM pg_database d "
        "JOIN pg_shdescription c ON c.objoid = d.oid "
        "AND c.classoid = 'pg_database'::regclass "
        "WHERE d.datname = ANY(%s) AND starts_with(c.description, %s)",
        (list(databases), PREFIX)).fetchall()
    return {database: parse(comment)[1] for database, comment in rows}
