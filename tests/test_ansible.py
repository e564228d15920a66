"""ansible/: ansible-lint (production profile) and a syntax check; a real run of
the postgres_server role on this machine (connection=local), twice, then
tenantctl provisioning on the cluster it made; the orchestrator role's
tenantctl.toml rendered from the example inventory and checked by tenantctl.

The real run needs root and Debian's PostgreSQL packages (pg_createcluster);
it skips, saying why, without them. Its cluster (own name, spare port) is
stopped and dropped afterwards whatever happens.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import grp
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import yaml

from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.crypto.masterkey import write_key_file
from orchestrator.devfleet import localfleet
from orchestrator.domain.names import ADMIN_ROLE
from tests.conftest import REPO, TENANTCTL, PgFleet, connect_as

ANSIBLE_DIR = REPO / "ansible"
EXAMPLE_INVENTORY = ANSIBLE_DIR / "inventory" / "example"
BIN = Path(sys.executable).parent
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.MULTILINE)


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} missing: `pip install -e '.[dev]'` installs ansible-core and "
                    "ansible-lint")
    return str(path)


def _env(tmp: Path) -> dict[str, str]:
    home = tmp / "ansible-home"
    return {**os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_HOME": str(home), "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_REMOTE_TMP": str(home / "remote-tmp"),
            "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "NO_COLOR": "1",
            "ANSIBLE_DEPRECATION_WARNINGS": "0"}


def _private_json(path: Path, data: dict[str, object]) -> Path:
    """Extra vars with secrets: a 0600 file, never argv."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return path


def _playbook(tmp: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("ansible-playbook"), *args], cwd=ANSIBLE_DIR,
                          env=_env(tmp), capture_output=True, text=True, timeout=timeout)


def _tenantctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TENANTCTL, "--config", str(config), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _recap(res: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    out = {m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]),
                  "failed": int(m[5])} for m in RECAP.finditer(res.stdout)}
    assert out, res.stdout[-3000:]
    return out


# -- lint and syntax ----------------------------------------------------------------


def test_ansible_lint_production_profile(tmp_path: Path) -> None:
    res = subprocess.run([_tool("ansible-lint"), "--offline", "--profile", "production",
                          "--nocolor"], cwd=ANSIBLE_DIR, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "Profile 'production' was required, and it passed" in res.stdout + res.stderr


def test_site_playbook_syntax(tmp_path: Path) -> None:
    res = _playbook(tmp_path, "-i", str(EXAMPLE_INVENTORY), "--syntax-check", "site.yml")
    assert res.returncode == 0, res.stdout + res.stderr


# -- the orchestrator role, rendered from the example inventory ----------------------


def test_orchestrator_role_renders_a_config_tenantctl_accepts(tmp_path: Path) -> None:
    """The whole role on this machine against the example inventory, with the
    switches that keep it off the system (no package, user, pip install,
    catalog or scheduler) and its files under tmp_path."""
    etc, state = tmp_path / "etc", tmp_path / "state"
    master_key = base64.b64encode(secrets.token_bytes(32)).decode()
    admin_password = secrets.token_urlsafe(24)
    pooler_password = secrets.token_urlsafe(24)
    extra = _private_json(tmp_path / "vars.json", {
        "vault_tenantctl_pooler_admin_password": pooler_password,
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
        "vault_tenantctl_admin_password": admin_password,
        "vault_tenantctl_master_key": master_key,
        "orchestrator_etc_dir": str(etc), "orchestrator_state_dir": str(state),
        "orchestrator_user": getpass.getuser(),
        "orchestrator_group": grp.getgrgid(os.getgid()).gr_name,
        "orchestrator_manage_user": False, "orchestrator_install": False,
        "orchestrator_install_packages": False, "orchestrator_catalog_upgrade": False,
        "orchestrator_manage_scheduler": False,
        "orchestrator_bin": str(BIN / "tenantctl"),  # validates each new tenantctl.toml
        "orchestrator_usage": {"keep_days": 90, "quota_warning": 0.9},
        "orchestrator_scheduler_intervals": {"usage_minutes": 30},
        "orchestrator_plans": {"small": {"storage_quota": "10GB", "connection_limit": 10,
                                         "statement_timeout": "30s"},
                               "large": {"storage_quota": "1TB"}},
        "orchestrator_default_plan": "small",
    })
    args = ("-i", str(EXAMPLE_INVENTORY), "-e", f"@{extra}", "--limit", "orchestrator",
            "site.yml")
    first = _playbook(tmp_path, *args)
    assert _recap(first)["ops-1.internal"]["changed"] > 0
    assert _recap(_playbook(tmp_path, *args))["ops-1.internal"]["changed"] == 0

    config = etc / "tenantctl.toml"
    res = _tenantctl(config, "config", "check", "--json")
    assert res.returncode == 0, res.stderr
    inventory = yaml.safe_load((EXAMPLE_INVENTORY / "hosts.yml").read_text())["all"]["children"]
    expected = {}
    for group in inventory["postgres_servers"]["children"]:
        region = inventory[group]["vars"]["tenantctl_region"]
        expected[region] = {
            "backup_store": inventory[group]["vars"]["tenantctl_backup_store"],
            "servers": [h["tenantctl_server_name"] for h in inventory[group]["hosts"].values()]}
    assert json.loads(res.stdout)["regions"] == expected

    raw = tomllib.loads(config.read_text())
    # usage metering and the quotas' warning share, plans, the default plan: as given,
    # and tenantctl reads them so
    assert raw["usage"] == {"keep_days": 90, "quota_warning": 0.9}
    assert raw["scheduler"] == {"usage_minutes": 30}
    assert raw["plans"] == {"small": {"storage_quota": "10GB", "connection_limit": 10,
                                      "statement_timeout": "30s"},
                            "large": {"storage_quota": "1TB"}}
    assert raw["tenants"]["default_plan"] == "small"
    from orchestrator.config import load_config

    cfg = load_config(config)
    assert (cfg.usage.quota_warning, cfg.default_plan) == (0.9, "small")
    assert cfg.plan("small").storage_quota == 10 << 30
    eu1 = raw["regions"]["eu-central"]["servers"][0]
    assert eu1["capacity"] == 800
    assert eu1["admin_dsn"] == (f"postgresql://{ADMIN_ROLE}@10.10.1.11:5432/postgres"
                                f"?passfile={etc}/pgpass&sslmode=require")
    # a server with a pooler: its keys, its admin console's password in a file of its own
    assert {k: v for k, v in eu1.items() if k.startswith("pooler")} == {
        "pooler": "pgbouncer", "pooler_host": "10.10.1.11", "pooler_port": 6432,
        "pooler_dir": "/var/lib/postgresql/tenantctl-pooler",
        "pooler_admin_user": "tenantctl_pooler",
        "pooler_admin_password_file": f"{etc}/pooler-eu-central-1.password"}
    assert "pooler" not in raw["regions"]["eu-central"]["servers"][1]
    pooler_file = etc / "pooler-eu-central-1.password"
    assert pooler_file.read_text() == pooler_password + "\n"
    assert pooler_file.stat().st_mode & 0o777 == 0o600
    assert raw["catalog"]["dsn"].startswith(f"postgresql://{ADMIN_ROLE}@10.10.1.11:5432/"
                                            "tenantctl_catalog?")
    assert raw["master_key"] == {"file": str(etc / "master.key")}
    assert (etc / "master.key").read_text().strip() == master_key
    for secret in ("master.key", "pgpass"):
        assert (etc / secret).stat().st_mode & 0o777 == 0o600
    assert f"10.20.1.11:5432:*:{ADMIN_ROLE}:{admin_password}" in (etc / "pgpass").read_text()
    for out in (first.stdout + first.stderr, config.read_text()):
        assert admin_password not in out and master_key not in out
        assert pooler_password not in out


# -- the postgres_server role, for real ---------------------------------------------


@dataclass
class AnsibleCluster:
    version: str
    name: str
    port: int
    admin_password: str
    memtotal_mb: int
    runs: list[tuple[int, str]]  # (changed, output) of each playbook run
    pooler_port: int = 0
    pooler_password: str = ""

    @property
    def pooler_dir(self) -> Path:
        return Path(f"/var/lib/postgresql/{self.name}-pooler")


def _installed_version() -> str | None:
    versions = sorted((p.parent.parent.name for p in
                       Path("/usr/lib/postgresql").glob("*/bin/postgres")), key=int)
    return versions[-1] if versions else None


@pytest.fixture
def ansible_cluster(tmp_path: Path) -> Iterator[AnsibleCluster]:
    """Runs site.yml twice against this machine, with a region group holding one
    local host; yields the cluster; stops and drops it whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("the postgres_server role's real run needs root (packages, clusters)")
    missing = [t for t in ("apt-get", "dpkg-query", "pg_createcluster", "pg_ctlcluster",
                           "pg_dropcluster", "su") if shutil.which(t) is None]
    version = _installed_version()
    if missing or version is None:
        pytest.skip(f"needs Debian's PostgreSQL packages and apt (missing: "
                    f"{', '.join(missing) or 'a /usr/lib/postgresql/*/bin/postgres'})")
    name = f"tctl_ansible_{uuid.uuid4().hex[:8]}"
    port, pooler_port = localfleet.free_ports(2, start=28500 + secrets.randbelow(150) * 10)
    cluster = AnsibleCluster(version, name, port, secrets.token_urlsafe(24),
                             _memtotal_mb(), [], pooler_port, secrets.token_urlsafe(24))
    pooler_conf = Path(f"/etc/pgbouncer/{name}.ini")
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    inventory = {"all": {"children": {
        "postgres_servers": {"children": {"region_ansible_test": None}},
        "region_ansible_test": {
            "vars": {"tenantctl_region": "ansible-test",
                     "tenantctl_backup_store": f"file://{tmp_path / 'backups'}"},
            "hosts": {"ansible-test-1": {
                "ansible_connection": "local", "ansible_python_interpreter": python,
                "ansible_become_method": "su",  # root, and no sudo here
                "tenantctl_server_name": "ansible-test-1",
                "tenantctl_server_address": "127.0.0.1",
                "tenantctl_server_capacity": 10,
                "postgres_server_version": version,
                "postgres_server_cluster": name,
                "postgres_server_port": port,
                "postgres_server_listen_addresses": "127.0.0.1",
                "postgres_server_shared_buffers_ratio": 0.01,
                "postgres_server_max_connections": 100,
                # a PgBouncer in front, started as a daemon (no systemd here)
                "postgres_server_pooler": True,
                "postgres_server_pooler_port": pooler_port,
                "postgres_server_pooler_dir": str(cluster.pooler_dir),
                "postgres_server_pooler_conf": str(pooler_conf),
                "postgres_server_pooler_manage": "daemon",
            }}}}}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    extra = _private_json(tmp_path / "secrets.json",
                          {"tenantctl_admin_password": cluster.admin_password,
                           "tenantctl_pooler_admin_password": cluster.pooler_password})
    args = ("-i", str(tmp_path / "inventory.yml"), "-e", f"@{extra}", "site.yml")
    try:
        for _ in range(2):
            res = _playbook(tmp_path, *args)
            recap = _recap(res)["ansible-test-1"]
            assert recap["failed"] == 0 and recap["unreachable"] == 0
            cluster.runs.append((recap["changed"], res.stdout + res.stderr))
        yield cluster
    finally:
        pidfile = cluster.pooler_dir / "pgbouncer.pid"
        if pidfile.exists():
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        shutil.rmtree(cluster.pooler_dir, ignore_errors=True)
        pooler_conf.unlink(missing_ok=True)
        subprocess.run(["pg_dropcluster", "--stop", version, name], capture_output=True,
                       timeout=120)
        # pg_dropcluster removes only the files it made (not conf.d/, the certificate)
        shutil.rmtree(f"/etc/postgresql/{version}/{name}", ignore_errors=True)
        shutil.rmtree(f"/var/lib/postgresql/{version}/{name}", ignore_errors=True)


def _memtotal_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def test_postgres_server_role_real_run(ansible_cluster: AnsibleCluster, test_fleet: PgFleet,
                                       tmp_path: Path) -> None:
    cluster = ansible_cluster
    (first_changed, _), (second_changed, second) = cluster.runs
    assert first_changed > 0
    assert second_changed == 0, second[-6000:]  # idempotent: a second run changes nothing
    for _, out in cluster.runs:
        assert cluster.admin_password not in out
        assert cluster.pooler_password not in out

    # The server as Ansible left it.
    conf_dir = Path(f"/etc/postgresql/{cluster.version}/{cluster.name}")
    hba = [line.split() for line in (conf_dir / "pg_hba.conf").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    assert all(rule[-1] != "trust" for rule in hba)
    assert ["local", "all", "postgres", "peer"] in hba
    assert ["hostssl", "sameuser", "all", "127.0.0.1/32", "scram-sha-256"] in hba
    assert ["hostssl", "all", ADMIN_ROLE, "127.0.0.1/32", "scram-sha-256"] in hba
    assert {rule[-1] for rule in hba} <= {"peer", "scram-sha-256", "reject"}

    # tenantctl: a config of the test's own, whose new region's one server is the
    # Ansible-made cluster; the catalog in a private database of the test fleet.
    pgpass = tmp_path / "pgpass"
    localfleet.ensure_pgpass_entry(pgpass, cluster.port, ADMIN_ROLE, cluster.admin_password)
    admin_dsn = (f"postgresql://{ADMIN_ROLE}@127.0.0.1:{cluster.port}/postgres"
                 f"?passfile={pgpass}&sslmode=require")
    catalog_db = f"tenantctl_catalog_{uuid.uuid4().hex[:8]}"
    write_key_file(tmp_path / "master.key")
    config = tmp_path / "tenantctl.toml"
    config.write_text("\n".join([
        "[catalog]", f'dsn = "{with_dbname(test_fleet.admin_dsn("eu-central-1"), catalog_db)}"',
        "[master_key]", f'file = "{tmp_path / "master.key"}"',
        "[regions.ansible-test]", f'backup_store = "file://{tmp_path / "backups"}"',
        "[[regions.ansible-test.servers]]", 'name = "ansible-test-1"',
        f'admin_dsn = "{admin_dsn}"', "capacity = 10", ""]))
    try:
        res = _tenantctl(config, "catalog", "upgrade", "--json")
        assert res.returncode == 0, res.stderr
        assert "server ansible-test-1: added to ansible-test" in json.loads(res.stdout)["topology"]

        dsns = {}
        for slug in ("ans_alpha", "ans_beta"):
            res = _tenantctl(config, "tenant", "create", slug, "--region", "ansible-test",
                             "--json")
            assert res.returncode == 0, res.stderr
            created = json.loads(res.stdout)
            assert created["server"] == "ansible-test-1" and created["state"] == "active"
            dsns[slug] = created["dsn"]

        # A tenant reaches its own database, over TLS ...
        with connect_as(dsns["ans_alpha"]) as conn:
            user, db, ssl = conn.execute(
                "SELECT current_user, current_database(), ssl FROM pg_stat_ssl "
                "WHERE pid = pg_backend_pid()").fetchone()  # type: ignore[misc]
            assert (user, db, ssl) == ("tenant_ans_alpha", "tenant_ans_alpha", True)
            conn.execute("INSERT INTO products (sku, name, unit_price) "
                         "VALUES ('a-1', 'widget', 1)")
        # ... and no other: not another tenant's, not the maintenance databases.
        for other in ("tenant_ans_beta", "postgres", "template1", "tenantctl_template"):
            with pytest.raises(psycopg.OperationalError):
                connect_as(with_dbname(dsns["ans_alpha"], other)).close()
        # Not without TLS either, even to its own database.
        with pytest.raises(psycopg.OperationalError, match="no encryption"):
            connect_as(dsns["ans_alpha"].replace("sslmode=require", "sslmode=disable")).close()

        # The admin role: CREATEDB, CREATEROLE and REPLICATION (tenant moves), not a
        # superuser; the tuning applied, logical WAL for moves included.
        with connect_as(admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
                "FROM pg_roles WHERE rolname = current_user").fetchone()
            assert row == (False, True, True, True, False)
            settings = dict(conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('shared_buffers', "
                "'max_connections', 'autovacuum_naptime', 'password_encryption', 'ssl', "
                "'port', 'wal_level', 'max_replication_slots', 'max_wal_senders')"
            ).fetchall())
            assert (settings["wal_level"], settings["max_replication_slots"],
                    settings["max_wal_senders"]) == ("logical", "20", "20")
            if conn.info.server_version >= 160000:
                assert conn.execute("SELECT pg_has_role('pg_create_subscription', 'USAGE')"
                                    ).fetchone() == (True,)
        expected_mb = max(min(int(cluster.memtotal_mb * 0.01), 16384), 128)
        assert int(settings["shared_buffers"]) * 8 // 1024 == expected_mb  # 8 kB pages
        assert settings["max_connections"] == "100"
        assert settings["autovacuum_naptime"] == "300"
        assert settings["password_encryption"] == "scram-sha-256"
        assert settings["ssl"] == "on" and settings["port"] == str(cluster.port)
        # The admin bounds tenants' temp files (temp_file_limit is superuser-only) and,
        # from 16 on, has connections of its own that tenants cannot take.
        with connect_as(admin_dsn, autocommit=True) as conn:
            version = conn.info.server_version
            assert conn.execute("SELECT has_parameter_privilege('temp_file_limit', 'SET')"
                                ).fetchone() == (True,)
            if version >= 160000:
                assert conn.execute(
                    "SELECT current_setting('reserved_connections')::int, "
                    "pg_has_role('pg_use_reserved_connections', 'USAGE')").fetchone() == (10, True)
        with connect_as(dsns["ans_alpha"]) as conn:
            assert conn.execute("SHOW temp_file_limit").fetchone() == ("1GB",)
        res = _tenantctl(config, "doctor", "--json")
        findings = json.loads(res.stdout)["findings"]
        reserve = [x for x in findings if x["code"] == "server-reserve-missing"]
        assert (reserve == []) == (version >= 160000), reserve
        # the role set up logical WAL and the admin's REPLICATION: before 16 only the
        # version keeps tenant moves from the logical method, and doctor says so
        logical = [x for x in findings if x["code"] == "server-no-logical-moves"]
        assert (logical == []) == (version >= 160000), logical
        if logical:
            assert logical[0]["severity"] == "info"
            assert f"(Postgres {version // 10000} < 16)" in logical[0]["message"]
        check = _tenantctl(config, "config", "check", "--json")
        assert check.returncode == 0, check.stderr
        assert [v["ready"] for v in json.loads(check.stdout)["logical_moves"].values()] == \
            [version >= 160000]

        # The role's PgBouncer: tenantctl told about it writes its files, and a tenant
        # reaches its database through it, with its own password, over TLS both ways.
        pooler_pw = tmp_path / "pooler.password"
        pooler_pw.write_text(cluster.pooler_password + "\n")
        pooler_pw.chmod(0o600)
        pooled = tmp_path / "pooled.toml"
        pooled.write_text(config.read_text() + "\n".join([
            'pooler = "pgbouncer"', 'pooler_host = "127.0.0.1"',
            f"pooler_port = {cluster.pooler_port}", f'pooler_dir = "{cluster.pooler_dir}"',
            f'pooler_admin_password_file = "{pooler_pw}"', ""]))
        res = _tenantctl(pooled, "tenant", "create", "ans_pooled", "--region", "ansible-test",
                         "--json")
        assert res.returncode == 0, res.stderr
        created = json.loads(res.stdout)
        assert created["warnings"] == [], created["warnings"]
        assert f":{cluster.pooler_port}/" in created["dsn"]
        with connect_as(created["dsn"]) as conn:
            user, ssl = conn.execute(
                "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()  # type: ignore[misc]
            assert (user, ssl) == ("tenant_ans_pooled", True)
            assert conn.info.pgconn.ssl_in_use  # client to PgBouncer
        assert (cluster.pooler_dir / "userlist.txt").stat().st_uid == \
            (cluster.pooler_dir).stat().st_uid  # PgBouncer's user (postgres) owns it
    finally:
        with psycopg.connect(test_fleet.admin_dsn("eu-central-1"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{catalog_db}" WITH (FORCE)')
