"""Who blocks a migration while it waits for a lock, for the error of the wait that
times out.

Once ``lock_timeout`` has passed, the waiting backend waits no more, and
``pg_blocking_pids`` of it says nothing: the holder has to be seen during the
wait. A ``LockWatch`` (one per rollout process, one thread) looks at each
migration it is told about every third of the lock timeout, from the admin
connection of the tenant's server: one statement per server per look, which
calls ``pg_blocking_pids`` only for the backends that wait on a lock right then
(the function takes the lock manager's locks: it is not called for the others).
A migration shorter than a third of the lock timeout is never looked at. Each
look is bounded (statement_timeout, a row limit); a server that does not answer
is left alone for a while, and its migrations' errors say the holder was not
seen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg

from orchestrator.domain.lock_blockers import Blocker

# Only the backends waiting on a lock get pg_blocking_pids (the WHERE filters the
# scan before the lateral call); query cut on the server, redacted when shown.
BLOCKERS_SQL = """
    SELECT w.pid, b.pid, b.application_name, b.usename, b.state, left(b.query, 400)
    FROM pg_stat_activity w
    CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS bp(pid)
    JOIN pg_stat_activity b ON b.pid = bp.pid
    WHERE w.pid = ANY(%s) AND w.wait_event_type = 'Lock'
    ORDER BY w.pid, b.xact_start NULLS LAST, b.pid
    LIMIT 100"""
LOOK_TIMEOUT = "2s"  # statement_timeout of a look
RETRY_SERVER_AFTER = 5.0  # seconds a server that did not answer is left alone


@dataclass(eq=False)
class Watched:
    """One migration's backend; ``blockers`` as last seen while it waited."""

    server: str
    pid: int
    next_look: float
    blockers: list[Blocker] = field(default_factory=list)


class LockWatch:
    def __init__(self, admin_dsn: Callable[[str], str], lock_timeout_s: float) -> None:
        self._admin_dsn = admin_dsn
        self._every = max(lock_timeout_s / 3, 0.02)
        self._watched: set[Watched] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._conns: dict[str, psycopg.Connection] = {}
        self._down_until: dict[str, float] = {}

    @contextmanager
    def watching(self, server: str, pid: int) -> Iterator[Watched]:
        """Watch backend ``pid`` of ``server`` for as long as the block runs."""
        w = Watched(server, pid, time.monotonic() + self._every)
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="lock-watch",
                                                daemon=True)
                self._thread.start()
            self._watched.add(w)
            self._cond.notify()
        try:
            yield w
        finally:
            with self._cond:
                self._watched.discard(w)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = [w for w in self._watched if w.next_look <= now]
                if not due:
                    wait = min((w.next_look for w in self._watched), default=now + 60) - now
                    self._cond.wait(max(wait, 0.001))
                    continue
                for w in due:
                    w.next_look = now + self._every
            by_server: dict[str, list[Watched]] = {}
            for w in due:
                by_server.setdefault(w.server, []).append(w)
            for server, watched in by_server.items():
                self._look(server, watched)

    def _look(self, server: str, watched: list[Watched]) -> None:
        if self._down_until.get(server, 0) > time.monotonic():
            return
        try:
            conn = self._conns.get(server)
            if conn is None or conn.closed:
                conn = self._conns[server] = psycopg.connect(
                    self._admin_dsn(server), autocommit=True, connect_timeout=5,
                    application_name="tenantctl-lockwatch")
                conn.execute("SELECT set_config('statement_timeout', %s, false)",
                             (LOOK_TIMEOUT,))
            rows = conn.execute(BLOCKERS_SQL, ([w.pid for w in watched],)).fetchall()
        except Exception:  # noqa: BLE001 - the watch must outlive any one server
            # not worth failing a migration over: its error will say nobody was seen
            bad = self._conns.pop(server, None)
            if bad is not None:
                bad.close()
            self._down_until[server] = time.monotonic() + RETRY_SERVER_AFTER
            return
        seen: dict[int, list[Blocker]] = {}
        for waiter, pid, app, user, state, query in rows:
            seen.setdefault(waiter, []).append(Blocker(pid, app or "", user, state, query))
        with self._cond:
            for w in watched:
                if w.pid in seen:  # the last wait seen is the one a timeout ends
                    w.blockers = seen[w.pid]
