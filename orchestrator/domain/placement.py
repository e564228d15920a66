"""Placement: which server of a region gets a new tenant. Pure; no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.domain.errors import CapacityError


@dataclass(frozen=True)
class ServerLoad:
    name: str
    tenants: int  # tenants that hold a place: every state but purged/deleted
    capacity: int
    available: bool = True  # false when the server is marked drained or unreachable


def choose_server(region: str, loads: list[ServerLoad]) -> str:
    """The least-loaded server (by fill ratio, then count, then name) with room left.

    Fill ratio rather than raw count, so a big server next to a small one takes
    its share; name as last key keeps the choice deterministic.
    """
    candidates = [s for s in loads if s.available and s.tenants < s.capacity]
    if not candidates:
        if not loads:
            raise CapacityError(f"region {region!r} has no servers")
        used = sum(s.tenants for s in loads)
        cap = sum(s.capacity for s in loads)
        raise CapacityError(f"region {region!r} is full ({used}/{cap} tenants on "
                            f"{len(loads)} server(s))")
    best = min(candidates, key=lambda s: (s.tenants / s.capacity, s.tenants, s.name))
    return best.name
