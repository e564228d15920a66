"""The scheduler's jobs (backups, retention, prune, audit purge, usage): their names and
intervals, and one run of each, which stops at its next tenant/step once told to."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backups import service as pipeline
from orchestrator.adapters.clock import utcnow
from orchestrator.config import SchedulerConfig
from orchestrator.daemon.jsonlog import JsonLog
from orchestrator.domain.errors import Conflict as TenantChanged
from orchestrator.domain.errors import first_line
from orchestrator.domain.jobs import SCHEDULED, STEPS_OF, parse_scheduled
from orchestrator.services import retention, usage

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps
    from orchestrator.services.retention import StepResult

JOBS = SCHEDULED  # the job vocabulary: orchestrator.domain.jobs
# what each retention-family job asks orchestrator.services.retention.run to do
RETENTION_KINDS: dict[str, tuple[str, ...]] = {j: s for j, s in STEPS_OF.items() if s}
OUTCOMES = ("ok", "partial", "failed", "skipped", "interrupted")
FAILED_OUTCOMES = ("partial", "failed")


def job_lock(job: str) -> str:
    return f"scheduler-job:{job}"


def job_intervals(sc: SchedulerConfig, override_seconds: float | None = None,
                  jobs: Iterable[str] = JOBS) -> dict[str, float]:
    """Seconds between runs of each job: the [scheduler] table (minutes), or one
    override for all (tests, drills)."""
    minutes = {"backups": sc.backups_minutes, "retention": sc.retention_minutes,
               "prune": sc.prune_minutes, "audit_purge": sc.audit_purge_minutes,
               "usage": sc.usage_minutes}
    return {j: float(override_seconds) if override_seconds else minutes[j] * 60.0
            for j in jobs}


def parse_jobs(text: str | None) -> tuple[str, ...]:
    """`backups,retention` → ("backups", "retention"); None → every job."""
    return parse_scheduled(text, "jobs")


@dataclass
class JobOutcome:
    outcome: str  # ok | partial | failed | skipped | interrupted
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None


class _Interrupted(Exception):
    """Raised between retention steps when the job must stop (SIGTERM, lost lead)."""


def backups_job(fleet: Deps, halt: threading.Event, concurrency: int,
                log: JsonLog) -> JobOutcome:
    """Reap backups a dead process left running, then back up every due tenant,
    `concurrency` at a time. One tenant's failure never stops the others; once
    `halt` is set no new backup starts (those in flight finish)."""
    reaped = pipeline.reap_dead(fleet)
    slugs = pipeline.due_tenants(fleet)
    counts: Counter[str] = Counter()
    errors: list[str] = []
    lock = threading.Lock()

    def one(slug: str) -> None:
        if halt.is_set():
            status = "not_started"
        else:
            try:
                status = pipeline.run_due_backup(fleet, slug).status
            except TenantChanged as exc:  # e.g. deleted since it was found due
                status = "skipped"
                log.info("backup_skipped", tenant=slug, reason=first_line(exc))
            except Exception as exc:  # noqa: BLE001 - one tenant never stops the job
                status = "failed"
                log.warning("backup_failed", tenant=slug, error=first_line(exc))
                with lock:
                    errors.append(f"{slug}: {first_line(exc)}")
        with lock:
            counts[status] += 1

    with ThreadPoolExecutor(max_workers=max(1, concurrency),
                            thread_name_prefix="backup") as pool:
        list(pool.map(one, slugs))
    result = {"due": len(slugs), "reaped": reaped, **{k: counts[k] for k in
              ("completed", "failed", "skipped", "not_started")}}
    outcome = "interrupted" if counts["not_started"] else \
        "partial" if counts["failed"] else "ok"
    return JobOutcome(outcome, result, errors[0] if errors else None)


def retention_job(fleet: Deps, kinds: tuple[str, ...], halt: threading.Event,
                  log: JsonLog, job: str = "retention") -> JobOutcome:
    """orchestrator.services.retention.run for some of its jobs; stops between steps when
    `halt` is set (each step is idempotent: the next run finishes the rest)."""
    counts: Counter[str] = Counter()

    def on_step(r: StepResult) -> None:
        counts[r.outcome] += 1
        log.emit("warning" if r.outcome == "failed" else "info", "retention_step",
                 job=job, **r.to_json())
        if halt.is_set():
            raise _Interrupted

    if halt.is_set():
        return JobOutcome("interrupted")
    try:
        report = retention.run(fleet, utcnow(), dry_run=False, jobs=kinds, on_step=on_step)
    except _Interrupted:
        return JobOutcome("interrupted", dict(counts))
    if report.skipped:
        return JobOutcome("skipped", {}, report.skipped)
    result = {"planned": len(report.plan), **{k: counts[k] for k in
              ("done", "skipped", "blocked", "failed")}}
    failed = report.failed
    if failed:
        return JobOutcome("partial", result,
                          f"{failed[0].action.describe()}: {failed[0].message}")
    return JobOutcome("ok", result)


def usage_job(fleet: Deps, halt: threading.Event, log: JsonLog) -> JobOutcome:
    """One `usage collect`: a server that cannot be read fails its tenants only
    (outcome partial); another collection in progress (cron's) makes it skipped."""
    if halt.is_set():
        return JobOutcome("interrupted")
    try:
        result = usage.collect(fleet, utcnow())
    except TenantChanged as exc:  # another collection holds the usage lock
        return JobOutcome("skipped", {}, first_line(exc))
    for server, error in sorted(result.servers.items()):
        if error:
            log.warning("usage_server_failed", server=server, error=error)
    for q in result.quota:
        if q.outcome in ("enforced", "released", "failed"):
            log.info("usage_quota", tenant=q.slug, outcome=q.outcome, size=q.size,
                     quota=q.quota, reason=q.reason)
    counts = {"collected": len(result.tenants) - len(result.failed),
              "failed": len(result.failed), "purged": result.purged,
              **{f"quota_{k}": sum(1 for q in result.quota if q.outcome == k)
                 for k in ("enforced", "released", "failed")}}
    if result.failed:
        t = result.failed[0]
        return JobOutcome("partial", counts, f"{t.slug}: {t.error}")
    if result.quota_failed:
        q = result.quota_failed[0]
        return JobOutcome("partial", counts, f"{q.slug}: quota: {q.reason}")
    return JobOutcome("ok", counts)
