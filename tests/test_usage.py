"""Usage metering on real clusters, through the CLI: the numbers are Postgres's own,
a stats reset gives no negative delta, a down server fails its own tenants only,
old samples are purged, the CSV export, the scheduler's `usage` job and the
metrics endpoint's top-N gauges."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.adapters.catalog.models import Tenant, UsageSample
from orchestrator.devfleet import localfleet
from orchestrator.domain.names import ADMIN_ROLE
from orchestrator.domain.usage import EXPORT_COLUMNS
from tests.conftest import REPO, TENANTCTL, OwnCatalog, PgFleet, connect_as, run_cli

N = 250


def cli_json(test_fleet: PgFleet, own: OwnCatalog, *args: str, code: int = 0,
             env: dict[str, str] | None = None) -> Any:
    proc = run_cli(test_fleet, *args, "--json", config=own.config_path, env=env)
    assert proc.returncode == code, proc.stderr
    return json.loads(proc.stdout)


def _stat(test_fleet: PgFleet, server: str, db: str) -> tuple[int, int, int]:
    """(rows written, transactions, size) as Postgres reports them."""
    with psycopg.connect(test_fleet.admin_dsn(server), autocommit=True) as conn:
        row = conn.execute(
            "SELECT tup_inserted + tup_updated + tup_deleted, xact_commit + xact_rollback, "
            "pg_database_size(datid) FROM pg_stat_database WHERE datname = %s",
            (db,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def _settled_written(test_fleet: PgFleet, server: str, db: str,
                     at_least: int | None = None) -> int:
    """The database's rows-written counter once backends have flushed their stats
    (PostgreSQL reports them up to a second late): the same value twice in a row,
    at least ``at_least``; bounded."""
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        now = _stat(test_fleet, server, db)[0]
        if now == last and (at_least is None or now >= at_least):
            return now
        last = now
        time.sleep(1.2)
    raise AssertionError(f"{db}: stats did not settle (last {last}, wanted {at_least})")


def _flush_sessions(test_fleet: PgFleet, server: str, db: str) -> None:
    """End every session on the database (provisioning's may still be open, idle):
    a backend reports its pending counters when it exits, an idle one only up to
    ten seconds later, after any settling we could wait for. Bounded."""
    with psycopg.connect(test_fleet.admin_dsn(server), autocommit=True) as conn:
        deadline = time.monotonic() + 15
        while conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE datname = %s AND pid <> pg_backend_pid()",
                           (db,)).fetchone() != (0,):
            assert time.monotonic() < deadline, f"{db}: sessions did not end"
            time.sleep(0.2)


def _write(dsn: str, n: int) -> None:
    tag = uuid.uuid4().hex[:8]
    with connect_as(dsn, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO customers (email, name) VALUES (%s, %s)",
                            [(f"u{i}.{tag}@x.y", f"n{i}") for i in range(n)])
        conn.execute("SELECT count(*) FROM customers").fetchone()


def _sample(result: dict[str, Any], slug: str) -> dict[str, Any]:
    found = [t for t in result["tenants"] if t["slug"] == slug]
    assert len(found) == 1, result
    return found[0]


def test_usage_numbers_match_what_postgres_reports(test_fleet: PgFleet,
                                                   own_catalog: OwnCatalog,
                                                   slug: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, "eu-central")
    tenant = own.fleet.get_tenant(slug)
    server, db = tenant.server, tenant.database
    dsn = own.fleet.credentials(slug)
    _flush_sessions(test_fleet, server, db)
    # Postgres's own counters, read just before and just after each collection: the
    # sample must lie between them. Not an exact count: autovacuum's ANALYZE of the
    # rows written below adds a few pg_statistic rows whenever it comes by.
    before1 = _settled_written(test_fleet, server, db)
    size_before = _stat(test_fleet, server, db)[2]
    first = cli_json(test_fleet, own, "usage", "collect")
    after1, _, size_after = _stat(test_fleet, server, db)
    s1 = _sample(first, slug)
    assert s1["status"] == "ok" and first["failed"] == 0
    assert size_before <= s1["storage_bytes"] <= size_after  # pg_database_size's
    assert before1 <= s1["rows_written"] <= after1  # the first: since the counters started

    _write(dsn, N)
    before2 = _settled_written(test_fleet, server, db, before1 + N)
    with connect_as(dsn) as held:  # one connection open while the second sample runs
        held.execute("SELECT 1")
        size_before = _stat(test_fleet, server, db)[2]
        second = cli_json(test_fleet, own, "usage", "collect")
        after2, _, size_after = _stat(test_fleet, server, db)
    s2 = _sample(second, slug)
    assert N <= before2 - after1 <= s2["rows_written"] <= after2 - before1
    assert s2["transactions"] >= 1 and s2["rows_read"] >= N
    assert s2["connections"] == 1
    assert size_before <= s2["storage_bytes"] <= size_after
    third = cli_json(test_fleet, own, "usage", "collect")
    after3 = _stat(test_fleet, server, db)[0]
    s3 = _sample(third, slug)
    assert s3["connections"] == 0 and 0 <= s3["rows_written"] <= after3 - before2
    written = s1["rows_written"] + s2["rows_written"] + s3["rows_written"]

    shown = cli_json(test_fleet, own, "usage", slug, "--since", "1d")
    (tot,) = shown["tenants"]
    assert tot["slug"] == slug and tot["rows_written"] == written
    assert tot["storage_bytes"] == s3["storage_bytes"]
    if first["period_start"] == third["period_start"]:  # not across an hour's end
        assert tot["connections_peak"] == 1 and tot["periods"] == 1
    tops = {(r["metric"], r["rank"]): r["slug"] for r in shown["top"]}
    assert tops[("storage_bytes", 1)] == slug and tops[("rows_written", 1)] == slug
    table = run_cli(test_fleet, "usage", "--since", "1d", config=own.config_path)
    assert table.returncode == 0 and slug in table.stdout and "top tenants" in table.stdout

    # the metrics endpoint: the top tenant of the server by size, no per-tenant series
    from orchestrator.daemon.metrics import MetricsSnapshot, read_fleet_gauges, render_metrics

    text = render_metrics(MetricsSnapshot(True, True, read_fleet_gauges(
        own.fleet, datetime.now(UTC))))
    values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
              for ln in text.splitlines() if ln.startswith("tenantctl_usage_")}
    assert values[f'tenantctl_usage_top_storage_bytes{{rank="1",server="{server}",'
                  f'tenant="{slug}"}}'] == s3["storage_bytes"], text
    assert values[f'tenantctl_usage_server_rows_written{{server="{server}"}}'] == written
    assert "tenantctl_usage_tenant_" not in text


def _superuser(test_fleet: PgFleet, server: str, db: str) -> psycopg.Connection:
    if test_fleet.external:
        pytest.skip("pg_stat_reset() needs the embedded clusters' superuser")
    password = (test_fleet.state_dir / "secrets" / f"{server}.superuser").read_text().strip()
    return psycopg.connect(host="127.0.0.1", port=test_fleet.ports[server], user="postgres",
                           password=password, dbname=db, autocommit=True)


def test_a_stats_reset_gives_the_new_counts_never_a_negative_delta(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, "eu-central")
    tenant = own.fleet.get_tenant(slug)
    server, db = tenant.server, tenant.database
    dsn = own.fleet.credentials(slug)
    _write(dsn, N)
    _settled_written(test_fleet, server, db)
    cli_json(test_fleet, own, "usage", "collect")
    with _superuser(test_fleet, server, db) as su:
        su.execute("SELECT pg_stat_reset()")
    _write(dsn, 7)
    # the counter started again (from 0: our 7, and maybe autovacuum's ANALYZE rows)
    restarted = _settled_written(test_fleet, server, db, 7)
    assert restarted < N
    after = _sample(cli_json(test_fleet, own, "usage", "collect"), slug)
    # the new count itself, not new - old (which would be negative)
    assert restarted <= after["rows_written"] <= _stat(test_fleet, server, db)[0]
    assert min(after["transactions"], after["rows_read"]) >= 0
    with own.fleet.catalog.session() as s:
        row = s.query(UsageSample).filter_by(slug=slug).order_by(
            UsageSample.period_start.desc()).first()
        assert row is not None and row.stats_reset is not None
        assert min(row.transactions, row.rows_written, row.rows_read) >= 0


def test_a_down_server_fails_its_own_tenants_only(test_fleet: PgFleet,
                                                  own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, "eu-central")
    own.fleet.provision(f"{slug}_ap", "ap-south")
    own.fleet.provision(f"{slug}_gone", "eu-central")  # its database dropped behind our back
    gone = own.fleet.get_tenant(f"{slug}_gone")
    with psycopg.connect(test_fleet.admin_dsn(gone.server), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{gone.database}" WITH (FORCE)')
    closed = localfleet.free_ports(1, start=31700)[0]
    down = {"TENANTCTL_SERVER_AP_SOUTH_1_ADMIN_DSN":
            f"postgresql://{ADMIN_ROLE}@127.0.0.1:{closed}/postgres"}
    result = cli_json(test_fleet, own, "usage", "collect", code=1, env=down)
    assert _sample(result, slug)["status"] == "ok"
    failed = _sample(result, f"{slug}_ap")
    assert failed["status"] == "failed" and "ap-south-1" in failed["error"]
    missing = _sample(result, f"{slug}_gone")
    assert missing["status"] == "failed" and "not found" in missing["error"]
    assert {s["server"]: s["status"] for s in result["servers"]} == {
        own.fleet.get_tenant(slug).server: "ok", gone.server: "ok", "ap-south-1": "failed"}
    plain = run_cli(test_fleet, "usage", "collect", config=own.config_path, env=down)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert "failed: cannot reach server ap-south-1: " in plain.stderr
    assert "collected 1 tenant" in plain.stdout
    assert f"failed: {slug}_gone: database {gone.database} not found" in plain.stderr
    with own.fleet.catalog.session() as s:
        stored = {r.slug for r in s.query(UsageSample)}
    assert stored == {slug}  # the failed tenant has no made-up sample


def test_retention_purges_old_samples_and_export_is_csv(test_fleet: PgFleet,
                                                         own_catalog: OwnCatalog,
                                                         slug: str, tmp_path: Path) -> None:
    own = own_catalog
    own.fleet.provision(slug, "eu-central")
    first = cli_json(test_fleet, own, "usage", "collect")
    period = datetime.fromisoformat(first["period_start"])
    with own.fleet.catalog.session() as s, s.begin():
        latest = s.query(UsageSample).filter_by(slug=slug).one()
        tid = s.query(Tenant.id).filter_by(slug=slug).scalar()
        cols = {c.name: getattr(latest, c.name) for c in UsageSample.__table__.columns}
        for days in (401, 450, 900, 10):  # three beyond keep_days (400), one within
            s.add(UsageSample(**{**cols, "tenant_id": tid,
                                 "period_start": period - timedelta(days=days)}))
    result = cli_json(test_fleet, own, "usage", "collect")
    assert result["purged"] == 3
    with own.fleet.catalog.session() as s:
        left = sorted(r.period_start for r in s.query(UsageSample).filter_by(slug=slug))
    assert left == [period - timedelta(days=10), period]

    out = tmp_path / "usage.csv"
    proc = run_cli(test_fleet, "usage", "export", "--since", "30d", "--output", str(out),
                   config=own.config_path)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(out.open()))
    assert rows[0] == list(EXPORT_COLUMNS) and len(rows) == 3
    record = dict(zip(rows[0], rows[-1], strict=True))
    assert record["tenant"] == slug and record["period_start"] == period.isoformat()
    assert int(record["storage_bytes"]) > 0 and int(record["samples"]) == 2
    stdout = run_cli(test_fleet, "usage", "export", "--since", "2d", "--tenant", slug,
                     "--output", "-", config=own.config_path)
    assert stdout.returncode == 0
    assert list(csv.reader(io.StringIO(stdout.stdout))) == [rows[0], rows[-1]]
    assert not list(tmp_path.glob(".*partial"))

    # bad input: one line, exit 2 (3 for an unknown tenant), no file made
    for args, code, text in [
            (("export", "--since", "30d", "--output", str(tmp_path / "no" / "x.csv")), 2,
             "is not a directory"),
            (("export", "--since", "whenever", "--output", "-"), 2, "--since"),
            (("export", "--since", "1d", "--until", "2d", "--output", "-"), 2, "--until"),
            (("export", "--tenant", "nosuch", "--output", str(tmp_path / "n.csv")), 3,
             "no tenant"),
            (("nosuch",), 3, "no tenant"), (("--since", "-3x"), 2, "--since"),
            (("show", "--top", "0"), 2, "--top")]:
        bad = run_cli(test_fleet, "usage", *args, config=own.config_path)
        assert bad.returncode == code, (args, bad.stderr)
        assert text in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "n.csv").exists()


def test_the_scheduler_runs_the_usage_job(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                          slug: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, "eu-central")
    proc = subprocess.Popen(
        [*TENANTCTL, "--config", str(own.config_path), "scheduler", "run", "--jobs", "usage",
         "--standby-poll", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO, env=os.environ.copy())
    lines: list[dict[str, Any]] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(json.loads(line))
            if lines[-1].get("event") == "job":
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    jobs = [ln for ln in lines if ln.get("event") == "job"]
    assert jobs and jobs[0]["job"] == "usage" and jobs[0]["outcome"] == "ok", lines
    assert jobs[0]["counts"]["collected"] == 1 and rc == 0
    with own.fleet.catalog.session() as s:
        assert s.query(UsageSample).filter_by(slug=slug).count() == 1
