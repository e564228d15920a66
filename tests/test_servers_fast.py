"""Servers, drains and rebalances in the fast tier: the logical method's readiness,
the local fleet's layout, the planners (orchestrator/domain/rebalance.py) and the
services over the fakes with a fake mover (orchestrator/services/servers.py)."""

from __future__ import annotations

import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.bootstrap import Deps
from orchestrator.devfleet import localfleet
from orchestrator.domain.errors import (
    CapacityError,
    ConfigError,
    Conflict,
    InvalidInput,
    NotFound,
    TenantctlError,
)
from orchestrator.domain.placement import ServerLoad
from orchestrator.domain.rebalance import PlacedTenant, drain_plan, rebalance_plan
from orchestrator.domain.replication import LogicalReadiness
from orchestrator.services import servers as svc
from tests.fakes import T0, FakeServerRow, World

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



# -- the services over the fakes, with a fake mover (orchestrator/services/servers.py) --


@dataclass(frozen=True)
class FakeMoveResult:
    slug: str
    target: str

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.slug, "new_server": self.target, "method": "fake"}


class FakeMover:
    """Moves a tenant by pointing its catalog row at the target (as a cutover does),
    keeping its state; ``fail`` maps slugs to the error their move raises."""

    def __init__(self, world: World, barrier: threading.Barrier | None = None) -> None:
        self.world, self.barrier = world, barrier
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: dict[str, BaseException] = {}
        self._lock = threading.Lock()

    def __call__(self, deps: Deps, slug: str, **kw: Any) -> FakeMoveResult:
        assert deps is self.world.deps
        with self._lock:
            self.calls.append((slug, kw))
        if self.barrier is not None:
            self.barrier.wait()  # every move of the batch in flight at once
        if slug in self.fail:
            raise self.fail[slug]
        with self._lock:
            self.world.catalog.row(slug).server = kw["server"]
        return FakeMoveResult(slug, kw["server"])


def _world(extra: int = 1) -> World:
    w = World()
    for i in range(3, 3 + extra):  # more servers in eu-central, as the catalog knows them
        name = f"eu-central-{i}"
        w.catalog.t.servers[name] = FakeServerRow(name, "eu-central")
    return w


def _servers_of(w: World) -> dict[str, str]:
    return {t.slug: t.server for t in w.catalog.t.tenants.values()}


def test_drain_moves_every_tenant_whatever_its_state_and_stops_placement() -> None:
    w = _world()
    w.tenant("act", server="eu-central-1")
    w.tenant("sus", server="eu-central-1", state="suspended", suspended_at=T0)
    w.tenant("held", server="eu-central-1", state="cancelled", cancelled_at=T0,
             hold_until=T0)
    w.tenant("legal", server="eu-central-1", legal_hold=True, legal_hold_reason="case 7")
    w.tenant("other", server="eu-central-2")
    w.tenant("asia", region="ap-south")
    mover = FakeMover(w)
    seen: list[str] = []
    result = svc.drain(w.deps, "eu-central-1", mover=mover,
                       progress=lambda r: seen.append(r.describe()))
    assert result.ok and result.remaining == 0
    assert sorted(slug for slug, _ in mover.calls) == ["act", "held", "legal", "sus"]
    assert all(kw["reason"] == "drain of server eu-central-1" for _, kw in mover.calls)
    where = _servers_of(w)
    assert {where[s] for s in ("act", "sus", "held", "legal")} <= {"eu-central-2",
                                                                     "eu-central-3"}
    assert where["other"] == "eu-central-2" and where["asia"] == "ap-south-1"
    # least-filled first (eu-central-3 was empty), ties by name: then they alternate
    assert [where[s] for s in ("act", "held", "legal", "sus")] == [
        "eu-central-3", "eu-central-2", "eu-central-3", "eu-central-2"]
    assert w.catalog.row("sus").state == "suspended"  # the mover keeps states
    assert not w.catalog.t.servers["eu-central-1"].accepting
    assert len(seen) == 4 and all(line.startswith("moved   ") for line in seen)
    doc = result.to_json()
    assert (doc["moved"], doc["failed"], doc["remaining"]) == (4, 0, 0)
    assert doc["tenants"][0]["move"]["method"] == "fake"
    assert w.catalog.actions() == ["server.drain.start", "server.drain"]


def test_one_tenants_failure_does_not_stop_the_drain_and_a_rerun_finishes_it() -> None:
    w = _world()
    for slug in ("ta1", "ta2", "ta3"):
        w.tenant(slug, server="eu-central-1")
    mover = FakeMover(w)
    mover.fail["ta2"] = TenantctlError("target refused the copy")
    first = svc.drain(w.deps, "eu-central-1", mover=mover)
    assert not first.ok and first.remaining == 1
    assert [(r.slug, r.outcome) for r in first.results] == [
        ("ta1", "moved"), ("ta2", "failed"), ("ta3", "moved")]
    assert first.results[1].error == "target refused the copy"
    assert w.catalog.events("server.drain")[-1].outcome == "partial"
    # a crash of the mover itself is that tenant's failure too
    mover.fail["ta2"] = RuntimeError("boom")
    second = svc.drain(w.deps, "eu-central-1", mover=mover)
    assert [(r.slug, r.error) for r in second.results] == [("ta2", "RuntimeError: boom")]
    del mover.fail["ta2"]
    third = svc.drain(w.deps, "eu-central-1", mover=mover)
    assert third.ok and [r.slug for r in third.results] == ["ta2"]  # only what was left
    assert [slug for slug, _ in mover.calls].count("ta1") == 1


def test_drain_refuses_when_the_region_lacks_room_and_changes_nothing() -> None:
    w = _world(extra=0)
    w.catalog.t.servers["eu-central-2"].capacity = 2
    w.tenant("tx1", server="eu-central-2")
    for slug in ("ty1", "ty2"):
        w.tenant(slug, server="eu-central-1")
    mover = FakeMover(w)
    with pytest.raises(CapacityError, match="lacks room to drain eu-central-1: 2 tenant"):
        svc.drain(w.deps, "eu-central-1", mover=mover)
    assert mover.calls == [] and w.catalog.t.servers["eu-central-1"].accepting
    assert "server.drain.start" not in w.catalog.actions()


def test_drain_dry_run_changes_nothing() -> None:
    w = _world()
    w.tenant("td1", server="eu-central-1")
    w.tenant("td0", server="eu-central-1", state="provisioning", step="roles")
    mover = FakeMover(w)
    result = svc.drain(w.deps, "eu-central-1", mover=mover, dry_run=True)
    assert [m.to_json() for m in result.plan.moves] == [
        {"tenant": "td1", "from": "eu-central-1", "to": "eu-central-2"}]
    assert [(r.slug, r.outcome) for r in result.results] == [("td0", "skipped")]
    assert mover.calls == [] and w.catalog.t.servers["eu-central-1"].accepting
    assert w.catalog.actions() == []


def test_drain_leaves_a_tenant_being_provisioned() -> None:
    w = _world()
    w.tenant("tp0", server="eu-central-1", state="provisioning", step="roles")
    w.tenant("tp1", server="eu-central-1")
    result = svc.drain(w.deps, "eu-central-1", mover=FakeMover(w))
    assert [(r.slug, r.outcome) for r in result.results] == [("tp1", "moved"),
                                                             ("tp0", "skipped")]
    assert not result.ok and result.remaining == 1


def test_drain_runs_concurrency_moves_at_once() -> None:
    w = _world(extra=2)
    for i in range(3):
        w.tenant(f"tc{i}", server="eu-central-1")
    mover = FakeMover(w, threading.Barrier(3, timeout=5))
    result = svc.drain(w.deps, "eu-central-1", mover=mover, concurrency=3)
    assert result.ok  # a barrier of 3 passes only when the three moves run together
    serial = FakeMover(w, threading.Barrier(2, timeout=0.5))
    for i in range(2):
        w.tenant(f"ts{i}", server="eu-central-2")
    one_at_a_time = svc.drain(w.deps, "eu-central-2", mover=serial, concurrency=1)
    assert not one_at_a_time.ok  # one at a time, the barrier breaks
    with pytest.raises(InvalidInput, match="concurrency must be at least 1"):
        svc.drain(w.deps, "eu-central-1", mover=mover, concurrency=0)


def test_drain_refuses_while_another_runs_in_the_region_and_unknown_servers() -> None:
    w = _world()
    w.catalog.held.add("server-moves:eu-central")
    with pytest.raises(Conflict, match="already running"):
        svc.drain(w.deps, "eu-central-1", mover=FakeMover(w))
    with pytest.raises(Conflict, match="already running"):
        svc.rebalance(w.deps, "eu-central", mover=FakeMover(w))
    with pytest.raises(NotFound, match="no server 'nowhere-1'"):
        svc.drain(w.deps, "nowhere-1", mover=FakeMover(w))
    with pytest.raises(NotFound):
        svc.retire(w.deps, "nowhere-1")
    with pytest.raises(ConfigError):
        svc.rebalance(w.deps, "mars", mover=FakeMover(w))


def test_retire_only_an_empty_server_then_it_stays_retired() -> None:
    w = _world()
    w.tenant("stay", server="eu-central-3")
    w.tenant("gone", server="eu-central-3", state="deleted")  # holds no place
    with pytest.raises(Conflict, match=r"server eu-central-3 still holds 1 tenant\(s\) "
                       r"\(stay\): `tenantctl server drain eu-central-3` first"):
        svc.retire(w.deps, "eu-central-3", now=T0)
    row = w.catalog.t.servers["eu-central-3"]
    assert row.accepting and row.retired_at is None and w.catalog.actions() == []
    svc.drain(w.deps, "eu-central-3", mover=FakeMover(w))
    done = svc.retire(w.deps, "eu-central-3", now=T0)
    assert done.changed and row.retired_at == T0 and not row.accepting
    assert w.catalog.actions()[-1] == "server.retire"
    again = svc.retire(w.deps, "eu-central-3", now=T0)
    assert not again.changed and "already retired" in again.detail
    with pytest.raises(Conflict, match="is retired"):
        svc.accept(w.deps, "eu-central-3")


def test_accept_undoes_a_drain() -> None:
    w = _world()
    svc.drain(w.deps, "eu-central-2", mover=FakeMover(w))
    assert not w.catalog.t.servers["eu-central-2"].accepting
    assert svc.accept(w.deps, "eu-central-2").changed
    assert w.catalog.t.servers["eu-central-2"].accepting
    assert not svc.accept(w.deps, "eu-central-2").changed


def test_rebalance_moves_within_the_region_only() -> None:
    w = _world(extra=1)
    for i in range(6):
        w.tenant(f"tr{i}", server="eu-central-1")
    w.tenant("asia1", region="ap-south")
    w.tenant("asia2", region="ap-south")
    mover = FakeMover(w)
    dry = svc.rebalance(w.deps, "eu-central", mover=mover, dry_run=True)
    assert len(dry.plan.moves) == 4 and mover.calls == []
    assert dry.to_json()["after"] == {"eu-central-1": 2, "eu-central-2": 2,
                                      "eu-central-3": 2}
    done = svc.rebalance(w.deps, "eu-central", mover=mover)
    assert done.ok and len(mover.calls) == 4
    counts: dict[str, int] = {}
    for t in w.catalog.t.tenants.values():
        counts[t.server] = counts.get(t.server, 0) + 1
    assert counts == {"eu-central-1": 2, "eu-central-2": 2, "eu-central-3": 2,
                      "ap-south-1": 2}
    assert all(kw["server"].startswith("eu-central") for _, kw in mover.calls)
    # balanced now: nothing to do
    assert svc.rebalance(w.deps, "eu-central", mover=mover).plan.moves == ()


def test_plans_send_a_tenant_with_an_unfinished_move_to_its_recorded_target() -> None:
    loads, _ = _region({"eu-central-1": 3, "eu-central-2": 0, "eu-central-3": 0})
    tenants = [PlacedTenant(f"p{i}", "eu-central-1") for i in range(3)]
    plain = drain_plan("eu-central", "eu-central-1", loads, tenants)
    assert [m.target for m in plain.moves] == ["eu-central-2", "eu-central-3",
                                               "eu-central-2"]
    # p0's move died on its way to eu-central-3: it goes there, the others around it
    pinned = drain_plan("eu-central", "eu-central-1", loads, tenants,
                        pinned={"p0": "eu-central-3", "elsewhere": "eu-central-2"})
    assert [(m.slug, m.target) for m in pinned.moves] == [
        ("p0", "eu-central-3"), ("p1", "eu-central-2"), ("p2", "eu-central-2")]
    assert pinned.after == {"eu-central-2": 2, "eu-central-3": 1}
    # a pin to the drained server itself, out of the region or to a server taking no
    # tenants is no pin (the move refuses, rather than fill a drained server)
    same = drain_plan("eu-central", "eu-central-1", loads, tenants,
                      pinned={"p0": "eu-central-1", "p1": "ap-south-1"})
    assert same.moves == plain.moves
    drained = [ServerLoad(s.name, s.tenants, s.capacity, s.name != "eu-central-3")
               for s in loads]
    off = drain_plan("eu-central", "eu-central-1", drained, tenants,
                     pinned={"p0": "eu-central-3"})
    assert {m.target for m in off.moves} == {"eu-central-2"}
    # rebalance: the unfinished move first, even where the balance would not need it
    even, _ = _region({"eu-central-1": 2, "eu-central-2": 2})
    two_each = [PlacedTenant("a", "eu-central-1"), PlacedTenant("b", "eu-central-1"),
                PlacedTenant("c", "eu-central-2"), PlacedTenant("d", "eu-central-2")]
    assert rebalance_plan("eu-central", even, two_each).moves == ()
    plan = rebalance_plan("eu-central", even, two_each, pinned={"a": "eu-central-2"})
    assert [m.to_json() for m in plan.moves] == [
        {"tenant": "a", "from": "eu-central-1", "to": "eu-central-2"},
        {"tenant": "c", "from": "eu-central-2", "to": "eu-central-1"}]  # then balanced
    assert plan.after == {"eu-central-1": 2, "eu-central-2": 2}
    # a pin to a server not taking part: that tenant is left out, not sent elsewhere
    lopsided, _ = _region({"eu-central-1": 4, "eu-central-2": 0, "eu-central-3": 0},
                          off=frozenset({"eu-central-3"}))
    four = [PlacedTenant(f"q{i}", "eu-central-1") for i in range(4)]
    held = rebalance_plan("eu-central", lopsided, four, pinned={"q0": "eu-central-3"})
    assert "q0" not in {m.slug for m in held.moves} and len(held.moves) == 2


class RecordingMover(FakeMover):
    """Refuses as `tenant move` does when a tenant's unfinished move went elsewhere."""

    def __call__(self, deps: Deps, slug: str, **kw: Any) -> FakeMoveResult:
        recorded = self.world.catalog.t.moves.get(slug)
        if recorded is not None and recorded[1] != kw["server"]:
            raise Conflict(f"tenant {slug!r} has an unfinished move to {recorded[1]}, "
                           f"not {kw['server']}")
        result = super().__call__(deps, slug, **kw)
        self.world.catalog.t.moves.pop(slug, None)
        return result


def test_a_drain_rerun_finishes_a_move_that_died_half_way() -> None:
    w = _world(extra=1)
    for slug in ("un_a", "un_b", "un_c"):
        w.tenant(slug, server="eu-central-1")
    # un_a's move (by an earlier drain) died half-way, on its way to the fuller server
    w.tenant("un_x", server="eu-central-2")
    w.catalog.t.moves["un_a"] = ("eu-central", "eu-central-2")
    w.catalog.t.moves["gone"] = ("ap-south", "ap-south-2")  # another region's
    mover = RecordingMover(w)
    result = svc.drain(w.deps, "eu-central-1", mover=mover)
    assert result.ok and result.remaining == 0, result.to_json()
    assert [(slug, kw["server"]) for slug, kw in mover.calls] == [
        ("un_a", "eu-central-2"), ("un_b", "eu-central-3"), ("un_c", "eu-central-3")]
    assert w.catalog.t.moves == {"gone": ("ap-south", "ap-south-2")}
