"""Servers as a whole: drain one (stop placing tenants there, move every tenant to
the least-filled other servers of its region), retire an empty one, accept tenants
again, rebalance a region. The plans are pure (domain/rebalance.py); each tenant
moves through a *mover* passed in (``tenant move``'s service, wired by the caller),
so these loops are tested over fakes and know nothing of how a move is done.

A drain is resumable: its plan is read from the catalog each time, so a second run
moves only what is still on the server, and a tenant whose move died half-way goes
to the server that move recorded (the only place `tenant move` will finish it).
One tenant's failure is that tenant's result; the others go on. A tenant in hold,
suspended or under legal hold moves like any other (the move keeps its state); one
being provisioned is left, and said so.
Drains and rebalances of one region take one lock: two at once would plan against
the same free places.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from orchestrator.bootstrap import Deps
from orchestrator.domain.errors import Conflict, InvalidInput, TenantctlError, first_line
from orchestrator.domain.placement import ServerLoad
from orchestrator.domain.rebalance import (
    DrainPlan,
    PlacedTenant,
    PlannedMove,
    RebalancePlan,
    drain_plan,
    rebalance_plan,
)
from orchestrator.domain.states import TenantState
from orchestrator.ports import ServerRecord, TenantRecord


class MoveOutcome(Protocol):
    """What this module needs of a move's result (``services.move.MoveResult``)."""

    def to_json(self) -> dict[str, Any]: ...


# ``mover(deps, slug, server=target, reason=...)``: moves one tenant, raises a
# TenantctlError when it cannot (``services.move.move_tenant``)
Mover = Callable[..., MoveOutcome]
Progress = Callable[["TenantMove"], None]

MOVED, FAILED, SKIPPED = "moved", "failed", "skipped"


@dataclass(frozen=True)
class TenantMove:
    """One tenant's outcome in a drain or rebalance."""

    slug: str
    source: str
    target: str | None
    outcome: str  # moved, failed, skipped
    error: str | None = None
    move: dict[str, Any] | None = None  # the mover's own result

    def describe(self) -> str:
        if self.outcome == MOVED:
            return f"moved   {self.slug}: {self.source} -> {self.target}"
        if self.outcome == SKIPPED:
            return f"skipped {self.slug}: {self.error}"
        return f"failed  {self.slug}: {self.error}"

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.slug, "from": self.source, "to": self.target,
                "outcome": self.outcome, "error": self.error, "move": self.move}


@dataclass
class DrainResult:
    server: str
    region: str
    plan: DrainPlan
    dry_run: bool
    results: list[TenantMove] = field(default_factory=list)
    remaining: int = 0  # tenants still placed on the server afterwards

    @property
    def failed(self) -> list[TenantMove]:
        return [r for r in self.results if r.outcome != MOVED]

    @property
    def ok(self) -> bool:
        return not self.failed and (self.dry_run or self.remaining == 0)

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server, "region": self.region, "dry_run": self.dry_run,
                "ok": self.ok, "planned": [m.to_json() for m in self.plan.moves],
                "moved": sum(r.outcome == MOVED for r in self.results),
                "failed": sum(r.outcome == FAILED for r in self.results),
                "skipped": sum(r.outcome == SKIPPED for r in self.results),
                "remaining": self.remaining,
                "tenants": [r.to_json() for r in self.results]}


@dataclass
class RebalanceResult:
    plan: RebalancePlan
    dry_run: bool
    results: list[TenantMove] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.outcome == MOVED for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {**self.plan.to_json(), "dry_run": self.dry_run, "ok": self.ok,
                "moved": sum(r.outcome == MOVED for r in self.results),
                "failed": sum(r.outcome == FAILED for r in self.results),
                "tenants": [r.to_json() for r in self.results]}


@dataclass(frozen=True)
class ServerChange:
    """`server retire` / `server accept`: what was done, or that nothing was needed."""

    server: str
    region: str
    action: str  # retired, accepting
    changed: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server, "region": self.region, "action": self.action,
                "changed": self.changed, "detail": self.detail}


# -- reading the region -----------------------------------------------------------------


def _loads(servers: Sequence[ServerRecord], tenants: Sequence[TenantRecord]
           ) -> list[ServerLoad]:
    counts: dict[str, int] = {}
    for t in tenants:
        counts[t.server] = counts.get(t.server, 0) + 1
    return [ServerLoad(s.name, counts.get(s.name, 0), s.capacity,
                       s.available and s.accepting and s.retired_at is None)
            for s in servers]


def _placed(tenants: Sequence[TenantRecord]) -> list[PlacedTenant]:
    # a tenant being provisioned has no database to move yet: it stays, and says so
    return [PlacedTenant(t.slug, t.server, movable=t.state != TenantState.provisioning)
            for t in tenants]


def _region_lock(region: str) -> str:
    return f"server-moves:{region}"


def plan_drain(deps: Deps, name: str) -> DrainPlan:
    """What `server drain NAME` would move where (CapacityError if the region lacks
    room; NotFound for an unknown server)."""
    server = deps.records.servers.get(name)
    servers = deps.records.servers.in_region(server.region)
    tenants = deps.records.servers.placed(server.region)
    return drain_plan(server.region, name, _loads(servers, tenants), _placed(tenants),
                      pinned=deps.records.servers.unfinished_moves(server.region))


def plan_rebalance(deps: Deps, region: str) -> RebalancePlan:
    """What `region rebalance REGION` would move where (unknown region: ConfigError)."""
    deps.cfg.region(region)
    servers = deps.records.servers.in_region(region)
    tenants = deps.records.servers.placed(region)
    return rebalance_plan(region, _loads(servers, tenants), _placed(tenants),
                          pinned=deps.records.servers.unfinished_moves(region))


# -- running moves ----------------------------------------------------------------------


def _run_moves(deps: Deps, moves: Sequence[PlannedMove], *, mover: Mover, reason: str,
               concurrency: int, progress: Progress | None) -> list[TenantMove]:
    """Each planned move through the mover, ``concurrency`` at a time; a failure is
    that tenant's result. Results in plan order."""
    lock = threading.Lock()

    def one(m: PlannedMove) -> TenantMove:
        try:
            result = mover(deps, m.slug, server=m.target, reason=reason)
            done = TenantMove(m.slug, m.source, m.target, MOVED, move=result.to_json())
        except TenantctlError as exc:
            done = TenantMove(m.slug, m.source, m.target, FAILED, first_line(exc))
        except Exception as exc:  # noqa: BLE001 - one tenant's failure ends no fleet run
            done = TenantMove(m.slug, m.source, m.target, FAILED,
                              f"{type(exc).__name__}: {first_line(exc)}")
        if progress is not None:
            with lock:
                progress(done)
        return done

    if not moves:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(moves))),
                            thread_name_prefix="move") as pool:
        return list(pool.map(one, moves))


def drain(deps: Deps, name: str, *, mover: Mover, concurrency: int = 1,
          dry_run: bool = False, progress: Progress | None = None) -> DrainResult:
    """Stop placing tenants on ``name`` and move every tenant off it (see the module
    doc). Refuses, changing nothing, when the region lacks room (CapacityError) or
    another drain or rebalance of the region runs (Conflict). A re-run continues
    with what is left."""
    if concurrency < 1:
        raise InvalidInput(f"{{field}} must be at least 1, got {concurrency}",
                           field="concurrency")
    server = deps.records.servers.get(name)
    with deps.records.advisory_lock(_region_lock(server.region)) as acquired:
        if not acquired:
            raise Conflict(f"a drain or rebalance of region {server.region!r} is already "
                           "running; wait for it, then run this again")
        plan = plan_drain(deps, name)
        result = DrainResult(name, server.region, plan, dry_run)
        if dry_run:
            result.results = [TenantMove(s, name, None, SKIPPED, "being provisioned")
                              for s in plan.unmovable]
            result.remaining = len(plan.moves) + len(plan.unmovable)
            return result
        if server.accepting:
            with deps.records.transaction() as tx:
                tx.update_server(name, accepting=False)
                tx.audit("server.drain.start", region=server.region, server=name,
                         tenants=len(plan.moves))
        reason = f"drain of server {name}"
        result.results = _run_moves(deps, plan.moves, mover=mover, reason=reason,
                                    concurrency=concurrency, progress=progress)
        for slug in plan.unmovable:
            skipped = TenantMove(slug, name, None, SKIPPED,
                                 "being provisioned: run the drain again once it is done")
            result.results.append(skipped)
            if progress is not None:
                progress(skipped)
        result.remaining = sum(t.server == name
                               for t in deps.records.servers.placed(server.region))
        deps.records.audit("server.drain", region=server.region,
                           outcome="ok" if result.ok else "partial", server=name,
                           moved=sum(r.outcome == MOVED for r in result.results),
                           failed=[r.slug for r in result.failed],
                           remaining=result.remaining)
    return result


def rebalance(deps: Deps, region: str, *, mover: Mover, dry_run: bool = False,
              concurrency: int = 1, progress: Progress | None = None) -> RebalanceResult:
    """Move tenants within ``region`` until its fullest server holds at most 1.2×
    the mean (domain/rebalance.py). ``dry_run``: the plan only."""
    deps.cfg.region(region)
    with deps.records.advisory_lock(_region_lock(region)) as acquired:
        if not acquired:
            raise Conflict(f"a drain or rebalance of region {region!r} is already "
                           "running; wait for it, then run this again")
        plan = plan_rebalance(deps, region)
        result = RebalanceResult(plan, dry_run)
        if dry_run or not plan.moves:
            return result
        deps.records.audit("region.rebalance.start", region=region,
                           moves=[m.to_json() for m in plan.moves])
        result.results = _run_moves(deps, plan.moves, mover=mover,
                                    reason=f"rebalance of region {region}",
                                    concurrency=concurrency, progress=progress)
        deps.records.audit("region.rebalance", region=region,
                           outcome="ok" if result.ok else "partial",
                           moved=sum(r.outcome == MOVED for r in result.results),
                           failed=[r.slug for r in result.results if r.outcome != MOVED])
    return result


# -- the server's own state -------------------------------------------------------------


def retire(deps: Deps, name: str, now: datetime | None = None) -> ServerChange:
    """Mark an empty server retired: it takes no tenant again (its row stays: deleted
    and purged tenants' history names it). Refuses (Conflict) while any tenant holds a
    place on it. Then take it out of tenantctl.toml and shut it down."""
    server = deps.records.servers.get(name)
    if server.retired_at is not None:
        return ServerChange(name, server.region, "retired", False,
                            f"already retired at {server.retired_at.isoformat()}")
    with deps.records.advisory_lock(_region_lock(server.region)) as acquired:
        if not acquired:
            raise Conflict(f"a drain or rebalance of region {server.region!r} is running; "
                           f"retire {name} once it has finished")
        left = [t.slug for t in deps.records.servers.placed(server.region)
                if t.server == name]
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5
                                           else "")
            raise Conflict(f"server {name} still holds {len(left)} tenant(s) ({shown}): "
                           f"`tenantctl server drain {name}` first; nothing changed")
        at = now or deps.clock.now()
        with deps.records.transaction() as tx:
            tx.update_server(name, accepting=False, retired_at=at)
            tx.audit("server.retire", region=server.region, server=name)
    return ServerChange(name, server.region, "retired", True,
                        "takes no tenants again; remove it from tenantctl.toml and shut it "
                        "down")


def accept(deps: Deps, name: str) -> ServerChange:
    """Undo a drain: the server takes new tenants again. A retired server stays
    retired (Conflict)."""
    server = deps.records.servers.get(name)
    if server.retired_at is not None:
        raise Conflict(f"server {name} is retired; a retired server takes no tenants again "
                       "(add it under a new name to bring the machine back)")
    if server.accepting:
        return ServerChange(name, server.region, "accepting", False, "already accepting")
    with deps.records.transaction() as tx:
        tx.update_server(name, accepting=True)
        tx.audit("server.accept", region=server.region, server=name)
    return ServerChange(name, server.region, "accepting", True,
                        "takes new tenants again" + ("" if server.available else
                                                     " once it is back in tenantctl.toml"))
