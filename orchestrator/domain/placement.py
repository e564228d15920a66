"""Placement: which server of a region gets a new tenant. Pure; no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.domain.errors import CapacityError


@dataclass(frozen=True)
class ServerLoad:
    name: str
    tenants: int  # tenants that hold a place: every state but purged/deleted
    capacity: int
    # false when the server takes no new tenants: out of the config, drained or
    # retired (catalog), or unreachable
    available: bool = True
    # connections its budget has left (domain/budget.py); None: not enforced, or not
    # read yet (the caller reads it from the server it is about to use, then asks again)
    budget_left: int | None = None
    cost: int = 0  # what the new tenant would cost here (its plan; the pooler's share)

    @property
    def has_room(self) -> bool:
        return self.available and self.tenants < self.capacity and (
            self.budget_left is None or self.budget_left >= self.cost)


def choose_server(region: str, loads: list[ServerLoad], plan: str | None = None) -> str:
    """The least-loaded server (by fill ratio, then count, then name) with room left
    for one more tenant, in tenants and in its connection budget (``plan``: the new
    tenant's, for the refusal).

    Fill ratio rather than raw count, so a big server next to a small one takes
    its share; name as last key keeps the choice deterministic.
    """
    candidates = [s for s in loads if s.has_room]
    if not candidates:
        if not loads:
            raise CapacityError(f"region {region!r} has no servers")
        if not any(s.available for s in loads):
            raise CapacityError(f"region {region!r} has no server accepting new tenants "
                                f"({', '.join(s.name for s in loads)}: drained, retired, "
                                "out of the config or unreachable)")
        open_ = [s for s in loads if s.available]
        used = sum(s.tenants for s in open_)
        cap = sum(s.capacity for s in open_)
        short = [s for s in open_ if s.tenants < s.capacity]
        if short:  # room for tenants, but not in the connection budgets
            left = ", ".join(f"{s.name} has {s.budget_left} left of the {s.cost} it "
                             "needs" for s in short)
            raise CapacityError(f"region {region!r} has no room in its servers' connection "
                                f"budgets for a tenant of plan {plan or '?'!r} ({left})")
        raise CapacityError(f"region {region!r} is full ({used}/{cap} tenants on "
                            f"{len(open_)} server(s) accepting new tenants)")
    best = min(candidates, key=lambda s: (s.tenants / s.capacity, s.tenants, s.name))
    return best.name
