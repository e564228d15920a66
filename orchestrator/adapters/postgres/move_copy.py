"""What a tenant move reads and runs on the servers: the facts the planner needs
(size, large objects, tables without a key, whether a server can replicate),
the checks compared before a cutover (row counts, per-table checksums, sequence
values, large objects), the sequences' copy, and `pg_dump | pg_restore` between
two servers, streamed through this process (no plaintext on disk; each tool
gets its server's credentials through its environment, never argv)."""

from __future__ import annotations

import contextlib
import queue
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.adapters.postgres.admin import libpq_env, tool_error
from orchestrator.adapters.postgres.admin import logical_readiness as admin_logical_readiness
from orchestrator.domain.errors import ExitCode, TenantctlError
from orchestrator.domain.moves import TableSum

CHUNK = 1 << 20


class CopyFailed(TenantctlError):
    """pg_dump or pg_restore of a move failed (the move stops before its cutover)."""

    exit_code = ExitCode.DUMP_OR_RESTORE


# -- facts ----------------------------------------------------------------------------


def database_size(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def large_objects_count(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()
    return int(row[0]) if row else 0


def tables_without_key(conn: psycopg.Connection) -> list[str]:
    """Tables of the public schema whose updates logical replication could not carry:
    no primary key and no other replica identity."""
    return [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND ("
        "  (c.relreplident = 'd' AND NOT EXISTS (SELECT FROM pg_index i WHERE "
        "   i.indrelid = c.oid AND i.indisprimary)) OR c.relreplident = 'n') "
        "ORDER BY 1")]


def logical_readiness(conn: psycopg.Connection) -> str | None:
    """Why this server cannot take part in a logical move (None: it can): one reading
    (admin.logical_readiness), the same that `config check` and `doctor` judge by."""
    why = admin_logical_readiness(conn).blockers()
    return "; ".join(why) if why else None


# -- checks ---------------------------------------------------------------------------

# Order-independent digest of a table's rows: the sum of a 64-bit hash of each row, so
# no sort and no string the size of the table (the checks run while writes are paused).
# The row is hashed by hash_record_extended: each column by its type's own hash, no
# text conversion (several times cheaper than hashing the row's text). A type's hash
# may equate values its text tells apart (numeric 1.0 and 1.00, float -0 and 0, case
# under a nondeterministic collation), so only the types whose hash is of their exact
# stored value are hashed as they are; every other column is hashed by its text, as
# the whole row once was.
_EXACT_HASH_TYPES = frozenset({
    "int2", "int4", "int8", "oid", "bool", "char", "text", "varchar", "bytea", "uuid",
    "date", "time", "timestamp", "timestamptz"})

_COLUMNS = """
SELECT a.attname, t.typname, coalesce(c.collisdeterministic, true)
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_collation c ON c.oid = a.attcollation
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


def row_hash(conn: psycopg.Connection, table: str) -> sql.Composable:
    """The expression hashing one row ``t`` of ``public.table`` (see above)."""
    cols = []
    for name, typ, deterministic in conn.execute(
            _COLUMNS, (sql.Identifier("public", table).as_string(conn),)):
        col = sql.SQL("t.{}").format(sql.Identifier(name))
        exact = typ in _EXACT_HASH_TYPES and deterministic
        cols.append(col if exact else sql.SQL("{}::text").format(col))
    if not cols:
        return sql.SQL("0")
    return sql.SQL("hash_record_extended(ROW({}), 0)").format(sql.SQL(", ").join(cols))


def table_sum(conn: psycopg.Connection, table: str) -> TableSum:
    row = conn.execute(sql.SQL(
        "SELECT count(*), coalesce(sum({}::numeric), 0)::text FROM public.{} t").format(
        row_hash(conn, table), sql.Identifier(table))).fetchone()
    assert row is not None
    return TableSum(int(row[0]), str(row[1]))


def table_sums(conn: psycopg.Connection) -> dict[str, TableSum]:
    return {table: table_sum(conn, table) for table in public_tables(conn)}


def sequence_values(conn: psycopg.Connection) -> dict[str, tuple[int, bool]]:
    names = [r[0] for r in conn.execute(
        "SELECT sequencename FROM pg_sequences WHERE schemaname = 'public' ORDER BY 1")]
    out = {}
    for name in names:
        row = conn.execute(sql.SQL("SELECT last_value, is_called FROM public.{}").format(
            sql.Identifier(name))).fetchone()
        assert row is not None
        out[name] = (int(row[0]), bool(row[1]))
    return out


def set_sequences(conn: psycopg.Connection, values: dict[str, tuple[int, bool]]) -> None:
    """Each sequence of the copy where the source's is (logical replication does not
    carry them)."""
    for name, (last, called) in values.items():
        conn.execute("SELECT setval(%s::regclass, %s, %s)",
                     (sql.Identifier("public", name).as_string(conn), last, called))


def large_objects_digest(conn: psycopg.Connection) -> dict[str, Any]:
    row = conn.execute("SELECT count(*), coalesce(md5(string_agg(m.oid::text || ':' || "
                       "md5(lo_get(m.oid)), ',' ORDER BY m.oid)), '') "
                       "FROM pg_largeobject_metadata m").fetchone()
    assert row is not None
    return {"count": int(row[0]), "md5": row[1]}


CHECK_CONNECTIONS = 3  # per server: tables summed side by side (each scan may go parallel too)


def _snapshot_conn(dsn: str, snapshot: str | None = None) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=False, connect_timeout=10,
                           application_name="tenantctl")
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    if snapshot is not None:  # the first statement of the transaction
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
    return conn


def checks(dsn: str, connections: int = CHECK_CONNECTIONS) -> dict[str, Any]:
    """The checks of the database behind ``dsn``, read in one snapshot: the largest
    tables first, shared among ``connections`` sessions that all read the snapshot
    the first one exported."""
    with _snapshot_conn(dsn) as conn:
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        snapshot = str(row[0])
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "ORDER BY pg_total_relation_size(format('public.%I', tablename)::regclass) DESC, 1")]
        todo: queue.SimpleQueue[str] = queue.SimpleQueue()
        for table in tables:
            todo.put(table)
        sums: dict[str, TableSum] = {}

        def drain(c: psycopg.Connection) -> None:
            while True:
                try:
                    table = todo.get_nowait()
                except queue.Empty:
                    return
                sums[table] = table_sum(c, table)

        def helper() -> None:
            with _snapshot_conn(dsn, snapshot) as c:
                drain(c)
                c.rollback()

        extra = min(connections, len(tables)) - 1
        with ThreadPoolExecutor(max_workers=max(1, extra)) as pool:
            helpers = [pool.submit(helper) for _ in range(extra)]
            drain(conn)
            for h in helpers:
                h.result()  # a helper's failure fails the checks
        out = {"tables": dict(sorted(sums.items())), "sequences": sequence_values(conn),
               "large_objects": large_objects_digest(conn)}
        conn.rollback()
    return out


# -- the copy -------------------------------------------------------------------------


def dump_restore(pg_dump: str, pg_restore: str, source_dsn: str, target_dsn: str,
                 owner_role: str, *, lock_wait: str | None = None, schema_only: bool = False,
                 progress: Callable[[int], None] | None = None,
                 chunk_hook: Callable[[], None] | None = None) -> int:
    """`pg_dump` of the source straight into `pg_restore` on the target, in one
    transaction there (all or nothing), every object owned by ``owner_role``. The
    bytes pass through this process (counted) and never touch disk. Returns the
    bytes copied."""
    dump_argv = [pg_dump, "--format=custom", "--compress=0", "--no-owner", "--no-acl"]
    if schema_only:
        dump_argv.append("--schema-only")
    if lock_wait is not None:
        dump_argv.append(f"--lock-wait-timeout={lock_wait}")
    restore_argv = [pg_restore, "--no-owner", "--no-acl", f"--role={owner_role}",
                    "--single-transaction", "--exit-on-error", "--dbname",
                    str(psycopg.conninfo.conninfo_to_dict(target_dsn).get("dbname"))]
    copied = 0
    with tempfile.TemporaryFile() as dump_err, tempfile.TemporaryFile() as restore_err:
        dump = subprocess.Popen(dump_argv, stdout=subprocess.PIPE, stderr=dump_err,
                                env=libpq_env(source_dsn))
        restore = subprocess.Popen(restore_argv, stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=restore_err,
                                   env=libpq_env(target_dsn))
        assert dump.stdout is not None and restore.stdin is not None
        broken = False
        try:
            while chunk := dump.stdout.read(CHUNK):
                try:
                    restore.stdin.write(chunk)
                except BrokenPipeError:
                    broken = True
                    break
                copied += len(chunk)
                if progress is not None:
                    progress(copied)
                if chunk_hook is not None:
                    chunk_hook()
        except BaseException:
            dump.kill()
            restore.kill()
            raise
        finally:
            dump.stdout.close()
            if not broken:
                with contextlib.suppress(BrokenPipeError):
                    restore.stdin.close()
        if broken:
            dump.kill()
        dump_code, restore_code = dump.wait(), restore.wait()
        if dump_code != 0 and not broken:
            dump_err.seek(0)
            said = tool_error(dump_err.read().decode(errors="replace"))
            raise CopyFailed(f"pg_dump failed: {said or dump_code}")
        if restore_code != 0:
            restore_err.seek(0)
            said = tool_error(restore_err.read().decode(errors="replace"))
            raise CopyFailed(f"pg_restore failed: {said or restore_code}")
    return copied



# -- logical replication (publication on the source, subscription on the target) -----


def public_tables(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]


def create_publisher(conn: psycopg.Connection, admin_conn: psycopg.Connection, name: str,
                     owner_role: str, database: str, password: str) -> None:
    """On the source: a temporary login role ``name`` (REPLICATION, CONNECT on the
    tenant's database, SELECT on its tables; its password a SCRAM verifier made
    here) and a publication ``name`` of every table of the public schema, owned by
    the tenant's owner role (FOR TABLE needs no superuser). ``conn``: in the
    tenant's database; ``admin_conn``: the maintenance database. Idempotent."""
    ident = sql.Identifier(name)
    verifier = admin_conn.pgconn.encrypt_password(password.encode(), name.encode(),
                                                  b"scram-sha-256").decode()
    exists = admin_conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)
                                ).fetchone()
    admin_conn.execute(sql.SQL("{} ROLE {} LOGIN REPLICATION NOINHERIT PASSWORD {}").format(
        sql.SQL("ALTER" if exists else "CREATE"), ident, sql.Literal(verifier)))
    admin_conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
        sql.Identifier(database), ident))
    tables = public_tables(conn)
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner_role)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(ident))
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(ident))
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
            ident, sql.SQL(", ").join(sql.Identifier("public", t) for t in tables)))


def subscription_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)
                        ).fetchone() is not None


def create_subscription(conn: psycopg.Connection, name: str, conninfo: str) -> None:
    """On the target, in the tenant's new database: the subscription (initial copy,
    then streaming), which makes its slot on the source. The connection string
    holds the temporary role's password: a non-superuser's subscription must."""
    if subscription_exists(conn, name):
        return
    conn.execute(sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} "
                         "WITH (copy_data = true)").format(
        sql.Identifier(name), sql.Literal(conninfo), sql.Identifier(name)))


def tables_not_ready(conn: psycopg.Connection, name: str) -> int:
    """Tables of the subscription whose initial copy has not finished."""
    row = conn.execute(
        "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON "
        "s.oid = r.srsubid WHERE s.subname = %s AND r.srsubstate NOT IN ('r', 's')",
        (name,)).fetchone()
    return int(row[0]) if row else 0


def slot_lag(conn: psycopg.Connection, name: str, upto: str | None = None) -> int | None:
    """Bytes of WAL the subscription's slot has not confirmed (up to ``upto``, an LSN,
    else the current one); None when there is no such slot."""
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(coalesce(%s::pg_lsn, pg_current_wal_lsn()), "
        "confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = %s",
        (upto, name)).fetchone()
    return None if row is None or row[0] is None else max(0, int(row[0]))


def current_lsn(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def drop_subscription(conn: psycopg.Connection, name: str, *, keep_slot: bool = False
                      ) -> None:
    """Drop the subscription (and, through it, its slot on the source; with
    ``keep_slot``, when the source cannot be reached, the slot is left for
    ``drop_slot``)."""
    if not subscription_exists(conn, name):
        return
    ident = sql.Identifier(name)
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
    if keep_slot:
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
    conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))


def drop_slot(conn: psycopg.Connection, name: str) -> bool:
    """Drop the replication slot ``name`` if it exists and nobody uses it."""
    row = conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                       "WHERE slot_name = %s AND NOT active", (name,)).fetchone()
    return row is not None


def drop_publication(conn: psycopg.Connection, name: str, owner_role: str) -> None:
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner_role)))
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
