"""Retention planning over a large synthetic catalog.

    python bench/retention.py [--tenants 100000] [--due 100] [--backups-per-tenant 10]

Fills a catalog (one embedded cluster) with synthetic tenant rows in mixed
states (60% active, 10% suspended, 10% cancelled, 10% deleted, 10% purged;
holds and purge dates spread over the coming months, `--due` of each kind
already past) and steady-state backup rows for live tenants (daily for a week
plus one a week for three more weeks: nothing to prune). Then times the planning of
`retention run --dry-run`, in process (median of 5) and as the CLI, at:
the full fleet with --due actions, the full fleet with 10× as many due
actions, and a fleet a tenth the size with --due actions, so the JSON shows
whether the cost follows the fleet or the due actions. No tenant database is
made: planning reads only the catalog. Target: ≤ 2 s at 100,000 tenants.
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
from datetime import UTC, datetime
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from orchestrator.api import Fleet  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.services import retention  # noqa: E402

FILL = """
INSERT INTO tenants (slug, region, server, database, login_role, owner_role, state,
                     cancelled_at, hold_until, deleted_at, purge_after, purged_at, legal_hold)
SELECT 's' || g, 'eu-central', 'eu-1', 'tenant_s' || g, 'tenant_s' || g, 'owner_s' || g,
       st,
       CASE WHEN st = 'cancelled' THEN now() - interval '10 days' END,
       CASE WHEN st = 'cancelled' THEN
            CASE WHEN g %% 10 = 2 AND g / 10 < %(due)s::int THEN now() - interval '1 hour'
                 ELSE now() + (g %% 29 + 1) * interval '1 day' END END,
       CASE WHEN st IN ('deleted', 'purged') THEN now() - interval '40 days' END,
       CASE WHEN st = 'deleted' THEN
            CASE WHEN g %% 10 = 3 AND g / 10 < %(due)s::int THEN now() - interval '1 hour'
                 ELSE now() + (g %% 89 + 1) * interval '1 day' END
            WHEN st = 'purged' THEN now() - interval '10 days' END,
       CASE WHEN st = 'purged' THEN now() - interval '10 days' END,
       g %% 1000 = 7
FROM (SELECT g, (ARRAY['active','active','cancelled','deleted','purged','active','active',
                       'suspended','active','active'])[g %% 10 + 1] AS st
      FROM generate_series(%(first)s::int, %(last)s::int) g) s
"""

BACKUPS = """
INSERT INTO backups (tenant_id, slug, region, store_url, object_key, manifest_key, kind,
                     status, size, started_at, finished_at)
SELECT t.id, t.slug, t.region, 'file:///nowhere', 'o', 'm', 'scheduled', 'completed', 1000,
       now() - d * interval '1 day', now() - d * interval '1 day' + interval '1 minute'
FROM tenants t, unnest(%(days)s::int[]) d
WHERE t.state IN ('active', 'suspended')
"""


def fill(dsn: str, tenants: int, due: int, backups_per_tenant: int) -> None:
    days = [0, 1, 2, 3, 4, 5, 6, 9, 16, 23][:backups_per_tenant]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO regions (name, backup_store) VALUES "
                     "('eu-central', 'file:///nowhere') ON CONFLICT DO NOTHING")
        conn.execute("INSERT INTO servers (name, region, capacity) VALUES "
                     "('eu-1', 'eu-central', 1000000) ON CONFLICT DO NOTHING")
        for first in range(0, tenants, 50_000):
            conn.execute(FILL, {"first": first, "last": min(first + 50_000, tenants) - 1,
                                "due": due})
        conn.execute(BACKUPS, {"days": days})
        conn.execute("ANALYZE")


def make_due(dsn: str, due: int) -> None:
    """Past-date the first `due` holds and purges (of those not due yet)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for state, col in (("cancelled", "hold_until"), ("deleted", "purge_after")):
            conn.execute(f"UPDATE tenants SET {col} = now() - interval '1 hour' WHERE id IN "
                         f"(SELECT id FROM tenants WHERE state = %s AND {col} > now() "
                         f"ORDER BY id LIMIT %s)", (state, due))


def time_plan(cfg_path: Path, jobs: tuple[str, ...]) -> dict[str, float | int]:
    fleet = Fleet(load_config(cfg_path))
    try:
        samples, actions = [], 0
        for _ in range(5):
            t0 = time.perf_counter()
            plan = retention.make_plan(fleet, datetime.now(UTC), jobs)
            samples.append((time.perf_counter() - t0) * 1000)
            actions = len(plan)
    finally:
        fleet.close()
    return {"median_ms": round(statistics.median(samples), 1),
            "max_ms": round(max(samples), 1), "actions": actions}


def time_cli(cfg_path: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli", "--config", str(cfg_path), "retention",
                           "run", "--dry-run", "--json"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"retention run --dry-run failed: {proc.stderr}")
    return round(elapsed * 1000, 1)


def measure(cfg_path: Path, dsn: str) -> dict[str, object]:
    return {"plan_all_jobs": time_plan(cfg_path, retention.JOBS),
            "plan_delete_purge": time_plan(cfg_path, ("delete", "purge")),
            "plan_prune": time_plan(cfg_path, ("prune",)),
            "cli_dry_run_ms": time_cli(cfg_path)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=100_000)
    ap.add_argument("--due", type=int, default=100)
    ap.add_argument("--backups-per-tenant", type=int, default=10)
    ap.add_argument("--data-dir", default="/var/tmp")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    state = common.new_state(args.data_dir)
    (port,) = common.ports(state, 1)
    cfg_path = common.write_config(state, [("eu-1", "eu-central", port)], local=True)
    cfg = common.start(cfg_path)
    out: dict[str, object] = {"tenants": args.tenants, "due_each_kind": args.due,
                              "backups_per_live_tenant": args.backups_per_tenant}
    try:
        small_dsn = cfg.catalog_dsn.replace("dbname=tenantctl_catalog",
                                            "dbname=tenantctl_catalog_small")
        small_path = state / "small.toml"
        small_path.write_text(cfg_path.read_text().replace(
            "/tenantctl_catalog?", "/tenantctl_catalog_small?"))
        from orchestrator.adapters.catalog.db import Catalog

        small = Catalog(load_config(small_path))
        small.upgrade()
        small.dispose()

        t0 = time.perf_counter()
        fill(cfg.catalog_dsn, args.tenants, args.due, args.backups_per_tenant)
        fill(small.dsn, args.tenants // 10, args.due, args.backups_per_tenant)
        out["fill_s"] = round(time.perf_counter() - t0, 1)
        out["fleet"] = measure(cfg_path, cfg.catalog_dsn)
        out["tenth_fleet"] = measure(small_path, small_dsn)
        make_due(cfg.catalog_dsn, args.due * 9)
        out["fleet_10x_due"] = measure(cfg_path, cfg.catalog_dsn)
        cli_ms = out["fleet"]["cli_dry_run_ms"]  # type: ignore[index]
        out["target_met"] = cli_ms <= 2000
        out["fleet_to_tenth_plan_ratio"] = round(
            out["fleet"]["plan_delete_purge"]["median_ms"]  # type: ignore[index]
            / max(out["tenth_fleet"]["plan_delete_purge"]["median_ms"], 0.1), 2)  # type: ignore[index]
    finally:
        common.stop(cfg)
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
