"""When something is overdue, and how old a tenant's latest backup is: the one
definition of each that `retention status`, the scheduler's gauges, doctor and the
promise report share. Pure: `now` is a parameter.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from orchestrator.domain.states import Op, due_transition
from orchestrator.domain.statuses import BackupStatus

# A scheduler tick late is not yet a problem: a date is overdue once it passed more
# than this long ago with the thing still not done.
GRACE = timedelta(hours=1)


def is_overdue(due_at: datetime, now: datetime) -> bool:
    """Whatever was due at ``due_at`` (a deletion, a purge, a grant's end, a backup,
    an audit purge) and is not done yet is overdue: monitoring alerts on it."""
    return due_at < now - GRACE


def overdue_transition(state: str, hold_until: datetime | None,
                       purge_after: datetime | None, legal_hold: bool, now: datetime
                       ) -> tuple[Op, datetime] | None:
    """The timed transition (delete, purge) overdue for a tenant, with the date it
    was due; a legal hold exempts it."""
    found = due_transition(state, hold_until, purge_after, now)
    if legal_hold or found is None or not is_overdue(found[1], now):
        return None
    return found


class BackupLike(Protocol):
    @property
    def tenant_id(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def finished_at(self) -> datetime | None: ...


B = TypeVar("B", bound=BackupLike)


def latest_completed(backups: Iterable[B]) -> dict[int, B]:
    """Each tenant's latest completed backup (by finish time), by tenant id."""
    latest: dict[int, B] = {}
    for b in backups:
        if b.status != BackupStatus.completed or b.finished_at is None:
            continue
        seen = latest.get(b.tenant_id)
        if seen is None or b.finished_at > seen.finished_at:  # type: ignore[operator]
            latest[b.tenant_id] = b
    return latest


def backup_since(last_finished: datetime | None, activated_at: datetime | None,
                 created_at: datetime) -> datetime:
    """Since when a tenant has gone without a backup: its latest completed backup,
    else (never backed up) its activation, else its creation."""
    return last_finished or activated_at or created_at


def latest_backup_age(last_finished: datetime | None, activated_at: datetime | None,
                      created_at: datetime, now: datetime) -> timedelta:
    """The age of a tenant's latest completed backup (never backed up: the time since
    its activation, else its creation)."""
    return now - backup_since(last_finished, activated_at, created_at)


def backup_overdue(since: datetime, interval: timedelta, now: datetime) -> bool:
    """A backup is due one interval after the latest one (``since``, see
    backup_since), and overdue like anything else."""
    return is_overdue(since + interval, now)
