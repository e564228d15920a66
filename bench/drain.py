"""`server drain` of many small tenants: tenants moved per minute at two concurrencies.

    python bench/drain.py [--tenants 200] [--concurrency 1,4] [--data-dir /tmp]

Two embedded clusters in one region (``a-1``, ``a-2``). ``--tenants`` tenants are
provisioned on ``a-1`` (``a-2`` not accepting meanwhile), each with a few rows. Then
``a-1`` is drained to ``a-2`` at the first concurrency, ``a-1`` accepts again and
``a-2`` is drained back at the next, and so on: each drain moves every tenant, through
orchestrator.services.servers.drain with the real mover (`tenant move`'s service,
as the CLI wires it). Prints JSON: per concurrency, tenants, seconds, tenants per
minute, failures (their first errors).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench import common  # noqa: E402
from orchestrator.api import Fleet  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.services import servers  # noqa: E402
from orchestrator.services.move import move_tenant  # noqa: E402

ROWS = """
INSERT INTO categories (name) VALUES ('Hardware');
INSERT INTO products (sku, name, category_id, unit_price)
  SELECT 'SKU-' || g, 'item ' || g, (SELECT min(id) FROM categories), g
  FROM generate_series(1, 50) g;
"""


def _accepting(fleet: Fleet, server: str, accepting: bool) -> None:
    with fleet.records.transaction() as tx:
        tx.update_server(server, accepting=accepting)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--data-dir", default="/tmp")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    mover: servers.Mover = move_tenant  # as `server drain` moves them

    state = common.new_state(args.data_dir)
    p1, p2 = common.ports(state, 2)
    config = common.write_config(state, [("a-1", "bench", p1), ("a-2", "bench", p2)],
                                 local=True)
    cfg = common.start(config)
    fleet = Fleet(load_config(config))
    drains: list[dict[str, object]] = []
    out: dict[str, object] = {"tenants": args.tenants, "drains": drains}
    try:
        _accepting(fleet, "a-2", False)
        t0 = time.perf_counter()
        for i in range(args.tenants):
            res = fleet.provision(f"drain_{i:04d}", "bench")
            with psycopg.connect(res.dsn) as conn:
                conn.execute(ROWS)  # type: ignore[arg-type]
        out["provision_seconds"] = round(time.perf_counter() - t0, 1)
        source, target = "a-1", "a-2"
        for level in levels:
            _accepting(fleet, target, True)
            t0 = time.perf_counter()
            result = servers.drain(fleet, source, mover=mover, concurrency=level)
            seconds = time.perf_counter() - t0
            moved = sum(r.outcome == servers.MOVED for r in result.results)
            drains.append({
                "concurrency": level, "from": source, "to": target, "moved": moved,
                "seconds": round(seconds, 1),
                "tenants_per_minute": round(moved / seconds * 60, 1) if seconds else None,
                "failed": len(result.failed),
                "methods": dict(Counter(r.move["method"] for r in result.results
                                        if r.move)),
                "first_errors": [r.error for r in result.failed[:3]]})
            print(json.dumps(drains[-1]), file=sys.stderr, flush=True)  # as it comes
            source, target = target, source
    finally:
        fleet.close()
        common.stop(cfg)
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
