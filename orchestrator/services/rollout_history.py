"""`tenantctl migrate rollouts [show ID]`: past rollouts as the catalog holds them
(each rollout and its per-tenant outcome), read with the psycopg-only reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.adapters.catalog.reads import CatalogReads, RolloutRow, RolloutTenantRow
from orchestrator.domain.errors import FIELD, InvalidInput, NotFound
from orchestrator.domain.revisions import BASE
from orchestrator.domain.statuses import TenantMigration

ENDED = (TenantMigration.ok, TenantMigration.skipped, TenantMigration.failed)

MAX_LIMIT = 1000
ID_MAX = 2**63 - 1  # rollout ids are bigints


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass
class RolloutView:
    row: RolloutRow
    tenants: list[RolloutTenantRow] | None = None  # with `show`
    errors: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        r = self.row
        out: dict[str, Any] = {
            "id": r.id, "status": r.status, "started_at": _iso(r.created_at),
            "finished_at": _iso(r.finished_at), "actor": r.actor,
            "from": [rev or BASE for rev in r.from_revisions], "to": r.target or BASE,
            "counts": dict(sorted(r.counts.items())), "total": sum(r.counts.values()),
            "options": r.options}
        if self.tenants is not None:
            out["tenants"] = [{
                "slug": t.slug, "server": t.server, "wave": t.wave, "status": t.status,
                "from": t.from_revision or BASE,
                # where it ended (a failed tenant stays where it was); None: not yet
                "to": (t.to_revision or BASE) if t.status in ENDED else None,
                "attempts": t.attempts,
                "started_at": _iso(t.started_at), "finished_at": _iso(t.finished_at),
                "duration_ms": t.duration_ms, "worker": t.worker, "error": t.error}
                for t in self.tenants]
            out["errors"] = self.errors
        return out


def _number(value: int | str, name: str | None) -> int:
    """A whole number given as text (the read commands parse their own: typer's int
    coercion imports pydantic, ~0.15 s of their start-up) or as an int."""
    if isinstance(value, int):
        return value
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        # an argument has no option to name: its message says what it is
        raise InvalidInput(f"{FIELD if name else 'a rollout id'} must be a whole number, "
                           f"not {value!r}", field=name)
    return int(text)


def list_rollouts(reads: CatalogReads, limit: int | str = 20) -> list[RolloutView]:
    """The last ``limit`` rollouts, newest first."""
    count = _number(limit, "limit")
    if not 1 <= count <= MAX_LIMIT:
        raise InvalidInput(f"{FIELD} must be 1-{MAX_LIMIT}", field="limit")
    return [RolloutView(row) for row in reads.rollouts(count)]


def show_rollout(reads: CatalogReads, rollout_id: int | str) -> RolloutView:
    """One rollout with every tenant's outcome, and its errors counted (the same error
    on many tenants is one line to read)."""
    rollout_id = _number(rollout_id, None)
    if not 1 <= rollout_id <= ID_MAX:
        raise NotFound(f"no rollout {rollout_id}")
    row = reads.rollout(rollout_id)
    if row is None:
        raise NotFound(f"no rollout {rollout_id}")
    tenants = reads.rollout_tenants(rollout_id)
    errors: dict[str, int] = {}
    for t in tenants:
        if t.status == TenantMigration.failed and t.error:
            errors[t.error] = errors.get(t.error, 0) + 1
    return RolloutView(row, tenants, dict(sorted(errors.items(), key=lambda e: -e[1])))
