"""`tenantctl region …`: regions and their servers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from cli.common import JsonOpt, open_reads
from cli.output import Col, FormatOpt, emit, output_format, records, structured

if TYPE_CHECKING:
    from orchestrator.adapters.catalog.reads import ServerRow

region_app = typer.Typer(no_args_is_help=True, help="Regions and their servers.")



@region_app.command("list")
def region_list(as_json: JsonOpt = False, fmt: FormatOpt = None) -> None:
    """Regions, their servers, tenants per server and capacity."""
    out_fmt = output_format(fmt, as_json)
    reads = open_reads()
    try:
        servers = reads.servers()
    finally:
        reads.close()
    if structured(out_fmt):
        out: dict[str, Any] = {}
        for s in servers:
            region = out.setdefault(s.region, {
                "region": s.region,
                "backup_store": reads.cfg.regions[s.region].backup_store
                if s.region in reads.cfg.regions else None, "servers": []})
            region["servers"].append(s.to_json())
        emit(list(out.values()), out_fmt)
        return
    records([{"region": s.region, "server": s.name, "tenants": s.tenants,
              "capacity": s.capacity, "accepting": _accepting(s),
              "template": s.template_revision} for s in servers],
            [Col("region", "region", whole=True), Col("server", "server", whole=True),
             Col("tenants", "tenants"), Col("capacity", "capacity"),
             Col("accepting", "accepting"),
             Col("template", "template", whole=True)], out_fmt, empty="no servers")


def _accepting(s: ServerRow) -> str:
    """yes, or why not: retired, drained (`server drain`), not in the config."""
    if s.retired_at is not None:
        return "no (retired)"
    if not s.accepting:
        return "no (drained)"
    return "yes" if s.available else "no (not in the config)"
