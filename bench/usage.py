"""`usage collect` over many tenants, against a naive per-tenant collection.

    python bench/usage.py [--tenants 1000] [--databases 1000] [--runs 3]

One embedded cluster. ``--databases`` real (empty) databases are created from
template0, and ``--tenants`` synthetic tenant rows are put in the catalog pointing
at them round-robin (fewer databases than tenants: several tenants share one, the
server's query then sizes each database once). Then:

- ``collect``: orchestrator.services.usage.collect in process (median of --runs;
  the first run inserts every sample, the next ones update the period's rows), and
  once through the CLI (`tenantctl usage collect --json`, start-up included);
- ``baseline``: what a naive collector does — a connection to each tenant's
  database, reading its pg_stat_database row and pg_database_size, then one catalog
  insert per tenant — timed in the same run over the same tenants.

Goal: collect ≤ 5 s at 1,000 tenants on this machine. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from orchestrator.adapters.postgres.libpq import with_dbname  # noqa: E402
from orchestrator.adapters.postgres.pgtools import pg_tool  # noqa: E402
from orchestrator.api import Fleet  # noqa: E402
from orchestrator.config import Config, load_config  # noqa: E402
from orchestrator.devfleet import localfleet  # noqa: E402
from orchestrator.services import usage  # noqa: E402

FILL = """
INSERT INTO tenants (slug, region, server, database, login_role, owner_role, state)
SELECT 'u' || g, 'eu-central', 'eu-1', 'bench_u' || (g %% %(dbs)s::int),
       'tenant_u' || g, 'owner_u' || g, 'active'
FROM generate_series(1, %(n)s::int) g
"""


def create_databases(admin_dsn: str, count: int) -> float:
    started = time.monotonic()
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for i in range(count):
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
                sql.Identifier(f"bench_u{i}")))
    return time.monotonic() - started


def naive(fleet: Fleet, admin_dsn: str) -> float:
    """A connection per tenant database, its stats and size, one catalog write each."""
    with fleet.catalog.session() as s:
        rows = s.execute(sql_text("SELECT id, database FROM tenants")).all()
    started = time.monotonic()
    with psycopg.connect(fleet.cfg.catalog_dsn, autocommit=True) as catalog:
        catalog.execute("CREATE TEMP TABLE naive (tenant_id bigint, at timestamptz, "
                        "size bigint, xacts bigint, tup bigint, conns int)")
        for tid, db in rows:
            with psycopg.connect(with_dbname(admin_dsn, db), autocommit=True) as conn:
                r = conn.execute(
                    "SELECT pg_database_size(current_database()), xact_commit + "
                    "xact_rollback, tup_inserted + tup_updated + tup_deleted, numbackends "
                    "FROM pg_stat_database WHERE datname = current_database()").fetchone()
            assert r is not None
            catalog.execute("INSERT INTO naive VALUES (%s, now(), %s, %s, %s, %s)",
                            (tid, *r))
    return time.monotonic() - started


def sql_text(q: str):  # type: ignore[no-untyped-def]
    from sqlalchemy import text

    return text(q)


def run(tenants: int = 1000, databases: int = 1000, runs: int = 3,
        data_dir: str = "/var/tmp", keep: bool = False) -> dict[str, object]:
    """The whole benchmark on a cluster of its own; its figures (bench/neighbours.py
    calls it too)."""
    dbs = min(databases, tenants)
    state = common.new_state(data_dir)
    (port,) = common.ports(state, 1)
    cfg_path = common.write_config(state, [("eu-1", "eu-central", port)], local=True)
    cfg = common.start(cfg_path)
    try:
        admin = cfg.server("eu-1").admin_dsn
        made = create_databases(admin, dbs)
        with psycopg.connect(cfg.catalog_dsn, autocommit=True) as conn:
            conn.execute(FILL, {"n": tenants, "dbs": dbs})
        fleet = Fleet(load_config(cfg_path))
        try:
            timed = []
            for _ in range(runs):
                r = usage.collect(fleet, datetime.now(UTC))
                assert not r.failed, r.failed[:3]
                assert len(r.tenants) == tenants
                timed.append(r.seconds)
            baseline = naive(fleet, admin)
        finally:
            fleet.close()
        started = time.monotonic()
        cli = subprocess.run([sys.executable, "-m", "cli", "--config", str(cfg_path), "usage",
                              "collect", "--json"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent, check=True)
        cli_s = time.monotonic() - started
        cli_result = json.loads(cli.stdout)
        median = statistics.median(timed)
        return {
            "benchmark": "usage collect", "tenants": tenants, "databases": dbs,
            "databases_created_s": round(made, 1),
            "collect_s": {"runs": [round(x, 3) for x in timed], "median": round(median, 3),
                          "first_run_inserts": round(timed[0], 3)},
            "collect_cli_s": round(cli_s, 3), "collect_cli_reported_s": cli_result["seconds"],
            "baseline_naive_per_tenant_connection_s": round(baseline, 3),
            "speedup_vs_baseline": round(baseline / median, 1),
            "goal_s": 5.0, "goal_met": median <= 5.0,
        }
    finally:
        if not keep:
            stop_patiently(cfg, state)


def stop_patiently(cfg: Config, state: Path) -> None:
    """Stop the throwaway cluster and remove its state dir. Immediate: a thousand new
    databases make a shutdown checkpoint of minutes on a busy disk (380 s here, fsync
    of 170,000 files), for data deleted right after."""
    owner = localfleet._os_user()
    for server in localfleet.local_servers(cfg):
        assert server.data_dir is not None
        res = localfleet._run_as([pg_tool(cfg, "pg_ctl"), "-D", str(server.data_dir), "-m",
                                  "immediate", "-w", "-t", "60", "stop"], owner)
        if res.returncode != 0 and localfleet._running_pid(server.data_dir) is not None:
            print(f"warning: could not stop {server.name}; left in {state}", file=sys.stderr)
            return
    shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--databases", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data-dir", default="/var/tmp")
    ap.add_argument("--keep", action="store_true", help="Leave the cluster and state dir.")
    args = ap.parse_args()
    print(json.dumps(run(args.tenants, args.databases, args.runs, args.data_dir, args.keep),
                     indent=2))


if __name__ == "__main__":
    main()
