"""The pure rules of a tenant move (orchestrator/domain/moves.py): method choice,
refusals, step order, the checks' comparison. No Postgres."""

from __future__ import annotations

import pytest

from orchestrator.domain import moves
from orchestrator.domain.errors import CapacityError, Conflict, InvalidInput
from orchestrator.domain.moves import ServerFacts, TableSum, TenantFacts
from orchestrator.domain.names import move_object_name

SRC = ServerFacts("eu-1", "eu", 10, 3, True, 180000, None, "sysid:1")
DST = ServerFacts("eu-2", "eu", 10, 2, True, 180000, None, "sysid:2")
AP = ServerFacts("ap-1", "ap", 10, 0, True, 180000, None, "sysid:3")
T = TenantFacts("acme", "active", "eu-1", "eu", None, False, size_bytes=80 << 20)


def test_method_choice() -> None:
    assert moves.choose_method(T, SRC, DST, None) == ("logical", "both servers can replicate")
    assert moves.choose_method(T, SRC, DST, "dump") == ("dump", "asked for")
    old = ServerFacts("eu-2", "eu", 10, 2, True, 150000, None)
    method, why = moves.choose_method(T, SRC, old, None)
    assert method == "dump" and "Postgres 15" in why
    minimal = ServerFacts("eu-2", "eu", 10, 2, True, 180000, "wal_level is minimal, not logical")
    assert "wal_level" in moves.choose_method(T, minimal, DST, None)[1]
    with pytest.raises(InvalidInput, match="logical is not possible: server eu-2"):
        moves.choose_method(T, SRC, minimal, "logical")
    lobs = TenantFacts("acme", "active", "eu-1", "eu", None, False, large_objects=2)
    assert "large object" in moves.choose_method(lobs, SRC, DST, None)[1]
    nokey = TenantFacts("acme", "active", "eu-1", "eu", None, False, tables_without_key=("log",))
    assert "table log has no primary key" in moves.choose_method(nokey, SRC, DST, None)[1]
    assert moves.choose_method(T, SRC, DST, None, logical_available=False)[0] == "dump"
    with pytest.raises(InvalidInput, match="unknown method"):
        moves.choose_method(T, SRC, DST, "rsync")


def test_refusals() -> None:
    with pytest.raises(InvalidInput, match="on eu-1 already"):
        moves.plan_move(T, SRC, SRC, None, None)
    with pytest.raises(InvalidInput, match="needs reason") as exc:
        moves.plan_move(T, SRC, AP, None, None)
    assert exc.value.field == "reason"
    assert moves.plan_move(T, SRC, AP, None, "customer asked").region_move
    held = TenantFacts("acme", "active", "eu-1", "eu", None, True)
    with pytest.raises(Conflict, match="legal hold"):
        moves.plan_move(held, SRC, AP, None, "why")
    assert moves.plan_move(held, SRC, DST, None, None).to_server == "eu-2"  # same region: ok
    for state in ("provisioning", "deleted", "purged"):
        with pytest.raises(Conflict, match=f"is {state}"):
            moves.plan_move(TenantFacts("acme", state, "eu-1", "eu", None, False), SRC, DST,
                            None, None)
    for state in ("suspended", "cancelled"):
        moves.plan_move(TenantFacts("acme", state, "eu-1", "eu", None, False), SRC, DST,
                        None, None)
    with pytest.raises(Conflict, match="being cancelled"):
        moves.plan_move(TenantFacts("acme", "active", "eu-1", "eu", "cancel", False), SRC,
                        DST, None, None)
    with pytest.raises(Conflict, match="support grant"):
        moves.plan_move(TenantFacts("acme", "active", "eu-1", "eu", None, False,
                                    live_grants=1), SRC, DST, None, None)
    with pytest.raises(CapacityError, match="full"):
        moves.plan_move(T, SRC, ServerFacts("eu-2", "eu", 2, 2, True, 180000), None, None)
    with pytest.raises(Conflict, match="not accepting"):
        moves.plan_move(T, SRC, ServerFacts("eu-2", "eu", 9, 2, False, 180000), None, None)
    with pytest.raises(InvalidInput, match="one cluster"):
        moves.plan_move(T, SRC, ServerFacts("eu-2", "eu", 9, 2, True, 180000, None,
                                            "sysid:1"), None, None)


def test_choose_target_least_filled_with_room() -> None:
    a = ServerFacts("eu-2", "eu", 10, 9, True, None)
    b = ServerFacts("eu-3", "eu", 100, 50, True, None)
    full = ServerFacts("eu-4", "eu", 1, 1, True, None)
    drained = ServerFacts("eu-5", "eu", 100, 0, False, None)
    assert moves.choose_target(T, [SRC, a, b, full, drained]).name == "eu-3"
    with pytest.raises(CapacityError, match="no server with room"):
        moves.choose_target(T, [SRC, full, drained])


def test_steps() -> None:
    assert moves.steps_for("dump", False) == (
        "planned", "target", "paused", "copied", "checked", "cutover", "source_dropped",
        "done")
    logical = moves.steps_for("logical", True)
    assert logical.index("replicating") < logical.index("paused") < logical.index("cutover") \
        < logical.index("backed_up") < logical.index("old_backups_deleted")
    # before the cutover a re-run redoes the copy from the target; after, it finishes
    assert moves.steps_after("copied", "dump", False)[0] == "target"
    assert moves.steps_after("cutover", "dump", True) == (
        "source_dropped", "backed_up", "old_backups_deleted", "done")
    assert not moves.cut_over("checked") and moves.cut_over("cutover")
    assert moves.cut_over("old_backups_deleted")


def test_plan_estimates_the_pause() -> None:
    dump = moves.plan_move(T, SRC, DST, "dump", None)
    logical = moves.plan_move(T, SRC, DST, None, None)
    assert dump.expected_pause_s > logical.expected_pause_s
    # the checks read every row while writes are paused: a bigger tenant pauses longer
    assert moves.expected_pause_s("logical", 2**30) > moves.expected_pause_s("logical", 2**20)
    assert dump.to_json()["steps"][-1] == "done"


def test_compare_checks() -> None:
    src = {"tables": {"a": TableSum(3, "1:2"), "b": TableSum(0, "0:0")},
           "sequences": {"a_id_seq": (3, True)}, "large_objects": {"count": 0, "md5": ""}}
    assert moves.compare_checks(src, dict(src)) == []
    bad = {"tables": {"a": TableSum(3, "1:3"), "c": TableSum(1, "x")},
           "sequences": {"a_id_seq": (1, False)}, "large_objects": {"count": 1, "md5": "z"}}
    assert moves.compare_checks(src, bad) == [
        "table a: same row count (3), different content",
        "table b is missing on the target",
        "table c is extra on the target",
        "sequence a_id_seq: (3, True) on the source, (1, False) on the target",
        "large objects differ"]
    fewer = {**src, "tables": {"a": TableSum(2, "1:2"), "b": TableSum(0, "0:0")}}
    assert moves.compare_checks(src, fewer) == ["table a: 3 rows on the source, 2 on the target"]
    assert moves.checks_json(src)["rows"] == 3


def test_replication_object_name() -> None:
    assert move_object_name(42) == "tctl_move_42"
