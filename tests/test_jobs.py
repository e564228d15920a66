"""The one job vocabulary (orchestrator.domain.jobs) that `scheduler run --jobs`,
`retention run --only` and the retention plan's kinds speak. Pure: no Postgres."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.daemon import jobs as daemon_jobs
from orchestrator.domain import retention_plan as rp
from orchestrator.domain.errors import InvalidInput
from orchestrator.domain.jobs import (
    SCHEDULED,
    STEPS,
    STEPS_OF,
    Job,
    parse_scheduled,
    parse_steps,
)
from orchestrator.services import retention

NOW = datetime(2026, 3, 10, tzinfo=UTC)


def test_the_names_outputs_have_always_used() -> None:
    assert [j.value for j in Job] == ["backups", "retention", "expire_grant", "delete",
                                      "purge", "prune", "audit_purge", "usage"]
    assert SCHEDULED == ("backups", "retention", "prune", "audit_purge", "usage") == \
        daemon_jobs.JOBS
    assert json.dumps({Job.audit_purge: [Job.expire_grant]}) == \
        '{"audit_purge": ["expire_grant"]}'
    assert f"retention.{Job.audit_purge}" == "retention.audit_purge"  # audit action names


def test_retention_only_keeps_its_spellings_and_takes_the_plan_names() -> None:
    assert parse_steps(["delete", "purge", "prune", "audit", "access"]) == STEPS
    assert retention.JOBS == STEPS
    assert parse_steps(["audit"]) == parse_steps(["audit_purge"]) == (Job.audit_purge,)
    assert parse_steps(["access"]) == parse_steps(["expire_grant"]) == (Job.expire_grant,)
    assert parse_steps(["prune", "delete", "prune"]) == (Job.prune, Job.delete)
    assert parse_steps(STEPS_OF[Job.retention]) == (Job.expire_grant, Job.delete, Job.purge)
    for bad in (["everything"], ["delete", "zzz", "backups"], ["retention"], ["Delete"]):
        with pytest.raises(InvalidInput) as err:
            parse_steps(bad)
        first = sorted(set(bad) - {"delete"})[0]
        assert str(err.value) == (f"unknown job {first!r}: use delete, purge, prune, audit, "
                                  "access")


def test_scheduler_jobs() -> None:
    assert parse_scheduled(None, "--jobs") == SCHEDULED
    assert parse_scheduled(" prune, backups,prune", "--jobs") == (Job.prune, Job.backups)
    assert daemon_jobs.parse_jobs("audit_purge") == (Job.audit_purge,)
    for text, message in [
            ("backups,nope", "--jobs: unknown job nope (known: backups, retention, prune, "
                             "audit_purge, usage)"),
            (" , ", "--jobs: unknown job (none given) (known: backups, retention, prune, "
                    "audit_purge, usage)"),
            ("delete", "--jobs: unknown job delete (known: backups, retention, prune, "
                       "audit_purge, usage)")]:
        with pytest.raises(InvalidInput) as err:
            parse_scheduled(text, "--jobs")
        assert str(err.value) == message


def test_every_scheduled_job_runs_steps_a_retention_run_knows() -> None:
    assert set(STEPS_OF) == set(SCHEDULED)
    assert STEPS_OF[Job.backups] == STEPS_OF[Job.usage] == ()
    covered = [s for j in SCHEDULED for s in STEPS_OF[j]]
    assert sorted(covered) == sorted(STEPS)  # each step in exactly one scheduled job
    assert daemon_jobs.RETENTION_KINDS == {"retention": ("expire_grant", "delete", "purge"),
                                         "prune": ("prune",), "audit_purge": ("audit_purge",)}


def test_plan_kinds_are_steps_of_the_vocabulary() -> None:
    ended = NOW - timedelta(days=1)
    tenants = [rp.TenantFact("a_del", "cancelled", ended, None, False, None),
               rp.TenantFact("b_pur", "deleted", None, ended, False, None),
               rp.TenantFact("c_held", "deleted", None, ended, True, "court")]
    grants = [rp.GrantFact(7, "a_del", "sam", ended)]
    actions = rp.plan(tenants, [], 3, NOW - timedelta(days=365), NOW, grants)
    kinds = [a.kind for a in actions]
    assert kinds == ["expire_grant", "delete", "purge", "audit_purge", "blocked"]
    assert [a.to_json()["action"] for a in actions] == kinds
    # each belongs to a step `--only` selects; a blocked one to delete, as before
    assert [rp.step_of(k) for k in kinds] == [Job.expire_grant, Job.delete, Job.purge,
                                              Job.audit_purge, Job.delete]
    with pytest.raises(ValueError):
        rp.step_of("backups-of-the-moon")
