"""Servers on real clusters: a local fleet of two embedded clusters per region
(`init --local --servers-per-region 2`), what they offer tenant moves (logical WAL,
the admin's REPLICATION), `config check` and `doctor` saying when a server cannot,
the accepting flag honoured by placement, and `server retire`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from orchestrator.config import Config, load_config
from orchestrator.devfleet import localfleet
from tests.conftest import REPO, TENANTCTL

pytestmark = pytest.mark.pg  # the module starts four clusters of its own


@dataclass
class Fleet2:
    home: Path

    def cli(self, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        env = {**{k: v for k, v in os.environ.items() if k != "TENANTCTL_CONFIG"},
               **(env or {})}
        env["PYTHONPATH"] = str(REPO)
        return subprocess.run([*TENANTCTL, *args], cwd=self.home, capture_output=True,
                              text=True, env=env, timeout=300)

    def config(self) -> Config:
        return load_config(self.home / "tenantctl.toml")

    def admin(self, server: str) -> psycopg.Connection:
        return psycopg.connect(self.config().server(server).admin_dsn, autocommit=True,
                               connect_timeout=5)

    def superuser(self, server: str) -> psycopg.Connection:
        sc = self.config().server(server)
        password = (self.home / ".tenantctl" / "secrets" / f"{server}.superuser"
                    ).read_text().strip()
        return psycopg.connect(host="127.0.0.1", port=sc.port, user=localfleet.SUPERUSER,
                               password=password, dbname="postgres", autocommit=True,
                               connect_timeout=5)


@pytest.fixture(scope="module")
def fleet2() -> Iterator[Fleet2]:
    home = Path(tempfile.mkdtemp(prefix="tenantctl-servers-", dir="/tmp"))
    os.chmod(home, 0o755)
    f = Fleet2(home)
    base = next(p for p in range(29300, 30000, 7)
                if all(localfleet._port_free(q) for q in range(p, p + 4)))
    try:
        init = f.cli("init", "--local", "--servers-per-region", "2", "--base-port", str(base))
        assert init.returncode == 0, init.stderr + init.stdout
        yield f
    finally:
        f.cli("local", "down")
        shutil.rmtree(home, ignore_errors=True)


def test_two_clusters_per_region_with_logical_wal(fleet2: Fleet2) -> None:
    status = json.loads(fleet2.cli("local", "status", "--json").stdout)
    assert [(s["server"], s["region"], s["running"]) for s in status] == [
        ("eu-central-1", "eu-central", True), ("eu-central-2", "eu-central", True),
        ("ap-south-1", "ap-south", True), ("ap-south-2", "ap-south", True)]
    assert len({s["port"] for s in status}) == 4
    for slug in ("spread_a", "spread_b"):
        created = fleet2.cli("tenant", "create", slug, "--region", "eu-central")
        assert created.returncode == 0, created.stderr
    shown = [json.loads(fleet2.cli("tenant", "show", slug, "--json").stdout)
             for slug in ("spread_a", "spread_b")]
    assert sorted(t["server"] for t in shown) == ["eu-central-1", "eu-central-2"]
    for s in status:
        with fleet2.admin(s["server"]) as conn:
            assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
            assert int(conn.execute("SHOW max_replication_slots").fetchone()[0]) >= 10  # type: ignore[index]
            assert conn.execute(
                "SELECT rolsuper, rolreplication, pg_has_role('pg_create_subscription', "
                "'USAGE') FROM pg_roles WHERE rolname = current_user").fetchone() == (
                False, True, True)
    check = fleet2.cli("config", "check", "--json")
    assert check.returncode == 0, check.stderr
    assert all(v == {"ready": True, "why": []}
               for v in json.loads(check.stdout)["logical_moves"].values())


def test_config_check_and_doctor_say_when_a_server_cannot_move_logically(
        fleet2: Fleet2) -> None:
    with fleet2.superuser("ap-south-2") as conn:
        conn.execute("ALTER ROLE tenantctl_admin NOREPLICATION")
    try:
        check = fleet2.cli("config", "check")
        assert check.returncode == 0, check.stderr
        assert "note: ap-south-2 cannot move tenants by logical replication (the admin " \
               "role lacks REPLICATION): its moves use pg_dump" in check.stdout
        assert "eu-central-1 cannot" not in check.stdout
        doctor = fleet2.cli("doctor", "--json")
        assert doctor.returncode == 0, doctor.stderr  # information, not an error
        found = [x for x in json.loads(doctor.stdout)["findings"]
                 if x["code"] == "server-no-logical-moves"]
        assert [(x["severity"], x["subject"]) for x in found] == [("info", "ap-south-2")]
        assert "REPLICATION" in found[0]["message"] and "pg_dump" in found[0]["message"]
        assert "ALTER ROLE tenantctl_admin REPLICATION" in found[0]["remedy"]
    finally:
        assert fleet2.cli("local", "up").returncode == 0  # gives REPLICATION back
    again = json.loads(fleet2.cli("config", "check", "--json").stdout)
    assert again["logical_moves"]["ap-south-2"] == {"ready": True, "why": []}


def test_a_cluster_made_before_moves_gets_logical_wal_at_local_up(fleet2: Fleet2) -> None:
    with fleet2.superuser("ap-south-2") as conn:
        conn.execute("ALTER SYSTEM SET wal_level = minimal")
        conn.execute("ALTER SYSTEM SET max_wal_senders = 0")
    assert fleet2.cli("local", "down").returncode == 0
    up = fleet2.cli("local", "up")
    assert up.returncode == 0, up.stderr
    assert "ap-south-2: restarted to turn on logical WAL for tenant moves" in up.stdout
    assert "eu-central-1: restarted" not in up.stdout
    with fleet2.admin("ap-south-2") as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        assert conn.execute("SHOW max_wal_senders").fetchone() == ("20",)


def _catalog(fleet2: Fleet2) -> psycopg.Connection:
    return psycopg.connect(fleet2.config().catalog_dsn, autocommit=True, connect_timeout=5)


def test_placement_skips_a_server_not_accepting_and_region_list_says_so(
        fleet2: Fleet2) -> None:
    with _catalog(fleet2) as conn:
        conn.execute("UPDATE servers SET accepting = false WHERE name = 'ap-south-1'")
    try:
        for slug in ("acc_a", "acc_b", "acc_c"):
            created = fleet2.cli("tenant", "create", slug, "--region", "ap-south")
            assert created.returncode == 0, created.stderr
            shown = json.loads(fleet2.cli("tenant", "show", slug, "--json").stdout)
            assert shown["server"] == "ap-south-2"
        listed = fleet2.cli("region", "list")
        row = next(ln for ln in listed.stdout.splitlines() if "ap-south-1" in ln)
        assert "no (drained)" in row
        servers = {s["name"]: s for r in json.loads(fleet2.cli("region", "list", "--json")
                                                    .stdout) for s in r["servers"]}
        assert (servers["ap-south-1"]["accepting"], servers["ap-south-2"]["accepting"]) == \
            (False, True)
        assert servers["ap-south-1"]["available"] and servers["ap-south-1"]["retired_at"] \
            is None
        # the config's sync (catalog upgrade) leaves a drained server drained
        assert fleet2.cli("catalog", "upgrade").returncode == 0
        with _catalog(fleet2) as conn:
            assert conn.execute("SELECT accepting FROM servers WHERE name = 'ap-south-1'"
                                ).fetchone() == (False,)
        with _catalog(fleet2) as conn:
            conn.execute("UPDATE servers SET accepting = false WHERE name = 'ap-south-2'")
        refused = fleet2.cli("tenant", "create", "acc_none", "--region", "ap-south")
        assert refused.returncode == 5, refused.stderr
        assert "region 'ap-south' has no server accepting new tenants" in refused.stderr
    finally:
        with _catalog(fleet2) as conn:
            conn.execute("UPDATE servers SET accepting = true WHERE region = 'ap-south'")


def test_drain_and_rebalance_plans_and_refusals_through_the_cli(fleet2: Fleet2) -> None:
    for slug in ("dr_a", "dr_b"):
        assert fleet2.cli("tenant", "create", slug, "--region", "eu-central").returncode == 0
    on = {t["slug"]: t["server"] for t in json.loads(
        fleet2.cli("tenant", "list", "--region", "eu-central", "--json").stdout)}
    source = on["dr_a"]
    other = next(s for s in ("eu-central-1", "eu-central-2") if s != source)
    dry = fleet2.cli("server", "drain", source, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    leaving = sorted(slug for slug, server in on.items() if server == source)
    assert sorted(m["tenant"] for m in plan["planned"]) == leaving
    assert {m["to"] for m in plan["planned"]} == {other} and plan["dry_run"]
    text = fleet2.cli("server", "drain", source, "--dry-run")
    assert f"would drain {source} (eu-central): {len(leaving)} tenant(s) to move" in \
        text.stdout and f"  dr_a: {source} -> {other}" in text.stdout
    with _catalog(fleet2) as conn:  # a dry run changes nothing
        assert conn.execute("SELECT accepting FROM servers WHERE name = %s",
                            (source,)).fetchone() == (True,)
    rebalance = fleet2.cli("region", "rebalance", "eu-central", "--dry-run", "--json")
    assert rebalance.returncode == 0, rebalance.stderr
    doc = json.loads(rebalance.stdout)
    assert doc["region"] == "eu-central" and doc["dry_run"] and sum(doc["before"].values()) \
        == len(on)
    # the region lacks room: a clear refusal, exit 5, nothing changed
    with _catalog(fleet2) as conn:
        conn.execute("UPDATE servers SET capacity = %s WHERE name = %s",
                     (sum(s == other for s in on.values()) or 1, other))
    try:
        full = fleet2.cli("server", "drain", source, "--yes")
        assert full.returncode == 5, full.stderr
        assert f"region 'eu-central' lacks room to drain {source}" in full.stderr
    finally:
        assert fleet2.cli("catalog", "upgrade").returncode == 0  # the config's capacity
    for args, code, says in (
            (("server", "drain", "nowhere-9", "--dry-run"), 3, "no server 'nowhere-9'"),
            (("server", "drain", source, "--concurrency", "0"), 2,
             "--concurrency must be at least 1"),
            (("region", "rebalance", "mars", "--dry-run"), 2, "mars"),
            (("server", "retire", "nowhere-9"), 3, "no server 'nowhere-9'")):
        proc = fleet2.cli(*args)
        assert proc.returncode == code, (args, proc.stderr)
        assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, args


def test_retire_refuses_a_server_with_tenants_and_retires_an_empty_one(
        fleet2: Fleet2) -> None:
    assert fleet2.cli("tenant", "create", "ret_a", "--region", "eu-central").returncode == 0
    server = json.loads(fleet2.cli("tenant", "show", "ret_a", "--json").stdout)["server"]
    refused = fleet2.cli("server", "retire", server)
    assert refused.returncode == 4, refused.stderr
    assert f"error: server {server} still holds" in refused.stderr
    assert f"`tenantctl server drain {server}` first" in refused.stderr
    with _catalog(fleet2) as conn:
        assert conn.execute("SELECT accepting, retired_at FROM servers WHERE name = %s",
                            (server,)).fetchone() == (True, None)
        # ap-south-1 holds no tenant (placement gave ap-south's to ap-south-2)
        assert conn.execute("SELECT count(*) FROM tenants WHERE server = 'ap-south-1' AND "
                            "state NOT IN ('deleted', 'purged')").fetchone() == (0,)
    retired = fleet2.cli("server", "retire", "ap-south-1", "--json")
    assert retired.returncode == 0, retired.stderr
    assert json.loads(retired.stdout)["changed"] is True
    again = fleet2.cli("server", "retire", "ap-south-1")
    assert again.returncode == 0 and "already retired" in again.stdout
    row = next(ln for ln in fleet2.cli("region", "list").stdout.splitlines()
               if "ap-south-1" in ln)
    assert "no (retired)" in row
    created = fleet2.cli("tenant", "create", "ret_b", "--region", "ap-south")
    assert created.returncode == 0, created.stderr
    assert json.loads(fleet2.cli("tenant", "show", "ret_b", "--json").stdout)["server"] == \
        "ap-south-2"
    assert fleet2.cli("server", "accept", "ap-south-1").returncode == 4  # retired stays so
    audit = fleet2.cli("audit", "list", "--action", "server.", "--json")
    assert audit.returncode == 0, audit.stderr
    assert "server.retire" in {e["action"] for e in json.loads(audit.stdout)}


def _where(fleet2: Fleet2, region: str) -> dict[str, str]:
    return {t["slug"]: t["server"] for t in json.loads(
        fleet2.cli("tenant", "list", "--region", region, "--json").stdout)
        if t["state"] not in ("deleted", "purged")}


def _tenant_databases(fleet2: Fleet2, server: str) -> list[str]:
    with fleet2.admin(server) as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'tenant\\_%' ORDER BY 1")]


def test_drain_in_the_service_with_moves_in_parallel(fleet2: Fleet2) -> None:
    """servers.drain with `tenant move`'s service, two moves at once (each its own
    connections and sessions): the region's lock across processes, the accepting
    flag, the audit; every tenant's database on the other server afterwards."""
    from orchestrator.api import Fleet
    from orchestrator.services import servers
    from orchestrator.services.move import move_tenant

    for slug in ("cat_a", "cat_b", "cat_c"):
        assert fleet2.cli("tenant", "create", slug, "--region", "eu-central").returncode == 0
    fleet = Fleet(fleet2.config())
    try:
        with fleet.records.advisory_lock("server-moves:eu-central") as got:
            assert got
            held = fleet2.cli("server", "drain", "eu-central-1", "--dry-run")
            assert held.returncode == 4, held.stderr
            assert "a drain or rebalance of region 'eu-central' is already running" in \
                held.stderr
        on_it = [slug for slug, server in _where(fleet2, "eu-central").items()
                 if server == "eu-central-1"]
        assert len(on_it) >= 3
        result = servers.drain(fleet, "eu-central-1", mover=move_tenant, concurrency=2)
    finally:
        fleet.close()
    assert result.ok and result.remaining == 0, result.to_json()
    assert sorted(r.slug for r in result.results) == sorted(on_it)
    assert all(r.move and r.move["new_server"] == "eu-central-2" for r in result.results)
    assert set(_where(fleet2, "eu-central").values()) == {"eu-central-2"}
    assert _tenant_databases(fleet2, "eu-central-1") == []
    row = next(ln for ln in fleet2.cli("region", "list").stdout.splitlines()
               if "eu-central-1" in ln)
    assert "no (drained)" in row
    created = fleet2.cli("tenant", "create", "cat_d", "--region", "eu-central")
    assert created.returncode == 0
    assert json.loads(fleet2.cli("tenant", "show", "cat_d", "--json").stdout)["server"] == \
        "eu-central-2"
    # a drained server receives no tenant from a move (another drain, a rebalance)
    refused = fleet2.cli("tenant", "move", "cat_d", "--server", "eu-central-1", "--yes")
    assert refused.returncode == 4 and "not accepting" in refused.stderr, refused.stderr
    actions = [e["action"] for e in json.loads(
        fleet2.cli("audit", "list", "--action", "server.", "--json").stdout)]
    assert "server.drain.start" in actions and "server.drain" in actions
    accepted = fleet2.cli("server", "accept", "eu-central-1")
    assert accepted.returncode == 0 and "takes new tenants again" in accepted.stdout
    with _catalog(fleet2) as conn:
        assert conn.execute("SELECT accepting FROM servers WHERE name = 'eu-central-1'"
                            ).fetchone() == (True,)


def test_region_rebalance_evens_out_a_region_and_never_leaves_it(fleet2: Fleet2) -> None:
    before = _where(fleet2, "eu-central")
    asia = _where(fleet2, "ap-south")
    assert set(before.values()) == {"eu-central-2"} and len(before) >= 5  # 0 on -1
    proc = fleet2.cli("region", "rebalance", "eu-central", "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["moved"] == len(doc["moves"]) > 0
    after = _where(fleet2, "eu-central")
    counts = {s: list(after.values()).count(s) for s in ("eu-central-1", "eu-central-2")}
    assert max(counts.values()) <= 1.2 * len(after) / 2, counts
    assert counts == doc["after"]
    assert sorted(after) == sorted(before) and _where(fleet2, "ap-south") == asia
    assert sorted(_tenant_databases(fleet2, "eu-central-1")) == sorted(
        f"tenant_{slug}" for slug, server in after.items() if server == "eu-central-1")
    again = json.loads(fleet2.cli("region", "rebalance", "eu-central", "--yes",
                                  "--json").stdout)
    assert again["moves"] == [] and again["balanced"]


def test_a_drain_killed_mid_move_is_finished_by_the_next_run(fleet2: Fleet2) -> None:
    on_it = sorted(slug for slug, server in _where(fleet2, "eu-central").items()
                   if server == "eu-central-1")
    assert len(on_it) >= 2
    killed = fleet2.cli("server", "drain", "eu-central-1", "--yes", "--json",
                        env={"TENANTCTL_FAULT": "move.copied"})
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    with _catalog(fleet2) as conn:
        [(slug, to)] = conn.execute("SELECT slug, to_server FROM tenant_moves "
                                    "WHERE finished_at IS NULL").fetchall()
    assert to == "eu-central-2" and _where(fleet2, "eu-central")[slug] == "eu-central-1"
    done = fleet2.cli("server", "drain", "eu-central-1", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["ok"] and doc["remaining"] == 0
    resumed = {t["tenant"]: t["move"]["resumed"] for t in doc["tenants"]}
    assert resumed[slug] is True and sorted(resumed) == on_it
    assert sum(resumed.values()) == 1
    with _catalog(fleet2) as conn:
        assert conn.execute("SELECT count(*) FROM tenant_moves WHERE finished_at IS NULL"
                            ).fetchone() == (0,)
    assert _tenant_databases(fleet2, "eu-central-1") == []
    assert fleet2.cli("server", "accept", "eu-central-1").returncode == 0


def test_server_drain_moves_tenants_in_every_state_then_retire(fleet2: Fleet2) -> None:
    """Through the CLI: active, suspended, on hold and under legal hold tenants end on
    the region's other server, in their state, their data readable with the same
    password; one with a live support grant is refused (its own failed result, exit
    1) while the others move; once its grant is revoked the re-run empties the
    server, and `server retire` succeeds."""
    from datetime import timedelta

    from psycopg.conninfo import conninfo_to_dict

    from orchestrator.api import Fleet
    from orchestrator.services import access, lifecycle

    slugs = ("st_act", "st_sus", "st_held", "st_legal", "st_grant")
    fleet = Fleet(fleet2.config())
    try:
        with _catalog(fleet2) as conn:  # all of them on eu-central-1
            conn.execute("UPDATE servers SET accepting = false WHERE name = 'eu-central-2'")
        try:
            dsns = {}
            for slug in slugs:
                fleet.provision(slug, "eu-central")
                dsns[slug] = fleet.credentials(slug)
                with psycopg.connect(dsns[slug], autocommit=True, connect_timeout=5) as c:
                    c.execute("INSERT INTO suppliers (name) SELECT 's' || g "
                              "FROM generate_series(1, 25) g")
        finally:
            with _catalog(fleet2) as conn:
                conn.execute("UPDATE servers SET accepting = true "
                             "WHERE name = 'eu-central-2'")
        assert {fleet.get_tenant(s).server for s in slugs} == {"eu-central-1"}
        lifecycle.suspend(fleet, "st_sus")
        lifecycle.cancel(fleet, "st_held", backup=False)
        lifecycle.legal_hold(fleet, "st_legal", on=True, reason="case 7")
        grant = access.grant(fleet, "st_grant", to="alice@example.com",
                             ttl=timedelta(hours=1), reason="ticket 9")

        first = fleet2.cli("server", "drain", "eu-central-1", "--yes", "--json")
        assert first.returncode == 1, first.stderr
        doc = json.loads(first.stdout)
        outcome = {t["tenant"]: (t["outcome"], t["to"]) for t in doc["tenants"]}
        assert outcome == {**{s: ("moved", "eu-central-2") for s in slugs[:4]},
                           "st_grant": ("failed", "eu-central-2")}
        [failed] = [t for t in doc["tenants"] if t["outcome"] == "failed"]
        assert "live support grant" in failed["error"] and doc["remaining"] == 1
        assert fleet.get_tenant("st_grant").server == "eu-central-1"
        # each in its state on the other server, same password, the data there
        states = {s: fleet.get_tenant(s).state for s in slugs[:4]}
        assert states == {"st_act": "active", "st_sus": "suspended",
                          "st_held": "cancelled", "st_legal": "active"}
        assert fleet.get_tenant("st_legal").legal_hold
        lifecycle.resume(fleet, "st_sus")
        for slug in slugs[:4]:
            assert fleet.get_tenant(slug).server == "eu-central-2"
            old, new = conninfo_to_dict(dsns[slug]), conninfo_to_dict(
                fleet.credentials(slug))
            assert new["password"] == old["password"] and new["port"] != old["port"]
            with psycopg.connect(fleet.credentials(slug), connect_timeout=5) as c:
                assert c.execute("SELECT count(*) FROM suppliers").fetchone() == (25,)
        with psycopg.connect(fleet.credentials("st_held"), autocommit=True,
                             connect_timeout=5) as c, \
                pytest.raises(psycopg.errors.InsufficientPrivilege):  # on hold: read-only
            c.execute("INSERT INTO suppliers (name) VALUES ('no')")

        access.revoke(fleet, grant["id"])
    finally:
        fleet.close()
    second = fleet2.cli("server", "drain", "eu-central-1", "--yes", "--json")
    assert second.returncode == 0, second.stderr
    assert [(t["tenant"], t["outcome"]) for t in json.loads(second.stdout)["tenants"]] == \
        [("st_grant", "moved")]
    assert "eu-central-1" not in _where(fleet2, "eu-central").values()
    assert _tenant_databases(fleet2, "eu-central-1") == []
    retired = fleet2.cli("server", "retire", "eu-central-1", "--json")
    assert retired.returncode == 0, retired.stderr
    assert json.loads(retired.stdout)["changed"] is True
