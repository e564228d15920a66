"""`tenantctl migrate status`: where every tenant's schema stands, read live.

Each tenant's ``alembic_version`` is read concurrently (bounded per server, one
short connection per tenant), and the catalog's last known revision is
refreshed from what was read.

The reads go through libpq directly (``psycopg.pq``): its blocking connect and
query run without the GIL, while a ``psycopg.Connection`` spends about 0.7 ms of
Python per connect. At 1,000 tenants that is most of the client's CPU, on a
machine whose cores the servers need for the connections themselves.
"""

from __future__ import annotations

import select as io_select
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psycopg import pq
from psycopg.conninfo import make_conninfo
from sqlalchemy import select, update

from orchestrator.models import MIGRATABLE, Server, Tenant

if TYPE_CHECKING:
    from orchestrator.api import Fleet

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

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _connect(conninfo: str, timeout: float) -> pq.abc.PGconn:
    """libpq's non-blocking connect, waiting in select() (which releases the GIL,
    where PQconnectdb holds it). libpq ignores connect_timeout in this mode."""
    pgconn = pq.PGconn.connect_start(conninfo.encode())
    deadline = time.monotonic() + timeout
    status = pq.PollingStatus.WRITING
    while status not in (pq.PollingStatus.OK, pq.PollingStatus.FAILED):
        fd, left = pgconn.socket, deadline - time.monotonic()
        ready = io_select.select(*(([fd], [], []) if status == pq.PollingStatus.READING
                                else ([], [fd], [])), max(left, 0))
        if not any(ready):
            pgconn.finish()
            raise TimeoutError(f"connection timed out after {timeout:g} s")
        status = pq.PollingStatus(pgconn.connect_poll())
    return pgconn


def read_version(conninfo: str, timeout: float = 5) -> tuple[str | None, str | None]:
    """(revision, error) of one tenant database; revision None means base."""
    try:
        pgconn = _connect(conninfo, timeout)
    except (TimeoutError, OSError) as exc:
        return None, str(exc)
    try:
        if pgconn.status != pq.ConnStatus.OK:
            return None, _message(pgconn) or "could not connect"
        res = pgconn.exec_(READ_VERSION)
        if res.status == pq.ExecStatus.TUPLES_OK:
            value = res.get_value(0, 0) if res.ntuples else None
            return (value.decode() if value is not None else None), None
        if res.error_field(pq.DiagnosticField.SQLSTATE) == UNDEFINED_TABLE:
            return None, None
        return None, _message(res) or "could not read alembic_version"
    finally:
        pgconn.finish()


def _message(obj: pq.abc.PGconn | pq.abc.PGresult) -> str:
    return (pq.error_message(obj).strip().splitlines() or [""])[0]


def fleet_status(fleet: Fleet, region: str | None = None, *, concurrency: int = 16,
                 per_server: int = 8) -> StatusReport:
    if region is not None:
        fleet.cfg.region(region)
    q = select(Tenant).where(Tenant.state.in_(MIGRATABLE)).order_by(Tenant.slug)
    if region:
        q = q.where(Tenant.region == region)
    with fleet.catalog.session() as s:
        tenants = list(s.scalars(q))
        servers = list(s.scalars(select(Server).order_by(Server.region, Server.name)))
    gates = {sc.name: threading.Semaphore(per_server) for sc in fleet.cfg.servers}

    def read(t: Tenant) -> tuple[str | None, str | None]:
        conninfo = make_conninfo(fleet.cfg.server(t.server).admin_dsn, dbname=t.database,
                                 application_name="tenantctl-status")
        with gates[t.server]:
            return read_version(conninfo)

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(tenants)))) as pool:
        pending = pool.map(read, tenants)
        # while the reads run: head (Alembic reads the migration scripts) and target
        head = fleet.head_revision
        report = StatusReport(head=head, target=fleet.target_revision(region),
                              tenants=len(tenants), revisions={})
        reads = list(pending)
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
        if t.migration_error:
            report.failed.append({**where, "revision": revision, "error": t.migration_error,
                                  "at": t.migrated_at.isoformat() if t.migrated_at else None})
    report.revisions = dict(sorted(counts.items()))
    report.templates = [{"server": sv.name, "region": sv.region,
                         "revision": sv.template_revision} for sv in servers
                        if region is None or sv.region == region]
    if changed:
        with fleet.catalog.session() as s, s.begin():
            for tenant_id, revision in changed:
                s.execute(update(Tenant).where(Tenant.id == tenant_id)
                          .values(revision=revision))
    return report
