"""The audit log as operators read it (`tenantctl audit list`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from orchestrator.adapters.catalog.audit import storable
from orchestrator.adapters.catalog.models import AuditEvent
from orchestrator.bootstrap import Deps


def events(fleet: Deps, *, tenant: str | None = None, since: datetime | None = None,
           action: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    q = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    if tenant:
        q = q.where(AuditEvent.tenant == storable(tenant, "tenant"))
    if since:
        q = q.where(AuditEvent.at >= since)
    if action:
        q = q.where(AuditEvent.action.startswith(storable(action, "action"),
                                                 autoescape=True))
    with fleet.catalog.session() as s:
        rows = list(s.scalars(q))
    return [{"id": e.id, "at": e.at.isoformat(), "actor": e.actor, "action": e.action,
             "tenant": e.tenant, "region": e.region, "outcome": e.outcome,
             "detail": e.detail} for e in rows]
