"""`tenantctl catalog …`: the orchestrator's own database."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from cli.common import JsonOpt, State, current_config
from cli.output import print_json, say

if TYPE_CHECKING:
    from orchestrator.config import Config

catalog_app = typer.Typer(no_args_is_help=True, help="The orchestrator's own database.")


def upgrade_catalog(cfg: Config) -> dict[str, Any]:
    from orchestrator.services import fleet_setup

    return fleet_setup.upgrade_catalog(cfg, State.actor)


@catalog_app.command("upgrade")
def catalog_upgrade(as_json: JsonOpt = False) -> None:
    """Bring the catalog schema to head and sync regions/servers from the config."""
    result = upgrade_catalog(current_config())
    if as_json:
        print_json(result)
        return
    if result["from"] == result["to"]:
        say(f"catalog already at {result['to']}")
    else:
        say(f"catalog upgraded: {result['from'] or 'empty'} -> {result['to']}")
    for line in result["topology"]:
        say(line)
