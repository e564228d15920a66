"""A server's connection budget: how many connections its tenants may hold in all.

A server's budget is at most its max_connections less the slots the server itself
keeps from ordinary roles (superuser_reserved_connections + reserved_connections)
and less ``connection_reserve`` (tenantctl's own work: backups, migrations, the
daemon, which use ordinary slots too); ``connection_budget = N`` sets it lower. A tenant
costs its plan's connection limit (its direct connections) plus, on a server with a
pooler, its plan's pool size (the pooler's connections to the server on its behalf).
The sum of the costs of the tenants placed on a server never exceeds the budget when
the budget is enforced. Pure; no I/O: ``max_connections`` is read by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.domain.bounds import Plan
from orchestrator.domain.errors import CapacityError

AUTO = "auto"  # connection_budget = "auto": max_connections - connection_reserve
DEFAULT_RESERVE = 10


def tenant_cost(plan: Plan, pooled: bool) -> int:
    """The connections one tenant on ``plan`` may hold on its server."""
    return plan.bounds.connection_limit + ((plan.pool_size or 0) if pooled else 0)


def cost_of(plans: Mapping[str, Plan], default: str, plan: str, pooled: bool) -> int:
    """As ``tenant_cost``, by plan name. A plan the config no longer has costs what the
    default plan does (doctor reports the tenant's plan as unknown)."""
    return tenant_cost(plans.get(plan) or plans[default], pooled)


def used(plans: Mapping[str, Plan], default: str, placed: Iterable[tuple[str, int]],
         pooled: bool) -> int:
    """What a server's tenants cost together: ``placed`` is (plan name, tenants on it)."""
    return sum(cost_of(plans, default, plan, pooled) * n for plan, n in placed)


def ceiling(max_connections: int, reserve: int, server_reserved: int = 0) -> int:
    """The most a budget may be on a server: its max_connections less the server's
    reserved slots and tenantctl's reserve."""
    return max(0, max_connections - server_reserved - reserve)


@dataclass(frozen=True)
class ServerBudget:
    """One server's budget as configured and as read from the server."""

    server: str
    used: int  # what its placed tenants cost
    reserve: int
    configured: int | str | None  # connection_budget: N, "auto", or None (not enforced)
    max_connections: int | None = None  # None: not read (the server was unreachable)
    pooled: bool = False
    # superuser_reserved_connections + reserved_connections, read with max_connections
    server_reserved: int = 0

    @property
    def ceiling(self) -> int | None:
        return None if self.max_connections is None \
            else ceiling(self.max_connections, self.reserve, self.server_reserved)

    @property
    def enforced(self) -> bool:
        return self.configured is not None

    @property
    def total(self) -> int | None:
        """The budget: N (never above the ceiling), or the ceiling for "auto" and for a
        server that does not enforce one (shown, not enforced); None when it depends on
        a max_connections not read."""
        top = self.ceiling
        if isinstance(self.configured, int):
            return self.configured if top is None else min(self.configured, top)
        return top

    @property
    def remaining(self) -> int | None:
        return None if self.total is None else self.total - self.used

    @property
    def over(self) -> bool:
        return self.total is not None and self.used > self.total

    @property
    def too_large(self) -> bool:
        """A configured N above the ceiling (capped to it, and said)."""
        top = self.ceiling
        return isinstance(self.configured, int) and top is not None and self.configured > top

    def fits(self, cost: int, freed: int = 0) -> bool:
        """Whether a tenant costing ``cost`` may be added (``freed``: what the same
        tenant costs now, when it changes plan). Always, where not enforced; never
        where enforced but the budget is unknown."""
        if not self.enforced:
            return True
        total = self.total
        return total is not None and self.used - freed + cost <= total

    def to_json(self) -> dict[str, Any]:
        return {"used": self.used, "total": self.total, "enforced": self.enforced,
                "configured": self.configured, "reserve": self.reserve,
                "max_connections": self.max_connections,
                "server_reserved": self.server_reserved, "pooled": self.pooled}

    def text(self) -> str:
        """``used/total`` as `region list` shows it (``?`` for a total not read)."""
        return f"{self.used}/{'?' if self.total is None else self.total}" + \
            ("" if self.enforced else " (not enforced)")


def refuse_plan(budget: ServerBudget, plan: str, cost: int, freed: int = 0) -> None:
    """Refuse, in one line, a plan that would overrun the server's budget."""
    if budget.fits(cost, freed):
        return
    if budget.total is None:
        raise CapacityError(f"server {budget.server!r}: its connection budget is unknown "
                            "(max_connections could not be read)")
    raise CapacityError(
        f"plan {plan!r} ({cost} connections) would overrun server {budget.server!r}'s "
        f"connection budget: {budget.used - freed} of {budget.total} in use"
        + (f" without this tenant's {freed}" if freed else ""))
