"""Backups at scale: the [backups] s3_* settings, multipart uploads in parallel parts
of the configured size, storage class and server-side encryption on every object,
progress on a terminal, and `backup download` (through the CLI, S3 on moto's
HTTP server, real clusters)."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
import threading
from pathlib import Path

import pyrage
import pytest

from backups import service as pipeline
from backups.stores import S3Store, open_store
from orchestrator.adapters.postgres.pgtools import pg_tool
from orchestrator.api import Fleet
from orchestrator.config import MIB, S3UploadConfig, load_config, parse_config
from orchestrator.domain.errors import ConfigError, ExitCode
from tests.conftest import REPO, TENANTCTL, PgFleet, connect_as, run_cli
from tests.test_stores import moto_endpoint  # noqa: F401 - fixture
from tests.test_units import _raw

# -- config (fast) ---------------------------------------------------------------------


def test_s3_upload_settings_parse(tmp_path: Path) -> None:
    assert parse_config(_raw(), tmp_path / "t.toml").s3 == S3UploadConfig()
    raw = _raw()
    raw["backups"] = {"s3_part_size": "64MiB", "s3_max_concurrency": 8,
                      "s3_storage_class": "STANDARD_IA", "s3_sse": "aws:kms",
                      "s3_sse_kms_key_id": "alias/backups"}
    assert parse_config(raw, tmp_path / "t.toml").s3 == S3UploadConfig(
        part_size=64 * MIB, max_concurrency=8, storage_class="STANDARD_IA", sse="aws:kms",
        sse_kms_key_id="alias/backups")
    raw["backups"] = {"s3_part_size": "1GiB", "s3_sse": "AES256"}
    s3 = parse_config(raw, tmp_path / "t.toml").s3
    assert (s3.part_size, s3.sse, s3.storage_class) == (1 << 30, "AES256", None)


@pytest.mark.parametrize("backups, key, problem", [
    ({"s3_part_size": 8388608}, "s3_part_size", "a size like '64MiB'"),
    ({"s3_part_size": "64MB"}, "s3_part_size", "a size like '64MiB'"),
    ({"s3_part_size": "4MiB"}, "s3_part_size", "outside S3's part sizes"),
    ({"s3_part_size": "6GiB"}, "s3_part_size", "outside S3's part sizes"),
    ({"s3_max_concurrency": 0}, "s3_max_concurrency", "at least 1"),
    ({"s3_max_concurrency": 65}, "s3_max_concurrency", "at most 64"),
    ({"s3_storage_class": "GLACIER"}, "s3_storage_class", "readable at once"),
    ({"s3_storage_class": "standard"}, "s3_storage_class", "is not one of"),
    ({"s3_sse": "aws:kms:dsse"}, "s3_sse", "AES256 or aws:kms"),
    ({"s3_sse": "AES256", "s3_sse_kms_key_id": "k"}, "s3_sse_kms_key_id",
     'needs s3_sse = "aws:kms"'),
    ({"s3_sse_kms_key_id": "k"}, "s3_sse_kms_key_id", "needs s3_sse"),
    ({"s3_part": "64MiB"}, "s3_part", "unknown key"),
])
def test_s3_upload_settings_errors_are_one_line(tmp_path: Path, backups: dict[str, object],
                                                key: str, problem: str) -> None:
    raw = _raw()
    raw["backups"] = backups
    path = tmp_path / "tenantctl.toml"
    with pytest.raises(ConfigError) as err:
        parse_config(raw, path)
    assert str(err.value).startswith(f"{path}: backups.{key}: ")
    assert problem in str(err.value) and "\n" not in str(err.value)


# -- through the CLI ---------------------------------------------------------------------


def _s3_config(test_fleet: PgFleet, tmp_path: Path, endpoint: str, bucket: str,
               backups: str) -> tuple[Path, S3Store]:
    """The test fleet's config with eu-central's store on moto and [backups] ``backups``."""
    url = f"s3://{bucket}/tenantctl?endpoint_url={endpoint}&region=eu-central-1"
    eu_store = f'file://{test_fleet.state_dir / "backups" / "eu-central"}'
    cfg_path = tmp_path / "s3.toml"
    cfg_path.write_text(test_fleet.config_path.read_text().replace(eu_store, url, 1)
                        + f"\n[backups]\n{backups}\n")
    store = open_store(url)
    assert isinstance(store, S3Store)
    store.client.create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
    return cfg_path, store


def _fill(fleet: Fleet, slug: str, rows: int) -> None:
    """Poorly compressible text: 200,000 rows make a dump of well over 10 MiB."""
    with connect_as(fleet.credentials(slug), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) SELECT md5(g::text) || '@x.test',"
                     " md5(random()::text) || md5(random()::text) || md5(random()::text)"
                     " FROM generate_series(1, %s) g", (rows,))


def _cli_bytes(test_fleet: PgFleet, *args: str, config: Path | None = None
               ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*TENANTCTL, "--config", str(config or test_fleet.config_path),
                           *args], capture_output=True, cwd=REPO, timeout=120)


def _decrypt(test_fleet: PgFleet, slug: str, blob: bytes) -> bytes:
    exported = run_cli(test_fleet, "backup", "key", "export", slug)
    assert exported.returncode == 0, exported.stderr
    identity = pyrage.x25519.Identity.from_str(exported.stdout.strip())
    return pyrage.decrypt(blob, [identity])


def test_s3_backup_in_parallel_parts_with_storage_class_and_sse(
        test_fleet: PgFleet, tmp_path: Path, slug: str, moto_endpoint: str  # noqa: F811
) -> None:
    cfg_path, store = _s3_config(
        test_fleet, tmp_path, moto_endpoint, "eu-backups-parts",
        's3_part_size = "5MiB"\ns3_max_concurrency = 3\ns3_storage_class = "STANDARD_IA"\n'
        's3_sse = "aws:kms"\ns3_sse_kms_key_id = "alias/tenantctl-backups"')
    fleet = Fleet(load_config(cfg_path))
    try:
        fleet.provision(slug, "eu-central")
        _fill(fleet, slug, 200_000)
        proc = run_cli(test_fleet, "backup", "run", slug, "--json", config=cfg_path)
        assert proc.returncode == 0, proc.stderr
        (result,) = json.loads(proc.stdout)
        assert result["status"] == "completed" and result["size"] > 10 * MIB
        row = pipeline.get_backup(fleet, result["id"])
        head = store.client.head_object(Bucket=store.bucket, Key=f"tenantctl/{row.object_key}")
        parts = int(head["ETag"].strip('"').rsplit("-", 1)[1])  # a multipart object's -N
        assert parts == -(-result["size"] // (5 * MIB)) and parts >= 3
        for key in (row.object_key, row.manifest_key):
            head = store.client.head_object(Bucket=store.bucket, Key=f"tenantctl/{key}")
            assert head["StorageClass"] == "STANDARD_IA", key
            assert head["ServerSideEncryption"] == "aws:kms", key
            assert head["SSEKMSKeyId"].endswith("alias/tenantctl-backups"), key
        assert store.pending_uploads() == []
        verified = run_cli(test_fleet, "backup", "verify", str(row.id), config=cfg_path)
        assert verified.returncode == 0, verified.stderr

        # download: the same bytes as the object, decrypting to a dump pg_restore reads
        out = tmp_path / "b.dump.age"
        got = run_cli(test_fleet, "backup", "download", str(row.id), "--output", str(out),
                      "--json", config=cfg_path)
        assert got.returncode == 0, got.stderr
        report = json.loads(got.stdout)
        blob = out.read_bytes()
        assert report["size"] == len(blob) == row.size
        assert report["sha256"] == hashlib.sha256(blob).hexdigest() == row.sha256
        assert blob == store.get_bytes(row.object_key)
        dump = _decrypt(test_fleet, slug, blob)
        listing = subprocess.run([pg_tool(fleet.cfg, "pg_restore"), "--list"], input=dump,
                                 capture_output=True, check=True)
        assert b"TABLE DATA public customers" in listing.stdout
    finally:
        fleet.close()


def test_download_to_stdout_or_a_new_file(fleet: Fleet, test_fleet: PgFleet, slug: str,
                                          tmp_path: Path) -> None:
    fleet.provision(slug, "ap-south")
    _fill(fleet, slug, 2000)
    row = pipeline.get_backup(fleet, pipeline.run_backup(fleet, slug).id)
    piped = _cli_bytes(test_fleet, "backup", "download", str(row.id), "--output", "-")
    assert piped.returncode == 0, piped.stderr
    assert hashlib.sha256(piped.stdout).hexdigest() == row.sha256
    assert piped.stdout.startswith(b"age-encryption.org/v1")
    assert _decrypt(test_fleet, slug, piped.stdout).startswith(b"PGDMP")
    assert not (REPO / "-").exists()  # `-` is stdout, never a file of that name

    out = tmp_path / "copy.age"
    out.write_bytes(b"precious")
    refused = run_cli(test_fleet, "backup", "download", str(row.id), "--output", str(out))
    assert refused.returncode == ExitCode.CONFLICT
    assert "already exists; --force replaces it" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert out.read_bytes() == b"precious"
    forced = run_cli(test_fleet, "backup", "download", str(row.id), "--output", str(out),
                     "--force")
    assert forced.returncode == 0, forced.stderr
    assert out.read_bytes() == piped.stdout
    assert "encrypted" in forced.stderr + forced.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["copy.age"]  # no partial file left

    bad = run_cli(test_fleet, "backup", "download", str(row.id), "--output", "-", "--json")
    assert bad.returncode == ExitCode.INVALID and "--json needs --output FILE" in bad.stderr
    missing = run_cli(test_fleet, "backup", "download", "999999999", "--output",
                      str(tmp_path / "x.age"))
    assert missing.returncode == ExitCode.NOT_FOUND and not (tmp_path / "x.age").exists()
    nowhere = run_cli(test_fleet, "backup", "download", str(row.id), "--output",
                      str(tmp_path / "no-such-dir" / "x.age"))
    assert nowhere.returncode == ExitCode.INVALID and "cannot create" in nowhere.stderr
    assert len(nowhere.stderr.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["copy.age"]


def test_download_of_a_changed_object_fails_and_writes_nothing(
        fleet: Fleet, test_fleet: PgFleet, slug: str, tmp_path: Path) -> None:
    fleet.provision(slug, "ap-south")
    row = pipeline.get_backup(fleet, pipeline.run_backup(fleet, slug).id)
    store = open_store(row.store_url)
    blob = bytearray(store.get_bytes(row.object_key))
    blob[len(blob) // 2] ^= 0x01
    store.put_bytes(row.object_key, bytes(blob))
    out = tmp_path / "copy.age"
    proc = run_cli(test_fleet, "backup", "download", str(row.id), "--output", str(out))
    assert proc.returncode == ExitCode.DUMP_OR_RESTORE
    assert "differs from the manifest" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def _run_on_a_terminal(test_fleet: PgFleet, *args: str) -> tuple[int, str, str]:
    """The CLI with stderr on a pseudo-terminal (stdout piped): (exit, stdout, what
    the terminal showed)."""
    master, slave = pty.openpty()
    shown: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed
                return
            if not data:
                return
            shown.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    proc = subprocess.run([*TENANTCTL, "--config", str(test_fleet.config_path), *args],
                          stdout=subprocess.PIPE, stderr=slave, cwd=REPO, env=env,
                          timeout=120)
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, proc.stdout.decode(), b"".join(shown).decode(errors="replace")


def test_one_backup_shows_bytes_and_throughput_on_a_terminal_only(
        fleet: Fleet, test_fleet: PgFleet, slug: str) -> None:
    fleet.provision(slug, "ap-south")
    _fill(fleet, slug, 20_000)
    code, out, terminal = _run_on_a_terminal(test_fleet, "backup", "run", slug)
    assert code == 0, terminal
    assert f"backup {slug}" in terminal
    assert "/s" in terminal and ("MB" in terminal or "kB" in terminal)  # size, speed
    assert "completed" in out + terminal
    piped = run_cli(test_fleet, "backup", "run", slug)
    assert piped.returncode == 0, piped.stderr
    assert "/s" not in piped.stderr and "\x1b" not in piped.stderr  # no bar, no escapes


def test_download_into_a_pipe_closed_early_is_one_line(fleet: Fleet, test_fleet: PgFleet,
                                                       slug: str) -> None:
    fleet.provision(slug, "ap-south")
    _fill(fleet, slug, 20_000)
    row = pipeline.get_backup(fleet, pipeline.run_backup(fleet, slug).id)
    assert row.size is not None and row.size > 1 << 20  # more than a pipe holds
    proc = subprocess.run(
        f"{' '.join(TENANTCTL)} --config {test_fleet.config_path} backup download {row.id} "
        "--output - | head -c 10 > /dev/null; echo \"${PIPESTATUS[0]}\" >&2",
        shell=True, executable="/bin/bash", capture_output=True, text=True, cwd=REPO,
        timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == str(int(ExitCode.FAILED)), proc.stderr
    assert lines[:-1] == ["error: stdout was closed before the whole backup was written"]
