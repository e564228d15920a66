"""`tenantctl audit …`: who did what, when."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import open_fleet
from cli.output import print_json, table

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
audit_app = typer.Typer(no_args_is_help=True, help="Who did what, when.")


@audit_app.command("list")
def audit_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    since: Annotated[str | None, typer.Option(
        help="ISO-8601 time, today, yesterday, or e.g. 7d / 12h.")]
    = None,
    action: Annotated[str | None, typer.Option(help="Only actions starting with this.")]
    = None,
    limit: Annotated[int, typer.Option(min=1)] = 200,
    as_json: JsonOpt = False,
) -> None:
    """The audit log, newest first."""
    from orchestrator.adapters import clock
    from orchestrator.domain.durations import parse_since
    from orchestrator.services import audit_log

    start = parse_since(since, clock.utcnow(), "since") if since else None
    fleet = open_fleet()
    try:
        rows = audit_log.events(fleet, tenant=tenant, since=start, action=action, limit=limit)
    finally:
        fleet.close()
    if as_json:
        print_json(rows)
        return
    table(None, ["at", "actor", "action", "tenant", "outcome", "detail"],
          [[r["at"][:19], r["actor"], r["action"], r["tenant"], r["outcome"],
            ", ".join(f"{k}={v}" for k, v in r["detail"].items())] for r in rows])
