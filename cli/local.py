"""`tenantctl local …`, `init --local` and `quickstart`: the embedded fleet on this
machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.catalog import upgrade_catalog
from cli.common import JsonOpt, State, current_config
from cli.output import Col, FormatOpt, err, output_format, records, say, structured
from cli.region import region_list
from cli.tenant import tenant_list
from orchestrator.domain.errors import ExitCode

if TYPE_CHECKING:
    from orchestrator.config import Config

local_app = typer.Typer(no_args_is_help=True, help="Run the embedded local fleet.")



# `init` and `quickstart` are root commands (cli/main.py registers them)


def init(
    local: Annotated[bool, typer.Option("--local", help="Write a config for the embedded "
                                        "two-region fleet on this machine.")] = False,
    state_dir: Annotated[Path, typer.Option(help="Where data dirs, keys and backups go.")]
    = Path(".tenantctl"),
    force: Annotated[bool, typer.Option(help="Rewrite an existing config (keeps keys).")]
    = False,
    base_port: Annotated[int | None, typer.Option(
        help="The first cluster's port; the next clusters' are the next ports (default: the "
        "first free from 25432, below the ephemeral ports).", show_default=False)] = None,
    pooler: Annotated[bool | None, typer.Option(
        "--pooler/--no-pooler", help="A PgBouncer beside each cluster (default: when "
        "pgbouncer is installed).", show_default=False)] = None,
    no_start: Annotated[bool, typer.Option(
        "--no-start", help="Only write the config, keys and passfile; start nothing "
        "(`tenantctl local up` and `tenantctl catalog upgrade` later).")] = False,
    servers_per_region: Annotated[int, typer.Option(
        "--servers-per-region", help="Embedded clusters per region (each a server: "
        "<region>-1, <region>-2 ...), to try drains, rebalances and moves.")] = 1,
) -> None:
    """Write a tenantctl.toml (only --local for now), start it and upgrade the catalog."""
    from orchestrator.config import find_config_path
    from orchestrator.devfleet import localfleet
    from orchestrator.domain.errors import InvalidInput

    if not local:
        raise InvalidInput("only `tenantctl init --local` exists; for production write "
                           "tenantctl.toml yourself (see README) or use ansible/")
    path = find_config_path(State.config_path)
    res = localfleet.init_local(path, state_dir, force=force, base_port=base_port,
                                servers_per_region=servers_per_region, pooler=pooler)
    say(f"{'wrote' if res.created else 'kept existing'} {res.config_path}")
    for warning in res.warnings:
        err(f"warning: {warning}")
    if not res.created and servers_per_region != 1:
        say(f"note: --servers-per-region {servers_per_region} applies to a new config "
            "(--force rewrites it)")
    cfg = _config_at(path)
    if no_start:
        ports = ", ".join(f"{s.name} on {s.port}" for s in localfleet.local_servers(cfg))
        say(f"not started ({ports}); next: `tenantctl --config {res.config_path} local up` "
            "then `catalog upgrade`")
        return
    for line in localfleet.up(cfg):
        say(line)
    upgrade_catalog(cfg)


def _config_at(path: Path) -> Config:
    from orchestrator.config import load_config

    return load_config(path)


@local_app.command("up")
def local_up() -> None:
    """Start the local clusters (initialising them on first use)."""
    from orchestrator.devfleet import localfleet

    for line in localfleet.up(current_config()):
        say(line)


def warn_local_ports(cfg: Config) -> list[str]:
    """The embedded clusters whose port is not the config's, each said on stderr
    (`config check`, `doctor`, `local status`); [] for a fleet with none."""
    from orchestrator.devfleet import localfleet

    problems = localfleet.port_problems(cfg)
    for line in problems:
        err(f"warning: {line}")
    return problems


@local_app.command("down")
def local_down() -> None:
    """Stop the local clusters."""
    from orchestrator.devfleet import localfleet

    for line in localfleet.down(current_config()):
        say(line)


@local_app.command("status")
def local_status(as_json: JsonOpt = False, fmt: FormatOpt = None) -> None:
    """Show whether each local cluster runs."""
    from orchestrator.devfleet import localfleet

    out = output_format(fmt, as_json)
    rows = localfleet.status(current_config())
    records([{"server": r.server, "region": r.region, "port": r.port,
              "data_dir": str(r.data_dir), "running": r.running, "pid": r.pid,
              "status": r.detail} for r in rows],
            [Col("server", "server", whole=True), Col("region", "region", whole=True),
             Col("port", "port", whole=True), Col("status", "status"), Col("pid", "pid"),
             Col("data dir", "data_dir", whole=True)], out, empty="no local servers")
    if not structured(out) and not all(r.running for r in rows):  # JSON: as before, 0
        raise typer.Exit(ExitCode.NOT_FOUND)


def quickstart(state_dir: Annotated[Path, typer.Option(help="State directory.")]
               = Path(".tenantctl"),
               servers_per_region: Annotated[int, typer.Option(
                   "--servers-per-region", help="Embedded clusters per region (for a new "
                   "config; an existing one is kept).")] = 1) -> None:
    """Set up the embedded two-region fleet, a demo tenant per region, and show it."""
    from orchestrator.config import find_config_path
    from orchestrator.devfleet import quickstart as qs

    path = find_config_path(State.config_path)
    for line in qs.run(path, state_dir, servers_per_region=servers_per_region):
        say(line)
    State.config_path = str(path)
    region_list()
    tenant_list()
    say(f"\nnext: `tenantctl --config {path} tenant create acme --region eu-central`")
