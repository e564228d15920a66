"""`tenantctl pooler …`: the PgBouncer in front of a server (its files from the
catalog, RELOAD; is it up, are its files in step)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import JsonOpt, open_fleet
from cli.output import err, print_json, say
from orchestrator.domain.errors import ExitCode

pooler_app = typer.Typer(no_args_is_help=True, help="The connection pooler (PgBouncer) "
                         "in front of each server that has one.")

ServerArg = Annotated[str | None, typer.Argument(
    help="Only this server (default: every server with a pooler).", show_default=False)]


def _servers(fleet: object, server: str | None) -> list[str]:
    from orchestrator.domain.errors import InvalidInput
    from orchestrator.services import pooler

    pooled = pooler.pooled_servers(fleet)  # type: ignore[arg-type]
    if server is None:
        return pooled
    if server not in pooled:
        raise InvalidInput(f"server {server!r} has no pooler (servers with one: "
                           f"{', '.join(pooled) or 'none'})")
    return [server]


@pooler_app.command("sync")
def pooler_sync(server: ServerArg = None, as_json: JsonOpt = False) -> None:
    """Write each pooler's database list and auth file from the catalog (every
    verifier computed again) and RELOAD it."""
    from orchestrator.services import pooler

    fleet = open_fleet()
    try:
        results = [pooler.sync(fleet, name) for name in _servers(fleet, server)]
    finally:
        fleet.close()
    if as_json:
        print_json([r.to_json() for r in results])
    else:
        for r in results:
            if r.warning is None:
                say(f"{r.server}: pooler {r.pooler}: {r.tenants} tenant database(s) listed, "
                    f"{'files written' if r.written else 'files unchanged'}, RELOAD done")
            else:
                err(f"{r.server}: {r.warning}")
    if any(r.warning for r in results):
        raise typer.Exit(ExitCode.UNAVAILABLE)


@pooler_app.command("status")
def pooler_status(server: ServerArg = None, as_json: JsonOpt = False) -> None:
    """Is each pooler up, and do its files say what the catalog says?"""
    from orchestrator.services import pooler

    fleet = open_fleet()
    try:
        health = [pooler.check(fleet, name) for name in _servers(fleet, server)]
    finally:
        fleet.close()
    if as_json:
        print_json([h.to_json() for h in health])
        return
    if not health:
        say("no server has a pooler")
    for h in health:
        state = "up" if h.up else f"down ({h.down_reason})"
        files = "files in step with the catalog" if not h.stale else \
            f"stale: {', '.join(h.stale)} (tenantctl pooler sync)"
        say(f"{h.server}: pooler {h.pooler}: {state}; {files}")
