"""Bad input, crashes at every provisioning step, and concurrent creates — through
the real CLI in a subprocess, so exit codes, stderr and SIGKILL are the real thing."""

from __future__ import annotations

import subprocess

import psycopg
import pytest
from sqlalchemy import func, select

from orchestrator.adapters.catalog.models import AuditEvent, Tenant
from orchestrator.api import Fleet
from orchestrator.services.provisioning import STEPS
from tests.conftest import TENANTCTL, PgFleet, connect_as, run_cli, server_objects

ALL_SERVERS = ("eu-central-1", "eu-central-2", "ap-south-1")


def _snapshot(fleet: Fleet, test_fleet: PgFleet) -> tuple[int, int, dict[str, tuple]]:
    with fleet.catalog.session() as s:
        tenants = s.scalar(select(func.count()).select_from(Tenant)) or 0
        audits = s.scalar(select(func.count()).select_from(AuditEvent)) or 0
    objects = {srv: server_objects(test_fleet, srv) for srv in ALL_SERVERS}
    return tenants, audits, objects


def _assert_clean_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode not in (0, None), proc
    err = proc.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("bad_slug", [
    "Acme", "acme'; DROP DATABASE postgres; --", 'ac"me', "ac;me", "ac me", "a" * 41,
    "postgres", "template0", "tenantctl_catalog",
])
def test_invalid_slug_changes_nothing(fleet: Fleet, test_fleet: PgFleet, bad_slug: str) -> None:
    before = _snapshot(fleet, test_fleet)
    proc = run_cli(test_fleet, "tenant", "create", bad_slug, "--region", "eu-central")
    _assert_clean_failure(proc, "invalid slug")
    assert _snapshot(fleet, test_fleet) == before


def test_unknown_region(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    before = _snapshot(fleet, test_fleet)
    proc = run_cli(test_fleet, "tenant", "create", slug, "--region", "mars")
    _assert_clean_failure(proc, "unknown region 'mars'")
    assert _snapshot(fleet, test_fleet) == before


def test_duplicate_slug(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    fleet.provision(slug, "eu-central")
    before = _snapshot(fleet, test_fleet)
    proc = run_cli(test_fleet, "tenant", "create", slug, "--region", "eu-central")
    _assert_clean_failure(proc, "already exists")
    proc = run_cli(test_fleet, "tenant", "create", slug, "--region", "ap-south")
    _assert_clean_failure(proc, "already exists")
    assert _snapshot(fleet, test_fleet) == before


def test_full_region(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    # region "tiny" has one server with capacity 1
    if not fleet.tenants(region="tiny"):
        fleet.provision(f"{slug}_first", "tiny")
    before = _snapshot(fleet, test_fleet)
    proc = run_cli(test_fleet, "tenant", "create", slug, "--region", "tiny")
    _assert_clean_failure(proc, "region 'tiny' is full")
    assert proc.returncode == 5
    assert _snapshot(fleet, test_fleet) == before


def test_unreachable_server(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    before = _snapshot(fleet, test_fleet)
    proc = run_cli(test_fleet, "tenant", "create", slug, "--region", "down")
    _assert_clean_failure(proc, "cannot reach server down-1")
    assert _snapshot(fleet, test_fleet) == before


def test_unreachable_catalog(test_fleet: PgFleet, tmp_path: pytest.TempPathFactory,
                             slug: str) -> None:
    text = test_fleet.config_path.read_text()
    port = str(test_fleet.ports.get("eu-central-1", 5432))
    broken = tmp_path / "broken.toml"  # type: ignore[operator]
    # point only the catalog at a port nobody listens on
    head, _, rest = text.partition("[master_key]")
    broken.write_text(head.replace(f"port={port}", "port=1").replace(f":{port}/", ":1/")
                      + "[master_key]" + rest)
    proc = run_cli(test_fleet, "tenant", "create", slug, "--region", "eu-central",
                   config=broken)
    _assert_clean_failure(proc, "catalog")


def test_missing_master_key(test_fleet: PgFleet, tmp_path: pytest.TempPathFactory,
                            fleet: Fleet, slug: str) -> None:
    text = test_fleet.config_path.read_text()
    broken = tmp_path / "nokey.toml"  # type: ignore[operator]
    broken.write_text(text.replace(str(test_fleet.state_dir / "master.key"), "/nonexistent.key"))
    before = _snapshot(fleet, test_fleet)
    proc = run_cli(test_fleet, "tenant", "create", slug, "--region", "eu-central",
                   config=broken)
    _assert_clean_failure(proc, "master key file /nonexistent.key does not exist")
    assert _snapshot(fleet, test_fleet) == before


def test_bad_config_names_file_and_key(test_fleet: PgFleet,
                                       tmp_path: pytest.TempPathFactory) -> None:
    broken = tmp_path / "bad.toml"  # type: ignore[operator]
    broken.write_text(test_fleet.config_path.read_text().replace("capacity = 100",
                                                                 'capacity = "lots"', 1))
    proc = run_cli(test_fleet, "config", "check", config=broken)
    _assert_clean_failure(proc, str(broken), "regions.eu-central.servers[0].capacity")


def _assert_converged(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    """Active, reachable with its stored credentials, and every tenant-looking
    database and role on every server is known to the catalog."""
    tenant = fleet.get_tenant(slug)
    assert tenant.state == "active" and tenant.step is None
    with connect_as(fleet.credentials(slug)) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (
            fleet.target_revision(tenant.region),)
        conn.execute("INSERT INTO suppliers (name) VALUES ('s')")
    known = {t.database for t in fleet.tenants()}
    known_roles = known | {t.owner_role for t in fleet.tenants()}
    for server in ALL_SERVERS:
        dbs, roles = server_objects(test_fleet, server)
        assert dbs <= known, f"orphan databases on {server}: {dbs - known}"
        assert roles <= known_roles, f"orphan roles on {server}: {roles - known_roles}"


@pytest.mark.parametrize("step", [f"provision.{s}" for s in STEPS])
def test_kill_at_each_step_then_rerun_converges(fleet: Fleet, test_fleet: PgFleet, slug: str,
                                                step: str) -> None:
    proc = run_cli(test_fleet, "tenant", "create", slug, "--region", "eu-central",
                   env={"TENANTCTL_FAULT": step})
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    tenant = fleet.get_tenant(slug)
    assert tenant.state == "provisioning"  # recorded before anything was created
    again = run_cli(test_fleet, "tenant", "create", slug, "--region", "eu-central")
    assert again.returncode == 0, again.stderr
    assert "finished provisioning" in again.stdout
    _assert_converged(fleet, test_fleet, slug)


def test_injected_error_is_one_line_and_resumable(fleet: Fleet, test_fleet: PgFleet,
                                                  slug: str) -> None:
    proc = run_cli(test_fleet, "tenant", "create", slug, "--region", "ap-south",
                   env={"TENANTCTL_FAULT": "provision.database", "TENANTCTL_FAULT_MODE": "raise"})
    _assert_clean_failure(proc, "injected fault at provision.database")
    wrong_region = run_cli(test_fleet, "tenant", "create", slug, "--region", "eu-central")
    _assert_clean_failure(wrong_region, "re-run with --region ap-south")
    again = run_cli(test_fleet, "tenant", "create", slug, "--region", "ap-south")
    assert again.returncode == 0, again.stderr
    _assert_converged(fleet, test_fleet, slug)


def test_foreign_role_with_tenant_name_is_not_adopted(fleet: Fleet, test_fleet: PgFleet,
                                                      slug: str) -> None:
    from psycopg import sql

    # a role of that name already exists on every eu server, not created by us
    for server in ("eu-central-1", "eu-central-2"):
        with psycopg.connect(test_fleet.admin_dsn(server), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(
                sql.Identifier(f"owner_{slug}")))
    try:
        proc = run_cli(test_fleet, "tenant", "create", slug, "--region", "eu-central")
        _assert_clean_failure(proc, "does not belong to this tenant")
    finally:
        for server in ("eu-central-1", "eu-central-2"):
            with psycopg.connect(test_fleet.admin_dsn(server), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(
                    sql.Identifier(f"owner_{slug}")))


def test_two_concurrent_creates_make_one_tenant(fleet: Fleet, test_fleet: PgFleet,
                                                slug: str) -> None:
    args = [*TENANTCTL, "--config", str(test_fleet.config_path), "tenant", "create", slug,
            "--region", "ap-south"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes[0] == 0 and codes[1] == 4, results
    loser = next(r for r in results if r[0] != 0)
    assert loser[2].startswith("error: ") and len(loser[2].strip().splitlines()) == 1
    assert "another tenantctl process" in loser[2] or "already exists" in loser[2]
    dbs, roles = server_objects(test_fleet, "ap-south-1")
    assert f"tenant_{slug}" in dbs
    assert {f"tenant_{slug}", f"owner_{slug}"} <= roles
    assert len([t for t in fleet.tenants() if t.slug == slug]) == 1
    _assert_converged(fleet, test_fleet, slug)
