"""The catalog port (``orchestrator.ports.CatalogPort``) over SQLAlchemy: the
repositories the lifecycle, retention and access services read through, one
transaction's writes, advisory locks and the audit log (both ``db.Catalog``'s)."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from orchestrator.adapters.catalog.db import Catalog
from orchestrator.adapters.catalog.models import (
    PLACED_STATES,
    AuditEvent,
    Backup,
    Server,
    SupportGrant,
    Tenant,
    TenantCredential,
    TenantKey,
    TenantMove,
)
from orchestrator.domain.errors import InvalidInput, NotFound
from orchestrator.domain.names import check_integrity, validate_slug
from orchestrator.domain.statuses import BackupStatus
from orchestrator.ports import BackupRecord, GrantRecord, ServerRecord, TenantRecord

# the dates ``TenantRepository.due`` and ``dated`` read by
_DATED = {"hold_until": Tenant.hold_until, "purge_after": Tenant.purge_after}


def _dated(column: str) -> Any:
    if column not in _DATED:
        raise InvalidInput(f"no dated column {column!r}")
    return _DATED[column]


class SqlTenants:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def get(self, slug: str) -> TenantRecord:
        validate_slug(slug)
        with self._catalog.session() as s:
            tenant = s.scalars(select(Tenant).where(Tenant.slug == slug)).one_or_none()
        if tenant is None:
            raise NotFound(f"no tenant {slug!r}")
        check_integrity(tenant)
        return tenant

    def due(self, state: str, column: str, now: datetime) -> list[TenantRecord]:
        # answered by the column's partial index (see models.Tenant)
        col = _dated(column)
        with self._catalog.session() as s:
            return list(s.scalars(select(Tenant).where(Tenant.state == state, col <= now)
                                  .order_by(col)))

    def dated(self, state: str, column: str, *, limit: int | None = None
              ) -> list[TenantRecord]:
        col = _dated(column)
        q = select(Tenant).where(Tenant.state == state, col.is_not(None)).order_by(col)
        with self._catalog.session() as s:
            return list(s.scalars(q.limit(limit) if limit else q))

    def count_by_state(self) -> dict[str, int]:
        with self._catalog.session() as s:
            return {state: n for state, n in s.execute(
                select(Tenant.state, func.count()).group_by(Tenant.state)).all()}


class SqlBackups:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def of_tenant(self, tenant_id: int) -> list[BackupRecord]:
        with self._catalog.session() as s:
            return list(s.scalars(select(Backup).where(Backup.tenant_id == tenant_id)))

    def any_since(self, tenant_id: int, since: datetime | None,
                  statuses: Collection[str]) -> bool:
        with self._catalog.session() as s:
            return s.scalar(select(Backup.id).where(
                Backup.tenant_id == tenant_id, Backup.status.in_(statuses),
                Backup.started_at >= since).limit(1)) is not None


class SqlGrants:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def get(self, grant_id: int) -> GrantRecord | None:
        with self._catalog.session() as s:
            return s.get(SupportGrant, grant_id)

    def listed(self, *, include_ended: bool = False) -> list[GrantRecord]:
        q = select(SupportGrant).order_by(SupportGrant.id)
        if not include_ended:
            q = q.where(SupportGrant.dropped_at.is_(None))
        with self._catalog.session() as s:
            return list(s.scalars(q))

    def live(self, *, tenant_id: int | None = None, read_write: bool | None = None,
             expired_at: datetime | None = None) -> list[GrantRecord]:
        q = select(SupportGrant).where(SupportGrant.dropped_at.is_(None))
        if tenant_id is not None:
            q = q.where(SupportGrant.tenant_id == tenant_id)
        if read_write is not None:
            q = q.where(SupportGrant.read_only.is_(not read_write))
        if expired_at is not None:
            q = q.where(SupportGrant.expires_at <= expired_at)
        with self._catalog.session() as s:
            return list(s.scalars(q.order_by(SupportGrant.id)))


class SqlServers:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def get(self, name: str) -> ServerRecord:
        with self._catalog.session() as s:
            server = s.get(Server, name)
        if server is None:
            raise NotFound(f"no server {name!r}")
        return server

    def in_region(self, region: str) -> list[ServerRecord]:
        with self._catalog.session() as s:
            return list(s.scalars(select(Server).where(Server.region == region)
                                  .order_by(Server.name)))

    def placed(self, region: str) -> list[TenantRecord]:
        with self._catalog.session() as s:
            return list(s.scalars(select(Tenant).where(
                Tenant.region == region, Tenant.state.in_(PLACED_STATES))
                .order_by(Tenant.slug)))

    def unfinished_moves(self, region: str) -> dict[str, str]:
        with self._catalog.session() as s:
            return {slug: to for slug, to in s.execute(
                select(TenantMove.slug, TenantMove.to_server).where(
                    TenantMove.from_region == region, TenantMove.finished_at.is_(None)))}


class SqlWrites:
    """One session's writes; committed by ``SqlCatalog.transaction`` as one."""

    def __init__(self, catalog: Catalog, session: Session) -> None:
        self._catalog, self._s = catalog, session

    def update_tenant(self, tenant_id: int, **values: Any) -> None:
        self._s.execute(update(Tenant).where(Tenant.id == tenant_id).values(**values))

    def delete_credential(self, tenant_id: int) -> None:
        self._s.execute(delete(TenantCredential).where(TenantCredential.tenant_id == tenant_id))

    def destroy_key(self, tenant_id: int, now: datetime) -> None:
        self._s.execute(update(TenantKey).where(TenantKey.tenant_id == tenant_id).values(
            identity_wrapped=None, master_key_id=None, destroyed_at=now))

    def mark_backups_deleted(self, tenant_id: int) -> None:
        self._s.execute(update(Backup).where(Backup.tenant_id == tenant_id,
                                             Backup.status != BackupStatus.deleted)
                        .values(status=BackupStatus.deleted))

    def add_grant(self, *, tenant_id: int, slug: str, server: str, grantee: str,
                  reason: str, read_only: bool, expires_at: datetime) -> int:
        g = SupportGrant(tenant_id=tenant_id, slug=slug, server=server, role_name="",
                         grantee=grantee, reason=reason, read_only=read_only,
                         actor=self._catalog.actor, expires_at=expires_at)
        self._s.add(g)
        self._s.flush()
        return g.id

    def update_grant(self, grant_id: int, **values: Any) -> None:
        self._s.execute(update(SupportGrant).where(SupportGrant.id == grant_id)
                        .values(**values))

    def update_server(self, name: str, **values: Any) -> None:
        self._s.execute(update(Server).where(Server.name == name).values(**values))

    def audit(self, action: str, *, tenant: str | None = None, region: str | None = None,
              outcome: str = "ok", at: datetime | None = None, **detail: Any) -> None:
        self._catalog.audit(action, tenant=tenant, region=region, outcome=outcome,
                            session=self._s, at=at, **detail)


class SqlCatalog:
    """``ports.CatalogPort`` over the catalog database (``db.Catalog``)."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._tenants = SqlTenants(catalog)
        self._backups = SqlBackups(catalog)
        self._grants = SqlGrants(catalog)
        self._servers = SqlServers(catalog)

    @property
    def tenants(self) -> SqlTenants:
        return self._tenants

    @property
    def backups(self) -> SqlBackups:
        return self._backups

    @property
    def grants(self) -> SqlGrants:
        return self._grants

    @property
    def servers(self) -> SqlServers:
        return self._servers

    @contextmanager
    def transaction(self) -> Iterator[SqlWrites]:
        with self._catalog.session() as s, s.begin():
            yield SqlWrites(self._catalog, s)

    def advisory_lock(self, name: str, *, shared: bool = False, wait: bool = False
                      ) -> AbstractContextManager[bool]:
        return self._catalog.advisory_lock(name, shared=shared, wait=wait)

    def audit(self, action: str, *, tenant: str | None = None, region: str | None = None,
              outcome: str = "ok", at: datetime | None = None, **detail: Any) -> None:
        self._catalog.audit(action, tenant=tenant, region=region, outcome=outcome, at=at,
                            **detail)

    def audit_count_before(self, cutoff: datetime) -> int:
        with self._catalog.session() as s:
            return s.scalar(select(func.count()).select_from(AuditEvent)
                            .where(AuditEvent.at < cutoff,
                                   AuditEvent.recorded_at < cutoff)) or 0

    def purge_audit_before(self, cutoff: datetime, batch: int) -> int:
        with self._catalog.session() as s, s.begin():
            ids = select(AuditEvent.id).where(AuditEvent.at < cutoff,
                                              AuditEvent.recorded_at < cutoff).limit(batch)
            result = s.execute(delete(AuditEvent).where(AuditEvent.id.in_(ids)))
            return int(result.rowcount)  # type: ignore[attr-defined]
