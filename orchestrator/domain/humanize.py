"""Words for people: counts with their noun, times as a date and an age. Pure: the
time to measure an age from is passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``n`` and its noun: "1 tenant", "2 tenants", "0 tenants"; ``many`` for a noun
    whose plural is not noun + "s" ("1 tenant's state", "2 tenants' states")."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"


def age(delta: timedelta) -> str:
    """The largest whole unit of a duration: "45s", "5m", "3h" (up to 48h), "12d"."""
    seconds = int(abs(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def utc_minute(at: datetime) -> str:
    """"2026-12-07 01:30 UTC"; a naive time is taken as UTC (the catalog's are aware)."""
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.strftime("%Y-%m-%d %H:%M UTC")


def human_time(at: datetime, now: datetime) -> str:
    """"2026-12-07 01:30 UTC (3h ago)", or "(in 2d)" for a time still to come."""
    at_utc = at.replace(tzinfo=UTC) if at.tzinfo is None else at
    now_utc = now.replace(tzinfo=UTC) if now.tzinfo is None else now
    delta = now_utc - at_utc
    if abs(delta) < timedelta(seconds=1):
        when = "now"
    elif delta > timedelta(0):
        when = f"{age(delta)} ago"
    else:
        when = f"in {age(delta)}"
    return f"{utc_minute(at)} ({when})"
