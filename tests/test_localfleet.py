"""The embedded local fleet and quickstart, end to end through the CLI, in a
fresh directory — what a new user gets from `make quickstart`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from orchestrator.config import load_config
from tests.conftest import REPO, TENANTCTL


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tenantctl-qs-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        if (path / "tenantctl.toml").exists():
            _cli(path, "local", "down")
        shutil.rmtree(path, ignore_errors=True)


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TENANTCTL_CONFIG"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([*TENANTCTL, *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_quickstart_from_nothing_and_again(workdir: Path) -> None:
    first = _cli(workdir, "quickstart")
    assert first.returncode == 0, first.stderr + first.stdout
    assert "demo_eu: provisioned in eu-central" in first.stdout
    assert "demo_ap: provisioned in ap-south" in first.stdout
    assert "3 products, written with its own credentials" in first.stdout
    key = workdir / ".tenantctl" / "master.key"
    assert key.stat().st_mode & 0o777 == 0o600
    config_text = (workdir / "tenantctl.toml").read_text()
    assert key.read_text().strip() not in config_text
    # the admin passwords live in the 0600 passfile, not in the config
    pgpass = workdir / ".tenantctl" / "pgpass"
    assert pgpass.stat().st_mode & 0o777 == 0o600
    passwords = [line.rsplit(":", 1)[1] for line in pgpass.read_text().splitlines()]
    assert passwords and all(len(p) >= 32 and p not in config_text for p in passwords)

    second = _cli(workdir, "quickstart")
    assert second.returncode == 0, second.stderr
    assert "demo_eu: already active" in second.stdout
    assert "already running" in second.stdout
    tenants = json.loads(_cli(workdir, "tenant", "list", "--json").stdout)
    assert sorted(t["slug"] for t in tenants) == ["demo_ap", "demo_eu"]


def test_local_status_down_up(workdir: Path) -> None:
    status = json.loads(_cli(workdir, "local", "status", "--json").stdout)
    assert [s["running"] for s in status] == [True, True]
    down = _cli(workdir, "local", "down")
    assert down.returncode == 0 and down.stdout.count("stopped") == 2, down.stderr
    stopped = _cli(workdir, "local", "status")
    assert stopped.returncode == 3
    again = _cli(workdir, "local", "down")
    assert again.returncode == 0 and again.stdout.count("not running") == 2
    up = _cli(workdir, "local", "up")
    assert up.returncode == 0 and up.stdout.count("started") == 2, up.stderr


def test_local_up_recovers_from_a_crash_and_a_stale_pidfile(workdir: Path) -> None:
    cfg = load_config(workdir / "tenantctl.toml")
    server = cfg.servers[0]
    assert server.data_dir is not None
    pidfile = server.data_dir / "postmaster.pid"
    pid = int(pidfile.read_text().splitlines()[0])
    os.kill(pid, signal.SIGKILL)  # the postmaster dies without cleaning up
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    # the pid is then reused by an unrelated process (here: us)
    lines = pidfile.read_text().splitlines()
    lines[0] = str(os.getpid())
    pidfile.write_text("\n".join(lines) + "\n")
    # wait for orphaned backends to go so the port and shared memory are free
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        up = _cli(workdir, "local", "up")
        if up.returncode == 0:
            break
        time.sleep(1)
    assert up.returncode == 0, up.stderr
    assert "removed stale postmaster.pid" in up.stdout
    tenant = _cli(workdir, "tenant", "credentials", "demo_eu")
    with psycopg.connect(tenant.stdout.strip(), connect_timeout=5) as conn:
        assert conn.execute("SELECT count(*) FROM products").fetchone() == (3,)


def test_admin_role_cannot_do_superuser_things(workdir: Path) -> None:
    cfg = load_config(workdir / "tenantctl.toml")
    with psycopg.connect(cfg.servers[0].admin_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("ALTER SYSTEM SET work_mem = '64MB'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE ROLE would_be_root SUPERUSER")
