"""Keys and secrets (issue 20): what reaches the processes tenantctl starts, a
master key that is not the fleet's, what the audit log keeps of typed text, the
break-glass key export, and a server that is not this fleet's."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import delete, select, update

from orchestrator.adapters.catalog import audit
from orchestrator.adapters.catalog.models import AuditEvent, FleetSetting, Tenant, TenantKey
from orchestrator.adapters.crypto import tenant_keys as keys
from orchestrator.adapters.crypto.masterkey import load_master_key, write_key_file
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import pgtools
from orchestrator.adapters.postgres.childenv import ALLOWED, ALLOWED_PREFIXES, child_env
from orchestrator.config import MasterKeySource
from orchestrator.devfleet import localfleet
from tests.conftest import OwnCatalog, PgFleet, run_cli

KEY_ENV = "TENANTCTL_MASTER_KEY"
# what libpq needs for the one connection a client tool makes
PG_VARS = set(pgserver.LIBPQ_ENV.values()) | {"PGAPPNAME", "PGOPTIONS"}


def _allowed(name: str) -> bool:
    return name in ALLOWED or name.startswith(ALLOWED_PREFIXES) or name in PG_VARS


# -- the environment of child processes ----------------------------------------------


def test_child_env_is_an_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "bWFzdGVyLWtleS1tYXRlcmlhbA==")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    monkeypatch.setenv("PGSERVICE", "someone-elses")
    monkeypatch.setenv("LC_TIME", "C")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = pgserver.libpq_env("host=127.0.0.1 port=5 user=u password=pw dbname=d")
    assert KEY_ENV not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert "PGSERVICE" not in env
    assert env["PATH"] == "/usr/bin:/bin" and env["LC_TIME"] == "C"
    assert env["PGPASSWORD"] == "pw" and env["PGHOST"] == "127.0.0.1"
    assert all(_allowed(k) for k in env), sorted(env)
    assert KEY_ENV not in child_env() and child_env({"X": "1"})["X"] == "1"


def test_passfile_env_moves_the_password_out_and_removes_the_file() -> None:
    env = {"PATH": "/bin", "PGUSER": "u", "PGPASSWORD": "p:w\\d"}
    with pgserver.passfile_env(env) as out:
        assert "PGPASSWORD" not in out and "p:w" not in repr(out)
        path = Path(out["PGPASSFILE"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == "*:*:*:*:p\\:w\\\\d\n"
    assert not path.exists()
    with pgserver.passfile_env({"PGUSER": "u"}) as out:
        assert out == {"PGUSER": "u"}


@dataclass
class EnvKeyed:
    config: Path
    key: str
    env_log: Path
    own: OwnCatalog


def _env_wrappers(wrap_dir: Path, log: Path) -> None:
    """A wrapper per client tool: record the environment it was given (exactly: the
    shell's own /proc environ, before the shell adds anything), then exec the tool."""
    real = pgtools.embedded_bin_dir()
    wrap_dir.mkdir()
    for tool in sorted(real.iterdir()):
        if not (tool.is_file() and os.access(tool, os.X_OK)):
            continue
        script = wrap_dir / tool.name
        script.write_text(
            "#!/bin/sh\n"
            f"{{ echo \"EXEC {tool.name}\"; tr '\\0' '\\n' < /proc/$$/environ; }} "
            f">> {shlex.quote(str(log))}\n"
            f"exec {shlex.quote(str(tool))} \"$@\"\n")
        script.chmod(0o755)


@pytest.fixture
def env_keyed(test_fleet: PgFleet, own_catalog: OwnCatalog, tmp_path: Path) -> EnvKeyed:
    """The own catalog's fleet with its master key given through `[master_key] env`
    and client tools that record their environment."""
    key_file = test_fleet.state_dir / "master.key"
    text = own_catalog.config_path.read_text()
    assert f'file = "{key_file}"' in text
    log = tmp_path / "env.log"
    _env_wrappers(tmp_path / "bin", log)
    config = tmp_path / "env-keyed.toml"
    config.write_text(f'pg_bin_dir = "{tmp_path / "bin"}"\n'
                      + text.replace(f'file = "{key_file}"', f'env = "{KEY_ENV}"'))
    return EnvKeyed(config, key_file.read_text().strip(), log, own_catalog)


def _envs(log: Path, tool: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for line in log.read_text().splitlines():
        if line.startswith("EXEC "):
            out.append({}) if line == f"EXEC {tool}" else out.append({"#other": "1"})
        elif out and "=" in line:
            k, v = line.split("=", 1)
            out[-1][k] = v
    return [e for e in out if "#other" not in e]


def test_psql_shell_escape_sees_no_master_key_and_no_password(
        test_fleet: PgFleet, env_keyed: EnvKeyed, slug: str) -> None:
    res = env_keyed.own.fleet.provision(slug, "eu-central")
    password = str(conninfo_to_dict(res.dsn)["password"])
    admin_passwords = [line.rsplit(":", 1)[1] for line in
                       (test_fleet.state_dir / "pgpass").read_text().splitlines()]
    env = {KEY_ENV: env_keyed.key, "AWS_SECRET_ACCESS_KEY": "aws-secret-value"}
    for extra in ([], ["--owner"]):
        proc = run_cli(test_fleet, "tenant", "psql", slug, *extra, "-c", "\\! env",
                       config=env_keyed.config, env=env)
        assert proc.returncode == 0, proc.stderr
        shown = proc.stdout + proc.stderr
        assert "PATH=" in shown  # the shell escape did run and print its environment
        assert KEY_ENV not in shown and env_keyed.key not in shown
        assert "PGPASSWORD" not in shown and password not in shown
        assert "aws-secret-value" not in shown
        assert not any(p in shown for p in admin_passwords)
        # psql itself got the allow-list, and its password file is gone
        psql_env = _envs(env_keyed.env_log, "psql")[-1]
        assert all(_allowed(k) for k in psql_env), sorted(psql_env)
        assert not Path(psql_env["PGPASSFILE"]).exists() or extra
    who = run_cli(test_fleet, "tenant", "psql", slug, "-c", "SELECT current_user",
                  config=env_keyed.config, env=env)
    assert who.returncode == 0 and f"tenant_{slug}" in who.stdout, who.stderr


def test_pg_dump_gets_the_allow_list(test_fleet: PgFleet, env_keyed: EnvKeyed,
                                     slug: str) -> None:
    env_keyed.own.fleet.provision(slug, "eu-central")
    proc = run_cli(test_fleet, "backup", "run", slug, config=env_keyed.config,
                   env={KEY_ENV: env_keyed.key, "AWS_SECRET_ACCESS_KEY": "aws-secret-value"})
    assert proc.returncode == 0, proc.stderr
    dumps = _envs(env_keyed.env_log, "pg_dump")
    assert dumps
    for env in dumps:
        assert KEY_ENV not in env and "AWS_SECRET_ACCESS_KEY" not in env
        assert all(_allowed(k) for k in env), sorted(env)
        assert env_keyed.key not in "\n".join(env.values())


# -- a master key that is not the fleet's ---------------------------------------------


def test_fleet_key_elsewhere_decides_from_record_then_secrets() -> None:
    assert keys.fleet_key_elsewhere("a", "a", {"b": 3}) is None  # recorded wins
    assert keys.fleet_key_elsewhere("a", "b", {}) == "b"
    assert keys.fleet_key_elsewhere("a", None, {}) is None  # a fresh catalog adopts
    assert keys.fleet_key_elsewhere("a", None, {"a": 1, "b": 5}) is None
    assert keys.fleet_key_elsewhere("a", None, {"b": 5, "c": 1}) == "b"
    assert keys.mixed_key_ids({"a": 2}) is None
    assert "a (2), b (1)" in str(keys.mixed_key_ids({"b": 1, "a": 2}))


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def _stray_config(own: OwnCatalog, test_fleet: PgFleet, tmp_path: Path) -> tuple[Path, Path]:
    stray = tmp_path / "stray.key"
    write_key_file(stray)
    config = tmp_path / "stray.toml"
    config.write_text(own.config_path.read_text().replace(
        str(test_fleet.state_dir / "master.key"), str(stray)))
    return config, stray


def test_a_stray_master_key_wraps_nothing(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                          tmp_path: Path, slug: str) -> None:
    own = own_catalog
    fleet_key = own.fleet.master_key.key_id
    with own.fleet.catalog.session() as s:
        assert keys.catalog_key_id(s) is None  # a fresh catalog has adopted no key yet
    dsn = own.fleet.provision(slug, "eu-central").dsn
    with own.fleet.catalog.session() as s:
        assert keys.catalog_key_id(s) == fleet_key  # the first wrap adopted it
    stray_cfg, stray = _stray_config(own, test_fleet, tmp_path)
    stray_id = load_master_key(MasterKeySource(file=stray)).key_id

    _one_line_error(run_cli(test_fleet, "config", "check", config=stray_cfg), 7,
                    stray_id, fleet_key, "not this fleet's")
    ok = run_cli(test_fleet, "config", "check", config=own.config_path)
    assert ok.returncode == 0 and "the fleet's master key" in ok.stdout, ok.stderr
    # every write that would wrap a secret under the stray key is refused, unchanged
    _one_line_error(run_cli(test_fleet, "tenant", "create", f"{slug}_x", "--region",
                            "eu-central", config=stray_cfg), 7, "not this fleet's")
    assert own.fleet.find_tenant(f"{slug}_x") is None
    _one_line_error(run_cli(test_fleet, "tenant", "credentials", slug, "--rotate",
                            config=stray_cfg), 7, "not this fleet's")
    assert own.fleet.credentials(slug) == dsn
    tenant = own.fleet.get_tenant(slug)
    with own.fleet.catalog.session() as s, s.begin():  # a tenant that predates keys
        s.execute(delete(TenantKey).where(TenantKey.tenant_id == tenant.id))
    _one_line_error(run_cli(test_fleet, "backup", "run", slug, config=stray_cfg), 7,
                    "not this fleet's")
    with own.fleet.catalog.session() as s:
        assert s.get(TenantKey, tenant.id) is None
        assert keys.wrapped_key_ids(s) == {fleet_key: 1}
    # doctor says so too, and the right key still works
    found = run_cli(test_fleet, "doctor", "--json", config=stray_cfg)
    codes = {x["code"] for x in json.loads(found.stdout)["findings"]}
    assert found.returncode == 14 and "master-key-not-fleets" in codes, found.stdout
    assert run_cli(test_fleet, "backup", "run", slug, config=own.config_path).returncode == 0


def test_mixed_key_ids_are_reported_and_the_remedy_works(
        test_fleet: PgFleet, own_catalog: OwnCatalog, tmp_path: Path, slug: str) -> None:
    own = own_catalog
    fleet_key = own.fleet.master_key.key_id
    own.fleet.provision(slug, "eu-central")
    own.fleet.provision(f"{slug}_b", "eu-central")
    stray_cfg, stray = _stray_config(own, test_fleet, tmp_path)
    stray_key = load_master_key(MasterKeySource(file=stray))
    # what an older tenantctl let happen: one secret wrapped under the stray key
    b = own.fleet.get_tenant(f"{slug}_b")
    with own.fleet.catalog.session() as s, s.begin():
        s.execute(delete(TenantKey).where(TenantKey.tenant_id == b.id))
        s.add(keys.new_key(stray_key, b.id, b.slug))
    check = run_cli(test_fleet, "config", "check", config=own.config_path)
    assert check.returncode == 0, check.stderr
    assert "warning: stored secrets are wrapped by 2 master keys" in check.stderr
    assert f"{fleet_key} (3)" in check.stderr and f"{stray_key.key_id} (1)" in check.stderr
    found = run_cli(test_fleet, "doctor", "--json", config=own.config_path)
    mixed = [x for x in json.loads(found.stdout)["findings"] if x["code"] == "master-key-mixed"]
    assert found.returncode == 14 and mixed, found.stdout
    # the remedy doctor gives: the stray key configured for one rotate to the fleet's
    fixed = run_cli(test_fleet, "keys", "rotate-master", "--new-key-file",
                    str(test_fleet.state_dir / "master.key"), "--json", "--yes",
                    config=stray_cfg)
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["identities"] == 1
    with own.fleet.catalog.session() as s:
        assert keys.wrapped_key_ids(s) == {fleet_key: 4}
        assert keys.catalog_key_id(s) == fleet_key
    after = run_cli(test_fleet, "doctor", "--json", config=own.config_path)
    assert not {x["code"] for x in json.loads(after.stdout)["findings"]
                if x["code"].startswith("master-key")}, after.stdout


def test_rotate_master_makes_the_new_key_the_fleets(
        test_fleet: PgFleet, own_catalog: OwnCatalog, tmp_path: Path, slug: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, "eu-central")
    new_cfg, new = _stray_config(own, test_fleet, tmp_path)
    new_id = load_master_key(MasterKeySource(file=new)).key_id
    rotated = run_cli(test_fleet, "keys", "rotate-master", "--new-key-file", str(new),
                      "--yes", config=own.config_path)
    assert rotated.returncode == 0, rotated.stderr
    # the old key is now the stray one: it wraps nothing more
    _one_line_error(run_cli(test_fleet, "tenant", "create", f"{slug}_x", "--region",
                            "eu-central", config=own.config_path), 7, new_id)
    made = run_cli(test_fleet, "tenant", "create", f"{slug}_y", "--region", "eu-central",
                   config=new_cfg)
    assert made.returncode == 0, made.stderr


# -- what the audit log keeps of typed text, and reasons ------------------------------

AGE_KEY = "AGE-SECRET-KEY-1QYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQSZQGPQYQS"


@pytest.mark.parametrize(("text", "secret"), [
    ("select 1 where password = s3cr3t", "s3cr3t"),
    ("SET password='s3cr3t x'", "s3cr3t x"),
    ("ALTER ROLE tenant_a PASSWORD 'it''s-Hunter2'", "Hunter2"),
    ("create role r login encrypted password E'Hunter2\\'x'", "Hunter2"),
    ("alter role r password $q$Hunter2$q$", "Hunter2"),
    (f"select '{AGE_KEY}'", AGE_KEY[16:]),
    ("\\! psql postgresql://u:Hunter2@h/d", "Hunter2"),
    ("host=h PGPASSWORD=Hunter2 psql", "Hunter2"),
    ('{"password": "Hunter2"}', "Hunter2"),
    ("alter role r password 'SCRAM-SHA-256$4096:abc$def:ghi'", "4096:abc"),
])
def test_redact_text_removes_secrets(text: str, secret: str) -> None:
    out = audit.redact_text(text)
    assert secret not in out and "[redacted]" in out, out


def test_redact_text_keeps_plain_text() -> None:
    for text in ("select count(*) from products", "\\password", "SELECT 'no secret'"):
        assert audit.redact_text(text) == text


def test_psql_command_is_audited_redacted(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                          slug: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, "eu-central")
    command = (f"select 'password = s3cr3t-{slug}', '{AGE_KEY}'; "
               f"alter role tenant_{slug} password 'Hunter2-{slug}'")
    run_cli(test_fleet, "tenant", "psql", slug, "-c", command, config=own.config_path)
    with own.fleet.catalog.session() as s:
        stored = [e.detail["command"] for e in s.scalars(
            select(AuditEvent).where(AuditEvent.action == "tenant.psql",
                                     AuditEvent.tenant == slug))]
    assert len(stored) == 1
    assert f"s3cr3t-{slug}" not in stored[0] and f"Hunter2-{slug}" not in stored[0]
    assert AGE_KEY[16:] not in stored[0] and "select" in stored[0]


def test_reason_is_bounded_printable_and_shown_escaped(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, "eu-central")
    cfg = own.config_path
    for bad in ("x" * 100_000, "ok\x1b]0;pwned\x07", "two\nlines", "\x1b[2J"):
        for args in (["tenant", "legal-hold", slug, "--on", "--reason", bad],
                     ["access", "grant", slug, "--to", "sam", "--ttl", "1h", "--reason", bad],
                     ["tenant", "erase", slug, "--yes", "--reason", bad]):
            _one_line_error(run_cli(test_fleet, *args, config=cfg), 2, "--reason")
    t = own.fleet.get_tenant(slug)
    assert not t.legal_hold and t.state == "active"
    assert run_cli(test_fleet, "tenant", "legal-hold", slug, "--on", "--reason",
                   "ticket 42 — ok", config=cfg).returncode == 0
    # a reason stored before these checks (or by hand) is shown escaped, never raw
    with own.fleet.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.slug == slug)
                  .values(legal_hold_reason="a\x1b]0;title\x07b\x1b[2J"))
    for args in (["tenant", "show", slug], ["retention", "status"]):
        shown = run_cli(test_fleet, *args, config=cfg)
        assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout, shown.stdout
    assert "\\x1b]0;title" in run_cli(test_fleet, "tenant", "show", slug, config=cfg).stdout
    with own.fleet.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.slug == slug)
                  .values(legal_hold=False, legal_hold_reason=None))


# -- the break-glass key export --------------------------------------------------------


def test_key_export_output_is_created_private(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                              tmp_path: Path, slug: str) -> None:
    own = own_catalog
    own.fleet.provision(slug, "eu-central")
    cfg = own.config_path
    path = tmp_path / "key.txt"
    made = run_cli(test_fleet, "backup", "key", "export", slug, "--output", str(path),
                   config=cfg)
    assert made.returncode == 0, made.stderr
    text = path.read_text()
    assert text.startswith("AGE-SECRET-KEY-1") and text.strip() not in made.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # never overwritten by accident: one line, exit 4, the file as it was
    path.write_text("keep me\n")
    path.chmod(0o644)
    _one_line_error(run_cli(test_fleet, "backup", "key", "export", slug, "--output",
                            str(path), config=cfg), 4, "--force")
    assert path.read_text() == "keep me\n"
    # --force replaces it, and the old (wide) mode does not carry over
    forced = run_cli(test_fleet, "backup", "key", "export", slug, "--output", str(path),
                     "--force", config=cfg)
    assert forced.returncode == 0, forced.stderr
    assert path.read_text() == text and stat.S_IMODE(path.stat().st_mode) == 0o600
    # - is stdout; an unknown tenant leaves no file behind
    assert run_cli(test_fleet, "backup", "key", "export", slug, "--output", "-",
                   config=cfg).stdout == text
    missing = tmp_path / "none.txt"
    assert run_cli(test_fleet, "backup", "key", "export", "nosuchtenant", "--output",
                   str(missing), config=cfg).returncode == 3
    assert not missing.exists()


# -- a server that is not this fleet's ----------------------------------------------


def test_servers_carry_the_fleet_identity(test_fleet: PgFleet, own_catalog: OwnCatalog) -> None:
    own = own_catalog
    up = run_cli(test_fleet, "catalog", "upgrade", config=own.config_path)
    assert up.returncode == 0, up.stderr
    fleet_id = own.fleet.catalog.fleet_id()
    assert fleet_id
    for server in ("eu-central-1", "eu-central-2", "ap-south-1"):
        with psycopg.connect(test_fleet.admin_dsn(server)) as conn:
            assert pgserver.server_fleet_id(conn) == fleet_id
    ok = run_cli(test_fleet, "config", "check", config=own.config_path)
    assert ok.returncode == 0, ok.stderr
    # the same servers seen by a catalog of another fleet: not its servers
    with own.fleet.catalog.session() as s, s.begin():
        s.execute(update(FleetSetting).where(FleetSetting.key == "fleet_id")
                  .values(value="0123456789abcdef"))
    try:
        _one_line_error(run_cli(test_fleet, "config", "check", config=own.config_path), 6,
                        "not this fleet's server", fleet_id, "0123456789abcdef")
        found = run_cli(test_fleet, "doctor", "--json", config=own.config_path)
        bad = {x["subject"] for x in json.loads(found.stdout)["findings"]
               if x["code"] == "server-not-this-fleets"}
        assert found.returncode == 14 and "eu-central-1" in " ".join(bad), found.stdout
    finally:
        with own.fleet.catalog.session() as s, s.begin():
            s.execute(update(FleetSetting).where(FleetSetting.key == "fleet_id")
                      .values(value=fleet_id))
    again = run_cli(test_fleet, "doctor", "--json", config=own.config_path)
    assert "server-not-this-fleets" not in again.stdout


def test_refused_password_where_our_cluster_is_not_running(
        test_fleet: PgFleet, tmp_path: Path) -> None:
    """Another cluster took the port of this fleet's (stopped) embedded cluster: the
    error says so instead of only "password authentication failed"."""
    if test_fleet.external:
        pytest.skip("needs the embedded clusters")
    port = test_fleet.ports["eu-central-1"]
    wrong = tmp_path / "pgpass"
    localfleet.ensure_pgpass_entry(wrong, port, "tenantctl_admin", "not-the-password-0123")
    wrong.chmod(0o600)
    text = test_fleet.config_path.read_text().replace(
        str(test_fleet.state_dir / "pgpass"), str(wrong)).replace(
        str(test_fleet.state_dir / "pg" / "eu-central-1"), str(tmp_path / "not-running"))
    config = tmp_path / "other.toml"
    config.write_text(text)
    _one_line_error(run_cli(test_fleet, "tenant", "list", config=config), 6,
                    f"the server at 127.0.0.1:{port} is not this fleet's server",
                    "not running")
    # where it cannot be told (the cluster there is ours and runs): today's message
    # and a hint
    text2 = test_fleet.config_path.read_text().replace(
        str(test_fleet.state_dir / "pgpass"), str(wrong))
    config2 = tmp_path / "wrongpw.toml"
    config2.write_text(text2)
    _one_line_error(run_cli(test_fleet, "tenant", "list", config=config2), 6,
                    "password authentication failed", "not this fleet's server")
