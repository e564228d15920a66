"""The tenant schema's revision history and where the fleet stands against it: pure
rules for `migrate history` and `migrate status --check` (no I/O; the adapters read
the revision files, the catalog and the servers).

- ``Revision``: one revision file (id, parents, message); ``history`` orders them
  from the first to the heads and says which are heads.
- ``target_of``: a tenant's target, its region's override else the fleet's.
- ``check``: what `migrate status --check` exits with, and why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.domain.errors import ExitCode

BASE = "base"  # how a database without any revision is shown


@dataclass(frozen=True)
class Revision:
    id: str
    parents: tuple[str, ...]
    message: str


def heads(revisions: Iterable[Revision]) -> list[str]:
    """The revisions no other revision names as its parent, sorted."""
    revs = list(revisions)
    parents = {p for r in revs for p in r.parents}
    return sorted(r.id for r in revs if r.id not in parents)


def ordered(revisions: Iterable[Revision]) -> list[Revision]:
    """Parents before children (the first revision first, the heads last); among
    revisions ready at once, by id. A parent that is not among ``revisions`` (a
    broken history) does not hold its children back."""
    revs = {r.id: r for r in revisions}
    waiting = {r.id: {p for p in r.parents if p in revs} for r in revs.values()}
    out: list[Revision] = []
    while waiting:
        ready = sorted(rid for rid, ps in waiting.items() if not ps) or [min(waiting)]
        rid = ready[0]  # one at a time: a child may become ready before a sibling's id
        out.append(revs[rid])
        del waiting[rid]
        for ps in waiting.values():
            ps.discard(rid)
    return out


def target_of(region: str, fleet_target: str | None,
              region_targets: Mapping[str, str | None]) -> str | None:
    """A tenant's target revision: its region's override, else the fleet's (None:
    base)."""
    return region_targets.get(region, fleet_target)


@dataclass
class Check:
    """What `migrate status --check` found: counts of tenants (with a database) whose
    last migration failed, that are not at their target, or whose revision could not
    be read."""

    failed: int = 0
    off_target: int = 0
    unreadable: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.failed or self.off_target or self.unreadable)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.ok else ExitCode.MIGRATIONS_NOT_CURRENT

    def line(self) -> str:
        """One line for people and for a monitor's log."""
        if self.ok:
            return "check: every tenant is at its target and none failed"
        return "check: " + ", ".join(self.reasons)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": self.failed, "off_target": self.off_target,
                "unreadable": self.unreadable, "exit_code": int(self.exit_code)}


def _tenants(n: int) -> str:
    return f"{n} tenant{'s' * (n != 1)}"


def check(failed: int, off_target: int, unreadable: int) -> Check:
    reasons = []
    if failed:
        reasons.append(f"{_tenants(failed)} whose last migration failed")
    if off_target:
        reasons.append(f"{_tenants(off_target)} not at their target revision")
    if unreadable:
        reasons.append(f"{_tenants(unreadable)} whose revision could not be read")
    return Check(failed, off_target, unreadable, reasons)


def history_rows(revisions: Sequence[Revision], *, fleet_target: str | None,
                 region_targets: Mapping[str, str | None],
                 tenants: Mapping[str, int], templates: Mapping[str, str | None]
                 ) -> list[dict[str, Any]]:
    """One row per revision, first to heads: its parents and message, whether it is a
    head or the fleet's (or a region's) target, how many tenants and which templates
    (server → revision) are at it."""
    tops = set(heads(revisions))
    rows = []
    for r in ordered(revisions):
        rows.append({
            "id": r.id, "parents": list(r.parents), "message": r.message,
            "head": r.id in tops, "fleet_target": r.id == fleet_target,
            "region_targets": sorted(reg for reg, t in region_targets.items() if t == r.id),
            "tenants": tenants.get(r.id, 0),
            "templates": sorted(s for s, t in templates.items() if t == r.id)})
    return rows
