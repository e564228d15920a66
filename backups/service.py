"""The backup pipeline: pg_dump → age encryption → the region's store, streamed
end to end (no plaintext on disk or in the store, memory bounded by a few
buffers whatever the database size), and a manifest written last.

    run_backup(fleet, "acme")        # one backup, recorded in the catalog
    verify_backup(fleet, backup_id)  # manifest, checksum, decrypt, pg_restore --list

The password never reaches pg_dump's argv: it connects with the admin role's
libpq passfile or PGPASSWORD, through the environment.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import psycopg
import pyrage
from psycopg import sql
from sqlalchemy import func, select, update

from backups.policy import (
    RetentionPolicy,
    Schedule,
    Verdict,
    is_due,
    prune_horizon,
    retention,
)
from backups.stores import ObjectMissing, ObjectStore, ObjectWriter, open_store
from orchestrator.adapters import clock
from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.catalog.models import Backup, Tenant, TenantKey, TenantMove, TenantState
from orchestrator.adapters.faults import checkpoint
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.domain import moves
from orchestrator.domain.errors import Conflict, ExitCode, NotFound, TenantctlError, first_line
from orchestrator.domain.names import tenant_lock, tenant_names
from orchestrator.domain.states import HAS_DATABASE, PRUNABLE
from orchestrator.domain.statuses import BACKUP_SKIPPED, BackupStatus

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

CHUNK = 1 << 20


class BackupError(TenantctlError):
    exit_code = ExitCode.DUMP_OR_RESTORE


@dataclass
class BackupResult:
    id: int
    tenant: str
    status: str
    size: int | None
    sha256: str | None
    error: str | None = None


libpq_env = pgserver.libpq_env  # re-exported: restores use it too


class _Hashing(io.RawIOBase):
    """Passes writes through to an object writer, counting and hashing them (and
    telling ``progress`` the count)."""

    def __init__(self, target: ObjectWriter,
                 progress: Callable[[int], None] | None = None) -> None:
        self.target = target
        self.sha = hashlib.sha256()
        self.size = 0
        self.progress = progress

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha.update(b)
        self.size += len(b)
        self.target.write(b)
        if self.progress is not None:
            self.progress(self.size)
        checkpoint("backup.chunk")  # crash tests: die mid-upload
        return len(b)


class _HashingReader(io.RawIOBase):
    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.source.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.size += n
        return n


@functools.cache
def compression_arg(pg_dump: str) -> str:
    """The best compression this pg_dump build supports: zstd, then lz4, then gzip
    (the embedded wheel's build has gzip only). The probe connects nowhere: an
    unsupported method is refused while parsing options."""
    for spec in ("zstd:3", "lz4", "gzip:6"):
        probe = subprocess.run(
            [pg_dump, f"--compress={spec}", "--schema-only", "-f", os.devnull,
             "--dbname=host=127.0.0.1 port=1 connect_timeout=1"],
            capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")})
        # accepted = it got as far as connecting; pg_dump 16+ says "does not support
        # compression", 15 and older "invalid value" for a method they do not know
        if not any(refusal in probe.stderr for refusal in
                   ("does not support compression", "invalid value", "invalid compression")):
            return f"--compress={spec}"
    return "--compress=6"


def dump_argv(pg_dump: str) -> list[str]:
    """pg_dump as every backup runs it (output on stdout): custom format, the best
    compression the build has, no owners or grants (a restore makes its own).
    The benchmarks' raw baselines run the same."""
    return [pg_dump, "--format=custom", compression_arg(pg_dump), "--no-owner", "--no-acl"]


def _store_for(fleet: Deps, region: str) -> ObjectStore:
    return open_store(fleet.cfg.region(region).backup_store, fleet.cfg.s3)


def run_backup(fleet: Deps, slug: str, *, kind: str = "manual",
               now: datetime | None = None,
               progress: Callable[[int], None] | None = None) -> BackupResult:
    """Dump, encrypt and upload one tenant; the manifest goes last, then the catalog
    row becomes completed. On any failure the partial object is aborted and the
    row says failed, with the reason. ``now`` (a retention run's) stamps every
    time it writes; without it the clock is read as each step happens.
    ``progress`` is called with the bytes streamed to the store so far."""
    tenant = fleet.get_tenant(slug)
    if tenant.state not in HAS_DATABASE:
        raise Conflict(f"tenant {slug!r} is {tenant.state}: nothing to back up")
    store = _store_for(fleet, tenant.region)  # the tenant's own region, never another
    store.prepare()  # (an S3 client, made while the steps up to pg_dump run)
    reap_dead(fleet, slug, now)  # whatever command comes next finishes off a crashed one
    if tenant.state == TenantState.cancelled:
        hold_large_objects(fleet, slug)
    pg_dump = fleet.pg_tools.path("pg_dump")
    dump_version = fleet.pg_tools.version("pg_dump")
    started = now or clock.utcnow()
    with fleet.catalog.session() as s, s.begin():
        key = fleet.keys.ensure_key(s, tenant.id, slug)
        recipient, key_id = key.recipient, key.key_id
        row = Backup(tenant_id=tenant.id, slug=slug, region=tenant.region,
                     store_url=store.url, object_key="", manifest_key="", kind=kind,
                     status=BackupStatus.running, key_id=key_id, revision=tenant.revision,
                     pg_dump_version=dump_version, started_at=started)
        s.add(row)
        s.flush()
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        row.object_key = f"tenants/{slug}/{row.id:010d}-{stamp}.dump.age"
        row.manifest_key = f"tenants/{slug}/{row.id:010d}-{stamp}.manifest.json"
        backup_id, object_key, manifest_key = row.id, row.object_key, row.manifest_key
    _refuse_while_moving(fleet, tenant.id, slug, backup_id)

    dsn = with_dbname(fleet.cfg.server(tenant.server).admin_dsn, tenant.database)
    # Held while this process works on the backup: a row 'running' whose lock is
    # free belongs to a dead process (see reap_dead).
    with fleet.catalog.advisory_lock(_alive(backup_id), wait=True):
        return _run_locked(fleet, tenant, backup_id, dsn, pg_dump, dump_version, recipient,
                           key_id, store, object_key, manifest_key, started, kind, now,
                           progress)


def _refuse_while_moving(fleet: Deps, tenant_id: int, slug: str, backup_id: int) -> None:
    """A move that has not cut over drops the database being dumped, or is copying
    it: no backup then (a region move's own backup comes after its cutover). Checked
    after this backup's row is committed, as the move checks for running backups
    after its own: whichever comes second sees the other."""
    with fleet.catalog.session() as s:
        steps = list(s.scalars(select(TenantMove.step).where(
            TenantMove.tenant_id == tenant_id, TenantMove.finished_at.is_(None))))
    if any(not moves.cut_over(step) for step in steps):
        _finish(fleet, backup_id, status=BackupStatus.failed,
                error="the tenant is being moved", finished_at=clock.utcnow())
        raise Conflict(f"tenant {slug!r} is being moved to another server: back it up "
                       "when the move has finished")


def hold_large_objects(fleet: Deps, slug: str) -> None:
    """During the hold, large objects the login role made since it began (creating
    one needs no privilege) become read-only like the rest. Under the tenant's lock
    and only if it is still cancelled (a reactivation meanwhile wins); skipped when
    another process holds the lock (the next backup does it)."""
    with fleet.catalog.advisory_lock(tenant_lock(slug)) as got:
        tenant = fleet.get_tenant(slug)
        if not got or tenant.state != TenantState.cancelled:
            return
        try:
            with pgserver.connect(fleet.cfg.server(tenant.server).admin_dsn,
                                  tenant_names(slug).database, server=tenant.server) as conn:
                pgserver.restrict_large_objects(conn, tenant_names(slug))
        except psycopg.Error as exc:
            raise BackupError(f"backup of {slug!r}: taking over its large objects failed: "
                              f"{first_line(exc)}") from None


def _alive(backup_id: int) -> str:
    return f"backup:{backup_id}"


def _run_locked(fleet: Deps, tenant: Any, backup_id: int, dsn: str, pg_dump: str,
                dump_version: str, recipient: str, key_id: str, store: ObjectStore,
                object_key: str, manifest_key: str, started: datetime, kind: str,
                now: datetime | None, progress: Callable[[int], None] | None = None
                ) -> BackupResult:
    slug = tenant.slug
    try:
        # One snapshot for the dump and the row counts the restore test checks. Every
        # lock wait is bounded (counts and pg_dump alike): a tenant's transaction
        # holding a table locked fails this backup instead of hanging it.
        wait = fleet.cfg.lock_timeout
        with psycopg.connect(dsn, autocommit=False, options=f"-c lock_timeout={wait}") as snap:
            snap.read_only = True
            snap.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            # what SHOW server_version says, from the startup reply (no round trip)
            server_version = snap.info.parameter_status("server_version") or ""
            # a fresh backend's every round trip costs server CPU (a fleet's backups
            # are many small ones): the snapshot and what the manifest needs, in three
            snapshot_id, db_size, large_objects = _snapshot_facts(snap)
            row_counts = table_row_counts(snap)
            size, sha = dump_encrypt_upload(pg_dump, dsn, snapshot_id, recipient, store,
                                             object_key, lock_wait=wait,
                                             expected_size=db_size, progress=progress)
        checkpoint("backup.uploaded")
        finished = now or clock.utcnow()
        manifest = {
            "format": "tenantctl-backup/1", "backup_id": backup_id, "tenant": slug,
            "region": tenant.region, "server": tenant.server,
            "server_version": server_version, "pg_dump_version": dump_version,
            "revision": tenant.revision, "key_id": key_id, "object": object_key,
            "size": size, "sha256": sha, "encryption": "age-x25519",
            "row_counts": row_counts, "large_objects": large_objects,
            "started_at": started.isoformat(), "finished_at": finished.isoformat(),
        }
        store.put_bytes(manifest_key, json.dumps(manifest, indent=2).encode())
        checkpoint("backup.manifest")
    except Exception as exc:
        error = first_line(exc)
        if is_lock_timeout(error):
            error += lock_holders_text(fleet, tenant.server, tenant.database)
        _finish(fleet, backup_id, status=BackupStatus.failed, error=error,
                finished_at=now or clock.utcnow(),
                audit=dict(tenant=slug, region=tenant.region, outcome="failed", at=now,
                           backup=backup_id, error=error))
        if isinstance(exc, TenantctlError) and not is_lock_timeout(error):
            raise
        raise BackupError(f"backup of {slug!r} failed: {error}") from None
    _finish(fleet, backup_id, status=BackupStatus.completed, size=size, sha256=sha,
            server_version=server_version, finished_at=finished,
            audit=dict(tenant=slug, region=tenant.region, at=now, backup=backup_id,
                       size=size, kind=kind))
    return BackupResult(backup_id, slug, BackupStatus.completed, size, sha)


_LOCK_TIMEOUTS = ("canceling statement due to lock timeout", "could not obtain lock")


def is_lock_timeout(error: str) -> bool:
    """Whether an error (ours, the driver's or pg_dump's last line) is a lock wait
    that reached tenants.lock_wait_seconds."""
    return any(text in error for text in _LOCK_TIMEOUTS)


def lock_holders_text(fleet: Deps, server: str, database: str) -> str:
    """'; locked by pid … (role …, idle in transaction since …)': who holds the lock
    a wait in ``database`` timed out on, read as the admin, for the error."""
    try:
        with fleet.server_connection(server) as conn:
            holders = pgserver.lock_holders(conn, database)
    except (psycopg.Error, TenantctlError) as exc:
        return f"; the lock holder could not be read: {first_line(exc)}"
    if not holders:
        return "; the lock holder has gone since"
    return f" after {fleet.cfg.lock_wait_seconds}s (tenants.lock_wait_seconds); " \
        f"locked by {', '.join(holders)}"


def _finish(fleet: Deps, backup_id: int, audit: dict[str, Any] | None = None,
            **values: Any) -> None:
    """The backup row's final values and, with ``audit``, its audit record: one
    catalog transaction (one commit per backup, not two)."""
    values.setdefault("finished_at", clock.utcnow())
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(Backup).where(Backup.id == backup_id).values(**values))
        if audit is not None:
            fleet.catalog.audit("backup.run", session=s, **audit)


_LARGE_OBJECTS_SQL = ("SELECT count(*), coalesce(md5(string_agg(m.oid::text || ':' || "
                      "md5(lo_get(m.oid)), ',' ORDER BY m.oid)), '') "
                      "FROM pg_largeobject_metadata m")


def table_row_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Rows per table of the public schema, as this connection's snapshot sees them:
    the names, then every count in one statement (two round trips, not one per
    table: a fleet's backups are mostly of small tenants on fresh backends)."""
    tables = [r[0] for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
    if not tables:
        return {}
    counts = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT {}, count(*) FROM public.{}").format(sql.Literal(t), sql.Identifier(t))
        for t in tables)
    return {table: int(n) for table, n in conn.execute(counts)}


def large_objects_digest(conn: psycopg.Connection) -> dict[str, Any]:
    """How many large objects this connection's snapshot sees, and a digest of their
    content (by oid): what a restore must bring back."""
    row = conn.execute(_LARGE_OBJECTS_SQL).fetchone()
    assert row is not None
    return {"count": int(row[0]), "md5": row[1]}


def _snapshot_facts(conn: psycopg.Connection) -> tuple[str, int, dict[str, Any]]:
    """In a new repeatable-read transaction: the exported snapshot (pg_dump takes
    it), the database's size (an upper bound of the dump's in practice, compressed
    and without indexes: an S3 upload sizes its parts from it) and the large
    objects' digest, all as of that snapshot, in one round trip."""
    row = conn.execute("SELECT pg_export_snapshot(), pg_database_size(current_database()), "
                       f"lo.* FROM ({_LARGE_OBJECTS_SQL}) lo").fetchone()
    assert row is not None
    return str(row[0]), int(row[1]), {"count": int(row[2]), "md5": row[3]}


def dump_encrypt_upload(pg_dump: str, dsn: str, snapshot_id: str | None, recipient: str,
                        store: ObjectStore, object_key: str, *, lock_wait: str | None = None,
                        expected_size: int | None = None,
                        progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """pg_dump → age (to ``recipient``) → the store, streamed; (size, sha256) of the
    encrypted object, committed only once pg_dump has succeeded. ``lock_wait``
    bounds pg_dump's wait for its table locks (a Postgres duration);
    ``expected_size`` is a rough size of the object, if known."""
    argv = dump_argv(pg_dump)
    if lock_wait is not None:
        argv.append(f"--lock-wait-timeout={lock_wait}")
    if snapshot_id is not None:
        argv.append(f"--snapshot={snapshot_id}")
    with tempfile.TemporaryFile() as errors, \
            store.writer(object_key, expected_size=expected_size) as writer:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors,
                                env=libpq_env(dsn))
        assert proc.stdout is not None
        sink = _Hashing(writer, progress)
        try:
            pyrage.encrypt_io(io.BufferedReader(proc.stdout, CHUNK),  # type: ignore[type-var,arg-type]
                              sink,  # type: ignore[arg-type]
                              [pyrage.x25519.Recipient.from_str(recipient)])
        except BaseException:
            proc.kill()
            proc.wait()
            if writer.error is not None:  # the store failed (e.g. full): say so, exit 9
                raise writer.error from None
            raise
        finally:
            proc.stdout.close()
        if proc.wait() != 0:
            errors.seek(0)
            said = pgserver.tool_error(errors.read().decode(errors="replace"))
            raise BackupError(f"pg_dump failed: {said or proc.returncode}")
        checkpoint("backup.dumped")
        writer.commit()
    return sink.size, sink.sha.hexdigest()


# -- reading a backup back -------------------------------------------------------------


def get_backup(fleet: Deps, backup_id: int) -> Backup:
    with fleet.catalog.session() as s:
        row = s.get(Backup, backup_id)
    if row is None:
        raise NotFound(f"no backup {backup_id}")
    return row


def latest_backup(fleet: Deps, slug: str) -> Backup:
    tenant = fleet.get_tenant(slug)
    with fleet.catalog.session() as s:
        row = s.scalars(select(Backup).where(Backup.tenant_id == tenant.id,
                                             Backup.status == BackupStatus.completed)
                        .order_by(Backup.id.desc()).limit(1)).one_or_none()
    if row is None:
        raise NotFound(f"tenant {slug!r} has no completed backup")
    return row


def check_restorable(fleet: Deps, row: Backup) -> tuple[ObjectStore, dict[str, Any]]:
    """A backup is offered for restore only if the catalog says completed, the
    manifest exists and agrees with the catalog, and it sits in the store of the
    tenant's region."""
    if row.status != BackupStatus.completed:
        raise BackupError(f"backup {row.id} is {row.status}, not restorable")
    store = _store_for(fleet, row.region)
    if store.url != row.store_url:
        raise BackupError(f"backup {row.id} is recorded in {row.store_url}, not in the "
                          f"{row.region} store {store.url}")
    try:
        manifest = json.loads(store.get_bytes(row.manifest_key))
    except ObjectMissing:  # (a store that fails is a StoreError: exit 9)
        raise BackupError(f"backup {row.id} has no manifest: not restorable") from None
    except ValueError:
        raise BackupError(f"backup {row.id}: manifest is not valid JSON") from None
    for field, expected in (("backup_id", row.id), ("tenant", row.slug),
                            ("region", row.region), ("sha256", row.sha256),
                            ("size", row.size), ("key_id", row.key_id)):
        if manifest.get(field) != expected:
            raise BackupError(f"backup {row.id}: manifest {field} is "
                              f"{manifest.get(field)!r}, catalog says {expected!r}")
    return store, manifest


def download_backup(fleet: Deps, backup_id: int, sink: BinaryIO) -> dict[str, Any]:
    """Copy a backup's object, still encrypted, into ``sink`` (break-glass: the stock
    `age` decrypts it with the tenant's exported key). Only a backup offered for
    restore (completed, its manifest agreeing with the catalog); the bytes are
    counted and hashed on the way and must match the manifest's size and sha256,
    else BackupError (the caller discards what it wrote). Audited."""
    row = get_backup(fleet, backup_id)
    store, manifest = check_restorable(fleet, row)
    with store.reader(row.object_key) as raw:
        source = _HashingReader(raw)
        while chunk := source.read(CHUNK):
            sink.write(chunk)
    sink.flush()
    for field, actual in (("size", source.size), ("sha256", source.sha.hexdigest())):
        expected = manifest.get(field)
        if expected is not None and expected != actual:
            raise BackupError(f"backup {row.id}: downloaded {field} {actual} differs from "
                              f"the manifest's {expected}: not the object that was written")
    fleet.catalog.audit("backup.download", tenant=row.slug, region=row.region, backup=row.id)
    return {"id": row.id, "tenant": row.slug, "object": row.object_key, "size": source.size,
            "sha256": source.sha.hexdigest(), "key_id": row.key_id}


class _UntilClosed(io.RawIOBase):
    """Writes into a consumer's stdin until it stops reading, then discards: the
    rest of the object is still decrypted (every age chunk authenticated) and
    hashed, so a consumer that needs only the head (`pg_restore --list` reads
    the table of contents and exits) still gets the whole object checked."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.consumer_done = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if not self.consumer_done:
            try:
                self.target.write(b)
            except BrokenPipeError:
                self.consumer_done = True
        return len(b)


def stream_plaintext(fleet: Deps, row: Backup, consumer_argv: list[str],
                     env: dict[str, str], *, whole_input: bool = True
                     ) -> subprocess.CompletedProcess[bytes]:
    """Fetch, check and decrypt a backup into the stdin of ``consumer_argv``
    (pg_restore), never touching disk with plaintext. Raises BackupError when the
    object does not authenticate or its checksum does not match. With
    ``whole_input=False`` the consumer may stop reading early (its exit code
    then says whether it was content); the whole object is checked regardless."""
    store, _ = check_restorable(fleet, row)
    with fleet.catalog.session() as s:
        key = s.get(TenantKey, row.tenant_id)
    if key is None:
        raise BackupError(f"backup {row.id}: the tenant has no key")
    identity = fleet.keys.identity(key, row.slug)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(consumer_argv, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                env=env)
        assert proc.stdin is not None
        failure: str | None = None
        with store.reader(row.object_key) as raw:
            source = _HashingReader(raw)
            sink: Any = proc.stdin if whole_input else _UntilClosed(proc.stdin)
            try:
                pyrage.decrypt_io(io.BufferedReader(source, CHUNK), sink,
                                  [identity])
            except BrokenPipeError:
                failure = "the restore process stopped reading"
            except (pyrage.DecryptError, OSError) as exc:
                # pyrage reports a failed STREAM chunk as OSError("decryption error")
                failure = f"does not decrypt ({exc}): tampered or corrupted"
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
        code = proc.wait()
        if failure is None and (source.size != row.size or source.sha.hexdigest() != row.sha256):
            failure = "checksum mismatch: the object is not the one that was written"
        if failure is not None:
            raise BackupError(f"backup {row.id} {failure}")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(consumer_argv, code, out.read(), err.read())


def verify_backup(fleet: Deps, backup_id: int, now: datetime | None = None) -> dict[str, Any]:
    """Manifest, checksum, decryption and `pg_restore --list` of one backup;
    verified at ``now`` (a retention run's), else when it ends."""
    row = get_backup(fleet, backup_id)
    pg_restore = fleet.pg_tools.path("pg_restore")
    # pg_restore --list reads the table of contents and exits: let it, and check the
    # rest of the object all the same
    done = stream_plaintext(fleet, row, [pg_restore, "--list"], libpq_env(""),
                            whole_input=False)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise BackupError(f"backup {row.id}: pg_restore --list failed: "
                          f"{lines[-1] if lines else done.returncode}")
    entries = sum(1 for ln in done.stdout.decode(errors="replace").splitlines()
                  if ln and not ln.startswith(";"))
    _finish(fleet, row.id, verified_at=now or clock.utcnow(), finished_at=row.finished_at)
    fleet.catalog.audit("backup.verify", tenant=row.slug, region=row.region, at=now,
                        backup=row.id)
    return {"id": row.id, "tenant": row.slug, "ok": True, "size": row.size,
            "sha256": row.sha256, "toc_entries": entries}


def run_many(fleet: Deps, slugs: list[str], concurrency: int,
             on_done: Any = None, kind: str = "manual") -> list[BackupResult]:
    """Back up many tenants; one tenant's failure never stops the others."""
    results: list[BackupResult] = []
    lock = threading.Lock()
    catalog_gone = threading.Event()

    def one(slug: str) -> None:
        if catalog_gone.is_set():
            return
        try:
            r = run_due_backup(fleet, slug) if kind == "scheduled" else \
                run_backup(fleet, slug, kind=kind)
        except Exception as exc:  # noqa: BLE001 - one tenant's failure is its own step's
            if not _catalog_answers(fleet):
                # nothing can be recorded without the catalog: the run ends, one error
                catalog_gone.set()
                raise
            r = BackupResult(0, slug, BackupStatus.failed, None, None,
                             str(exc) if isinstance(exc, TenantctlError) else first_line(exc))
        with lock:
            results.append(r)
        if on_done is not None:
            on_done(r)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(one, slugs))
    return sorted(results, key=lambda r: r.tenant)


def _catalog_answers(fleet: Deps) -> bool:
    try:
        fleet.catalog.current()
        return True
    except Exception:  # noqa: BLE001 - whatever it is, the catalog did not answer
        return False


def reap_dead(fleet: Deps, slug: str | None = None, now: datetime | None = None) -> int:
    """Backups left 'running' by a process that died: abort their partial upload
    (no orphan multipart upload, no partial file), mark them failed."""
    q = select(Backup).where(Backup.status == BackupStatus.running)
    if slug is not None:
        q = q.where(Backup.slug == slug)
    with fleet.catalog.session() as s:
        rows = list(s.scalars(q))
    reaped = 0
    for row in rows:
        with fleet.catalog.advisory_lock(_alive(row.id)) as dead:
            if not dead:
                continue
            store = open_store(row.store_url)
            if row.object_key:
                store.abort_uploads(row.object_key)
                store.delete(row.object_key)
            if row.manifest_key:
                store.delete(row.manifest_key)
            _finish(fleet, row.id, status=BackupStatus.failed,
                    error="interrupted: the process died", finished_at=now or clock.utcnow())
            reaped += 1
    return reaped


def restore_test(fleet: Deps, backup_id: int) -> dict[str, Any]:
    """Restore into a scratch database and compare row counts per table with those
    the manifest recorded from the dump's own snapshot; the scratch database is
    dropped whatever happens."""
    row = get_backup(fleet, backup_id)
    _, manifest = check_restorable(fleet, row)
    expected = manifest.get("row_counts")
    if expected is None:
        raise BackupError(f"backup {row.id} has no row counts in its manifest")
    tenant = fleet.get_tenant(row.slug)
    scratch = f"tenantctl_verify_{row.id}"
    admin = fleet.cfg.server(tenant.server).admin_dsn
    with fleet.server_connection(tenant.server) as conn:
        pgserver.make_scratch_database(conn, scratch)
    try:
        dsn = with_dbname(admin, scratch)
        argv = [fleet.pg_tools.path("pg_restore"), "--no-owner", "--no-acl",
                "--single-transaction", "--exit-on-error", f"--dbname={scratch}"]
        done = stream_plaintext(fleet, row, argv, libpq_env(dsn))
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            raise BackupError(f"backup {row.id}: test restore failed: "
                              f"{lines[-1] if lines else done.returncode}")
        with psycopg.connect(dsn) as check:
            actual = table_row_counts(check)
            restored_los = large_objects_digest(check)
    finally:
        with fleet.server_connection(tenant.server) as conn:
            pgserver.drop_database(conn, scratch, if_exists=True)
    if manifest.get("large_objects") not in (None, restored_los):
        raise BackupError(f"backup {row.id}: restored large objects differ: expected "
                          f"{manifest['large_objects']['count']} (md5 "
                          f"{manifest['large_objects']['md5'] or '-'}), got "
                          f"{restored_los['count']} (md5 {restored_los['md5'] or '-'})")
    mismatched = {t: (expected.get(t), actual.get(t)) for t in set(expected) | set(actual)
                  if expected.get(t) != actual.get(t)}
    if mismatched:
        first = sorted(mismatched)[0]
        raise BackupError(f"backup {row.id}: restored row counts differ, e.g. {first}: "
                          f"expected {mismatched[first][0]}, got {mismatched[first][1]}")
    _finish(fleet, row.id, verified_at=clock.utcnow(), finished_at=row.finished_at)
    fleet.catalog.audit("backup.verify", tenant=row.slug, region=row.region, backup=row.id,
                        restore_test=True)
    return {"id": row.id, "tenant": row.slug, "ok": True, "tables": len(actual),
            "rows": sum(actual.values()), "large_objects": restored_los["count"]}


def run_due_backup(fleet: Deps, slug: str, now: datetime | None = None) -> BackupResult:
    """A scheduled backup, at most once per slot: two schedulers or two overlapping
    `backup run --due` that found the same tenant due back it up once. The slot
    is checked again under a per-tenant lock; whoever comes second skips."""
    now = now or clock.utcnow()
    schedule = Schedule(timedelta(hours=fleet.cfg.backup_interval_hours))
    with fleet.catalog.advisory_lock(f"backup-due:{slug}") as got:
        if not got:
            return BackupResult(0, slug, BACKUP_SKIPPED, None, None,
                                "another process is backing it up")
        with fleet.catalog.session() as s:
            last = s.scalar(select(func.max(Backup.finished_at)).where(
                Backup.slug == slug, Backup.status == BackupStatus.completed))
        if not is_due(slug, last, now, schedule):
            return BackupResult(0, slug, BACKUP_SKIPPED, None, None, "no longer due")
        return run_backup(fleet, slug, kind="scheduled")


def due_tenants(fleet: Deps, now: datetime | None = None) -> list[str]:
    """Tenants whose scheduled backup is due (see backups.policy)."""
    now = now or clock.utcnow()
    schedule = Schedule(timedelta(hours=fleet.cfg.backup_interval_hours))
    with fleet.catalog.session() as s:
        last = dict(s.execute(select(Backup.tenant_id, func.max(Backup.finished_at))
                              .where(Backup.status == BackupStatus.completed)
                              .group_by(Backup.tenant_id)).all())
        tenants = list(s.scalars(select(Tenant).where(Tenant.state.in_(HAS_DATABASE))
                                 .order_by(Tenant.slug)))
    return [t.slug for t in tenants if is_due(t.slug, last.get(t.id), now, schedule)]


# What the prune policy needs to judge, and no more: the completed backups it could
# prune, those of tenants whose backups are pruned at all (PRUNABLE, not under legal
# hold) from before the policy's horizon, plus each such tenant's newest backup, which
# decides the floor (one index probe per tenant). Backups after the horizon are kept
# whatever happens and are not read, so the cost follows the old backups.
_OLD_SQL = f"""
old AS (
    SELECT b.id, b.slug, b.finished_at, b.tenant_id
    FROM backups b JOIN tenants t ON t.id = b.tenant_id
    WHERE b.status = '{BackupStatus.completed}' AND b.finished_at < %(horizon)s
      AND t.state = ANY(%(states)s) AND NOT t.legal_hold
)"""
_FACTS_OF = f"""
SELECT id, slug, finished_at FROM {{judged}}
UNION ALL
SELECT n.id, n.slug, n.finished_at
FROM (SELECT DISTINCT tenant_id FROM {{judged}}) o
CROSS JOIN LATERAL (
    SELECT id, slug, finished_at FROM backups
    WHERE tenant_id = o.tenant_id AND status = '{BackupStatus.completed}'
    ORDER BY finished_at DESC LIMIT 1) n
WHERE n.finished_at >= %(horizon)s  -- an older newest is in the judged rows already
"""
_PRUNE_FACTS_SQL = "WITH" + _OLD_SQL + _FACTS_OF.format(judged="old")
# A planner wants the prunes only: in a steady fleet every old backup is the only one
# of its week within keep_weeks, and such a tenant has nothing to prune (policy.
# retention keeps the newest of each week < keep_weeks). So only tenants with an old
# backup beyond keep_weeks or two in one week are read. The week is policy.retention's
# (now - finished_at) // 7 days, in exact integer microseconds (extract() is numeric).
_PRUNE_CANDIDATES_SQL = "WITH" + _OLD_SQL + """,
weeks AS (
    SELECT *, div(extract(epoch FROM (%(now)s - finished_at)) * 1000000,
                  604800000000) AS week
    FROM old
),
judged AS (
    SELECT id, slug, finished_at, tenant_id FROM weeks
    WHERE tenant_id IN (SELECT tenant_id FROM weeks GROUP BY tenant_id
                        HAVING count(*) > count(DISTINCT week)
                                          FILTER (WHERE week < %(keep_weeks)s))
)""" + _FACTS_OF.format(judged="judged")


def prune_facts(fleet: Deps, now: datetime, policy: RetentionPolicy, *,
                candidates_only: bool = False) -> list[tuple[int, str, datetime]]:
    """The backups the policy judges (see _PRUNE_FACTS_SQL) as (id, tenant,
    finished_at), read in one round trip and left as the driver's tuples (a prune
    may read a few per tenant of the fleet). candidates_only: only those of tenants
    that may have something to prune (_PRUNE_CANDIDATES_SQL), for a caller that
    reports the prunes alone."""
    params = {"horizon": prune_horizon(now, policy), "states": [str(s) for s in PRUNABLE],
              "now": now, "keep_weeks": policy.keep_weeks}
    query = _PRUNE_CANDIDATES_SQL if candidates_only else _PRUNE_FACTS_SQL
    with fleet.catalog.engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert isinstance(raw, psycopg.Connection)
        with raw.cursor(binary=True) as cur:
            rows: list[tuple[int, str, datetime]] = cur.execute(query, params).fetchall()
        conn.rollback()
    return rows


def prune_policy(fleet: Deps) -> RetentionPolicy:
    return RetentionPolicy(fleet.cfg.backup_keep_days, fleet.cfg.backup_keep_weeks)


def prune_verdicts(fleet: Deps, now: datetime, policy: RetentionPolicy | None = None,
                   *, report_kept: bool = True) -> list[Verdict]:
    """The retention policy's report (backups.policy.retention, the one prune rule)
    on the backups it has to judge: keep or prune, and why (only the prunes
    unless report_kept, read for the tenants that may have some). `backup prune`
    and `retention run` both decide with it (the configured policy unless one is
    given)."""
    policy = policy or prune_policy(fleet)
    facts = prune_facts(fleet, now, policy, candidates_only=not report_kept)
    return retention(facts, now, policy, report_kept=report_kept)


def delete_backup(fleet: Deps, backup_id: int, *, reason: str,
                  now: datetime | None = None) -> None:
    """Remove one backup from its store (manifest first: without it the object is
    no longer offered for restore), then mark it deleted, audited at ``now`` (the
    prune's) if given. Idempotent."""
    b = get_backup(fleet, backup_id)
    if b.status == BackupStatus.deleted:
        return
    store = open_store(b.store_url)
    store.delete(b.manifest_key)
    store.delete(b.object_key)
    _finish(fleet, b.id, status=BackupStatus.deleted, finished_at=b.finished_at)
    fleet.catalog.audit("backup.prune", tenant=b.slug, region=b.region, at=now,
                        backup=b.id, reason=reason)


def prune(fleet: Deps, *, dry_run: bool, now: datetime | None = None) -> list[dict[str, Any]]:
    """Apply the retention policy to live tenants' backups: a report of every backup
    it had to judge (keep/prune, why); unless dry_run, delete what is pruned (with
    delete_backup, as retention's prune steps do)."""
    now = now or clock.utcnow()
    report = []
    for v in prune_verdicts(fleet, now):
        report.append({"id": v.backup_id, "tenant": v.tenant,
                       "action": "keep" if v.keep else "prune", "reason": v.reason})
        if not v.keep and not dry_run:
            delete_backup(fleet, v.backup_id, reason=v.reason, now=now)
    return report


class PipelineJobs:
    """``orchestrator.ports.BackupJobs``: this module's entry points, as lifecycle and
    retention call them (each looked up when called: tests may patch one)."""

    def __init__(self, fleet: Deps) -> None:
        self._fleet = fleet

    def run(self, slug: str, *, kind: str, now: datetime | None = None) -> int:
        return run_backup(self._fleet, slug, kind=kind, now=now).id

    def verify(self, backup_id: int, now: datetime | None = None) -> None:
        verify_backup(self._fleet, backup_id, now)

    def get(self, backup_id: int) -> Backup:
        return get_backup(self._fleet, backup_id)

    def delete(self, backup_id: int, *, reason: str, now: datetime | None = None) -> None:
        delete_backup(self._fleet, backup_id, reason=reason, now=now)

    def reap_dead(self, slug: str, now: datetime | None = None) -> int:
        return reap_dead(self._fleet, slug, now)

    def prune_verdicts(self, now: datetime) -> list[Verdict]:
        return prune_verdicts(self._fleet, now, report_kept=False)
