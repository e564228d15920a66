"""Leader election for the scheduler: a session-level advisory lock in the catalog,
taken with pg_try_advisory_lock on a dedicated connection and held for as long as
the instance leads. When the leader dies its session ends and Postgres releases
the lock. TCP keepalives on both ends make a silently dead network path count as
gone (the client side gives up sooner than the server releases the lock)."""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg

from orchestrator.adapters.catalog.db import lock_key

LEADER_LOCK = "scheduler-leader"


class LeaderLock:
    """The leader's session-level advisory lock, on a connection of its own."""

    # client side gives up on a dead path (~10 s) before the server does (~25 s)
    CLIENT = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3, "tcp_user_timeout": 10_000}
    SERVER = ("SET tcp_keepalives_idle = 10", "SET tcp_keepalives_interval = 5",
              "SET tcp_keepalives_count = 3", "SET tcp_user_timeout = 25000",
              "SET idle_session_timeout = 0", "SET statement_timeout = '10s'")

    def __init__(self, dsn: str, name: str = LEADER_LOCK) -> None:
        self.dsn = dsn
        self.key = lock_key(name)
        self.conn: psycopg.Connection[Any] | None = None
        self.held = False

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                               application_name="tenantctl-scheduler",
                               **self.CLIENT)  # type: ignore[arg-type]
        for stmt in self.SERVER:
            # older servers lack some of these; a Unix socket ignores keepalives
            with contextlib.suppress(psycopg.Error):
                conn.execute(stmt)
        return conn

    def try_acquire(self) -> bool:
        """True if this instance now leads. Raises psycopg.Error if the catalog
        cannot be reached (the connection is then closed)."""
        try:
            if self.conn is None or self.conn.closed:
                self.conn = self._connect()
            row = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        except psycopg.Error:
            self.close()
            raise
        self.held = bool(row and row[0])
        return self.held

    def alive(self) -> bool:
        """Whether we still hold it: the session is up and pg_locks shows the lock."""
        if self.conn is None or not self.held:
            return False
        classid, objid = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF
        try:
            row = self.conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND objsubid = 1 "
                "AND classid::bigint = %s AND objid::bigint = %s",
                (classid, objid)).fetchone()
        except psycopg.Error:
            self.close()
            return False
        if not (row and row[0]):
            self.close()
            return False
        return True

    def release(self) -> None:
        if self.conn is not None and self.held and not self.conn.closed:
            # if the session is gone, the lock went with it
            with contextlib.suppress(psycopg.Error):
                self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        self.held = False

    def close(self) -> None:
        self.held = False
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = None
