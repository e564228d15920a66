"""Keys and secrets (issue 20): what reaches the processes tenantctl starts, a
master key that is not the fleet's, what the audit log keeps of typed text, the
break-glass key export, and a server that is not this fleet's."""

from __future__ import annotations

import os
import re
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from orchestrator import localfleet, pgserver
from orchestrator.childenv import ALLOWED, ALLOWED_PREFIXES, child_env
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
    real = localfleet.embedded_bin_dir()
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
