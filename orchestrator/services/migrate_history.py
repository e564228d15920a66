"""`tenantctl migrate history`: the tenant schema's revisions (from the migration
files: id, parents, message, heads) against the fleet: which is the fleet's
target (and each region's), and how many tenants and which templates are at
each. Where tenants and templates stand is read as `migrate status` reads it
(the revision marks on each server), so the two commands agree."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.adapters.catalog.reads import CatalogReads
from orchestrator.adapters.postgres import revision_files
from orchestrator.domain.revisions import heads, history_rows
from orchestrator.services.migrate_status import fleet_status


@dataclass
class History:
    heads: list[str]
    fleet_target: str | None
    region_targets: dict[str, str | None]
    revisions: list[dict[str, Any]]  # first to heads (domain.revisions.history_rows)
    tenants: int
    # tenants at a revision the files do not have (base, or one since removed)
    elsewhere: dict[str, int] = field(default_factory=dict)
    unreadable: int = 0
    templates: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def migrate_history(reads: CatalogReads) -> History:
    status = fleet_status(reads)
    revs = revision_files.revisions(reads.cfg.tenant_migrations)
    known = {r.id for r in revs}
    rows = history_rows(revs, fleet_target=status.target,
                        region_targets=status.region_targets, tenants=status.revisions,
                        templates={t["server"]: t["revision"] for t in status.templates})
    return History(heads=heads(revs), fleet_target=status.target,
                   region_targets=status.region_targets, revisions=rows,
                   tenants=status.tenants,
                   elsewhere={rev: n for rev, n in status.revisions.items()
                              if rev not in known},
                   unreadable=len(status.unreachable), templates=status.templates)
