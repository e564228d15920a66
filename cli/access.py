"""`tenantctl access …`: time-limited support access to one tenant's database."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import ID_MAX, open_fleet
from cli.complete import SlugArg
from cli.output import Col, FormatOpt, err, output_format, plain, print_json, records, say
from orchestrator.domain.errors import ExitCode

access_app = typer.Typer(no_args_is_help=True,
                         help="Time-limited, audited support access to a tenant's data.")


@access_app.command("grant")
def grant(
    slug: SlugArg,
    to: Annotated[str, typer.Option("--to", help="Who gets access (audited).")],
    ttl: Annotated[str, typer.Option(help="How long: e.g. 30m, 2h, 1d (at most 7d).")],
    reason: Annotated[str, typer.Option(help="The approval / ticket (audited).")],
    read_only: Annotated[bool, typer.Option("--read-only/--read-write",
                                            help="Read-only unless said otherwise.")] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a temporary login role for SLUG's database; prints its connection
    string once (the password expires with the grant and is not stored)."""
    from orchestrator.services import access

    delta = access.parse_ttl(ttl, "ttl")
    fleet = open_fleet()
    try:
        res = access.grant(fleet, slug, to=to, ttl=delta, reason=reason, read_only=read_only)
    finally:
        fleet.close()
    if as_json:
        print_json(res)
        return
    say(f"grant {res['id']}: {res['to']} may {'read' if read_only else 'read and write'} "
        f"{slug} until {res['expires_at']}")
    say("connection string (shown once):")
    plain(res["dsn"])


@access_app.command("list")
def list_(
    all_: Annotated[bool, typer.Option("--all", help="Include ended grants.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    fmt: FormatOpt = None,
) -> None:
    """Support grants (live ones, or all)."""
    from orchestrator.services import access

    out = output_format(fmt, as_json)
    fleet = open_fleet()
    try:
        rows = access.grants(fleet, include_ended=all_)
    finally:
        fleet.close()
    records(rows, GRANT_COLUMNS, out, empty="no support grants")


GRANT_COLUMNS = [
    Col("id", "id", whole=True), Col("tenant", "tenant", whole=True),
    Col("to", "to", whole=True),
    Col("mode", lambda r: "read-only" if r["read_only"] else "read-write"),
    Col("role", "role", whole=True, wide=True), Col("granted by", "granted_by", wide=True),
    Col("created", "created_at", "time", wide=True),
    Col("expires", "expires_at", "time"), Col("status", "status"), Col("reason", "reason"),
]


@access_app.command("revoke")
def revoke(
    grant_id: Annotated[int | None, typer.Argument(help="The grant's id.", min=1,
                                                                 max=ID_MAX)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every live grant (breach "
                                       "response).")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """End a grant now: sessions ended, role dropped."""
    from orchestrator.domain.errors import InvalidInput
    from orchestrator.services import access

    if (grant_id is None) == (not all_):
        raise InvalidInput("give a grant id or --all")
    fleet = open_fleet()
    try:
        if all_:
            res = access.revoke_all(fleet)
            ended, failed = res.revoked, res.failed
        else:
            ended, failed = access.revoke(fleet, grant_id), {}
    finally:
        fleet.close()
    if as_json:
        print_json({"revoked": ended, "failed": [{"id": k, "error": v}
                                                 for k, v in failed.items()]})
    else:
        say(f"revoked {len(ended)} grant(s)" + (f": {ended}" if ended else ""))
        for gid, why in failed.items():
            err(f"error: grant {gid} not revoked: {why}")
    if failed:
        raise typer.Exit(ExitCode.FAILED)  # the others are revoked; re-run to retry these
