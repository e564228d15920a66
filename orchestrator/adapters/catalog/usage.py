"""Usage samples in the catalog (table usage_samples): the tenants to meter, each
one's latest sample (the next delta's base), the upsert of a collection, the
retention purge in batches, and the period rows the reports read."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, true, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert

from orchestrator.adapters.catalog.models import Tenant, UsageSample
from orchestrator.domain.states import HAS_DATABASE
from orchestrator.domain.usage import COUNTERS, Counters, PeriodUsage, Reading

if TYPE_CHECKING:
    from orchestrator.adapters.catalog.db import Catalog

_USAGE = ("storage_bytes", "storage_bytes_peak", "connections", "connections_peak",
          "transactions", "rows_written", "rows_read", "samples")


@dataclass(frozen=True)
class Metered:
    """A tenant with a database, and its latest sample (None: never sampled)."""

    id: int
    slug: str
    server: str
    database: str
    state: str = "active"
    step: str | None = None
    over_quota: bool = False
    plan: str = "default"
    last_period: datetime | None = None
    last_usage: PeriodUsage | None = None
    last_reading: Reading | None = None


def metered_tenants(catalog: Catalog, slug: str | None = None) -> list[Metered]:
    """Every tenant with a database (or the one named), with its latest sample: one
    index probe per tenant (LATERAL ... LIMIT 1), however long the history."""
    u = UsageSample
    last = (select(u.period_start, u.server.label("sample_server"), u.datid, u.stats_reset,
                   *(getattr(u, c) for c in COUNTERS), *(getattr(u, k) for k in _USAGE))
            .where(u.tenant_id == Tenant.id)
            .order_by(u.period_start.desc()).limit(1).lateral("last"))
    q = (select(Tenant.id, Tenant.slug, Tenant.server, Tenant.database, Tenant.state,
                Tenant.step, Tenant.over_quota, Tenant.plan, last)
         .outerjoin(last, true())
         .where(Tenant.state.in_(HAS_DATABASE)).order_by(Tenant.server, Tenant.slug))
    if slug is not None:
        q = q.where(Tenant.slug == slug)
    out = []
    with catalog.session() as s:
        for r in s.execute(q).mappings():
            row = (r["id"], r["slug"], r["server"], r["database"], r["state"], r["step"],
                   r["over_quota"], r["plan"])
            if r["period_start"] is None:
                out.append(Metered(*row))
                continue
            reading = Reading(r["sample_server"], r["datid"], r["stats_reset"],
                              Counters(*(r[c] for c in COUNTERS)), r["storage_bytes"],
                              r["connections"])
            usage = PeriodUsage(*(r[k] for k in _USAGE))
            out.append(Metered(*row, r["period_start"], usage, reading))
    return out


@dataclass(frozen=True)
class NewSample:
    tenant_id: int
    slug: str
    period_start: datetime
    collected_at: datetime
    usage: PeriodUsage
    reading: Reading


def save_samples(catalog: Catalog, samples: Sequence[NewSample]) -> None:
    """One upsert for the whole collection: a period's row is replaced by its new
    totals (the caller holds the usage lock: nobody else writes them meanwhile)."""
    if not samples:
        return
    values = [{"tenant_id": x.tenant_id, "period_start": x.period_start, "slug": x.slug,
               "server": x.reading.server, "collected_at": x.collected_at,
               **{k: getattr(x.usage, k) for k in _USAGE},
               "datid": x.reading.datid, "stats_reset": x.reading.stats_reset,
               **{c: getattr(x.reading.counters, c) for c in COUNTERS}}
              for x in samples]
    stmt = pg_insert(UsageSample)
    keys = [k for k in values[0] if k not in ("tenant_id", "period_start")]
    stmt = stmt.on_conflict_do_update(index_elements=["tenant_id", "period_start"],
                                      set_={k: stmt.excluded[k] for k in keys})
    with catalog.session() as s, s.begin():
        for i in range(0, len(values), 1000):
            s.execute(stmt, values[i:i + 1000])


def latest_size(catalog: Catalog, tenant_id: int) -> tuple[int | None, datetime] | None:
    """The tenant's last measured size and when it was measured (None: never)."""
    with catalog.session() as s:
        row = s.execute(select(UsageSample.storage_bytes, UsageSample.collected_at)
                        .where(UsageSample.tenant_id == tenant_id)
                        .order_by(UsageSample.period_start.desc()).limit(1)).first()
    return None if row is None else (row[0], row[1])


def purge_before(catalog: Catalog, cutoff: datetime, batch: int = 5000) -> int:
    """Delete the samples of periods before ``cutoff``, ``batch`` rows per
    transaction (short locks, a bounded WAL burst); returns how many."""
    total = 0
    while True:
        doomed = (select(UsageSample.tenant_id, UsageSample.period_start)
                  .where(UsageSample.period_start < cutoff).limit(batch))
        with catalog.session() as s, s.begin():
            n = s.execute(delete(UsageSample).where(
                tuple_(UsageSample.tenant_id, UsageSample.period_start).in_(doomed))
            ).rowcount or 0  # type: ignore[attr-defined]
        total += n
        if n < batch:
            return total


def period_rows(catalog: Catalog, since: datetime, until: datetime | None = None,
                slug: str | None = None) -> Iterator[tuple[str, str, datetime, PeriodUsage]]:
    """(slug, server, period start, usage) of the periods from ``since`` on (up to
    ``until``), by tenant and period; streamed (an export may hold millions)."""
    q = (select(UsageSample.slug, UsageSample.server, UsageSample.period_start,
                *(getattr(UsageSample, k) for k in _USAGE))
         .where(UsageSample.period_start >= since)
         .order_by(UsageSample.slug, UsageSample.period_start))
    if until is not None:
        q = q.where(UsageSample.period_start < until)
    if slug is not None:
        q = q.where(UsageSample.slug == slug)
    with catalog.session() as s:
        for r in s.execute(q.execution_options(yield_per=2000)):
            yield r[0], r[1], r[2], PeriodUsage(*r[3:])
