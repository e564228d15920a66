"""Spare databases: clones of a server's template made ahead of demand.

``CREATE DATABASE … TEMPLATE`` creates every relation file of the new database,
and on a busy file system that is most of a sign-up's latency. With
``tenants.spare_databases = N`` each server keeps N closed clones of its
template; provisioning renames one into place and hands it to the tenant's
owner role in one transaction (no file is touched), and the pool is topped up
afterwards, off the sign-up's path.

A spare's name carries a tag of the template revision it was cloned at, so a
spare is only ever used while the template is still at that revision; spares
of an older revision are dropped when the pool is next filled. Spares are
closed (ALLOW_CONNECTIONS false), owned by the admin role, with PUBLIC
revoked, and hold nothing but the template's contents: dropping one loses
nothing. They live outside the tenant name space (``tenant_*``), so they are
never mistaken for a tenant's database or an orphan.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from orchestrator import pgserver, templates
from orchestrator.names import TEMPLATE_DB, TenantNames

if TYPE_CHECKING:
    from orchestrator.api import Fleet

SPARE_PREFIX = "tenantctl_spare_"
Ident = sql.Identifier


def revision_tag(revision: str | None) -> str:
    return hashlib.sha256((revision or "base").encode()).hexdigest()[:10]


def spare_prefix(revision: str | None) -> str:
    return f"{SPARE_PREFIX}{revision_tag(revision)}_"


def list_spares(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s) "
                        "ORDER BY datname", (SPARE_PREFIX,)).fetchall()
    return [r[0] for r in rows]


def claim(conn: psycopg.Connection, names: TenantNames, revision: str | None) -> bool:
    """Make a spare cloned at ``revision`` the tenant's database, owned by its owner
    role, PUBLIC revoked — one transaction, so a crash leaves either a spare or the
    tenant's (still closed) database. The caller holds the template's shared lock
    and has checked the template is at ``revision``. False if none is left."""
    prefix = spare_prefix(revision)
    for spare in (s for s in list_spares(conn) if s.startswith(prefix)):
        try:
            with conn.transaction():
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    Ident(spare), Ident(names.database)))
                conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                    Ident(names.database), Ident(names.owner_role)))
                pgserver.revoke_public(conn, names.database)
            return True
        except (psycopg.errors.InvalidCatalogName, psycopg.errors.ObjectInUse):
            continue  # taken by another sign-up meanwhile, or somebody is in it
    return False


def fill(fleet: Fleet, server: str, want: int | None = None) -> int:
    """Top the server's pool up to ``want`` (default: the configured size) spares
    at the template's current revision, dropping spares of any other revision.
    Only while the template is at the region's target; returns how many were made."""
    want = fleet.cfg.spare_databases if want is None else want
    sc = fleet.cfg.server(server)
    with fleet.catalog.advisory_lock(f"spares:{server}") as mine:
        if not mine:
            return 0  # another process is filling this pool right now
        with fleet.catalog.advisory_lock(templates.lock_name(server), shared=True,
                                         wait=True), \
                pgserver.connect(sc.admin_dsn, server=server) as conn:
            revision = templates.template_revision(fleet, server)
            current = revision == fleet.target_revision(sc.region) and \
                pgserver.database_owner(conn, TEMPLATE_DB) is not None
            keep = spare_prefix(revision) if current else None
            found = list_spares(conn)
            kept = [s for s in found if keep and s.startswith(keep)][:want]
            for spare in found:
                if spare not in kept:  # another revision, or more than wanted
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(Ident(spare)))
            if keep is None:
                return 0
            made = 0
            for _ in range(want - len(kept)):
                spare = keep + secrets.token_hex(4)
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY WAL_LOG "
                                     "ALLOW_CONNECTIONS false").format(
                                         Ident(spare), Ident(TEMPLATE_DB)))
                pgserver.revoke_public(conn, spare)
                made += 1
            return made

