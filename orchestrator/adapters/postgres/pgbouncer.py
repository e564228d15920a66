"""PgBouncer: the files tenantctl writes for it (the database list its ini includes,
the auth file of SCRAM verifiers) and its admin console (RELOAD, KILL, SHOW).

Files are written whole and atomically (a temporary file in the same directory,
mode 0600, renamed over the old one): PgBouncer never reads half a list. As root,
they take the directory's owner, the OS user PgBouncer runs as (it refuses root).
The admin console speaks the simple query protocol only: statements go through
libpq's PQexec.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import psycopg
from psycopg import pq

from orchestrator.config import PoolerConfig
from orchestrator.domain.errors import ServerUnavailable, first_line
from orchestrator.domain.pooler import AUTH_FILE, DATABASES_FILE, PoolerFiles

CONNECT_TIMEOUT = 3  # seconds: a pooler that is down must not hold up provisioning


def read_file(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def current_files(pooler: PoolerConfig) -> tuple[str | None, str | None]:
    """(database list, auth file) as they are on disk; None: missing."""
    return read_file(pooler.dir / DATABASES_FILE), read_file(pooler.dir / AUTH_FILE)


def write_private(path: Path, text: str) -> bool:
    """Replace ``path`` with ``text`` atomically, mode 0600; False if it already held
    exactly that (nothing written)."""
    if read_file(path) == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if os.geteuid() == 0:
            st = path.parent.stat()
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def write_files(pooler: PoolerConfig, files: PoolerFiles) -> bool:
    """Both files (the auth file first: a database listed before its users could
    refuse them); True if either changed."""
    auth = write_private(pooler.dir / AUTH_FILE, files.auth)
    dbs = write_private(pooler.dir / DATABASES_FILE, files.databases)
    return auth or dbs


def admin_password(pooler: PoolerConfig) -> str:
    assert pooler.admin_password_file is not None
    try:
        return pooler.admin_password_file.read_text().strip()
    except OSError as exc:
        raise ServerUnavailable(f"pooler admin password file {pooler.admin_password_file}: "
                                f"{exc.strerror}") from None


def where(pooler: PoolerConfig) -> str:
    return f"{pooler.host}:{pooler.port}"


def console(pooler: PoolerConfig, *commands: str) -> list[list[tuple[str | None, ...]]]:
    """Run admin console commands (fixed words and names tenantctl made; never
    input) and return each one's rows. A pooler that cannot be reached or refuses:
    ServerUnavailable, one line, no password in it."""
    try:
        conn = psycopg.connect(host=pooler.host, port=pooler.port, dbname="pgbouncer",
                               user=pooler.admin_user, password=admin_password(pooler),
                               autocommit=True, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as exc:
        raise ServerUnavailable(f"pooler at {where(pooler)} is down or refused tenantctl: "
                                f"{first_line(exc)}") from None
    out = []
    try:
        for command in commands:
            res = conn.pgconn.exec_(command.encode())
            if res.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                msg = (res.error_message or b"").decode(errors="replace").strip()
                raise ServerUnavailable(f"pooler at {where(pooler)}: {command.split()[0]} "
                                        f"failed: {msg}")
            out.append([tuple(None if (v := res.get_value(r, c)) is None
                              else v.decode(errors="replace") for c in range(res.nfields))
                        for r in range(res.ntuples)])
    finally:
        conn.close()
    return out


def reload(pooler: PoolerConfig, killed: Iterable[str] = ()) -> None:
    """RELOAD (the new list and auth file, clients kept), then KILL the databases
    just taken off the list: their open client connections end too."""
    console(pooler, "RELOAD")
    for name in killed:
        with contextlib.suppress(ServerUnavailable):  # not connected now: nothing to end
            console(pooler, f"KILL {name}")  # a tenant name: [a-z0-9_]


def version(pooler: PoolerConfig) -> str:
    rows = console(pooler, "SHOW VERSION")[0]
    return rows[0][0] or "" if rows else ""
