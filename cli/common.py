"""Helpers shared by the CLI modules: the config/fleet of this invocation, output."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.adapters.catalog.reads import CatalogReads
    from orchestrator.api import Fleet
    from orchestrator.config import Config


# catalog ids are bigints: a larger number is refused as bad input (exit 2), not sent
ID_MAX = 2**63 - 1


class State:
    config_path: str | None = None


def current_config() -> Config:
    from orchestrator.config import load_config

    return load_config(State.config_path)


def open_fleet() -> Fleet:
    from orchestrator.api import Fleet

    fleet = Fleet(current_config())
    try:
        fleet.catalog.require_current()  # a clear error instead of "relation does not exist"
    except BaseException:
        fleet.close()
        raise
    return fleet


def open_reads() -> CatalogReads:
    """The catalog for a command that only reads it: plain SQL over psycopg, with none
    of SQLAlchemy's ~0.3 s of imports (see orchestrator/adapters/catalog/reads.py)."""
    from orchestrator.adapters.catalog.reads import CatalogReads

    reads = CatalogReads(current_config())
    try:
        reads.require_current()  # as open_fleet
    except BaseException:
        reads.close()
        raise
    return reads


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def console() -> Any:
    from rich.console import Console

    # what we print holds user input (paths, reasons, names): shown as typed, never
    # read as rich markup (a "[/x]" in a path would crash after the work was done)
    return Console(markup=False)


def no_controls(text: str) -> str:
    """``text`` with control and format characters (an escape sequence that sets the
    terminal title or clears the screen, a BEL, a bidi override) shown escaped, as
    Python would write them; anything else, a path's odd byte included, as it is."""
    if text.isprintable():
        return text
    import unicodedata

    return "".join(c.encode("unicode_escape").decode()
                   if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)


def say(line: str) -> None:
    # stored text (a reason, a name) may hold a terminal escape: shown escaped
    console().print("\n".join(no_controls(x) for x in line.split("\n")), highlight=False)


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*["" if v is None else no_controls(str(v)) for v in r])
    console().print(table)
