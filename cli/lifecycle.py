"""Lifecycle commands: `tenant cancel|reactivate|suspend|resume|legal-hold|export`,
`retention run|status`, `audit list`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import open_fleet, print_json, say, table
from orchestrator.domain.errors import ExitCode

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
NowOpt = Annotated[str | None, typer.Option(
    "--now", help="Plan as if it were this ISO-8601 time (a future time only plans, "
    "with --dry-run).", show_default=False)]

retention_app = typer.Typer(no_args_is_help=True,
                            help="Holds, deletions, backup purges: on time, never early.")
audit_app = typer.Typer(no_args_is_help=True, help="Who did what, when.")


def _confirm(question: str, yes: bool) -> None:
    from orchestrator.domain.errors import InvalidInput

    if yes:
        return
    if not sys.stdin.isatty():
        raise InvalidInput(f"{question} — confirm with --yes (no terminal to ask on)")
    if not typer.confirm(question, default=False):
        raise typer.Exit(ExitCode.FAILED)


def _print_transition(res: Any, as_json: bool) -> None:
    if as_json:
        print_json(res.to_json())
        return
    line = f"tenant {res.tenant}: {res.action} → {res.state}"
    if res.hold_until is not None:
        line += f" (hold until {res.hold_until.isoformat()})"
    say(line)
    if res.backup_id is not None:
        say(f"backup {res.backup_id} taken")


def _transition(action: str, slug: str, as_json: bool) -> None:
    """reactivate / suspend / resume: the same shape, one orchestrator call each."""
    from orchestrator.services import lifecycle

    fleet = open_fleet()
    try:
        res = getattr(lifecycle, action)(fleet, slug)
    finally:
        fleet.close()
    _print_transition(res, as_json)


def register_tenant_commands(tenant_app: typer.Typer) -> None:  # noqa: C901 - one per command
    @tenant_app.command("cancel")
    def cancel(slug: str, yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")]
               = False, as_json: JsonOpt = False) -> None:
        """Cancel: writes stop now, data stays readable and exportable for the hold
        (30 days by default), then retention deletes the database. Takes a backup."""
        from backups.service import BackupError
        from orchestrator.services import lifecycle

        fleet = open_fleet()
        try:
            tenant = fleet.get_tenant(slug)
            _confirm(f"Cancel tenant {slug!r} ({tenant.region})? Its database is deleted "
                     f"{fleet.cfg.lifecycle.hold_days} days from now unless reactivated.", yes)
            res = lifecycle.cancel(fleet, slug)
        finally:
            fleet.close()
        _print_transition(res, as_json)
        if res.backup_error:
            raise BackupError(f"tenant {slug!r} is cancelled, but its backup failed: "
                               f"{res.backup_error}; run `tenantctl backup run {slug}`")

    @tenant_app.command("reactivate")
    def reactivate(slug: str, as_json: JsonOpt = False) -> None:
        """Undo a cancellation during the hold: active again, writes allowed."""
        _transition("reactivate", slug, as_json)

    @tenant_app.command("suspend")
    def suspend(slug: str, as_json: JsonOpt = False) -> None:
        """Block the tenant's connections (open sessions are ended); no hold starts."""
        _transition("suspend", slug, as_json)

    @tenant_app.command("resume")
    def resume(slug: str, as_json: JsonOpt = False) -> None:
        """Allow a suspended tenant's connections again."""
        _transition("resume", slug, as_json)

    @tenant_app.command("legal-hold")
    def legal_hold(
        slug: str,
        on: Annotated[bool | None, typer.Option("--on/--off", help="Place or lift it.",
                                                show_default=False)] = None,
        reason: Annotated[str, typer.Option(help="Why (audited).")] = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Block deletion and purge of a tenant, whatever the dates, until lifted."""
        from orchestrator.domain.errors import InvalidInput
        from orchestrator.services import lifecycle

        if on is None:
            raise InvalidInput("say --on or --off")
        fleet = open_fleet()
        try:
            res = lifecycle.legal_hold(fleet, slug, on=on, reason=reason)
        finally:
            fleet.close()
        if as_json:
            print_json(res)
        else:
            say(f"tenant {slug}: legal hold {'on' if on else 'off'} ({reason})")

    @tenant_app.command("erase")
    def erase(
        slug: str,
        reason: Annotated[str, typer.Option(help="The request being honoured (audited).")]
        = "",
        yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Erasure on request: no hold. Destroys the tenant's key at once (every backup
        copy becomes unreadable), drops its database and role, deletes its backups."""
        from orchestrator.adapters import clock
        from orchestrator.adapters.catalog.audit import reason_text
        from orchestrator.domain.errors import InvalidInput
        from orchestrator.services import retention

        if not reason_text(reason):
            raise InvalidInput("--reason is required (it is audited)")
        if not yes:
            _confirm(f"Erase tenant {slug!r} now, with every backup? This cannot be undone.",
                     False)
            typed = typer.prompt("Type the tenant's slug to confirm")
            if typed != slug:
                raise InvalidInput("the slug typed does not match: nothing erased")
        fleet = open_fleet()
        try:
            res = retention.erase_tenant(fleet, slug, reason, clock.utcnow())
        finally:
            fleet.close()
        if as_json:
            print_json(res)
        else:
            say(f"tenant {slug} erased: key destroyed, database and role dropped, "
                f"{res['objects_deleted']} backup objects deleted")

    @tenant_app.command("export")
    def export(
        slug: str,
        fmt: Annotated[str, typer.Option("--format", help="sql (a pg_dump script) or csv "
                                         "(a zip, one CSV per table).")],
        output: Annotated[Path, typer.Option(help="File to write.")],
        force: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Export a tenant's data (active, suspended, or cancelled and in its hold)."""
        from orchestrator.services.export import export as do_export

        fleet = open_fleet()
        try:
            res = do_export(fleet, slug, fmt, output, force=force)
        finally:
            fleet.close()
        if as_json:
            print_json(res)
        else:
            say(f"exported {slug} to {res['output']} ({res['size']} bytes)")
            if res["not_included"].get("large_objects"):
                say(f"not included: {res['not_included']['large_objects']} large "
                    "object(s) (CSV has no form for them; --format sql includes them)")


@retention_app.command("run")
def retention_run(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, do nothing.")]
    = False,
    now: NowOpt = None,
    only: Annotated[list[str] | None, typer.Option(
        help="Only these jobs: delete, purge, prune, audit, access (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Carry out what is due: deletions after the hold, backup purges after
    purge_after, pruning, audit purge. For cron: never prompts, safe to re-run."""
    from orchestrator.adapters import clock
    from orchestrator.domain.jobs import STEPS, parse_steps
    from orchestrator.services import retention

    jobs = parse_steps(only) if only else STEPS
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
def retention_status(now: NowOpt = None, as_json: JsonOpt = False) -> None:
    """Tenants per state, the next deletions and purges, and anything overdue (exit 11
    when something is overdue, for monitoring)."""
    from orchestrator.adapters import clock
    from orchestrator.services import retention

    at = clock.effective_now(now, acting=False)
    fleet = open_fleet()
    try:
        data = retention.status(fleet, at)
    finally:
        fleet.close()
    if as_json:
        print_json(data)
    else:
        table("tenants per state", ["state", "tenants"], [[k, v] for k, v in
                                                          data["states"].items()])
        for title, key in (("next deletions", "next_deletions"),
                           ("next purges", "next_purges")):
            table(title, ["tenant", "region", "due", "legal hold"],
                  [[r["tenant"], r["region"], r["due_at"],
                    r["legal_hold_reason"] if r["legal_hold"] else ""] for r in data[key]])
    if data["overdue_count"]:
        if not as_json:
            for kind, rows in data["overdue"].items():
                for r in rows:
                    sys.stderr.write(f"overdue {kind[:-1]}: {r['tenant']} was due "
                                     f"{r['due_at']}\n")
        raise typer.Exit(ExitCode.RETENTION)


@audit_app.command("list")
def audit_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    since: Annotated[str | None, typer.Option(
        help="ISO-8601 time, today, yesterday, or e.g. 7d / 12h.")]
    = None,
    action: Annotated[str | None, typer.Option(help="Only actions starting with this.")]
    = None,
    limit: Annotated[int, typer.Option(min=1)] = 200,
    as_json: JsonOpt = False,
) -> None:
    """The audit log, newest first."""
    from orchestrator.adapters import clock
    from orchestrator.domain.durations import parse_since
    from orchestrator.services import audit_log

    start = parse_since(since, clock.utcnow(), "since") if since else None
    fleet = open_fleet()
    try:
        rows = audit_log.events(fleet, tenant=tenant, since=start, action=action, limit=limit)
    finally:
        fleet.close()
    if as_json:
        print_json(rows)
        return
    table(None, ["at", "actor", "action", "tenant", "outcome", "detail"],
          [[r["at"][:19], r["actor"], r["action"], r["tenant"], r["outcome"],
            ", ".join(f"{k}={v}" for k, v in r["detail"].items())] for r in rows])
