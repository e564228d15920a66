"""Connection budgets of servers (the rule: domain/budget.py): what their tenants
cost, read against each server's max_connections. Placement (provisioning) and
`tenant set-plan` refuse what would overrun an enforced budget; `region list` and
`doctor` show it. psycopg only: `region list` takes this path without SQLAlchemy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import psycopg

from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.config import Config
from orchestrator.domain import budget as rule
from orchestrator.domain.budget import ServerBudget
from orchestrator.domain.errors import TenantctlError


def server_budget(cfg: Config, server: str, placed: Iterable[tuple[str, int]],
                  slots: tuple[int, int] | None) -> ServerBudget:
    """``server``'s budget, given its tenants as (plan name, count) and its
    (max_connections, slots it reserves) as read (None: not read)."""
    sc = cfg.server(server)
    pooled = sc.pooler is not None
    maximum, reserved = slots if slots is not None else (None, 0)
    return ServerBudget(server, rule.used(cfg.plans, cfg.default_plan, placed, pooled),
                        sc.connection_reserve, sc.connection_budget, maximum, pooled,
                        reserved)


def tenant_cost(cfg: Config, server: str, plan: str) -> int:
    """What one tenant on ``plan`` costs on ``server``."""
    return rule.cost_of(cfg.plans, cfg.default_plan, plan,
                        cfg.server(server).pooler is not None)


def read_slots(cfg: Config, server: str) -> tuple[int, int] | None:
    """The server's (max_connections, slots it reserves), None if it cannot be reached
    now."""
    try:
        with pgserver.connect(cfg.server(server).admin_dsn, server=server) as conn:
            return pgserver.connection_slots(conn)
    except (TenantctlError, psycopg.Error):
        return None


def read_budgets(cfg: Config, placed: Mapping[str, Iterable[tuple[str, int]]],
                 servers: Iterable[str]) -> dict[str, ServerBudget]:
    """Each of ``servers``' budget, reading their connection slots all at once (an
    unreachable one has an unknown total, not an error)."""
    names = [s for s in servers if any(c.name == s for c in cfg.servers)]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        maxima = dict(zip(names, pool.map(lambda s: read_slots(cfg, s), names),
                          strict=True))
    return {s: server_budget(cfg, s, placed.get(s, ()), maxima[s]) for s in names}
