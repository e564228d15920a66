"""`tenantctl report`: the fleet against the promises of the privacy policy."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import JsonOpt, open_fleet
from cli.output import is_stdout, print_json, say, write_text_to
from orchestrator.domain.errors import ExitCode


def report(
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained "
                                              "HTML page here (- is stdout: then only "
                                              "the page is printed).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the fleet against the promises of the privacy policy: isolation, region,
    backups, timeliness, audit. Exit 12 when any promise is broken."""
    from orchestrator.domain.errors import InvalidInput
    from orchestrator.services import report as rep

    page_on_stdout = is_stdout(html)
    if page_on_stdout and as_json:
        raise InvalidInput("--html - and --json both write to stdout: give one")
    fleet = open_fleet()
    try:
        data = rep.build(fleet)
    finally:
        fleet.close()
    if html is not None:
        write_text_to(html, rep.render_html(data))
    if page_on_stdout:
        pass  # the page is the output; the exit code still says whether promises hold
    elif as_json:
        print_json(data)
    else:
        render_text(data)
    if not data["ok"]:
        raise typer.Exit(ExitCode.PROMISE_BROKEN)


def render_text(data: dict[str, Any]) -> None:
    """The summary first, then which fleet, then each promise with its evidence and up
    to 20 offenders, each followed by its remedy."""
    from orchestrator.domain.humanize import plural, utc_minute

    fleet = data["fleet"]
    say(data["summary"])
    say(f"fleet {fleet['fleet_id'] or '(no id yet)'}, catalog {fleet['catalog']}, "
        f"tenantctl {data['tenantctl_version']}, "
        f"{utc_minute(datetime.fromisoformat(data['generated_at']))}")
    for p in data["promises"]:
        say(f"{'PASS' if p['ok'] else 'FAIL'}  {p['title']}")
        for line in p["evidence"]:
            say(f"      {line}")
        for f in p["failures"][:20]:
            say(f"    ! {f['subject']}: {f['problem']}")
            say(f"      remedy: {f['remedy']}")
        if len(p["failures"]) > 20:
            say(f"    … and {plural(len(p['failures']) - 20, 'more offender')} "
                "(--json or --html for all)")
    from orchestrator.services.report import storage_lines

    lines = storage_lines(data.get("storage"))
    if lines:
        say(f"storage quotas: {lines[0]}")
        for line in lines[1:21]:
            say(f"      {line}")
