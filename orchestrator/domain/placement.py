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


def choose_server(region: str, loads: list[ServerLoad]) -> str:
    """The least-loaded server (by fill ratio, then count, then name) with room left.

    Fill ratio rather than raw count, so a big server next to a small one takes
    its share; name as last key keeps the choice deterministic.
    """
    candidates = [s for s in loads if s.available and s.tenants < s.capacity]
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
        raise CapacityError(f"region {region!r} is full ({used}/{cap} tenants on "
                            f"{len(open_)} server(s) accepting new tenants)")
    best = min(candidates, key=lambda s: (s.tenants / s.capacity, s.tenants, s.name))
    return best.name
