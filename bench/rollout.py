"""Rollout throughput: one new revision over a fleet of real tenant databases.

    python bench/rollout.py [--tenants 500] [--rows 3000] [--baseline-sample 50]

Builds a fleet over two embedded clusters (two regions), every tenant at
0004 with a few thousand products, then rolls 0005_reorder_level out (a
column with a default plus an index on products) with `RolloutRun` at
concurrency 1, 4, 8 and 16 (each the median of --repeat runs), rolling back
between runs (not timed). The
baseline is what a typical operator script does, a shell loop running the
stock `alembic upgrade` command once per tenant, timed on a sample of tenants
(it is a rate, and the whole fleet would take minutes). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.synthetic_history import cli_copy  # noqa: E402
from orchestrator.adapters.catalog.db import with_dbname  # noqa: E402
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.api import Fleet  # noqa: E402
from orchestrator.config import Config, load_config  # noqa: E402
from orchestrator.domain.names import TEMPLATE_DB, TEMPLATE_OWNER  # noqa: E402
from orchestrator.services import templates  # noqa: E402
from orchestrator.services.rollout import RolloutOptions, RolloutRun  # noqa: E402

OLD, NEW = "0004_order_status_idx", "0005_reorder_level"


def seed_templates(fleet: Fleet, rows: int) -> None:
    """Templates at OLD holding `rows` products, so every clone starts with them."""
    fleet.set_target_revision(OLD)
    for sc in fleet.cfg.servers:
        templates.build(fleet, sc.name, OLD)
        with pgserver.connect(sc.admin_dsn, server=sc.name) as conn:
            pgserver.set_template_connections(conn, True)
            try:
                with pgserver.connect(sc.admin_dsn, TEMPLATE_DB, autocommit=False) as t:
                    t.execute(f'SET ROLE "{TEMPLATE_OWNER}"')
                    t.execute("INSERT INTO categories (name) VALUES ('bench')")
                    t.execute(
                        "INSERT INTO products (sku, name, category_id, unit_price) "
                        "SELECT 'SKU-' || g, 'product ' || g, (SELECT min(id) FROM categories),"
                        " (g %% 500) / 10.0 FROM generate_series(1, %s) g", (rows,))
                    t.commit()
            finally:
                pgserver.set_template_connections(conn, False)


def provision_fleet(fleet: Fleet, n: int) -> list[str]:
    regions = list(fleet.cfg.regions)
    slugs = [f"bench_{i:04d}" for i in range(n)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda s: fleet.provision(s[1], regions[s[0] % len(regions)]),
                      enumerate(slugs)))
    return slugs


def timed_rollout(fleet: Fleet, to: str, concurrency: int) -> tuple[float, dict[str, int]]:
    opts = RolloutOptions(to=to, concurrency=concurrency, per_server=concurrency,
                          max_failures="0", lock_timeout="5s")
    t0 = time.perf_counter()
    summary = RolloutRun(fleet, opts).run()
    elapsed = time.perf_counter() - t0
    if summary.status != "completed":
        raise SystemExit(f"rollout to {to} did not complete: {summary.to_json()}")
    return elapsed, summary.counts


def baseline(fleet: Fleet, slugs: list[str], state: Path, to: str = NEW) -> float:
    """Seconds for a shell loop of `alembic upgrade TO`, one subprocess per tenant."""
    ini = cli_copy(fleet.cfg.tenant_migrations, state / "cli")
    lines = ["set -e"]
    for slug in slugs:
        t = fleet.get_tenant(slug)
        dsn = with_dbname(fleet.cfg.server(t.server).admin_dsn, t.database)
        from psycopg.conninfo import conninfo_to_dict

        p = conninfo_to_dict(dsn)
        url = (f"postgresql+psycopg://{p['user']}@{p['host']}:{p['port']}/{p['dbname']}"
               f"?passfile={p['passfile']}")
        lines.append(f"'{common.alembic_cli()}' -c '{ini}' -x 'url={url}' upgrade {to} "
                     ">/dev/null 2>&1")
    script = state / "baseline.sh"
    script.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    subprocess.run(["bash", str(script)], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tenants", type=int, default=500)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--baseline-sample", type=int, default=50)
    ap.add_argument("--concurrency", default="1,4,8,16",
                    help="the issue asks for 1, 4 and 16; 8 is where 2 cores peak")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per concurrency")
    ap.add_argument("--data-dir", default="/tmp")
    args = ap.parse_args()

    state = common.new_state(args.data_dir)
    eu, ap_ = common.ports(state, 2)
    servers = [("bench-eu", "eu-central", eu), ("bench-ap", "ap-south", ap_)]
    cfg: Config | None = None
    out: dict[str, object] = {"benchmark": "rollout", "tenants": args.tenants,
                              "rows_per_tenant": args.rows, "revision": NEW,
                              "data_dir": args.data_dir, "python": sys.version.split()[0]}
    try:
        cfg = common.start(common.write_config(state, servers, local=True))
        fleet = Fleet(load_config(cfg.path))
        seed_templates(fleet, args.rows)
        t0 = time.perf_counter()
        slugs = provision_fleet(fleet, args.tenants)
        out["setup_provision_s"] = round(time.perf_counter() - t0, 1)
        # Steady state before timing: the setup just wrote ~5 GB of new databases,
        # which the kernel would otherwise write back during the first timed runs
        # (a fleet provisioned over weeks has no such backlog), and one untimed
        # round trip warms the servers' caches.
        os.sync()
        timed_rollout(fleet, NEW, 8)
        timed_rollout(fleet, OLD, 8)
        runs: dict[str, dict[str, Any]] = {}
        for c in (int(x) for x in args.concurrency.split(",")):
            rates: list[float] = []
            counts: dict[str, int] = {}
            for _ in range(args.repeat):  # the median of a few runs: this VM is noisy
                elapsed, counts = timed_rollout(fleet, NEW, c)
                rates.append(round(args.tenants / elapsed, 1))
                timed_rollout(fleet, OLD, 8)  # back, untimed
            runs[f"concurrency_{c}"] = {"tenants_per_s": statistics.median(rates),
                                        "runs_tenants_per_s": rates, "counts": counts}
            print(f"concurrency {c}: {rates} tenants/s", file=sys.stderr)
        out["rollout"] = runs
        sample = slugs[: args.baseline_sample]
        seconds = baseline(fleet, sample, state)
        base_rate = len(sample) / seconds
        out["baseline_shell_loop"] = {"tenants": len(sample), "seconds": round(seconds, 2),
                                      "tenants_per_s": round(base_rate, 2)}
        best = max(r["tenants_per_s"] for r in runs.values())
        out["best_tenants_per_s"] = best
        out["speedup_vs_baseline"] = round(best / base_rate, 1)
        out["targets"] = {"best_ge_100_tenants_per_s": best >= 100,
                          "speedup_ge_30x": best / base_rate >= 30}
        fleet.close()
    finally:
        if cfg is not None:
            common.stop(cfg)
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
