"""Storage quota enforcement: what `usage collect` (and the scheduler's `usage` job)
and `tenant set-plan` do with a tenant's measured size. The rule is
orchestrator/domain/quota.py (``decide``); here its effects: past the quota the
login role loses its writes as in a hold (``ServerAdmin.restrict_to_reads``; reads
go on), under it again they come back (``secure_tenant_database``), each time the
server first, then the catalog's ``over_quota`` flag with an audit row, under the
tenant's lock. Both statements are idempotent, so a run killed between the two is
finished by the next one (and doctor reports the drift meanwhile)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from orchestrator.adapters.catalog import usage as usage_store
from orchestrator.adapters.catalog.locks import holding_tenant
from orchestrator.adapters.faults import checkpoint
from orchestrator.domain.errors import first_line
from orchestrator.domain.names import tenant_names
from orchestrator.domain.quota import (
    QuotaAction,
    QuotaDecision,
    Standing,
    decide,
    writes_expected,
)

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

# what each decision is called once carried out
DONE = {QuotaAction.enforce: "enforced", QuotaAction.release: "released",
        QuotaAction.keep: "over", QuotaAction.warn: "warning", QuotaAction.ok: "ok",
        QuotaAction.skip: "skipped"}


@dataclass(frozen=True)
class Measured:
    """A tenant as the catalog had it when its size was measured."""

    slug: str
    state: str
    step: str | None
    over_quota: bool
    plan: str
    size: int | None


@dataclass(frozen=True)
class QuotaOutcome:
    slug: str
    outcome: str  # enforced | released | over | warning | ok | skipped | failed
    size: int | None
    quota: int | None
    used: float | None
    reason: str

    @property
    def failed(self) -> bool:
        return self.outcome == "failed"

    def to_json(self) -> dict[str, Any]:
        return {"slug": self.slug, "outcome": self.outcome, "size": self.size,
                "quota": self.quota,
                "used": None if self.used is None else round(self.used, 4),
                "reason": self.reason}


def _quota_of(deps: Deps, plan: str) -> tuple[int | None, str | None]:
    """The plan's storage quota, or why there is none to judge by."""
    found = deps.cfg.plans.get(plan)
    if found is None:
        return None, f"its plan {plan!r} is not in the config"
    return found.storage_quota, None


def _decide(deps: Deps, m: Measured) -> tuple[QuotaDecision, int | None]:
    quota, missing = _quota_of(deps, m.plan)
    if missing is not None:
        return QuotaDecision(QuotaAction.skip, missing), None
    return decide(m.state, m.step, m.over_quota, m.size, quota,
                  deps.cfg.usage.quota_warning), quota


def judge(deps: Deps, measured: Iterable[Measured], now: datetime) -> list[QuotaOutcome]:
    """Each measured tenant's decision; those that change something (enforce,
    release) carried out, one tenant's failure its own outcome."""
    out = []
    for m in measured:
        d, quota = _decide(deps, m)
        if d.action in (QuotaAction.enforce, QuotaAction.release):
            try:
                out.append(apply(deps, m.slug, m.size, now, trigger="usage collect"))
            except Exception as exc:  # noqa: BLE001 - one tenant's failure is its own
                out.append(QuotaOutcome(m.slug, "failed", m.size, quota, d.used,
                                        first_line(exc)))
        else:
            out.append(QuotaOutcome(m.slug, DONE[d.action], m.size, quota, d.used,
                                    d.reason))
    return out


def apply(deps: Deps, slug: str, size: int | None, now: datetime, *, trigger: str
          ) -> QuotaOutcome:
    """Decide again under the tenant's lock (the row re-read: a cancel may have come
    in since it was measured) and carry the decision out."""
    with holding_tenant(deps.records, slug):
        t = deps.records.tenants.get(slug)
        m = Measured(slug, t.state, t.step, t.over_quota, t.plan, size)
        d, quota = _decide(deps, m)
        names = tenant_names(slug)
        if d.action == QuotaAction.enforce:
            deps.admin.restrict_to_reads(t.server, names)
            checkpoint("quota.restricted")
            values: dict[str, Any] = {"over_quota": True, "over_quota_since": now}
        elif d.action == QuotaAction.release:
            deps.admin.secure_tenant_database(t.server, names)
            checkpoint("quota.released")
            values = {"over_quota": False, "over_quota_since": None}
        else:
            return QuotaOutcome(slug, DONE[d.action], size, quota, d.used, d.reason)
        with deps.records.transaction() as tx:
            tx.update_tenant(t.id, **values)
            tx.audit(f"tenant.quota.{d.action}", tenant=slug, region=t.region,
                     plan=t.plan, size=size, quota=quota, reason=d.reason, via=trigger)
    return QuotaOutcome(slug, DONE[d.action], size, quota, d.used, d.reason)


def sync_writes(deps: Deps, slug: str) -> str:
    """Make the login role's writes what the catalog says they are (doctor --fix of
    a quota drift): revoked for an over-quota or cancelled tenant, given otherwise."""
    with holding_tenant(deps.records, slug):
        t = deps.records.tenants.get(slug)
        expected = writes_expected(t.state, t.step, t.over_quota)
        if expected is None:
            return f"left as it is ({t.state}, step {t.step})"
        names = tenant_names(slug)
        if expected:
            deps.admin.secure_tenant_database(t.server, names)
            return "writes given back (within its quota)"
        deps.admin.restrict_to_reads(t.server, names)
        return "writes revoked (" + ("over its storage quota" if t.over_quota
                                     else f"{t.state}") + ")"


def standings(deps: Deps) -> list[Standing]:
    """Every tenant with a database, its plan's quota and its last measured size (one
    catalog query): what the report and the metrics say of quotas."""
    out = []
    for t in usage_store.metered_tenants(deps.catalog):
        plan = deps.cfg.plans.get(t.plan)
        out.append(Standing(t.slug, t.server, t.state, t.over_quota,
                            t.last_usage.storage_bytes if t.last_usage else None,
                            plan.storage_quota if plan else None))
    return out
