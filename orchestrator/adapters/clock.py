"""The one place that says what time it is. Tests (and an operator rehearsing a
plan) may inject a time with `--now`, but a time in the future only plans: it
acts only when the environment explicitly allows it, so nobody deletes or
purges early by accident.

Everything else asks `utcnow()` here, or better takes `now` as a parameter: a
retention run reads the clock once and passes its `now` down, so every time it
writes (final backup, deleted_at, purge_after, purged_at, key destroyed_at,
grants' dropped_at, the tenant's updated_at, and the `at` of every audit record
it writes, the backup pipeline's and access expiry's included) is the run's,
`--now` included. tests/test_clock.py fails on a read of the wall clock anywhere
else in orchestrator/, backups/ and cli/.

Not this clock, and allowed elsewhere:
- monotonic timers (time.monotonic, time.perf_counter) measuring durations and
  timeouts: they say how long, never what time it is;
- the catalog's own `now()` column defaults (created_at, updated_at, audit_log.at,
  in adapters/catalog/models.py): when the catalog recorded a row, by its own
  transaction time, for writes that are given no `now`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from orchestrator.domain import durations
from orchestrator.domain.errors import FIELD, InvalidInput

ALLOW_ENV = "TENANTCTL_ALLOW_CLOCK_OVERRIDE"
# clocks of two hosts differ a little; a minute ahead is not "the future"
SKEW = timedelta(minutes=1)
# what --now may say: dates computed from it with the configured periods (at most
# config.MAX_DAYS each way) stay representable
NOW_RANGE = (datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC))


def utcnow() -> datetime:
    return datetime.now(UTC)  # the one read of the wall clock


def parse_instant(text: str, what: str = "now") -> datetime:
    """ISO-8601; a time without a zone is taken as UTC (the one grammar:
    orchestrator.domain.durations)."""
    return durations.parse_instant(text, what)


def effective_now(override: str | None, *, acting: bool) -> datetime:
    """The time to plan and act at. A future override is refused when the caller
    is about to act, unless $TENANTCTL_ALLOW_CLOCK_OVERRIDE=1."""
    real = utcnow()
    if override is None:
        return real
    now = parse_instant(override)
    if not NOW_RANGE[0] <= now < NOW_RANGE[1]:
        raise InvalidInput(f"{FIELD} {override!r} is out of range (from "
                           f"{NOW_RANGE[0].year} to before {NOW_RANGE[1].year})", field="now")
    if acting and now > real + SKEW and os.environ.get(ALLOW_ENV) != "1":
        raise InvalidInput(f"{FIELD} {now.isoformat()} is in the future: it may only plan "
                           f"(--dry-run); set {ALLOW_ENV}=1 to act at it (tests only)",
                           field="now")
    return now


class SystemClock:
    """``ports.Clock`` on the wall clock."""

    def now(self) -> datetime:
        return utcnow()
