"""Per-server template databases, kept at the head revision so that a new tenant
is one ``CREATE DATABASE … TEMPLATE`` away from ready, however long the
migration history.

Clones take a shared advisory lock on the server's template, upgrades an
exclusive one: an upgrade never runs while a clone copies the template, and a
clone never sees a half-upgraded template.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import select

from orchestrator import pgserver, tenant_migrations
from orchestrator.catalog import with_dbname
from orchestrator.models import Server
from orchestrator.names import TEMPLATE_DB, TEMPLATE_OWNER

if TYPE_CHECKING:
    from orchestrator.api import Fleet


def lock_name(server: str) -> str:
    return f"template:{server}"


def template_revision(fleet: Fleet, server: str) -> str | None:
    with fleet.catalog.session() as s:
        row = s.get(Server, server)
        return row.template_revision if row else None


def build(fleet: Fleet, server: str, target: str | None = "head") -> str | None:
    """Create, upgrade or downgrade the server's template to ``target`` (None: base);
    returns its revision. Waits for clones in flight to finish (exclusive lock)."""
    sc = fleet.cfg.server(server)
    with fleet.catalog.advisory_lock(lock_name(server), wait=True):
        with pgserver.connect(sc.admin_dsn, server=server) as conn:
            pgserver.ensure_template_owner(conn)
            pgserver.ensure_template_database(conn)
            pgserver.set_template_connections(conn, True)
            try:
                with pgserver.connect(sc.admin_dsn, TEMPLATE_DB, server=server) as tconn, \
                        tconn.transaction():
                    pgserver.prepare_template_schema(tconn)
                dsn = with_dbname(sc.admin_dsn, TEMPLATE_DB)
                with tenant_migrations.tenant_connection(dsn) as sconn:
                    revision = tenant_migrations.migrate(
                        sconn, fleet.cfg.tenant_migrations, target or "base",
                        as_role=TEMPLATE_OWNER)
            finally:
                pgserver.set_template_connections(conn, False)
        with fleet.catalog.session() as s, s.begin():
            row = s.scalars(select(Server).where(Server.name == server)).one()
            row.template_revision = revision
            row.template_updated_at = datetime.now(UTC)
    fleet.catalog.audit("template.build", region=sc.region, server=server, revision=revision)
    return revision
