"""`tenantctl tenant …`: a tenant's lifecycle (cancel, reactivate, suspend, resume,
legal hold, erase, export), then create, inspect, connect."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from cli.common import JsonOpt, open_fleet, open_reads
from cli.complete import (
    SlugArg,
    complete_plans,
    complete_regions,
    complete_servers,
    complete_states,
)
from cli.output import (
    Col,
    FormatOpt,
    binary_stdout,
    err,
    fields,
    human_size,
    is_stdout,
    output_format,
    plain,
    print_json,
    progress_bar,
    records,
    say,
)
from orchestrator.domain.errors import ExitCode

if TYPE_CHECKING:
    from orchestrator.api import ProvisionResult

tenant_app = typer.Typer(no_args_is_help=True, help="Tenants: create, inspect, connect.")

# the lifecycle commands' help has always said it shorter
BareJsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _confirm(question: str, yes: bool) -> None:
    from cli.confirm import confirm

    confirm(question, yes)


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


# -- lifecycle ---------------------------------------------------------------------------


@tenant_app.command("cancel")
def cancel(slug: SlugArg, yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")]
           = False, as_json: BareJsonOpt = False) -> None:
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
def reactivate(slug: SlugArg, as_json: BareJsonOpt = False) -> None:
    """Undo a cancellation during the hold: active again, writes allowed."""
    _transition("reactivate", slug, as_json)


@tenant_app.command("suspend")
def suspend(slug: SlugArg, as_json: BareJsonOpt = False) -> None:
    """Block the tenant's connections (open sessions are ended); no hold starts."""
    _transition("suspend", slug, as_json)


@tenant_app.command("resume")
def resume(slug: SlugArg, as_json: BareJsonOpt = False) -> None:
    """Allow a suspended tenant's connections again."""
    _transition("resume", slug, as_json)


@tenant_app.command("legal-hold")
def legal_hold(
    slug: SlugArg,
    on: Annotated[bool | None, typer.Option("--on/--off", help="Place or lift it.",
                                            show_default=False)] = None,
    reason: Annotated[str, typer.Option(help="Why (audited).")] = "",
    as_json: BareJsonOpt = False,
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
    slug: SlugArg,
    reason: Annotated[str, typer.Option(help="The request being honoured (audited).")]
    = "",
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
    as_json: BareJsonOpt = False,
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
    slug: SlugArg,
    fmt: Annotated[Literal["sql", "csv"], typer.Option(
        "--format", help="sql (a pg_dump script) or csv (a zip, one CSV per table).")],
    output: Annotated[Path, typer.Option(help="File to write; - is stdout.")],
    force: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
    as_json: BareJsonOpt = False,
) -> None:
    """Export a tenant's data (active, suspended, or cancelled and in its hold)."""
    from orchestrator.domain.errors import InvalidInput
    from orchestrator.services.export import export as do_export

    to_stdout = is_stdout(output)
    if to_stdout and as_json:
        raise InvalidInput("--output - and --json both write to stdout: give one")
    fleet = open_fleet()
    try:
        res = do_export(fleet, slug, fmt, binary_stdout() if to_stdout else output,
                        force=force)
    finally:
        fleet.close()
    if as_json:
        print_json(res)
        return
    # with --output - the data is stdout: what is said about it goes beside, on stderr
    tell = err if to_stdout else say
    tell(f"exported {slug} to {'stdout' if to_stdout else res['output']} "
         f"({human_size(res['size'])})")
    if res["not_included"].get("large_objects"):
        tell(f"not included: {res['not_included']['large_objects']} large "
             "object(s) (CSV has no form for them; --format sql includes them)")


# -- create, inspect, connect -----------------------------------------------------------


@tenant_app.command("create")
def tenant_create(
    slug: str,
    region: Annotated[str, typer.Option(help="Where the tenant's data lives.",
                                         autocompletion=complete_regions)],
    as_json: JsonOpt = False,
    plan: Annotated[str | None, typer.Option(
        help="Its plan ([plans.NAME]: connection limit, timeouts, …); default: "
             "[tenants] default_plan.", autocompletion=complete_plans)] = None,
) -> None:
    """Provision a tenant: dedicated database and roles in REGION. Re-run to finish an
    interrupted create. Prints the tenant's connection string once."""
    fleet = open_fleet()
    try:
        # the output first, then the spare pool's refill: a refill (or a crash in it)
        # never stands between the sign-up and its connection string
        with fleet.refills_held():
            res = fleet.provision(slug, region, shown=False, plan=plan)
            _show_created(res, as_json)
            sys.stdout.flush()
            fleet.credentials_shown(slug)  # until here, a re-run shows it again
    finally:
        fleet.close()


def _show_created(res: ProvisionResult, as_json: bool) -> None:
    if as_json:
        print_json({**res.tenant, "dsn": res.dsn, "resumed": res.resumed,
                     "via_template": res.via_template, "direct_dsn": res.direct_dsn,
                     "warnings": res.warnings})
        return
    t = res.tenant
    verb = "finished provisioning" if res.resumed else "created"
    say(f"{verb} tenant {t['slug']} in {t['region']} on {t['server']} "
         f"(revision {t['revision']})")
    say("connection string (shown once; `tenantctl tenant credentials` shows it again):")
    plain(res.dsn)


@tenant_app.command("list")
def tenant_list(
    region: Annotated[str | None, typer.Option(help="Only this region.",
                                                  autocompletion=complete_regions)] = None,
    state: Annotated[str | None, typer.Option(help="Only this state.",
                                                 autocompletion=complete_states)] = None,
    as_json: JsonOpt = False,
    fmt: FormatOpt = None,
) -> None:
    """List tenants."""
    from orchestrator.domain.views import tenant_json

    out = output_format(fmt, as_json)
    reads = open_reads()
    try:
        rows = [tenant_json(t) for t in reads.tenants(region, state)]
    finally:
        reads.close()
    records(rows, TENANT_COLUMNS, out, empty="no tenants")


# `tenant list`: what people grep for whole; the region is the server's (-o wide)
TENANT_COLUMNS = [
    Col("slug", "slug", whole=True), Col("region", "region", whole=True, wide=True),
    Col("server", "server", whole=True), Col("state", "state"),
    Col("revision", "revision", whole=True), Col("plan", "plan", whole=True),
    Col("over quota", "over_quota", "yesno", wide=True),
    Col("created", "created_at", "time"),
    Col("database", "database", whole=True, wide=True),
    Col("legal hold", "legal_hold", "yesno", wide=True),
    Col("hold until", "hold_until", "time", wide=True),
]


@tenant_app.command("show")
def tenant_show(slug: SlugArg, as_json: JsonOpt = False, fmt: FormatOpt = None) -> None:
    """Everything the catalog knows about one tenant."""
    from orchestrator.domain.quota import storage_view
    from orchestrator.domain.views import iso, tenant_json

    out = output_format(fmt, as_json)
    reads = open_reads()
    try:
        tenant = reads.get_tenant(slug)
        data = tenant_json(tenant)
        latest = reads.latest_size(tenant.id)
    finally:
        reads.close()
    plan = reads.cfg.plans.get(tenant.plan)
    data.update(storage_view(latest[0] if latest else None,
                             iso(latest[1]) if latest else None,
                             plan.storage_quota if plan else None,
                             reads.cfg.usage.quota_warning))
    # every key of the JSON, in its order; the table leaves out the empty ones
    fields(f"tenant {slug}", data,
           [Col(k, k, "time" if k.endswith("_at") or k in ("hold_until", "purge_after",
                                                         "over_quota_since")
                else "size" if k in ("storage_bytes", "storage_quota")
                else "yesno" if isinstance(v, bool) else "text") for k, v in data.items()],
           out)


@tenant_app.command("set-plan")
def tenant_set_plan(
    slug: SlugArg,
    plan: Annotated[str, typer.Argument(autocompletion=complete_plans, show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Move a tenant to PLAN ([plans.NAME] in tenantctl.toml): its login role gets the
    plan's connection limit and settings at once (sessions already open keep theirs
    until they reconnect). Audited."""
    from orchestrator.services import plans

    fleet = open_fleet()
    try:
        res = plans.set_plan(fleet, slug, plan)
    finally:
        fleet.close()
    if as_json:
        print_json(res.to_json())
        if res.quota is not None and res.quota.failed:
            raise typer.Exit(ExitCode.FAILED)
        return
    verb = "moved to" if res.plan.name != res.previous else "kept on"
    say(f"tenant {slug}: {verb} plan {res.plan.name}"
        + (f" (was {res.previous})" if res.plan.name != res.previous else ""))
    if res.applied is None:
        say("its login role gets the plan when its provisioning finishes")
    else:
        say("login role: " + ", ".join(f"{k}={v}" for k, v in res.applied.items()))
    if res.quota is not None and res.quota.outcome in ("enforced", "released", "over",
                                                       "warning"):
        say(f"storage quota {res.quota.outcome}: {res.quota.reason}")
    if res.quota is not None and res.quota.failed:
        err(f"storage quota not applied: {res.quota.reason} (the next `tenantctl usage "
            "collect` retries)")
        raise typer.Exit(ExitCode.FAILED)


@tenant_app.command("credentials")
def tenant_credentials(
    slug: Annotated[str | None, typer.Argument(show_default=False)] = None,
    rotate: Annotated[bool, typer.Option(help="Set a new password first.")] = False,
    all_: Annotated[bool, typer.Option("--all", help="With --rotate: every tenant "
                                       "(breach response).")] = False,
    region: Annotated[str | None, typer.Option(help="With --all: only this region.",
                                                  autocompletion=complete_regions)]
    = None,
    concurrency: Annotated[int, typer.Option(min=1, help="With --all.")] = 4,
    kill_sessions: Annotated[bool, typer.Option(help="End sessions opened with the old "
                                                "password.")] = False,
    direct: Annotated[bool, typer.Option(help="The server's own address even when a "
                                         "pooler stands in front of it.")] = False,
    dry_run: Annotated[bool, typer.Option(help="With --all: list the tenants whose "
                                          "password would change; change nothing.")]
    = False,
    yes: Annotated[bool, typer.Option("--yes", help="With --all: do not ask (needed "
                                      "without a terminal).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show the tenant's connection string (audited), or rotate its password; with
    --rotate --all, every tenant's (the report never contains the passwords): it asks
    first, or needs --yes."""
    from orchestrator.domain.errors import InvalidInput

    if all_:
        if slug or not rotate:
            raise InvalidInput("--all goes with --rotate and no slug")
        _rotate_all(region, concurrency, kill_sessions, as_json, dry_run=dry_run, yes=yes)
        return
    if dry_run or yes:
        raise InvalidInput("--dry-run and --yes go with --rotate --all")
    if not slug:
        raise InvalidInput("give a tenant, or --rotate --all")
    fleet = open_fleet()
    try:
        dsn = fleet.credentials(slug, rotate=rotate, kill_sessions=kill_sessions,
                                direct=direct)
    finally:
        fleet.close()
    if as_json:
        print_json({"slug": slug, "dsn": dsn, "rotated": rotate})
    else:
        plain(dsn)


def _rotate_all(region: str | None, concurrency: int, kill_sessions: bool,
                as_json: bool, *, dry_run: bool = False, yes: bool = False) -> None:
    import time

    from cli.confirm import confirm
    from orchestrator.domain.guardrails import plural
    from orchestrator.services import breach

    fleet = open_fleet()
    t0 = time.perf_counter()
    try:
        targets = breach.rotation_targets(fleet, region)
        where = f"in region {region}" if region else "in every region"
        summary = (f"{plural(len(targets), 'tenant password')} {where} rotated "
                   "(applications need the new connection strings)"
                   + ("; their open sessions ended" if kill_sessions else ""))
        if dry_run:
            if as_json:
                print_json({"dry_run": True, "would_rotate": len(targets),
                            "kill_sessions": kill_sessions,
                            "tenants": [t.slug for t in targets]})
            else:
                say(f"dry run, nothing changed: {summary}")
                for t in targets:
                    say(f"  {t.slug} ({t.region})")
            return
        confirm("Rotate these passwords?", yes, summary=summary)
        bar = progress_bar("rotating", as_json)
        if bar is not None:
            with bar:
                task = bar.add_task("rotate", total=len(targets))
                results = breach.rotate_all(fleet, region=region, concurrency=concurrency,
                                            kill_sessions=kill_sessions,
                                            on_done=lambda r: bar.advance(task))
        else:
            results = breach.rotate_all(fleet, region=region, concurrency=concurrency,
                                        kill_sessions=kill_sessions)
    finally:
        fleet.close()
    failed = [r for r in results if not r.ok]
    elapsed = round(time.perf_counter() - t0, 2)
    if as_json:
        print_json({"rotated": len(results) - len(failed), "failed": len(failed),
                    "seconds": elapsed, "tenants": [r.to_json() for r in results]})
    else:
        for r in failed:
            say(f"failed  {r.tenant}: {r.error}")
        say(f"rotated {len(results) - len(failed)} tenant passwords in {elapsed}s"
            + (f", {len(failed)} failed (re-run to retry them)" if failed else ""))
    if failed:
        raise typer.Exit(ExitCode.FAILED)


@tenant_app.command("psql")
def tenant_psql(
    slug: SlugArg,
    owner: Annotated[bool, typer.Option(help="Connect as the owner role (DDL rights).")]
    = False,
    command: Annotated[str | None, typer.Option("-c", "--command",
                                                help="Run one command and exit.")] = None,
) -> None:
    """Open psql on the tenant's database as its login role (audited)."""
    from orchestrator.services import psql

    fleet = open_fleet()
    try:
        code = psql.run(fleet, slug, owner=owner, command=command)
    finally:
        fleet.close()
    raise typer.Exit(code)  # psql's own exit status, passed through


# -- move -----------------------------------------------------------------------------


@tenant_app.command("move")
def tenant_move(
    slug: SlugArg,
    server: Annotated[str | None, typer.Option(
        help="The server to move it to (same region, or another with --reason).",
        autocompletion=complete_servers)] = None,
    region: Annotated[str | None, typer.Option(
        help="Move it to this region's least-filled server (needs --reason).",
        autocompletion=complete_regions)] = None,
    reason: Annotated[str, typer.Option(help="Why (audited; required to leave the "
                                        "tenant's region).")] = "",
    method: Annotated[Literal["logical", "dump"] | None, typer.Option(
        help="How to copy (default: logical when both servers can, else dump).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (method, "
                                          "size, expected write pause); change nothing.")]
    = False,
    show_dsn: Annotated[bool, typer.Option("--show-dsn", help="Print the tenant's new "
                                           "connection string (audited).")] = False,
    abort: Annotated[bool, typer.Option("--abort", help="Undo an unfinished move that "
                                        "has not cut over.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
    as_json: BareJsonOpt = False,
) -> None:
    """Move a tenant to another server or region: a copy (pg_dump | pg_restore, or
    logical replication), checks, one cutover; writes pause while it copies. Re-run
    to finish an interrupted move, or --abort it. The application's connection
    string changes host and port only; the password stays."""
    from orchestrator.domain.errors import InvalidInput

    if abort and (server or region or dry_run or method):
        raise InvalidInput("--abort takes the tenant alone")
    progress = None if as_json else err
    fleet = open_fleet()
    try:
        if abort:
            _confirm(f"Abort the move of {slug!r}? Its copy on the target is dropped; it "
                     "writes again where it is.", yes)
            res = fleet.abort_move(slug)
        else:
            plan = fleet.move(slug, server=server, region=region, reason=reason or None,
                              method=method, dry_run=True)
            if dry_run:
                _print_move(plan, as_json, None)
                return
            p = plan.plan or {}
            what = (f"Move tenant {slug!r} from {plan.old_server} ({plan.old_region}) to "
                    f"{plan.new_server} ({plan.new_region}) by {plan.method}")
            detail = (f"{human_size(p.get('size_bytes', 0))}, writes paused about "
                      f"{plan.write_pause_s:.0f} s" if p else "resuming an unfinished move")
            if plan.old_region != plan.new_region:
                detail += (f"; afterwards every backup of it in {plan.old_region} is "
                           "deleted")
            from cli.confirm import confirm

            confirm(f"{what}?", yes, summary=f"{what} ({detail})")
            res = fleet.move(slug, server=server, region=region, reason=reason or None,
                             method=method, progress=progress)
        dsn = fleet.credentials(slug) if show_dsn and not abort else None
    finally:
        fleet.close()
    _print_move(res, as_json, dsn)


def _print_move(res: Any, as_json: bool, dsn: str | None) -> None:
    if as_json:
        print_json(res.to_json(dsn))
        return
    if res.dry_run:
        p = res.plan or {}
        say(f"plan: move {res.tenant} {res.old_server} ({res.old_region}) → "
            f"{res.new_server} ({res.new_region}) by {res.method}"
            + (f" ({p.get('method_reason')})" if p.get("method_reason") else ""))
        if p:
            say(f"size {human_size(p['size_bytes'])}, expected write pause about "
                f"{p['expected_pause_s']} s; steps: {', '.join(p['steps'])}")
        else:
            say(f"an unfinished move (id {res.move_id}) would be finished")
        return
    if res.outcome == "aborted":
        say(f"move {res.move_id} of {res.tenant} aborted: it stays on {res.old_server}")
        return
    checks = res.checks
    say(f"moved {res.tenant}: {res.old_server} ({res.old_region}) → {res.new_server} "
        f"({res.new_region}) by {res.method}, {human_size(res.bytes_copied)} copied, "
        f"writes paused {res.write_pause_s:.1f} s")
    if checks:
        say(f"checks: {checks.get('tables', 0)} tables, {checks.get('rows', 0)} rows, "
            f"{checks.get('sequences', 0)} sequences, {checks.get('large_objects', 0)} "
            "large objects: source and copy agree")
    if res.backup_id is not None:
        say(f"backup {res.backup_id} taken and verified in {res.new_region}; "
            f"{res.old_objects_deleted} object(s) deleted from the {res.old_region} store")
    if dsn is not None:
        say(dsn)
