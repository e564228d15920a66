"""Shared pieces of the benchmark scripts: throwaway embedded clusters, configs,
statistics. Benchmarks print JSON; they are not tests."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.adapters.catalog.db import Catalog  # noqa: E402
from orchestrator.adapters.crypto.masterkey import write_key_file  # noqa: E402
from orchestrator.api import Fleet  # noqa: E402
from orchestrator.config import Config, load_config  # noqa: E402
from orchestrator.devfleet import localfleet  # noqa: E402
from orchestrator.domain.names import ADMIN_ROLE, TEMPLATE_DB  # noqa: E402

Server = tuple[str, str, int]  # name, region, port


def new_state(data_dir: str) -> Path:
    state = Path(tempfile.mkdtemp(prefix="tenantctl-bench-", dir=data_dir))
    os.chmod(state, 0o755)  # as root, the clusters' OS user must traverse it
    write_key_file(state / "master.key")
    return state


def ports(state: Path, count: int, start: int = 27400) -> list[int]:
    found = localfleet.free_ports(count, start=start)
    for port in found:
        localfleet.ensure_pgpass_entry(state / "pgpass", port, ADMIN_ROLE, os.urandom(24).hex())
    return found


def write_config(state: Path, servers: list[Server], *, migrations: str = "builtin",
                 use_template: bool = True, local: bool = False, name: str = "bench",
                 spare_databases: int = 0) -> Path:
    """A config whose catalog lives on the first server. ``local`` adds the data_dir
    and port that `tenantctl local up` needs."""
    pgpass = state / "pgpass"
    first_port = servers[0][2]
    lines = [f'state_dir = "{state}"', "[catalog]",
             f'dsn = "postgresql://{ADMIN_ROLE}@127.0.0.1:{first_port}/tenantctl_catalog'
             f'?passfile={pgpass}"',
             "[master_key]", f'file = "{state / "master.key"}"',
             "[tenants]", f'migrations = "{migrations}"',
             f"use_template = {'true' if use_template else 'false'}",
             f"spare_databases = {spare_databases}"]
    for region in dict.fromkeys(r for _, r, _ in servers):
        lines += [f"[regions.{region}]", f'backup_store = "file://{state / "backups" / region}"']
        for sname, sregion, port in servers:
            if sregion != region:
                continue
            lines += [f"[[regions.{region}.servers]]", f'name = "{sname}"',
                      f'admin_dsn = "postgresql://{ADMIN_ROLE}@127.0.0.1:{port}/postgres'
                      f'?passfile={pgpass}"', "capacity = 100000"]
            if local:
                lines += [f'data_dir = "{state / "pg" / sname}"', f"port = {port}"]
    path = state / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def two_region_fleet(data_dir: str) -> tuple[Path, Path, Config]:
    """A new state dir with the quickstart's shape (eu-central-1, ap-south-1) started
    locally: (state dir, config path, config)."""
    state = new_state(data_dir)
    p1, p2 = ports(state, 2)
    config = write_config(state, [("eu-central-1", "eu-central", p1),
                                  ("ap-south-1", "ap-south", p2)], local=True)
    return state, config, start(config)


def start(config: Path) -> Config:
    """Start the clusters of a local config and prepare its catalog."""
    cfg = load_config(config)
    list(localfleet.up(cfg))
    catalog = Catalog(cfg)
    catalog.upgrade()
    catalog.sync_topology()
    catalog.dispose()
    return cfg


def stop(cfg: Config) -> None:
    list(localfleet.down(cfg))


def warm_up(fleet: Fleet, server: str, clones: int = 48) -> None:
    """Bring a fresh cluster to steady state before timing: on a new VM the first
    touch of each shared-buffer page is slow (clone times fall from ~250 ms to
    ~35 ms as the 256 MB buffer pool is first written), which a long-running
    server never pays again. The clones are kept: dropping them forces a
    checkpoint (and TRIM on a `discard` mount) right when timing starts."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(fleet.cfg.server(server).admin_dsn, autocommit=True) as conn:
        for i in range(clones):
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(f"bench_warm_{i}"), sql.Identifier(TEMPLATE_DB)))


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * pct
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def stats(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(samples), 1),
            "p95_ms": round(percentile(samples, 0.95), 1),
            "mean_ms": round(statistics.fmean(samples), 1), "n": len(samples)}


def alembic_cli() -> str:
    return str(Path(sys.executable).parent / "alembic")


def cpu_s(children: bool = False) -> float:
    """User + system CPU seconds so far of this process, or (``children``) of its
    waited-for children (the measured CLI process with its pg_dumps)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
