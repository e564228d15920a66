"""Usage metering: `usage collect` (and the scheduler's `usage` job) samples every
tenant database's size, connections and pg_stat_database counters — one query per
server — and stores one row per tenant and period in the catalog; the reports
(`usage`, `usage export`, the metrics endpoint's gauges) read those rows.

The rules (deltas of cumulative counters, peaks, totals, top-N) are in
orchestrator/domain/usage.py; the SQL in adapters/postgres/usage_stats.py (servers)
and adapters/catalog/usage.py (catalog)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from orchestrator.adapters.catalog import usage as store
from orchestrator.adapters.postgres.usage_stats import DatabaseStats, read_database_stats
from orchestrator.bootstrap import Deps
from orchestrator.domain import usage as rules
from orchestrator.domain.errors import Conflict, first_line
from orchestrator.domain.names import validate_slug
from orchestrator.services import quota as quotas

LOCK = "usage-collect"
# servers read at once: a down server costs its connect timeout, not everyone's
SERVER_THREADS = 8


@dataclass(frozen=True)
class TenantSample:
    slug: str
    server: str
    status: str  # ok | failed
    error: str | None = None
    storage_bytes: int | None = None
    connections: int | None = None
    # what this collection added to the period (the counters' deltas)
    transactions: int | None = None
    rows_written: int | None = None
    rows_read: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CollectResult:
    collected_at: datetime
    period_start: datetime
    tenants: list[TenantSample] = field(default_factory=list)
    servers: dict[str, str | None] = field(default_factory=dict)  # server -> error
    purged: int = 0
    seconds: float = 0.0
    # what the storage quota did about each measured tenant (services/quota.py)
    quota: list[quotas.QuotaOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[TenantSample]:
        return [t for t in self.tenants if t.status == "failed"]

    @property
    def quota_failed(self) -> list[quotas.QuotaOutcome]:
        return [q for q in self.quota if q.failed]

    def to_json(self) -> dict[str, Any]:
        return {"collected_at": self.collected_at.isoformat(),
                "period_start": self.period_start.isoformat(),
                "collected": len(self.tenants) - len(self.failed),
                "failed": len(self.failed), "purged": self.purged,
                "seconds": round(self.seconds, 3),
                "servers": [{"server": s, "status": "failed" if e else "ok", "error": e}
                            for s, e in sorted(self.servers.items())],
                "tenants": [t.to_json() for t in self.tenants],
                # tenants on a plan with a quota, and any the quota changed or failed on
                "quota": [q.to_json() for q in self.quota
                          if q.quota is not None or q.outcome not in ("ok", "skipped")]}


def _read_server(deps: Deps, server: str, databases: list[str]
                 ) -> dict[str, DatabaseStats] | str:
    """The server's stats of these databases, or why they could not be read."""
    try:
        deps.cfg.server(server)
        with deps.server_connection(server) as conn:
            return read_database_stats(conn, databases, deps.cfg.usage.statement_timeout)
    except Exception as exc:  # noqa: BLE001 - one server is its own tenants' failure
        line = first_line(exc)
        return line if f"server {server}" in line else f"server {server}: {line}"


def collect(deps: Deps, now: datetime, *, purge: bool = True) -> CollectResult:
    """Sample every tenant with a database (one query per server, servers in
    parallel), store the samples, then purge periods older than [usage] keep_days.
    A server that cannot be read fails its tenants only."""
    started = time.monotonic()
    period = rules.period_start(now)
    result = CollectResult(now, period)
    with deps.catalog.advisory_lock(LOCK) as got:
        if not got:
            raise Conflict("another `usage collect` is running (it holds the catalog's "
                           "usage lock): try again when it ends")
        tenants = store.metered_tenants(deps.catalog)
        by_server: dict[str, list[store.Metered]] = {}
        for t in tenants:
            by_server.setdefault(t.server, []).append(t)
        with ThreadPoolExecutor(max_workers=max(1, min(SERVER_THREADS, len(by_server))),
                                thread_name_prefix="usage") as pool:
            reads = dict(zip(by_server, pool.map(
                lambda sv: _read_server(deps, sv, [t.database for t in by_server[sv]]),
                by_server), strict=True))
        samples: list[store.NewSample] = []
        measured: list[quotas.Measured] = []
        for server, group in by_server.items():
            stats = reads[server]
            result.servers[server] = stats if isinstance(stats, str) else None
            for t in group:
                if isinstance(stats, str):
                    result.tenants.append(TenantSample(t.slug, server, "failed", stats))
                    continue
                st = stats.get(t.database)
                if st is None:
                    result.tenants.append(TenantSample(
                        t.slug, server, "failed",
                        f"database {t.database} not found on server {server}"))
                    continue
                reading = rules.Reading(server, st.datid, st.stats_reset, st.counters,
                                        st.size, st.connections)
                existing = t.last_usage if t.last_period == period else None
                usage = rules.accumulate(existing, t.last_reading, reading)
                d = rules.delta(t.last_reading, reading)
                samples.append(store.NewSample(t.id, t.slug, period, now, usage, reading))
                measured.append(quotas.Measured(t.slug, t.state, t.step, t.over_quota,
                                               t.plan, st.size))
                result.tenants.append(TenantSample(
                    t.slug, server, "ok", None, st.size, st.connections, d.transactions,
                    d.rows_written, d.rows_read))
        store.save_samples(deps.catalog, samples)
        # the sizes are stored first: set-plan judges by the latest one
        result.quota = quotas.judge(deps, measured, now)
        result.quota.sort(key=lambda q: q.slug)
        if purge:
            result.purged = store.purge_before(
                deps.catalog, rules.retention_cutoff(now, deps.cfg.usage.keep_days))
    result.tenants.sort(key=lambda t: (t.server, t.slug))
    result.seconds = time.monotonic() - started
    return result


# -- reading it back ---------------------------------------------------------------------


@dataclass(frozen=True)
class UsageReport:
    since: datetime
    until: datetime
    tenants: list[rules.Totals]
    top: list[rules.Ranked]
    servers: dict[str, dict[str, int]]

    def to_json(self) -> dict[str, Any]:
        return {"since": self.since.isoformat(), "until": self.until.isoformat(),
                "tenants": [t.to_json() for t in self.tenants],
                "top": [r.to_json() for r in self.top],
                "servers": self.servers}


def _check_slug(deps: Deps, slug: str | None) -> None:
    if slug is not None:
        validate_slug(slug)
        deps.get_tenant(slug)  # NotFound for an unknown tenant


def report(deps: Deps, since: datetime, now: datetime, *, slug: str | None = None,
           top: int | None = None) -> UsageReport:
    """Totals per tenant over the periods from ``since`` on, and the top tenants of
    each server ([usage] top, or ``top``)."""
    _check_slug(deps, slug)
    tots = rules.totals(store.period_rows(deps.catalog, since, slug=slug))
    n = deps.cfg.usage.top if top is None else top
    return UsageReport(since, now, tots, rules.top_per_server(tots, n),
                       {k: dict(v) for k, v in rules.server_sums(tots).items()})


def export_rows(deps: Deps, since: datetime, until: datetime | None = None,
                slug: str | None = None) -> Iterator[list[object]]:
    """The billing export's rows (domain.usage.EXPORT_COLUMNS), one per tenant and
    period, streamed."""
    _check_slug(deps, slug)
    for s, server, start, u in store.period_rows(deps.catalog, since, until, slug):
        yield rules.export_row(s, server, start, u)


# the window the metrics endpoint's gauges cover: peaks and sums of the last day
GAUGE_WINDOW = timedelta(days=1)


@dataclass(frozen=True)
class UsageGauges:
    top: list[rules.Ranked]
    servers: dict[str, dict[str, int]]
    tenants: list[rules.Totals] | None  # only with [usage] per_tenant_metrics


def gauges(deps: Deps, now: datetime) -> UsageGauges:
    """What the metrics endpoint shows of usage over the last day: per server, the
    top [usage] top tenants by each metric and the sums; every tenant only when
    [usage] per_tenant_metrics is on (a series per tenant)."""
    tots = rules.totals(store.period_rows(deps.catalog, rules.period_start(now - GAUGE_WINDOW)))
    return UsageGauges(rules.top_per_server(tots, deps.cfg.usage.top),
                       {k: dict(v) for k, v in rules.server_sums(tots).items()},
                       tots if deps.cfg.usage.per_tenant_metrics else None)
