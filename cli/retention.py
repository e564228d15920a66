"""`tenantctl retention …`: holds, deletions and backup purges, on time, never early."""

from __future__ import annotations

import enum
from typing import Annotated, Any

import typer

from cli import logs
from cli.common import open_fleet
from cli.output import (
    Col,
    Format,
    FormatOpt,
    age,
    emit,
    err,
    output_format,
    print_json,
    records,
    say,
    structured,
    table,
)
from orchestrator.domain.errors import ExitCode

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
NowOpt = Annotated[str | None, typer.Option(
    "--now", help="Plan as if it were this ISO-8601 time (a future time only plans, "
    "with --dry-run).", show_default=False)]


class RetentionStep(enum.StrEnum):
    """`--only`'s choices: orchestrator.domain.jobs.STEP_SPELLINGS."""

    delete = "delete"
    purge = "purge"
    prune = "prune"
    audit = "audit"
    access = "access"


retention_app = typer.Typer(no_args_is_help=True,
                            help="Holds, deletions, backup purges: on time, never early.")


@retention_app.command("run")
def retention_run(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, do nothing.")]
    = False,
    now: NowOpt = None,
    only: Annotated[list[RetentionStep] | None,
                    typer.Option(help="Only these jobs (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Carry out what is due: deletions after the hold, backup purges after
    purge_after, pruning, audit purge. For cron: never prompts, safe to re-run."""
    from orchestrator.adapters import clock
    from orchestrator.domain.jobs import STEPS, parse_steps
    from orchestrator.services import retention

    jobs = parse_steps(o.value for o in only) if only else STEPS
    at = clock.effective_now(now, acting=not dry_run)
    fleet = open_fleet()

    def show_plan(actions: list[Any]) -> None:
        if as_json:
            return
        say(f"retention plan at {at.isoformat()}: "
            + (f"{len(actions)} actions" if actions else "nothing to do"))
        for a in actions:
            say(f"  {a.describe()}")

    def show_step(r: Any) -> None:
        logs.retention_step(r)
        if not as_json:
            say(f"{r.outcome}: {r.action.describe()} — {r.message}")

    try:
        report = retention.run(fleet, at, dry_run=dry_run, jobs=jobs, on_plan=show_plan,
                               on_step=show_step)
    finally:
        fleet.close()
    if as_json:
        print_json(report.to_json())
    elif report.skipped:
        say(f"skipped: {report.skipped}")
    if report.failed:
        raise retention.RetentionError(f"{len(report.failed)} retention steps failed; "
                                       "the next run retries them")


@retention_app.command("status")
def retention_status(now: NowOpt = None, as_json: JsonOpt = False,
                     fmt: FormatOpt = None) -> None:
    """Tenants per state, the next deletions and purges, and anything overdue (exit 11
    when something is overdue, for monitoring)."""
    from orchestrator.adapters import clock
    from orchestrator.services import retention

    out = output_format(fmt, as_json)
    as_json = structured(out)
    at = clock.effective_now(now, acting=False)
    fleet = open_fleet()
    try:
        data = retention.status(fleet, at)
    finally:
        fleet.close()
    if as_json:
        emit(data, out)
    else:
        table("tenants per state", ["state", "tenants"], [[k, v] for k, v in
                                                          data["states"].items()])
        for title, key in (("next deletions", "next_deletions"),
                           ("next purges", "next_purges")):
            # due: "in 3d" against the time planned at (--now), not the wall clock
            records(data[key], [
                Col("tenant", "tenant", whole=True), Col("region", "region", whole=True),
                Col("due", lambda r: r["due_at"] if out == Format.wide
                    else age(r["due_at"], at)),
                Col("legal hold", lambda r: (r["legal_hold_reason"] or "yes")
                    if r["legal_hold"] else "")], out, title=title)
    if data["overdue_count"]:
        if not as_json:
            for kind, rows in data["overdue"].items():
                for r in rows:
                    err(f"overdue {kind[:-1]}: {r['tenant']} was due {r['due_at']}")
        raise typer.Exit(ExitCode.RETENTION)
