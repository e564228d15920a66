"""`tenantctl tenant export`: the customer's data in portable form, while active or
during the hold. Streamed (memory stays flat whatever the size), written to a
hidden temporary file next to the target (mode 0600) and renamed into place
only when complete, so a failed export never leaves a truncated file behind.

- sql: a plain `pg_dump` script (no owners, no grants: it loads anywhere);
- csv: a zip with one UTF-8 CSV per table, header row first, all tables read
  in one snapshot. Large objects have no CSV form: the zip then carries
  NOT_INCLUDED.txt saying how many were left out (the sql format has them), and
  the result says so (``not_included``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import psycopg
from psycopg import sql

from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres.admin import libpq_env
from orchestrator.domain.errors import (
    FIELD,
    Conflict,
    ExitCode,
    InvalidInput,
    TenantctlError,
    first_line,
)
from orchestrator.domain.states import HAS_DATABASE
from orchestrator.services.lifecycle import audited

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

FORMATS = ("sql", "csv")


class ExportError(TenantctlError):
    exit_code = ExitCode.DUMP_OR_RESTORE


@audited("export")
def export(fleet: Deps, slug: str, fmt: str, output: Path | BinaryIO, *,
           force: bool = False) -> dict[str, Any]:
    """Export into the file ``output``, or onto the stream ``output`` (stdout for
    `--output -`: written as it comes; a failure then leaves what was written)."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r}: use sql or csv")
    tenant = fleet.get_tenant(slug)
    if tenant.state not in HAS_DATABASE:
        raise Conflict(f"tenant {slug!r} is {tenant.state}: its database is gone, nothing "
                       "to export")
    dsn = with_dbname(fleet.cfg.server(tenant.server).admin_dsn, tenant.database)
    if not isinstance(output, Path):
        stream = _Counted(output)
        try:
            tables, left_out = _write(fleet, dsn, fmt, stream)
            stream.flush()
        except BaseException as exc:
            _lock_error(fleet, tenant, slug, exc)
            if isinstance(exc, OSError):  # the reader went away (a closed pipe), …
                raise ExportError(f"cannot write to stdout: {exc.strerror or exc}"
                                  ) from None
            raise
        return _done(fleet, tenant, fmt, "-", stream.size, tables, left_out)
    output = output.expanduser().absolute()
    try:  # OSError: a name too long, a permission; ValueError: a NUL byte, not encodable
        if output.is_dir():  # --force would not help: a directory is never replaced
            raise InvalidInput(f"{output} is a directory")
        if output.exists() and not force:
            raise Conflict(f"{output} already exists (use {FIELD} to replace it)",
                           field="force")
        if not output.parent.is_dir():
            raise InvalidInput(f"directory {output.parent} does not exist")
        # the temporary name stays short: a long (valid) output name must still fit
        fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name[:64]}.", suffix=".partial",
                                        dir=output.parent)
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot write {output}: {getattr(exc, 'strerror', None) or exc}"
                           ) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            tables, left_out = _write(fleet, dsn, fmt, out)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(output)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError):  # a full disk, a name too long for the rename, …
            raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
        _lock_error(fleet, tenant, slug, exc)
        raise
    return _done(fleet, tenant, fmt, str(output), output.stat().st_size, tables, left_out)


def _write(fleet: Deps, dsn: str, fmt: str, out: Any) -> tuple[int | None, dict[str, int]]:
    return (_sql(fleet, dsn, out), {}) if fmt == "sql" \
        else _csv(dsn, out, fleet.cfg.lock_timeout)


def _lock_error(fleet: Deps, tenant: Any, slug: str, exc: BaseException) -> None:
    """A wait that reached tenants.lock_wait_seconds: raised again saying who holds
    the lock (anything else: nothing, the caller raises it)."""
    if isinstance(exc, psycopg.errors.LockNotAvailable) or \
            isinstance(exc, ExportError) and "could not obtain lock" in str(exc):
        with fleet.server_connection(tenant.server) as conn:
            holders = pgserver.lock_holders(conn, tenant.database)
        raise ExportError(f"export of {slug!r} failed: {first_line(exc)}; locked by "
                          f"{', '.join(holders) or 'a session that has gone since'}"
                          ) from None


def _done(fleet: Deps, tenant: Any, fmt: str, output: str, size: int,
          tables: int | None, left_out: dict[str, int]) -> dict[str, Any]:
    fleet.catalog.audit("tenant.export", tenant=tenant.slug, region=tenant.region,
                        format=fmt, output=output, size=size, not_included=left_out or None)
    return {"tenant": tenant.slug, "format": fmt, "output": output, "size": size,
            "tables": tables, "not_included": left_out}


class _Counted:
    """A write-only stream that counts what passes (a pipe cannot say its size).
    No tell(): zipfile then writes as to a pipe, without seeking back."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.size = raw, 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def _sql(fleet: Deps, dsn: str, out: Any) -> int | None:
    argv = [fleet.pg_tools.path("pg_dump"), "--format=plain", "--no-owner", "--no-acl",
            f"--lock-wait-timeout={fleet.cfg.lock_timeout}"]  # a locked table: fail, not hang
    with tempfile.TemporaryFile() as err:
        if isinstance(out, _Counted):  # a stream: the dump passes through, counted
            with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                  env=libpq_env(dsn)) as proc:
                assert proc.stdout is not None
                try:
                    shutil.copyfileobj(proc.stdout, out, 1 << 20)
                except BaseException:
                    proc.kill()
                    raise
            done: subprocess.CompletedProcess[bytes] = subprocess.CompletedProcess(
                argv, proc.returncode)
        else:
            done = subprocess.run(argv, stdout=out, stderr=err, env=libpq_env(dsn))
        if done.returncode != 0:
            err.seek(0)
            said = pgserver.tool_error(err.read().decode(errors="replace"))
            raise ExportError(f"pg_dump failed: {said or done.returncode}")
    return None


NOT_INCLUDED = "NOT_INCLUDED.txt"


def _csv(dsn: str, out: Any, lock_wait: str) -> tuple[int, dict[str, int]]:
    """(tables written, what the CSV form cannot hold: {"large_objects": n})."""
    with psycopg.connect(dsn, options=f"-c lock_timeout={lock_wait}") as conn:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # one snapshot
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'alembic_version' ORDER BY 1")]
        row = conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()
        left_out = {"large_objects": int(row[0])} if row and row[0] else {}
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for table in tables:
                with zf.open(f"{table}.csv", "w", force_zip64=True) as entry, \
                        conn.cursor().copy(sql.SQL(
                            "COPY public.{} TO STDOUT WITH (FORMAT csv, HEADER, "
                            "ENCODING 'UTF8')").format(sql.Identifier(table))) as copy:
                    for chunk in copy:
                        entry.write(chunk)
            if left_out:
                zf.writestr(NOT_INCLUDED, f"{left_out['large_objects']} large object(s) "
                            "are not included: CSV has no form for them. "
                            "`tenantctl tenant export --format sql` includes them.\n")
    return len(tables), left_out
