"""The statuses of backups and rollouts: StrEnums, so the catalog's values and the
JSON tenantctl prints stay the plain words they were (the catalog's CHECK
constraints are built from these enums)."""

from __future__ import annotations

import enum


class BackupStatus(enum.StrEnum):
    running = "running"  # a live process holds its lock; else a crash left it (reaped)
    completed = "completed"
    failed = "failed"
    deleted = "deleted"  # pruned, purged or erased: its objects are gone


# A BackupResult only, never a row: a scheduled backup another process took or that
# is no longer due.
BACKUP_SKIPPED = "skipped"


class RolloutStatus(enum.StrEnum):
    running = "running"
    completed = "completed"
    failed = "failed"
    stopped = "stopped"  # the canary failed or the failure budget was spent
    interrupted = "interrupted"


# A RolloutSummary only, never a row: nothing was written.
ROLLOUT_DRY_RUN = "dry-run"


class TenantMigration(enum.StrEnum):
    """The status of one tenant in a rollout (rollout_tenants.status)."""

    pending = "pending"
    running = "running"
    ok = "ok"
    skipped = "skipped"  # at the target already, or no longer migratable
    failed = "failed"

