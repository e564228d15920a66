"""cli/output.py without a database: ages, sizes, the -o choice, and what a table or a
line looks like piped (as cron mail and grep see it) and at an 80-column terminal."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from cli import output
from cli.output import Col, Format, age, human_size, output_format
from orchestrator.domain.errors import InvalidInput

NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
SLUG = "a_very_very_long_tenant_slug_of_40_chars"
SERVER = "eu-central-primary-server-with-a-long-name-01"
REVISION = "0006_customer_email_ci"


@pytest.mark.parametrize(("delta", "shown"), [
    (timedelta(seconds=5), "5s"), (timedelta(seconds=119), "1m"),
    (timedelta(minutes=5), "5m"), (timedelta(hours=3), "3h"), (timedelta(hours=47), "47h"),
    (timedelta(days=2), "2d"), (timedelta(days=800), "800d"),
    (-timedelta(hours=3), "in 3h"), (-timedelta(days=29, hours=1), "in 29d"),
])
def test_age(delta: timedelta, shown: str) -> None:
    assert age(NOW - delta, NOW) == shown
    assert age((NOW - delta).isoformat(), NOW) == shown  # as the JSON views hold times
    assert age(None, NOW) == "-"


def test_age_reads_a_naive_time_as_utc() -> None:
    assert age("2026-01-10T09:00:00", NOW) == "3h"


@pytest.mark.parametrize(("n", "shown"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (12_900_000, "12.3 MiB"),
    (5 * 1024**3, "5.0 GiB"), (3 * 1024**5, "3.0 PiB"), (None, "-"),
])
def test_human_size(n: int | None, shown: str) -> None:
    assert human_size(n) == shown


def test_json_is_the_alias_of_o_json_and_disagreement_is_refused() -> None:
    assert output_format(None, False) == Format.table
    assert output_format(None, True) == Format.json
    assert output_format("json", True) == Format.json
    assert output_format("WIDE", False) == Format.wide
    with pytest.raises(InvalidInput, match="--json and -o yaml"):
        output_format("yaml", True)
    with pytest.raises(InvalidInput, match="-o 'xml': use table, wide, json or yaml"):
        output_format("xml", False)


ROWS = [{"slug": SLUG, "server": SERVER, "state": "active", "revision": REVISION,
         "created_at": "2026-01-10T11:55:00+00:00", "size": 12_900_000,
         "legal_hold": False, "note": None}]
COLS = [Col("slug", "slug", whole=True), Col("server", "server", whole=True),
        Col("state", "state"), Col("revision", "revision", whole=True),
        Col("created", "created_at", "time"), Col("size", "size", "size"),
        Col("legal hold", "legal_hold", "yesno", wide=True)]


@pytest.fixture
def piped(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdout is no terminal (pytest captures it), 80 columns, as cron mail."""
    monkeypatch.setenv("COLUMNS", "80")
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(output, "_now", lambda: NOW)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 80-column terminal, as rich sees one; no colour codes."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr(output, "_now", lambda: NOW)


def _shown(capsys: pytest.CaptureFixture[str]) -> str:
    """What the terminal shows: the styles' escape codes (bold headers) left out."""
    return re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)


def _line_with(text: str, needle: str) -> str:
    (line,) = [x for x in text.splitlines() if needle in x]
    return line


def test_piped_table_keeps_every_row_on_one_line(piped: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    output.records(ROWS, COLS, Format.table)
    out = capsys.readouterr().out
    line = _line_with(out, SLUG)  # one line holds the row: slug, server, revision whole
    assert SERVER in line and REVISION in line and "active" in line
    assert "5m" in line and "12.3 MiB" in line and "12900000" not in out
    assert "…" not in out and "legal hold" not in out  # a wide column: not by default


def test_wide_shows_the_wide_columns_and_full_times(piped: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    output.records(ROWS, COLS, Format.wide)
    line = _line_with(capsys.readouterr().out, SLUG)
    assert "2026-01-10T11:55:00+00:00" in line and line.rstrip(" │").endswith("no")


def test_terminal_table_wraps_other_columns_and_keeps_key_columns_whole(
        terminal: None, capsys: pytest.CaptureFixture[str]) -> None:
    # tenant list's columns: a 20-character slug, a server, a revision fit whole
    slug = SLUG[:20]
    rows = [{**ROWS[0], "slug": slug, "server": "eu-central-1",
             "state": "cancelled and in its hold for a good while"}]
    output.records(rows, COLS[:5], Format.table)
    out = _shown(capsys)
    assert max(len(x) for x in out.splitlines()) <= 80
    line = _line_with(out, slug)
    assert "eu-central-1" in line and REVISION in line  # the state column wrapped instead
    assert "while" in out and "…" not in out


def test_terminal_too_narrow_for_the_key_columns_folds_them_never_cuts(
        terminal: None, capsys: pytest.CaptureFixture[str]) -> None:
    output.records(ROWS * 2, COLS, Format.table)
    out = _shown(capsys)
    assert max(len(x) for x in out.splitlines()) <= 80 and "…" not in out
    # read down each column: the folded pieces make the whole values again
    cells: dict[int, str] = {}
    for line in out.splitlines():
        if line.startswith("│"):
            for i, piece in enumerate(line.strip("│").split("│")):
                cells[i] = cells.get(i, "") + piece.strip()
    assert cells[0] == SLUG * 2 and cells[1] == SERVER * 2 and cells[3] == REVISION * 2


def test_empty_list_says_so(piped: None, capsys: pytest.CaptureFixture[str]) -> None:
    output.records([], COLS, Format.table, empty="no tenants")
    output.records([], COLS, Format.wide, title="next purges")
    output.table("templates", ["server"], [])
    assert capsys.readouterr().out == "no tenants\nnext purges: none\ntemplates: none\n"


def test_json_and_yaml_carry_the_whole_data(piped: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    data = [{**ROWS[0], "at": when}]
    output.records(data, COLS, Format.json)
    as_json = json.loads(capsys.readouterr().out)
    output.records(data, COLS, Format.yaml)
    assert yaml.safe_load(capsys.readouterr().out) == as_json
    assert as_json[0]["size"] == 12_900_000 and as_json[0]["note"] is None
    assert as_json[0]["at"] == str(when)


def test_fields_show_what_holds_something(piped: None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    record = {"slug": SLUG, "legal_hold": False, "hold_until": None, "last_error": "",
              "created_at": "2026-01-08T12:00:00+00:00", "cancelled_at": None}
    output.fields(f"tenant {SLUG}", record,
                  [Col("slug", "slug"), Col("legal_hold", "legal_hold", "yesno"),
                   Col("hold_until", "hold_until", "time"), Col("last_error", "last_error"),
                   Col("created_at", "created_at", "time"),
                   Col("cancelled_at", "cancelled_at", "time")], Format.table)
    out = capsys.readouterr().out
    body = [x for x in out.splitlines() if x.startswith("│")]
    assert len(body) == 3, out  # slug, legal_hold, created_at: nothing empty
    assert "False" not in out and "None" not in out
    assert re.search(r"legal_hold\s+│ no\b", out)
    assert "2026-01-08 12:00 UTC (2d ago)" in out  # as the report says a time


def test_a_piped_message_is_one_line_at_80_columns(piped: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    line = (f"next: `tenantctl --config /home/operator/fleets/production/tenantctl.toml "
            f"tenant create {SLUG} --region eu-central`")
    output.say(line)
    assert capsys.readouterr().out == line + "\n"


def test_dash_is_stdout(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert output.is_stdout("-") and not output.is_stdout("./-") and not output.is_stdout(None)
    output.write_text_to("-", "<html></html>")
    assert capsys.readouterr().out == "<html></html>"
