"""The one exit-code table (orchestrator.domain.errors.ExitCode): one meaning per code,
a code on every error class, README's table the same, and the CLI exiting with the
table's names only. Pure: no Postgres."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import backups
import cli
import orchestrator
from orchestrator.domain.errors import MEANING, ExitCode, TenantctlError

REPO = Path(__file__).resolve().parent.parent

# what each code has always been: scripts and monitoring depend on these numbers
KNOWN = {"OK": 0, "FAILED": 1, "INVALID": 2, "NOT_FOUND": 3, "CONFLICT": 4, "CAPACITY": 5,
         "UNAVAILABLE": 6, "MASTER_KEY": 7, "ROLLOUT_STOPPED": 8, "STORE_FAILED": 9,
         "DUMP_OR_RESTORE": 10, "RETENTION": 11, "PROMISE_BROKEN": 12,
         "CATALOG_INTEGRITY": 13, "DOCTOR_ERRORS": 14, "MIGRATIONS_NOT_CURRENT": 15,
         "INJECTED_FAULT": 99,
         "INTERRUPTED": 130}


def test_the_codes_keep_their_numbers_and_one_meaning_each() -> None:
    assert {c.name: c.value for c in ExitCode} == KNOWN
    assert len({c.value for c in ExitCode}) == len(ExitCode)  # no aliases: @unique
    assert len(set(MEANING.values())) == len(MEANING)
    # every code but success and the test-only fault is explained to operators
    assert set(MEANING) == set(ExitCode) - {ExitCode.OK, ExitCode.INJECTED_FAULT}


def _error_classes() -> set[type[TenantctlError]]:
    for package in (orchestrator, backups, cli):
        for mod in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not mod.name.endswith(".__main__"):  # that one runs the CLI
                importlib.import_module(mod.name)
    found: set[type[TenantctlError]] = set()
    todo = [TenantctlError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    return found


def test_every_error_class_has_a_code_of_the_table() -> None:
    classes = _error_classes()
    names = {c.__name__ for c in classes}
    assert {"InvalidInput", "RetentionError", "StoreError", "BackupError", "ExportError",
            "InjectedFault", "BadDuration"} <= names  # the walk found them all
    for cls in classes:
        assert isinstance(cls.exit_code, ExitCode), cls
        assert cls.exit_code != ExitCode.OK, cls
    by_name = {c.__name__: c.exit_code for c in classes}
    assert (by_name["InvalidInput"], by_name["ConfigError"], by_name["NotFound"],
            by_name["Conflict"], by_name["StoreError"], by_name["BackupError"],
            by_name["RetentionError"], by_name["CatalogIntegrityError"]) == \
        (2, 2, 3, 4, 9, 10, 11, 13)


def test_readme_table_is_this_table() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", readme, re.MULTILINE))
    assert {int(k): v for k, v in rows.items()} == {int(c): m for c, m in MEANING.items()}


def test_the_cli_exits_with_the_tables_names_only() -> None:
    """No bare number in typer.Exit/SystemExit/_fail under cli/ (psql's own status,
    a variable, is passed through)."""
    bare = []
    for path in sorted((REPO / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                    "typer.Exit", "SystemExit", "sys.exit", "_fail", "Exit") and any(
                    isinstance(a, ast.Constant) and isinstance(a.value, int)
                    for a in node.args):
                bare.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not bare, bare
    # and no error class outside the table's module sets a bare number
    for root in ("orchestrator", "backups", "cli"):
        for path in (REPO / root).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"exit_code\s*=\s*\d", text), path
