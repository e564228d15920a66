"""`tenantctl region …`: regions and their servers."""

from __future__ import annotations

from typing import Any

import typer

from cli.common import JsonOpt, open_reads
from cli.output import Col, FormatOpt, emit, output_format, records, structured

region_app = typer.Typer(no_args_is_help=True, help="Regions and their servers.")



@region_app.command("list")
def region_list(as_json: JsonOpt = False, fmt: FormatOpt = None) -> None:
    """Regions, their servers, tenants per server and capacity, and each server's
    connection budget (used/total; max_connections is read from each server)."""
    from orchestrator.services.budget import read_budgets

    out_fmt = output_format(fmt, as_json)
    reads = open_reads()
    try:
        servers = reads.servers()
        placed = reads.placed_plans()
    finally:
        reads.close()
    budgets = read_budgets(reads.cfg, placed, [s.name for s in servers])
    if structured(out_fmt):
        out: dict[str, Any] = {}
        for s in servers:
            region = out.setdefault(s.region, {
                "region": s.region,
                "backup_store": reads.cfg.regions[s.region].backup_store
                if s.region in reads.cfg.regions else None, "servers": []})
            b = budgets.get(s.name)
            region["servers"].append({**s.to_json(),
                                      "connection_budget": b.to_json() if b else None})
        emit(list(out.values()), out_fmt)
        return
    records([{"region": s.region, "server": s.name, "tenants": s.tenants,
              "capacity": s.capacity, "accepting": s.available,
              "template": s.template_revision,
              "budget": budgets[s.name].text() if s.name in budgets else None}
             for s in servers],
            [Col("region", "region", whole=True), Col("server", "server", whole=True),
             Col("tenants", "tenants"), Col("capacity", "capacity"),
             Col("accepting", "accepting", "yesno"),
             Col("template", "template", whole=True),
             Col("connections", "budget", whole=True)], out_fmt, empty="no servers")
