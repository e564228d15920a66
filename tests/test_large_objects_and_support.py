"""Large objects (a tenant or a support role can make them: creating one needs no
privilege) and support roles that own things or change themselves: through the
tenant's and the support role's own credentials, on real clusters."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import select

from backups import service as pipeline
from orchestrator.adapters import clock
from orchestrator.adapters.catalog.models import AuditEvent
from orchestrator.adapters.crypto.masterkey import write_key_file
from orchestrator.api import Fleet
from orchestrator.domain.names import tenant_names
from orchestrator.services import access, doctor, lifecycle, provisioning, retention
from tests.conftest import OwnCatalog, PgFleet, connect_as, run_cli

REGION, SERVER = "ap-south", "ap-south-1"


def _make_lo(dsn: str, data: bytes, *, read_write: bool = False) -> int:
    with connect_as(dsn, autocommit=True) as conn:
        if read_write:  # a read-only support role's default, which it may change
            conn.execute("SET default_transaction_read_only = off")
        row = conn.execute("SELECT lo_from_bytea(0, %s)", (data,)).fetchone()
    assert row is not None
    return int(row[0])


def _refused(dsn: str, statement: str) -> bool:
    with connect_as(dsn, autocommit=True) as conn:
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


def _codes(fleet: Fleet, subject: str) -> dict[str, doctor.Finding]:
    return {x.code: x for x in doctor.run(fleet) if x.subject == subject}


def _support_dsn(fleet: Fleet, slug: str, *, ttl: timedelta = timedelta(hours=1),
                 read_only: bool = True) -> dict[str, object]:
    return access.grant(fleet, slug, to="sam@support", ttl=ttl, reason="ticket 7",
                        read_only=read_only)


def _role_exists(test_fleet: PgFleet, role: str) -> bool:
    with psycopg.connect(test_fleet.admin_dsn(SERVER)) as admin:
        return admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                             (role,)).fetchone() is not None


def test_tenant_large_objects_are_backed_up_and_restored(own_catalog: OwnCatalog,
                                                         slug: str) -> None:
    fleet = own_catalog.fleet
    fleet.provision(slug, REGION)
    dsn = fleet.credentials(slug)
    oid = _make_lo(dsn, b"invoice scan")
    done = pipeline.run_backup(fleet, slug)  # the admin reads what the login role owns
    assert done.status == "completed"
    tested = pipeline.restore_test(fleet, done.id)
    assert tested["large_objects"] == 1
    copy = provisioning.restore_as(fleet, done.id, f"{slug}_copy")
    with connect_as(copy.dsn, autocommit=True) as conn:  # the copy's own login role
        assert conn.execute("SELECT lo_get(%s)", (oid,)).fetchone() == (b"invoice scan",)
        conn.execute("SELECT lo_put(%s, 0, 'I')", (oid,))  # it is the application's again
        conn.execute("SELECT lo_unlink(%s)", (oid,))


def test_the_hold_makes_large_objects_read_only(own_catalog: OwnCatalog, slug: str) -> None:
    fleet = own_catalog.fleet
    fleet.provision(slug, REGION)
    dsn = fleet.credentials(slug)
    before = _make_lo(dsn, b"before")
    lifecycle.cancel(fleet, slug, backup=False)
    with connect_as(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT lo_get(%s)", (before,)).fetchone() == (b"before",)
    assert _refused(dsn, f"SELECT lo_put({before}, 0, 'X')")
    assert _refused(dsn, f"SELECT lo_unlink({before})")
    # making one cannot be forbidden; the next backup takes it over, doctor flags it
    during = _make_lo(dsn, b"during")
    assert "large-objects-writable" in _codes(fleet, slug)
    pipeline.run_backup(fleet, slug)
    assert _refused(dsn, f"SELECT lo_put({during}, 0, 'X')")
    assert "large-objects-writable" not in _codes(fleet, slug)
    lifecycle.reactivate(fleet, slug)
    with connect_as(dsn, autocommit=True) as conn:
        for oid in (before, during):
            conn.execute("SELECT lo_put(%s, 0, 'Y')", (oid,))
        conn.execute("SELECT lo_unlink(%s)", (during,))


def test_a_support_roles_large_object_does_not_stop_retention(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    fleet = own_catalog.fleet
    fleet.provision(slug, REGION)
    g = _support_dsn(fleet, slug)
    oid = _make_lo(str(g["dsn"]), b"support notes", read_write=True)
    # the admin has the support role's privileges: backups still dump everything
    assert "large-objects-unreadable" not in _codes(fleet, slug)
    assert pipeline.restore_test(fleet, pipeline.run_backup(fleet, slug).id
                                 )["large_objects"] == 1
    # a grant made before the admin joined support roles: flagged, and backups fail
    with psycopg.connect(test_fleet.admin_dsn(SERVER), autocommit=True) as admin:
        admin.execute(sql.SQL("REVOKE {} FROM CURRENT_USER").format(
            sql.Identifier(str(g["role"]))))
    found = _codes(fleet, slug)["large-objects-unreadable"]
    assert f"access revoke {g['id']}" in found.remedy
    with pytest.raises(pipeline.BackupError, match="permission denied"):
        pipeline.run_backup(fleet, slug)
    # another tenant is due as well: the run must do both
    fleet.provision(f"{slug}_b", REGION)
    hold_until = None
    for s in (slug, f"{slug}_b"):
        hold_until = lifecycle.cancel(fleet, s, backup=False).hold_until
    assert hold_until is not None
    report = retention.run(fleet, hold_until + timedelta(days=1), dry_run=False)
    assert report.failed == [], [r.message for r in report.failed]
    assert sorted((r.action.kind, r.outcome) for r in report.results) == [
        ("delete", "done"), ("delete", "done"), ("expire_grant", "done")]
    assert not _role_exists(test_fleet, str(g["role"]))
    final = fleet.get_tenant(slug).final_backup_id
    assert final is not None  # what the support role made is in it, the tenant's now
    assert pipeline.restore_test(fleet, final)["large_objects"] == 1
    assert oid > 0


def test_revoke_all_and_the_drill_go_past_a_grant_that_fails(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str, tmp_path: Path) -> None:
    own = own_catalog
    own.fleet.provision(slug, REGION)
    stuck, other = (_support_dsn(own.fleet, slug) for _ in range(2))
    with psycopg.connect(test_fleet.admin_dsn(SERVER), autocommit=True) as admin:
        admin.execute(sql.SQL("COMMENT ON ROLE {} IS 'somebody else'").format(
            sql.Identifier(str(stuck["role"]))))
    proc = run_cli(test_fleet, "access", "revoke", "--all", "--json", config=own.config_path)
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["revoked"] == [other["id"]] and [f["id"] for f in out["failed"]] == [stuck["id"]]
    assert "Traceback" not in proc.stderr and "left alone" in out["failed"][0]["error"]
    with pytest.raises(psycopg.OperationalError):
        connect_as(str(other["dsn"])).close()
    new_key = tmp_path / "new.key"
    write_key_file(new_key)
    drill = run_cli(test_fleet, "breach", "drill", "--new-key-file", str(new_key), "--json",
                    "--yes", config=own.config_path)
    assert drill.returncode == 1, drill.stderr
    steps = {s["step"]: s for s in json.loads(drill.stdout)["steps"]}
    assert steps["revoke support grants"]["failed"] == [stuck["id"]]
    assert steps["re-wrap under the new master key"]["done"] > 0  # the key moved anyway
    with psycopg.connect(test_fleet.admin_dsn(SERVER), autocommit=True) as admin:
        admin.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(
            sql.Identifier(str(stuck["role"])),
            sql.Literal(access._marker(int(str(stuck["id"])), slug))))
    assert access.revoke(own.fleet, int(str(stuck["id"]))) == [stuck["id"]]  # converges
    assert not _role_exists(test_fleet, str(stuck["role"]))


def test_sessions_end_at_expiry_and_a_tampered_role_ends_its_grant(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    fleet = own_catalog.fleet
    fleet.provision(slug, REGION)
    short = _support_dsn(fleet, slug, ttl=timedelta(minutes=5))
    session = connect_as(str(short["dsn"]), autocommit=True)
    tamperer = _support_dsn(fleet, slug)
    other = connect_as(str(tamperer["dsn"]), autocommit=True)
    try:
        other.execute("SET default_transaction_read_only = off")
        other.execute("ALTER ROLE CURRENT_USER SET default_transaction_read_only = off")
        assert "grant-tampered" in _codes(fleet, str(tamperer["role"]))
        # the sweep, run after the short grant's end: both end, sessions included
        later = clock.utcnow() + timedelta(minutes=6)
        report = retention.run(fleet, later, dry_run=False, jobs=("access",))
        assert report.failed == []
        details = sorted(r.action.detail for r in report.results)
        assert len(details) == 2 and any("tampered with: set "
                                         "default_transaction_read_only=off" in d
                                         for d in details)
        for conn in (session, other):
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
    finally:
        session.close()
        other.close()
    assert not _role_exists(test_fleet, str(tamperer["role"]))
    with fleet.catalog.session() as s:
        events = set(s.scalars(select(AuditEvent.action).where(AuditEvent.tenant == slug)))
    assert {"access.tampered", "access.expire"} <= events


def test_read_write_access_needs_an_active_tenant(test_fleet: PgFleet,
                                                  own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, REGION)
    lifecycle.cancel(own.fleet, slug, backup=False)
    lifecycle.legal_hold(own.fleet, slug, on=True, reason="case 42")
    base = ["access", "grant", slug, "--to", "sam", "--ttl", "1h", "--reason", "r"]
    proc = run_cli(test_fleet, *base, "--read-write", config=own.config_path)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "active" in proc.stderr
    assert access.grants(own.fleet, include_ended=True) == []
    ok = run_cli(test_fleet, *base, "--json", config=own.config_path)  # read-only stays
    assert ok.returncode == 0, ok.stderr
    g = json.loads(ok.stdout)
    assert g["read_only"]
    with connect_as(g["dsn"], autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (0,)


def test_cancel_ends_read_write_grants_and_keeps_read_only_ones(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    fleet = own_catalog.fleet
    fleet.provision(slug, REGION)
    writer = _support_dsn(fleet, slug, read_only=False)
    reader = _support_dsn(fleet, slug)
    with connect_as(str(writer["dsn"]), autocommit=True) as conn:  # it can write now
        conn.execute("INSERT INTO customers (name, email) VALUES ('a', 'a@x')")
    lifecycle.cancel(fleet, slug, backup=False)
    # the hold keeps the data as it was: the writer's role is gone, the reader reads
    assert not _role_exists(test_fleet, str(writer["role"]))
    with connect_as(str(reader["dsn"]), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (1,)
    ended = {g["id"]: g["status"] for g in access.grants(fleet, include_ended=True)}
    assert ended == {writer["id"]: "revoked", reader["id"]: "active"}
    with own_catalog.fleet.catalog.session() as s:
        held = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "access.hold")))
    assert [(e.tenant, e.detail["grant"]) for e in held] == [(slug, writer["id"])]


def test_csv_export_says_it_leaves_large_objects_out(test_fleet: PgFleet,
                                                     own_catalog: OwnCatalog, slug: str,
                                                     tmp_path: Path) -> None:
    own = own_catalog
    own.fleet.provision(slug, REGION)
    _make_lo(own.fleet.credentials(slug), b"blob")
    out = tmp_path / "x.zip"
    proc = run_cli(test_fleet, "tenant", "export", slug, "--format", "csv", "--output",
                   str(out), config=own.config_path)
    assert proc.returncode == 0, proc.stderr
    assert "not included: 1 large object" in proc.stdout
    with zipfile.ZipFile(io.BytesIO(out.read_bytes())) as zf:
        assert "1 large object(s) are not included" in zf.read("NOT_INCLUDED.txt").decode()
    as_json = run_cli(test_fleet, "tenant", "export", slug, "--format", "csv", "--output",
                      str(out), "--force", "--json", config=own.config_path)
    assert json.loads(as_json.stdout)["not_included"] == {"large_objects": 1}
    dumped = tmp_path / "x.sql"
    proc = run_cli(test_fleet, "tenant", "export", slug, "--format", "sql", "--output",
                   str(dumped), config=own.config_path)
    assert proc.returncode == 0, proc.stderr
    assert "lo_create" in dumped.read_text() and "not included" not in proc.stdout


def test_doctor_fix_lets_the_admin_read_an_existing_tenants_large_objects(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    fleet = own_catalog.fleet
    fleet.provision(slug, REGION)
    _make_lo(fleet.credentials(slug), b"old tenant")
    login = tenant_names(slug).login_role
    with psycopg.connect(test_fleet.admin_dsn(SERVER), autocommit=True) as admin:
        # as a tenant made before the admin joined login roles
        admin.execute(sql.SQL("REVOKE {} FROM CURRENT_USER").format(sql.Identifier(login)))
    with pytest.raises(pipeline.BackupError, match="permission denied"):
        pipeline.run_backup(fleet, slug)
    finding = _codes(fleet, slug)["admin-membership-missing"]
    assert finding.severity == "error" and finding.fix == "grant_membership"
    fixed = doctor._repair(fleet, [finding], lambda _x: False, None)
    assert [r.outcome for r in fixed] == ["fixed"]
    assert pipeline.run_backup(fleet, slug).status == "completed"
    assert "admin-membership-missing" not in _codes(fleet, slug)
