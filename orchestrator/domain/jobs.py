"""The job vocabulary: every kind of periodic work tenantctl does, one name each.

Three places speak it: `scheduler run --jobs` (what the daemon runs, each job on
its own interval and catalog lock), `retention run --only` (the steps of one
retention run) and the retention plan (each action's kind, in JSON, logs and
audit records as `retention.<kind>`). The names are the ones those outputs have
always used; `--only` keeps its own two older spellings as aliases: `audit` for
audit_purge and `access` for expire_grant.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime, timedelta

from orchestrator.domain.errors import FIELD, InvalidInput


class Job(enum.StrEnum):
    backups = "backups"  # due backups of every live tenant
    retention = "retention"  # the scheduler's job for the dated steps below
    expire_grant = "expire_grant"  # support grants past their TTL (or tampered with)
    delete = "delete"  # databases whose hold has ended (a final backup first)
    purge = "purge"  # the backups and key of deleted tenants past purge_after
    prune = "prune"  # backups the keep policy no longer keeps
    audit_purge = "audit_purge"  # audit records older than audit_days
    usage = "usage"  # usage metering: a sample of every tenant database (services/usage.py)


# `retention run --only`: its steps, by the spellings the option has always taken
STEP_SPELLINGS: dict[str, Job] = {"delete": Job.delete, "purge": Job.purge,
                                  "prune": Job.prune, "audit": Job.audit_purge,
                                  "access": Job.expire_grant}
STEPS: tuple[Job, ...] = tuple(STEP_SPELLINGS.values())

# `scheduler run --jobs`: what the daemon runs, and the retention steps each runs
SCHEDULED: tuple[Job, ...] = (Job.backups, Job.retention, Job.prune, Job.audit_purge,
                              Job.usage)
STEPS_OF: dict[Job, tuple[Job, ...]] = {
    Job.backups: (), Job.usage: (),
    # one job for the three dated promises: they share the hold/purge clock
    Job.retention: (Job.expire_grant, Job.delete, Job.purge),
    Job.prune: (Job.prune,), Job.audit_purge: (Job.audit_purge,)}


def parse_steps(names: Iterable[str]) -> tuple[Job, ...]:
    """`--only delete --only audit` → (delete, audit_purge): the option's spellings,
    or the steps' own names (as the plan's JSON shows them)."""
    known = {**STEP_SPELLINGS, **{j.value: j for j in STEPS}}
    names = list(names)
    if unknown := sorted(set(names) - set(known)):
        raise InvalidInput(f"unknown job {unknown[0]!r}: use {', '.join(STEP_SPELLINGS)}")
    return tuple(dict.fromkeys(known[n] for n in names))


def parse_scheduled(text: str | None, what: str) -> tuple[Job, ...]:
    """`backups,retention` → (backups, retention); None → every job."""
    if text is None:
        return SCHEDULED
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in SCHEDULED]
    if unknown or not names:
        raise InvalidInput(f"{FIELD}: unknown job {', '.join(unknown) or '(none given)'} "
                           f"(known: {', '.join(SCHEDULED)})", field=what)
    return tuple(Job(n) for n in names)


# -- the persisted cadence ---------------------------------------------------------------

# A run that ended so counts for the cadence; an interrupted one (SIGTERM, lost lead,
# a crash: never recorded) does not, so the next leader finishes it at once. A run
# skipped because another instance still held the job is that instance's to record.
COUNTED_OUTCOMES = ("ok", "partial", "failed")


def next_run_at(last_run: datetime | None, interval: timedelta, now: datetime) -> datetime:
    """When a job runs next, from the start of its last counted run (persisted in the
    catalog): never run, or overdue → now; ran within its interval → last run +
    interval. A last run in the future (another host's clock ahead) waits at most
    one interval from now."""
    if last_run is None:
        return now
    return max(now, min(last_run + interval, now + interval))
