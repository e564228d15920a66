"""Moving a tenant to another server (and maybe region): the pure rules. Which
method, which refusals, the order of the recorded steps, and whether the copy's
checks agree with the source's. No I/O; the service (orchestrator/services/
move.py) gathers the facts and carries the steps out.

    planned -> target -> [logical: replicating -> synced] -> paused -> copied
            -> checked -> cutover -> source_dropped
            -> [region move: backed_up -> old_backups_deleted] -> done

Before ``cutover`` the source is the tenant's database and everything on the
target is a copy that can be thrown away: a re-run redoes the copy, ``--abort``
undoes it. From ``cutover`` on, the catalog points at the target: a re-run only
finishes the clean-up, and there is nothing left to abort.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.domain.errors import (
    FIELD,
    CapacityError,
    Conflict,
    InvalidInput,
)
from orchestrator.domain.states import CANCELLING, HAS_DATABASE


class MoveMethod(enum.StrEnum):
    logical = "logical"  # publication + subscription: writes pause only at the end
    dump = "dump"  # read-only for the whole copy: pg_dump | pg_restore


class MoveOutcome(enum.StrEnum):
    running = "running"  # unfinished: a live process holds the tenant's lock, or a crash
    done = "done"
    aborted = "aborted"


# Every step, in order; a move records the last one it finished.
STEPS = ("planned", "target", "replicating", "synced", "paused", "copied", "checked",
         "cutover", "source_dropped", "backed_up", "old_backups_deleted", "done")
LOGICAL_ONLY = ("replicating", "synced")
REGION_ONLY = ("backed_up", "old_backups_deleted")
CUTOVER = "cutover"
LOGICAL_MIN_VERSION = 160000  # a non-superuser may CREATE SUBSCRIPTION from 16

# Rough rates for a dry run's estimate (a laptop's loopback; the figures bench/move.py
# measures say more).
DUMP_BYTES_PER_S = 40 * 1024 * 1024
LOGICAL_PAUSE_S = 0.5  # revoke, end sessions, catch up, sequences, cutover
CHECK_BYTES_PER_S = 300 * 1024 * 1024  # the checks read every row on both sides (paused)


def steps_for(method: str, region_move: bool) -> tuple[str, ...]:
    """The steps a move of this kind goes through, in order."""
    return tuple(s for s in STEPS
                 if (method == MoveMethod.logical or s not in LOGICAL_ONLY)
                 and (region_move or s not in REGION_ONLY))


def step_index(step: str) -> int:
    return STEPS.index(step)


def cut_over(step: str) -> bool:
    """Whether a move at ``step`` has pointed the catalog at the target already."""
    return step_index(step) >= step_index(CUTOVER)


def steps_after(step: str, method: str, region_move: bool) -> tuple[str, ...]:
    """What is left to do after ``step``. Before the cutover, a re-run redoes the copy
    from the target step on (what a crash left on the target is not trusted)."""
    order = steps_for(method, region_move)
    if not cut_over(step):
        return order[order.index("target"):]
    return tuple(s for s in order if step_index(s) > step_index(step))


@dataclass(frozen=True)
class ServerFacts:
    """What the planner needs of a server."""

    name: str
    region: str
    capacity: int
    tenants: int  # tenants that hold a place on it
    accepting: bool  # false when drained or removed from the config
    version: int | None  # server_version_num; None when unreachable
    logical_ready: str | None = None  # why it cannot do `logical` (None: it can)
    cluster: str | None = None  # cluster identity: two entries may name one cluster


@dataclass(frozen=True)
class TenantFacts:
    slug: str
    state: str
    server: str
    region: str
    step: str | None  # the tenant row's step (a cancellation under way)
    legal_hold: bool
    size_bytes: int = 0
    large_objects: int = 0
    tables_without_key: tuple[str, ...] = ()  # logical replication cannot update them
    live_grants: int = 0  # support grants whose role lives on the source server


@dataclass(frozen=True)
class MovePlan:
    slug: str
    method: str
    method_reason: str  # why this method
    from_server: str
    to_server: str
    from_region: str
    to_region: str
    size_bytes: int
    expected_pause_s: float

    @property
    def region_move(self) -> bool:
        return self.from_region != self.to_region

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.slug, "method": self.method, "method_reason": self.method_reason,
                "from_server": self.from_server, "to_server": self.to_server,
                "from_region": self.from_region, "to_region": self.to_region,
                "region_move": self.region_move, "size_bytes": self.size_bytes,
                "expected_pause_s": round(self.expected_pause_s, 1),
                "steps": list(steps_for(self.method, self.region_move))}


def check_tenant_movable(t: TenantFacts) -> None:
    """Refusals that depend on the tenant alone."""
    if t.state not in HAS_DATABASE:
        raise Conflict(f"tenant {t.slug!r} is {t.state}: only a tenant with a database "
                       "(active, suspended or cancelled) can move")
    if t.step == CANCELLING:
        raise Conflict(f"tenant {t.slug!r} is being cancelled: finish it first "
                       f"(`tenantctl tenant cancel {t.slug}`)")
    if t.live_grants:
        raise Conflict(f"tenant {t.slug!r} has {t.live_grants} live support grant(s) on "
                       f"{t.server}: revoke them first (`tenantctl access revoke`)")


def check_target(t: TenantFacts, target: ServerFacts, source: ServerFacts | None = None,
                 *, reason: str | None = None) -> None:
    """Refusals that depend on where it goes (a reachable target: ``version`` set)."""
    if target.name == t.server:
        raise InvalidInput(f"tenant {t.slug!r} is on {t.server} already", field="server")
    if target.region != t.region:
        if not reason:
            raise InvalidInput(f"moving {t.slug!r} out of region {t.region} needs {FIELD}: "
                               "say why (it is audited)", field="reason")
        if t.legal_hold:
            raise Conflict(f"tenant {t.slug!r} is under legal hold: its backups in "
                           f"{t.region} may not be deleted, so it cannot leave the region")
    if not target.accepting:
        raise Conflict(f"server {target.name} is not accepting tenants (drained or "
                       "removed from the config)")
    if target.tenants >= target.capacity:
        raise CapacityError(f"server {target.name} is full ({target.tenants}/"
                            f"{target.capacity} tenants)")
    if source is not None and source.cluster is not None and source.cluster == target.cluster:
        raise InvalidInput(f"servers {source.name} and {target.name} are one cluster: "
                           "nothing to move", field="server")


def choose_target(t: TenantFacts, candidates: list[ServerFacts]) -> ServerFacts:
    """For `--region R` alone: the least-filled accepting server of R with room (not
    the tenant's own)."""
    room = [s for s in candidates if s.name != t.server and s.accepting
            and s.tenants < s.capacity]
    if not room:
        region = candidates[0].region if candidates else "?"
        raise CapacityError(f"region {region} has no server with room for {t.slug!r}")
    return min(room, key=lambda s: (s.tenants / s.capacity, s.tenants, s.name))


def logical_refusal(t: TenantFacts, source: ServerFacts, target: ServerFacts) -> str | None:
    """Why `logical` cannot move this tenant between these servers (None: it can)."""
    for s in (source, target):
        if s.version is not None and s.version < LOGICAL_MIN_VERSION:
            return f"server {s.name} runs Postgres {s.version // 10000} (logical needs 16+)"
        if s.logical_ready is not None:
            return f"server {s.name} cannot do logical replication: {s.logical_ready}"
    if t.large_objects:
        return (f"the tenant has {t.large_objects} large object(s), which logical "
                "replication does not carry")
    if t.tables_without_key:
        return (f"table {t.tables_without_key[0]} has no primary key (its updates could not "
                "be replicated)")
    return None


def choose_method(t: TenantFacts, source: ServerFacts, target: ServerFacts,
                  requested: str | None, *, logical_available: bool = True
                  ) -> tuple[str, str]:
    """(method, why): `logical` when both servers can and the tenant allows it, else
    `dump`; a requested method is used or refused, never swapped.
    ``logical_available``: whether this build carries the logical method out."""
    if requested is not None and requested not in MoveMethod.__members__:
        raise InvalidInput(f"unknown method {requested!r} (one of: logical, dump)",
                           field="method")
    why_not = logical_refusal(t, source, target) if logical_available else \
        "this tenantctl cannot move by logical replication yet"
    if requested == MoveMethod.dump:
        return MoveMethod.dump, "asked for"
    if requested == MoveMethod.logical:
        if why_not is not None:
            raise InvalidInput(f"{FIELD} logical is not possible: {why_not}", field="method")
        return MoveMethod.logical, "asked for"
    if why_not is None:
        return MoveMethod.logical, "both servers can replicate"
    return MoveMethod.dump, why_not


def expected_pause_s(method: str, size_bytes: int) -> float:
    checks = size_bytes / CHECK_BYTES_PER_S
    if method == MoveMethod.logical:
        return LOGICAL_PAUSE_S + checks
    return 1.0 + size_bytes / DUMP_BYTES_PER_S + checks


def plan_move(t: TenantFacts, source: ServerFacts, target: ServerFacts,
              requested_method: str | None, reason: str | None, *,
              logical_available: bool = True) -> MovePlan:
    check_tenant_movable(t)
    check_target(t, target, source, reason=reason)
    method, why = choose_method(t, source, target, requested_method,
                                logical_available=logical_available)
    return MovePlan(t.slug, method, why, t.server, target.name, t.region, target.region,
                    t.size_bytes, expected_pause_s(method, t.size_bytes))


# -- the checks before the cutover ---------------------------------------------------


@dataclass(frozen=True)
class TableSum:
    rows: int
    digest: str  # an order-independent digest of the rows (sum of 64-bit row hashes)


def compare_checks(source: Mapping[str, Any], target: Mapping[str, Any]) -> list[str]:
    """What differs between the source's and the copy's checks (empty: they agree).
    Each side: {"tables": {name: TableSum}, "sequences": {name: (last_value,
    is_called)}, "large_objects": {...}}."""
    out: list[str] = []
    st, tt = source.get("tables", {}), target.get("tables", {})
    for name in sorted(set(st) | set(tt)):
        a, b = st.get(name), tt.get(name)
        if a is None or b is None:
            where = "missing on the target" if b is None else "extra on the target"
            out.append(f"table {name} is {where}")
        elif a.rows != b.rows:
            out.append(f"table {name}: {a.rows} rows on the source, {b.rows} on the target")
        elif a.digest != b.digest:
            out.append(f"table {name}: same row count ({a.rows}), different content")
    ss, ts = source.get("sequences", {}), target.get("sequences", {})
    for name in sorted(set(ss) | set(ts)):
        if ss.get(name) != ts.get(name):
            out.append(f"sequence {name}: {ss.get(name)} on the source, {ts.get(name)} on "
                       "the target")
    if source.get("large_objects") != target.get("large_objects"):
        out.append("large objects differ")
    return out


def checks_json(checks: Mapping[str, Any]) -> dict[str, Any]:
    """The checks as the move's record and --json say them."""
    tables = checks.get("tables", {})
    return {"tables": len(tables), "rows": sum(t.rows for t in tables.values()),
            "sequences": len(checks.get("sequences", {})),
            "large_objects": (checks.get("large_objects") or {}).get("count", 0),
            "compared": ["row counts", "per-table checksums", "sequence values",
                         "large objects"]}
