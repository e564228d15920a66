"""The scheduler's persisted cadence (table scheduler_jobs): each job's last counted
run, read by a new leader to schedule from, written after each run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from orchestrator.adapters.catalog.models import SchedulerJob

if TYPE_CHECKING:
    from orchestrator.adapters.catalog.db import Catalog


@dataclass(frozen=True)
class JobRun:
    started_at: datetime
    finished_at: datetime
    outcome: str


def last_runs(catalog: Catalog, jobs: Iterable[str]) -> dict[str, JobRun]:
    """job -> its last counted run (jobs never run are absent)."""
    with catalog.session() as s:
        rows = s.execute(select(SchedulerJob.job, SchedulerJob.last_started_at,
                                SchedulerJob.last_finished_at, SchedulerJob.last_outcome)
                         .where(SchedulerJob.job.in_(list(jobs)))).all()
    return {job: JobRun(started, finished, outcome) for job, started, finished, outcome in rows}


def record_run(catalog: Catalog, job: str, started_at: datetime, finished_at: datetime,
               outcome: str, instance: str) -> None:
    """Upsert the job's last run; a run that started before the recorded one (a slow
    old leader finishing late) never moves the cadence back."""
    values = {"last_started_at": started_at, "last_finished_at": finished_at,
              "last_outcome": outcome, "instance": instance}
    stmt = pg_insert(SchedulerJob).values(job=job, **values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[SchedulerJob.job], set_=values,
        where=SchedulerJob.last_started_at <= stmt.excluded.last_started_at)
    with catalog.session() as s, s.begin():
        s.execute(stmt)
