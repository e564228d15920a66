"""Config and start-up (issue 18): where the config is found, environment overrides,
`--version`, `init --local --base-port/--no-start`, an edited local port, completion,
and the help of every command (examples, no `<bool>`, choices). No Postgres."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cli import complete
from cli.help import EXAMPLES
from cli.main import app
from orchestrator.adapters.crypto.masterkey import write_key_file
from orchestrator.config import (
    SYSTEM_CONFIG,
    EnvOverride,
    env_overrides,
    load_config,
    lookup_config_path,
    server_env_name,
)
from orchestrator.devfleet import localfleet
from orchestrator.domain.errors import ConfigError
from tests.conftest import REPO, TENANTCTL

CWD = Path("/work/here")
HOME = {"HOME": "/home/op"}
USER_CONFIG = Path("/home/op/.config/tenantctl/tenantctl.toml")


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("TENANTCTL_", "XDG_"))}
    return subprocess.run([*TENANTCTL, *args], cwd=cwd, capture_output=True, text=True,
                          env={**base, "PYTHONPATH": str(REPO), **(env or {})}, timeout=60)


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# -- lookup order (pure) ----------------------------------------------------------------


def test_lookup_order() -> None:
    def found(existing: set[Path], flag: str | None = None,
              env: dict[str, str] | None = None) -> tuple[Path | None, str]:
        res = lookup_config_path(flag, {**HOME, **(env or {})}, CWD, existing.__contains__)
        return res.path, res.source

    everything = {CWD / "tenantctl.toml", USER_CONFIG, SYSTEM_CONFIG}
    # --config and $TENANTCTL_CONFIG win even when the file is missing (said so later)
    assert found(everything, flag="/x.toml",
                 env={"TENANTCTL_CONFIG": "/y.toml"}) == (Path("/x.toml"), "flag")
    assert found(everything, env={"TENANTCTL_CONFIG": "/y.toml"}) == (Path("/y.toml"), "env")
    assert found(set(), env={"TENANTCTL_CONFIG": "/y.toml"}) == (Path("/y.toml"), "env")
    # then the first that exists: current directory, XDG (default ~/.config), /etc
    assert found(everything) == (CWD / "tenantctl.toml", "cwd")
    assert found({USER_CONFIG, SYSTEM_CONFIG}) == (USER_CONFIG, "xdg")
    assert found({SYSTEM_CONFIG}) == (SYSTEM_CONFIG, "system")
    xdg = Path("/srv/xdg/tenantctl/tenantctl.toml")
    assert found({xdg, USER_CONFIG}, env={"XDG_CONFIG_HOME": "/srv/xdg"}) == (xdg, "xdg")
    # a relative XDG_CONFIG_HOME is ignored (XDG spec): ~/.config again
    assert found({USER_CONFIG}, env={"XDG_CONFIG_HOME": "rel"}) == (USER_CONFIG, "xdg")
    none = lookup_config_path(None, HOME, CWD, lambda p: False)
    assert none.path is None
    assert none.tried == (CWD / "tenantctl.toml", USER_CONFIG, SYSTEM_CONFIG)
    # an empty $TENANTCTL_CONFIG is unset
    assert found({SYSTEM_CONFIG}, env={"TENANTCTL_CONFIG": ""}) == (SYSTEM_CONFIG, "system")


def _write_config(where: Path, *, catalog: str = "postgresql://admin@127.0.0.1:1/catalog"
                  ) -> Path:
    write_key_file(where / "master.key")
    path = where / "tenantctl.toml"
    path.write_text(f"""
[catalog]
dsn = "{catalog}"

[master_key]
file = "master.key"

[regions.eu-central]
backup_store = "file://{where}/backups"

[[regions.eu-central.servers]]
name = "eu-central-1"
admin_dsn = "postgresql://admin@127.0.0.1:1/postgres"
""")
    return path


def test_not_found_lists_where_it_looked_and_xdg_is_found_from_anywhere(
        tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"HOME": str(home)}
    proc = _cli("tenant", "list", cwd=elsewhere, env=env)
    _one_line_error(proc, 2, f"config file not found (looked in: {elsewhere}/tenantctl.toml, "
                    f"{home}/.config/tenantctl/tenantctl.toml, {SYSTEM_CONFIG})")
    if SYSTEM_CONFIG.exists():
        pytest.skip(f"{SYSTEM_CONFIG} exists on this machine")
    (home / ".config" / "tenantctl").mkdir(parents=True)
    _write_config(home / ".config" / "tenantctl")
    # found from any directory: the catalog (port 1) then refuses, a later error
    proc = _cli("tenant", "list", cwd=elsewhere, env=env)
    assert "config file not found" not in proc.stderr and "127.0.0.1" in proc.stderr
    check = _cli("config", "check", "--json", cwd=elsewhere, env=env)
    assert check.returncode == 0, check.stderr
    lookup = json.loads(check.stdout)["lookup"]
    assert lookup["source"] == "xdg"
    assert lookup["path"] == f"{home}/.config/tenantctl/tenantctl.toml"
    assert lookup["tried"] == [f"{elsewhere}/tenantctl.toml", lookup["path"],
                               str(SYSTEM_CONFIG)]
    text = _cli("config", "check", cwd=elsewhere, env=env)
    assert "found by the user's config directory" in text.stdout
    named = _cli("--config", str(tmp_path / "no.toml"), "tenant", "list", cwd=elsewhere)
    _one_line_error(named, 2, f"{tmp_path}/no.toml: config file not found (named by --config)")


def test_a_candidate_that_cannot_be_looked_at_is_chosen_and_said(tmp_path: Path) -> None:
    # e.g. /etc/tenantctl readable by root only: stat fails with another error than
    # "no such file"; the lookup stops there and the read says why (no traceback)
    unreadable = tmp_path / ("x" * 300) / "tenantctl.toml"  # ENAMETOOLONG
    with pytest.raises(ConfigError) as err:
        load_config(unreadable, {})
    assert str(err.value).startswith(f"{unreadable}: cannot read: ")


# -- environment overrides --------------------------------------------------------------


def test_env_overrides_replace_dsns_and_the_key_file(tmp_path: Path) -> None:
    path = _write_config(tmp_path)
    write_key_file(tmp_path / "other.key")
    env = {"TENANTCTL_CATALOG_DSN": "postgresql://admin:s3cret@db9:5433/cat",
           server_env_name("eu-central-1"): "host=db7 port=6432 user=admin password=pw7",
           "TENANTCTL_MASTER_KEY_FILE": str(tmp_path / "other.key"),
           "TENANTCTL_ACTOR": "not an override", "PATH": "/bin"}
    assert server_env_name("eu-central-1") == "TENANTCTL_SERVER_EU_CENTRAL_1_ADMIN_DSN"
    cfg = load_config(path, env)
    assert cfg.catalog_dsn == env["TENANTCTL_CATALOG_DSN"]
    assert cfg.server("eu-central-1").admin_dsn == env[server_env_name("eu-central-1")]
    assert cfg.master_key.file == tmp_path / "other.key"
    assert [(o.variable, o.key) for o in cfg.from_env] == [
        ("TENANTCTL_CATALOG_DSN", "catalog.dsn"),
        ("TENANTCTL_MASTER_KEY_FILE", "master_key.file"),
        ("TENANTCTL_SERVER_EU_CENTRAL_1_ADMIN_DSN", "servers.eu-central-1.admin_dsn")]
    # without the environment: the file's own values
    plain = load_config(path, {})
    assert plain.catalog_dsn.endswith(":1/catalog") and plain.from_env == ()

    # config check names the variables and never prints a password
    proc = _cli("config", "check", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr and "pw7" not in proc.stdout
    shown = {o["variable"]: o for o in json.loads(proc.stdout)["from_environment"]}
    assert shown["TENANTCTL_CATALOG_DSN"] == {
        "variable": "TENANTCTL_CATALOG_DSN", "key": "catalog.dsn",
        "value": "admin@db9:5433/cat"}
    assert shown["TENANTCTL_SERVER_EU_CENTRAL_1_ADMIN_DSN"]["value"] == "admin@db7:6432/"
    text = _cli("config", "check", cwd=tmp_path, env=env)
    assert "catalog.dsn from $TENANTCTL_CATALOG_DSN: admin@db9:5433/cat" in text.stdout
    assert "s3cret" not in text.stdout + text.stderr


def test_env_overrides_refused(tmp_path: Path) -> None:
    path = _write_config(tmp_path)
    for env, message in [
        ({"TENANTCTL_SERVER_NOPE_ADMIN_DSN": "host=x"},
         "$TENANTCTL_SERVER_NOPE_ADMIN_DSN: no server of"),
        ({"TENANTCTL_CATALOG_DSN": "host='unterminated password=s3cret"},
         "$TENANTCTL_CATALOG_DSN: not a valid libpq connection string"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(path, env)
        assert str(err.value).startswith(message), err.value
        assert "s3cret" not in str(err.value) and "\n" not in str(err.value)
    # the file's own DSN still may not hold a password, whatever the environment says
    text = path.read_text().replace("admin@127.0.0.1:1/catalog", "admin:pw@127.0.0.1:1/cat")
    path.write_text(text)
    with pytest.raises(ConfigError, match="catalog.dsn: must not contain a password"):
        load_config(path, {"TENANTCTL_CATALOG_DSN": "host=db9"})


def test_env_overrides_may_stand_in_for_missing_keys_and_names_must_not_collide(
        tmp_path: Path) -> None:
    path = _write_config(tmp_path)
    path.write_text(path.read_text().replace('[catalog]\ndsn = "postgresql://admin@127.0.0'
                                             '.1:1/catalog"\n', ""))
    with pytest.raises(ConfigError, match="catalog: missing table"):
        load_config(path, {})
    assert load_config(path, {"TENANTCTL_CATALOG_DSN": "host=db9"}).catalog_dsn == "host=db9"
    path.write_text(path.read_text() + """
[[regions.eu-central.servers]]
name = "eu_central-1"
admin_dsn = "postgresql://admin@127.0.0.1:2/postgres"
""")
    catalog = {"TENANTCTL_CATALOG_DSN": "host=db9"}
    load_config(path, catalog)  # two such names are fine until the variable is used
    with pytest.raises(ConfigError, match="would name both 'eu-central-1' and "
                                          "'eu_central-1'"):
        load_config(path, {**catalog, server_env_name("eu-central-1"): "host=db7"})
    assert env_overrides({"TENANTCTL_CATALOG_DSN": ""}) == []
    assert env_overrides({"TENANTCTL_SERVER_A_ADMIN_DSN": "host=a"}) == [
        EnvOverride("TENANTCTL_SERVER_A_ADMIN_DSN", "admin_dsn", "host=a", server="A")]


# -- --version, init --base-port/--no-start, the local port ------------------------------


def test_version(tmp_path: Path) -> None:
    proc = _cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == f"tenantctl {version('tenantctl')}\n"
    assert "0.1.0" in proc.stdout or version("tenantctl") != "0.1.0"


def _free_base_port() -> int:
    for port in range(30000, 31000, 7):
        if all(localfleet._port_free(p) for p in (port, port + 1)):
            return port
    raise AssertionError("no two free ports")


def test_init_base_port_no_start(tmp_path: Path) -> None:
    base = _free_base_port()
    proc = _cli("init", "--local", "--base-port", str(base), "--no-start", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "not started" in proc.stdout
    cfg = load_config(tmp_path / "tenantctl.toml", {})
    assert [s.port for s in cfg.servers] == [base, base + 1]
    assert f":{base}/" in cfg.catalog_dsn
    # nothing started, nothing initialised
    assert all(s.data_dir is not None and not s.data_dir.exists() for s in cfg.servers)
    status = _cli("local", "status", "--json", cwd=tmp_path)
    assert [s["status"] for s in json.loads(status.stdout)] == ["not initialised"] * 2

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        _one_line_error(_cli("init", "--local", "--force", "--base-port", str(port),
                             "--no-start", cwd=tmp_path), 2, f"port {port} is in use")
    _one_line_error(_cli("init", "--local", "--force", "--base-port", "80", "--no-start",
                         cwd=tmp_path), 2, "--base-port must be between 1024 and 65534")
    assert load_config(tmp_path / "tenantctl.toml", {}).servers[0].port == base  # unchanged


def test_port_drift_is_said_and_a_stopped_cluster_is_moved(tmp_path: Path) -> None:
    assert localfleet.port_drift(5500, 5500, 5500) is None
    assert localfleet.port_drift(5500, 5432, None) == (
        "is configured for port 5432 but tenantctl.toml says 5500: `tenantctl local up` "
        "moves it to 5500")
    assert "runs on port 5432 but tenantctl.toml says 5500: `tenantctl local down`" in \
        str(localfleet.port_drift(5500, 5500, 5432))

    base = _free_base_port()
    assert _cli("init", "--local", "--base-port", str(base), "--no-start",
                cwd=tmp_path).returncode == 0
    config = tmp_path / "tenantctl.toml"
    cfg = load_config(config, {})
    server = cfg.servers[1]  # not the catalog's host
    assert server.data_dir is not None
    # a stopped cluster as initdb and `local up` leave one (its own port in its conf)
    server.data_dir.mkdir(parents=True)
    (server.data_dir / "PG_VERSION").write_text("16\n")
    (server.data_dir / "postgresql.conf").write_text(f"#port = 5432\nport = {base + 1}\n")
    assert localfleet.port_problems(cfg) == []
    config.write_text(config.read_text().replace(str(base + 1), str(base + 9)))
    moved = load_config(config, {})
    assert localfleet.port_problems(moved) == [
        f"ap-south-1 is configured for port {base + 1} but tenantctl.toml says {base + 9}: "
        f"`tenantctl local up` moves it to {base + 9}"]
    check = _cli("config", "check", "--json", cwd=tmp_path)
    assert f"warning: ap-south-1 is configured for port {base + 1}" in check.stderr
    status = _cli("local", "status", "--json", cwd=tmp_path)
    assert "its port is" in json.loads(status.stdout)[1]["status"]

    said = localfleet._move_port(moved, moved.servers[1])
    assert said == f"ap-south-1: moved from port {base + 1} to {base + 9} (tenantctl.toml)"
    assert localfleet.conf_port(server.data_dir) == base + 9
    pgpass = tmp_path / ".tenantctl" / "pgpass"
    assert localfleet.read_pgpass_password(pgpass, base + 9, "tenantctl_admin") == \
        localfleet.read_pgpass_password(pgpass, base + 1, "tenantctl_admin") is not None
    assert localfleet.port_problems(moved) == []


# -- durations --------------------------------------------------------------------------


def test_since_yesterday_is_taken_by_audit_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TENANTCTL_CONFIG", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)

    def error(since: str) -> str:  # in-process: main() maps errors as the CLI does
        monkeypatch.setattr("sys.argv", ["tenantctl", "audit", "list", "--since", since])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2
        return capsys.readouterr().err

    # parsed before the config is read: a refusal names --since, an accepted value
    # goes on to look for the config
    for since in ("yesterday", "today", "7d", "90s", "2026-12-01", "2026-12-01T08:00:00Z"):
        assert error(since).startswith("error: config file not found"), since
    assert error("last week").startswith("error: invalid --since 'last week'")


def test_seconds_options_take_the_duration_grammar() -> None:
    from datetime import timedelta

    from orchestrator.domain.durations import BadDuration, parse_seconds

    minute = timedelta(minutes=1)
    assert parse_seconds("10", "x") == 10.0 and parse_seconds("0.5", "x") == 0.5
    assert parse_seconds("500ms", "x") == 0.5 and parse_seconds("2m", "x") == 120.0
    assert parse_seconds("1m", "x", at_most=minute) == 60.0
    for bad, why in [("0", "must be more than 0 and at most 1 minute"),
                     ("61s", "must be more than 0 and at most 1 minute"),
                     ("soon", "use a number and a unit"), ("-1", "use a number and a unit")]:
        with pytest.raises(BadDuration) as err:
            parse_seconds(bad, "standby_poll", at_most=minute)
        assert why in str(err.value) and err.value.field == "standby_poll"


# -- completion -------------------------------------------------------------------------


class _Ctx:
    def __init__(self, config: Path | None) -> None:
        self.params = {"config": str(config) if config else None}

    def find_root(self) -> _Ctx:
        return self


def test_completion_from_the_config_and_never_an_error(tmp_path: Path) -> None:
    path = _write_config(tmp_path)
    ctx: Any = _Ctx(path)
    assert complete.complete_regions(ctx, "eu") == ["eu-central"]
    assert complete.complete_regions(ctx, "ap") == []
    assert complete.complete_servers(ctx, "") == ["eu-central-1"]
    revisions = complete.complete_revisions(ctx, "")
    assert "head" in revisions and "0004_order_status_idx" in revisions
    assert complete.complete_revisions(ctx, "0005") == ["0005_reorder_level"]
    # no config, a broken one, or a catalog that refuses: nothing, and no exception
    for bad in (_Ctx(tmp_path / "none.toml"), _Ctx(tmp_path / "master.key")):
        for fn in (complete.complete_regions, complete.complete_slugs,
                   complete.complete_revisions):
            assert fn(bad, "") == []
    assert complete.complete_slugs(ctx, "") == []  # the catalog at port 1 refuses
    assert complete.complete_jobs("backups,re") == ["backups,retention"]
    assert complete.complete_jobs("prune,") == ["prune,backups", "prune,retention",
                                                "prune,audit_purge", "prune,usage"]
    assert complete.complete_states("ca") == ["cancelled"]


def test_slug_completion_is_time_boxed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    # a catalog that accepts the connection and never answers
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        path = _write_config(tmp_path, catalog=f"postgresql://admin@127.0.0.1:{port}/c")
        monkeypatch.setattr(complete, "CATALOG_BUDGET_S", 0.2)
        started = time.monotonic()
        assert complete.complete_slugs(_Ctx(path), "") == []
        assert time.monotonic() - started < 5  # not the 10 s connect timeout


def test_shell_completion_script() -> None:
    """The bash script, and a completion through it. Asked for by the completion
    protocol's variable, not `--show-completion`: that one detects the parent
    process's shell (bash, zsh or fish here; `sh` when run under `sh -c`, so a test
    relying on it passed or failed by who started pytest)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(TENANTCTL, capture_output=True, text=True, timeout=60,
                          env={**env, "_TENANTCTL_COMPLETE": "source_bash"})
    assert proc.returncode == 0 and "_TENANTCTL_COMPLETE" in proc.stdout, proc.stderr
    done = subprocess.run(TENANTCTL, capture_output=True, text=True, timeout=60,
                          env={**env, "_TENANTCTL_COMPLETE": "complete_bash",
                               "COMP_WORDS": "tenantctl mig", "COMP_CWORD": "1"})
    assert done.returncode == 0 and done.stdout.split() == ["migrate"], done.stderr


# -- help: examples, no <bool>, choices -------------------------------------------------


def _commands() -> Iterator[list[str]]:
    def walk(cmd: Any, path: list[str]) -> Iterator[list[str]]:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path
    yield from walk(typer.main.get_command(app), [])


def test_every_command_has_examples_in_its_help() -> None:
    runner = CliRunner()
    paths = list(_commands())
    assert len(paths) > 40
    missing = []
    for path in paths:
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).output
        name = " ".join(path)
        # an example of this very command, kept on one line (not re-wrapped)
        if "Examples:" not in out or f"\n    tenantctl {name}" not in out:
            missing.append(name)
        assert "<bool>" not in out, out
    assert missing == [], f"add examples to cli/help.py EXAMPLES for: {missing}"
    assert set(EXAMPLES) <= {" ".join(p) for p in paths}  # none for a removed command


def test_no_help_shows_a_type_for_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    # typer's rich layout (TYPER_USE_RICH=1) is where `--yes <bool>` showed; the
    # plain one is checked by the examples test above
    monkeypatch.setattr(typer.core, "HAS_RICH", True)
    runner = CliRunner()
    seen = []
    for path in [[], *_commands()]:
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).output
        assert "<bool>" not in out, (path, out)
        seen.append(out)
    assert "--yes" in "".join(seen) and "--json" in "".join(seen)
    # options that take a value keep their type
    assert any("<int" in out for out in seen)


def test_fixed_values_are_choices() -> None:
    from cli.retention import RetentionStep
    from orchestrator.domain.jobs import STEP_SPELLINGS

    assert [s.value for s in RetentionStep] == list(STEP_SPELLINGS)  # one vocabulary
    runner = CliRunner()
    export = runner.invoke(app, ["tenant", "export", "--help"]).output
    assert "<sql|csv>" in export
    only = runner.invoke(app, ["retention", "run", "--help"], env={"COLUMNS": "200"}).output
    assert "delete|purge|prune|audit|access" in only
    proc = _cli("tenant", "export", "acme", "--format", "xml", "--output", "x",
                cwd=REPO)
    _one_line_error(proc, 2, "'xml' is not one of 'sql', 'csv'")
    proc = _cli("retention", "run", "--only", "everything", cwd=REPO)
    _one_line_error(proc, 2, "'everything' is not one of")
