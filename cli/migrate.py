"""`tenantctl migrate …`: fleet status and rollouts. Parsing and rendering only."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import open_fleet, open_reads
from cli.complete import SlugArg, complete_regions, complete_revisions
from cli.output import console, err, plain, print_json, say, table
from orchestrator.domain.statuses import ROLLOUT_DRY_RUN, TenantMigration

if TYPE_CHECKING:
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
           as_json: JsonOpt = False) -> None:
    """How many tenants sit at each revision, who is behind, who failed and why,
    and each server's template revision."""
    from orchestrator.services.migrate_status import fleet_status

    reads = open_reads()
    try:
        report = fleet_status(reads, region, live=live)
    finally:
        reads.close()
    if as_json:
        print_json(report.to_json())
        return
    say(f"head {report.head}, fleet target {report.target}, {report.tenants} tenants "
        f"({report.sources.get('mark', 0)} from their marks, "
        f"{report.sources.get('live', 0)} read live)")
    table("revisions", ["revision", "tenants"],
             [[rev, n] for rev, n in report.revisions.items()])
    if report.behind:
        table("behind head", ["tenant", "region", "server", "revision"],
                 [[b["slug"], b["region"], b["server"], b["revision"]] for b in report.behind])
    if report.failed:
        table("last migration failed", ["tenant", "revision", "error"],
                 [[f["slug"], f["revision"], f["error"]] for f in report.failed])
    if report.unreachable:
        table("unreachable", ["tenant", "server", "error"],
                 [[u["slug"], u["server"], u["error"]] for u in report.unreachable])
    if report.remarked:
        table("revision marks rewritten", ["tenant", "server", "was", "now"],
              [[r["slug"], r["server"], (r["mark"] or "base") if r["marked"] else "-",
                r.get("revision") or r.get("error") or "base"] for r in report.remarked])
    table("templates", ["server", "region", "revision"],
             [[t["server"], t["region"], t["revision"] or "-"] for t in report.templates])


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
    dry_run: Annotated[bool, typer.Option(help="Print the plan and the SQL; touch no "
                                          "tenant.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Migrate every tenant in scope to a revision: canary, waves, failure budget.
    Re-running the same command resumes it; on several machines at once, they
    divide the work."""
    from orchestrator.services.rollout import RolloutOptions

    opts = RolloutOptions(
        to=to, region=region, tenants=[t for t in (tenants or "").split(",") if t] or None,
        concurrency=concurrency, per_server=per_server, canary=canary, waves=waves,
        max_failures=max_failures, lock_timeout=lock_timeout,
        statement_timeout=statement_timeout, retries=retries, dry_run=dry_run)
    _run(opts, as_json)


@migrate_app.command("tenant")
def tenant(
    slug: SlugArg,
    to: Annotated[str, typer.Option("--to", help="Target revision, or head.",
                                    autocompletion=complete_revisions)] = "head",
    lock_timeout: Annotated[str, typer.Option(help="Wait for a table lock.")] = "2s",
    statement_timeout: Annotated[str, typer.Option(help="Per statement limit.")] = "5min",
    retries: Annotated[int, typer.Option(help="Retries after a timeout.")] = 3,
    dry_run: Annotated[bool, typer.Option(help="Print the SQL only.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Migrate one tenant (same machinery as a rollout; the fleet target is unchanged)."""
    from orchestrator.services.rollout import RolloutOptions

    opts = RolloutOptions(to=to, tenants=[slug], concurrency=1, per_server=1,
                          max_failures="100%", lock_timeout=lock_timeout,
                          statement_timeout=statement_timeout, retries=retries,
                          dry_run=dry_run)
    _run(opts, as_json)


def _run(opts: RolloutOptions, as_json: bool) -> None:
    from orchestrator.services.rollout import RolloutRun

    stop = threading.Event()
    renderer = _Renderer(as_json)
    fleet = open_fleet()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum: int, _frame: object) -> None:
        if not stop.is_set():
            err("stopping: no new tenant starts; waiting for those in flight")
        stop.set()

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        run = RolloutRun(fleet, opts, renderer.event, stop)
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
            print_json(s.to_json())
            return
        if s.status == ROLLOUT_DRY_RUN:
            for i, wave in enumerate(s.waves):
                if wave:
                    say(f"{'canary' if i == 0 else f'wave {i}'}: {', '.join(wave)}")
            for pair, text in s.sql.items():
                say(f"-- SQL for {pair}")
                plain(text, end="")
            return
        counts = ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items()))
        reason = f" ({s.stopped_reason})" if s.stopped_reason else ""
        say(f"rollout {s.rollout_id} to {s.target or 'base'}: {s.status}{reason}; {counts}")
