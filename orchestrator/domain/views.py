"""How a tenant (and a backup) reads in `--json` and to API callers: stable keys
over any object with its fields (the catalog's ORM row or a plain read row)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def iso(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).isoformat() if dt else None


def tenant_json(t: Any) -> dict[str, Any]:
    """Stable keys for `--json` and for API callers."""
    return {
        "slug": t.slug, "region": t.region, "server": t.server, "database": t.database,
        "role": t.login_role, "owner_role": t.owner_role, "state": t.state,
        "revision": t.revision, "plan": t.plan, "over_quota": t.over_quota,
        "over_quota_since": iso(t.over_quota_since), "created_at": iso(t.created_at),
        "activated_at": iso(t.activated_at), "cancelled_at": iso(t.cancelled_at),
        "hold_until": iso(t.hold_until), "deleted_at": iso(t.deleted_at),
        "purge_after": iso(t.purge_after), "purged_at": iso(t.purged_at),
        "suspended_at": iso(t.suspended_at), "legal_hold": t.legal_hold,
        "legal_hold_reason": t.legal_hold_reason, "final_backup_id": t.final_backup_id,
        "provisioning_step": t.step, "last_error": t.last_error,
        "migration_error": t.migration_error,
        "migrated_at": iso(t.migrated_at),
    }


def backup_json(b: Any) -> dict[str, Any]:
    """`backup list --json`: one backup row (times in the session's zone, as read)."""
    return {"id": b.id, "tenant": b.slug, "region": b.region, "status": b.status,
            "kind": b.kind, "size": b.size, "sha256": b.sha256, "key_id": b.key_id,
            "revision": b.revision, "server_version": b.server_version,
            "store": b.store_url, "object": b.object_key,
            "created_at": b.started_at.isoformat() if b.started_at else None,
            "finished_at": b.finished_at.isoformat() if b.finished_at else None,
            "verified_at": b.verified_at.isoformat() if b.verified_at else None,
            "error": b.error}
