"""Helpers shared by the CLI modules: the config/fleet of this invocation, output."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.api import Fleet
    from orchestrator.config import Config


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


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def console() -> Any:
    from rich.console import Console

    # what we print holds user input (paths, reasons, names): shown as typed, never
    # read as rich markup (a "[/x]" in a path would crash after the work was done)
    return Console(markup=False)


def say(line: str) -> None:
    # stored text (a reason, a name) may hold a terminal escape: shown escaped
    from orchestrator.errors import printable

    console().print("\n".join(printable(x) for x in line.split("\n")), highlight=False)


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    from orchestrator.errors import printable

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*["" if v is None else printable(str(v)) for v in r])
    console().print(table)
