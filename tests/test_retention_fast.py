"""Retention runs over in-memory fakes of the ports (no Postgres): a hold that ended
becomes a verified final backup and a dropped database, a purge date that passed
becomes deleted objects and a destroyed key, a legal hold blocks both, a dry run
changes nothing, ``now`` is every time written, a crash at each step is finished by
the next run, and erasure. Real databases, roles and SIGKILLs: test_lifecycle.py and
test_crash_suite.py."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from backups.policy import Verdict
from orchestrator.adapters import faults
from orchestrator.domain.errors import Conflict, InvalidInput
from orchestrator.domain.names import tenant_lock
from orchestrator.services import lifecycle, retention
from tests.fakes import T0, FakeAudit, World

CANCELLED = T0  # when the tenants below were cancelled
HOLD_END = T0 + timedelta(days=30)
DAY31 = T0 + timedelta(days=31)
PURGE_AT = DAY31 + timedelta(days=91)


@pytest.fixture
def world() -> World:
    return World()  # its clock is ten years behind: a read of it where `now` belongs shows


@pytest.fixture
def crash_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str | None], None]]:
    faults._hits.clear()

    def arm(step: str | None) -> None:
        if step is None:
            monkeypatch.delenv(faults.FAULT_ENV, raising=False)
            return
        monkeypatch.setenv(faults.FAULT_ENV, step)
        monkeypatch.setenv(faults.MODE_ENV, "raise")
        faults._hits.clear()

    yield arm
    faults._hits.clear()


def cancelled(world: World, slug: str, **values: Any) -> None:
    """A tenant whose hold began at CANCELLED (as `tenant cancel` leaves it), with a
    backup taken then."""
    world.tenant(slug, **values)
    lifecycle.cancel(world.deps, slug, now=CANCELLED, backup=False)
    world.backup(slug, at=CANCELLED, kind="cancel")


def deleted(world: World, slug: str) -> None:
    cancelled(world, slug)
    assert retention.delete_tenant(world.deps, slug, DAY31)[0] == "done"


def run(world: World, now: datetime, *jobs: str, dry_run: bool = False
        ) -> retention.RunReport:
    return retention.run(world.deps, now, dry_run=dry_run, jobs=jobs or retention.JOBS)


def outcomes(report: retention.RunReport) -> list[tuple[str, str | None, str]]:
    return [(r.action.kind, r.action.tenant, r.outcome) for r in report.results]


# -- planning ------------------------------------------------------------------------


def test_nothing_is_due_a_moment_before_the_hold_ends(world: World) -> None:
    cancelled(world, "acme")
    assert run(world, HOLD_END - timedelta(seconds=1)).plan == []
    [action] = run(world, HOLD_END, dry_run=True).plan
    assert (action.kind, action.tenant, action.due_at) == ("delete", "acme", HOLD_END)


def test_a_dry_run_plans_and_changes_nothing(world: World) -> None:
    cancelled(world, "acme")
    deleted(world, "gone")
    world.tenant("live")
    world.jobs.verdicts = [Verdict(world.backup("live").id, "live", False, "old")]
    world.catalog.t.audit.append(FakeAudit("tenant.old", None, None, "ok", {},
                                           T0 - timedelta(days=400)))
    tables, calls = repr(world.catalog.t), list(world.admin.calls)
    objects = {url: dict(s.data) for url, s in world.stores.by_url.items()}
    report = run(world, PURGE_AT, dry_run=True)
    assert [(a.kind, a.tenant) for a in report.plan] == [
        ("delete", "acme"), ("purge", "gone"), ("prune", "live"), ("audit_purge", None)]
    assert report.results == [] and report.dry_run
    assert repr(world.catalog.t) == tables and world.admin.calls == calls
    assert {url: dict(s.data) for url, s in world.stores.by_url.items()} == objects


def test_only_the_jobs_asked_for_are_planned(world: World) -> None:
    cancelled(world, "acme")
    deleted(world, "gone")
    assert [a.kind for a in run(world, PURGE_AT, "purge", dry_run=True).plan] == ["purge"]
    assert [a.kind for a in run(world, PURGE_AT, "delete", dry_run=True).plan] == ["delete"]


def test_a_second_run_finds_the_lock_taken_and_does_nothing(world: World) -> None:
    cancelled(world, "acme")
    world.catalog.held.add(retention.LOCK)
    report = run(world, DAY31)
    assert report.skipped == "another retention run is in progress" and report.plan == []
    assert world.catalog.row("acme").state == "cancelled"


# -- deletion ------------------------------------------------------------------------


def test_a_hold_that_ended_becomes_a_verified_final_backup_and_a_dropped_database(
        world: World) -> None:
    cancelled(world, "acme")
    cancelled(world, "beta")  # another tenant on the same server stays
    world.admin.servers["eu-central-1"].sessions.append(("tenant_acme", "tenant_acme"))
    report = run(world, DAY31, "delete")
    assert outcomes(report) == [("delete", "acme", "done"), ("delete", "beta", "done")]
    row = world.catalog.row("acme")
    assert (row.state, row.deleted_at, row.purge_after) == \
        ("deleted", DAY31, DAY31 + timedelta(days=90))
    final = world.catalog.t.backups[row.final_backup_id or 0]
    assert (final.kind, final.status, final.started_at, final.verified_at) == \
        ("final", "completed", DAY31, DAY31)
    assert report.results[0].message == (f"database and role dropped; final backup "
                                         f"{final.id}; purge after "
                                         f"{(DAY31 + timedelta(days=90)).date()}")
    sv = world.admin.servers["eu-central-1"]
    assert "tenant_acme" not in sv.databases and sv.sessions == []
    assert not {"tenant_acme", "owner_acme", "tenant_beta"} & set(sv.roles)
    assert row.id not in world.catalog.t.credentials
    assert world.catalog.t.keys[row.id].identity_wrapped is not None  # until the purge
    [event] = world.catalog.events("tenant.delete", "acme")
    assert event.detail == {"final_backup": final.id,
                            "purge_after": (DAY31 + timedelta(days=90)).isoformat()}
    # sessions end before the backup, the database before the roles
    asked = [c[0] for c in world.admin.calls if c[0] in (
        "terminate_other_sessions", "drop_database", "drop_marked_roles")]
    assert asked[:3] == ["terminate_other_sessions", "drop_database", "drop_marked_roles"]


def test_only_our_database_and_roles_are_dropped(world: World) -> None:
    cancelled(world, "acme")
    sv = world.admin.servers["eu-central-1"]
    sv.databases["tenant_acme"].owner = "someone_else"
    sv.roles["owner_acme"].comment = "not ours"
    assert outcomes(run(world, DAY31)) == [("delete", "acme", "done")]
    assert "tenant_acme" in sv.databases and "owner_acme" in sv.roles
    assert "tenant_acme" not in sv.roles


def test_a_failed_final_backup_fails_that_step_only(world: World) -> None:
    cancelled(world, "acme")
    cancelled(world, "beta")
    world.jobs.fail_run.add("acme")
    report = run(world, DAY31)
    assert outcomes(report) == [("delete", "acme", "failed"), ("delete", "beta", "done")]
    assert report.results[0].message == "backup of 'acme' failed: pg_dump exited 1"
    assert world.catalog.row("acme").state == "cancelled"
    assert "tenant_acme" in world.admin.servers["eu-central-1"].databases
    [event] = world.catalog.events("retention.delete", "acme")
    assert (event.outcome, event.detail["error"]) == ("failed", report.results[0].message)


def test_an_unexpected_error_is_named_by_its_type(world: World) -> None:
    cancelled(world, "acme")
    world.admin.fail["terminate_other_sessions"] = RuntimeError("a bug")
    [result] = run(world, DAY31).results
    assert (result.outcome, result.message) == ("failed", "unexpected RuntimeError: a bug")


def test_an_unverifiable_final_backup_is_not_reused(world: World) -> None:
    cancelled(world, "acme")
    world.jobs.fail_verify.add("acme")
    assert outcomes(run(world, DAY31)) == [("delete", "acme", "failed")]
    first = world.catalog.row("acme").final_backup_id
    world.jobs.fail_verify.clear()
    assert outcomes(run(world, DAY31)) == [("delete", "acme", "done")]
    assert world.catalog.row("acme").final_backup_id not in (None, first)


def test_a_deletion_is_checked_again_under_the_tenants_lock(world: World) -> None:
    cancelled(world, "acme")
    world.tenant("live")
    assert retention.delete_tenant(world.deps, "live", DAY31) == \
        ("skipped", "no longer due (state active)")
    assert retention.delete_tenant(world.deps, "acme", HOLD_END - timedelta(days=1)) == \
        ("skipped", "no longer due (state cancelled)")
    lifecycle.legal_hold(world.deps, "acme", on=True, reason="case 7")
    assert retention.delete_tenant(world.deps, "acme", DAY31) == \
        ("blocked", "delete blocked by legal hold: case 7")
    lifecycle.legal_hold(world.deps, "acme", on=False, reason="closed")
    world.catalog.held.add(tenant_lock("acme"))
    with pytest.raises(Conflict, match="being changed by another tenantctl process"):
        retention.delete_tenant(world.deps, "acme", DAY31)
    world.catalog.held.clear()
    assert retention.delete_tenant(world.deps, "acme", DAY31)[0] == "done"
    assert retention.delete_tenant(world.deps, "acme", DAY31) == ("skipped", "already deleted")


def test_a_deleted_tenants_support_grants_go_with_it(world: World) -> None:
    cancelled(world, "acme")
    g = world.grant("acme", expires_at=DAY31 + timedelta(days=1))
    run(world, DAY31, "delete")
    assert world.catalog.t.grants[g.id].dropped_at == DAY31
    assert g.role_name not in world.admin.servers["eu-central-1"].roles


# -- purge ---------------------------------------------------------------------------


def test_a_purge_date_that_passed_deletes_every_object_and_destroys_the_key(
        world: World) -> None:
    deleted(world, "acme")
    deleted(world, "beta")
    store = world.store()
    row = world.catalog.row("acme")
    # an upload a dead process left half done
    store.pending.add(world.catalog.t.backups[row.final_backup_id or 0].object_key)
    assert len(store.keys("tenants/acme/")) == 4  # cancel and final backups, manifests
    assert run(world, PURGE_AT - timedelta(days=2), "purge").plan == []
    report = run(world, PURGE_AT, "purge")
    assert outcomes(report)[0] == ("purge", "acme", "done")
    assert report.results[0].message == "4 backup objects deleted, key destroyed"
    assert store.keys("tenants/acme/") == [] and store.pending == set()
    assert store.keys("tenants/beta/") == []  # beta was due too
    row = world.catalog.row("acme")
    assert (row.state, row.purged_at) == ("purged", PURGE_AT)
    key = world.catalog.t.keys[row.id]
    assert (key.identity_wrapped, key.master_key_id, key.destroyed_at) == \
        (None, None, PURGE_AT)
    assert {b.status for b in world.catalog.t.backups.values() if b.slug == "acme"} == \
        {"deleted"}
    assert world.catalog.events("tenant.purge", "acme")[0].detail == {"objects_deleted": 4}
    assert retention.purge_tenant(world.deps, "acme", PURGE_AT) == \
        ("skipped", "already purged")


@pytest.mark.parametrize("stage", ["delete", "purge"])
def test_a_legal_hold_blocks_whatever_the_dates_say(world: World, stage: str) -> None:
    if stage == "delete":
        cancelled(world, "acme")
    else:
        deleted(world, "acme")
    lifecycle.legal_hold(world.deps, "acme", on=True, reason="case 42")
    before = repr(world.catalog.row("acme")), len(world.store().keys("tenants/acme/"))
    report = run(world, PURGE_AT)
    assert [(r.action.kind, r.outcome, r.message) for r in report.results] == [
        ("blocked", "blocked", f"{stage} blocked by legal hold: case 42")]
    assert (repr(world.catalog.row("acme")), len(world.store().keys("tenants/acme/"))) == \
        before
    [event] = world.catalog.events("retention.blocked", "acme")
    assert (event.outcome, event.detail["detail"]) == ("blocked", report.results[0].message)
    lifecycle.legal_hold(world.deps, "acme", on=False, reason="lifted")
    assert outcomes(run(world, PURGE_AT))[0][2] == "done"


# -- now -----------------------------------------------------------------------------


def test_now_is_every_time_a_run_writes(world: World) -> None:
    """The clock is ten years behind the run's `now`, the catalog's own (audit
    records given no time) at T0: any time it wrote that is not `now` (or a date
    from it) came from a clock. Every audit record a run writes is at its `now`:
    each step's, the backup pipeline's (final backup, verification, prune), access
    expiry's, a blocked step's, a failed step's and the audit purge's."""
    cancelled(world, "acme")
    g = world.grant("acme", expires_at=DAY31 + timedelta(days=1))
    expired = world.grant("acme", expires_at=DAY31 - timedelta(days=1))
    cancelled(world, "held")
    lifecycle.legal_hold(world.deps, "held", on=True, reason="case 42")
    cancelled(world, "broke")
    world.jobs.fail_run.add("broke")
    world.tenant("kept")
    old, _ = world.backup("kept"), world.backup("kept")
    world.jobs.verdicts = [Verdict(old.id, "kept", False, "beyond the retention policy")]
    world.catalog.t.audit.append(FakeAudit("tenant.old", None, None, "ok", {},
                                           DAY31 - timedelta(days=400)))
    seen = {id(e) for e in world.catalog.t.audit}  # the audit purge takes some away

    def since_last() -> list[FakeAudit]:
        new = [e for e in world.catalog.t.audit if id(e) not in seen]
        seen.update(id(e) for e in new)
        return new

    run(world, DAY31)
    first = since_last()
    world.jobs.verdicts = []
    run(world, PURGE_AT)
    second = since_last()
    assert {e.action for e in first} >= {
        "access.expire", "backup.run", "backup.verify", "tenant.delete", "backup.prune",
        "retention.blocked", "retention.delete", "audit.purge"}
    assert {e.action for e in second} >= {"tenant.purge", "retention.blocked"}
    assert [(e.action, e.at) for e in first if e.at != DAY31] == []
    assert [(e.action, e.at) for e in second if e.at != PURGE_AT] == []
    row = world.catalog.row("acme")
    final = world.catalog.t.backups[row.final_backup_id or 0]
    assert (row.deleted_at, row.purge_after, row.purged_at, row.updated_at) == \
        (DAY31, DAY31 + timedelta(days=90), PURGE_AT, PURGE_AT)
    assert (final.started_at, final.finished_at, final.verified_at) == (DAY31, DAY31, DAY31)
    assert world.catalog.t.keys[row.id].destroyed_at == PURGE_AT
    grants = world.catalog.t.grants
    assert grants[expired.id].dropped_at == DAY31 and grants[g.id].dropped_at == DAY31
    written = [v for r in (row, final, world.catalog.t.keys[row.id], *grants.values())
               for v in vars(r).values() if isinstance(v, datetime)]
    assert not [v for v in written if v.year < T0.year]


# -- crashes -------------------------------------------------------------------------

DELETE_STEPS = ["retention.final_backup", "retention.dropped_database",
                "retention.dropped_roles"]
PURGE_STEPS = ["retention.backups_deleted", "retention.key_destroyed"]


@pytest.mark.parametrize("step", DELETE_STEPS + PURGE_STEPS)
def test_a_run_crashed_at_each_step_is_finished_by_the_next(
        world: World, crash_at: Callable[[str | None], None], step: str) -> None:
    at = DAY31
    if step in PURGE_STEPS:
        deleted(world, "acme")
        at = PURGE_AT
    else:
        cancelled(world, "acme")
    crash_at(step)
    [crashed] = run(world, at).results
    assert crashed.outcome == "failed" and crashed.message == f"injected fault at {step}"
    row = world.catalog.row("acme")
    if step == "retention.key_destroyed":  # inside the transaction: nothing of it stays
        assert world.catalog.t.keys[row.id].identity_wrapped is not None
        assert row.state == "deleted"
    crash_at(None)
    assert outcomes(run(world, at)) == [
        ("purge" if step in PURGE_STEPS else "delete", "acme", "done")]
    row = world.catalog.row("acme")
    sv = world.admin.servers["eu-central-1"]
    assert "tenant_acme" not in sv.databases and "owner_acme" not in sv.roles
    finals = [b for b in world.catalog.t.backups.values() if b.kind == "final"]
    assert len(finals) == 1  # the crashed run's final backup is reused
    if step in PURGE_STEPS:
        assert row.state == "purged" and world.store().keys("tenants/acme/") == []
        assert world.catalog.t.keys[row.id].identity_wrapped is None
    else:
        assert row.state == "deleted" and row.final_backup_id == finals[0].id


# -- other jobs ----------------------------------------------------------------------


def test_pruning_deletes_what_the_policy_gives_up(world: World) -> None:
    world.tenant("acme")
    old, new = world.backup("acme"), world.backup("acme")
    world.jobs.verdicts = [Verdict(old.id, "acme", False, "beyond the retention policy"),
                           Verdict(new.id, "acme", True, "newest")]
    report = run(world, T0, "prune")
    assert [(r.action.backup_id, r.outcome, r.message) for r in report.results] == [
        (old.id, "done", f"backup {old.id} pruned")]
    assert world.catalog.t.backups[old.id].status == "deleted"
    assert set(world.store().keys("tenants/acme/")) == {new.object_key, new.manifest_key}


def test_old_audit_records_are_purged_in_batches(world: World,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "AUDIT_BATCH", 2)
    for days in (400, 380, 370, 10):
        world.catalog.t.audit.append(FakeAudit("tenant.old", None, None, "ok", {},
                                               T0 - timedelta(days=days)))
    [result] = run(world, T0, "audit").results
    cutoff = T0 - timedelta(days=365)
    assert result.message == f"3 audit records older than {cutoff.date()} deleted"
    assert [e.action for e in world.catalog.t.audit] == ["tenant.old", "audit.purge"]
    assert world.catalog.t.audit[-1].detail == {"deleted": 3, "before": cutoff.isoformat()}


def test_a_record_dated_back_by_a_past_now_is_not_purged_before_its_time(world: World) -> None:
    """A run at a past --now dates its records at that now; the purge judges them by
    the real time they were written too, so a past --now cannot purge its own evidence."""
    real = T0 + timedelta(days=1)
    world.catalog.t.audit.append(FakeAudit("tenant.delete", "acme", None, "ok", {},
                                           T0 - timedelta(days=400), recorded_at=real))
    world.catalog.t.audit.append(FakeAudit("tenant.old", None, None, "ok", {},
                                           T0 - timedelta(days=400)))
    [result] = run(world, T0 + timedelta(days=2), "audit").results
    assert result.message.startswith("1 audit records older than")
    assert [e.action for e in world.catalog.t.audit] == ["tenant.delete", "audit.purge"]
    [result] = run(world, real + timedelta(days=366), "audit").results
    assert result.message.startswith("1 audit records older than")


def test_expired_and_tampered_grants_end_first(world: World) -> None:
    world.tenant("acme")
    cancelled(world, "beta")
    late = world.grant("acme", expires_at=DAY31 - timedelta(minutes=1))
    bent = world.grant("acme", grantee="eve", expires_at=DAY31 + timedelta(hours=1))
    fine = world.grant("acme", grantee="ok", expires_at=DAY31 + timedelta(hours=1))
    world.admin.servers["eu-central-1"].roles[bent.role_name].settings = {"work_mem": "1GB"}
    report = run(world, DAY31)
    assert [(r.action.kind, r.action.grant_id) for r in report.results][:2] == [
        ("expire_grant", late.id), ("expire_grant", bent.id)]
    assert report.results[1].message == (f"role {bent.role_name} of eve dropped (tampered "
                                         "with: set work_mem=1GB; removed "
                                         "default_transaction_read_only=on)")
    assert report.results[2].action.kind == "delete"
    grants = world.catalog.t.grants
    assert grants[late.id].revoked_at is None and grants[bent.id].revoked_at == DAY31
    assert grants[fine.id].dropped_at is None


# -- erasure -------------------------------------------------------------------------


def test_erasure_destroys_the_key_first_then_the_rest(world: World) -> None:
    world.tenant("acme")
    world.backup("acme")
    g = world.grant("acme")
    res = retention.erase_tenant(world.deps, "acme", " GDPR art. 17 ", T0)
    assert res == {"tenant": "acme", "state": "purged", "objects_deleted": 2,
                   "reason": "GDPR art. 17"}
    row = world.catalog.row("acme")
    assert (row.state, row.deleted_at, row.purge_after, row.purged_at) == \
        ("purged", T0, T0, T0)
    assert world.catalog.t.keys[row.id].destroyed_at == T0
    assert world.store().keys("tenants/acme/") == []
    assert "tenant_acme" not in world.admin.servers["eu-central-1"].databases
    assert world.catalog.t.grants[g.id].dropped_at == T0
    assert world.catalog.actions("acme")[-2:] == ["tenant.erase.key_destroyed", "tenant.erase"]


@pytest.mark.parametrize("step", ["erase.key_destroyed", "erase.dropped"])
def test_an_erasure_crashed_at_each_step_is_finished_by_erasing_again(
        world: World, crash_at: Callable[[str | None], None], step: str) -> None:
    world.tenant("acme")
    world.backup("acme")
    crash_at(step)
    with pytest.raises(faults.InjectedFault):
        retention.erase_tenant(world.deps, "acme", "request", T0)
    row = world.catalog.row("acme")
    assert world.catalog.t.keys[row.id].identity_wrapped is None  # from the first moment
    assert row.state == ("active" if step == "erase.key_destroyed" else "deleted")
    crash_at(None)
    assert retention.erase_tenant(world.deps, "acme", "request",
                                  T0 + timedelta(hours=1))["state"] == "purged"
    assert world.store().keys("tenants/acme/") == []


@pytest.mark.parametrize("state, legal_hold, error, message", [
    ("active", True, Conflict, "under legal hold (case): erasure refused"),
    ("purged", False, Conflict, "is already purged"),
    ("provisioning", False, Conflict, "finish or abandon its provisioning first"),
])
def test_erasure_refused(world: World, state: str, legal_hold: bool, error: type[Exception],
                         message: str) -> None:
    world.tenant("acme", state=state, legal_hold=legal_hold,
                 legal_hold_reason="case" if legal_hold else None)
    with pytest.raises(error, match=re.escape(message)):
        retention.erase_tenant(world.deps, "acme", "request", T0)
    row = world.catalog.row("acme")
    assert row.state == state and world.catalog.t.keys[row.id].identity_wrapped is not None
    assert "tenant_acme" in world.admin.servers["eu-central-1"].databases


def test_erasure_needs_a_reason(world: World) -> None:
    world.tenant("acme")
    with pytest.raises(InvalidInput, match="reason is required"):
        retention.erase_tenant(world.deps, "acme", "  ", T0)
    assert world.catalog.row("acme").state == "active"


# -- status --------------------------------------------------------------------------


def test_status_counts_lists_what_is_next_and_what_is_overdue(world: World) -> None:
    world.tenant("live")
    cancelled(world, "acme")
    cancelled(world, "held")
    lifecycle.legal_hold(world.deps, "held", on=True, reason="case")
    deleted(world, "gone")
    st = retention.status(world.deps, HOLD_END + timedelta(hours=2))
    assert st["states"] == {"provisioning": 0, "active": 1, "suspended": 0, "cancelled": 2,
                            "deleted": 1, "purged": 0}
    assert [r["tenant"] for r in st["next_deletions"]] == ["acme", "held"]
    assert st["next_purges"][0] == {"tenant": "gone", "region": "eu-central",
                                    "due_at": (DAY31 + timedelta(days=90)).isoformat(),
                                    "legal_hold": False, "legal_hold_reason": None}
    # an hour past the date and not done: overdue, unless a legal hold stops it
    assert [r["tenant"] for r in st["overdue"]["deletions"]] == ["acme"]
    assert st["overdue_count"] == 1
    assert retention.status(world.deps, HOLD_END + timedelta(minutes=59))[
        "overdue_count"] == 0
