"""Which tenants move where when a server is drained or a region rebalanced. Pure:
plain data in, a plan out; no I/O, no clock. Moves never leave the region.

Both planners count tenants that hold a place (every state but deleted/purged,
as placement does) and choose targets as placement does: by fill ratio, then
count, then name, so a plan is deterministic. A tenant that cannot move now (being
provisioned) still counts on its server but is never planned.

``pinned`` (slug -> server) holds the tenants whose move died half-way: such a
move can only be finished (to the server it recorded) or aborted, so a plan sends
the tenant to that server, first, if it takes tenants; a drained one receives none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.domain.errors import CapacityError, NotFound
from orchestrator.domain.placement import ServerLoad

# a region is balanced when its fullest server holds at most this times the mean
BALANCE_FACTOR = 1.2


@dataclass(frozen=True)
class PlacedTenant:
    slug: str
    server: str
    movable: bool = True  # false while being provisioned (a move would refuse it)
    size: int = 0  # bytes if known: among equals, the smaller moves first


@dataclass(frozen=True)
class PlannedMove:
    slug: str
    source: str
    target: str

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.slug, "from": self.source, "to": self.target}


@dataclass(frozen=True)
class DrainPlan:
    server: str
    region: str
    moves: tuple[PlannedMove, ...]
    unmovable: tuple[str, ...] = ()  # on the server, not movable now (provisioning)
    after: dict[str, int] = field(default_factory=dict)  # tenants per target afterwards

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server, "region": self.region,
                "moves": [m.to_json() for m in self.moves],
                "unmovable": list(self.unmovable), "after": dict(self.after)}


@dataclass(frozen=True)
class RebalancePlan:
    region: str
    mean: float
    limit: float  # BALANCE_FACTOR × mean: what the fullest server may hold
    before: dict[str, int]
    after: dict[str, int]
    moves: tuple[PlannedMove, ...]

    @property
    def balanced(self) -> bool:
        """The fullest server within the limit once the moves are done (whole tenants
        may make that impossible: 3 tenants on 2 servers end 2/1)."""
        return not self.after or max(self.after.values()) <= self.limit

    def to_json(self) -> dict[str, Any]:
        return {"region": self.region, "mean": round(self.mean, 2),
                "limit": round(self.limit, 2), "before": dict(self.before),
                "after": dict(self.after), "balanced": self.balanced,
                "moves": [m.to_json() for m in self.moves]}


def _fill_key(counts: dict[str, int], capacity: dict[str, int]
              ) -> Callable[[str], tuple[float, int, str]]:
    """Placement's order: fill ratio, then count, then name."""
    return lambda name: (counts[name] / capacity[name], counts[name], name)


def _order(tenants: Sequence[PlacedTenant]) -> list[PlacedTenant]:
    """The order tenants are taken in: smallest first (less to copy), then by slug."""
    return sorted(tenants, key=lambda t: (t.size, t.slug))


def drain_plan(region: str, server: str, servers: Sequence[ServerLoad],
               tenants: Sequence[PlacedTenant],
               pinned: Mapping[str, str] | None = None) -> DrainPlan:
    """Every movable tenant of ``server`` to the least-filled other servers of the
    region that take tenants (``available``), without going over any capacity; one
    pinned to such a server (an unfinished move) to that one.
    CapacityError, saying how much room is missing, when the region lacks room."""
    by_name = {s.name: s for s in servers}
    if server not in by_name:
        raise NotFound(f"no server {server!r} in region {region!r}")
    pinned = pinned or {}
    leaving = _order([t for t in tenants if t.server == server and t.movable])
    unmovable = tuple(sorted(t.slug for t in tenants if t.server == server and not t.movable))
    targets = [s for s in servers if s.name != server and s.available]
    counts = {s.name: s.tenants for s in targets}
    capacity = {s.name: s.capacity for s in targets}
    # an unfinished move to a server that takes tenants: there, and first. One to a
    # server that takes none (drained since) is planned as any other: `tenant move`
    # then refuses it, saying to abort that move, rather than fill a drained server
    fixed = {t.slug: pinned[t.slug] for t in leaving if pinned.get(t.slug) in counts}
    for target in fixed.values():
        counts[target] += 1
    free = [t for t in leaving if t.slug not in fixed]
    room = sum(max(0, capacity[n] - counts[n]) for n in counts)
    if len(free) > room:
        where = ", ".join(f"{s.name} {s.tenants}/{s.capacity}" for s in targets) \
            or "no other server accepting tenants"
        raise CapacityError(
            f"region {region!r} lacks room to drain {server}: {len(free)} tenant(s) to "
            f"move, {room} place(s) free on the other servers ({where}); add a server "
            "to the region or raise a capacity first")
    key = _fill_key(counts, capacity)
    chosen = dict(fixed)
    for t in free:
        target = min((n for n in counts if counts[n] < capacity[n]), key=key)
        counts[target] += 1
        chosen[t.slug] = target
    moves = tuple(PlannedMove(t.slug, server, chosen[t.slug]) for t in leaving)
    return DrainPlan(server, region, moves, unmovable,
                     {n: counts[n] for n in sorted(counts)})


def rebalance_plan(region: str, servers: Sequence[ServerLoad],
                   tenants: Sequence[PlacedTenant],
                   factor: float = BALANCE_FACTOR,
                   pinned: Mapping[str, str] | None = None) -> RebalancePlan:
    """The fewest moves that bring the region's fullest server to at most ``factor``
    × the mean tenant count (or as close as whole tenants allow), each from the
    fullest server to the emptiest one with room. Only servers that take tenants
    (``available``) take part: a drained server is `server drain`'s business.

    Each move lowers the excess over the limit by one, so the number of moves is
    the total excess: no plan does it in fewer.
    """
    part = sorted((s for s in servers if s.available), key=lambda s: s.name)
    counts = {s.name: s.tenants for s in part}
    capacity = {s.name: s.capacity for s in part}
    before = dict(counts)
    mean = sum(counts.values()) / len(counts) if counts else 0.0
    limit = factor * mean
    pinned = pinned or {}
    moves: list[PlannedMove] = []
    for t in _order(tenants):  # unfinished moves first, to where they were going
        target = pinned.get(t.slug, t.server)
        if t.movable and target != t.server and target in counts:
            if t.server in counts:
                counts[t.server] -= 1
            counts[target] += 1
            moves.append(PlannedMove(t.slug, t.server, target))
    pool = {n: _order([t for t in tenants if t.server == n and t.movable
                       and t.slug not in pinned]) for n in counts}
    while counts:
        # the fullest server that still has a movable tenant (ties: by name)
        sources = [n for n in counts if pool[n]]
        if not sources:
            break
        source = min(sources, key=lambda n: (-counts[n], n))
        if counts[source] <= limit:
            break
        free = [n for n in counts if n != source and counts[n] < capacity[n]]
        if not free:
            break
        target = min(free, key=lambda n: (counts[n], counts[n] / capacity[n], n))
        if counts[target] + 1 >= counts[source]:
            break  # would only swap which server is fullest
        tenant = pool[source].pop(0)
        counts[source] -= 1
        counts[target] += 1
        moves.append(PlannedMove(tenant.slug, source, target))
    return RebalancePlan(region, mean, limit, before, counts, tuple(moves))
