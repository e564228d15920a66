"""The embedded local fleet and quickstart, end to end through the CLI, in a
fresh directory — what a new user gets from `make quickstart`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from orchestrator.adapters.postgres import spare_pool
from orchestrator.config import load_config
from tests.conftest import REPO, TENANTCTL

pytestmark = pytest.mark.pg  # every test here starts clusters of its own


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

    cfg = load_config(workdir / "tenantctl.toml")
    assert cfg.spare_databases == 2
    for sc in cfg.servers:  # each demo sign-up found its pool empty and filled it
        with psycopg.connect(sc.admin_dsn) as conn:
            assert [s.ready for s in spare_pool.list_spares(conn)] == [True, True]

    second = _cli(workdir, "quickstart")
    assert second.returncode == 0, second.stderr
    assert "demo_eu: already active" in second.stdout
    assert "already running" in second.stdout
    tenants = json.loads(_cli(workdir, "tenant", "list", "--json").stdout)
    assert sorted(t["slug"] for t in tenants) == ["demo_ap", "demo_eu"]
    # the fleet has its identity, as after `catalog upgrade`: the report names it
    report = json.loads(_cli(workdir, "report", "--json").stdout)
    assert report["fleet"]["fleet_id"], report["fleet"]


def test_local_status_down_up(workdir: Path) -> None:
    status = json.loads(_cli(workdir, "local", "status", "--json").stdout)
    assert [s["running"] for s in status] == [True, True]
    down = _cli(workdir, "local", "down")
    # the clusters' lines (a PgBouncer beside each, when installed, says "pooler …")
    assert down.returncode == 0 and down.stdout.count(": stopped") == 2, down.stderr
    stopped = _cli(workdir, "local", "status")
    assert stopped.returncode == 3
    again = _cli(workdir, "local", "down")
    assert again.returncode == 0 and again.stdout.count("not running") == 2
    up = _cli(workdir, "local", "up")
    assert up.returncode == 0 and up.stdout.count(": started") == 2, up.stderr


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


def test_init_local_is_idempotent(workdir: Path) -> None:
    before = (workdir / "tenantctl.toml").read_text()
    again = _cli(workdir, "init", "--local")
    assert again.returncode == 0, again.stderr
    assert "kept existing" in again.stdout and "already running" in again.stdout
    assert (workdir / "tenantctl.toml").read_text() == before


def _usable_by_others(path: Path) -> bool:
    real = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in [real, *real.parents])


def _python_for_others() -> tuple[str, str] | None:
    """An interpreter another user can run, and the site-packages to give it.
    (pyenv's python under /root is not reachable by other users.)"""
    import site
    import sysconfig

    purelib = sysconfig.get_paths()["purelib"]
    if not (_usable_by_others(REPO) and _usable_by_others(Path(purelib))):
        return None
    for candidate in (Path(sys.executable), Path(f"/usr/bin/python3.{sys.version_info.minor}")):
        if candidate.exists() and _usable_by_others(candidate):
            return str(candidate), os.pathsep.join([purelib, *site.getsitepackages()])
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="as a normal user every other test covers it")
def test_local_fleet_as_a_normal_user() -> None:
    """As root, the suite runs Postgres as the tenantctl_pg system user; this runs
    the whole CLI as an ordinary user, where Postgres runs as that user."""
    import pwd

    found = _python_for_others()
    if found is None:
        pytest.skip("no Python interpreter and checkout here that another user may run")
    python, site_packages = found
    user = "tenantctl_tester"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", user],
                       check=True)
        entry = pwd.getpwnam(user)
    home = Path(tempfile.mkdtemp(prefix="tenantctl-user-", dir="/tmp"))
    os.chmod(home, 0o755)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home),
           "PYTHONPATH": os.pathsep.join([str(REPO), site_packages])}

    def as_user(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, "-m", "cli", *args], cwd=home, env=env,
                              capture_output=True, text=True, user=entry.pw_uid,
                              group=entry.pw_gid, extra_groups=[], timeout=300)

    try:
        init = as_user("init", "--local")
        assert init.returncode == 0, init.stderr
        created = as_user("tenant", "create", "userland", "--region", "ap-south")
        assert created.returncode == 0, created.stderr
        with psycopg.connect(created.stdout.strip().splitlines()[-1], connect_timeout=5) as c:
            assert c.execute("SELECT current_user").fetchone() == ("tenant_userland",)
        data_dir = home / ".tenantctl" / "pg" / "ap-south-1"
        assert data_dir.stat().st_uid == entry.pw_uid
    finally:
        as_user("local", "down")
        shutil.rmtree(home, ignore_errors=True)


def test_an_edited_port_is_said_then_applied_by_local_up() -> None:
    """`init --local --base-port N --no-start`, then `local up`; the operator edits a
    server's port: a running cluster is refused with the next step, a stopped one
    is moved, and tenants on it are reachable at the new port."""
    from orchestrator.devfleet import localfleet

    home = Path(tempfile.mkdtemp(prefix="tenantctl-port-", dir="/tmp"))
    os.chmod(home, 0o755)
    base = next(p for p in range(30100, 31000, 11)
                if all(localfleet._port_free(q) for q in (p, p + 1, p + 5)))
    try:
        init = _cli(home, "init", "--local", "--base-port", str(base), "--no-start")
        assert init.returncode == 0 and "not started" in init.stdout, init.stderr
        assert not (home / ".tenantctl" / "pg").exists() or \
            not any((home / ".tenantctl" / "pg").iterdir())
        up = _cli(home, "local", "up")
        assert up.returncode == 0 and f"started on 127.0.0.1:{base + 1}" in up.stdout, up.stderr
        assert _cli(home, "catalog", "upgrade").returncode == 0
        created = _cli(home, "tenant", "create", "porty", "--region", "ap-south")
        assert created.returncode == 0, created.stderr

        config = home / "tenantctl.toml"
        config.write_text(config.read_text().replace(f":{base + 1}/", f":{base + 5}/")
                          .replace(f"port = {base + 1}", f"port = {base + 5}"))
        refused = _cli(home, "local", "up")
        assert refused.returncode == 2, refused.stderr
        assert f"error: ap-south-1 runs on port {base + 1} but tenantctl.toml says " \
               f"{base + 5}: `tenantctl local down`, then `tenantctl local up`" in refused.stderr
        check = _cli(home, "config", "check")
        assert f"warning: ap-south-1 runs on port {base + 1}" in check.stderr
        assert _cli(home, "local", "down").returncode == 0
        moved = _cli(home, "local", "up")
        assert moved.returncode == 0, moved.stderr
        assert f"ap-south-1: moved from port {base + 1} to {base + 5}" in moved.stdout
        status = json.loads(_cli(home, "local", "status", "--json").stdout)
        assert [(s["port"], s["status"]) for s in status] == [
            (base, "running"), (base + 5, "running")]
        # the server's own address: the pooler's list names the old port until a sync
        shown = _cli(home, "tenant", "credentials", "porty", "--direct")
        assert shown.returncode == 0, shown.stderr
        dsn = shown.stdout.strip().splitlines()[-1]
        assert f":{base + 5}/" in dsn
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("tenant_porty",)
        assert _cli(home, "config", "check").stderr == ""
    finally:
        _cli(home, "local", "down")
        shutil.rmtree(home, ignore_errors=True)
