"""A server's pool of spare tenants (see orchestrator/services/spares.py for what
they are and why): listing, making, claiming and dropping them on the server."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import psycopg
from psycopg import sql

from orchestrator.adapters.faults import checkpoint
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import revision_marks
from orchestrator.domain.names import TEMPLATE_DB, TenantNames

SPARE_PREFIX = "tenantctl_spare_"
ROLE_MARKER = "tenantctl spare"
Ident = sql.Identifier


def revision_tag(revision: str | None) -> str:
    return hashlib.sha256((revision or "base").encode()).hexdigest()[:10]


def spare_prefix(revision: str | None) -> str:
    return f"{SPARE_PREFIX}{revision_tag(revision)}_"


@dataclass(frozen=True)
class Spare:
    database: str
    ready: bool = False
    revision: str | None = None  # as marked; None: base or unmarked

    @property
    def id(self) -> str:
        return self.database.rsplit("_", 1)[-1]

    @property
    def names(self) -> TenantNames:
        """Its own database and roles, shaped like a tenant's."""
        return TenantNames(database=self.database,
                           login_role=f"{SPARE_PREFIX}{self.id}_login",
                           owner_role=f"{SPARE_PREFIX}{self.id}_owner")


def list_spares(conn: psycopg.Connection) -> list[Spare]:
    rows = conn.execute(
        "SELECT datname, shobj_description(oid, 'pg_database'), datallowconn "
        "FROM pg_database WHERE starts_with(datname, %s) ORDER BY datname",
        (SPARE_PREFIX,)).fetchall()
    spares = []
    for name, comment, open_ in rows:
        marked, revision = revision_marks.parse(comment)
        spares.append(Spare(name, marked and not open_, revision))
    return spares


def claim(conn: psycopg.Connection, names: TenantNames, marker: str,
          revision: str | None) -> bool:
    """Turn a ready spare cloned at ``revision`` into the tenant's database and roles,
    marked with ``marker``, in one transaction. False if there is none to take, or
    if any of the tenant's names is already in use on the server (then the caller's
    ordinary steps adopt the tenant's own objects or refuse a stranger's)."""
    taken = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = %s) "
        "OR EXISTS (SELECT 1 FROM pg_roles WHERE rolname IN (%s, %s))",
        (names.database, names.owner_role, names.login_role)).fetchone()
    if taken is None or taken[0]:
        return False
    prefix = spare_prefix(revision)
    for spare in list_spares(conn):
        if not (spare.ready and spare.revision == revision
                and spare.database.startswith(prefix)):
            continue
        own = spare.names
        try:
            with conn.transaction():
                conn.execute(sql.SQL(";\n").join([
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        Ident(own.database), Ident(names.database)),
                    sql.SQL("ALTER ROLE {} RENAME TO {}").format(
                        Ident(own.owner_role), Ident(names.owner_role)),
                    sql.SQL("ALTER ROLE {} RENAME TO {}").format(
                        Ident(own.login_role), Ident(names.login_role)),
                    sql.SQL("COMMENT ON ROLE {} IS {}").format(
                        Ident(names.owner_role), sql.Literal(marker)),
                    sql.SQL("COMMENT ON ROLE {} IS {}").format(
                        Ident(names.login_role), sql.Literal(marker)),
                    sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(
                        Ident(names.database)),
                    # a spare made before the admin joined login roles (large objects)
                    pgserver.membership_grant(conn, names.login_role),
                ]))
            return True
        except (psycopg.errors.InvalidCatalogName, psycopg.errors.UndefinedObject,
                psycopg.errors.ObjectInUse):
            continue  # taken by another sign-up meanwhile, broken, or somebody is in it
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.DuplicateObject):
            return False  # one of the tenant's names appeared meanwhile
    return False


def make(conn: psycopg.Connection, admin_dsn: str, server: str, spare: Spare) -> None:
    """Build a spare the way provisioning builds a tenant (roles, clone, take-over,
    grants and revision mark), then close it: that makes it ready."""
    own = spare.names
    pgserver.ensure_roles(conn, own, ROLE_MARKER)
    checkpoint("spare.roles")
    pgserver.ensure_database(conn, own, template=TEMPLATE_DB)
    checkpoint("spare.cloned")
    # this connection also leaves the database's relcache init file behind, so the
    # tenant's first connection does not have to build it
    with pgserver.connect(admin_dsn, own.database, server=server) as sconn, \
            sconn.transaction():
        pgserver.reassign_from_template(sconn, own)
        pgserver.secure_tenant_database(sconn, own)
    pgserver.set_connections(conn, own.database, False)


def drop(conn: psycopg.Connection, spare: Spare) -> None:
    own = spare.names
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(Ident(own.database)))
    # the roles own nothing outside their (dropped) database
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}, {}").format(
        Ident(own.owner_role), Ident(own.login_role)))


def spare_roles(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)",
                        (SPARE_PREFIX,)).fetchall()
    return [r[0] for r in rows]


def drop_role(conn: psycopg.Connection, role: str) -> None:
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(Ident(role)))
