"""`tenantctl audit …`: who did what, when."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import open_fleet
from cli.output import Col, FormatOpt, output_format, records

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
    fmt: FormatOpt = None,
) -> None:
    """The audit log, newest first."""
    from orchestrator.adapters import clock
    from orchestrator.domain.durations import parse_since
    from orchestrator.services import audit_log

    out = output_format(fmt, as_json)
    start = parse_since(since, clock.utcnow(), "since") if since else None
    fleet = open_fleet()
    try:
        rows = audit_log.events(fleet, tenant=tenant, since=start, action=action, limit=limit)
    finally:
        fleet.close()
    records(rows, AUDIT_COLUMNS, out, empty="no audit events")


AUDIT_COLUMNS = [
    Col("id", "id", whole=True, wide=True), Col("at", "at", "time"),
    Col("actor", "actor", whole=True), Col("action", "action", whole=True),
    Col("tenant", "tenant", whole=True), Col("region", "region", whole=True, wide=True),
    Col("outcome", "outcome"),
    Col("detail", lambda r: ", ".join(f"{k}={v}" for k, v in (r["detail"] or {}).items())),
]
