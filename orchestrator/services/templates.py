"""Per-server template databases, kept at the head revision so that a new tenant
is one ``CREATE DATABASE … TEMPLATE`` away from ready, however long the
migration history.

A template belongs to a Postgres *cluster*, not to a server entry of the
config: two entries may name one cluster (a small region sharing another's
server, or every entry of a test fleet pointed at one external server), and
they then share one ``tenantctl_template``. So its lock is keyed by the
cluster's identity (``pgserver.cluster_identity``), and its revision is read from
the cluster itself, from the revision mark the migration writes on the template
database in the same transaction (the catalog's ``servers.template_revision`` is
bookkeeping for display). Clones take a shared advisory lock on the cluster's
template, upgrades an exclusive one: an upgrade never runs while a clone copies
the template, two upgrades never run at once, and a clone never sees a
half-upgraded template. Entries of one cluster in regions with different target
revisions share one template: a sign-up finding it at another revision rebuilds
it to its own (correct, but a migration each time the other region signs up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import update

from orchestrator.adapters import clock
from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.catalog.models import Server
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import alembic_runner as tenant_migrations
from orchestrator.adapters.postgres import revision_marks
from orchestrator.domain.names import TEMPLATE_DB, TEMPLATE_OWNER

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps


def lock_name(cluster: str) -> str:
    """The template lock of a cluster (``pgserver.cluster_identity``)."""
    return f"template:{cluster}"


def marked_revision(conn: psycopg.Connection) -> tuple[bool, str | None]:
    """(the cluster's template exists and carries a revision mark, that revision;
    None: base). Read it under the template lock for an answer that holds."""
    marks = revision_marks.published(conn, [TEMPLATE_DB])
    return TEMPLATE_DB in marks, marks.get(TEMPLATE_DB)


def at_revision(conn: psycopg.Connection, revision: str | None) -> bool:
    marked, found = marked_revision(conn)
    return marked and found == revision


def _address(admin_dsn: str) -> tuple[str, str]:
    d = conninfo_to_dict(admin_dsn)
    return str(d.get("hostaddr") or d.get("host") or "local"), str(d.get("port") or 5432)


def build(fleet: Deps, server: str, target: str | None = "head") -> str | None:
    """Create, upgrade or downgrade the template of the server's cluster to
    ``target`` (None: base); returns its revision. Waits for clones in flight and
    for another build on the same cluster to finish (exclusive lock); a template
    already marked at the target is left alone."""
    sc = fleet.cfg.server(server)
    wanted = tenant_migrations.resolve_revision(fleet.cfg.tenant_migrations, target or "base")
    with pgserver.connect(sc.admin_dsn, server=server) as conn:
        cluster = pgserver.cluster_identity(conn)
        with fleet.catalog.advisory_lock(lock_name(cluster), wait=True):
            if at_revision(conn, wanted) and pgserver.role_exists(conn, TEMPLATE_OWNER) \
                    and not pgserver.template_open(conn):
                revision = wanted  # (one left open by a build that died is redone)
            else:
                revision = _migrate_template(fleet, conn, sc.admin_dsn, server, wanted)
    # every entry that names the same address shares the template (bookkeeping only)
    sharing = [s.name for s in fleet.cfg.servers
               if _address(s.admin_dsn) == _address(sc.admin_dsn)]
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(Server).where(Server.name.in_(sorted({server, *sharing}))).values(
            template_revision=revision, template_updated_at=clock.utcnow()))
    fleet.catalog.audit("template.build", region=sc.region, server=server, revision=revision)
    return revision


def _migrate_template(fleet: Deps, conn: psycopg.Connection, admin_dsn: str, server: str,
                      target: str | None) -> str | None:
    """Under the cluster's exclusive template lock: open the template, migrate it
    (which marks it), close it again whatever happened."""
    pgserver.ensure_template_owner(conn)
    pgserver.ensure_template_database(conn)
    pgserver.set_template_connections(conn, True)
    try:
        with pgserver.connect(admin_dsn, TEMPLATE_DB, server=server) as tconn, \
                tconn.transaction():
            pgserver.prepare_template_schema(tconn)
        dsn = with_dbname(admin_dsn, TEMPLATE_DB)
        with tenant_migrations.tenant_connection(dsn) as sconn:
            return tenant_migrations.migrate(
                sconn, fleet.cfg.tenant_migrations, target or "base",
                as_role=TEMPLATE_OWNER)
    finally:
        pgserver.set_template_connections(conn, False)
