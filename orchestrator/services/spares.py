"""Spare tenants: a server's next sign-ups, made ahead of demand.

A sign-up that clones the template then takes the clone over (REASSIGN OWNED,
grants, default privileges) spends most of its time writing relation files and
connecting to the new database. With ``tenants.spare_databases = N`` each
server keeps N spares that are already all of that except for their names: a
clone of the template with its own owner role (which owns the database and,
after REASSIGN OWNED, everything in it) and its own NOLOGIN login role holding
the tenant grants. Taking one is a single transaction of renames — database,
owner role, login role — plus the tenant's role markers and opening the
database. Ownership, grants and default privileges refer to OIDs, so they
survive the renames; a crash leaves either the spare or the tenant's objects.
The pool is topped up afterwards, off the sign-up's path.

A spare's database name carries a tag of the template revision it was cloned
at (``tenantctl_spare_<tag>_<id>``; its roles are ``tenantctl_spare_<id>_owner``
and ``_login``), so it is only taken by a sign-up whose target is that
revision; spares of other revisions are dropped when the pool is next filled.
A spare counts as ready once it carries the revision mark of what it holds
(written with its grants, see revision_marks) and is closed (ALLOW_CONNECTIONS
false, last): a fill that died half-way leaves something the next fill drops.
Taking a spare keeps the mark, which is the tenant's from then on. Spares hold
nothing but the template's contents, and their names are outside the tenant
name space (``tenant_*``, ``owner_*``), so they are never mistaken for a tenant
or an orphan.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from orchestrator.adapters.faults import checkpoint
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import revision_marks
from orchestrator.domain.names import TEMPLATE_DB, TenantNames
from orchestrator.services import templates

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

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


def _make(conn: psycopg.Connection, admin_dsn: str, server: str, spare: Spare) -> None:
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
    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
        Ident(own.database)))


def _drop(conn: psycopg.Connection, spare: Spare) -> None:
    own = spare.names
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(Ident(own.database)))
    # the roles own nothing outside their (dropped) database
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}, {}").format(
        Ident(own.owner_role), Ident(own.login_role)))


def _spare_roles(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)",
                        (SPARE_PREFIX,)).fetchall()
    return [r[0] for r in rows]


def fill(fleet: Deps, server: str, want: int | None = None) -> int:
    """Top the server's pool up to ``want`` (default: the configured size) ready
    spares at the template's current revision, dropping spares of any other
    revision, half-built ones and any beyond ``want``. Only while the template is at
    the region's target; returns how many were made. The pool, like the template it
    is cloned from, is the cluster's: server entries naming one cluster share it,
    and its lock."""
    want = fleet.cfg.spare_databases if want is None else want
    sc = fleet.cfg.server(server)
    with pgserver.connect(sc.admin_dsn, server=server) as conn:
        cluster = pgserver.cluster_identity(conn)
        with fleet.catalog.advisory_lock(f"spares:{cluster}") as mine:
            if not mine:
                return 0  # another process is filling this pool right now
            with fleet.catalog.advisory_lock(templates.lock_name(cluster), shared=True,
                                             wait=True):
                revision = fleet.target_revision(sc.region)
                keep = spare_prefix(revision) if templates.at_revision(conn, revision) \
                    else None
                found = list_spares(conn)
                kept = [s for s in found if keep and s.ready and s.revision == revision
                        and s.database.startswith(keep)][:want]
                for spare in found:
                    if spare not in kept:
                        _drop(conn, spare)
                ours = {role for s in found
                        for role in (s.names.owner_role, s.names.login_role)}
                for role in _spare_roles(conn):
                    if role not in ours:  # a fill died between making the roles and the clone
                        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(Ident(role)))
                if keep is None:
                    return 0
                for _ in range(want - len(kept)):
                    _make(conn, sc.admin_dsn, server, Spare(keep + secrets.token_hex(4)))
                return want - len(kept)
