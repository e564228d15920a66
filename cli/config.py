"""`tenantctl config …`: the tenantctl.toml file."""

from __future__ import annotations

import typer

from cli.common import JsonOpt, State, current_config
from cli.output import err, print_json, say

config_app = typer.Typer(no_args_is_help=True, help="The tenantctl.toml file.")



@config_app.command("check")
def config_check(as_json: JsonOpt = False) -> None:
    """Validate the config file, that the master key is readable and (when the
    catalog can be reached) that it is the fleet's (exit 7 if not), and that no
    configured server is another fleet's (exit 6)."""
    from orchestrator.adapters.catalog.db import Catalog
    from orchestrator.adapters.crypto import tenant_keys as keys
    from orchestrator.adapters.crypto.masterkey import load_master_key
    from orchestrator.adapters.postgres import fleet_identity
    from orchestrator.domain.errors import ServerUnavailable

    cfg = current_config()
    key = load_master_key(cfg.master_key)
    catalog = Catalog(cfg, actor=State.actor)
    try:
        view = keys.catalog_view(catalog)
        foreign = [] if isinstance(view, str) else \
            fleet_identity.problems(cfg, catalog.fleet_id())
    finally:
        catalog.dispose()
    if foreign:
        raise ServerUnavailable(foreign[0])
    mixed = None
    if isinstance(view, str):
        catalog_note = f"catalog not read ({view}): master key not compared with it"
    else:
        recorded, wrapped = view
        fleets = keys.fleet_key_elsewhere(key.key_id, recorded, wrapped)
        if fleets is not None:
            raise keys.not_the_fleets_key(key.key_id, fleets)
        mixed = keys.mixed_key_ids(wrapped)
        catalog_note = "the fleet's master key" if recorded or wrapped else \
            "the catalog has no secret yet"
    summary = {"path": str(cfg.path), "regions": {
        r.name: {"backup_store": r.backup_store, "servers": [s.name for s in r.servers]}
        for r in cfg.regions.values()}, "master_key_id": key.key_id,
        "master_key": catalog_note, "mixed_master_keys": mixed,
        "tenant_migrations": str(cfg.tenant_migrations)}
    if as_json:
        print_json(summary)
    else:
        say(f"{cfg.path}: ok ({len(cfg.regions)} regions, {len(cfg.servers)} servers, "
             f"master key {key.key_id}: {catalog_note})")
    if mixed is not None:
        err(f"warning: {mixed} (see `tenantctl doctor`)")
