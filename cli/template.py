"""`tenantctl template …`: per-server template databases (and their spare clones)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import open_fleet
from cli.complete import complete_servers
from cli.output import say

template_app = typer.Typer(no_args_is_help=True, help="Per-server template databases.")


@template_app.command("build")
def template_build(server: Annotated[str | None, typer.Option(
        help="One server (default: every server).",
        autocompletion=complete_servers)] = None) -> None:
    """Create or upgrade each server's template database to the fleet's target
    revision (head until a rollout sets it), then fill its pool of spare clones
    (tenants.spare_databases)."""
    from orchestrator.services import spares, templates

    fleet = open_fleet()
    try:
        names = [server] if server else [s.name for s in fleet.cfg.servers]
        for name in names:
            target = fleet.target_revision(fleet.cfg.server(name).region)
            say(f"{name}: template at {templates.build(fleet, name, target)}")
            if fleet.cfg.spare_databases:
                say(f"{name}: {spares.fill(fleet, name)} spare database(s) made")
    finally:
        fleet.close()
