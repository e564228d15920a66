"""`tenantctl region …`: regions and their servers."""

from __future__ import annotations

from typing import Any

import typer

from cli.common import JsonOpt, open_reads
from cli.output import print_json, table

region_app = typer.Typer(no_args_is_help=True, help="Regions and their servers.")



@region_app.command("list")
def region_list(as_json: JsonOpt = False) -> None:
    """Regions, their servers, tenants per server and capacity."""
    reads = open_reads()
    try:
        servers = reads.servers()
    finally:
        reads.close()
    if as_json:
        out: dict[str, Any] = {}
        for s in servers:
            region = out.setdefault(s.region, {
                "region": s.region,
                "backup_store": reads.cfg.regions[s.region].backup_store
                if s.region in reads.cfg.regions else None, "servers": []})
            region["servers"].append(s.to_json())
        print_json(list(out.values()))
        return
    table(None, ["region", "server", "tenants", "capacity", "accepting", "template"],
           [[s.region, s.name, s.tenants, s.capacity, "yes" if s.available else "no",
             s.template_revision or "-"] for s in servers])
