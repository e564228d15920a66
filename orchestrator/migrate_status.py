"""`tenantctl migrate status`: where every tenant's schema stands, read live.

Each tenant's ``alembic_version`` is read concurrently (bounded per server, one
short connection per tenant), and the catalog's last known revision is
refreshed from what was read.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import select, update

from orchestrator.catalog import with_dbname
from orchestrator.errors import first_line
from orchestrator.models import Server, Tenant
from orchestrator.rollout import MIGRATABLE

if TYPE_CHECKING:
    from orchestrator.api import Fleet

READ_VERSION = """
SELECT CASE WHEN to_regclass('public.alembic_version') IS NULL THEN NULL
            ELSE (SELECT version_num FROM public.alembic_version) END
"""


@dataclass
class StatusReport:
    head: str | None
    target: str | None
    tenants: int
    revisions: dict[str, int]
    behind: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    unreachable: list[dict[str, Any]] = field(default_factory=list)
    templates: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _read(fleet: Fleet, t: Tenant, gates: dict[str, threading.Semaphore]
          ) -> tuple[str | None, str | None]:
    """(revision, error) of one tenant database."""
    dsn = with_dbname(fleet.cfg.server(t.server).admin_dsn, t.database)
    with gates[t.server]:
        try:
            with psycopg.connect(dsn, connect_timeout=5, autocommit=True,
                                 application_name="tenantctl-status") as conn:
                row = conn.execute(READ_VERSION).fetchone()
                return (row[0] if row else None), None
        except psycopg.Error as exc:
            return None, first_line(exc)


def fleet_status(fleet: Fleet, region: str | None = None, *, concurrency: int = 16,
                 per_server: int = 8) -> StatusReport:
    if region is not None:
        fleet.cfg.region(region)
    q = select(Tenant).where(Tenant.state.in_(MIGRATABLE)).order_by(Tenant.slug)
    if region:
        q = q.where(Tenant.region == region)
    with fleet.catalog.session() as s:
        tenants = list(s.scalars(q))
        servers = list(s.scalars(select(Server).order_by(Server.region, Server.name)))
    gates = {sc.name: threading.Semaphore(per_server) for sc in fleet.cfg.servers}
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(tenants)))) as pool:
        reads = list(pool.map(lambda t: _read(fleet, t, gates), tenants))

    head = fleet.head_revision
    report = StatusReport(head=head, target=fleet.target_revision(region),
                          tenants=len(tenants), revisions={})
    counts: Counter[str] = Counter()
    changed: list[tuple[int, str | None]] = []
    for t, (revision, error) in zip(tenants, reads, strict=True):
        where = {"slug": t.slug, "region": t.region, "server": t.server}
        if error is not None:
            report.unreachable.append({**where, "error": error,
                                       "last_known_revision": t.revision})
            continue
        counts[revision or "base"] += 1
        if revision != t.revision:
            changed.append((t.id, revision))
        if revision != head:
            report.behind.append({**where, "revision": revision})
        if t.migration_error:
            report.failed.append({**where, "revision": revision, "error": t.migration_error,
                                  "at": t.migrated_at.isoformat() if t.migrated_at else None})
    report.revisions = dict(sorted(counts.items()))
    report.templates = [{"server": sv.name, "region": sv.region,
                         "revision": sv.template_revision} for sv in servers
                        if region is None or sv.region == region]
    if changed:
        with fleet.catalog.session() as s, s.begin():
            for tenant_id, revision in changed:
                s.execute(update(Tenant).where(Tenant.id == tenant_id)
                          .values(revision=revision))
    return report
