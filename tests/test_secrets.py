"""Attack and bad-input suite, part 3: secrets never leak. The actual secret values —
tenant passwords (as created, restored, rotated one by one and fleet-wide), support
grant passwords, the master key (old and new), the admin and superuser passwords
of the servers, the tenants' age private keys — are looked for, verbatim, in:

- the argv of every process tenantctl starts (what `ps` shows): the config's
  `pg_bin_dir` points at wrappers that log their argv (never their environment,
  where PGPASSWORD legitimately travels) before exec'ing the real tool, and `ps`
  itself is sampled while a tenant psql session runs;
- stdout and stderr of every command, `--json` or not, failures and a traceback
  included — except the one secret a command exists to show (`tenant create` and
  `backup restore --as` print the new tenant's connection string once, `tenant
  credentials` shows it again, `access grant` shows the grant's, `backup key
  export` prints that tenant's key);
- the audit log (as `audit list --json` shows it and as stored), the servers' logs,
  the objects and manifests in the backup stores, the export files.

A positive control proves the scan finds a secret where one must be.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import select

from orchestrator.adapters.catalog.models import AuditEvent
from orchestrator.adapters.crypto.masterkey import write_key_file
from orchestrator.adapters.postgres import pgtools
from orchestrator.services import credentials
from tests.conftest import REPO, OwnCatalog, PgFleet, connect_as, run_cli


@dataclass
class Capture:
    """Every output to scan, with the secrets it is allowed to show (by label)."""

    secrets: dict[str, str] = field(default_factory=dict)
    outputs: list[tuple[str, str, frozenset[str]]] = field(default_factory=list)

    def secret(self, label: str, value: str) -> str:
        assert value and len(value) >= 16, (label, value)
        self.secrets[label] = value
        return value

    def add(self, where: str, text: str, allowed: tuple[str, ...] = ()) -> None:
        self.outputs.append((where, text, frozenset(allowed)))

    def leaks(self, text: str, allowed: frozenset[str] = frozenset()) -> list[str]:
        found = []
        for label, value in self.secrets.items():
            if label in allowed:
                continue
            if value in text or value.lower() in text.lower() and value.isupper():
                found.append(label)
        return found


def _wrappers(wrap_dir: Path, log: Path) -> None:
    """A wrapper per client tool: append the argv, then exec the real binary."""
    real = pgtools.embedded_bin_dir()
    wrap_dir.mkdir()
    for tool in sorted(real.iterdir()):
        if not (tool.is_file() and os.access(tool, os.X_OK)):
            continue
        script = wrap_dir / tool.name
        script.write_text(
            "#!/bin/sh\n"
            "{ printf 'EXEC %s\\n' \"$0\"; for a in \"$@\"; do printf 'ARG %s\\n' \"$a\"; "
            f"done; }} >> {shlex.quote(str(log))}\n"
            f"exec {shlex.quote(str(tool))} \"$@\"\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@dataclass
class Setup:
    test_fleet: PgFleet
    capfd: pytest.CaptureFixture[str]
    own: OwnCatalog
    config: Path
    argv_log: Path
    work: Path
    cap: Capture


@pytest.fixture
def setup(test_fleet: PgFleet, own_catalog: OwnCatalog, tmp_path: Path,
          capfd: pytest.CaptureFixture[str]) -> Iterator[Setup]:
    log = tmp_path / "argv.log"
    log.touch()
    _wrappers(tmp_path / "bin", log)
    config = tmp_path / "wrapped.toml"
    config.write_text(f'pg_bin_dir = "{tmp_path / "bin"}"\n'
                      + own_catalog.config_path.read_text())
    cap = Capture()
    cap.secret("master key", (test_fleet.state_dir / "master.key").read_text().strip())
    for line in (test_fleet.state_dir / "pgpass").read_text().splitlines():
        cap.secret(f"admin password {line.split(':')[1]}", line.rsplit(":", 1)[1])
    for su in sorted((test_fleet.state_dir / "secrets").glob("*.superuser")):
        cap.secret(f"superuser password {su.stem}", su.read_text().strip())
    yield Setup(test_fleet, capfd, own_catalog, config, log, tmp_path, cap)


def _in_process(s: Setup, config: Path, args: tuple[str, ...]
                ) -> subprocess.CompletedProcess[str]:
    """`tenantctl ARGS` through the CLI's own entry point, in this process (a second
    per command otherwise); file descriptors are captured, so the output of the
    tools it starts (psql) is caught too."""
    from cli.main import main

    s.capfd.readouterr()
    saved, sys.argv = sys.argv, ["tenantctl", "--config", str(config), *args]
    code: int = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = saved
    out, err = s.capfd.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def _cli(s: Setup, *args: str, allowed: tuple[str, ...] = (), code: int | tuple[int, ...] = 0,
         config: Path | None = None, subprocess_: bool = False
         ) -> subprocess.CompletedProcess[str]:
    if subprocess_:
        proc = run_cli(s.test_fleet, *args, config=config or s.config, timeout=180)
    else:
        proc = _in_process(s, config or s.config, args)
    codes = code if isinstance(code, tuple) else (code,)
    assert proc.returncode in codes, (args, proc.returncode, proc.stdout, proc.stderr)
    if proc.returncode:  # an expected failure: one line
        assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1 \
            or args[:2] == ("tenant", "psql"), proc.stderr
    where = "tenantctl " + " ".join(args)
    s.cap.add(f"{where} (stdout)", proc.stdout, allowed)
    s.cap.add(f"{where} (stderr)", proc.stderr)  # nothing, ever
    return proc


def _password(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["password"])


def test_no_secret_in_argv_output_audit_logs_or_stores(test_fleet: PgFleet, setup: Setup,
                                                       slug: str) -> None:
    s, cap, fleet = setup, setup.cap, setup.own.fleet
    source, copy = f"{slug}_s", f"{slug}_r"

    # -- tenants, data, backups, restore ---------------------------------------------
    made = json.loads(_cli(s, "tenant", "create", source, "--region", "ap-south", "--json",
                           allowed=("password 1",), subprocess_=True).stdout)
    cap.secret("password 1", _password(made["dsn"]))
    with connect_as(made["dsn"], autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) VALUES ('ann@x.test', 'Ann')")
    backup = json.loads(_cli(s, "backup", "run", source, "--json", subprocess_=True
                             ).stdout)[0]
    cap.secret("age key", credentials.export_identity(fleet, source))
    _cli(s, "backup", "verify", "--latest", source, "--restore-test", "--json")
    restored = json.loads(_cli(s, "backup", "restore", str(backup["id"]), "--as", copy,
                               "--json", allowed=("password 2",)).stdout)
    cap.secret("password 2", _password(restored["dsn"]))
    cap.secret("age key 2", credentials.export_identity(fleet, copy))
    _cli(s, "backup", "key", "export", source, allowed=("age key",))

    # -- export, psql --------------------------------------------------------------
    for fmt in ("sql", "csv"):
        out = s.work / f"export.{fmt}"
        _cli(s, "tenant", "export", source, "--format", fmt, "--output", str(out), "--json")
        cap.add(f"export file {out.name}", out.read_bytes().decode(errors="replace"))
    psql = _cli(s, "tenant", "psql", source, "-c", "SELECT current_user")
    assert f"tenant_{source}" in psql.stdout
    _cli(s, "tenant", "psql", source, "--owner", "-c", "SELECT current_user")
    _cli(s, "tenant", "psql", source, "-c", "SELECT no_such_column", code=1)

    # `ps` while a tenant session runs: its password travels in psql's environment
    running = subprocess.Popen(
        [sys.executable, "-m", "cli", "--config", str(s.config), "tenant", "psql", source,
         "-c", "SELECT pg_sleep(3)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=REPO, text=True)
    samples = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and running.poll() is None:
            ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True)
            samples.append(ps.stdout)
            if "pg_sleep" in ps.stdout and f"tenant_{source}" in ps.stdout:
                break  # psql and the tenant's backend are both there
            time.sleep(0.1)
    finally:
        out_, err_ = running.communicate(timeout=30)
    assert running.returncode == 0, err_
    assert any("pg_sleep" in p for p in samples), "never saw the psql process"
    cap.add("ps -eww -o args", "\n".join(samples))
    cap.add("tenant psql (sleeping)", out_ + err_)

    # -- credentials: shown where asked, rotated one by one and fleet-wide -------------
    shown = _cli(s, "tenant", "credentials", source, allowed=("password 1",),
                 subprocess_=True)
    # positive control: the scan does find a secret where one is
    assert cap.leaks(shown.stdout) == ["password 1"]
    _cli(s, "tenant", "credentials", source, "--json", allowed=("password 1",))
    rotated = _cli(s, "tenant", "credentials", source, "--rotate", "--json",
                   allowed=("password 3",))
    cap.secret("password 3", _password(json.loads(rotated.stdout)["dsn"]))
    _cli(s, "tenant", "credentials", "--rotate", "--all", "--region", "ap-south",
         "--kill-sessions", "--json", "--yes")
    cap.secret("password 4", _password(fleet.credentials(source)))
    cap.secret("password 5", _password(fleet.credentials(copy)))

    # -- support access ------------------------------------------------------------
    grant = json.loads(_cli(s, "access", "grant", source, "--to", "sam@support", "--ttl",
                            "1h", "--reason", "ticket 1", "--json",
                            allowed=("grant password",)).stdout)
    cap.secret("grant password", _password(grant["dsn"]))
    _cli(s, "access", "revoke", "--all", "--json")

    # -- read commands -------------------------------------------------------------
    for args in (["tenant", "show", source], ["tenant", "list"], ["region", "list"],
                 ["config", "check"], ["migrate", "status"], ["retention", "status"],
                 ["backup", "list"], ["access", "list", "--all"]):
        _cli(s, *args, "--json")
        _cli(s, *args)  # tables too
    _cli(s, "report", "--json", code=(0, 12))  # the copy has no backup yet: 12 is fine

    # -- an unexpected failure: the traceback while a new password is in hand ---------
    crash = subprocess.run(
        [sys.executable, "-c",
         "import sys, orchestrator.adapters.postgres.admin as p\n"
         "def boom(conn, role, password): raise RuntimeError('server went away')\n"
         "p.set_password = boom\n"
         f"sys.argv = ['tenantctl', '--config', {str(s.config)!r}, 'tenant', "
         f"'credentials', {source!r}, '--rotate']\n"
         "from cli.main import main\nmain()\n"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    # the injected failure, not any other (an import that broke would pass otherwise)
    assert crash.returncode == 1 and "RuntimeError: server went away" in crash.stderr, \
        crash.stderr
    cap.add("traceback (stdout)", crash.stdout)
    cap.add("traceback (stderr)", crash.stderr)
    cap.secret("password 6 (pending when it crashed)", _password(fleet.credentials(source)))

    # -- the master key: rotated, and bad key files -------------------------------------
    new_key = s.work / "new.key"
    write_key_file(new_key)
    cap.secret("new master key", new_key.read_text().strip())
    _cli(s, "keys", "rotate-master", "--new-key-file", str(new_key), "--json", "--yes")
    rotated_cfg = s.work / "rotated.toml"
    rotated_cfg.write_text(s.config.read_text().replace(
        str(test_fleet.state_dir / "master.key"), str(new_key)))
    _cli(s, "config", "check", "--json", config=rotated_cfg)
    _cli(s, "tenant", "credentials", source, config=rotated_cfg, allowed=(
        "password 6 (pending when it crashed)",))
    # the old key no longer opens anything: one line, no secret
    _cli(s, "tenant", "credentials", source, code=7)
    junk = s.work / "junk.key"
    junk.write_text(f"{cap.secrets['master key'][:20]}!!not-base64!!\n")
    junk.chmod(0o600)
    junk_cfg = s.work / "junk.toml"
    junk_cfg.write_text(s.config.read_text().replace(
        str(test_fleet.state_dir / "master.key"), str(junk)))
    cap.secret("junk key text", junk.read_text().strip())
    _cli(s, "config", "check", config=junk_cfg, code=7)
    # a DSN with a password is refused without being echoed
    pw_cfg = s.work / "pw.toml"
    dsn_pw = cap.secret("password in a DSN", "Not-Echoed-Admin-Password-42")
    pw_cfg.write_text(s.config.read_text().replace(
        "user=tenantctl_admin", f"user=tenantctl_admin password={dsn_pw}", 1))
    _cli(s, "config", "check", config=pw_cfg, code=2, subprocess_=True)

    # -- the audit log, as shown and as stored --------------------------------------
    _cli(s, "audit", "list", "--json", "--limit", "1000")
    _cli(s, "audit", "list", "--limit", "1000")
    with fleet.catalog.session() as sess:
        events = list(sess.scalars(select(AuditEvent)))
    assert {"tenant.credentials.show", "tenant.credentials.rotate", "backup.key.export",
            "access.grant"} <= {e.action for e in events}
    cap.add("audit records", "\n".join(f"{e.actor} {e.action} {e.tenant} {e.outcome} "
                                       f"{json.dumps(e.detail)}" for e in events))

    # -- what the tools were started with --------------------------------------------
    argv = s.argv_log.read_text()
    tools = {Path(line[5:]).name for line in argv.splitlines() if line.startswith("EXEC ")}
    assert {"pg_dump", "pg_restore", "psql"} <= tools, tools
    cap.add("argv of every tool tenantctl started", argv)

    # -- the servers' logs, the stores ---------------------------------------------------
    if not test_fleet.external:
        for log in (test_fleet.state_dir / "pg").glob("*/server.log"):
            cap.add(f"server log {log.parent.name}", log.read_text(errors="replace"))
    cfg = fleet.cfg
    for region in ("ap-south",):
        root = Path(cfg.region(region).backup_store.removeprefix("file://"))
        for tenant in (source, copy):
            for obj in sorted((root / "tenants" / tenant).glob("*")) if (
                    root / "tenants" / tenant).exists() else []:
                cap.add(f"store object {obj.name}", obj.read_bytes().decode("latin-1"))

    leaks = [(where, cap.leaks(text, allowed)) for where, text, allowed in cap.outputs]
    leaks = [(where, found) for where, found in leaks if found]
    assert not leaks, leaks
    # and the scan saw what it had to
    assert len(cap.secrets) >= 12 and len(cap.outputs) > 60, (len(cap.secrets),
                                                                len(cap.outputs))
    assert re.search(r"AGE-SECRET-KEY-1", cap.secrets["age key"])
