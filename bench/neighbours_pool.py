"""Many tenants through PgBouncer against a small server: the pooler's part of the
noisy-neighbour benchmark.

    python bench/neighbours_pool.py [--tenants 500] [--clients 4] [--seconds 15]

One embedded cluster with ``max_connections = 100`` and the PgBouncer `tenantctl
local up` starts beside it (transaction pooling, scram-sha-256). ``--tenants``
tenant databases and login roles are made directly (as provisioning leaves them:
CONNECT for the role only), and the pooler's files are written by tenantctl's own
code (orchestrator/domain/pooler.py, adapters/postgres/pgbouncer.py): one entry
per tenant with ``pool_size`` (and max_db_connections) ``--pool-size``, the
SCRAM verifiers the roles have on the server. Then, for ``--seconds``:

- every tenant's ``--clients`` client connections are open through the pooler
  (500 x 4 = 2,000 clients, 20 x what the server accepts), each running a small
  query, then thinking ``--think-ms`` (randomised +-50%);
- a sampler reads pg_stat_activity every 100 ms: the tenants' server connections
  (their peak must stay within the budget: max_connections minus
  reserved_connections and superuser_reserved_connections), and whether
  tenantctl's admin still gets in (its reserve);
- refused: client connections the pooler refused, queries that failed.

Added latency: the same small query on one connection, sequentially, direct vs
through the pooler (no other load; p50 ratio), and the loaded p50/p99 through the
pooler. Bounded: every wait has a timeout, the load stops after ``--seconds``,
everything is torn down. Prints JSON; `run(...)` returns the same dict
(bench/neighbours.py calls it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.adapters.postgres import pgbouncer  # noqa: E402
from orchestrator.adapters.postgres.libpq import with_dbname  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.devfleet import localfleet  # noqa: E402
from orchestrator.domain.pooler import (  # noqa: E402
    PoolEntry,
    desired_files,
    password_verifier,
)

QUERY = "SELECT count(*) FROM pg_class WHERE relkind = 'r'"  # small, a few ms at most
CONNECT_TIMEOUT = 10
# PgBouncer closes a server connection idle this long (its janitor runs every ~1/3 s):
# a tenant's pool holds one only while it has work
IDLE_S = 0.5


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(x: float) -> float:
    return round(x * 1000, 3)


def _setup(state: Path, max_connections: int) -> tuple[Any, Any]:
    base = next(p for p in range(62000 + random.randrange(0, 2000, 10), 64900, 10)
                if all(localfleet._port_free(q) for q in range(p, p + 4)))
    res = localfleet.init_local(state / "tenantctl.toml", state, base_port=base, pooler=True)
    text = res.config_path.read_text()
    res.config_path.write_text(text[:text.index("\n[regions.ap-south]")] + "\n")
    cfg = load_config(res.config_path)
    (server,) = cfg.servers
    owner = localfleet._os_user()
    list(localfleet.up(cfg))
    su = (state / "secrets" / f"{server.name}.superuser").read_text().strip()
    with psycopg.connect(host="127.0.0.1", port=server.port, user=localfleet.SUPERUSER,
                         password=su, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER SYSTEM SET max_connections = {}").format(
            sql.Literal(max_connections)))
    localfleet._stop(cfg, server, owner)
    localfleet._start(cfg, server, owner)
    # the load's pooler: idle server connections go back to the server within a second
    # (a tenant's pool holds one only while it has work), and 2,000 clients fit
    assert server.pooler is not None
    ini = server.pooler.dir / "pgbouncer.ini"
    pgbouncer.write_private(ini, localfleet.render_pgbouncer_ini(server.pooler)
                            + f"server_idle_timeout = {IDLE_S}\nmax_client_conn = 10000\n")
    pgbouncer.reload(server.pooler)
    return cfg, server


def _make_tenants(server: Any, count: int, pool_size: int) -> dict[str, str]:
    """``count`` tenant databases and roles; the pooler's files listing them. Returns
    each tenant's pooled and direct DSN base by database name -> password."""
    passwords: dict[str, str] = {}
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        for i in range(count):
            name = f"tenant_nb{i}"
            pw = secrets.token_urlsafe(32)
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 20 PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password_verifier(pw))))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
                sql.Identifier(name)))
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(
                sql.Identifier(name)))
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(name), sql.Identifier(name)))
            passwords[name] = pw
    pooler = server.pooler
    verifiers = {n: password_verifier(pw) for n, pw in passwords.items()}
    verifiers[pooler.admin_user] = password_verifier(pgbouncer.admin_password(pooler))
    entries = [PoolEntry(n, "127.0.0.1", server.port, n, pool_size) for n in passwords]
    pgbouncer.write_files(pooler, desired_files(entries, verifiers))
    pgbouncer.reload(pooler)
    return passwords


def _sequential(direct_dsn: str, pooled_dsn: str, n: int) -> tuple[list[float], list[float]]:
    """The same query on a direct and a pooled connection, alternately (whatever
    else the machine does weighs on both alike)."""
    out: tuple[list[float], list[float]] = ([], [])
    with psycopg.connect(direct_dsn, autocommit=True, prepare_threshold=None,
                         connect_timeout=CONNECT_TIMEOUT) as direct, \
            psycopg.connect(pooled_dsn, autocommit=True, prepare_threshold=None,
                            connect_timeout=CONNECT_TIMEOUT) as pooled:
        for conn in (direct, pooled):
            conn.execute(QUERY)
        for _ in range(n):
            for conn, times in zip((direct, pooled), out, strict=True):
                t = time.perf_counter()
                conn.execute(QUERY).fetchone()
                times.append(time.perf_counter() - t)
    return out


async def _load(dsns: list[str], clients: int, seconds: float, think_ms: float,
                admin_dsn: str, sample_ms: float, budget: int) -> dict[str, Any]:
    latencies: list[float] = []
    refused_connect: list[str] = []
    failed_queries: list[str] = []
    samples: list[int] = []
    admin_refused = 0
    stop = asyncio.Event()
    go = asyncio.Event()  # every client connected: the load starts
    gate = asyncio.Semaphore(16)  # connections being opened at once
    # A pool's first client waits for a server login (PgBouncer hands a new client
    # the server's parameters), and a pool whose first login the server refused
    # refuses its clients: pools are opened at most budget/2 per idle period, so the
    # logins plus the connections not yet closed stay within the budget.
    opening = asyncio.Semaphore(max(1, budget // 2))
    connected: list[int] = [0]

    async def open_pool(dsn: str) -> psycopg.AsyncConnection[Any]:
        async with opening:
            conn = await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, prepare_threshold=None,
                connect_timeout=CONNECT_TIMEOUT)
            await asyncio.sleep(IDLE_S + 0.4)  # its server connection goes back
            return conn

    async def client(dsn: str, first: bool, opened: asyncio.Event) -> None:
        try:
            if not first:
                await opened.wait()
            async with gate:
                conn = await asyncio.wait_for(
                    open_pool(dsn) if first else psycopg.AsyncConnection.connect(
                        dsn, autocommit=True, prepare_threshold=None,
                        connect_timeout=CONNECT_TIMEOUT), 120)
        except (psycopg.Error, TimeoutError) as exc:
            refused_connect.append(str(exc).splitlines()[0] if str(exc) else "timeout")
            return
        finally:
            if first:
                opened.set()
        connected[0] += 1
        try:
            await go.wait()
            await asyncio.sleep(random.uniform(0, think_ms / 1000))
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    cur = await asyncio.wait_for(conn.execute(QUERY), 30)
                    await cur.fetchone()
                    latencies.append(time.perf_counter() - t)
                except (psycopg.Error, TimeoutError) as exc:
                    failed_queries.append(str(exc).splitlines()[0] if str(exc) else "timeout")
                    return
                await asyncio.sleep(think_ms / 1000 * random.uniform(0.5, 1.5))
        finally:
            await conn.close()

    async def sampler() -> None:
        nonlocal admin_refused
        async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as conn:
            while not stop.is_set():
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                    "'client backend' AND usename LIKE 'tenant\\_nb%'")
                row = await cur.fetchone()
                samples.append(int(row[0]) if row else 0)
                await asyncio.sleep(sample_ms / 1000)
        # tenantctl's admin still gets a new connection in, at the end of the load
        try:
            probe = await asyncio.wait_for(psycopg.AsyncConnection.connect(
                admin_dsn, connect_timeout=5), 10)
            await probe.close()
        except (psycopg.Error, TimeoutError):
            admin_refused += 1

    tasks = []
    for d in dsns:
        opened = asyncio.Event()
        tasks += [asyncio.create_task(client(d, i == 0, opened)) for i in range(clients)]
    sample_task = asyncio.create_task(sampler())
    ramp = time.monotonic()
    deadline = ramp + 300  # bounded: the ramp never outlasts 5 minutes
    while connected[0] + len(refused_connect) < len(tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    ramp = time.monotonic() - ramp
    go.set()
    started = time.monotonic()
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
    await asyncio.wait_for(sample_task, 30)
    elapsed = time.monotonic() - started
    return {"latencies": latencies, "refused_connect": refused_connect,
            "failed_queries": failed_queries, "samples": samples,
            "admin_refused": admin_refused, "elapsed": elapsed, "ramp": ramp,
            "connected": connected[0]}


def run(tenants: int = 500, clients: int = 4, seconds: float = 15.0, think_ms: float = 5000.0,
        pool_size: int = 1, max_connections: int = 100, sequential: int = 300,
        data_dir: str = "/tmp") -> dict[str, Any]:
    """The benchmark; returns its JSON as a dict. Needs pgbouncer installed."""
    if localfleet.pgbouncer_binary() is None:
        return {"benchmark": "neighbours through PgBouncer", "skipped":
                "pgbouncer is not installed (Debian: apt-get install pgbouncer)"}
    state = Path(tempfile.mkdtemp(prefix="tenantctl-nbpool-", dir=data_dir))
    state.chmod(0o755)
    cfg = None
    try:
        cfg, server = _setup(state, max_connections)
        made = time.monotonic()
        passwords = _make_tenants(server, tenants, pool_size)
        made = time.monotonic() - made
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            settings: dict[str, int] = dict(conn.execute(
                "SELECT name, setting::int FROM pg_settings WHERE name IN ('max_connections', "
                "'reserved_connections', 'superuser_reserved_connections')").fetchall())
        budget = settings["max_connections"] - settings.get("reserved_connections", 0) \
            - settings["superuser_reserved_connections"]
        pooler = server.pooler

        def dsn(name: str, port: int) -> str:
            return f"postgresql://{name}:{passwords[name]}@127.0.0.1:{port}/{name}"

        first = next(iter(passwords))
        direct_seq, pooled_seq = _sequential(dsn(first, server.port), dsn(first, pooler.port),
                                             sequential)
        load = asyncio.run(_load([dsn(n, pooler.port) for n in passwords], clients, seconds,
                                 think_ms, with_dbname(server.admin_dsn, "postgres"), 100,
                                 budget))
        lat = load["latencies"]
        peak = max(load["samples"], default=0)
        refused = len(load["refused_connect"]) + len(load["failed_queries"])
        return {
            "benchmark": "neighbours through PgBouncer",
            "tenants": tenants, "clients_per_tenant": clients,
            "client_connections": tenants * clients,
            "max_connections": settings["max_connections"],
            "budget": budget, "pool_size": pool_size,
            "pool_size_sum": pool_size * tenants,
            "setup_tenants_s": round(made, 1),
            "connect_ramp_s": round(load["ramp"], 1), "clients_connected": load["connected"],
            "load_s": round(load["elapsed"], 1), "think_ms": think_ms,
            "queries": len(lat), "queries_per_s": round(len(lat) / load["elapsed"], 1),
            "server_connections_peak": peak,
            "server_connections_median": statistics.median(load["samples"])
            if load["samples"] else 0,
            "samples": len(load["samples"]),
            "within_budget": peak <= budget,
            "refused_neighbour_connections": refused,
            "refused_examples": sorted(set(load["refused_connect"] + load["failed_queries"]))[:3],
            "admin_refused_after_load": load["admin_refused"],
            "latency_ms": {
                "direct_sequential_p50": _ms(statistics.median(direct_seq)),
                "pooled_sequential_p50": _ms(statistics.median(pooled_seq)),
                "pooled_loaded_p50": _ms(_pct(lat, 0.5)),
                "pooled_loaded_p99": _ms(_pct(lat, 0.99)),
            },
            "added_latency_ratio": round(statistics.median(pooled_seq)
                                         / statistics.median(direct_seq), 2),
            "goal": "peak <= budget, 0 refused",
            "goal_met": peak <= budget and refused == 0,
            # PgBouncer has no global cap on server connections: only the server's
            # (max_connections minus the reserves) holds the peak, and a pool whose
            # server login that limit refused fails its waiting clients for
            # server_login_retry. Pools summing to more than the budget can refuse.
            "pools_within_budget": pool_size * tenants <= budget,
        }
    finally:
        if cfg is not None:
            with contextlib.suppress(Exception):
                list(localfleet.down(cfg))
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=500)
    ap.add_argument("--clients", type=int, default=4, help="Client connections per tenant.")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--think-ms", type=float, default=5000.0)
    ap.add_argument("--pool-size", type=int, default=1)
    ap.add_argument("--max-connections", type=int, default=100)
    ap.add_argument("--data-dir", default="/tmp")
    a = ap.parse_args()
    print(json.dumps(run(a.tenants, a.clients, a.seconds, a.think_ms, a.pool_size,
                         a.max_connections, data_dir=a.data_dir), indent=2))


if __name__ == "__main__":
    main()
