"""The low-severity findings of issue 20, each through the real CLI (a subprocess:
exit codes, stderr and SIGKILL are the real thing) on real clusters: a full
store, a key-destroyed tenant, bad input that used to end in a traceback, a
sign-up killed before its connection string was shown, the report's backup age."""

from __future__ import annotations

import os
import resource
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy import func, select

from backups.service import run_backup
from orchestrator.adapters.catalog.db import Catalog, with_dbname
from orchestrator.adapters.catalog.models import Backup, Tenant
from orchestrator.api import Fleet
from orchestrator.config import load_config
from orchestrator.domain import promises
from orchestrator.services import doctor, lifecycle, report, retention, spares
from tests.conftest import REPO, TENANTCTL, OwnCatalog, PgFleet, connect_as, run_cli


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err[-2000:]
    for needle in needles:
        assert needle in err, err
    return err


def _store_root(fleet: Fleet, region: str) -> Path:
    return Path(fleet.cfg.region(region).backup_store.removeprefix("file://"))


def _fill(dsn: str, rows: int) -> None:
    """Rows of random text (192 hex characters each) through the tenant's own login."""
    name = " || ".join(["md5(random()::text)"] * 6)
    with connect_as(dsn) as conn:
        conn.execute(f"INSERT INTO customers (name, email) SELECT {name}, "  # noqa: S608
                     "g || '@example.com' FROM generate_series(1, %s) g", (rows,))


# -- a full store ----------------------------------------------------------------------


def _limited(limit: int) -> None:
    # A file may not grow past ``limit`` bytes: every write beyond fails (EFBIG; the
    # interpreter ignores SIGXFSZ), as a full disk's do (ENOSPC) — deterministically.
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_store_that_refuses_writes_is_a_store_failure_and_leaves_no_partial_file(
        fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    dsn = fleet.provision(slug, "eu-central").dsn
    _fill(dsn, 10_000)  # about 1 MB once compressed
    proc = subprocess.run(
        [*TENANTCTL, "--config", str(test_fleet.config_path), "backup", "run", slug],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=lambda: _limited(256 * 1024))
    _one_error_line(proc, 9, "cannot write", "File too large")
    folder = _store_root(fleet, "eu-central") / "tenants" / slug
    assert [p.name for p in folder.iterdir()] == [] if folder.exists() else True
    with fleet.catalog.session() as s:
        rows = list(s.scalars(select(Backup).where(Backup.slug == slug)))
    assert [(b.status, "File too large" in (b.error or "")) for b in rows] == [("failed", True)]
    # the same backup with room to write succeeds
    assert run_backup(fleet, slug).status == "completed"


def test_doctor_reports_and_removes_stale_unfinished_uploads(healthy: Fleet, slug: str) -> None:
    fleet = healthy  # the clean fleet: its doctor finds nothing else to repair
    tenant = fleet.provision(slug, "ap-south").tenant
    folder = _store_root(fleet, "ap-south") / "tenants" / slug
    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / f".0000000001-20260101T000000Z.dump.age.{uuid.uuid4().hex}.partial"
    fresh = folder / f".0000000002-20260101T000000Z.dump.age.{uuid.uuid4().hex}.partial"
    for p in (stale, fresh):
        p.write_bytes(b"half an upload")
    old = (datetime.now(UTC) - timedelta(hours=7)).timestamp()
    os.utime(stale, (old, old))
    try:
        found = [x for x in doctor.run(fleet, "ap-south") if x.code == "unfinished-upload"]
        subjects = {x.subject for x in found}
        assert f"ap-south:tenants/{slug}/{stale.name}" in subjects
        assert not any(fresh.name in s for s in subjects)  # it may be a live writer's
        results = doctor.repair(fleet, "ap-south", confirm=lambda x: False)
        assert [(r.finding.code, r.outcome) for r in results] == [
            ("unfinished-upload", "fixed")]
        assert not stale.exists() and fresh.exists()
        assert not [x for x in doctor.run(fleet, "ap-south") if x.code == "unfinished-upload"
                    and slug in x.subject]
    finally:
        fresh.unlink(missing_ok=True)
    assert tenant["slug"] == slug


# -- a tenant whose key an unfinished erasure destroyed --------------------------------


def test_key_destroyed_tenant_gives_one_line_errors_and_erase_finishes_it(
        fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    fleet.provision(slug, "eu-central")
    run_backup(fleet, slug)
    killed = run_cli(test_fleet, "tenant", "erase", slug, "--reason", "GDPR 17", "--yes",
                     env={"TENANTCTL_FAULT": "erase.key_destroyed"})
    assert killed.returncode == -9, killed.stderr[-800:]
    assert fleet.get_tenant(slug).state == "active"
    found = {(x.code, x.subject) for x in doctor.run(fleet, "eu-central")}
    assert ("erase-unfinished", slug) in found
    with fleet.catalog.session() as s:
        before = s.scalar(select(func.count()).select_from(Backup).where(Backup.slug == slug))
    for args in (("tenant", "credentials", slug), ("backup", "run", slug)):
        _one_error_line(run_cli(test_fleet, *args), 4, "was destroyed", "tenant erase")
    with fleet.catalog.session() as s:  # no backup encrypted to the destroyed key
        assert s.scalar(select(func.count()).select_from(Backup).where(
            Backup.slug == slug)) == before
    again = run_cli(test_fleet, "tenant", "erase", slug, "--reason", "GDPR 17", "--yes")
    assert again.returncode == 0, again.stderr[-800:]
    assert fleet.get_tenant(slug).state == "purged"
    assert not [x for x in doctor.run(fleet, "eu-central") if x.subject == slug]


# -- bad input: one error line, no change -----------------------------------------------


def test_a_grant_or_backup_id_beyond_bigint_is_bad_input(test_fleet: PgFleet) -> None:
    big = "99999999999999999999999"
    for args in (("access", "revoke", big), ("backup", "verify", big),
                 ("backup", "restore", big, "--as", "nobody")):
        _one_error_line(run_cli(test_fleet, *args), 2, "Invalid value")


def test_now_out_of_range_is_refused_before_anything_happens(
        test_fleet: PgFleet, own_catalog: OwnCatalog) -> None:
    fleet = own_catalog.fleet
    slug = f"n{uuid.uuid4().hex[:8]}"
    fleet.provision(slug, "eu-central")
    lifecycle.cancel(fleet, slug, backup=False)
    env = {"TENANTCTL_ALLOW_CLOCK_OVERRIDE": "1"}
    cfg = own_catalog.config_path
    for now, dry in (("0001-01-01", True), ("9999-12-01T00:00:00Z", False),
                     ("9999-12-01T00:00:00Z", True)):
        args = ["retention", "run", "--now", now] + (["--dry-run"] if dry else [])
        _one_error_line(run_cli(test_fleet, *args, config=cfg, env=env), 2, "out of range")
    _one_error_line(run_cli(test_fleet, "retention", "status", "--now", "0001-01-01",
                            config=cfg), 2, "out of range")
    t = fleet.get_tenant(slug)
    assert t.state == "cancelled"
    with fleet.server_connection(t.server) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (t.database,)).fetchone() == (1,)
    # within the range it plans as before
    assert t.hold_until is not None
    plan = retention.run(fleet, t.hold_until + timedelta(days=1), dry_run=True)
    assert [a.tenant for a in plan.plan if a.kind == "delete"] == [slug]


def test_config_not_utf8_and_periods_beyond_a_century_are_config_errors(
        test_fleet: PgFleet, tmp_path: Path, slug: str) -> None:
    text = test_fleet.config_path.read_text()
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(text.encode() + "# caf\u00e9\n".encode("latin-1"))
    _one_error_line(run_cli(test_fleet, "config", "check", config=latin1), 2, "not UTF-8")
    for key, value in (("hold_days", "99999999999"), ("purge_days", "36501")):
        big = tmp_path / f"{key}.toml"
        big.write_text(text + f"\n[lifecycle]\n{key} = {value}\n")
        _one_error_line(run_cli(test_fleet, "config", "check", config=big), 2,
                        f"lifecycle.{key}", "at most 36500")
        _one_error_line(run_cli(test_fleet, "tenant", "cancel", slug, "--yes", config=big), 2,
                        "at most 36500")
    ok = tmp_path / "ok.toml"
    ok.write_text(text + "\n[lifecycle]\nhold_days = 36500\n")
    assert load_config(ok).lifecycle.hold_days == 36500


def test_verify_when_the_store_root_is_a_file(test_fleet: PgFleet, tmp_path: Path) -> None:
    from tests.conftest import private_catalog

    path = tmp_path / "own.toml"
    with private_catalog(test_fleet, path) as own:
        store = tmp_path / "store"
        text = path.read_text()
        old = own.fleet.cfg.region("eu-central").backup_store
        path.write_text(text.replace(f'"{old}"', f'"file://{store}"'))
        fleet = Fleet(load_config(path))
        try:
            slug = f"v{uuid.uuid4().hex[:8]}"
            fleet.provision(slug, "eu-central")
            run_backup(fleet, slug)
            for p in sorted(store.rglob("*"), reverse=True):
                p.rmdir() if p.is_dir() else p.unlink()
            store.rmdir()
            store.write_text("not a directory")
            _one_error_line(run_cli(test_fleet, "backup", "verify", "--latest", slug,
                                    config=path), 9, "cannot read")
            _one_error_line(run_cli(test_fleet, "backup", "run", slug, config=path), 9,
                            "cannot write")
        finally:
            fleet.close()


# -- a sign-up killed before its output ------------------------------------------------


def test_create_killed_before_its_output_shows_the_connection_string_on_rerun(
        fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    args = ("tenant", "create", slug, "--region", "eu-central")
    killed = run_cli(test_fleet, *args, env={"TENANTCTL_FAULT": "provision.active"})
    assert killed.returncode == -9 and "postgresql://" not in killed.stdout
    assert fleet.get_tenant(slug).state == "active"
    again = run_cli(test_fleet, *args)
    assert again.returncode == 0, again.stderr[-800:]
    dsn = again.stdout.strip().splitlines()[-1]
    assert dsn.startswith("postgresql://") and "finished provisioning" in again.stdout
    with connect_as(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    _one_error_line(run_cli(test_fleet, *args), 4, "already exists")
    with fleet.catalog.session() as s:
        assert s.scalar(select(Tenant.step).where(Tenant.slug == slug)) is None


def test_create_killed_in_the_spare_refill_has_shown_its_connection_string(
        fleet: Fleet, test_fleet: PgFleet, tmp_path: Path, slug: str) -> None:
    pooled = tmp_path / "pooled.toml"
    text = test_fleet.config_path.read_text()
    assert "\nuse_template = true\n" in text
    pooled.write_text(text.replace("\nuse_template = true\n",
                                   "\nuse_template = true\nspare_databases = 1\n", 1))
    args = ("tenant", "create", slug, "--region", "ap-south")
    try:
        killed = run_cli(test_fleet, *args, config=pooled,
                         env={"TENANTCTL_FAULT": "spare.roles"})
        assert killed.returncode == -9, killed.stderr[-800:]  # the refill ran, and died
        dsn = killed.stdout.strip().splitlines()[-1]
        assert dsn.startswith("postgresql://"), killed.stdout
        with connect_as(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        _one_error_line(run_cli(test_fleet, *args, config=pooled), 4, "already exists")
    finally:
        own = Fleet(load_config(pooled))
        try:
            spares.fill(own, fleet.get_tenant(slug).server, want=0)
        finally:
            own.close()


# -- the report --------------------------------------------------------------------------


def test_report_says_there_is_no_backup_rather_than_an_age_of_zero() -> None:
    now = datetime.now(UTC)
    new = Tenant(id=1, slug="new", region="eu-central", state="active", activated_at=now)
    promise = promises.check_backups([report.tenant_row(new)], [], {}, now, 24)
    assert "no active tenant has a completed backup yet" in promise.evidence
    assert not any("0.0 h" in line for line in promise.evidence)
    old = Tenant(id=2, slug="old", region="eu-central", state="active",
                 activated_at=now - timedelta(hours=30))
    done = Backup(id=7, tenant_id=2, status="completed", key_id="k",
                  finished_at=now - timedelta(hours=5), object_key="o", manifest_key="m")
    promise = promises.check_backups([report.tenant_row(t) for t in (new, old)],
                                     [report.backup_row(done)], {"eu-central": {"o", "m"}},
                                     now, 24)
    assert "age of the oldest latest backup: 5.0 h" in promise.evidence
    assert "1 active tenant without a completed backup yet" in promise.evidence


def test_catalog_gone_during_backup_run_all_is_one_error(
        test_fleet: PgFleet, tmp_path: Path) -> None:
    name = f"tenantctl_catalog_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "gone.toml"
    path.write_text(test_fleet.config_path.read_text().replace(
        "dbname=tenantctl_catalog", f"dbname={name}"))
    cfg = load_config(path)
    catalog = Catalog(cfg)
    catalog.upgrade()
    catalog.sync_topology()
    catalog.dispose()
    fleet = Fleet(cfg)
    slugs = [fleet.provision(f"g{uuid.uuid4().hex[:8]}", "eu-central").tenant["slug"]
             for _ in range(3)]
    tenants = [fleet.get_tenant(x) for x in slugs]
    fleet.close()
    first = tenants[0]
    # the first backup waits on a lock held here; meanwhile the catalog goes away
    holder = psycopg.connect(with_dbname(cfg.server(first.server).admin_dsn, first.database))
    try:
        holder.execute("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
        proc = subprocess.Popen(
            [*TENANTCTL, "--config", str(path), "backup", "run", "--all", "--concurrency",
             "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        with psycopg.connect(test_fleet.admin_dsn("eu-central-1"), autocommit=True) as a:
            for _ in range(600):  # until the backup waits on the lock (bounded)
                if a.execute("SELECT 1 FROM pg_locks l JOIN pg_database d ON d.oid = "
                             "l.database WHERE d.datname = %s AND NOT l.granted",
                             (first.database,)).fetchone():
                    break
                a.execute("SELECT pg_sleep(0.1)")
            a.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        holder.rollback()
        out, err = proc.communicate(timeout=120)
    finally:
        holder.close()
        for t in tenants:
            with psycopg.connect(cfg.server(t.server).admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(t.database)))
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}, {}").format(
                    sql.Identifier(t.login_role), sql.Identifier(t.owner_role)))
    assert proc.returncode == 6, (proc.returncode, out[-1000:], err[-3000:])
    assert "Traceback" not in err and "Exception during reset" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: database unavailable"), err
