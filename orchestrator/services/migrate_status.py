"""`tenantctl migrate status`: where every tenant's schema stands.

Each tenant's revision comes from the mark its database carries on its server
(``revision_marks``: written with every change tenantctl makes to
``alembic_version``, in the same transaction), read with one connection per
server. A tenant without a mark, and every tenant with ``live=True``, has its
``alembic_version`` read live, concurrently (bounded per server, one short
connection per tenant); a live read that finds the mark missing or wrong has it
rewritten. The catalog's last known revision is refreshed from what was read.

The reads go through libpq directly (``psycopg.pq``), all of them driven from
one thread by a selector (``read_versions``): a ``psycopg.Connection`` spends
about 0.7 ms of Python per connect, and a thread per read about as much again
in switching. At 1,000 tenants that was most of the client's CPU, on a machine
whose cores the servers need for the connections themselves.
"""

from __future__ import annotations

import selectors
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from orchestrator.adapters.catalog.reads import CatalogReads, TenantRow
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import revision_files, revision_marks
from orchestrator.config import Config
from orchestrator.domain.errors import TenantctlError, first_line
from orchestrator.domain.names import TEMPLATE_DB
from orchestrator.domain.revisions import Check, check, target_of


class Configured(Protocol):
    """What this service needs of its caller: the configuration (the facade's Fleet,
    or the CLI's open CatalogReads, whose catalog connection it then uses)."""

    cfg: Config

# No alembic_version table (a database at base) is an error, not a NULL: probing
# for the table first costs every read a catalog lookup.
READ_VERSION = b"SELECT version_num FROM public.alembic_version"
UNDEFINED_TABLE = b"42P01"


@dataclass
class StatusReport:
    head: str | None
    target: str | None
    tenants: int
    revisions: dict[str, int]
    behind: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    unreachable: list[dict[str, Any]] = field(default_factory=list)
    templates: list[dict[str, Any]] = field(default_factory=list)
    # how each revision was learnt: from the database's mark, or by connecting to it
    sources: dict[str, int] = field(default_factory=dict)
    remarked: list[dict[str, Any]] = field(default_factory=list)  # marks rewritten
    # not at their target (the region's, else the fleet's): behind it, or above it
    # after a downgrade that failed for them
    off_target: list[dict[str, Any]] = field(default_factory=list)
    region_targets: dict[str, str | None] = field(default_factory=dict)
    check: Check = field(default_factory=Check)  # what `--check` exits with

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "check": self.check.to_json()}


Result = tuple[str | None, str | None]  # (revision, error); revision None is base


@dataclass(eq=False)
class _Read:
    index: int
    server: str
    pgconn: pq.abc.PGconn
    deadline: float
    fd: int = -1
    querying: bool = False


def read_versions(jobs: Sequence[tuple[str, str]], *, concurrency: int = 16,
                  per_server: int = 8, timeout: float = 5) -> list[Result]:
    """Read ``alembic_version`` through each (server, conninfo) of ``jobs``, in their
    order: at most ``concurrency`` connections open at once, ``per_server`` to each
    server, each given ``timeout`` seconds to connect and answer.

    One thread drives every connection through libpq's non-blocking connect and
    asynchronous query, waiting in one selector: a read then costs the client a
    few dozen microseconds of Python instead of a thread's worth of switching,
    and the cores stay with the servers, which spend ~3.5 ms starting each
    backend. (libpq ignores connect_timeout in this mode: the deadline is ours.)
    """
    results: list[Result | None] = [None] * len(jobs)
    queues: dict[str, deque[int]] = {}
    for i, (server, _) in enumerate(jobs):
        queues.setdefault(server, deque()).append(i)
    in_flight: Counter[str] = Counter()
    active: set[_Read] = set()
    sel = selectors.DefaultSelector()

    def finish(r: _Read, result: Result) -> None:
        if r.fd >= 0:
            sel.unregister(r.fd)
        r.pgconn.finish()
        results[r.index] = result
        in_flight[r.server] -= 1
        active.discard(r)

    def watch(r: _Read, reading: bool) -> None:
        fd, events = r.pgconn.socket, selectors.EVENT_READ if reading else selectors.EVENT_WRITE
        if fd == r.fd:
            sel.modify(fd, events, r)
        else:  # libpq may move to another socket (the next host or address)
            if r.fd >= 0:
                sel.unregister(r.fd)
            sel.register(fd, events, r)
            r.fd = fd

    def start_more() -> None:
        while len(active) < concurrency:
            server = next((sv for sv, q in queues.items()
                           if q and in_flight[sv] < per_server), None)
            if server is None:
                return
            i = queues[server].popleft()
            in_flight[server] += 1
            r = _Read(i, server, pq.PGconn.connect_start(jobs[i][1].encode()),
                      time.monotonic() + timeout)
            active.add(r)
            try:
                if r.pgconn.status == pq.ConnStatus.BAD:
                    finish(r, (None, _message(r.pgconn) or "could not connect"))
                else:
                    watch(r, reading=False)
            except psycopg.Error as exc:  # no socket to wait on
                finish(r, (None, _message(r.pgconn) or str(exc).strip() or "could not connect"))

    def step(r: _Read) -> None:
        if not r.querying:
            status = r.pgconn.connect_poll()
            if status == pq.PollingStatus.OK:
                r.pgconn.send_query(READ_VERSION)
                r.querying = True
                watch(r, reading=True)
            elif status == pq.PollingStatus.FAILED:
                finish(r, (None, _message(r.pgconn) or "could not connect"))
            else:
                watch(r, reading=status == pq.PollingStatus.READING)
            return
        r.pgconn.consume_input()
        if r.pgconn.is_busy():
            return
        res = r.pgconn.get_result()
        while r.pgconn.get_result() is not None:
            pass
        finish(r, _version(res))

    start_more()
    while active:
        wait = min(r.deadline for r in active) - time.monotonic()
        for key, _ in sel.select(max(wait, 0)):
            r = key.data
            try:
                step(r)
            except psycopg.Error as exc:  # the connection broke under libpq
                finish(r, (None, _message(r.pgconn) or str(exc).strip() or "read failed"))
        now = time.monotonic()
        for r in [r for r in active if r.deadline <= now]:
            finish(r, (None, f"{'no answer' if r.querying else 'connection timed out'} "
                             f"after {timeout:g} s"))
        start_more()
    sel.close()
    done = [r for r in results if r is not None]
    assert len(done) == len(jobs)  # the loop ends only when every job has finished
    return done


def _version(res: pq.abc.PGresult | None) -> Result:
    if res is not None and res.status == pq.ExecStatus.TUPLES_OK:
        value = res.get_value(0, 0) if res.ntuples else None
        return (value.decode() if value is not None else None), None
    if res is not None and res.error_field(pq.DiagnosticField.SQLSTATE) == UNDEFINED_TABLE:
        return None, None  # no alembic_version: the database is at base
    return None, (_message(res) if res is not None else "") or "could not read alembic_version"


def read_version(conninfo: str, timeout: float = 5) -> Result:
    """(revision, error) of one database; revision None means base."""
    return read_versions([("", conninfo)], timeout=timeout)[0]


def _message(obj: pq.abc.PGconn | pq.abc.PGresult) -> str:
    return (pq.error_message(obj).strip().splitlines() or [""])[0]


def _with_dbname(base: str, dbname: str) -> str:
    """``base`` conninfo with another database: a repeated keyword's last value wins
    (cheaper than re-parsing the DSN for each of a thousand tenants)."""
    return base + " dbname='" + dbname.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _marked(fleet: Configured, tenants: Sequence[TenantRow], servers: Sequence[str] = ()
            ) -> dict[tuple[str, str], str | None]:
    """(server, database) → revision, for every tenant database marked on a server
    that answered, and each of ``servers``' template (the template is the cluster's:
    its mark, not a catalog row, says its revision); one connection per server, all
    at once. A server that does not answer is left to the live reads, which report
    it per tenant."""
    by_server: dict[str, list[str]] = {server: [TEMPLATE_DB] for server in servers}
    for t in tenants:
        by_server.setdefault(t.server, []).append(t.database)

    def read(server: str) -> dict[tuple[str, str], str | None]:
        try:
            with pgserver.connect(fleet.cfg.server(server).admin_dsn, server=server) as conn:
                marks = revision_marks.published(conn, by_server[server])
        except (TenantctlError, psycopg.Error):
            return {}
        return {(server, db): revision for db, revision in marks.items()}

    found: dict[tuple[str, str], str | None] = {}
    if by_server:
        with ThreadPoolExecutor(max_workers=len(by_server)) as pool:
            for marks in pool.map(read, by_server):
                found.update(marks)
    return found


Revisions = tuple[list[Result], dict[str, int], list[dict[str, Any]], dict[str, str | None]]


def read_revisions(fleet: Configured, tenants: Sequence[TenantRow], *, live: bool = False,
                   concurrency: int = 16, per_server: int = 8,
                   template_servers: Sequence[str] = ()) -> Revisions:
    """Each tenant's (revision, error), in order; how many came from each source (its
    database's mark, or a live read: every one with ``live``); the marks a live read
    found missing or wrong, rewritten; and the revision of the template of each of
    ``template_servers`` (absent: none, or the server did not answer)."""
    marks = _marked(fleet, tenants, template_servers)
    templates = {server: marks[(server, TEMPLATE_DB)] for server in template_servers
                 if (server, TEMPLATE_DB) in marks}
    keys = [(t.server, t.database) for t in tenants]
    to_read = list(range(len(tenants))) if live else \
        [i for i, key in enumerate(keys) if key not in marks]
    bases = {sc.name: make_conninfo(sc.admin_dsn, application_name="tenantctl-status")
             for sc in fleet.cfg.servers}
    reads = read_versions([(keys[i][0], _with_dbname(bases[keys[i][0]], keys[i][1]))
                           for i in to_read],
                          concurrency=concurrency, per_server=per_server)
    results: list[Result] = [(marks.get(key), None) for key in keys]
    for i, result in zip(to_read, reads, strict=True):
        results[i] = result
    stale = [i for i in to_read if results[i][1] is None
             and (keys[i] not in marks or marks[keys[i]] != results[i][0])]
    remarked = _remark(fleet, [tenants[i] for i in stale],
                       [(keys[i] in marks, marks.get(keys[i])) for i in stale])
    return (results, {"mark": len(tenants) - len(to_read), "live": len(to_read)}, remarked,
            templates)


def _remark(fleet: Configured, tenants: Sequence[TenantRow],
            was: Sequence[tuple[bool, str | None]]) -> list[dict[str, Any]]:
    """Rewrite the mark of each of ``tenants`` from its database (few: tenants from
    before marks, or a mark changed by hand); ``was``: (marked, revision) before."""
    def one(t: TenantRow, old: tuple[bool, str | None]) -> dict[str, Any]:
        out: dict[str, Any] = {"slug": t.slug, "server": t.server, "marked": old[0],
                               "mark": old[1]}
        try:
            with pgserver.connect(fleet.cfg.server(t.server).admin_dsn, t.database,
                                  server=t.server) as conn:
                out["revision"] = revision_marks.republish(conn)
        except (TenantctlError, psycopg.Error) as exc:
            out["error"] = first_line(exc)
        return out

    if not tenants:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(tenants))) as pool:
        return list(pool.map(one, tenants, was))


def fleet_status(fleet: Configured, region: str | None = None, *, live: bool = False,
                 concurrency: int = 16, per_server: int = 8) -> StatusReport:
    if region is not None:
        fleet.cfg.region(region)
    # the catalog through the caller's reader when it has one open (the CLI), else one
    # for this call: plain SQL, so `migrate status` needs no SQLAlchemy
    catalog = fleet if isinstance(fleet, CatalogReads) else CatalogReads(fleet.cfg)
    try:
        return _status(fleet, catalog, region, live=live, concurrency=concurrency,
                       per_server=per_server)
    finally:
        if catalog is not fleet:
            catalog.close()


def _status(fleet: Configured, catalog: CatalogReads, region: str | None, *, live: bool,
            concurrency: int, per_server: int) -> StatusReport:
    tenants = catalog.migratable(region)
    servers = catalog.servers(region)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read_revisions, fleet, tenants, live=live,
                              concurrency=concurrency, per_server=per_server,
                              template_servers=[sv.name for sv in servers])
        # while the reads run: head (from the migration scripts) and target
        head = revision_files.head_revision(fleet.cfg.tenant_migrations)
        fleet_target, region_targets = catalog.targets(head)
        report = StatusReport(head=head, tenants=len(tenants), revisions={},
                              target=target_of(region, fleet_target, region_targets)
                              if region else fleet_target, region_targets=region_targets)
        reads, report.sources, report.remarked, templates = pending.result()
    counts: Counter[str] = Counter()
    changed: list[tuple[int, str | None]] = []
    for t, (revision, error) in zip(tenants, reads, strict=True):
        where = {"slug": t.slug, "region": t.region, "server": t.server}
        if error is not None:
            report.unreachable.append({**where, "error": error,
                                       "last_known_revision": t.revision})
            continue
        counts[revision or "base"] += 1
        if revision != t.revision:
            changed.append((t.id, revision))
        if revision != head:
            report.behind.append({**where, "revision": revision})
        target = target_of(t.region, fleet_target, region_targets)
        if revision != target:
            report.off_target.append({**where, "revision": revision, "target": target})
        if t.migration_error:
            report.failed.append({**where, "revision": revision, "error": t.migration_error,
                                  "at": t.migrated_at.isoformat() if t.migrated_at else None})
    report.revisions = dict(sorted(counts.items()))
    report.check = check(len(report.failed), len(report.off_target),
                         len(report.unreachable))
    report.templates = [{"server": sv.name, "region": sv.region,
                         "revision": templates.get(sv.name)} for sv in servers]
    if changed:
        catalog.record_revisions(changed)
    return report
