"""Usage metering's rules: periods, the per-period delta of Postgres's cumulative
counters, the peak of a period, totals and the top tenants of a server.

pg_stat_database's counters (transactions, rows) are cumulative since the
database's counters started: a server restart after a crash, `pg_stat_reset()`,
a restored database (a new oid) or a move to another server starts them again.
A sample keeps the raw counters with what identifies their series (server,
database oid, stats_reset); the next sample's delta is the difference when the
series is the same and the counter did not go down, else the new counter value
itself (what was counted since the restart): never negative. A tenant's first
sample counts everything since its counters started (a new tenant: its life).

Pure: no I/O, `now` is a parameter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# one sample per tenant and period: the UTC hour a collection falls in
PERIOD = timedelta(hours=1)
DEFAULT_KEEP_DAYS = 400
DEFAULT_TOP = 5

# the raw counters of pg_stat_database kept with each sample
COUNTERS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted",
            "tup_returned", "tup_fetched")
# what a period's sample adds up (the metered quantities), and how they are ranked
METRICS = ("storage_bytes", "connections_peak", "transactions", "rows_written", "rows_read")


@dataclass(frozen=True)
class Counters:
    xact_commit: int = 0
    xact_rollback: int = 0
    tup_inserted: int = 0
    tup_updated: int = 0
    tup_deleted: int = 0
    tup_returned: int = 0
    tup_fetched: int = 0

    @property
    def transactions(self) -> int:
        return self.xact_commit + self.xact_rollback

    @property
    def rows_written(self) -> int:
        return self.tup_inserted + self.tup_updated + self.tup_deleted

    @property
    def rows_read(self) -> int:
        # rows returned by scans; tup_fetched (heap rows an index scan fetched) is
        # part of the same reads, so it is kept raw but not added
        return self.tup_returned


@dataclass(frozen=True)
class Reading:
    """What one collection read for one tenant database."""

    server: str
    datid: int  # the database's oid: a restored/re-created database is a new series
    stats_reset: datetime | None
    counters: Counters
    storage_bytes: int | None  # None: the size could not be read
    connections: int


def same_series(prev: Reading, cur: Reading) -> bool:
    return (prev.server, prev.datid, prev.stats_reset) == (cur.server, cur.datid,
                                                           cur.stats_reset)


def counter_delta(prev: int | None, cur: int, same: bool = True) -> int:
    """What a cumulative counter counted since the previous sample: the difference,
    or, after a reset (another series, or the counter went down) or with no previous
    sample, the new value itself. Never negative."""
    if prev is None or not same or cur < prev:
        return max(cur, 0)
    return cur - prev


def delta(prev: Reading | None, cur: Reading) -> Counters:
    same = prev is not None and same_series(prev, cur)
    return Counters(**{
        name: counter_delta(None if prev is None else getattr(prev.counters, name),
                            getattr(cur.counters, name), same)
        for name in COUNTERS})


def period_start(at: datetime) -> datetime:
    """The start of the period ``at`` falls in (UTC hours)."""
    at = at.astimezone(UTC)
    return at.replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class PeriodUsage:
    """One tenant's usage in one period, as stored: deltas summed over the period's
    collections, the last size and connection count, and the peaks seen."""

    storage_bytes: int | None
    storage_bytes_peak: int | None
    connections: int
    connections_peak: int
    transactions: int
    rows_written: int
    rows_read: int
    samples: int


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def accumulate(existing: PeriodUsage | None, prev: Reading | None, cur: Reading
               ) -> PeriodUsage:
    """The period's usage after one more collection (``existing``: what the period
    held; ``prev``: the tenant's previous reading, in this period or before)."""
    d = delta(prev, cur)
    e = existing or PeriodUsage(None, None, 0, 0, 0, 0, 0, 0)
    return PeriodUsage(
        storage_bytes=cur.storage_bytes if cur.storage_bytes is not None else e.storage_bytes,
        storage_bytes_peak=_max(e.storage_bytes_peak, cur.storage_bytes),
        connections=cur.connections,
        connections_peak=max(e.connections_peak, cur.connections),
        transactions=e.transactions + d.transactions,
        rows_written=e.rows_written + d.rows_written,
        rows_read=e.rows_read + d.rows_read,
        samples=e.samples + 1)


def retention_cutoff(now: datetime, keep_days: int) -> datetime:
    """Periods that started before this are purged."""
    return period_start(now) - timedelta(days=keep_days)


# -- totals over a time range ---------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    """A tenant's usage over several periods: sums of the deltas, the peak of the
    connections, the last storage size (and its peak)."""

    slug: str
    server: str
    periods: int = 0
    storage_bytes: int | None = None
    storage_bytes_peak: int | None = None
    connections_peak: int = 0
    transactions: int = 0
    rows_written: int = 0
    rows_read: int = 0
    first_period: datetime | None = None
    last_period: datetime | None = None

    def to_json(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        for k in ("first_period", "last_period"):
            d[k] = d[k].isoformat() if d[k] is not None else None
        return d


def totals(rows: Iterable[tuple[str, str, datetime, PeriodUsage]]) -> list[Totals]:
    """Per tenant (slug), from its period rows (slug, server, period start, usage);
    the server is that of its latest period. Sorted by slug."""
    out: dict[str, Totals] = {}
    for slug, server, start, u in sorted(rows, key=lambda r: (r[0], r[2])):
        t = out.get(slug) or Totals(slug, server)
        out[slug] = dataclasses.replace(
            t, server=server, periods=t.periods + 1,
            storage_bytes=u.storage_bytes if u.storage_bytes is not None else t.storage_bytes,
            storage_bytes_peak=_max(t.storage_bytes_peak, u.storage_bytes_peak),
            connections_peak=max(t.connections_peak, u.connections_peak),
            transactions=t.transactions + u.transactions,
            rows_written=t.rows_written + u.rows_written, rows_read=t.rows_read + u.rows_read,
            first_period=t.first_period or start, last_period=start)
    return [out[s] for s in sorted(out)]


@dataclass(frozen=True)
class Ranked:
    server: str
    metric: str
    rank: int  # 1 = the largest
    slug: str
    value: int

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def top_per_server(tenants: Iterable[Totals], n: int,
                   metrics: Iterable[str] = METRICS) -> list[Ranked]:
    """The ``n`` largest tenants of each server by each metric (ties: by slug);
    tenants with nothing of it (0 or unknown) are not ranked."""
    by_server: dict[str, list[Totals]] = {}
    for t in tenants:
        by_server.setdefault(t.server, []).append(t)
    out: list[Ranked] = []
    for server in sorted(by_server):
        for metric in metrics:
            values = [(t.slug, getattr(t, metric) or 0) for t in by_server[server]]
            ranked = sorted((v for v in values if v[1] > 0), key=lambda v: (-v[1], v[0]))
            out += [Ranked(server, metric, i, slug, value)
                    for i, (slug, value) in enumerate(ranked[:n], start=1)]
    return out


def server_sums(tenants: Iterable[Totals]) -> Mapping[str, Mapping[str, int]]:
    """Per server, each metric summed over its tenants (connections: the sum of the
    tenants' peaks, an upper bound of the server's)."""
    out: dict[str, dict[str, int]] = {}
    for t in tenants:
        s = out.setdefault(t.server, dict.fromkeys(METRICS, 0))
        for m in METRICS:
            s[m] += getattr(t, m) or 0
    return out


# the billing export's columns, in order (one row per tenant and period)
EXPORT_COLUMNS = ("tenant", "server", "period_start", "period_end", "storage_bytes",
                  "storage_bytes_peak", "connections_peak", "transactions", "rows_written",
                  "rows_read", "samples")


def export_row(slug: str, server: str, start: datetime, u: PeriodUsage) -> list[object]:
    return [slug, server, start.astimezone(UTC).isoformat(),
            (start + PERIOD).astimezone(UTC).isoformat(),
            "" if u.storage_bytes is None else u.storage_bytes,
            "" if u.storage_bytes_peak is None else u.storage_bytes_peak,
            u.connections_peak, u.transactions, u.rows_written, u.rows_read, u.samples]
