"""The catalog: the orchestrator's own database and single source of truth.

Schema changes go through Alembic revisions in migrations/catalog; the test
suite checks that these models and the revisions agree.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from orchestrator.domain.states import (  # noqa: F401 - re-exported for the catalog's users
    CANCELLING,
    PLACED_STATES,
    UNSHOWN,
    TenantState,
)
from orchestrator.domain.statuses import BackupStatus, RolloutStatus, TenantMigration


def one_of(column: str, values: type[enum.StrEnum]) -> str:
    """A CHECK constraint's SQL: ``column`` holds one of the enum's words (the same
    text the catalog's migrations wrote)."""
    return f"{column} IN ({','.join(repr(str(v)) for v in values)})"


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Region(Base):
    __tablename__ = "regions"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    backup_store: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()

    servers: Mapped[list[Server]] = relationship(back_populates="region_row")


class Server(Base):
    __tablename__ = "servers"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    region: Mapped[str] = mapped_column(ForeignKey("regions.name"), index=True)
    capacity: Mapped[int] = mapped_column(Integer)
    # false when removed from the config or drained: no new tenants go there
    available: Mapped[bool] = mapped_column(Boolean, server_default="true")
    # revision the template database is at; NULL while there is no usable template
    template_revision: Mapped[str | None] = mapped_column(String(64))
    template_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()

    region_row: Mapped[Region] = relationship(back_populates="servers")

    __table_args__ = (CheckConstraint("capacity > 0", name="capacity_positive"),)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    slug: Mapped[str] = mapped_column(String(40), unique=True)
    region: Mapped[str] = mapped_column(ForeignKey("regions.name"), index=True)
    server: Mapped[str] = mapped_column(ForeignKey("servers.name"), index=True)
    database: Mapped[str] = mapped_column(String(63))
    login_role: Mapped[str] = mapped_column(String(63))
    owner_role: Mapped[str] = mapped_column(String(63))
    state: Mapped[str] = mapped_column(String(20), index=True)
    # last provisioning step completed; lets a re-run resume after a crash (of a live
    # tenant: CANCELLING or UNSHOWN, else NULL)
    step: Mapped[str | None] = mapped_column(String(40))
    revision: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    hold_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    purge_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # set when the tenant was created from a backup (restore --as) instead of the template
    restored_from: Mapped[int | None] = mapped_column(BigInteger)
    # the last migration that failed for this tenant (cleared by a successful one)
    migration_error: Mapped[str | None] = mapped_column(Text)
    migrated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    legal_hold: Mapped[bool] = mapped_column(Boolean, server_default="false")
    legal_hold_reason: Mapped[str | None] = mapped_column(Text)
    suspended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the verified backup a deletion rests on (kept until the purge)
    final_backup_id: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now())
    # the [plans.NAME] its login role is held to ("default": [tenants]' bounds)
    plan: Mapped[str] = mapped_column(String(40), server_default="default")
    # writes revoked for being past its plan's storage_quota (services/quota.py): a
    # flag beside the state, so leaving it never re-opens a hold
    over_quota: Mapped[bool] = mapped_column(Boolean, server_default="false")
    over_quota_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    credential: Mapped[TenantCredential | None] = relationship(
        back_populates="tenant", cascade="all, delete-orphan")

    __table_args__ = (
        CheckConstraint(one_of("state", TenantState), name="state_known"),
        # retention planning reads only the due rows, whatever the fleet's size
        Index("ix_tenants_hold_due", "hold_until",
              postgresql_where=text("state = 'cancelled'")),
        Index("ix_tenants_purge_due", "purge_after",
              postgresql_where=text("state = 'deleted'")),
    )


class TenantCredential(Base):
    """The login role's password, wrapped by the master key (never stored in clear)."""

    __tablename__ = "tenant_credentials"

    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    password_wrapped: Mapped[str] = mapped_column(Text)
    master_key_id: Mapped[str] = mapped_column(String(32))
    # set once the role actually has this password (the catalog is written first)
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()

    tenant: Mapped[Tenant] = relationship(back_populates="credential")


class AuditEvent(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(),
                                         nullable=False, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(60), index=True)
    tenant: Mapped[str | None] = mapped_column(String(40), index=True)
    region: Mapped[str | None] = mapped_column(String(40))
    outcome: Mapped[str] = mapped_column(String(20), server_default="ok")
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")


class FleetSetting(Base):
    """Fleet-wide settings the orchestrator itself decides, e.g. the schema revision
    new tenants are created at (set by rollouts; head when unset)."""

    __tablename__ = "fleet_settings"

    key: Mapped[str] = mapped_column(String(60), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now())


class Rollout(Base):
    """One fleet-wide migration to a target revision. Several processes may work on
    the same rollout at once; they claim its tenants row by row."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # same command, same key: a re-run attaches to the unfinished rollout
    key: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str | None] = mapped_column(String(64))
    options: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    status: Mapped[str] = mapped_column(String(20))
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(one_of("status", RolloutStatus), name="status_known"),
    )


class RolloutTenant(Base):
    """A tenant's place and result in a rollout."""

    __tablename__ = "rollout_tenants"

    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    slug: Mapped[str] = mapped_column(String(40))
    server: Mapped[str] = mapped_column(String(63))
    wave: Mapped[int] = mapped_column(Integer)  # 0 = canary
    seq: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), server_default="pending")
    from_revision: Mapped[str | None] = mapped_column(String(64))
    to_revision: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(one_of("status", TenantMigration), name="status_known"),
        Index("ix_rollout_tenants_claim", "rollout_id", "wave", "status", "seq"),
    )


class TenantKey(Base):
    """A tenant's age key pair. Backups are encrypted to ``recipient`` alone; the
    identity is stored wrapped by the master key, and destroying it (purge,
    erasure) makes every copy of every backup of the tenant unreadable."""

    __tablename__ = "tenant_keys"

    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16))
    recipient: Mapped[str] = mapped_column(Text)
    identity_wrapped: Mapped[str | None] = mapped_column(Text)
    master_key_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = _now()
    destroyed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Backup(Base):
    """One backup object (and its manifest) in the tenant's region store. Only a
    completed backup whose manifest and checksum match is ever restorable."""

    __tablename__ = "backups"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    slug: Mapped[str] = mapped_column(String(40))
    region: Mapped[str] = mapped_column(String(40))
    store_url: Mapped[str] = mapped_column(Text)
    object_key: Mapped[str] = mapped_column(Text)
    manifest_key: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(20), server_default="manual")
    status: Mapped[str] = mapped_column(String(20), index=True)
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(16))
    server_version: Mapped[str | None] = mapped_column(String(40))
    pg_dump_version: Mapped[str | None] = mapped_column(String(80))
    revision: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(one_of("status", BackupStatus), name="status_known"),
        Index("ix_backups_tenant_finished", "tenant_id", "finished_at",
              postgresql_where=text("status = 'completed'")),
    )


class SupportGrant(Base):
    """Time-limited access of a named person to one tenant's database, through a
    temporary login role whose password expires (VALID UNTIL) with the grant."""

    __tablename__ = "support_grants"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    slug: Mapped[str] = mapped_column(String(40))
    server: Mapped[str] = mapped_column(String(63))
    role_name: Mapped[str] = mapped_column(String(63))
    grantee: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    read_only: Mapped[bool] = mapped_column(Boolean, server_default="true")
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the role is gone from the server (revoked, expired, or its tenant deleted)
    dropped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_support_grants_live", "expires_at",
              postgresql_where=text("dropped_at IS NULL")),
    )


class SchedulerJob(Base):
    """The scheduler's cadence: each job's last counted run (domain/jobs.py
    next_run_at), so a new leader schedules it from there."""

    __tablename__ = "scheduler_jobs"

    job: Mapped[str] = mapped_column(String(40), primary_key=True)
    last_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_outcome: Mapped[str] = mapped_column(String(20))
    instance: Mapped[str] = mapped_column(String(300))


class UsageSample(Base):
    """One tenant's usage in one period (orchestrator/domain/usage.py): the metered
    deltas summed over the period's collections, the peaks seen, and the raw
    pg_stat_database counters (with what identifies their series) of its last
    collection, which the next collection's delta is taken from."""

    __tablename__ = "usage_samples"

    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    slug: Mapped[str] = mapped_column(String(40))
    server: Mapped[str] = mapped_column(String(63))
    collected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    samples: Mapped[int] = mapped_column(Integer)
    storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    storage_bytes_peak: Mapped[int | None] = mapped_column(BigInteger)
    connections: Mapped[int] = mapped_column(Integer)
    connections_peak: Mapped[int] = mapped_column(Integer)
    transactions: Mapped[int] = mapped_column(BigInteger)
    rows_written: Mapped[int] = mapped_column(BigInteger)
    rows_read: Mapped[int] = mapped_column(BigInteger)
    # the last collection's raw counters and their series
    datid: Mapped[int] = mapped_column(BigInteger)
    stats_reset: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    xact_commit: Mapped[int] = mapped_column(BigInteger)
    xact_rollback: Mapped[int] = mapped_column(BigInteger)
    tup_inserted: Mapped[int] = mapped_column(BigInteger)
    tup_updated: Mapped[int] = mapped_column(BigInteger)
    tup_deleted: Mapped[int] = mapped_column(BigInteger)
    tup_returned: Mapped[int] = mapped_column(BigInteger)
    tup_fetched: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        # the retention purge and the period queries (totals, export, metrics)
        Index("ix_usage_samples_period_start", "period_start"),
    )
