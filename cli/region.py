"""`tenantctl region …`: regions and their servers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import JsonOpt, open_fleet, open_reads
from cli.complete import complete_regions
from cli.confirm import YesOpt, confirm
from cli.output import Col, FormatOpt, emit, output_format, print_json, records, say, structured
from orchestrator.domain.errors import ExitCode

if TYPE_CHECKING:
    from orchestrator.adapters.catalog.reads import ServerRow

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
              "capacity": s.capacity, "accepting": _accepting(s),
              "template": s.template_revision,
              "budget": budgets[s.name].text() if s.name in budgets else None}
             for s in servers],
            [Col("region", "region", whole=True), Col("server", "server", whole=True),
             Col("tenants", "tenants"), Col("capacity", "capacity"),
             Col("accepting", "accepting"),
             Col("template", "template", whole=True),
             Col("connections", "budget", whole=True)], out_fmt, empty="no servers")


def _accepting(s: ServerRow) -> str:
    """yes, or why not: retired, drained (`server drain`), not in the config."""
    if s.retired_at is not None:
        return "no (retired)"
    if not s.accepting:
        return "no (drained)"
    return "yes" if s.available else "no (not in the config)"


@region_app.command("rebalance")
def region_rebalance(
    region: Annotated[str, typer.Argument(help="The region.",
                                          autocompletion=complete_regions)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; change "
                                          "nothing.")] = False,
    concurrency: Annotated[int, typer.Option(help="Tenant moves in flight at once.")] = 1,
    yes: YesOpt = False, as_json: JsonOpt = False,
) -> None:
    """Move tenants between the region's servers until the fullest holds at most
    1.2x the mean, with the fewest moves (each by `tenant move`). Never across regions;
    drained and retired servers take no part. Exit 1 if a tenant could not move."""
    from cli.server import _check_concurrency, _mover, plan_lines, run_moves
    from orchestrator.services import servers

    _check_concurrency(concurrency)
    fleet = open_fleet()
    try:
        plan = servers.plan_rebalance(fleet, region)
        if dry_run or not plan.moves:
            if as_json:
                print_json(servers.RebalanceResult(plan, dry_run).to_json())
                return
            counts = ", ".join(f"{n} {c}" for n, c in plan.before.items())
            if not plan.moves:
                say(f"{region} needs no moves ({counts}; mean {plan.mean:.1f})")
                return
            after = ", ".join(f"{n} {c}" for n, c in plan.after.items())
            say(f"would rebalance {region}: {len(plan.moves)} move(s); now {counts}, "
                f"then {after} (limit {plan.limit:.1f})")
            for line in plan_lines(plan.moves):
                say(line)
            return
        mover = _mover()
        confirm(f"Rebalance {region}: {len(plan.moves)} tenant move(s)?", yes,
                summary=f"rebalance {region}: {len(plan.moves)} tenant move(s)",
                details=[f"rebalance {region}:", *plan_lines(plan.moves)])
        result = run_moves(f"rebalance {region}", len(plan.moves), as_json,
                           lambda progress: servers.rebalance(
                               fleet, region, mover=mover, concurrency=concurrency,
                               progress=progress))
    finally:
        fleet.close()
    if as_json:
        print_json(result.to_json())
    else:
        doc = result.to_json()
        after = ", ".join(f"{n} {c}" for n, c in result.plan.after.items())
        say(f"rebalance {region}: {doc['moved']} moved, {doc['failed']} failed ({after})")
    if not result.ok:
        raise typer.Exit(ExitCode.FAILED)
