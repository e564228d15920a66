"""`tenantctl doctor`: is the fleet healthy, and what exactly to do if not."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import current_config, open_fleet
from cli.complete import complete_regions
from cli.output import print_json, say
from orchestrator.domain.errors import ExitCode

if TYPE_CHECKING:
    from orchestrator.domain.health import Finding


def doctor(
    region: Annotated[str | None, typer.Option(help="Only this region's servers, "
                                               "tenants and store.",
                                               autocompletion=complete_regions)] = None,
    fix: Annotated[bool, typer.Option("--fix", help="Repair what can be repaired; asks "
                                      "before anything destructive.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="With --fix: do the destructive "
                                      "repairs without asking.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Compare the catalog with every server and store: orphans, missing objects,
    privileges, backups, revisions, overdue retention, unreachable or full servers.
    Exit 14 when anything at error severity is found (after --fix: remains)."""
    from orchestrator.domain import health
    from orchestrator.services import doctor as doc

    cfg = current_config()
    if any(s.data_dir is not None for s in cfg.servers):
        from cli.local import warn_local_ports

        warn_local_ports(cfg)  # an edited port explains the unreachable servers below
    fleet = open_fleet()
    try:
        fixes: list[doc.FixResult] = []
        if fix:
            interactive = sys.stdin.isatty() and not as_json

            def confirm(x: Finding) -> bool:
                if yes:
                    return True
                if not interactive:
                    return False  # nobody to ask: destructive repairs need --yes
                return typer.confirm(f"{x.describe()}\n  -> {x.remedy}\n  do it?",
                                     default=False, err=True)

            def progress(r: doc.FixResult) -> None:
                if not as_json:
                    say(f"{r.outcome:>7}  {r.finding.subject}: {r.detail}")

            fixes = doc.repair(fleet, region, confirm, progress)
        findings = doc.run(fleet, region)
    finally:
        fleet.close()
    if as_json:
        print_json({"ok": not health.has_errors(findings),
                    "findings": [x.to_json() for x in findings],
                    "fixes": [r.to_json() for r in fixes]})
    else:
        for x in findings:
            say(f"{x.severity.upper():<7} {x.code}  {x.subject}: {x.message}")
            say(f"        -> {x.remedy}")
        counts = {s: sum(x.severity == s for x in findings) for s in (health.ERROR, health.WARNING)}
        if not any(counts.values()):
            say("healthy: catalog, servers and stores agree")
        else:
            say(f"{counts[health.ERROR]} error(s), {counts[health.WARNING]} warning(s)"
                + ("" if fix else "; `tenantctl doctor --fix` repairs those it can"))
    if health.has_errors(findings):
        raise typer.Exit(ExitCode.DOCTOR_ERRORS)  # something at error severity remains
