"""`tenantctl server …`: drain a server, retire it, let it accept tenants again; and
the mover that drains and `region rebalance` move tenants with."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import JsonOpt, open_fleet
from cli.complete import complete_servers
from cli.confirm import YesOpt, confirm
from cli.output import print_json, progress_bar, say
from orchestrator.domain.errors import ExitCode

if TYPE_CHECKING:
    from orchestrator.domain.rebalance import PlannedMove
    from orchestrator.services.servers import Mover, TenantMove

server_app = typer.Typer(no_args_is_help=True,
                         help="Servers: drain, retire, accept tenants again.")

ServerArg = Annotated[str, typer.Argument(help="The server (its name in tenantctl.toml).",
                                          autocompletion=complete_servers)]
ConcurrencyOpt = Annotated[int, typer.Option(help="Tenant moves in flight at once.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show the plan; change "
                                         "nothing.")]


def _mover() -> Mover:
    """The one tenant mover drains and rebalances use: `tenant move`'s service."""
    from orchestrator.services.move import move_tenant

    return move_tenant


def _check_concurrency(concurrency: int) -> None:
    from orchestrator.domain.errors import InvalidInput

    if concurrency < 1:
        raise InvalidInput(f"{{field}} must be at least 1, got {concurrency}",
                           field="concurrency")


def plan_lines(moves: tuple[PlannedMove, ...]) -> list[str]:
    return [f"  {m.slug}: {m.source} -> {m.target}" for m in moves]


def run_moves(label: str, total: int, as_json: bool,
              work: Callable[[Callable[[TenantMove], None]], Any]) -> Any:
    """Run ``work(progress)`` with a progress bar on a terminal (each tenant's line
    printed above it), else each line as it comes (none with --json)."""
    bar = progress_bar(label, as_json, time_left=True)
    if bar is None:
        return work(lambda r: None if as_json else say(r.describe()))
    with bar:
        task = bar.add_task(label, total=total)

        def progress(r: TenantMove) -> None:
            bar.console.print(r.describe(), markup=False, highlight=False)
            bar.advance(task)

        return work(progress)


@server_app.command("drain")
def drain(name: ServerArg, concurrency: ConcurrencyOpt = 1, dry_run: DryRunOpt = False,
          yes: YesOpt = False, as_json: JsonOpt = False) -> None:
    """Stop placing tenants on NAME and move every tenant off it to the least-filled
    other servers of its region (each by `tenant move`). Resumable: run it again to
    continue. Refuses, changing nothing, when the region lacks room. Exit 1 if a
    tenant could not move (the others have)."""
    from orchestrator.services import servers

    _check_concurrency(concurrency)
    fleet = open_fleet()
    try:
        plan = servers.plan_drain(fleet, name)
        if dry_run:
            result = servers.drain(fleet, name, mover=_no_mover, dry_run=True)
            if as_json:
                print_json(result.to_json())
                return
            say(f"would drain {name} ({plan.region}): {len(plan.moves)} tenant(s) to move")
            for line in plan_lines(plan.moves):
                say(line)
            for slug in plan.unmovable:
                say(f"  {slug}: being provisioned, stays until a later run")
            return
        mover = _mover()
        if plan.moves:
            confirm(f"Drain {name}: move {len(plan.moves)} tenant(s) to other servers of "
                    f"{plan.region}?", yes,
                    summary=f"drain {name}: {len(plan.moves)} tenant(s) to move",
                    details=[f"drain {name} ({plan.region}): new tenants go elsewhere, and:",
                             *plan_lines(plan.moves)])
        result = run_moves(f"drain {name}", len(plan.moves) + len(plan.unmovable), as_json,
                           lambda progress: servers.drain(
                               fleet, name, mover=mover, concurrency=concurrency,
                               progress=progress))
    finally:
        fleet.close()
    if as_json:
        print_json(result.to_json())
    else:
        doc = result.to_json()
        say(f"drain {name}: {doc['moved']} moved, {doc['failed']} failed, "
            f"{doc['skipped']} skipped; {doc['remaining']} tenant(s) left on it"
            + ("" if result.ok else f" (run `tenantctl server drain {name}` again)"))
    if not result.ok:
        raise typer.Exit(ExitCode.FAILED)


def _no_mover(*_: Any, **__: Any) -> Any:
    raise AssertionError("a dry run moves nothing")


@server_app.command("retire")
def retire(name: ServerArg, as_json: JsonOpt = False) -> None:
    """Mark an empty server retired: it takes no tenant again. Refuses (exit 4) while
    a tenant is on it (`server drain` first). Then remove it from tenantctl.toml."""
    from orchestrator.services import servers

    fleet = open_fleet()
    try:
        change = servers.retire(fleet, name)
    finally:
        fleet.close()
    if as_json:
        print_json(change.to_json())
    else:
        say(f"{name}: {'retired' if change.changed else change.detail}"
            + (f"; {change.detail}" if change.changed else ""))


@server_app.command("accept")
def accept(name: ServerArg, as_json: JsonOpt = False) -> None:
    """Undo a drain: NAME takes new tenants again (not a retired server)."""
    from orchestrator.services import servers

    fleet = open_fleet()
    try:
        change = servers.accept(fleet, name)
    finally:
        fleet.close()
    if as_json:
        print_json(change.to_json())
    else:
        say(f"{name}: {change.detail}")
