"""Storage quota: what the `usage` job does about one tenant's measured size (pure).

A tenant past its plan's ``storage_quota`` loses its writes the way a hold takes
them (reads go on); it gets them back by itself once a measurement is under the
quota again, or its plan's quota is raised or removed. ``over_quota`` is a flag
beside the lifecycle state, never a state: the quota acts only on an active
tenant, so a tenant on hold (cancelled), suspended or gone is left as its
lifecycle made it — leaving over-quota never re-opens a hold, and a hold never
clears the flag (reactivating an over-quota tenant keeps it read-only until the
quota releases it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from orchestrator.domain.states import CANCELLING, TenantState

# the share of the quota at which a tenant is warned about ([usage] quota_warning)
DEFAULT_WARNING = 0.8


class QuotaAction(enum.StrEnum):
    enforce = "enforce"  # past the quota, writes still given: revoke them
    release = "release"  # flagged, under the quota now (or none): give them back
    keep = "keep"  # flagged and still past the quota: nothing to do
    warn = "warn"  # under the quota, at or past the warning share of it
    ok = "ok"  # under the warning share, or no quota
    skip = "skip"  # not the quota's to judge (not active, a step in flight, no size)


class QuotaLevel(enum.StrEnum):
    """How a size stands against a quota, for display (show, report, metrics)."""

    over = "over"
    warning = "warning"
    ok = "ok"


@dataclass(frozen=True)
class QuotaDecision:
    action: QuotaAction
    reason: str
    used: float | None = None  # size / quota; None: no quota or no size


def level(size: int | None, quota: int | None, warning: float = DEFAULT_WARNING
          ) -> QuotaLevel | None:
    """Where ``size`` stands against ``quota``; None without a quota or a size. Past
    the quota is strictly more than it: a quota of 10MB holds 10MB."""
    if size is None or quota is None:
        return None
    if size > quota:
        return QuotaLevel.over
    if size >= warning * quota:
        return QuotaLevel.warning
    return QuotaLevel.ok


def used_share(size: int | None, quota: int | None) -> float | None:
    return None if size is None or not quota else size / quota


def decide(state: str, step: str | None, over_quota: bool, size: int | None,
           quota: int | None, warning: float = DEFAULT_WARNING) -> QuotaDecision:
    """What to do about a tenant in ``state`` (with ``step`` in flight, flagged
    ``over_quota`` or not) measured at ``size`` bytes, on a plan with ``quota`` bytes
    (None: no quota)."""
    used = used_share(size, quota)
    if state != TenantState.active:
        # a hold, a suspension or a deletion owns the privileges: the flag stays as
        # it is (a reactivated or resumed tenant is judged again at the next run)
        return QuotaDecision(QuotaAction.skip, f"{state}: not the quota's to change", used)
    if step == CANCELLING:
        return QuotaDecision(QuotaAction.skip, "a cancellation is under way", used)
    if quota is None:
        if over_quota:
            return QuotaDecision(QuotaAction.release, "its plan has no storage quota now")
        return QuotaDecision(QuotaAction.ok, "no storage quota")
    if size is None:
        return QuotaDecision(QuotaAction.skip, "its size is unknown", used)
    at = level(size, quota, warning)
    if at == QuotaLevel.over:
        if over_quota:
            return QuotaDecision(QuotaAction.keep, "still past its storage quota", used)
        return QuotaDecision(QuotaAction.enforce, "past its storage quota", used)
    if over_quota:
        return QuotaDecision(QuotaAction.release, "under its storage quota again", used)
    if at == QuotaLevel.warning:
        return QuotaDecision(QuotaAction.warn, f"at {used or 0:.0%} of its storage quota",
                             used)
    return QuotaDecision(QuotaAction.ok, "under its storage quota", used)


def writes_expected(state: str, step: str | None, over_quota: bool) -> bool | None:
    """Whether a tenant's login role should be able to write (doctor's drift check):
    an active or suspended tenant unless over its quota, never a cancelled one.
    None: not judged (a step in flight, no database)."""
    if step == CANCELLING:
        return None
    if state in (TenantState.active, TenantState.suspended):
        return not over_quota
    if state == TenantState.cancelled:
        return False
    return None


def storage_view(size: int | None, measured_at: str | None, quota: int | None,
                 warning: float = DEFAULT_WARNING) -> dict[str, object]:
    """`tenant show`'s storage keys: the last measured size (`usage collect`), the
    plan's quota, the share of it used (percent) and where that stands."""
    share = used_share(size, quota)
    at = level(size, quota, warning)
    return {"storage_bytes": size, "storage_measured_at": measured_at,
            "storage_quota": quota,
            "storage_used_percent": None if share is None else round(100 * share, 1),
            "quota_status": None if at is None else str(at)}


@dataclass(frozen=True)
class Standing:
    """A tenant with a database as the report and the metrics read it: its plan's
    quota and its last measured size."""

    slug: str
    server: str
    state: str
    over_quota: bool
    size: int | None
    quota: int | None

    def status(self, warning: float) -> QuotaLevel | None:
        """over when flagged (or measured past it on hold), else where the last size
        stands; None without a quota (and not flagged)."""
        at = level(self.size, self.quota, warning)
        return QuotaLevel.over if self.over_quota else at


def summarize(rows: Iterable[Standing], warning: float) -> dict[str, Any]:
    """The report's storage section: how many tenants have a quota, and those over it
    or at the warning share of it (largest share first)."""
    rows = list(rows)
    def item(r: Standing) -> dict[str, Any]:
        share = used_share(r.size, r.quota)
        return {"slug": r.slug, "server": r.server, "state": r.state, "size": r.size,
                "quota": r.quota, "over_quota": r.over_quota,
                "used_percent": None if share is None else round(100 * share, 1)}
    def by_share(r: Standing) -> tuple[float, str]:
        return (-(used_share(r.size, r.quota) or 0.0), r.slug)
    over = sorted((r for r in rows if r.status(warning) == QuotaLevel.over), key=by_share)
    warn = sorted((r for r in rows if r.status(warning) == QuotaLevel.warning), key=by_share)
    return {"quota_warning": warning, "with_quota": sum(r.quota is not None for r in rows),
            "over": [item(r) for r in over], "warning": [item(r) for r in warn]}


def server_counts(rows: Iterable[Standing], warning: float) -> dict[tuple[str, str], int]:
    """(server, over|warning) -> tenants: the metrics' bounded per-server gauge."""
    out: dict[tuple[str, str], int] = {}
    for r in rows:
        at = r.status(warning)
        if at in (QuotaLevel.over, QuotaLevel.warning):
            key = (r.server, str(at))
            out[key] = out.get(key, 0) + 1
    return out


def check_warning(value: object) -> float | None:
    """``value`` as a warning share (0 < w <= 1), or None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 < value <= 1 else None
