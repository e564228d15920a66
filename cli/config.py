"""`tenantctl config …`: the tenantctl.toml file."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from cli.common import JsonOpt, State, current_config
from cli.output import err, print_json, say

if TYPE_CHECKING:
    from orchestrator.config import Config

config_app = typer.Typer(no_args_is_help=True, help="The tenantctl.toml file.")


@config_app.command("check")
def config_check(as_json: JsonOpt = False) -> None:
    """Validate the config file, that the master key is readable and (when the
    catalog can be reached) that it is the fleet's (exit 7 if not), and that no
    configured server is another fleet's (exit 6). Says where the file was found
    (and where it was looked for) and which keys came from the environment."""
    from orchestrator.services import fleet_setup

    cfg = current_config()
    ports = _local_ports(cfg)
    summary = fleet_setup.check_config(cfg, State.actor)
    summary["local_ports"] = ports
    mixed, catalog_note = summary["mixed_master_keys"], summary["master_key"]
    if as_json:
        print_json(summary)
    else:
        say(f"{cfg.path}: ok ({len(cfg.regions)} regions, {len(cfg.servers)} servers, "
            f"master key {summary['master_key_id']}: {catalog_note})")
        lookup = summary["lookup"]
        if lookup is not None:
            say(f"found by {lookup['found_by']}; looked at: {', '.join(lookup['tried'])}")
        for o in summary["from_environment"]:
            say(f"{o['key']} from ${o['variable']}: {o['value']}")
        for server, logical in summary["logical_moves"].items():
            if logical["ready"] is False:
                say(f"note: {server} cannot move tenants by logical replication "
                    f"({'; '.join(logical['why'])}): its moves use pg_dump")
    if mixed is not None:
        err(f"warning: {mixed} (see `tenantctl doctor`)")


def _local_ports(cfg: Config) -> list[str]:
    """Embedded clusters whose port is not the config's (warned on stderr)."""
    if not any(s.data_dir is not None for s in cfg.servers):
        return []
    from cli.local import warn_local_ports

    return warn_local_ports(cfg)
