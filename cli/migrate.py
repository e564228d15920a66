"""`tenantctl migrate …`: fleet status and rollouts. Parsing and rendering only."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli import logs
from cli.common import open_fleet, open_reads
from cli.complete import SlugArg, complete_regions, complete_revisions
from cli.confirm import YesOpt, confirm
from cli.help import examples
from cli.output import (
    FormatOpt,
    console,
    emit,
    err,
    no_controls,
    output_format,
    plain,
    print_json,
    say,
    structured,
    table,
)
from orchestrator.domain.statuses import ROLLOUT_DRY_RUN, TenantMigration

if TYPE_CHECKING:
    from orchestrator.domain.revisions import Check
    from orchestrator.services.rollout import Event, RolloutOptions, RolloutSummary

migrate_app = typer.Typer(no_args_is_help=True,
                          help="Tenant schema migrations across the fleet.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@migrate_app.command("status")
def status(region: Annotated[str | None, typer.Option(
        help="Only this region.", autocompletion=complete_regions)] = None,
           live: Annotated[bool, typer.Option(
               "--live", help="Connect to every tenant database and read its "
               "alembic_version, instead of the revision each database is marked "
               "with on its server; rewrite any mark that disagrees.")] = False,
           check: Annotated[bool, typer.Option(
               "--check", help="For CI and monitoring: exit 15 when a tenant's last "
               "migration failed, a tenant is not at its target revision, or its "
               "revision could not be read (else 0).")] = False,
           as_json: JsonOpt = False, fmt: FormatOpt = None) -> None:
    """How many tenants sit at each revision, who is behind, who failed and why,
    and each server's template revision. Tenants without a database (provisioning,
    deleted, purged) are not counted."""
    from orchestrator.services.migrate_status import fleet_status

    out = output_format(fmt, as_json)
    reads = open_reads()
    try:
        report = fleet_status(reads, region, live=live)
    finally:
        reads.close()
    if structured(out):
        emit(report.to_json(), out)
        _exit_checked(report.check, check)
        return
    say(f"head {report.head}, fleet target {report.target}, {report.tenants} "
        f"tenant{'s' * (report.tenants != 1)} "
        f"({report.sources.get('mark', 0)} from their marks, "
        f"{report.sources.get('live', 0)} read live)")
    table("revisions", ["revision", "tenants"],
          [[rev, n] for rev, n in report.revisions.items()], whole={0})
    if report.behind:
        table("behind head", ["tenant", "region", "server", "revision"],
              [[b["slug"], b["region"], b["server"], b["revision"]] for b in report.behind],
              whole={0, 1, 2, 3})
    if report.failed:
        table("last migration failed", ["tenant", "revision", "error"],
              [[f["slug"], f["revision"], f["error"]] for f in report.failed], whole={0, 1})
    if report.unreachable:
        table("unreachable", ["tenant", "server", "error"],
              [[u["slug"], u["server"], u["error"]] for u in report.unreachable],
              whole={0, 1})
    if report.remarked:
        table("revision marks rewritten", ["tenant", "server", "was", "now"],
              [[r["slug"], r["server"], (r["mark"] or "base") if r["marked"] else "-",
                r.get("revision") or r.get("error") or "base"] for r in report.remarked],
              whole={0, 1, 2})
    table("templates", ["server", "region", "revision"],
          [[t["server"], t["region"], t["revision"] or "-"] for t in report.templates],
          whole={0, 1, 2})
    if report.off_target:
        table("not at their target", ["tenant", "region", "revision", "target"],
              [[o["slug"], o["region"], o["revision"] or "base", o["target"] or "base"]
               for o in report.off_target], whole={0, 1, 2, 3})
    _line(report.check.line())  # whole, for a monitor's grep
    _exit_checked(report.check, check)


def _exit_checked(found: Check, check: bool) -> None:
    """`--check`: the check's exit code; without it, status exits 0 whatever it found."""
    if check and not found.ok:
        raise typer.Exit(found.exit_code)


@migrate_app.command("rollout")
def rollout(
    to: Annotated[str, typer.Option("--to", help="Target revision, or head.",
                                    autocompletion=complete_revisions)] = "head",
    region: Annotated[str | None, typer.Option(
        help="Only this region.", autocompletion=complete_regions)] = None,
    tenants: Annotated[str | None, typer.Option(help="Only these tenants: a,b,c.")] = None,
    concurrency: Annotated[int, typer.Option(help="Tenants in flight in this process.")] = 8,
    per_server: Annotated[int, typer.Option(
        help="Tenants in flight per server, in this process.")] = 4,
    canary: Annotated[int, typer.Option(help="Migrate N tenants first, alone; stop if "
                                        "any fails.")] = 0,
    waves: Annotated[str, typer.Option(help="Cumulative wave sizes, e.g. 1,10%,100%.")]
    = "100%",
    max_failures: Annotated[str, typer.Option(help="Failure budget: N or P%. Once "
                                              "exceeded no new tenant starts.")] = "10%",
    lock_timeout: Annotated[str, typer.Option(help="Per statement wait for a table lock "
                                              "before backing off.")] = "2s",
    statement_timeout: Annotated[str, typer.Option(help="Per statement limit.")] = "5min",
    retries: Annotated[int, typer.Option(help="Retries after a lock or statement "
                                         "timeout.")] = 3,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and the SQL (destructive "
                                          "statements marked); touch no tenant.")] = False,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Migrate every tenant in scope to a revision: canary, waves, failure budget.
    Re-running the same command resumes it; on several machines at once, they
    divide the work. A downgrade, or SQL that drops, truncates or rewrites data,
    asks first (or needs --yes)."""
    from orchestrator.services.rollout import RolloutOptions

    opts = RolloutOptions(
        to=to, region=region, tenants=[t for t in (tenants or "").split(",") if t] or None,
        concurrency=concurrency, per_server=per_server, canary=canary, waves=waves,
        max_failures=max_failures, lock_timeout=lock_timeout,
        statement_timeout=statement_timeout, retries=retries, dry_run=dry_run)
    _run(opts, as_json, yes)


@migrate_app.command("tenant")
def tenant(
    slug: SlugArg,
    to: Annotated[str, typer.Option("--to", help="Target revision, or head.",
                                    autocompletion=complete_revisions)] = "head",
    lock_timeout: Annotated[str, typer.Option(help="Wait for a table lock.")] = "2s",
    statement_timeout: Annotated[str, typer.Option(help="Per statement limit.")] = "5min",
    retries: Annotated[int, typer.Option(help="Retries after a timeout.")] = 3,
    dry_run: Annotated[bool, typer.Option(help="Print the SQL only (destructive "
                                          "statements marked).")] = False,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Migrate one tenant (same machinery as a rollout; the fleet target is unchanged).
    A downgrade or destructive SQL asks first (or needs --yes)."""
    from orchestrator.services.rollout import RolloutOptions

    opts = RolloutOptions(to=to, tenants=[slug], concurrency=1, per_server=1,
                          max_failures="100%", lock_timeout=lock_timeout,
                          statement_timeout=statement_timeout, retries=retries,
                          dry_run=dry_run)
    _run(opts, as_json, yes)


def _run(opts: RolloutOptions, as_json: bool, yes: bool = False) -> None:
    from orchestrator.services.rollout import RolloutRun

    stop = threading.Event()
    fleet = open_fleet()
    try:
        run = RolloutRun(fleet, opts, stop=stop)
        if not opts.dry_run:
            # before the first write: no rollout row, target, template or tenant yet
            risk = run.preview()
            if risk.needs_confirmation:
                confirm("Apply this rollout?", yes, summary=risk.headline(),
                        details=risk.lines())
    except BaseException:
        fleet.close()
        raise
    renderer = _Renderer(as_json)
    run.on_event = renderer.event
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum: int, _frame: object) -> None:
        if not stop.is_set():
            err("stopping: no new tenant starts; waiting for those in flight")
        stop.set()

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        summary = run.run()
    finally:
        renderer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        fleet.close()
    renderer.summary(summary)
    raise typer.Exit(summary.exit_code)


class _Renderer:
    """A Rich progress bar per wave on a terminal; plain lines otherwise; nothing
    but the final JSON on stdout with --json (progress then goes to stderr)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = console(stderr=as_json)
        self.live = self.console.is_terminal and not as_json
        self.progress: Any = None
        self.task: Any = None
        self.counts: dict[str, int] = {}

    def _line(self, text: str) -> None:
        # the bar draws on this console too: a line printed on it lands above the bar
        say(text, self.console)

    def event(self, e: Event) -> None:
        logs.rollout_event(e)
        if e.kind == "wave":
            self._start_wave(e.wave, e.size)
        elif e.kind == "tenant" and e.result is not None:
            r = e.result
            self.counts[r.status] = self.counts.get(r.status, 0) + 1
            if self.progress is not None:
                self.progress.update(self.task, advance=1, **self._fields())
            if r.status == TenantMigration.failed or not self.live:
                arrow = f"{r.from_revision or 'base'} -> {r.to_revision or 'base'}"
                detail = f": {r.error}" if r.error else ""
                self._line(f"{r.status:7} {r.slug} {arrow} ({r.duration_ms} ms, "
                           f"{r.attempts} attempt{'s' if r.attempts != 1 else ''}){detail}")
        else:
            self._line(e.message)

    def _fields(self) -> dict[str, int]:
        return {k: self.counts.get(k, 0) for k in (TenantMigration.ok, TenantMigration.failed,
                                                   TenantMigration.skipped)}

    def _start_wave(self, wave: int, size: int) -> None:
        self.close()
        self.counts = {}
        name = "canary" if wave == 0 else f"wave {wave}"
        if not self.live:
            self._line(f"{name}: {size} tenant{'s' * (size != 1)} to migrate")
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("ok {task.fields[ok]} failed {task.fields[failed]} "
                       "skipped {task.fields[skipped]}"),
            TimeRemainingColumn(), console=self.console)
        self.progress.start()
        self.task = self.progress.add_task(name, total=size, **self._fields())

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, s: RolloutSummary) -> None:
        if self.as_json:
            print_json({**s.to_json(), "next_step": _next_step(s)})
            return
        if s.status == ROLLOUT_DRY_RUN:
            # here, not at the top: its Unicode-range regexes cost every command's
            # start-up ~15 ms to compile, and only a dry run prints SQL
            from orchestrator.domain.destructive_sql import annotate

            for i, wave in enumerate(s.waves):
                if wave:
                    say(f"{'canary' if i == 0 else f'wave {i}'}: {', '.join(wave)}")
            for pair, text in s.sql.items():
                say(f"-- SQL for {pair}")
                plain(annotate(text), end="")
            if s.risk is not None and s.risk.needs_confirmation:
                for line in s.risk.lines():  # never wrapped: grep and copy them
                    plain(line)
                plain("a real run asks for confirmation (a terminal, or --yes)")
            return
        counts = ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items()))
        reason = f" ({s.stopped_reason})" if s.stopped_reason else ""
        say(f"rollout {s.rollout_id} to {s.target or 'base'}: {s.status}{reason}; {counts}")
        if (step := _next_step(s)) is not None:
            say(step)


def _next_step(s: RolloutSummary) -> str | None:
    """After a rollout that left work: whether re-running resumes it or starts a new
    one, and that a lock's holder must go first when one blocked a tenant."""
    from orchestrator.domain.lock_blockers import next_step

    if s.status == ROLLOUT_DRY_RUN:
        return None
    failed = [r for r in s.results if r.status == TenantMigration.failed]
    return next_step(s.status, s.rollout_id, s.counts.get(TenantMigration.failed, 0),
                     sum(1 for r in failed if r.blocked_by is not None))


# -- history and past rollouts (read commands: the psycopg-only catalog reader) ----------


@migrate_app.command("history")
def history(as_json: JsonOpt = False) -> None:
    """The tenant schema's revisions, first to head(s): parent, message, which is the
    fleet target (and any region's), how many tenants and which templates are at
    each (read as `migrate status` reads them)."""
    from orchestrator.services.migrate_history import migrate_history

    reads = open_reads()
    try:
        found = migrate_history(reads)
    finally:
        reads.close()
    if as_json:
        print_json(found.to_json())
        return
    overrides = ", ".join(f"{region}: {rev or 'base'}"
                          for region, rev in sorted(found.region_targets.items()))
    say(f"head{'s' * (len(found.heads) != 1)} {', '.join(found.heads) or 'none'}, "
        f"fleet target {found.fleet_target or 'base'}"
        + (f" (region targets: {overrides})" if overrides else "")
        + f", {found.tenants} tenants")
    # newest first, as `git log`; one line per revision and its message beneath, so
    # that neither an id nor a message is ever cut
    for r in reversed(found.revisions):
        notes = (["head"] if r["head"] else []) + \
            (["fleet target"] if r["fleet_target"] else []) + \
            [f"target of {region}" for region in r["region_targets"]]
        parents = ", ".join(r["parents"]) or "base"
        line = (f"{r['id']} <- {parents}" + (f" ({', '.join(notes)})" if notes else "")
                + f": {r['tenants']} tenant{'s' * (r['tenants'] != 1)}")
        if r["templates"]:
            line += f"; template of {', '.join(r['templates'])}"
        _line(line)
        _line(f"    {r['message']}")
    for rev, n in found.elsewhere.items():
        say(f"{n} tenant{'s' * (n != 1)} at {rev} (not a revision of the migration files)")
    if found.unreadable:
        say(f"{found.unreadable} tenant{'s' * (found.unreadable != 1)} could not be read "
            "(`migrate status` lists them)")


rollouts_app = typer.Typer(invoke_without_command=True,
                           epilog=examples("tenantctl migrate rollouts",
                                           "tenantctl migrate rollouts --limit 5 --json"),
                           help="Past rollouts, from the catalog (newest first); "
                           "`show ID` for one rollout's tenants.")
migrate_app.add_typer(rollouts_app, name="rollouts")


@rollouts_app.callback()
def rollouts(ctx: typer.Context,
             limit: Annotated[str, typer.Option(metavar="N",
                                                help="How many, newest first (1-1000).")]
             = "20",
             as_json: JsonOpt = False) -> None:
    """Past rollouts: id, status, when, who, from and to which revision, tenants by
    outcome."""
    if ctx.invoked_subcommand is not None:
        return
    from orchestrator.services.rollout_history import list_rollouts

    reads = open_reads()
    try:
        found = [r.to_json() for r in list_rollouts(reads, limit)]
    finally:
        reads.close()
    if as_json:
        print_json(found)
        return
    if not found:
        say("no rollouts yet")
        return
    for r in found:  # a line each, whole (a table cuts revision ids at 80 columns)
        _line(_rollout_line(r))


@rollouts_app.command("show")
def rollout_show(rollout_id: Annotated[str, typer.Argument(metavar="ID")],
                 as_json: JsonOpt = False) -> None:
    """One rollout: its options, and every tenant's outcome (wave, from, to, attempts,
    time, error)."""
    from orchestrator.services.rollout_history import show_rollout

    reads = open_reads()
    try:
        found = show_rollout(reads, rollout_id).to_json()
    finally:
        reads.close()
    if as_json:
        print_json(found)
        return
    _line(_rollout_line(found))
    options = {k: v for k, v in found["options"].items()
               if not (v is None or v is False or v == [] or v == "")}  # 0 stays
    _line("options: " + ", ".join(f"{k} {','.join(v) if isinstance(v, list) else v}"
                                  for k, v in sorted(options.items())))
    # one line per tenant, as `migrate rollout` prints them: whole, for grep
    for t in found["tenants"]:
        wave = "canary" if t["wave"] == 0 else f"wave {t['wave']}"
        took = f", {t['duration_ms']} ms" if t["duration_ms"] is not None else ""
        error = f": {t['error']}" if t["error"] else ""
        _line(f"{t['status']:7} {t['slug']} {t['from']} -> {t['to'] or '?'} ({wave}, "
              f"{t['attempts']} attempt{'s' * (t['attempts'] != 1)}{took}){error}")
    for error, n in found["errors"].items():
        _line(f"{n} × {error}")


def _rollout_line(r: dict[str, Any]) -> str:
    return (f"rollout {r['id']}: {r['status']}, {', '.join(r['from']) or '-'} -> {r['to']}; "
            f"{_counts(r['counts'])} (started {_when(r['started_at'])} by {r['actor']}"
            + (f", finished {_when(r['finished_at'])})" if r["finished_at"] else ")"))


def _line(text: str) -> None:
    """A line of a listing, never wrapped (a revision id or an error cut in two
    breaks grep and copy-paste); stored text is shown with its controls escaped."""
    plain(no_controls(text))


def _when(iso: str | None) -> str:
    """An ISO time to the second, for a table."""
    return iso[:19].replace("T", " ") if iso else ""


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
