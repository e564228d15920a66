"""`tenantctl usage …`: usage metering — collect (for cron), the totals and top
tenants of a period, and the billing export (CSV)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from cli.common import JsonOpt, open_fleet
from cli.complete import complete_slugs
from cli.output import (
    Col,
    FormatOpt,
    emit,
    err,
    human_size,
    is_stdout,
    output_format,
    print_json,
    records,
    say,
    structured,
)
from orchestrator.domain.errors import ExitCode


class _ShowByDefault(TyperGroup):
    """`tenantctl usage [SLUG] [options]` is `tenantctl usage show …`: anything but a
    subcommand's name (or a lone --help) goes to `show`. A tenant named like a
    subcommand: `tenantctl usage show collect`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not (args and (args[0] in self.commands or args[0] in ("--help", "-h"))):
            args = ["show", *args]
        return super().parse_args(ctx, args)


usage_app = typer.Typer(cls=_ShowByDefault, help="Usage metering: per-tenant storage, "
                        "connections, transactions and rows, per hour. `tenantctl usage "
                        "[SLUG] [options]` is `tenantctl usage show`.")

SinceOpt = Annotated[str, typer.Option(
    help="From this time on: a duration back (7d, 12h), today, yesterday or ISO-8601.")]


@usage_app.command("collect")
def collect(as_json: JsonOpt = False) -> None:
    """Sample every tenant database now (one query per server) and purge samples
    older than [usage] keep_days; for cron (the scheduler's `usage` job does the
    same). A tenant past its plan's storage_quota loses its writes (reads go on), one
    under it again gets them back. Exit 1 when a server or tenant could not be read,
    or the quota could not be applied to one (the rest is stored)."""
    from orchestrator.adapters import clock
    from orchestrator.services import usage

    fleet = open_fleet()
    try:
        result = usage.collect(fleet, clock.utcnow())
    finally:
        fleet.close()
    if as_json:
        print_json(result.to_json())
    else:
        ok = len(result.tenants) - len(result.failed)
        say(f"collected {ok} tenant(s) in {result.seconds:.2f}s (period "
            f"{result.period_start.isoformat()}); {len(result.failed)} failed, "
            f"{result.purged} old sample(s) purged")
        for _, error in sorted(result.servers.items()):
            if error:
                err(f"failed: {error}")
        for t in result.failed:
            if not result.servers.get(t.server):
                err(f"failed: {t.slug}: {t.error}")
        for q in result.quota:
            if q.outcome in ("enforced", "released", "over", "warning", "failed"):
                line = (f"quota {q.outcome}: {q.slug}: {q.reason}"
                        + (f" ({human_size(q.size)} of {human_size(q.quota)})"
                           if q.size is not None and q.quota is not None else ""))
                (err if q.outcome == "failed" else say)(line)
    if result.failed or result.quota_failed:
        raise typer.Exit(ExitCode.FAILED)


TENANT_COLUMNS = [
    Col("tenant", "slug", whole=True), Col("server", "server", whole=True),
    Col("storage", "storage_bytes", "size"),
    Col("storage peak", "storage_bytes_peak", "size", wide=True),
    Col("conn peak", "connections_peak"), Col("transactions", "transactions"),
    Col("rows written", "rows_written"), Col("rows read", "rows_read"),
    Col("periods", "periods", wide=True), Col("first", "first_period", "time", wide=True),
    Col("last", "last_period", "time")]
TOP_COLUMNS = [Col("server", "server", whole=True), Col("metric", "metric", whole=True),
               Col("rank", "rank"), Col("tenant", "slug", whole=True),
               Col("value", lambda r: human_size(r["value"]) if r["metric"].startswith(
                   "storage") else r["value"])]


@usage_app.command("show")
def show(
    slug: Annotated[str | None, typer.Argument(
        help="One tenant (default: every tenant).", autocompletion=complete_slugs,
        show_default=False)] = None,
    since: SinceOpt = "7d",
    top: Annotated[int | None, typer.Option(
        min=1, max=100, help="Top tenants per server (default: [usage] top).",
        show_default=False)] = None,
    as_json: JsonOpt = False,
    fmt: FormatOpt = None,
) -> None:
    """Usage per tenant from --since on: the last storage size, the peak of
    connections, transactions and rows written/read (sums of the periods); then the
    top tenants of each server. `tenantctl usage [SLUG]` is this command."""
    from orchestrator.adapters import clock
    from orchestrator.domain.durations import parse_since
    from orchestrator.services import usage

    out = output_format(fmt, as_json)
    now = clock.utcnow()
    start = parse_since(since, now, "since")
    fleet = open_fleet()
    try:
        rep = usage.report(fleet, start, now, slug=slug, top=top)
    finally:
        fleet.close()
    data = rep.to_json()
    if structured(out):
        emit(data, out)
        return
    records(data["tenants"], TENANT_COLUMNS, out,
            title=f"usage since {start.isoformat(timespec='seconds')}",
            empty=f"no usage samples since {start.isoformat(timespec='seconds')} "
                  "(`tenantctl usage collect` takes them)")
    if data["top"] and slug is None:
        say("")
        records(data["top"], TOP_COLUMNS, out, title="top tenants per server")


@usage_app.command("export")
def export(
    since: SinceOpt = "30d",
    until: Annotated[str | None, typer.Option(
        help="Up to this time (periods starting before it); default: now.",
        show_default=False)] = None,
    slug: Annotated[str | None, typer.Option(
        "--tenant", help="Only this tenant.", autocompletion=complete_slugs,
        show_default=False)] = None,
    output: Annotated[str, typer.Option(
        "--output", help="The CSV file to write, or - for stdout.",
        show_default=False)] = ...,  # type: ignore[assignment]
) -> None:
    """Usage as CSV for billing: one row per tenant and period (an hour, UTC), with a
    header row; storage in bytes, counts as numbers."""
    import csv
    import os
    import sys
    from pathlib import Path

    from orchestrator.adapters import clock
    from orchestrator.domain.durations import parse_since
    from orchestrator.domain.errors import InvalidInput
    from orchestrator.domain.usage import EXPORT_COLUMNS
    from orchestrator.services import usage

    now = clock.utcnow()
    start = parse_since(since, now, "since")
    end = parse_since(until, now, "until") if until is not None else None
    if end is not None and end <= start:
        raise InvalidInput("--until must be after --since")
    target = None if is_stdout(output) else Path(output)
    if target is not None and not target.parent.is_dir():
        raise InvalidInput(f"--output: {target.parent} is not a directory")
    fleet = open_fleet()
    partial = None
    try:
        rows = usage.export_rows(fleet, start, end, slug)
        first = next(rows, None)  # an unknown --tenant fails before any file is made
        if target is None:
            f: Any = sys.stdout
        else:
            partial = target.with_name(f".{target.name}.partial")
            f = open(partial, "w", newline="", encoding="utf-8")  # noqa: SIM115
        try:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(EXPORT_COLUMNS)
            if first is not None:
                w.writerow(first)
                w.writerows(rows)
        finally:
            if target is not None:
                f.close()
        if target is not None and partial is not None:
            os.replace(partial, target)
            partial = None
        else:
            sys.stdout.flush()
    finally:
        fleet.close()
        if partial is not None:
            partial.unlink(missing_ok=True)

