"""`tenantctl backup …`: encrypted backups in the tenant's own region."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cli import logs
from cli.common import ID_MAX, open_fleet, open_reads
from cli.complete import SlugArg, complete_slugs
from cli.output import (
    Col,
    FormatOpt,
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

backup_app = typer.Typer(no_args_is_help=True, help="Encrypted backups in each region.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@backup_app.command("run")
def run(
    slug: Annotated[str | None, typer.Argument(
        help="One tenant.", autocompletion=complete_slugs)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every tenant with a database.")]
    = False,
    due: Annotated[bool, typer.Option("--due", help="The tenants whose scheduled backup "
                                      "is due (for cron).")] = False,
    concurrency: Annotated[int, typer.Option(help="Backups in flight.")] = 4,
    as_json: JsonOpt = False,
) -> None:
    """Dump, encrypt (to the tenant's own key) and upload to the region's store."""
    from backups import service as pipeline
    from orchestrator.domain.errors import InvalidInput
    from orchestrator.domain.states import HAS_DATABASE
    from orchestrator.domain.statuses import BACKUP_SKIPPED, BackupStatus

    if sum((bool(slug), all_, due)) != 1:
        raise InvalidInput("give one tenant, --all or --due")
    fleet = open_fleet()
    try:
        pipeline.reap_dead(fleet)  # finish off what a crashed run left
        if slug:
            results = [_run_one_with_progress(fleet, slug, as_json)]
        else:
            slugs = pipeline.due_tenants(fleet) if due else \
                [t.slug for t in fleet.tenants() if t.state in HAS_DATABASE]
            results = _run_with_progress(fleet, slugs, concurrency, as_json,
                                         "scheduled" if due else "manual")
    finally:
        fleet.close()
    for r in results:
        logs.backup_result(r)
    if as_json:
        print_json([r.__dict__ for r in results])
    else:
        for r in results:
            detail = human_size(r.size) if r.status == BackupStatus.completed else r.error
            say(f"{r.status:9} {r.tenant} backup {r.id or '-'}: {detail}")
    if any(r.status not in (BackupStatus.completed, BACKUP_SKIPPED) for r in results):
        raise typer.Exit(ExitCode.FAILED)


def _run_with_progress(fleet, slugs, concurrency, as_json, kind):  # type: ignore[no-untyped-def]
    from backups import service as pipeline

    bar = progress_bar("backups", as_json, time_left=True)
    if bar is None:
        return pipeline.run_many(fleet, slugs, concurrency, kind=kind)
    with bar:
        task = bar.add_task("backups", total=len(slugs))
        return pipeline.run_many(fleet, slugs, concurrency,
                                 on_done=lambda r: bar.advance(task), kind=kind)


def _run_one_with_progress(fleet, slug, as_json):  # type: ignore[no-untyped-def]
    """One backup; on a terminal (stderr), the bytes streamed to the store and the
    throughput as they go. Nothing when stderr is piped or the output is JSON."""
    from rich.console import Console
    from rich.progress import (
        FileSizeColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    from backups import service as pipeline

    stderr = Console(stderr=True)
    if as_json or not stderr.is_terminal:
        return pipeline.run_backup(fleet, slug)
    bar = Progress(SpinnerColumn(), TextColumn(f"backup {slug}"), FileSizeColumn(),
                   TransferSpeedColumn(), TimeElapsedColumn(), console=stderr)
    with bar:
        task = bar.add_task("backup", total=None)
        return pipeline.run_backup(fleet, slug,
                                   progress=lambda n: bar.update(task, completed=n))


@backup_app.command("list")
def list_(slug: Annotated[str | None, typer.Argument(
        help="One tenant.", autocompletion=complete_slugs)] = None,
          as_json: JsonOpt = False, fmt: FormatOpt = None) -> None:
    """Backups in the catalog, newest first."""
    from orchestrator.domain.views import backup_json

    out = output_format(fmt, as_json)
    reads = open_reads()
    try:
        tenant_id = reads.get_tenant(slug).id if slug else None
        rows = [backup_json(b) for b in reads.backups(tenant_id)]
    finally:
        reads.close()
    records(rows, BACKUP_COLUMNS, out, empty="no backups")


# `backup list`: sizes for people (bytes in JSON); the region is the tenant's (-o wide)
BACKUP_COLUMNS = [
    Col("id", "id", whole=True), Col("tenant", "tenant", whole=True),
    Col("region", "region", whole=True, wide=True), Col("status", "status"),
    Col("kind", "kind", wide=True), Col("size", "size", "size"),
    Col("created", "created_at", "time"), Col("finished", "finished_at", "time", wide=True),
    Col("verified", "verified_at", "time"),
    Col("revision", "revision", whole=True, wide=True), Col("error", "error", wide=True),
]


@backup_app.command("verify")
def verify(
    backup_id: Annotated[int | None, typer.Argument(help="Backup id.", min=1, max=ID_MAX)
                         ] = None,
    latest: Annotated[str | None, typer.Option(help="The latest backup of this tenant.",
                                                        autocompletion=complete_slugs)]
    = None,
    all_: Annotated[bool, typer.Option("--all", help="The latest backup of every tenant.")]
    = False,
    restore_test: Annotated[bool, typer.Option(help="Also restore into a scratch database "
                                               "and compare row counts per table.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch, check the manifest and checksum, decrypt, and `pg_restore --list`."""
    from backups import service as pipeline
    from orchestrator.domain.errors import InvalidInput, TenantctlError
    from orchestrator.domain.states import HAS_DATABASE

    if sum((backup_id is not None, latest is not None, all_)) != 1:
        raise InvalidInput("give a backup id, --latest TENANT or --all")
    fleet = open_fleet()
    reports: list[dict[str, object]] = []
    try:
        if backup_id is not None:
            targets = [backup_id]
        elif latest is not None:
            targets = [pipeline.latest_backup(fleet, latest).id]
        else:
            targets = []
            for t in fleet.tenants():
                if t.state in HAS_DATABASE:
                    try:
                        targets.append(pipeline.latest_backup(fleet, t.slug).id)
                    except TenantctlError as exc:
                        reports.append({"tenant": t.slug, "ok": False, "error": str(exc)})
        for target in targets:
            check = pipeline.restore_test if restore_test else pipeline.verify_backup
            if len(targets) == 1 and not all_:
                reports.append(check(fleet, target))  # one backup: its error is ours
                continue
            try:
                reports.append(check(fleet, target))
            except TenantctlError as exc:
                reports.append({"id": target, "ok": False, "error": str(exc)})
    finally:
        fleet.close()
    if as_json:
        print_json(reports if all_ else reports[0])
    else:
        for r in reports:
            say(f"backup {r.get('id', '-')} of {r.get('tenant', '?')}: "
                + ("ok" if r["ok"] else f"FAILED: {r['error']}"))
    if not all(r["ok"] for r in reports):
        raise typer.Exit(ExitCode.FAILED)


@backup_app.command("download")
def download(
    backup_id: Annotated[int, typer.Argument(help="Backup id (see `backup list`).", min=1,
                                             max=ID_MAX)],
    output: Annotated[str, typer.Option("--output", help="A new file to write the "
                                        "encrypted object to; - is stdout.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output "
                                        "file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Break-glass: copy a backup's object, still encrypted (age), out of its store;
    its size and sha256 are checked against the manifest. With the tenant's key
    (`backup key export`), the stock tools read it:
    age -d -i key.txt FILE | pg_restore --list."""
    import contextlib
    import os
    import uuid
    from pathlib import Path

    from backups import service as pipeline
    from orchestrator.domain.errors import Conflict, InvalidInput, TenantctlError

    if output == "-":
        if as_json:
            raise InvalidInput("--json needs --output FILE: stdout carries the backup")
        if sys.stdout.isatty():
            raise InvalidInput("--output -: stdout is a terminal; redirect it, or give a "
                               "file")
        fleet = open_fleet()
        try:
            pipeline.download_backup(fleet, backup_id, sys.stdout.buffer)
        except BrokenPipeError:
            # the reader went away (`| head`): say so once, and let nothing flush
            # into the closed pipe at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise TenantctlError("stdout was closed before the whole backup was "
                                 "written") from None
        finally:
            fleet.close()
        return
    path = Path(output)
    if path.is_dir():
        raise InvalidInput(f"--output {path} is a directory")
    if (path.exists() or path.is_symlink()) and not force:
        raise Conflict(f"{path} already exists; --force replaces it")
    # written beside the target and renamed into place once checked: a failed or
    # interrupted download leaves no file that looks like a backup
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    fleet = open_fleet()
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise InvalidInput(f"cannot create {path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                report = pipeline.download_backup(fleet, backup_id, out)
                os.fsync(out.fileno())
            if force:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # fails if the file appeared meanwhile
                except FileExistsError:
                    raise Conflict(f"{path} already exists; --force replaces it") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    finally:
        fleet.close()
    if as_json:
        print_json({**report, "output": str(path)})
    else:
        say(f"wrote backup {backup_id} of {report['tenant']} ({report['size']} bytes, "
            f"sha256 {report['sha256']}, encrypted) to {path}")


@backup_app.command("prune")
def prune(dry_run: Annotated[bool, typer.Option(help="Report only.")] = False,
          as_json: JsonOpt = False, fmt: FormatOpt = None) -> None:
    """Apply the retention policy to active tenants' backups (never the newest one)."""
    from backups import service as pipeline

    out = output_format(fmt, as_json)
    fleet = open_fleet()
    try:
        report = pipeline.prune(fleet, dry_run=dry_run)
    finally:
        fleet.close()
    records(report, [Col("backup", "id", whole=True), Col("tenant", "tenant", whole=True),
                     Col("action", "action", whole=True), Col("reason", "reason")], out,
            title="dry run: nothing deleted" if dry_run else None,
            empty="dry run: nothing to prune" if dry_run else "nothing to prune")


@backup_app.command("restore")
def restore(
    backup_id: Annotated[int, typer.Argument(help="Backup id (see `backup list`).", min=1,
                                             max=ID_MAX)],
    as_: Annotated[str | None, typer.Option("--as", help="Restore as a new tenant with "
                                            "this slug, in the backup's region.")] = None,
    in_place: Annotated[bool, typer.Option(help="Replace the tenant's database (its "
                                           "sessions are ended).")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm --in-place.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Restore a backup, as a new tenant (--as) or over its tenant (--in-place --yes).
    The backup is checked whole first; if it is not intact, nothing changes."""
    from backups.restore import restore_in_place
    from orchestrator.domain.errors import InvalidInput
    from orchestrator.services.provisioning import restore_as

    if (as_ is None) == (not in_place):
        raise InvalidInput("give --as NEW_SLUG, or --in-place --yes")
    if in_place:
        from cli.confirm import confirm

        confirm(f"Replace the database of backup {backup_id}'s tenant with it?", yes,
                summary="--in-place replaces the tenant's data")
    fleet = open_fleet()
    try:
        if in_place:
            report = restore_in_place(fleet, backup_id)
        else:
            res = restore_as(fleet, backup_id, as_ or "")
    finally:
        fleet.close()
    if in_place:
        if as_json:
            print_json(report)
        else:
            say(f"restored backup {backup_id} in place over tenant {report['tenant']} "
                f"(revision {report['revision']})")
        return
    if as_json:
        print_json({**res.tenant, "dsn": res.dsn, "restored_from": backup_id})
        return
    t = res.tenant
    say(f"restored backup {backup_id} as tenant {t['slug']} in {t['region']} on "
        f"{t['server']} (revision {t['revision']})")
    say("connection string (shown once):")
    plain(res.dsn)


key_app = typer.Typer(no_args_is_help=True, help="Tenant backup keys.")
backup_app.add_typer(key_app, name="key")


@key_app.command("export")
def key_export(
    slug: SlugArg,
    output: Annotated[str, typer.Option("--output", "-o", help="Write it to this new "
                                        "file (mode 0600); - is stdout.")] = "-",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing "
                                        "--output file.")] = False,
) -> None:
    """Break-glass: the tenant's age identity (audited), on stdout or into a new
    0600 file. With it, the stock `age` tool decrypts the tenant's backups:
    age -d -i key.txt X.dump.age."""
    from pathlib import Path

    from orchestrator.adapters.crypto.masterkey import create_private_file
    from orchestrator.services import credentials

    path = None if is_stdout(output) else Path(output)
    fleet = open_fleet()
    try:
        # the file first: an existing one is refused before anything is exported
        out = None if path is None else create_private_file(path, force=force)
        try:
            text = credentials.export_identity(fleet, slug)
        except BaseException:
            if out is not None and path is not None:
                out.close()
                path.unlink()
            raise
    finally:
        fleet.close()
    if out is None:
        plain(text)
        return
    with out:
        out.write(text + "\n")
    say(f"wrote the key of tenant {slug} to {path} (mode 0600)")
