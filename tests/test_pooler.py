"""The pooler (PgBouncer) on real clusters: a local fleet of its own with a PgBouncer
beside each cluster, as `tenantctl init --local` makes it when pgbouncer is
installed. Auth through the pooler with the tenant's own password, the new
password at once after a rotation, suspended tenants refused (cancelled ones read) at
the pooler, a pooler that is down (provisioning goes on with a warning, doctor
reports it, --fix re-syncs), the files' mode and contents."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from orchestrator.adapters.catalog.db import Catalog
from orchestrator.config import Config, ServerConfig, load_config
from orchestrator.devfleet import localfleet
from orchestrator.domain.errors import TenantctlError
from orchestrator.domain.pooler import AUTH_FILE, DATABASES_FILE, password_verifier
from tests.conftest import REPO, TENANTCTL

pytestmark = [
    pytest.mark.pg,  # starts clusters of its own
    pytest.mark.skipif(localfleet.pgbouncer_binary() is None,
                       reason="pgbouncer is not installed (Debian: apt-get install "
                              "pgbouncer); the pooler tests need the real binary"),
]


@dataclass
class PooledFleet:
    state: Path
    config: Path

    def cfg(self) -> Config:
        return load_config(self.config)

    def server(self, name: str = "eu-central-1") -> ServerConfig:
        return self.cfg().server(name)

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "TENANTCTL_CONFIG"}
        return subprocess.run([*TENANTCTL, "--config", str(self.config), *args],
                              capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=timeout)


@pytest.fixture(scope="module")
def pooled() -> Iterator[PooledFleet]:
    state = Path(tempfile.mkdtemp(prefix="tenantctl-pooler-", dir="/tmp"))
    os.chmod(state, 0o755)
    cfg = None
    try:
        base = next(p for p in range(61000 + random.randrange(0, 3000, 10), 64900, 10)
                    if all(localfleet._port_free(q) for q in range(p, p + 4)))
        res = localfleet.init_local(state / "tenantctl.toml", state, base_port=base,
                                    pooler=True)
        text = res.config_path.read_text().replace("\nspare_databases = 2 ",
                                                   "\nspare_databases = 0 ", 1)
        # a plan with a pool size: the pooler's entry carries it
        text = text.replace("\n[regions.", "\n[plans.small]\npool_size = 3\n\n[regions.", 1)
        res.config_path.write_text(text)
        cfg = load_config(res.config_path)
        assert all(s.pooler is not None for s in cfg.servers)
        lines = list(localfleet.up(cfg))
        assert any("pooler started" in ln for ln in lines), lines
        catalog = Catalog(cfg)
        catalog.upgrade()
        catalog.sync_topology()
        catalog.dispose()
        yield PooledFleet(state, res.config_path)
    finally:
        if cfg is not None:
            list(localfleet.down(cfg))
        shutil.rmtree(state, ignore_errors=True)


def _create(pooled: PooledFleet, slug: str, *extra: str) -> dict[str, object]:
    proc = pooled.cli("tenant", "create", slug, "--region", "eu-central", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def _who(dsn: str) -> tuple[str, str, int]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT current_user, current_database(), "
                           "inet_server_port()").fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def _refused(dsn: str) -> str:
    with pytest.raises(psycopg.OperationalError) as exc:
        psycopg.connect(dsn, connect_timeout=5).close()
    return str(exc.value)


def _password(dsn: str) -> str:
    return urlsplit(dsn).password or ""


def test_tenant_connects_through_the_pooler_with_its_own_password(
        pooled: PooledFleet) -> None:
    server = pooled.server()
    assert server.pooler is not None
    res = _create(pooled, "poolacme", "--plan", "small")
    dsn, direct = str(res["dsn"]), str(res["direct_dsn"])
    assert res["warnings"] == []
    assert urlsplit(dsn).port == server.pooler.port
    assert urlsplit(direct).port == server.port
    # through PgBouncer, as the tenant's own role, on the real server
    assert _who(dsn) == ("tenant_poolacme", "tenant_poolacme", server.port)
    assert _who(direct) == ("tenant_poolacme", "tenant_poolacme", server.port)
    # a wrong password is refused by the pooler itself
    wrong = dsn.replace(_password(dsn), "not-the-password")
    assert "SASL authentication failed" in _refused(wrong)  # PgBouncer's words
    listed = (server.pooler.dir / DATABASES_FILE).read_text()
    assert (f"tenant_poolacme = host=127.0.0.1 port={server.port} dbname=tenant_poolacme "
            "pool_size=3 max_db_connections=3") in listed
    # `tenant credentials` hands out the pooled string, --direct the server's
    shown = pooled.cli("tenant", "credentials", "poolacme")
    assert shown.returncode == 0 and shown.stdout.strip() == dsn, shown.stderr
    shown = pooled.cli("tenant", "credentials", "poolacme", "--direct")
    assert shown.returncode == 0 and shown.stdout.strip() == direct, shown.stderr
    # the tenant's database only: another tenant's name through the pooler is refused
    other = _create(pooled, "poolother")
    cross = dsn.rsplit("/", 1)[0] + "/tenant_poolother"
    assert _refused(cross)
    assert _who(str(other["dsn"]))[0] == "tenant_poolother"


def test_a_rotated_password_reaches_the_pooler_at_once(pooled: PooledFleet) -> None:
    old = str(_create(pooled, "poolrot")["dsn"])
    assert _who(old)[0] == "tenant_poolrot"
    rotated = pooled.cli("tenant", "credentials", "poolrot", "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert _password(new) != _password(old) and urlsplit(new).port == urlsplit(old).port
    assert "SASL authentication failed" in _refused(old)  # PgBouncer's words
    assert _who(new)[0] == "tenant_poolrot"


def test_suspended_tenants_are_refused_at_the_pooler_cancelled_ones_only_read(
        pooled: PooledFleet) -> None:
    server = pooled.server()
    assert server.pooler is not None
    dsn = str(_create(pooled, "poolsusp")["dsn"])
    open_session = psycopg.connect(dsn, connect_timeout=5, autocommit=True)
    try:
        assert open_session.execute("SELECT 1").fetchone() == (1,)
        assert pooled.cli("tenant", "suspend", "poolsusp").returncode == 0
        # off both files: PgBouncer refuses it as it refuses an unknown user
        for name in (DATABASES_FILE, AUTH_FILE):
            assert "tenant_poolsusp" not in (server.pooler.dir / name).read_text()
        assert "SASL authentication failed" in _refused(dsn)
        # the pooled session open before the suspension is ended too
        with pytest.raises(psycopg.Error):
            open_session.execute("SELECT 1")
    finally:
        open_session.close()
    assert pooled.cli("tenant", "resume", "poolsusp").returncode == 0
    assert _who(dsn)[0] == "tenant_poolsusp"
    with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
        conn.execute("INSERT INTO suppliers (name) VALUES ('mine')")
    cancelled = pooled.cli("tenant", "cancel", "poolsusp", "--yes")
    assert cancelled.returncode == 0, cancelled.stderr
    # on hold: still listed, so it can export what it has through the pooler; the
    # server refuses its writes
    with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM suppliers WHERE name = 'mine'"
                            ).fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO suppliers (name) VALUES ('more')")
    assert pooled.cli("tenant", "reactivate", "poolsusp").returncode == 0
    assert _who(dsn)[0] == "tenant_poolsusp"


def test_pooler_files_are_private_and_hold_no_password(pooled: PooledFleet) -> None:
    server = pooled.server()
    assert server.pooler is not None
    dsn = str(_create(pooled, "poolfiles")["dsn"])
    password = _password(dsn)
    for name in (AUTH_FILE, DATABASES_FILE, "pgbouncer.ini"):
        mode = stat.S_IMODE((server.pooler.dir / name).stat().st_mode)
        assert mode == 0o600, f"{name}: {mode:o}"
    auth = (server.pooler.dir / AUTH_FILE).read_text()
    # the very verifier the role has on the server, never the password
    assert f'"tenant_poolfiles" "{password_verifier(password)}"\n' in auth
    assert all(ln.split('" "')[1].startswith("SCRAM-SHA-256$4096:")
               for ln in auth.splitlines())
    for path in pooled.state.rglob("*"):
        if path.is_file() and "pg" not in path.relative_to(pooled.state).parts[:1]:
            assert password.encode() not in path.read_bytes(), path
    # nothing left behind by the atomic writes
    assert not [p for p in server.pooler.dir.iterdir() if p.name.startswith(".userlist")]


def test_a_pooler_that_is_down_warns_then_doctor_reports_and_fixes_it(
        pooled: PooledFleet) -> None:
    server = pooled.server()
    assert server.pooler is not None
    stopped = localfleet._stop_pooler(server)
    assert stopped is not None and "stopped" in stopped
    try:
        proc = pooled.cli("tenant", "create", "pooldown", "--region", "eu-central",
                          "--json")
        assert proc.returncode == 0, proc.stderr
        res = json.loads(proc.stdout)
        assert len(res["warnings"]) == 1 and "pooler of eu-central-1" in res["warnings"][0]
        assert "warning: pooler of eu-central-1" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert _who(str(res["direct_dsn"]))[0] == "tenant_pooldown"
        doctor = pooled.cli("doctor", "--json")
        findings = {(x["code"], x["subject"]) for x in json.loads(doctor.stdout)["findings"]}
        assert ("pooler-down", "eu-central-1") in findings
        assert doctor.returncode != 0
        status = pooled.cli("pooler", "status", "eu-central-1", "--json")
        assert json.loads(status.stdout)[0]["up"] is False
    finally:
        started = localfleet._start_pooler(server, localfleet._os_user())
        assert "pooler started" in started
    # the files were written while it was down (only RELOAD failed): up again, it
    # reads them and admits the tenant made meanwhile
    assert _who(str(res["dsn"]))[0] == "tenant_pooldown"
    # files out of step with the catalog (a write lost): doctor says so, --fix re-syncs
    auth = server.pooler.dir / AUTH_FILE
    auth.write_text("".join(ln + "\n" for ln in auth.read_text().splitlines()
                            if "tenant_pooldown" not in ln))
    localfleet.pgbouncer.reload(server.pooler)
    assert "SASL authentication failed" in _refused(str(res["dsn"]))
    doctor = pooled.cli("doctor", "--json")
    findings = {(x["code"], x["subject"]) for x in json.loads(doctor.stdout)["findings"]}
    assert ("pooler-stale", "eu-central-1") in findings
    assert ("pooler-down", "eu-central-1") not in findings
    fixed = pooled.cli("doctor", "--fix", "--yes", "--json")
    fixes = {(x["code"], x["outcome"]) for x in json.loads(fixed.stdout)["fixes"]}
    assert ("pooler-stale", "fixed") in fixes
    assert _who(str(res["dsn"]))[0] == "tenant_pooldown"
    doctor = pooled.cli("doctor", "--json")
    assert not [x for x in json.loads(doctor.stdout)["findings"]
                if x["code"].startswith("pooler")]


def test_pooler_sync_and_bad_input(pooled: PooledFleet) -> None:
    synced = pooled.cli("pooler", "sync", "--json")
    assert synced.returncode == 0, synced.stderr
    assert {r["server"] for r in json.loads(synced.stdout)} == {"eu-central-1", "ap-south-1"}
    assert all(r["warning"] is None and r["reloaded"] for r in json.loads(synced.stdout))
    bad = pooled.cli("pooler", "sync", "nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "has no pooler" in bad.stderr


def test_a_pooler_whose_port_is_taken_says_why_at_once(pooled: PooledFleet) -> None:
    """PgBouncer -d exits 0 before its daemon binds; a daemon that cannot bind says so
    only in its log. `local up` reads it and says why, not "did not answer within 5 s"
    (what CI printed when an outgoing connection held a pooler's port)."""
    cfg = pooled.cfg()
    server = cfg.server("eu-central-1")
    assert server.pooler is not None
    port = server.pooler.port
    assert localfleet._stop_pooler(server) == "eu-central-1: pooler stopped"
    # another listener on the port (in CI it was an outgoing connection's local end;
    # PgBouncer's bind fails the same way; a client socket here could not bind past
    # the TIME_WAITs the stopped pooler's console sessions left)
    with socket.create_server(("127.0.0.1", port)), \
            pytest.raises(TenantctlError) as exc:
        list(localfleet.up(cfg))
    said = str(exc.value)
    assert said.startswith("the pooler of eu-central-1 could not start: cannot listen on "
                           f"127.0.0.1:{port}: bind(): Address already in use"), said
    assert "\n" not in said and "did not answer" not in said
    # the port free again, `local up` starts it
    assert "eu-central-1: pooler started on 127.0.0.1:" + str(port) in list(localfleet.up(cfg))
    assert localfleet.pgbouncer.version(server.pooler)
