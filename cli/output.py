"""Every way a command writes to the terminal: JSON, YAML, tables, records, lines, raw
values, stderr lines and progress bars, and `-` as stdout for an output file.
Commands render through these only.

Output is read by people at a terminal and by grep, cron mail and scripts through a
pipe: a value people grep for (a slug, a server, a revision, an id) is never cut;
off a terminal nothing is wrapped to a width at all (a line is a line); at a
terminal a table fits its width by wrapping its other columns first.

rich and yaml are imported on first use, never at import: `--help` does not load
them."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def console(stderr: bool = False, width: int | None = None) -> Any:
    from rich.console import Console

    # what we print holds user input (paths, reasons, names): shown as typed, never
    # read as rich markup (a "[/x]" in a path would crash after the work was done)
    # nor as an emoji code (":x:")
    return Console(markup=False, emoji=False, stderr=stderr, width=width)


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
    # stored text (a reason, a name) may hold a terminal escape: shown escaped.
    # soft_wrap: never a newline of ours inside a line (a command in a "next:" hint
    # stays one line to copy, and one line to grep when piped); a terminal wraps it
    # on screen by itself
    (to or console()).print("\n".join(no_controls(x) for x in line.split("\n")),
                           highlight=False, soft_wrap=True)


def table(title: str | None, columns: list[str], rows: list[list[Any]],
          whole: set[int] | frozenset[int] = frozenset()) -> None:
    """A table of ``columns``; no rows says "TITLE: none" (or "none"). No value is
    ever cut: off a terminal the table is as wide as its rows; at a terminal the
    columns ``whole`` (their indexes: the values people grep for) keep their width
    and the others wrap, or every column folds when even those do not fit."""
    if not rows:
        say(f"{title}: none" if title else "none")
        return
    _table(title, columns, set(whole),
           [["" if v is None else str(v) for v in r] for r in rows])


def _table(title: str | None, columns: list[str], whole: set[int],
           rows: list[list[str]]) -> None:
    from rich.cells import cell_len
    from rich.table import Table

    rows = [[no_controls(v) for v in r] for r in rows]
    widths = [max([cell_len(h)] + [max((cell_len(x) for x in v.split("\n")), default=0)
                                    for v in (r[i] for r in rows)])
              for i, h in enumerate(columns)]
    out = console()
    # a cell is its text plus a space each side, and a border before it (one more at
    # the end); a column that may wrap keeps five characters at least
    natural = sum(w + 3 for w in widths) + 1
    if not out.is_terminal:
        out = console(width=natural)  # nothing wraps
    keep = sum(w if i in whole else min(w, 5) for i, w in enumerate(widths)) \
        + 3 * len(widths) + 1 <= out.width
    if title:  # a line of its own: not padded to the table's width, not wrapped to it
        say(title, out)
    t = Table()
    for i, c in enumerate(columns):
        # no_wrap keeps a whole column out of rich's shrinking; fold, not "…", for
        # any cell that still meets the edge
        t.add_column(c, overflow="fold", no_wrap=keep and i in whole)
    for r in rows:
        t.add_row(*r)
    out.print(t)


# -- output formats: -o table|wide|json|yaml -----------------------------------------------


class Format(StrEnum):
    """What a command that prints records prints: ``table`` (the default: the columns
    people read, times as an age), ``wide`` (every column, full ISO-8601 times), or
    the whole data as ``json`` or ``yaml`` (sizes in bytes, times in ISO-8601)."""

    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"


# `-o` as kubectl; the long name is --output-format because --output FILE already
# names a file (tenant export; backup key export keeps its own `-o FILE`). A plain
# str checked by output_format(), not an Enum parameter: typer coerces an Enum through
# pydantic, whose import the read commands do without (cli/main.py _plain_params)
FormatOpt = Annotated[str | None, typer.Option(
    "--output-format", "-o", metavar="[table|wide|json|yaml]", show_default=False,
    autocompletion=lambda: [f.value for f in Format],
    help="table (default), wide (more columns, full times), json or yaml. "
    "--json is -o json.")]


def output_format(fmt: str | None, as_json: bool) -> Format:
    """The format asked for by ``-o`` and ``--json`` (its alias): table by default."""
    from orchestrator.domain.errors import InvalidInput

    try:
        chosen = None if fmt is None else Format(fmt.lower())
    except ValueError:
        raise InvalidInput(f"-o {fmt!r}: use table, wide, json or yaml") from None
    if as_json and chosen not in (None, Format.json):
        raise InvalidInput(f"--json and -o {fmt} disagree: give one")
    return Format.json if as_json else chosen or Format.table


def structured(fmt: Format) -> bool:
    return fmt in (Format.json, Format.yaml)


def print_yaml(data: Any) -> None:
    import yaml

    # the same values as the JSON (datetimes, enums as the strings JSON shows them)
    plain_data = json.loads(json.dumps(data, default=str))
    sys.stdout.write(yaml.safe_dump(plain_data, sort_keys=False, allow_unicode=True,
                                    default_flow_style=False))


def emit(data: Any, fmt: Format) -> None:
    """``data`` whole, as JSON or YAML."""
    (print_yaml if fmt == Format.yaml else print_json)(data)


# -- values as a person reads them ---------------------------------------------------------


def human_size(n: int | float | None) -> str:
    """Bytes as ``12.3 MiB`` (powers of 1024); JSON keeps the bytes."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "PiB":
            break
    return f"{n:.1f} {unit}"


def _instant(value: datetime | str) -> datetime:
    at = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return at if at.tzinfo else at.replace(tzinfo=UTC)  # the catalog's naive times are UTC


def age(value: datetime | str | None, now: datetime) -> str:
    """How long ago (``5m``, ``3h``, ``2d``: the report's grammar, domain/humanize.py)
    or, for a time to come, how long until (``in 3h``)."""
    from orchestrator.domain import humanize

    if value is None:
        return "-"
    delta = now - _instant(value)
    return humanize.age(delta) if delta.total_seconds() >= 0 else f"in {humanize.age(delta)}"


def iso_time(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    return _instant(value).isoformat()


@dataclass(frozen=True)
class Col:
    """One column of a records table. ``get`` is the record's key (or a function of
    the record); ``kind`` says how a value reads: text, time (an age in the table, ISO
    in wide), size (``12.3 MiB``) or yesno; ``whole``: a value people grep for and
    copy (a slug, a server, a revision, an id, an action), never cut; ``wide``: only
    with ``-o wide``."""

    header: str
    get: str | Callable[[Mapping[str, Any]], Any]
    kind: str = "text"
    whole: bool = False
    wide: bool = False

    def value(self, record: Mapping[str, Any]) -> Any:
        return record.get(self.get) if isinstance(self.get, str) else self.get(record)


def cell(value: Any, kind: str, fmt: Format, now: datetime) -> str:
    """A value as the table (or wide table) shows it; None and "" are ``-``."""
    if value is None or value == "":
        return "-"
    if kind == "time":
        return iso_time(value) if fmt == Format.wide else age(value, now)
    if kind == "size":
        return human_size(value)
    if kind == "yesno" or isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _now() -> datetime:
    from orchestrator.adapters import clock

    return clock.utcnow()


def records(rows: Sequence[Mapping[str, Any]], cols: list[Col], fmt: Format, *,
            title: str | None = None, empty: str | None = None, data: Any = None) -> None:
    """A list of records: as JSON/YAML (``data``, else ``rows``, whole), or a table of
    ``cols`` (the ``wide`` ones too with ``-o wide``); no rows says ``empty`` (default:
    "TITLE: none", or "none")."""
    if structured(fmt):
        emit(rows if data is None else data, fmt)
        return
    if not rows:
        say(empty or (f"{title}: none" if title else "none"))
        return
    now = _now()
    shown = [c for c in cols if fmt == Format.wide or not c.wide]
    _table(title, [c.header for c in shown], {i for i, c in enumerate(shown) if c.whole},
           [[cell(c.value(r), c.kind, fmt, now) for c in shown] for r in rows])


def fields(title: str | None, record: Mapping[str, Any], cols: list[Col], fmt: Format, *,
           data: Any = None) -> None:
    """One record, a field per line: as JSON/YAML every field (``data``, else
    ``record``); as a table only the fields that hold something (booleans yes/no,
    times with their age)."""
    if structured(fmt):
        emit(record if data is None else data, fmt)
        return
    now = _now()

    def shown(c: Col) -> str:
        value = c.value(record)
        if c.kind == "time" and fmt == Format.table and value is not None:
            from orchestrator.domain.humanize import human_time

            return human_time(_instant(value), now)  # one record: the time and its age
        return cell(value, c.kind, fmt, now)

    _table(title, ["field", "value"], {1},
           [[c.header, shown(c)] for c in cols if (fmt == Format.wide or not c.wide)
            and c.value(record) not in (None, "")])


# -- files: `-` is stdout ------------------------------------------------------------------


def is_stdout(target: str | os.PathLike[str] | None) -> bool:
    """Whether an ``--output``-like option names stdout: ``-``, as every Unix tool."""
    return target is not None and os.fspath(target) == "-"


def write_text_to(target: str | os.PathLike[str], text: str) -> None:
    """``text`` into the file ``target``, or onto stdout when it is ``-``."""
    if is_stdout(target):
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(target).write_text(text, encoding="utf-8")


def binary_stdout() -> BinaryIO:
    """stdout for bytes (a dump, a zip) written by an ``--output -``."""
    sys.stdout.flush()
    return sys.stdout.buffer


# -- lines -------------------------------------------------------------------------------


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
