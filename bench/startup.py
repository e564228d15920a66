"""Start-up of the CLI: `--help` and the read commands, whole process, wall and CPU.

    python bench/startup.py [--baseline CHECKOUT] [--runs 7] [--tenants 2] [--data-dir /tmp]

Starts a throwaway two-region local fleet (as `tenantctl quickstart` does) with
``--tenants`` tenants, then runs each command below as its own process from this
checkout (A) and from the baseline (B), alternately (A B A B ...), ``--runs``
times each after one warm-up, and prints JSON: per command the medians of wall
and CPU (user + system of the child) for A and B, and the median of the
pairwise A/B ratios (pairing keeps the ratio honest on a machine whose load
drifts).

The baseline is ``--baseline``: another checkout with its own ``.venv`` (e.g.
the main branch before a change), run against the same fleet. Without it, B is
the import floor of any command that reads the catalog: an interpreter
importing typer and psycopg, and nothing else (the read commands import no
SQLAlchemy: orchestrator/adapters/catalog/reads.py). Targets (issue 20): read
commands ≤ 300 ms wall, `--help` ≤ 200 ms.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLOOR = "import typer, psycopg"
TARGETS_S = {"--help": 0.2}
READ_TARGET_S = 0.3


def commands(slug: str) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "tenant list --json": ["tenant", "list", "--json"],
        "tenant show --json": ["tenant", "show", slug, "--json"],
        "region list --json": ["region", "list", "--json"],
        "backup list --json": ["backup", "list", "--json"],
        "migrate status --json": ["migrate", "status", "--json"],
    }


def run_once(argv: list[str], cwd: Path) -> tuple[float, float, int]:
    """(wall s, child CPU s, exit code) of one whole process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def paired(a: tuple[list[str], Path], b: tuple[list[str], Path], runs: int
           ) -> dict[str, Any]:
    for argv, cwd in (a, b):  # warm-up: the page cache, the servers' caches
        run_once(argv, cwd)
    rows: list[tuple[tuple[float, float, int], tuple[float, float, int]]] = []
    for _ in range(runs):
        rows.append((run_once(*a), run_once(*b)))

    def med(i: int, k: int) -> float:
        return round(statistics.median(r[i][k] for r in rows), 3)

    return {
        "a_wall_s": med(0, 0), "b_wall_s": med(1, 0),
        "a_cpu_s": med(0, 1), "b_cpu_s": med(1, 1),
        "ratio_wall": round(statistics.median(r[0][0] / r[1][0] for r in rows), 3),
        "ratio_cpu": round(statistics.median(r[0][1] / max(r[1][1], 1e-6) for r in rows), 3),
        "a_exit": sorted({r[0][2] for r in rows}), "b_exit": sorted({r[1][2] for r in rows}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--baseline", type=Path, help="another checkout, with its own .venv")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tenants", type=int, default=2)
    ap.add_argument("--data-dir", default="/tmp")
    args = ap.parse_args()

    from orchestrator.api import Fleet

    state, config, cfg = common.two_region_fleet(args.data_dir)
    out: dict[str, Any] = {
        "tenants": args.tenants, "runs": args.runs, "cores": os.cpu_count(),
        "bytecode_cache": not sys.flags.dont_write_bytecode,
        "a": str(REPO), "b": str(args.baseline) if args.baseline else f"python -c '{FLOOR}'",
    }
    try:
        fleet = Fleet(cfg)
        regions = ["eu-central", "ap-south"]
        slugs = [f"s{i:04d}" for i in range(args.tenants)]
        for i, slug in enumerate(slugs):
            fleet.provision(slug, regions[i % 2])
        fleet.close()
        results: dict[str, Any] = {}
        for name, cmd in commands(slugs[0] if slugs else "nosuchtenant").items():
            a = ([sys.executable, "-m", "cli", "--config", str(config), *cmd], REPO)
            if args.baseline:
                python = args.baseline / ".venv" / "bin" / "python"
                b = ([str(python), "-m", "cli", "--config", str(config), *cmd], args.baseline)
            else:
                b = ([sys.executable, "-c", FLOOR], REPO)
            target = TARGETS_S.get(name, READ_TARGET_S)
            res = paired(a, b, args.runs)
            results[name] = {**res, "target_s": target, "met": res["a_wall_s"] <= target}
        out["commands"] = results
    finally:
        common.stop(cfg)
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
