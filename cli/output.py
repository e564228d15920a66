"""Every way a command writes to the terminal: JSON, tables, lines, raw values, stderr
lines and progress bars. Commands render through these only.

rich is imported on first use, never at import: `--help` does not load it."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    # what we print holds user input (paths, reasons, names): shown as typed, never
    # read as rich markup (a "[/x]" in a path would crash after the work was done)
    return Console(markup=False, stderr=stderr)


def no_controls(text: str) -> str:
    """``text`` with control and format characters (an escape sequence that sets the
    terminal title or clears the screen, a BEL, a bidi override) shown escaped, as
    Python would write them; anything else, a path's odd byte included, as it is."""
    if text.isprintable():
        return text
    import unicodedata

    return "".join(c.encode("unicode_escape").decode()
                   if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)


def say(line: str, to: Any = None) -> None:
    """One message for a person, on stdout (or on ``to``, a console of ours: the one a
    live progress bar draws on, so the line lands above the bar)."""
    # stored text (a reason, a name) may hold a terminal escape: shown escaped
    (to or console()).print("\n".join(no_controls(x) for x in line.split("\n")),
                           highlight=False)


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*["" if v is None else no_controls(str(v)) for v in r])
    console().print(table)


def plain(text: str, end: str = "\n") -> None:
    """A value for a program to read, written as is: a connection string, a key, SQL.
    Never through rich (which would wrap a long one, or read it as markup)."""
    sys.stdout.write(text + end)


def err(line: str) -> None:
    """One line on stderr: an error, a warning or a note beside the command's output."""
    sys.stderr.write(line + "\n")


def progress_bar(label: str, as_json: bool, *, time_left: bool = False) -> Any | None:
    """A progress bar on stderr (``label``, bar, done/total, and with ``time_left`` the
    time remaining), or None when stderr is no terminal or the output is JSON: then
    the command runs without one. Use as ``with bar: task = bar.add_task(...)``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    stderr = Console(stderr=True)
    if not stderr.is_terminal or as_json:
        return None
    columns: list[Any] = [TextColumn(label), BarColumn(),
                          TextColumn("{task.completed}/{task.total}")]
    if time_left:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=stderr)
