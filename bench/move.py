"""`tenant move` between two servers while the tenant's application writes.

    python bench/move.py [--size-gb 0.05] [--rate 200] [--methods logical,dump]
                         [--data-dir /tmp] [--keep]

On two fresh embedded clusters of one region, set up for logical replication as
their superuser would (wal_level = logical, the admin role's REPLICATION and
pg_create_subscription), for each method: one tenant filled to `--size-gb` of
pg_database_size (a table of ~1 KB rows with a primary key), then moved to the
other server while a bounded writer commits about `--rate` small transactions per
second through the tenant's own connection string (it reconnects on any error,
reading the connection string again, as an application would; it stops by itself
after 30 minutes). Reported per method: the move's wall time, the write pause
tenantctl measured (read-only step to login on the target), the longest gap
between two commits the writer saw, the commits acknowledged and those missing
afterwards (must be 0), the bytes copied and the checks (row counts and per-table
checksums compared by the move itself); then the ratio of the two pauses.
Prints one JSON object. (`server drain` is not benchmarked here: it is not in
this build.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench import common  # noqa: E402
from orchestrator.adapters.catalog.db import with_dbname  # noqa: E402
from orchestrator.api import Fleet  # noqa: E402
from orchestrator.devfleet import localfleet  # noqa: E402

REGION = "eu-central"
SERVERS = ("eu-central-1", "eu-central-2")
WRITER_LIMIT_S = 1800


def enable_logical(state: Path, cfg: Any) -> None:
    owner = localfleet._os_user()
    for name in SERVERS:
        server = cfg.server(name)
        su = (state / "secrets" / f"{name}.superuser").read_text().strip()
        with psycopg.connect(host="127.0.0.1", port=server.port, user=localfleet.SUPERUSER,
                             password=su, dbname="postgres", autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET wal_level = logical")
            conn.execute("ALTER SYSTEM SET max_wal_senders = 10")
            conn.execute("ALTER SYSTEM SET max_replication_slots = 10")
            conn.execute("ALTER ROLE tenantctl_admin REPLICATION")
            conn.execute("GRANT pg_create_subscription TO tenantctl_admin")
        localfleet._stop(cfg, server, owner)
        localfleet._start(cfg, server, owner)


def fill(fleet: Fleet, slug: str, size_bytes: int) -> int:
    t = fleet.get_tenant(slug)
    dsn = with_dbname(fleet.cfg.server(t.server).admin_dsn, t.database)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'SET ROLE "{t.owner_role}"')
        conn.execute("CREATE TABLE IF NOT EXISTS payload (id bigserial PRIMARY KEY, "
                     "body text NOT NULL, at timestamptz NOT NULL DEFAULT now())")
        conn.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON payload TO "{t.login_role}"')
        conn.execute(f'GRANT USAGE, SELECT, UPDATE ON SEQUENCE payload_id_seq TO '
                     f'"{t.login_role}"')
        while True:
            size = int(conn.execute("SELECT pg_database_size(current_database())"
                                    ).fetchone()[0])  # type: ignore[index]
            if size >= size_bytes:
                return size
            conn.execute("INSERT INTO payload (body) SELECT repeat(md5(g::text), 30) "
                         "FROM generate_series(1, 20000) g")


class Writer(threading.Thread):
    def __init__(self, fleet: Fleet, slug: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.fleet, self.slug, self.interval = fleet, slug, 1.0 / rate
        self.stop = threading.Event()
        self.acked: list[str] = []
        self.longest_gap = 0.0
        self.errors = 0

    def run(self) -> None:
        started = last = time.monotonic()
        conn: psycopg.Connection | None = None
        n = 0
        while not self.stop.is_set() and time.monotonic() - started < WRITER_LIMIT_S:
            try:
                if conn is None:
                    conn = psycopg.connect(self.fleet.credentials(self.slug), autocommit=True,
                                           connect_timeout=5)
                tag = f"w{n}"
                conn.execute("INSERT INTO payload (body) VALUES (%s)", (tag,))
                self.acked.append(tag)
                n += 1
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - last)
                last = now
            except psycopg.Error:
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(self.interval)
        if conn is not None:
            conn.close()


def one(fleet: Fleet, method: str, size_bytes: int, rate: float) -> dict[str, Any]:
    slug = f"big_{method}"
    fleet.provision(slug, REGION)
    size = fill(fleet, slug, size_bytes)
    source = fleet.get_tenant(slug).server
    target = next(s for s in SERVERS if s != source)
    writer = Writer(fleet, slug, rate)
    writer.start()
    time.sleep(2)
    t0 = time.monotonic()
    res = fleet.move(slug, server=target, method=method)
    wall = time.monotonic() - t0
    time.sleep(2)
    writer.stop.set()
    writer.join(30)
    with psycopg.connect(fleet.credentials(slug)) as conn:
        have = {r[0] for r in conn.execute("SELECT body FROM payload WHERE body LIKE 'w%%'")}
    lost = [a for a in writer.acked if a not in have]
    return {"method": res.method, "database_bytes": size, "bytes_copied": res.bytes_copied,
            "move_s": round(wall, 2), "write_pause_s": round(res.write_pause_s, 3),
            "longest_writer_gap_s": round(writer.longest_gap, 3),
            "commits_acknowledged": len(writer.acked), "commits_lost": len(lost),
            "writer_errors": writer.errors, "checks": res.checks,
            "from": source, "to": target}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=0.05)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--methods", default="logical,dump")
    ap.add_argument("--data-dir", default="/tmp")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    state = common.new_state(args.data_dir)
    p1, p2 = common.ports(state, 2)
    config = common.write_config(state, [(SERVERS[0], REGION, p1), (SERVERS[1], REGION, p2)],
                                 local=True)
    cfg = common.start(config)
    out: dict[str, Any] = {"size_gb": args.size_gb, "rate_per_s": args.rate, "runs": []}
    try:
        enable_logical(state, cfg)
        fleet = Fleet(cfg)
        try:
            for method in args.methods.split(","):
                out["runs"].append(one(fleet, method, int(args.size_gb * 2**30), args.rate))
        finally:
            fleet.close()
        pauses = {r["method"]: r["write_pause_s"] for r in out["runs"]}
        if pauses.get("logical") and "dump" in pauses:
            out["dump_to_logical_pause_ratio"] = round(pauses["dump"] / pauses["logical"], 1)
    finally:
        common.stop(cfg)
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
