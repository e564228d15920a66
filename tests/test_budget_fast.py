"""Connection budgets (issue 19): the pure rule (a tenant's cost, a server's budget,
what fits), placement counting the budget as capacity, the config's keys and doctor's
findings. No Postgres."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.config import parse_config
from orchestrator.domain.bounds import Plan, TenantBounds
from orchestrator.domain.budget import (
    ServerBudget,
    ceiling,
    cost_of,
    refuse_plan,
    tenant_cost,
    used,
)
from orchestrator.domain.errors import CapacityError, ConfigError
from orchestrator.domain.placement import ServerLoad, choose_server
from tests.test_doctor_rules import cluster_with, codes, facts, tenant

SMALL = Plan("small", TenantBounds(connection_limit=5), pool_size=3)
BIG = Plan("big", TenantBounds(connection_limit=40))
PLANS = {"default": Plan("default"), "small": SMALL, "big": BIG}


def test_a_tenant_costs_its_connection_limit_and_its_pool_behind_a_pooler() -> None:
    assert tenant_cost(SMALL, pooled=False) == 5
    assert tenant_cost(SMALL, pooled=True) == 8
    assert tenant_cost(BIG, pooled=True) == 40  # no pool size: no pooled connections
    # a plan gone from the config costs what the default plan costs
    assert cost_of(PLANS, "default", "gone", pooled=False) == 20
    assert used(PLANS, "default", [("small", 3), ("big", 1), ("gone", 1)], False) == 75


def test_the_budget_is_max_connections_less_the_reserves_or_less() -> None:
    assert ceiling(100, 10) == 90 and ceiling(5, 10) == 0
    # the slots the server keeps from ordinary roles are not the tenants' either
    assert ceiling(100, 10, server_reserved=13) == 77
    assert ServerBudget("s", 0, 10, "auto", 100, server_reserved=13).total == 77
    auto = ServerBudget("s", used=50, reserve=10, configured="auto", max_connections=100)
    assert (auto.total, auto.remaining, auto.enforced, auto.over) == (90, 40, True, False)
    explicit = replace(auto, configured=60)
    assert (explicit.total, explicit.too_large) == (60, False)
    # a configured budget above the ceiling is capped to it, and said
    big = replace(auto, configured=95)
    assert (big.total, big.too_large) == (90, True)
    # max_connections lowered under what the tenants may hold: over
    assert replace(auto, max_connections=50).over
    # not read: an explicit budget stands, "auto" is unknown
    assert replace(explicit, max_connections=None).total == 60
    assert replace(auto, max_connections=None).total is None


def test_what_fits_and_the_one_line_refusal() -> None:
    b = ServerBudget("s1", used=80, reserve=10, configured="auto", max_connections=100)
    assert b.fits(10) and not b.fits(11)
    assert b.fits(30, freed=20)  # a plan change frees the tenant's present cost
    with pytest.raises(CapacityError, match=r"plan 'big' \(40 connections\) would overrun "
                       r"server 's1'.s connection budget: 80 of 90 in use$"):
        refuse_plan(b, "big", 40)
    refuse_plan(b, "small", 5)  # fits: nothing said
    # not enforced: everything fits, the total is only shown
    off = replace(b, configured=None)
    assert off.fits(1000) and not off.enforced and off.text() == "80/90 (not enforced)"
    # enforced but unknown (max_connections not read): nothing fits
    unknown = replace(b, max_connections=None)
    assert not unknown.fits(1) and unknown.text() == "80/?"
    with pytest.raises(CapacityError, match="budget is unknown"):
        refuse_plan(unknown, "small", 5)
    assert b.to_json() == {"used": 80, "total": 90, "enforced": True, "configured": "auto",
                           "reserve": 10, "max_connections": 100, "server_reserved": 0,
                           "pooled": False}


def test_placement_skips_a_server_whose_budget_cannot_take_the_plan() -> None:
    loads = [ServerLoad("a", 1, 10, budget_left=5, cost=8),
             ServerLoad("b", 5, 10, budget_left=8, cost=8)]
    assert choose_server("r", loads, "small") == "b"
    # not read yet (None): a candidate, the caller reads it and asks again
    assert choose_server("r", [replace(loads[0], budget_left=None), loads[1]]) == "a"


def test_a_region_without_room_in_its_budgets_is_one_clear_refusal() -> None:
    loads = [ServerLoad("a", 1, 10, budget_left=5, cost=8),
             ServerLoad("b", 5, 10, budget_left=0, cost=8),
             ServerLoad("c", 10, 10, budget_left=50, cost=8)]
    with pytest.raises(CapacityError) as err:
        choose_server("r", loads, "small")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("region 'r' has no room in its servers' connection budgets for a tenant "
                   "of plan 'small' (a has 5 left of the 8 it needs, b has 0 left of the 8 "
                   "it needs)")
    # full in tenants everywhere: the capacity refusal as before
    with pytest.raises(CapacityError, match="is full"):
        choose_server("r", [replace(ld, tenants=10) for ld in loads], "small")


def _cfg(server: dict[str, object]) -> dict[str, object]:
    return {"catalog": {"dsn": "host=x dbname=c"}, "master_key": {"file": "k"},
            "regions": {"eu": {"backup_store": "file:///tmp/x",
                               "servers": [{"name": "s1", "admin_dsn": "host=x", **server}]}}}


def test_the_servers_budget_keys() -> None:
    sc = parse_config(_cfg({}), Path("t")).server("s1")
    assert (sc.connection_reserve, sc.connection_budget, sc.pooler) == (10, None, None)
    sc = parse_config(_cfg({"connection_budget": "auto", "connection_reserve": 0,
                            "pooler": "pgbouncer", "pooler_host": "127.0.0.1",
                            "pooler_port": 6432, "pooler_dir": "/tmp/pgb",
                            "pooler_admin_password_file": "/tmp/pgb.pw"}),
                      Path("t")).server("s1")
    assert (sc.connection_reserve, sc.connection_budget) == (0, "auto")
    assert sc.pooler is not None and sc.pooler.kind == "pgbouncer"
    assert parse_config(_cfg({"connection_budget": 120}), Path("t")).server(
        "s1").connection_budget == 120


@pytest.mark.parametrize(("server", "says"), [
    ({"connection_budget": "lots"}, "connection_budget: must be a number of connections or "
                                    "\"auto\""),
    ({"connection_budget": 0}, "connection_budget: must be at least 1"),
    ({"connection_budget": True}, "connection_budget: must be an integer"),
    ({"connection_reserve": -1}, "connection_reserve: must be at least 0"),
    ({"pooler": ""}, "unknown pooler ''"),
])
def test_a_bad_budget_key_is_one_line_naming_it(server: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(server), Path("t"))
    assert says in str(err.value) and "\n" not in str(err.value)


def test_doctor_reports_a_server_over_its_budget_and_a_budget_too_large() -> None:
    f = facts([tenant(1, "a")], {"c1": cluster_with()}, {"s1": "c1"})
    assert not {c for c, _ in codes(f)} & {"server-over-budget", "server-budget-too-large"}
    over = ServerBudget("s1", used=60, reserve=10, configured="auto", max_connections=40)
    f.budgets = {"s1": over}
    assert ("server-over-budget", "s1") in codes(f)
    # shown, not enforced: not a finding
    f.budgets = {"s1": replace(over, configured=None)}
    assert ("server-over-budget", "s1") not in codes(f)
    f.budgets = {"s1": ServerBudget("s1", used=0, reserve=10, configured=500,
                                    max_connections=100)}
    assert ("server-budget-too-large", "s1") in codes(f)
