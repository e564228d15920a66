"""`tenantctl doctor` on a fleet of its own (the `clean_fleet` fixture): it finds
nothing on a healthy fleet, finds each kind of damage with its remedy, repairs
the safe ones, asks before the destructive ones, and a tampered catalog row
stops every command before a server is touched."""

from __future__ import annotations

import io
import json
import os
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg
import pyrage
from psycopg import sql
from sqlalchemy import update

from backups.service import run_backup
from orchestrator.adapters import clock
from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.catalog.models import Backup, Server, SupportGrant, Tenant
from orchestrator.api import Fleet
from orchestrator.services import access, lifecycle
from tests.conftest import REPO, TENANTCTL, CleanFleet


def cli(clean: CleanFleet, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TENANTCTL, "--config", str(clean.config_path), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def report(clean: CleanFleet, *args: str) -> tuple[int, dict]:
    proc = cli(clean, "doctor", "--json", *args)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def codes(data: dict) -> set[tuple[str, str]]:
    return {(x["code"], x["subject"]) for x in data["findings"] if x["severity"] != "info"}


def new_slug(prefix: str = "d") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def admin(fleet: Fleet, server: str = "eu-central-1") -> psycopg.Connection:
    return psycopg.connect(fleet.cfg.server(server).admin_dsn, autocommit=True)


def store_root(fleet: Fleet, region: str) -> Path:
    return Path(fleet.cfg.region(region).backup_store.removeprefix("file://"))


def test_healthy_fleet_reports_nothing(clean_fleet: CleanFleet, healthy: Fleet) -> None:
    for region in ("eu-central", "ap-south"):
        run_backup(healthy, healthy.provision(new_slug(), region).tenant["slug"])
    rc, data = report(clean_fleet)
    assert rc == 0 and data["ok"] and codes(data) == set(), data
    proc = cli(clean_fleet, "doctor")
    assert proc.returncode == 0 and "healthy" in proc.stdout


def test_finds_damage_repairs_safe_and_asks_before_destructive(
        clean_fleet: CleanFleet, healthy: Fleet) -> None:
    fleet = healthy
    a, b, c = (fleet.provision(new_slug(), "eu-central").tenant["slug"] for _ in range(3))
    ap = fleet.provision(new_slug(), "ap-south").tenant["slug"]
    backup_a = run_backup(fleet, a)
    run_backup(fleet, b)
    run_backup(fleet, ap)
    ghost, stray_role = f"tenant_{new_slug('ghost')}", f"owner_{new_slug('stray')}"
    ghost_conn = None
    with admin(fleet) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(ghost)))
        ghost_conn = psycopg.connect(with_dbname(fleet.cfg.server("eu-central-1").admin_dsn,
                                                 ghost), autocommit=True)
        ghost_conn.execute("CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('x')")
        ghost_conn.close()
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(stray_role)))
        ident = sql.Identifier
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            ident(f"tenant_{a}"), ident(f"tenant_{b}")))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(
            ident(f"tenant_{b}")))
        conn.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(ident(f"tenant_{b}")))
        conn.execute(sql.SQL("GRANT {} TO {}").format(ident(f"owner_{a}"),
                                                      ident(f"tenant_{c}")))
    with fleet.catalog.session() as s, s.begin():
        row = s.get(Backup, backup_a.id)
        assert row is not None
        manifest_key, object_key = row.manifest_key, row.object_key
        # c became active three days ago and never had a backup
        s.execute(update(Tenant).where(Tenant.slug == c).values(
            activated_at=clock.utcnow() - timedelta(days=3)))
        s.execute(update(Server).where(Server.name == "ap-south-1")
                  .values(template_revision="0001_catalog"))
    eu, aps = store_root(fleet, "eu-central"), store_root(fleet, "ap-south")
    (eu / manifest_key).unlink()
    (aps / object_key).parent.mkdir(parents=True, exist_ok=True)
    (aps / object_key).write_bytes((eu / object_key).read_bytes())  # a's data in ap-south
    stray_key = f"tenants/{new_slug('nobody')}/0000000001-x.dump.age"
    (eu / stray_key).parent.mkdir(parents=True)
    (eu / stray_key).write_bytes(b"age?")
    grant = access.grant(fleet, ap, to="someone@example.com", ttl=timedelta(hours=1),
                         reason="ticket 1")
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(SupportGrant).where(SupportGrant.id == grant["id"]).values(
            expires_at=clock.utcnow() - timedelta(hours=3)))

    rc, data = report(clean_fleet)
    expected = {
        ("orphan-database", f"eu-central-1/{ghost}"),
        ("public-connect", f"eu-central-1/{ghost}"),  # a plain CREATE DATABASE
        ("orphan-role", f"eu-central-1/{stray_role}"),
        ("role-reaches-other-database", f"eu-central-1/tenant_{b}"),
        ("public-connect", f"eu-central-1/tenant_{b}"),
        ("role-powers", f"eu-central-1/tenant_{b}"),
        ("role-membership", f"eu-central-1/tenant_{c}"),
        ("backup-missing-object", f"backup {backup_a.id}"),
        ("backup-outside-region", f"ap-south:{object_key}"),
        ("orphan-object", f"eu-central:{stray_key}"),
        ("backup-overdue", c),
        ("template-behind-head", "ap-south-1"),
        ("grant-expired", access.role_name(grant["id"])),
    }
    assert rc == 14 and not data["ok"]
    assert codes(data) == expected, codes(data) ^ expected
    assert all(x["remedy"] for x in data["findings"])

    # --fix with nobody to ask: the safe repairs happen, the destructive ones do not
    rc, data = report(clean_fleet, "--fix")
    outcomes = {(x["code"], x["subject"]): x["outcome"] for x in data["fixes"]}
    assert outcomes[("orphan-database", f"eu-central-1/{ghost}")] == "skipped"
    assert outcomes[("backup-outside-region", f"ap-south:{object_key}")] == "skipped"
    assert outcomes[("role-powers", f"eu-central-1/tenant_{b}")] == "fixed"
    assert rc == 14
    with admin(fleet) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (ghost,)).fetchone() is not None
    assert (aps / object_key).exists()
    left = codes(data)
    assert {code for code, _ in left} == {"orphan-database", "orphan-role",
                                          "backup-outside-region", "orphan-object"}, left

    rc, data = report(clean_fleet, "--fix", "--yes")
    assert rc == 0 and codes(data) == set(), data
    with admin(fleet) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (ghost,)).fetchone() is None
        assert not conn.execute(
            "SELECT has_database_privilege(%s, %s, 'CONNECT')",
            (f"tenant_{b}", f"tenant_{a}")).fetchone()[0]  # type: ignore[index]
    assert not (aps / object_key).exists() and not (eu / stray_key).exists()
    # the orphan was dumped before the drop, readable with the master key alone
    dumps = sorted((eu / "orphans" / "eu-central-1").glob(f"{ghost}-*.manifest.json"))
    assert len(dumps) == 1
    manifest = json.loads(dumps[0].read_text())
    base = f"orphans/eu-central-1/{dumps[0].name.removesuffix('.manifest.json')}"
    ident_text = fleet.master_key.unwrap(manifest["identity_wrapped"], f"orphan:{base}")
    identity = pyrage.x25519.Identity.from_str(ident_text.decode())
    plain = io.BytesIO()
    with open(eu / f"{base}.dump.age", "rb") as src:
        pyrage.decrypt_io(src, plain, [identity])  # type: ignore[arg-type]
    assert plain.getvalue().startswith(b"PGDMP")
    assert b"secrets" in plain.getvalue()
    assert not any(p.name.startswith(".") for p in (eu / "orphans").rglob("*"))


def test_overdue_deletion_and_purge_are_finished_after_asking(
        clean_fleet: CleanFleet, healthy: Fleet) -> None:
    slug = healthy.provision(new_slug(), "eu-central").tenant["slug"]
    lifecycle.cancel(healthy, slug)
    with healthy.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.slug == slug).values(
            hold_until=clock.utcnow() - timedelta(days=2)))
    rc, data = report(clean_fleet)
    assert rc == 14 and codes(data) == {("deletion-overdue", slug)}
    rc, data = report(clean_fleet, "--fix")  # not confirmed: nothing dropped
    assert rc == 14 and healthy.get_tenant(slug).state == "cancelled"
    rc, data = report(clean_fleet, "--fix", "--yes")
    assert rc == 0, data
    tenant = healthy.get_tenant(slug)
    assert tenant.state == "deleted" and tenant.final_backup_id is not None
    with healthy.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.slug == slug).values(
            purge_after=clock.utcnow() - timedelta(days=1)))
    rc, data = report(clean_fleet)
    assert rc == 14 and codes(data) == {("purge-overdue", slug)}
    rc, data = report(clean_fleet, "--fix", "--yes")
    assert rc == 0 and healthy.get_tenant(slug).state == "purged"
    assert not list((store_root(healthy, "eu-central") / "tenants" / slug).glob("*"))


def test_tampered_catalog_row_is_refused_before_anything_is_touched(
        clean_fleet: CleanFleet, healthy: Fleet) -> None:
    """Tenant x's row is pointed at y's database: no command may dump, drop,
    restore or migrate y's database on x's behalf, and doctor must not take
    x's real database for an orphan."""
    x = healthy.provision(new_slug("x"), "eu-central").tenant["slug"]
    y = healthy.provision(new_slug("y"), "eu-central").tenant["slug"]
    with psycopg.connect(with_dbname(healthy.cfg.server("eu-central-1").admin_dsn,
                                     f"tenant_{y}"), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (name, email) VALUES ('y-only', 'y@example.com')")
    lifecycle.cancel(healthy, x, backup=False)
    with healthy.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.slug == x).values(
            database=f"tenant_{y}", hold_until=clock.utcnow() - timedelta(days=1)))
    try:
        rc, data = report(clean_fleet)
        assert rc == 14
        assert ("catalog-row-inconsistent", x) in codes(data)
        assert not any(c == "orphan-database" for c, _ in codes(data))
        for args in (["tenant", "show", x], ["backup", "run", x],
                     ["tenant", "export", x, "--format", "sql", "--output", "/tmp/nope.sql"]):
            proc = cli(clean_fleet, *args)
            assert proc.returncode == 13, (args, proc.stderr)
            assert proc.stderr.startswith("error: catalog row of tenant") and \
                len(proc.stderr.strip().splitlines()) == 1
        # a migration is a one-tenant rollout: that tenant fails, untouched
        proc = cli(clean_fleet, "migrate", "tenant", x, "--to", "0001_catalog",
                   "--yes")
        assert proc.returncode != 0 and "catalog row inconsistent" in proc.stdout
        assert ("migration-failed", x) in codes(report(clean_fleet)[1])
        # the deletion is due, yet refused; nothing dropped, no backup taken
        proc = cli(clean_fleet, "retention", "run", "--only", "delete", "--json")
        assert proc.returncode == 11, proc.stderr
        # --fix --yes must not "finish" the deletion of a tampered row either
        report(clean_fleet, "--fix", "--yes")
        with admin(healthy) as conn:
            dbs = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        assert {f"tenant_{x}", f"tenant_{y}"} <= dbs
        assert healthy.find_tenant(x).state == "cancelled"  # type: ignore[union-attr]
        with healthy.catalog.session() as s:
            assert s.query(Backup).filter(Backup.slug == x).count() == 0
        with psycopg.connect(with_dbname(healthy.cfg.server("eu-central-1").admin_dsn,
                                         f"tenant_{y}")) as conn:
            assert conn.execute("SELECT count(*) FROM customers WHERE name = 'y-only'"
                                ).fetchone() == (1,)
    finally:
        with healthy.catalog.session() as s, s.begin():
            s.execute(update(Tenant).where(Tenant.slug == x).values(
                database=f"tenant_{x}", hold_until=clock.utcnow() + timedelta(days=30),
                migration_error=None))


def test_unreachable_server_full_server_and_region_scope(
        clean_fleet: CleanFleet, healthy: Fleet, tmp_path: Path) -> None:
    from orchestrator.adapters.catalog.db import Catalog
    from orchestrator.config import load_config
    from orchestrator.devfleet import localfleet

    port = localfleet.free_ports(1, start=31800)[0]
    broken = tmp_path / "broken.toml"
    broken.write_text(clean_fleet.config_path.read_text() + (
        f'\n[regions.gone]\nbackup_store = "file://{tmp_path / "gone"}"\n\n'
        f'[[regions.gone.servers]]\nname = "gone-1"\n'
        f'admin_dsn = "postgresql://tenantctl_admin@127.0.0.1:{port}/postgres"\n'
        "capacity = 5\n"))
    cat = Catalog(load_config(broken))
    cat.sync_topology()
    cat.dispose()
    slug = healthy.provision(new_slug(), "ap-south").tenant["slug"]
    run_backup(healthy, slug)
    with healthy.catalog.session() as s, s.begin():
        s.execute(update(Server).where(Server.name == "ap-south-1").values(capacity=1))
    try:
        other = CleanFleet(broken)
        rc, data = report(other)
        assert rc == 14
        found = codes(data)
        assert ("server-unreachable", "gone-1") in found
        assert ("server-over-capacity", "ap-south-1") in found
        rc, data = report(other, "--region", "eu-central")
        assert rc == 0 and codes(data) == set()
        proc = cli(other, "doctor", "--region", "mars")
        assert proc.returncode == 2 and "unknown region 'mars'" in proc.stderr
    finally:
        cat = Catalog(load_config(clean_fleet.config_path))
        cat.sync_topology()  # capacity from the config again; gone-1 unavailable
        cat.dispose()


def test_a_revision_mark_that_differs_is_found_unless_a_migration_holds_the_tenant(
        clean_fleet: CleanFleet, healthy: Fleet) -> None:
    """The mark `migrate status` reads must be the catalog's revision: one changed
    behind tenantctl's back is a warning whose remedy works. A tenant whose lock
    is held (a rollout between writing its mark and recording it) is not judged."""
    from orchestrator.adapters.postgres import revision_marks
    from orchestrator.domain.names import tenant_lock

    slug = healthy.provision(new_slug(), "eu-central").tenant["slug"]
    t = healthy.get_tenant(slug)
    with admin(healthy, t.server) as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(t.database), sql.Literal(revision_marks.mark("0001_elsewhere"))))
    rc, data = report(clean_fleet)
    finding = next(x for x in data["findings"] if x["code"] == "revision-mark-differs")
    assert (finding["subject"], finding["severity"]) == (slug, "warning")
    assert "0001_elsewhere" in finding["message"] and "--live" in finding["remedy"]
    with healthy.catalog.advisory_lock(tenant_lock(slug)) as held:
        assert held
        assert ("revision-mark-differs", slug) not in codes(report(clean_fleet)[1])
    live = cli(clean_fleet, "migrate", "status", "--live", "--json")
    assert live.returncode == 0, live.stderr
    assert [r["slug"] for r in json.loads(live.stdout)["remarked"]] == [slug]
    # `healthy` then asserts doctor finds nothing anywhere
