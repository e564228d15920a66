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

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "TENANTCTL_CONFIG"}
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
    base = next(p for p in range(58300, 60000, 7)
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
    # without tenant moves in this build: one line, nothing changed
    refused = fleet2.cli("server", "drain", source, "--yes")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "error: tenant moves are not available in this build"]
    with _catalog(fleet2) as conn:
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


def test_drain_on_the_real_catalog_with_a_catalog_only_mover(fleet2: Fleet2) -> None:
    """The drain's catalog side on the real catalog: server rows, placed tenants, the
    region's lock across processes, the accepting flag, the audit. The mover only
    points the row at the target, as a cutover does (moving the data is `tenant
    move`'s, tested with it); so this runs last, on the module's own fleet."""
    from dataclasses import dataclass as dc

    from sqlalchemy import update

    from orchestrator.adapters.catalog.models import Tenant
    from orchestrator.api import Fleet
    from orchestrator.services import servers

    @dc
    class Done:
        slug: str

        def to_json(self) -> dict[str, str]:
            return {"tenant": self.slug}

    def repoint(deps: Fleet, slug: str, *, server: str, reason: str) -> Done:
        with deps.catalog.session() as s, s.begin():
            s.execute(update(Tenant).where(Tenant.slug == slug).values(server=server))
        return Done(slug)

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
        on_it = [t.slug for t in fleet.tenants("eu-central") if t.server == "eu-central-1"
                 and t.state != "purged"]
        result = servers.drain(fleet, "eu-central-1", mover=repoint, concurrency=2)
    finally:
        fleet.close()
    assert result.ok and result.remaining == 0
    assert sorted(r.slug for r in result.results) == sorted(on_it)
    listed = fleet2.cli("region", "list")
    row = next(ln for ln in listed.stdout.splitlines() if "eu-central-1" in ln)
    assert "no (drained)" in row
    created = fleet2.cli("tenant", "create", "cat_d", "--region", "eu-central")
    assert json.loads(fleet2.cli("tenant", "show", "cat_d", "--json").stdout)["server"] == \
        "eu-central-2"
    assert created.returncode == 0
    actions = [e["action"] for e in json.loads(
        fleet2.cli("audit", "list", "--action", "server.", "--json").stdout)]
    assert "server.drain.start" in actions and "server.drain" in actions
    accepted = fleet2.cli("server", "accept", "eu-central-1")
    assert accepted.returncode == 0 and "takes new tenants again" in accepted.stdout
    with _catalog(fleet2) as conn:
        assert conn.execute("SELECT accepting FROM servers WHERE name = 'eu-central-1'"
                            ).fetchone() == (True,)
