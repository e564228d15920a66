"""`tenantctl report`: the fleet against the promises of the privacy policy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import JsonOpt, open_fleet
from cli.output import print_json, say
from orchestrator.domain.errors import ExitCode


def report(
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained "
                                              "HTML page here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the fleet against the promises of the privacy policy: isolation, region,
    backups, timeliness, audit. Exit 12 when any promise is broken."""
    from orchestrator.services import report as rep

    fleet = open_fleet()
    try:
        data = rep.build(fleet)
    finally:
        fleet.close()
    if html is not None:
        html.write_text(rep.render_html(data), encoding="utf-8")
    if as_json:
        print_json(data)
    else:
        for p in data["promises"]:
            say(f"{'PASS' if p['ok'] else 'FAIL'}  {p['title']}")
            for line in p["evidence"]:
                say(f"      {line}")
            for line in p["offenders"][:20]:
                say(f"    ! {line}")
    if not data["ok"]:
        raise typer.Exit(ExitCode.PROMISE_BROKEN)
