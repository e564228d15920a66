"""Backup schedules and retention: pure functions over plain data, `now` passed in.

Schedules: every tenant is backed up once per interval (default daily), at an
offset derived from its slug, so 10,000 tenants spread over the day instead of
all dumping at midnight.

Retention (Barman-style report): every completed backup is marked keep or
prune, with the reason. Default: all backups of the last 7 days, plus the
newest of each of the last 4 weeks. A floor overrides everything: the newest
completed backup of a tenant is always kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple


@dataclass(frozen=True)
class Schedule:
    interval: timedelta = timedelta(days=1)


@dataclass(frozen=True)
class RetentionPolicy:
    keep_days: int = 7
    keep_weeks: int = 4


class BackupFact(NamedTuple):  # or any such tuple: the catalog's rows as they come
    id: int
    tenant: str
    finished_at: datetime


@dataclass(frozen=True)
class Verdict:
    backup_id: int
    tenant: str
    keep: bool
    reason: str


def slot_offset(slug: str, interval: timedelta) -> timedelta:
    """Where in each interval this tenant's backup falls: stable, spread evenly."""
    seconds = int(interval.total_seconds())
    h = int.from_bytes(hashlib.sha256(slug.encode()).digest()[:8], "big")
    return timedelta(seconds=h % seconds)


def last_slot(slug: str, now: datetime, schedule: Schedule) -> datetime:
    """The most recent scheduled moment for this tenant at or before ``now``."""
    epoch = datetime(2000, 1, 1, tzinfo=now.tzinfo)
    interval = schedule.interval
    offset = slot_offset(slug, interval)
    periods = (now - epoch - offset) // interval
    return epoch + offset + periods * interval


def is_due(slug: str, last_backup: datetime | None, now: datetime,
           schedule: Schedule) -> bool:
    """Due when no completed backup exists since the tenant's last scheduled slot."""
    return last_backup is None or last_backup < last_slot(slug, now, schedule)


def prune_horizon(now: datetime, policy: RetentionPolicy) -> datetime:
    """Backups finished after this are kept whatever else the policy says (so a
    caller need not even read them; the tenant's newest decides the floor)."""
    return now - timedelta(days=policy.keep_days)


FLOOR = "newest backup (floor)"
BEYOND = "beyond the retention policy"
WEEK = timedelta(days=7)


def retention(backups: Iterable[tuple[int, str, datetime]], now: datetime,
              policy: RetentionPolicy, *, report_kept: bool = True) -> list[Verdict]:
    """Keep or prune each completed backup (BackupFact, or any (id, tenant,
    finished_at) tuple) of live tenants: the one prune rule, whichever command
    prunes. The backups handed in are those of tenants whose backups are pruned at
    all (not cancelled: a hold keeps every backup until the purge; not under legal
    hold). One report for all; with report_kept=False only the prunes (a planner's
    need: it judges every old backup of the fleet and acts on few)."""
    by_tenant: dict[str, list[tuple[int, datetime]]] = {}
    for backup_id, tenant, finished_at in backups:
        by_tenant.setdefault(tenant, []).append((backup_id, finished_at))
    out: list[Verdict] = []
    horizon = prune_horizon(now, policy)
    within = f"within {policy.keep_days} days"
    for tenant, items in sorted(by_tenant.items()):
        items.sort(key=_finished, reverse=True)  # stable: equal times keep their order
        if report_kept:
            out.append(Verdict(items[0][0], tenant, True, FLOOR))
        weekly_kept: set[int] = set()
        for backup_id, finished_at in items[1:]:
            if finished_at >= horizon:
                if report_kept:
                    out.append(Verdict(backup_id, tenant, True, within))
                continue
            week = (now - finished_at) // WEEK
            if week < policy.keep_weeks and week not in weekly_kept:
                weekly_kept.add(week)
                if report_kept:
                    out.append(Verdict(backup_id, tenant, True, f"newest of week {week + 1}"))
            else:
                out.append(Verdict(backup_id, tenant, False, BEYOND))
    return out


def _finished(item: tuple[int, datetime]) -> datetime:
    return item[1]
