"""Provisioning latency: template path vs naive path (CREATE DATABASE, then
`alembic upgrade head`), with the sample history and with a synthetic
60-revision history, all measured in the same run on fresh embedded clusters.

    python bench/provision.py [--tenants 50] [--revisions 60] [--data-dir /tmp]

Prints one JSON document with three paths per history:
- template_path: the full `Fleet.provision` (catalog rows, roles, cloned
  database, grants, login), in-process;
- naive_inprocess: the same call with `use_template = false`, so the schema
  comes from running the migrations in-process on an empty database;
- template_path_spare_pool: the same with `tenants.spare_databases = 2` (what
  `init --local` writes): the tenant's database and roles are a spare tenant,
  cloned, taken over and granted ahead of demand, renamed into place (the pool
  is refilled, untimed, between sign-ups);
- naive_cli: the literal baseline, `CREATE DATABASE` then the stock
  `alembic upgrade head` command per tenant (no roles, no grants: cheaper
  than what we do, so the ratio against it is conservative).
Templates are built, and the cluster's buffer pool warmed, before timing
starts (steady state); the template build time is reported separately.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.synthetic_history import cli_copy, write_history  # noqa: E402
from orchestrator.api import Fleet  # noqa: E402
from orchestrator.config import Config, load_config  # noqa: E402
from orchestrator.services import templates  # noqa: E402


def measure(configs: dict[str, Path], prefix: str, n: int) -> dict[str, dict[str, float]]:
    """Time the paths alternately, tenant by tenant, so disk and background noise
    fall on every path alike. After each sign-up, untimed, the spare pool's
    background refill is let finish: sign-ups arrive spaced out, not back to back
    (the pool's burst capacity is its size; past it, sign-ups clone on demand,
    which is the template path)."""
    fleets = {name: Fleet(load_config(cfg)) for name, cfg in configs.items()}
    samples: dict[str, list[float]] = {name: [] for name in fleets}
    try:
        for name, fleet in fleets.items():  # connections, imports, caches, a full pool
            fleet.provision(f"{prefix}_{name[0]}_warm", "bench")
            fleet.wait_for_refills()
        for i in range(n):
            for name, fleet in fleets.items():
                t0 = time.perf_counter()
                fleet.provision(f"{prefix}_{name[0]}_{i}", "bench")
                samples[name].append((time.perf_counter() - t0) * 1000)
                fleet.wait_for_refills()
    finally:
        for fleet in fleets.values():
            fleet.close()
    return {name: common.stats(s) for name, s in samples.items()}


def measure_cli(admin_dsn: str, ini: Path, prefix: str, n: int) -> dict[str, float]:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(admin_dsn)
    samples = []
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for i in range(n + 1):
            db = f"{prefix}_{i}"
            url = (f"postgresql+psycopg://{params['user']}@{params['host']}:{params['port']}"
                   f"/{db}?passfile={params['passfile']}")
            t0 = time.perf_counter()
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
            subprocess.run([common.alembic_cli(), "-c", str(ini), "-x", f"url={url}",
                            "upgrade", "head"], check=True, capture_output=True)
            if i:  # the first one warms the OS caches for the alembic command
                samples.append((time.perf_counter() - t0) * 1000)
    return common.stats(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--tenants", type=int, default=50)
    ap.add_argument("--revisions", type=int, default=60)
    ap.add_argument("--data-dir", default="/tmp",
                    help="where the clusters live (must be traversable by other users)")
    args = ap.parse_args()

    state = common.new_state(args.data_dir)
    synthetic = write_history(state / "synthetic", args.revisions)
    port_sample, port_synth = common.ports(state, 2)
    # one cluster per history, so each keeps its own template and catalog
    histories = {"sample": ("builtin", "bench-sample", port_sample),
                 f"synthetic_{args.revisions}": (str(synthetic), "bench-synth", port_synth)}
    started: list[Config] = []
    out: dict[str, object] = {"benchmark": "provision", "tenants_per_path": args.tenants,
                              "data_dir": args.data_dir, "python": sys.version.split()[0]}
    try:
        results: dict[str, dict[str, object]] = {}
        for label, (migrations, server, port) in histories.items():
            servers = [(server, "bench", port)]
            started.append(common.start(common.write_config(
                state, servers, migrations=migrations, local=True, name=f"{label}-local")))
            tmpl_cfg = common.write_config(state, servers, migrations=migrations,
                                           name=f"{label}-template")
            naive_cfg = common.write_config(state, servers, migrations=migrations,
                                            use_template=False, name=f"{label}-naive")
            spare_cfg = common.write_config(state, servers, migrations=migrations,
                                            spare_databases=2, name=f"{label}-spares")
            fleet = Fleet(load_config(tmpl_cfg))
            t0 = time.perf_counter()
            templates.build(fleet, server)
            build_ms = (time.perf_counter() - t0) * 1000
            source = fleet.cfg.tenant_migrations
            revisions = len(list(source.glob("versions/*.py")))
            common.warm_up(fleet, server)
            admin_dsn = fleet.cfg.server(server).admin_dsn
            fleet.close()
            ini = cli_copy(source, state / f"cli-{label}")
            timed = measure({"template": tmpl_cfg, "naive": naive_cfg, "spares": spare_cfg},
                            label[:5], args.tenants)
            tmpl, naive, spare = timed["template"], timed["naive"], timed["spares"]
            cli = measure_cli(admin_dsn, ini, f"{label[:5]}_c", args.tenants)
            results[label] = {
                "revisions": revisions, "template_build_ms": round(build_ms, 1),
                "template_path": tmpl, "template_path_spare_pool": spare,
                "naive_inprocess": naive, "naive_cli": cli,
                "speedup_p50_vs_naive_inprocess": round(naive["p50_ms"] / tmpl["p50_ms"], 2),
                "speedup_p50_vs_naive_cli": round(cli["p50_ms"] / tmpl["p50_ms"], 2),
                "spare_pool_speedup_p50_vs_naive_inprocess":
                    round(naive["p50_ms"] / spare["p50_ms"], 2),
                "spare_pool_speedup_p50_vs_naive_cli": round(cli["p50_ms"] / spare["p50_ms"], 2),
            }
        out["results"] = results
        synth = results[f"synthetic_{args.revisions}"]
        out["targets"] = {
            "template_p50_ms_le_150": all(
                r["template_path"]["p50_ms"] <= 150  # type: ignore[index]
                for r in results.values()),
            f"speedup_vs_naive_cli_at_{args.revisions}_revisions_ge_10":
                synth["speedup_p50_vs_naive_cli"] >= 10,  # type: ignore[operator]
            f"speedup_vs_naive_inprocess_at_{args.revisions}_revisions_ge_10":
                synth["speedup_p50_vs_naive_inprocess"] >= 10,  # type: ignore[operator]
            "spare_pool_p50_ms_le_150": all(
                r["template_path_spare_pool"]["p50_ms"] <= 150  # type: ignore[index]
                for r in results.values()),
            f"spare_pool_speedup_vs_naive_cli_at_{args.revisions}_revisions_ge_10":
                synth["spare_pool_speedup_p50_vs_naive_cli"] >= 10,  # type: ignore[operator]
            f"spare_pool_speedup_vs_naive_inprocess_at_{args.revisions}_revisions_ge_10":
                synth["spare_pool_speedup_p50_vs_naive_inprocess"] >= 10,  # type: ignore[operator]
        }
    finally:
        for cfg in started:
            common.stop(cfg)
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
