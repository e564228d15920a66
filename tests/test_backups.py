"""Encrypted backups against real Postgres, with the file store and with S3 over
HTTP to moto's server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from psycopg import sql
from sqlalchemy import select

from backups import service as pipeline
from backups.stores import open_store
from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.catalog.models import AuditEvent, Backup
from orchestrator.api import Fleet
from orchestrator.config import load_config
from tests.conftest import OwnCatalog, PgFleet, connect_as, mark_and_version, run_cli
from tests.test_stores import moto_endpoint  # noqa: F401 - fixture

SECRET_ROW = "customer-7f3a-do-not-leak@example.com"


def _tenant_with_data(fleet: Fleet, slug: str, region: str) -> None:
    fleet.provision(slug, region)
    with connect_as(fleet.credentials(slug), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) VALUES (%s, 'Secret Person')",
                     (SECRET_ROW,))
        conn.execute("INSERT INTO warehouses (code, name) SELECT 'W' || g, 'warehouse ' || g "
                     "FROM generate_series(1, 500) g")


def _object_path(fleet: Fleet, row: Backup) -> Path:
    root = Path(fleet.cfg.region(row.region).backup_store.removeprefix("file://"))
    return root / row.object_key


def test_backup_run_list_verify(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    _tenant_with_data(fleet, slug, "ap-south")
    proc = run_cli(test_fleet, "backup", "run", slug, "--json")
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)
    assert result["status"] == "completed" and result["size"] > 0
    listed = json.loads(run_cli(test_fleet, "backup", "list", slug, "--json").stdout)
    assert listed[0]["id"] == result["id"]
    for key in ("id", "tenant", "status", "size", "created_at"):
        assert key in listed[0]
    row = pipeline.get_backup(fleet, result["id"])
    blob = _object_path(fleet, row).read_bytes()
    assert blob.startswith(b"age-encryption.org/v1")
    assert SECRET_ROW.encode() not in blob and b"Secret Person" not in blob
    assert _object_path(fleet, row).stat().st_mode & 0o777 == 0o600
    verified = run_cli(test_fleet, "backup", "verify", str(result["id"]), "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["toc_entries"] > 10


def test_backups_stay_in_the_tenant_region(fleet: Fleet, slug: str) -> None:
    _tenant_with_data(fleet, slug, "eu-central")
    result = pipeline.run_backup(fleet, slug)
    row = pipeline.get_backup(fleet, result.id)
    assert row.region == "eu-central"
    assert row.store_url == fleet.cfg.region("eu-central").backup_store
    for region in fleet.cfg.regions:
        store = open_store(fleet.cfg.region(region).backup_store)
        found = [o.key for o in store.objects(f"tenants/{slug}/")]
        assert bool(found) == (region == "eu-central"), (region, found)


def test_flipped_byte_fails_verify_cleanly(fleet: Fleet, test_fleet: PgFleet,
                                           slug: str) -> None:
    _tenant_with_data(fleet, slug, "ap-south")
    row = pipeline.get_backup(fleet, pipeline.run_backup(fleet, slug).id)
    path = _object_path(fleet, row)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    proc = run_cli(test_fleet, "backup", "verify", str(row.id))
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "tampered or corrupted" in proc.stderr or "checksum mismatch" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_backup_without_manifest_is_not_restorable(fleet: Fleet, slug: str) -> None:
    _tenant_with_data(fleet, slug, "ap-south")
    row = pipeline.get_backup(fleet, pipeline.run_backup(fleet, slug).id)
    store = open_store(row.store_url)
    store.delete(row.manifest_key)
    with pytest.raises(pipeline.BackupError, match="has no manifest"):
        pipeline.verify_backup(fleet, row.id)


def test_failed_dump_leaves_no_object(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    _tenant_with_data(fleet, slug, "ap-south")
    proc = run_cli(test_fleet, "backup", "run", slug,
                   env={"TENANTCTL_FAULT": "backup.dumped", "TENANTCTL_FAULT_MODE": "raise"})
    assert proc.returncode != 0 and "injected fault" in proc.stderr
    with fleet.catalog.session() as s:
        rows = s.scalars(select(Backup).where(Backup.slug == slug)).all()
    assert [r.status for r in rows] == ["failed"]
    store = open_store(fleet.cfg.region("ap-south").backup_store)
    assert list(store.objects(f"tenants/{slug}/")) == []
    with pytest.raises(pipeline.BackupError, match="is failed, not restorable"):
        pipeline.verify_backup(fleet, rows[0].id)


def test_backup_to_s3(test_fleet: PgFleet, tmp_path: Path, slug: str,
                      moto_endpoint: str) -> None:  # noqa: F811
    bucket = "eu-backups"
    url = f"s3://{bucket}/tenantctl?endpoint_url={moto_endpoint}&region=eu-central-1"
    text = test_fleet.config_path.read_text()
    eu_store = f'file://{test_fleet.state_dir / "backups" / "eu-central"}'
    cfg_path = tmp_path / "s3.toml"
    cfg_path.write_text(text.replace(eu_store, url, 1))
    fleet = Fleet(load_config(cfg_path))
    try:
        store = open_store(url)
        store.client.create_bucket(  # type: ignore[attr-defined]
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
        _tenant_with_data(fleet, slug, "eu-central")
        result = pipeline.run_backup(fleet, slug)
        keys = [o.key for o in store.objects(f"tenants/{slug}/")]
        assert len(keys) == 2 and any(k.endswith(".manifest.json") for k in keys)
        assert pipeline.verify_backup(fleet, result.id)["ok"]
        assert store.pending_uploads() == []  # type: ignore[attr-defined]
    finally:
        fleet.close()


def test_kill_mid_s3_upload_leaves_no_orphan_upload(test_fleet: PgFleet, tmp_path: Path,
                                                   slug: str,
                                                   moto_endpoint: str) -> None:  # noqa: F811
    bucket = "eu-backups-kill"
    url = f"s3://{bucket}/tenantctl?endpoint_url={moto_endpoint}&region=eu-central-1"
    eu_store = f'file://{test_fleet.state_dir / "backups" / "eu-central"}'
    cfg_path = tmp_path / "s3.toml"
    cfg_path.write_text(test_fleet.config_path.read_text().replace(eu_store, url, 1)
                        + '\n[backups]\ns3_part_size = "5MiB"\n')
    store = open_store(url)
    store.client.create_bucket(  # type: ignore[attr-defined]
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
    fleet = Fleet(load_config(cfg_path))
    try:
        _tenant_with_data(fleet, slug, "eu-central")
        with connect_as(fleet.credentials(slug), autocommit=True) as conn:
            # ~25 MB of poorly compressible text: the dump spans several 5 MiB parts
            conn.execute("INSERT INTO customers (email, name) SELECT md5(g::text) || '@x.test',"
                         " md5(random()::text) || md5(random()::text) || md5(random()::text)"
                         " FROM generate_series(1, 200000) g")
        killed = run_cli(test_fleet, "backup", "run", slug, config=cfg_path,
                         env={"TENANTCTL_FAULT": "s3.part"})
        assert killed.returncode == -9
        assert len(store.pending_uploads()) == 1  # type: ignore[attr-defined]
        with fleet.catalog.session() as s:
            (row,) = s.scalars(select(Backup).where(Backup.slug == slug)).all()
        assert row.status == "running"
        again = run_cli(test_fleet, "backup", "run", slug, "--json", config=cfg_path)
        assert again.returncode == 0, again.stderr
        assert pipeline.get_backup(fleet, row.id).status == "failed"
        assert store.pending_uploads() == []  # type: ignore[attr-defined]
        keys = [o.key for o in store.objects(f"tenants/{slug}/")]
        assert len(keys) == 2 and not any(k.startswith(f"tenants/{slug}/{row.id:010d}")
                                          for k in keys)
    finally:
        fleet.close()


def test_large_backup_verifies_and_restores(fleet: Fleet, test_fleet: PgFleet,
                                            slug: str) -> None:
    """Bigger than a pipe buffer: `pg_restore --list` stops reading after the table of
    contents, which once made every verify (and so every restore) of a real-sized
    backup fail with "the restore process stopped reading"."""
    _tenant_with_data(fleet, slug, "ap-south")
    with connect_as(fleet.credentials(slug), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) SELECT md5(g::text) || '@x.test',"
                     " md5(random()::text) || md5(random()::text)"
                     " FROM generate_series(1, 60000) g")
    result = pipeline.run_backup(fleet, slug)
    assert result.size is not None and result.size > 1 << 20
    assert pipeline.verify_backup(fleet, result.id)["ok"]
    restored = run_cli(test_fleet, "backup", "restore", str(result.id), "--as", f"{slug}_r",
                       "--json")
    assert restored.returncode == 0, restored.stderr
    assert _rows(fleet, f"{slug}_r") == _rows(fleet, slug)
    # a flipped byte past the table of contents is still caught by verify
    row = pipeline.get_backup(fleet, result.id)
    path = _object_path(fleet, row)
    blob = bytearray(path.read_bytes())
    blob[len(blob) - 1000] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(pipeline.BackupError, match="tampered|checksum"):
        pipeline.verify_backup(fleet, result.id)


def _rows(fleet: Fleet, slug: str) -> dict[str, list[tuple]]:  # type: ignore[type-arg]
    """Every table's rows, in a stable order, read as the admin role."""
    from psycopg import sql

    from orchestrator.adapters.catalog.db import with_dbname

    t = fleet.get_tenant(slug)
    out = {}
    import psycopg

    with psycopg.connect(with_dbname(fleet.cfg.server(t.server).admin_dsn, t.database)) as c:
        tables = [r[0] for r in c.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        for table in tables:
            cols = c.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(
                sql.Identifier(table))).description or []
            order = sql.SQL(", ").join(sql.Literal(i + 1) for i in range(len(cols)))
            out[table] = c.execute(sql.SQL("SELECT * FROM {} ORDER BY {}").format(
                sql.Identifier(table), order)).fetchall()
    return out


def test_restore_as_new_tenant_round_trip(fleet: Fleet, test_fleet: PgFleet,
                                          slug: str) -> None:
    _tenant_with_data(fleet, slug, "ap-south")
    backup_id = pipeline.run_backup(fleet, slug).id
    copy = f"{slug}_copy"
    proc = run_cli(test_fleet, "backup", "restore", str(backup_id), "--as", copy, "--json")
    assert proc.returncode == 0, proc.stderr
    restored = json.loads(proc.stdout)
    assert restored["region"] == "ap-south" and restored["state"] == "active"
    original, copied = _rows(fleet, slug), _rows(fleet, copy)
    assert set(original) == set(copied) and len(original) >= 10
    assert original == copied  # row for row, every table
    with connect_as(restored["dsn"], autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM customers WHERE email = %s",
                            (SECRET_ROW,)).fetchone() == (1,)
        conn.execute("INSERT INTO warehouses (code, name) VALUES ('NEW', 'new')")
        import psycopg

        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE warehouses")
    assert mark_and_version(fleet, copy) == (restored["revision"],) * 2


def test_restore_of_tampered_backup_creates_nothing(fleet: Fleet, test_fleet: PgFleet,
                                                    slug: str) -> None:
    from tests.conftest import server_objects

    _tenant_with_data(fleet, slug, "ap-south")
    row = pipeline.get_backup(fleet, pipeline.run_backup(fleet, slug).id)
    path = _object_path(fleet, row)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x80
    path.write_bytes(bytes(data))
    copy = f"{slug}_bad"
    proc = run_cli(test_fleet, "backup", "restore", str(row.id), "--as", copy)
    assert proc.returncode != 0 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert fleet.find_tenant(copy) is None
    dbs, roles = server_objects(test_fleet, "ap-south-1")
    assert f"tenant_{copy}" not in dbs and f"owner_{copy}" not in roles


@pytest.mark.skipif(__import__("shutil").which("age") is None,
                    reason="the stock `age` tool is not installed (.ci/run installs it)")
def test_stock_age_tool_and_pg_restore_read_a_backup(fleet: Fleet, test_fleet: PgFleet,
                                                     slug: str, tmp_path: Path) -> None:
    """The break-glass runbook: export the identity, download the object (still
    encrypted), then age -d | pg_restore."""
    import subprocess

    from orchestrator.adapters.postgres.pgtools import pg_tool

    _tenant_with_data(fleet, slug, "ap-south")
    row = pipeline.get_backup(fleet, pipeline.run_backup(fleet, slug).id)
    exported = run_cli(test_fleet, "backup", "key", "export", slug)
    assert exported.returncode == 0, exported.stderr
    identity = exported.stdout.strip()
    assert identity.startswith("AGE-SECRET-KEY-1")
    key_file = tmp_path / "key.txt"
    key_file.write_text(identity + "\n")
    key_file.chmod(0o600)
    downloaded = tmp_path / "backup.dump.age"
    got = run_cli(test_fleet, "backup", "download", str(row.id), "--output", str(downloaded))
    assert got.returncode == 0, got.stderr
    assert downloaded.read_bytes() == _object_path(fleet, row).read_bytes()
    age = subprocess.run(["age", "-d", "-i", str(key_file), str(downloaded)],
                         capture_output=True, check=True)
    listing = subprocess.run([pg_tool(fleet.cfg, "pg_restore"), "--list"], input=age.stdout,
                             capture_output=True, check=True)
    assert b"TABLE DATA public customers" in listing.stdout
    with fleet.catalog.session() as s:
        from orchestrator.adapters.catalog.models import AuditEvent

        assert s.scalars(select(AuditEvent).where(AuditEvent.tenant == slug,
                                                  AuditEvent.action == "backup.key.export")
                         ).first() is not None


@pytest.mark.parametrize("target", ["file", "kms"])
def test_master_key_rotation_keeps_backups_readable(test_fleet: PgFleet, tmp_path: Path,
                                                     slug: str, target: str,
                                                     request: pytest.FixtureRequest) -> None:
    from orchestrator.adapters.crypto.masterkey import write_key_file

    # A private catalog and master key: rotation re-wraps every tenant of a catalog.
    old_key = tmp_path / "old.key"
    old_key.write_bytes((test_fleet.state_dir / "master.key").read_bytes())
    old_key.chmod(0o600)
    text = test_fleet.config_path.read_text().replace(
        str(test_fleet.state_dir / "master.key"), str(old_key)).replace(
        "dbname=tenantctl_catalog", "dbname=tenantctl_catalog_rotation")
    old_cfg = tmp_path / "old.toml"
    old_cfg.write_text(text)
    assert run_cli(test_fleet, "catalog", "upgrade", config=old_cfg).returncode == 0
    fleet = Fleet(load_config(old_cfg))
    try:
        _tenant_with_data(fleet, slug, "ap-south")
        backup_id = pipeline.run_backup(fleet, slug).id
        dsn = fleet.credentials(slug)
    finally:
        fleet.close()
    new_key = tmp_path / "new.key"
    new_cfg = tmp_path / "new.toml"
    if target == "file":
        write_key_file(new_key)
        kms_args: list[str] = []
        new_cfg.write_text(text.replace(str(old_key), str(new_key)))
    else:  # from a key file to a KMS envelope key, the usual move to production
        import boto3

        endpoint = request.getfixturevalue("moto_endpoint")
        kms = boto3.client("kms", region_name="eu-central-1", endpoint_url=endpoint)
        key_id = kms.create_key(Description="tenantctl master")["KeyMetadata"]["KeyId"]
        kms_args = ["--new-kms-key-id", key_id, "--new-kms-region", "eu-central-1",
                    "--new-kms-endpoint-url", endpoint]
        made = run_cli(test_fleet, "keys", "generate", str(new_key), "--kms-key-id", key_id,
                       "--kms-region", "eu-central-1", "--kms-endpoint-url", endpoint)
        assert made.returncode == 0, made.stderr
        new_cfg.write_text(text.replace(
            f'file = "{old_key}"',
            f'kms_key_id = "{key_id}"\nkms_data_key_file = "{new_key}"\n'
            f'kms_region = "eu-central-1"\nkms_endpoint_url = "{endpoint}"'))
    proc = run_cli(test_fleet, "keys", "rotate-master", "--new-key-file", str(new_key),
                   *kms_args, "--json", "--yes", config=old_cfg)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["identities"] >= 1
    fleet = Fleet(load_config(new_cfg))
    try:
        assert pipeline.verify_backup(fleet, backup_id)["ok"]
        assert fleet.credentials(slug) == dsn
    finally:
        fleet.close()
    # the old key no longer opens anything: a clear one-line error
    stale = run_cli(test_fleet, "backup", "verify", str(backup_id), config=old_cfg)
    assert stale.returncode == 7 and "wrapped by master key" in stale.stderr
    _drop_tenant_objects(test_fleet, slug, "ap-south-1")


def _drop_tenant_objects(test_fleet: PgFleet, slug: str, server: str) -> None:
    """Remove a tenant made under a throwaway catalog, so no orphan is left behind."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(test_fleet.admin_dsn(server), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(f"tenant_{slug}")))
        for role in (f"tenant_{slug}", f"owner_{slug}"):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    with psycopg.connect(test_fleet.admin_dsn("eu-central-1"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS tenantctl_catalog_rotation WITH (FORCE)")


def test_restore_test_compares_row_counts(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    _tenant_with_data(fleet, slug, "ap-south")
    backup_id = pipeline.run_backup(fleet, slug).id
    proc = run_cli(test_fleet, "backup", "verify", str(backup_id), "--restore-test", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["rows"] >= 501 and report["tables"] >= 10
    manifest = json.loads(open_store(pipeline.get_backup(fleet, backup_id).store_url)
                          .get_bytes(pipeline.get_backup(fleet, backup_id).manifest_key))
    assert manifest["row_counts"]["warehouses"] == 500


def test_manifest_counts_every_table_as_the_dump_saw_it(fleet: Fleet, test_fleet: PgFleet,
                                                         slug: str) -> None:
    """The manifest's facts come from few round trips (issue 21): every table is
    counted, a name needing quotes too, large objects are digested, the server
    version is the server's, and the completed backup is audited with its row."""
    _tenant_with_data(fleet, slug, "ap-south")
    tenant = fleet.get_tenant(slug)
    with connect_as(with_dbname(test_fleet.admin_dsn(tenant.server), tenant.database),
                    autocommit=True) as conn:  # as a migration would, as the owner
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(tenant.owner_role)))
        conn.execute('CREATE TABLE "Odd ""name"" t" (id int)')
        conn.execute('INSERT INTO "Odd ""name"" t" SELECT generate_series(1, 7)')
    with connect_as(fleet.credentials(slug), autocommit=True) as conn:
        conn.execute("SELECT lo_from_bytea(0, 'blob')")
    result = pipeline.run_backup(fleet, slug)
    row = pipeline.get_backup(fleet, result.id)
    manifest = json.loads(open_store(row.store_url).get_bytes(row.manifest_key))
    assert manifest["row_counts"]['Odd "name" t'] == 7
    assert manifest["row_counts"]["warehouses"] == 500
    assert manifest["row_counts"]["customers"] == 1
    assert manifest["large_objects"]["count"] == 1 and len(manifest["large_objects"]["md5"]) == 32
    with connect_as(test_fleet.admin_dsn(fleet.get_tenant(slug).server)) as conn:
        shown = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    assert manifest["server_version"] == shown == row.server_version
    with fleet.catalog.session() as s:
        audited = list(s.scalars(select(AuditEvent.detail).where(
            AuditEvent.tenant == slug, AuditEvent.action == "backup.run")))
    assert [d["backup"] for d in audited] == [result.id]
    # the restore test reads the same counts back from a restored copy
    proc = run_cli(test_fleet, "backup", "verify", str(result.id), "--restore-test", "--json")
    assert proc.returncode == 0, proc.stderr


def test_due_and_prune(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    _tenant_with_data(fleet, slug, "ap-south")
    assert slug in pipeline.due_tenants(fleet)  # never backed up
    ids = [pipeline.run_backup(fleet, slug).id for _ in range(3)]
    assert slug not in pipeline.due_tenants(fleet)
    # age two of them beyond the policy (7 days, and older than 4 weeks)
    now = datetime.now(UTC)
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(Backup).where(Backup.id == ids[0])
                  .values(finished_at=now - timedelta(days=60)))
        s.execute(update(Backup).where(Backup.id == ids[1])
                  .values(finished_at=now - timedelta(days=45)))
    dry = json.loads(run_cli(test_fleet, "backup", "prune", "--dry-run", "--json").stdout)
    mine = {r["id"]: r["action"] for r in dry if r["tenant"] == slug}
    assert mine == {ids[0]: "prune", ids[1]: "prune", ids[2]: "keep"}
    assert pipeline.get_backup(fleet, ids[0]).status == "completed"  # dry run
    done = run_cli(test_fleet, "backup", "prune", "--json")
    assert done.returncode == 0, done.stderr
    assert [pipeline.get_backup(fleet, i).status for i in ids] == [
        "deleted", "deleted", "completed"]
    store = open_store(fleet.cfg.region("ap-south").backup_store)
    left = [o.key for o in store.objects(f"tenants/{slug}/")]
    assert len(left) == 2 and all(k.split("/")[-1].startswith(f"{ids[2]:010d}") for k in left)


def test_a_due_backup_runs_once_per_slot(fleet: Fleet, slug: str) -> None:
    """What `backup run --due` does per tenant when two runs overlap: whoever holds
    the tenant's due-lock backs up; the other skips, and a run that arrives after
    the backup finds the slot taken and skips too."""
    fleet.provision(slug, "ap-south")
    with fleet.catalog.advisory_lock(f"backup-due:{slug}") as got:
        assert got
        held = pipeline.run_due_backup(fleet, slug)
    assert (held.status, held.id) == ("skipped", 0)
    assert "another process" in (held.error or "")
    first = pipeline.run_due_backup(fleet, slug)
    assert first.status == "completed" and first.id
    late = pipeline.run_due_backup(fleet, slug)
    assert (late.status, late.error) == ("skipped", "no longer due")
    with fleet.catalog.session() as s:
        assert list(s.scalars(select(Backup.id).where(Backup.slug == slug))) == [first.id]


def test_kill_mid_upload_is_reaped(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    _tenant_with_data(fleet, slug, "ap-south")
    proc = run_cli(test_fleet, "backup", "run", slug, env={"TENANTCTL_FAULT": "backup.chunk"})
    assert proc.returncode == -9
    with fleet.catalog.session() as s:
        (row,) = s.scalars(select(Backup).where(Backup.slug == slug)).all()
    assert row.status == "running"
    store = open_store(row.store_url)
    root = Path(row.store_url.removeprefix("file://"))
    assert list(root.glob(f"tenants/{slug}/.*.partial"))  # the crash left a partial file
    again = run_cli(test_fleet, "backup", "run", slug, "--json")
    assert again.returncode == 0, again.stderr
    assert pipeline.get_backup(fleet, row.id).status == "failed"
    assert not list(root.glob(f"tenants/{slug}/.*.partial"))
    assert len(list(store.objects(f"tenants/{slug}/"))) == 2  # the new backup and manifest


def test_restore_in_place(fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    import psycopg

    _tenant_with_data(fleet, slug, "ap-south")
    before = _rows(fleet, slug)
    good = pipeline.run_backup(fleet, slug).id
    dsn = fleet.credentials(slug)
    with connect_as(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM warehouses WHERE code <> 'W1'")
        conn.execute("INSERT INTO suppliers (name) VALUES ('after the backup')")
    changed = _rows(fleet, slug)
    assert changed != before
    # a tampered backup of the changed state: refused, the live database untouched
    bad = pipeline.get_backup(fleet, pipeline.run_backup(fleet, slug).id)
    path = _object_path(fleet, bad)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x04
    path.write_bytes(bytes(data))
    refused = run_cli(test_fleet, "backup", "restore", str(bad.id), "--in-place", "--yes")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert _rows(fleet, slug) == changed
    no_yes = run_cli(test_fleet, "backup", "restore", str(good), "--in-place")
    assert no_yes.returncode == 2 and "--yes" in no_yes.stderr
    # the good one: an open application session is ended, the data is back
    session = psycopg.connect(dsn, autocommit=True)
    proc = run_cli(test_fleet, "backup", "restore", str(good), "--in-place", "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["in_place"] is True
    assert _rows(fleet, slug) == before
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    with connect_as(dsn, autocommit=True) as conn:  # same credentials, same rights
        conn.execute("INSERT INTO suppliers (name) VALUES ('after restore')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE suppliers")
    dbs, _ = __import__("tests.conftest", fromlist=["server_objects"]).server_objects(
        test_fleet, "ap-south-1")
    assert f"tenant_{slug}__r" not in dbs and f"tenant_{slug}__old" not in dbs
    # the restored database (renamed into place) carries the mark of what it holds
    revision = fleet.get_tenant(slug).revision
    assert revision is not None and mark_and_version(fleet, slug) == (revision, revision)


def test_master_key_from_kms(test_fleet: PgFleet, tmp_path: Path, slug: str,
                             moto_endpoint: str,  # noqa: F811
                             own_catalog: OwnCatalog) -> None:
    import boto3

    kms = boto3.client("kms", region_name="eu-central-1", endpoint_url=moto_endpoint)
    key_id = kms.create_key(Description="tenantctl master")["KeyMetadata"]["KeyId"]
    blob = tmp_path / "master.key.kms"
    made = run_cli(test_fleet, "keys", "generate", str(blob), "--kms-key-id", key_id,
                   "--kms-region", "eu-central-1", "--kms-endpoint-url", moto_endpoint)
    assert made.returncode == 0, made.stderr
    assert blob.stat().st_mode & 0o777 == 0o600
    # a catalog of its own: the shared one's secrets are wrapped by another master
    # key, which a KMS key is not (writes under it would be refused)
    text = own_catalog.config_path.read_text().replace(
        f'file = "{test_fleet.state_dir / "master.key"}"',
        f'kms_key_id = "{key_id}"\nkms_data_key_file = "{blob}"\n'
        f'kms_region = "eu-central-1"\nkms_endpoint_url = "{moto_endpoint}"')
    cfg = tmp_path / "kms.toml"
    cfg.write_text(text)
    checked = run_cli(test_fleet, "config", "check", config=cfg)
    assert checked.returncode == 0, checked.stderr
    fleet = Fleet(load_config(cfg))
    try:
        _tenant_with_data(fleet, slug, "ap-south")
        assert pipeline.verify_backup(fleet, pipeline.run_backup(fleet, slug).id)["ok"]
    finally:
        fleet.close()
    blob.unlink()
    missing = run_cli(test_fleet, "config", "check", config=cfg)
    assert missing.returncode == 7 and "does not exist" in missing.stderr
