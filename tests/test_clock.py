"""The clock is read only by orchestrator/adapters/clock.py: everything else asks it
(or takes `now` as a parameter), so `--now` and tests can move time for all of
it at once. A pure scan of the source (AST), no Postgres."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("orchestrator", "backups", "cli")
CLOCK = REPO / "orchestrator" / "adapters" / "clock.py"
# the catalog's column defaults (created_at, updated_at, audit_log.at): when the
# catalog recorded a row, by its own transaction time (see clock.py)
CATALOG_DEFAULTS = REPO / "orchestrator" / "adapters" / "catalog" / "models.py"

# datetime.now(), date.today() … on the classes, whichever name they were imported as
_WALL_METHODS = {"datetime": {"now", "utcnow", "today"}, "date": {"today"}}
# time.time() and friends; monotonic timers (monotonic, perf_counter) measure
# durations, not what time it is, and stay allowed
_WALL_TIME = {"time", "time_ns", "localtime", "gmtime", "ctime", "asctime"}
# the catalog's clock, asked for a value in SQL text or through SQLAlchemy
_SQL_CLOCK = re.compile(r"\b(?:now|clock_timestamp|statement_timestamp|transaction_timestamp)"
                        r"\s*\(\s*\)|\b(?:current_timestamp|localtimestamp)\b", re.IGNORECASE)


def clock_reads(source: str) -> list[tuple[int, str]]:
    """(line, what) of every read of the current time in a module's source."""
    tree = ast.parse(source)
    classes: dict[str, str] = {}  # local name -> datetime | date
    time_modules = {"time"}
    time_functions: dict[str, str] = {}  # local name -> time.<function>
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "datetime":
            for a in node.names:
                if a.name in _WALL_METHODS:
                    classes[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            for a in node.names:
                if a.name in _WALL_TIME:
                    time_functions[a.asname or a.name] = f"time.{a.name}"
        elif isinstance(node, ast.Import):
            time_modules |= {a.asname or a.name for a in node.names if a.name == "time"}

    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):
                owner = f.value
                # datetime.now / dt.now / datetime.datetime.now
                cls = classes.get(owner.id) if isinstance(owner, ast.Name) else \
                    owner.attr if isinstance(owner, ast.Attribute) and \
                    owner.attr in _WALL_METHODS else None
                if cls and f.attr in _WALL_METHODS[cls]:
                    found.append((node.lineno, f"{cls}.{f.attr}()"))
                elif isinstance(owner, ast.Name) and owner.id in time_modules and \
                        f.attr in _WALL_TIME:
                    found.append((node.lineno, f"time.{f.attr}()"))
                elif isinstance(owner, ast.Name) and owner.id == "func" and f.attr == "now":
                    found.append((node.lineno, "func.now()"))
            elif isinstance(f, ast.Name) and f.id in time_functions:
                found.append((node.lineno, f"{time_functions[f.id]}()"))
        # string literals, the parts of f-strings included (ast.walk visits them)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                (m := _SQL_CLOCK.search(node.value)):
            found.append((node.lineno, f"SQL {m.group(0)}"))
    return sorted(set(found))


def test_the_clock_is_read_only_by_the_clock_adapter() -> None:
    leaks = []
    files = sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py"))
    assert len(files) > 40  # the scan sees the code, not an empty folder
    for path in files:
        if path in (CLOCK, CATALOG_DEFAULTS):
            continue
        leaks += [f"{path.relative_to(REPO)}:{line}: {what}"
                  for line, what in clock_reads(path.read_text())]
    assert not leaks, "read the time through orchestrator.adapters.clock (or take `now` " \
        "as a parameter):\n" + "\n".join(leaks)
    assert clock_reads(CLOCK.read_text()), "clock.py no longer reads the clock?"


@pytest.mark.parametrize("source, expected", [
    ("from datetime import UTC, datetime\nx = datetime.now(UTC)", "datetime.now()"),
    ("import datetime\nx = datetime.datetime.utcnow()", "datetime.utcnow()"),
    ("from datetime import datetime as dt\nx = dt.now()", "datetime.now()"),
    ("from datetime import date\nx = date.today()", "date.today()"),
    ("import time\nx = time.time()", "time.time()"),
    ("import time as t\nx = t.time_ns()", "time.time_ns()"),
    ("from time import time\nx = time()", "time.time()"),
    ("from sqlalchemy import func\nx = func.now()", "func.now()"),
    ("Q = 'UPDATE t SET at = now() WHERE id = 1'", "SQL now()"),
    ("Q = f'''UPDATE t\n SET at = CURRENT_TIMESTAMP {1}'''", "SQL CURRENT_TIMESTAMP"),
])
def test_the_scan_finds_each_kind_of_read(source: str, expected: str) -> None:
    assert [what for _, what in clock_reads(source)] == [expected]


@pytest.mark.parametrize("source", [
    "import time\nt0 = time.monotonic()\ntime.perf_counter()\ntime.sleep(1)",
    "from orchestrator.adapters import clock\nx = clock.utcnow()",
    "from datetime import datetime\nx = datetime.fromisoformat('2026-01-01')",
    "x = 'known for now (the catalog answers)'",
])
def test_the_scan_lets_other_uses_be(source: str) -> None:
    assert clock_reads(source) == []
