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

import secrets
from typing import TYPE_CHECKING

from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import spare_pool
from orchestrator.services import templates

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps


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
                keep = spare_pool.spare_prefix(revision) if templates.at_revision(conn, revision) \
                    else None
                found = spare_pool.list_spares(conn)
                kept = [s for s in found if keep and s.ready and s.revision == revision
                        and s.database.startswith(keep)][:want]
                for spare in found:
                    if spare not in kept:
                        spare_pool.drop(conn, spare)
                ours = {role for s in found
                        for role in (s.names.owner_role, s.names.login_role)}
                for role in spare_pool.spare_roles(conn):
                    if role not in ours:  # a fill died between making the roles and the clone
                        spare_pool.drop_role(conn, role)
                if keep is None:
                    return 0
                for _ in range(want - len(kept)):
                    spare_pool.make(conn, sc.admin_dsn, server,
                                    spare_pool.Spare(keep + secrets.token_hex(4)))
                return want - len(kept)
