"""Servers, drains and rebalances in the fast tier: the logical method's readiness,
the local fleet's layout, the planners (orchestrator/domain/rebalance.py) and the
services over the fakes with a fake mover (orchestrator/services/servers.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from orchestrator.devfleet import localfleet
from orchestrator.domain.errors import InvalidInput
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
