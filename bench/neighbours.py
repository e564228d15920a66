"""Noisy neighbours: one abusive tenant against 20 neighbours, with plans and without.

    python bench/neighbours.py [--seconds 15] [--neighbours 20] [--abusers 40]
                               [--skip-usage] [--skip-pooler] [--data-dir /var/tmp]

(a) A dedicated embedded cluster with max_connections = 50 (37 of them for ordinary
roles: 3 are the superusers', 10 the admin's reserved_connections). 21 tenants made
by tenantctl. Each neighbour runs a steady small-query load: every 250 ms it
connects, runs three small queries and disconnects (an application without a pool
of its own); a refused connection is retried every 10 ms, for at most 2 s, and the
operation's latency includes the retries. The abuser runs ``--abusers`` threads
opening connections in a loop (a refusal: again after 50 ms), each connection kept
busy with ``SELECT pg_sleep(30)`` (at most 200 at once).
Two phases of ``--seconds`` each, on the same tenants:

- ``with_plans``: the abuser on plan "abuser" (connection_limit 3,
  statement_timeout 1s), the neighbours on plan "neighbour" (connection_limit 1),
  the server's budget enforced (``connection_budget = "auto"``, the default
  ``connection_reserve = 10``: 50 - 13 - 10 = 27 >= 20 x 1 + 3; a tenant of plan
  "big", 10 more, is refused);
- ``without_plans``: every tenant moved (`set-plan`) to plan "unlimited"
  (connection_limit 10000, no statement_timeout) under a config that does not
  enforce a budget.

Reported per phase: the neighbours' latency (p50, p99 over successful operations;
p99 counting operations given up at the time they were given up, which
``p99_ratio_without_vs_with`` compares),
their refused connection attempts by cause (``neighbour_too_many_clients`` counts
both forms of exhaustion: "too many clients already" and "remaining connection
slots are reserved"; "too many connections for role" is the neighbour's own limit,
when its previous backend has not exited yet), operations given up, and what the
abuser got. A connection limit is checked only after the backend has started and
authenticated: a refused attempt holds a slot meanwhile, so the abuser's loop still
takes slots for a moment; the reserve is what absorbs that.
``p99_ratio_without_vs_with`` compares the phases (goal: no exhaustion refusals
with plans).

(b) ``usage collect`` over 1,000 tenants (bench/usage.py's run; ``--skip-usage``;
``--usage-databases 100`` puts them on 100 real databases: making 1,000 took this
busy machine's disk over 40 minutes).
(c) With PgBouncer and bench/neighbours_pool.py present: its ``run(...)`` under
"pooler" (``--skip-pooler``).

Everything is bounded: each phase stops after ``--seconds``, every wait has a
timeout, the cluster is stopped at the end. Prints JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench import usage as usage_bench  # noqa: E402
from orchestrator.api import Fleet  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.devfleet import localfleet  # noqa: E402
from orchestrator.services import plans as plan_service  # noqa: E402

MAX_CONNECTIONS = 50
PLANS = """
[plans.neighbour]
connection_limit = 1
statement_timeout = "5s"

[plans.abuser]
connection_limit = 3
statement_timeout = "1s"
idle_in_transaction_session_timeout = "2s"

[plans.big]
connection_limit = 10

[plans.unlimited]
connection_limit = 10000
statement_timeout = "0"
idle_in_transaction_session_timeout = "0"
temp_file_limit = "-1"
"""
SERVER = "nb-1"
NEIGHBOUR_PAUSE = 0.25  # between a neighbour's operations
ABUSER_CAP = 200  # connections the abuser holds at most (bounded load)
RETRY_PAUSE = 0.01
GIVE_UP = 2.0  # a neighbour operation that cannot connect for this long is given up


def refusal_kind(msg: str) -> str:
    """Why a neighbour's connection was refused: every slot taken ("too many clients
    already"), every slot an ordinary role may take ("remaining connection slots are
    reserved": the same exhaustion, seen by a role without the reserve), its own
    connection limit (its previous backend not gone yet), or something else."""
    if "too many clients" in msg:
        return "too_many_clients"
    if "remaining connection slots are reserved" in msg:
        return "slots_reserved"
    return "own_limit" if "too many connections for role" in msg else "other"


class Neighbour(threading.Thread):
    def __init__(self, dsn: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.dsn, self.stop = dsn, stop
        self.latencies: list[float] = []  # successful operations
        self.failed: list[float] = []  # given-up ones: the time until given up
        self.refusals = {"too_many_clients": 0, "slots_reserved": 0, "own_limit": 0,
                         "other": 0}
        self.gave_up = 0

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            while True:
                try:
                    with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2) as c:
                        c.execute("SELECT 1").fetchone()
                        c.execute("SELECT count(*) FROM pg_class WHERE relkind = 'r'"
                                  ).fetchone()
                        c.execute("SELECT now()").fetchone()
                    self.latencies.append((time.perf_counter() - started) * 1000)
                    break
                except psycopg.Error as exc:
                    self.refusals[refusal_kind(str(exc))] += 1
                    if time.perf_counter() - started > GIVE_UP or self.stop.is_set():
                        self.gave_up += 1
                        self.failed.append((time.perf_counter() - started) * 1000)
                        break
                    time.sleep(RETRY_PAUSE)
            self.stop.wait(NEIGHBOUR_PAUSE)


class Abuser(threading.Thread):
    """Opens connections in a loop, keeping each one busy with a long query on a
    thread of its own, up to ``ABUSER_CAP`` at once; a refused attempt is retried
    after 50 ms."""

    def __init__(self, dsn: str, stop: threading.Event, counts: dict[str, int],
                 lock: threading.Lock, live: list[psycopg.Connection],
                 sleepers: list[threading.Thread]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.stop, self.counts, self.lock = dsn, stop, counts, lock
        self.live, self.sleepers = live, sleepers

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                full = len(self.live) >= ABUSER_CAP
            if full:
                self.stop.wait(0.05)
                continue
            try:
                conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
            except psycopg.Error:
                self.count("refused")
                self.stop.wait(0.05)
                continue
            self.count("connected")
            sleeper = threading.Thread(target=self.sleep_on, args=(conn,), daemon=True)
            with self.lock:
                self.live.append(conn)
                self.sleepers.append(sleeper)
            sleeper.start()

    def sleep_on(self, conn: psycopg.Connection) -> None:
        try:
            conn.execute("SELECT pg_sleep(30)")
            self.count("long_query_finished")
        except psycopg.errors.QueryCanceled:
            self.count("long_query_cancelled")
        except psycopg.Error:
            self.count("long_query_ended")
        finally:
            with self.lock:
                if conn in self.live:
                    self.live.remove(conn)
            conn.close()


def phase(neighbour_dsns: list[str], abuser_dsn: str, seconds: float, abusers: int,
          admin_dsn: str) -> dict[str, Any]:
    stop = threading.Event()
    counts: dict[str, int] = {}
    lock = threading.Lock()
    live: list[psycopg.Connection] = []
    sleepers: list[threading.Thread] = []
    neighbours = [Neighbour(dsn, stop) for dsn in neighbour_dsns]
    for n in neighbours:
        n.start()
    peak = abuser_peak = 0
    # the admin's connection first: during the flood only its reserve would let it in
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        time.sleep(1.0)  # the neighbours' steady state before the abuser arrives
        flood = [Abuser(abuser_dsn, stop, counts, lock, live, sleepers)
                 for _ in range(abusers)]
        for a in flood:
            a.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                                "backend_type = 'client backend'").fetchone()
            peak = max(peak, int(row[0]) if row else 0)
            with lock:
                abuser_peak = max(abuser_peak, len(live))
            time.sleep(0.25)
        stop.set()
    # end the abuser's sleeping queries so that its threads return at once (a cancel
    # request takes no connection slot)
    with lock:
        for conn in list(live):
            with contextlib.suppress(psycopg.Error):
                conn.cancel()
    for t in [*neighbours, *flood, *sleepers]:
        t.join(timeout=10)
    lat = [x for n in neighbours for x in n.latencies]
    every = lat + [x for n in neighbours for x in n.failed]
    refusals = {k: sum(n.refusals[k] for n in neighbours) for k in neighbours[0].refusals}
    return {
        "neighbour_ops": len(lat),
        "neighbour_p50_ms": round(common.percentile(lat, 0.50), 1) if lat else None,
        "neighbour_p99_ms": round(common.percentile(lat, 0.99), 1) if lat else None,
        "neighbour_max_ms": round(max(lat), 1) if lat else None,
        # what the application saw: a given-up operation counts as slow as it was
        "neighbour_p99_incl_given_up_ms": round(common.percentile(every, 0.99), 1)
        if every else None,
        "neighbour_too_many_clients": refusals["too_many_clients"]
        + refusals["slots_reserved"],
        "neighbour_refusals": refusals,
        "neighbour_ops_given_up": sum(n.gave_up for n in neighbours),
        "abuser": dict(sorted(counts.items())),
        "abuser_connections_peak": abuser_peak,
        "client_backends_peak": peak,
    }


ABUSER = "abuser"


def neighbours_bench(data_dir: str, seconds: float, n_neighbours: int, abusers: int
                     ) -> dict[str, Any]:
    state = common.new_state(data_dir)
    (port,) = common.ports(state, 1, start=27900)
    plain = common.write_config(state, [(SERVER, "eu-central", port)], local=True,
                                name="unbudgeted")
    text = plain.read_text() + PLANS
    plain.write_text(text)
    line = f'name = "{SERVER}"\n'
    budgeted = state / "budgeted.toml"
    budgeted.write_text(text.replace(line, f'{line}connection_budget = "auto"\n', 1))
    cfg = load_config(budgeted)
    (server,) = cfg.servers
    assert server.data_dir is not None
    try:
        localfleet._initdb(cfg, server, localfleet._os_user())
        with (server.data_dir / "postgresql.conf").open("a") as f:
            f.write(f"\nmax_connections = {MAX_CONNECTIONS}\n")
        cfg = common.start(budgeted)
    except BaseException:
        usage_bench.stop_patiently(cfg, state)  # whatever started, and the state dir
        raise
    try:
        fleet = Fleet(cfg)
        try:
            made = time.monotonic()
            dsns = [fleet.provision(f"nb{i}", "eu-central", plan="neighbour").dsn
                    for i in range(n_neighbours)]
            abuser_dsn = fleet.provision(ABUSER, "eu-central", plan="abuser").dsn
            made_s = time.monotonic() - made
            from orchestrator.services import budget as budgets

            budget = budgets.read_budgets(cfg, {SERVER: [("neighbour", n_neighbours),
                                                         ("abuser", 1)]}, [SERVER])[SERVER]
            # a tenant more than the budget holds is refused (the budget is capacity)
            try:
                fleet.provision("one_too_many", "eu-central", plan="big")
                refused = None
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                refused = str(exc).splitlines()[0]
        finally:
            fleet.close()
        admin = cfg.server(SERVER).admin_dsn
        with_plans = phase(dsns, abuser_dsn, seconds, abusers, admin)
        fleet = Fleet(load_config(plain))  # no budget enforced: unlimited plans allowed
        try:
            for slug in [*(f"nb{i}" for i in range(n_neighbours)), ABUSER]:
                plan_service.set_plan(fleet, slug, "unlimited")
        finally:
            fleet.close()
        without = phase(dsns, abuser_dsn, seconds, abusers, admin)
    finally:
        usage_bench.stop_patiently(cfg, state)
    p99_with, p99_without = (with_plans["neighbour_p99_incl_given_up_ms"],
                             without["neighbour_p99_incl_given_up_ms"])
    ok_with, ok_without = with_plans["neighbour_p99_ms"], without["neighbour_p99_ms"]
    return {
        "max_connections": MAX_CONNECTIONS, "neighbours": n_neighbours,
        "abuser_threads": abusers, "seconds_per_phase": seconds,
        "tenants_made_s": round(made_s, 1),
        "budget_with_plans": budget.to_json(),
        "create_over_budget_refused": refused,
        "with_plans": with_plans, "without_plans": without,
        "p99_ratio_without_vs_with": round(p99_without / p99_with, 2)
        if p99_with and p99_without else None,
        "p99_ratio_without_vs_with_successful_only": round(ok_without / ok_with, 2)
        if ok_with and ok_without else None,
        "goal_no_too_many_clients_with_plans": with_plans["neighbour_too_many_clients"] == 0,
    }


def pooler(data_dir: str, seconds: float) -> dict[str, Any] | None:
    """bench/neighbours_pool.py's run(...) when it and pgbouncer are here."""
    if importlib.util.find_spec("bench.neighbours_pool") is None:
        return {"skipped": "bench/neighbours_pool.py is not here"}
    if not (shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").exists()):
        return {"skipped": "no pgbouncer binary"}
    mod = importlib.import_module("bench.neighbours_pool")
    wanted = inspect.signature(mod.run).parameters
    kwargs = {k: v for k, v in {"data_dir": data_dir, "seconds": seconds}.items()
              if k in wanted}
    try:
        return dict(mod.run(**kwargs))
    except Exception as exc:  # noqa: BLE001 - its failure is reported, ours goes on
        return {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--neighbours", type=int, default=20)
    ap.add_argument("--abusers", type=int, default=4,
                    help="the abuser's threads opening connections in a loop")
    ap.add_argument("--usage-tenants", type=int, default=1000)
    ap.add_argument("--usage-databases", type=int, default=1000,
                    help="real databases behind the usage tenants (fewer: shared)")
    ap.add_argument("--skip-usage", action="store_true")
    ap.add_argument("--skip-pooler", action="store_true")
    ap.add_argument("--data-dir", default="/var/tmp")
    args = ap.parse_args()
    out: dict[str, Any] = {"benchmark": "neighbours"}
    out["noisy_neighbour"] = neighbours_bench(args.data_dir, args.seconds, args.neighbours,
                                              args.abusers)
    print(json.dumps(out["noisy_neighbour"]), file=sys.stderr, flush=True)  # kept if later fail
    if not args.skip_usage:
        out["usage_collect"] = usage_bench.run(args.usage_tenants, args.usage_databases, 3,
                                               args.data_dir)
    if not args.skip_pooler:
        out["pooler"] = pooler(args.data_dir, args.seconds)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
