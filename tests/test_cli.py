"""CLI behaviour that is not provisioning itself: lookups, validation, catalog state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
from psycopg import sql

from tests.conftest import REPO, PgFleet, run_cli


def _one_line_error(proc, code: int, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_tenant(test_fleet: PgFleet) -> None:
    for args in (["tenant", "show", "nosuchtenant"], ["tenant", "credentials", "nosuchtenant"],
                 ["tenant", "psql", "nosuchtenant", "-c", "select 1"]):
        _one_line_error(run_cli(test_fleet, *args), 3, "no tenant 'nosuchtenant'")


def test_invalid_filters(test_fleet: PgFleet) -> None:
    _one_line_error(run_cli(test_fleet, "tenant", "list", "--state", "bogus"), 2,
                    "unknown state 'bogus'")
    _one_line_error(run_cli(test_fleet, "tenant", "list", "--region", "mars"), 2,
                    "unknown region 'mars'")
    _one_line_error(run_cli(test_fleet, "tenant", "show", "Bad;Slug"), 2, "invalid slug")


def test_config_check(test_fleet: PgFleet) -> None:
    proc = run_cli(test_fleet, "config", "check", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data["regions"]) >= {"eu-central", "ap-south"}
    assert len(data["master_key_id"]) == 16
    key = (test_fleet.state_dir / "master.key").read_text().strip()
    assert key not in proc.stdout


def test_missing_config_file(test_fleet: PgFleet, tmp_path: Path) -> None:
    _one_line_error(run_cli(test_fleet, "tenant", "list", config=tmp_path / "none.toml"), 2,
                    "config file not found")


def test_catalog_not_upgraded(test_fleet: PgFleet, tmp_path: Path) -> None:
    admin = test_fleet.admin_dsn("eu-central-1")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS tenantctl_catalog_empty")
        conn.execute(sql.SQL("CREATE DATABASE tenantctl_catalog_empty"))
    cfg = tmp_path / "empty.toml"
    text = test_fleet.config_path.read_text()
    cfg.write_text(text.replace("dbname=tenantctl_catalog", "dbname=tenantctl_catalog_empty"))
    try:
        _one_line_error(run_cli(test_fleet, "tenant", "list", config=cfg), 4,
                        "run `tenantctl catalog upgrade`")
        upgraded = run_cli(test_fleet, "catalog", "upgrade", "--json", config=cfg)
        assert upgraded.returncode == 0, upgraded.stderr
        result = json.loads(upgraded.stdout)
        assert result["from"] is None and result["to"]
        assert "region eu-central: added" in result["topology"]
        listed = run_cli(test_fleet, "tenant", "list", "--json", config=cfg)
        assert listed.returncode == 0 and json.loads(listed.stdout) == []
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE tenantctl_catalog_empty WITH (FORCE)")


# What a read command imports (packages and modules by full name): SQLAlchemy's ORM
# (~0.3 s), Alembic (~0.5 s), pydantic (typer's coercion, ~0.15 s), typer's rich help
# layout and the destructive-SQL scanner (~15 ms of regex compiling) are start-up costs
# that reading the catalog does not need.
_IMPORTS_AFTER = """
import json, sys
from cli.main import main
out, sys.argv = sys.argv[1], ["tenantctl", *sys.argv[2:]]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code
with open(out, "w") as f:
    json.dump({"modules": sorted({m.split(".")[0] for m in sys.modules} | set(sys.modules)),
               "code": code}, f)
"""


def _imported_and_code(test_fleet: PgFleet, tmp_path: Path, *args: str
                       ) -> tuple[set[str], object]:
    out = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if k != "TYPER_USE_RICH"}
    proc = subprocess.run([sys.executable, "-c", _IMPORTS_AFTER, str(out), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    data = json.loads(out.read_text())
    return set(data["modules"]), data["code"]


def _imported(test_fleet: PgFleet, tmp_path: Path, *args: str) -> set[str]:
    return _imported_and_code(test_fleet, tmp_path, *args)[0]


def test_read_commands_import_no_orm_alembic_nor_pydantic(test_fleet: PgFleet,
                                                          tmp_path: Path) -> None:
    cfg = str(test_fleet.config_path)
    # the exit codes say each command did reach the catalog (a missing tenant is exit 3)
    for args, code in ((["tenant", "list", "--json"], 0),
                       (["tenant", "show", "nosuchtenant", "--json"], 3),
                       (["region", "list", "--json"], 0), (["backup", "list", "--json"], 0),
                       (["backup", "list", "nosuchtenant", "--json"], 3),
                       (["migrate", "status", "--json"], 0),
                       (["migrate", "history", "--json"], 0),
                       (["migrate", "rollouts", "--json"], 0),
                       (["migrate", "rollouts", "show", "999999999", "--json"], 3)):
        modules, got = _imported_and_code(test_fleet, tmp_path, "--config", cfg, *args)
        assert got in ((code, None) if code == 0 else (code,)), (args, got)
        assert "psycopg" in modules, args
        assert not modules & {"sqlalchemy", "alembic", "pydantic", "pydantic_core", "boto3",
                              "botocore", "pyrage", "cryptography",
                              "orchestrator.domain.destructive_sql"}, args


def test_help_imports_neither_rich_nor_the_orchestrator(test_fleet: PgFleet,
                                                        tmp_path: Path) -> None:
    for args in (["--help"], ["tenant", "--help"], ["tenant", "list", "--help"]):
        modules = _imported(test_fleet, tmp_path, *args)
        assert not modules & {"rich", "pydantic", "sqlalchemy", "psycopg", "alembic"}, args
