"""Servers, drains and rebalances in the fast tier: the logical method's readiness,
the local fleet's layout, the planners (orchestrator/domain/rebalance.py) and the
services over the fakes with a fake mover (orchestrator/services/servers.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.devfleet import localfleet
from orchestrator.domain.errors import CapacityError, InvalidInput, NotFound
from orchestrator.domain.placement import ServerLoad
from orchestrator.domain.rebalance import PlacedTenant, drain_plan, rebalance_plan
from orchestrator.domain.replication import LogicalReadiness

READY = LogicalReadiness(180001, "logical", True, True, 20, 20)


def test_logical_readiness_names_each_missing_need() -> None:
    assert READY.ready and READY.blockers() == []
    old = LogicalReadiness(150004, "replica", False, False, 10, 10)
    assert old.blockers() == ["Postgres 15 < 16", "wal_level is replica, not logical",
                              "the admin role lacks REPLICATION"]
    assert "pg_dump" in old.describe() and not old.ready
    pending = LogicalReadiness(170000, "minimal", True, False, 0, 0, wal_level_pending=True)
    assert pending.blockers() == [
        "wal_level is minimal, not logical (changed; takes effect at the next restart)",
        "the admin role is not a member of pg_create_subscription",
        "max_replication_slots is 0", "max_wal_senders is 0"]


def test_local_config_with_servers_per_region(tmp_path: Path) -> None:
    names = localfleet.local_server_names(2)
    assert names == [("eu-central-1", "eu-central"), ("eu-central-2", "eu-central"),
                     ("ap-south-1", "ap-south"), ("ap-south-2", "ap-south")]
    ports = {name: 60000 + i for i, (name, _) in enumerate(names)}
    cfg = tomllib.loads(localfleet.render_local_config(tmp_path, ports))
    servers = {r: [(s["name"], s["port"]) for s in v["servers"]]
               for r, v in cfg["regions"].items()}
    assert servers == {"eu-central": [("eu-central-1", 60000), ("eu-central-2", 60001)],
                       "ap-south": [("ap-south-1", 60002), ("ap-south-2", 60003)]}
    assert ":60000/tenantctl_catalog" in cfg["catalog"]["dsn"]
    # the default stays one per region
    assert [n for n, _ in localfleet.local_server_names()] == ["eu-central-1", "ap-south-1"]


@pytest.mark.parametrize("n", [0, -1, localfleet.MAX_SERVERS_PER_REGION + 1])
def test_servers_per_region_out_of_range_is_refused_before_writing(tmp_path: Path,
                                                                   n: int) -> None:
    with pytest.raises(InvalidInput, match="servers_per_region must be between 1 and"):
        localfleet.init_local(tmp_path / "tenantctl.toml", tmp_path / "state",
                              servers_per_region=n)
    assert list(tmp_path.iterdir()) == []


# -- the planners (orchestrator/domain/rebalance.py) ----------------------------------

PURE = settings(max_examples=300, deadline=None, database=None)


def _region(counts: dict[str, int], capacity: dict[str, int] | None = None,
            off: frozenset[str] = frozenset()) -> tuple[list[ServerLoad], list[PlacedTenant]]:
    servers = [ServerLoad(n, c, (capacity or {}).get(n, 100), n not in off)
               for n, c in counts.items()]
    tenants = [PlacedTenant(f"{n}_t{i:03d}", n) for n, c in counts.items() for i in range(c)]
    return servers, tenants


def test_drain_spreads_over_the_least_filled_servers() -> None:
    servers, tenants = _region({"a": 4, "b": 1, "c": 2}, {"a": 10, "b": 10, "c": 4})
    plan = drain_plan("r", "a", servers, tenants)
    # b: 1/10 is emptier than c: 2/4; by fill ratio, then count, then name
    assert [(m.slug, m.target) for m in plan.moves] == [
        ("a_t000", "b"), ("a_t001", "b"), ("a_t002", "b"), ("a_t003", "b")]
    assert plan.after == {"b": 5, "c": 2}
    assert all(m.source == "a" for m in plan.moves)


def test_drain_refuses_when_the_region_lacks_room() -> None:
    servers, tenants = _region({"a": 5, "b": 8, "c": 9}, {"a": 10, "b": 10, "c": 10})
    with pytest.raises(CapacityError, match=r"region 'r' lacks room to drain a: 5 tenant\(s\) "
                       r"to move, 3 place\(s\) free on the other servers \(b 8/10, c 9/10\)"):
        drain_plan("r", "a", servers, tenants)
    # a drained or retired neighbour offers no room
    servers, tenants = _region({"a": 1, "b": 0}, off=frozenset({"b"}))
    with pytest.raises(CapacityError, match="no other server accepting tenants"):
        drain_plan("r", "a", servers, tenants)
    with pytest.raises(NotFound, match="no server 'zz' in region 'r'"):
        drain_plan("r", "zz", servers, tenants)


def test_drain_leaves_a_tenant_being_provisioned_and_says_so() -> None:
    servers = [ServerLoad("a", 2, 10), ServerLoad("b", 0, 10)]
    tenants = [PlacedTenant("new", "a", movable=False), PlacedTenant("old", "a")]
    plan = drain_plan("r", "a", servers, tenants)
    assert [m.slug for m in plan.moves] == ["old"] and plan.unmovable == ("new",)


def test_drain_of_an_empty_server_plans_nothing() -> None:
    servers, tenants = _region({"a": 0, "b": 3})
    assert drain_plan("r", "a", servers, tenants).moves == ()


def test_rebalance_moves_from_the_fullest_to_the_emptiest() -> None:
    servers, tenants = _region({"a": 10, "b": 0, "c": 2})
    plan = rebalance_plan("r", servers, tenants)
    assert plan.mean == 4 and plan.limit == pytest.approx(4.8)
    assert plan.after == {"a": 4, "b": 4, "c": 4} and plan.balanced
    assert len(plan.moves) == 6 and {m.source for m in plan.moves} == {"a"}
    assert [m.target for m in plan.moves] == ["b", "b", "b", "c", "b", "c"]


def test_rebalance_of_a_balanced_region_moves_nothing() -> None:
    servers, tenants = _region({"a": 6, "b": 5, "c": 5})
    plan = rebalance_plan("r", servers, tenants)
    assert plan.moves == () and plan.balanced and plan.after == plan.before


def test_rebalance_stops_where_whole_tenants_allow() -> None:
    servers, tenants = _region({"a": 3, "b": 0})
    plan = rebalance_plan("r", servers, tenants)
    assert plan.after == {"a": 2, "b": 1} and len(plan.moves) == 1
    assert not plan.balanced  # 2 > 1.2 × 1.5, and no move makes it better


def test_rebalance_leaves_drained_servers_and_respects_capacity() -> None:
    servers, tenants = _region({"a": 9, "b": 0, "d": 0}, {"a": 10, "b": 2, "d": 10},
                               off=frozenset({"d"}))
    plan = rebalance_plan("r", servers, tenants)
    assert "d" not in plan.after and plan.after == {"a": 7, "b": 2}
    assert all(m.target == "b" for m in plan.moves)


regions = st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 40), min_size=1,
                          max_size=6)


@PURE
@given(regions, st.data())
def test_rebalance_properties(counts: dict[str, int], data: st.DataObject) -> None:
    capacity = {n: data.draw(st.integers(max(c, 1), 60), label=f"cap {n}")
                for n, c in counts.items()}
    servers, tenants = _region(counts, capacity)
    plan = rebalance_plan("r", servers, tenants)
    again = rebalance_plan("r", list(reversed(servers)), list(reversed(tenants)))
    assert plan == again  # deterministic, whatever order the catalog answered in
    after = dict(counts)
    for m in plan.moves:
        assert after[m.source] > after[m.target] + 1  # every move narrows the gap
        after[m.source] -= 1
        after[m.target] += 1
    assert after == plan.after and sum(after.values()) == sum(counts.values())
    assert all(after[n] <= capacity[n] for n in after)
    assert len({m.slug for m in plan.moves}) == len(plan.moves)  # nobody moves twice
    # the fullest server never gets fuller, and the fewest moves: the excess over the
    # limit of the servers moved from
    assert max(after.values()) <= max(counts.values())
    limit = plan.limit
    if plan.balanced and all(c >= 0 for c in capacity.values()):
        assert len(plan.moves) <= sum(max(0, c - int(limit)) for c in counts.values())


@PURE
@given(regions, st.sampled_from("abcdef"), st.data())
def test_drain_properties(counts: dict[str, int], source: str, data: st.DataObject) -> None:
    counts.setdefault(source, 3)
    capacity = {n: data.draw(st.integers(max(c, 1), 60), label=f"cap {n}")
                for n, c in counts.items()}
    servers, tenants = _region(counts, capacity)
    room = sum(capacity[n] - counts[n] for n in counts if n != source)
    if counts[source] > room:
        with pytest.raises(CapacityError):
            drain_plan("r", source, servers, tenants)
        return
    plan = drain_plan("r", source, servers, tenants)
    assert sorted(m.slug for m in plan.moves) == sorted(
        t.slug for t in tenants if t.server == source)
    assert all(m.source == source and m.target != source for m in plan.moves)
    assert all(plan.after[n] <= capacity[n] for n in plan.after)
    assert plan == drain_plan("r", source, list(reversed(servers)), list(reversed(tenants)))
    # least-filled first: no target ends fuller (by ratio) than a server it passed over
    # by more than one tenant's worth
    for n in plan.after:
        for m in plan.after:
            gained = plan.after[n] - counts[n]
            if gained and plan.after[m] < capacity[m]:
                assert (plan.after[n] - 1) / capacity[n] <= plan.after[m] / capacity[m]
