"""Lifecycle transitions over in-memory fakes of the ports (no Postgres): which
transitions are allowed from which state, what each does to the catalog and to the
server, what it audits, and that a re-run after a crash at each checkpoint finishes
the job. What only Postgres can show (a refused connection, a write refused by a
privilege) is in test_lifecycle.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from orchestrator.adapters import faults
from orchestrator.adapters.catalog.audit import redact
from orchestrator.domain.errors import Conflict, InvalidInput, NotFound
from orchestrator.domain.names import tenant_lock
from orchestrator.domain.states import CANCELLING
from orchestrator.services import lifecycle
from tests.fakes import T0, World

NOW = T0
HOLD = timedelta(days=30)
STATES = ("provisioning", "active", "suspended", "cancelled", "deleted", "purged")
OPS = ("cancel", "reactivate", "suspend", "resume")
# what each operator transition may start from, and where it leads
ALLOWED = {"cancel": ({"active", "suspended"}, "cancelled"),
           "reactivate": ({"cancelled"}, "active"),
           "suspend": ({"active"}, "suspended"),
           "resume": ({"suspended"}, "active")}


@pytest.fixture
def world() -> World:
    w = World()
    w.clock.at = NOW  # a command run without --now: its now is the clock's
    return w


@pytest.fixture
def crash_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """``crash_at(step)``: the next time ``step`` is reached, the fault raises (the
    fakes roll back an open transaction, as a killed process never commits one)."""
    faults._hits.clear()

    def arm(step: str) -> None:
        monkeypatch.setenv(faults.FAULT_ENV, step)
        monkeypatch.setenv(faults.MODE_ENV, "raise")

    yield arm
    faults._hits.clear()


def in_state(world: World, slug: str, state: str) -> None:
    """A tenant in ``state`` as the lifecycle leaves it, its dates ``NOW``-relative."""
    values: dict[str, Any] = {"state": state}
    if state == "suspended":
        values["suspended_at"] = NOW - timedelta(days=1)
    if state == "cancelled":
        values.update(cancelled_at=NOW - timedelta(days=1), hold_until=NOW + HOLD)
        # the hold took the writes away
    if state in ("deleted", "purged"):
        values.update(cancelled_at=NOW - timedelta(days=40), deleted_at=NOW - timedelta(days=9),
                      purge_after=NOW + timedelta(days=80))
    world.tenant(slug, **values)
    if state == "cancelled":
        world.admin.servers["eu-central-1"].databases[f"tenant_{slug}"].login_writes = False
    if state in ("deleted", "purged"):  # nothing is left on the server
        sv = world.admin.servers["eu-central-1"]
        del sv.databases[f"tenant_{slug}"]
        sv.roles.clear()
        sv.sessions.clear()


def run(world: World, op: str, slug: str) -> lifecycle.TransitionResult:
    if op in ("cancel", "reactivate"):
        return getattr(lifecycle, op)(world.deps, slug, now=NOW)  # type: ignore[no-any-return]
    return getattr(lifecycle, op)(world.deps, slug)  # type: ignore[no-any-return]


# -- the graph -----------------------------------------------------------------------


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("op", OPS)
def test_each_transition_is_allowed_from_its_states_only(world: World, op: str,
                                                         state: str) -> None:
    in_state(world, "acme", state)
    sources, target = ALLOWED[op]
    again = op == "cancel" and state == "cancelled"  # a re-run during the hold
    if state in sources or again:
        assert run(world, op, "acme").state == target
        assert world.catalog.row("acme").state == target
        # a re-run during the hold changes no state: nothing to audit
        assert [e.outcome for e in world.catalog.events(f"tenant.{op}")] == \
            ([] if again else ["ok"])
        return
    before = world.catalog.row("acme")
    before_snapshot = (before.state, before.hold_until, before.suspended_at, before.step)
    with pytest.raises(Conflict) as refused:
        run(world, op, "acme")
    assert f"tenant 'acme' is {state}; {op} needs it" in str(refused.value)
    row = world.catalog.row("acme")
    assert (row.state, row.hold_until, row.suspended_at, row.step) == before_snapshot
    assert world.admin.calls == []  # refused before any server is touched
    [event] = world.catalog.events(f"tenant.{op}")
    assert event.outcome == "refused" and event.detail["error"] == str(refused.value)


@pytest.mark.parametrize("op", OPS)
def test_an_unknown_tenant_is_not_found_and_the_refusal_audited(world: World, op: str) -> None:
    with pytest.raises(NotFound, match="no tenant 'ghost'"):
        run(world, op, "ghost")
    [event] = world.catalog.events(f"tenant.{op}")
    assert event.outcome == "refused" and event.tenant == "ghost"


def test_a_refusal_stands_when_its_audit_cannot_be_written(world: World) -> None:
    in_state(world, "acme", "deleted")
    world.catalog.fail_audit = True
    with pytest.raises(Conflict, match="is deleted"):
        run(world, "suspend", "acme")


@pytest.mark.parametrize("op", OPS)
def test_a_tenant_another_process_is_changing_is_left_alone(world: World, op: str) -> None:
    in_state(world, "acme", "active")
    world.catalog.held.add(tenant_lock("acme"))
    with pytest.raises(Conflict, match="being changed by another tenantctl process"):
        run(world, op, "acme")
    assert world.catalog.row("acme").state == "active" and world.admin.calls == []


# -- cancel --------------------------------------------------------------------------


def test_cancel_starts_the_hold_takes_writes_away_and_backs_up(world: World) -> None:
    in_state(world, "acme", "active")
    res = lifecycle.cancel(world.deps, "acme", now=NOW)
    row = world.catalog.row("acme")
    assert (row.state, row.cancelled_at, row.hold_until, row.step) == \
        ("cancelled", NOW, NOW + HOLD, None)
    assert res.to_json() == {"tenant": "acme", "action": "cancel", "state": "cancelled",
                             "hold_until": (NOW + HOLD).isoformat(),
                             "backup_id": res.backup_id, "backup_error": None}
    sv = world.admin.servers["eu-central-1"]
    assert not sv.databases["tenant_acme"].login_writes  # reads go on, writes do not
    assert sv.roles["tenant_acme"].login  # export still possible
    assert sv.sessions == []  # sessions opened before the hold are ended
    backup = world.catalog.t.backups[res.backup_id or 0]
    assert (backup.kind, backup.started_at) == ("cancel", NOW)
    [event] = world.catalog.events("tenant.cancel")
    assert event.detail == {"state": "cancelled", "cancelled_at": NOW.isoformat(),
                            "hold_until": (NOW + HOLD).isoformat(), "suspended_at": None,
                            "step": None}


def test_cancel_of_a_suspended_tenant_lets_it_log_in_to_export(world: World) -> None:
    in_state(world, "acme", "suspended")
    lifecycle.cancel(world.deps, "acme", now=NOW, backup=False)
    row = world.catalog.row("acme")
    assert row.state == "cancelled" and row.suspended_at is None
    assert world.admin.servers["eu-central-1"].roles["tenant_acme"].login
    assert world.catalog.t.backups == {}


def test_a_failed_cancel_backup_leaves_the_cancellation_standing(world: World) -> None:
    in_state(world, "acme", "active")
    world.jobs.fail_run.add("acme")
    res = lifecycle.cancel(world.deps, "acme", now=NOW)
    assert res.state == "cancelled" and res.backup_id is None
    assert res.backup_error == "backup of 'acme' failed: pg_dump exited 1"
    assert world.catalog.row("acme").state == "cancelled"


def test_cancelling_again_during_the_hold_backs_up_only_if_nothing_did(world: World) -> None:
    in_state(world, "acme", "active")
    first = lifecycle.cancel(world.deps, "acme", now=NOW)
    calls = len(world.admin.calls)
    again = lifecycle.cancel(world.deps, "acme", now=NOW + timedelta(days=1))
    assert again.hold_until == first.hold_until and again.backup_id is None
    assert len(world.catalog.t.backups) == 1 and world.jobs.reaped == ["acme"]
    # the writes were taken away already: only the sessions are ended again
    assert [c[0] for c in world.admin.calls[calls:]] == ["terminate_sessions"]
    assert world.catalog.row("acme").cancelled_at == NOW
    # the first run's backup failed: the second takes one
    in_state(world, "beta", "active")
    world.jobs.fail_run.add("beta")
    assert lifecycle.cancel(world.deps, "beta", now=NOW).backup_error
    world.jobs.fail_run.clear()
    assert lifecycle.cancel(world.deps, "beta", now=NOW + timedelta(hours=1)).backup_id


def test_cancel_ends_read_write_grants_and_keeps_read_only_ones(world: World) -> None:
    in_state(world, "acme", "active")
    rw, ro = world.grant("acme", read_only=False), world.grant("acme", read_only=True)
    lifecycle.cancel(world.deps, "acme", now=NOW, backup=False)
    grants = world.catalog.t.grants
    assert grants[rw.id].dropped_at is not None and grants[rw.id].revoked_at is not None
    assert grants[ro.id].dropped_at is None
    roles = world.admin.servers["eu-central-1"].roles
    assert rw.role_name not in roles and ro.role_name in roles
    assert [e.detail["grant"] for e in world.catalog.events("access.hold")] == [rw.id]


@pytest.mark.parametrize("step", ["cancel.restricted", "cancel.state"])
def test_a_cancel_crashed_at_each_step_is_finished_by_running_it_again(
        world: World, crash_at: object, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    in_state(world, "acme", "active")
    crash_at(step)  # type: ignore[operator]
    with pytest.raises(faults.InjectedFault):
        lifecycle.cancel(world.deps, "acme", now=NOW)
    row = world.catalog.row("acme")
    if step == "cancel.restricted":  # writes gone, state not yet: doctor sees the step
        assert (row.state, row.step) == ("active", CANCELLING)
    else:
        assert (row.state, row.step) == ("cancelled", None)
    assert world.catalog.t.backups == {}
    monkeypatch.delenv(faults.FAULT_ENV)
    res = lifecycle.cancel(world.deps, "acme", now=NOW + timedelta(minutes=5))
    row = world.catalog.row("acme")
    assert (row.state, row.step) == ("cancelled", None) and res.backup_id is not None
    assert len(world.catalog.t.backups) == 1
    assert not world.admin.servers["eu-central-1"].databases["tenant_acme"].login_writes


# -- reactivate, suspend, resume -----------------------------------------------------


def test_reactivate_during_the_hold_gives_the_writes_back(world: World) -> None:
    in_state(world, "acme", "active")
    lifecycle.cancel(world.deps, "acme", now=NOW, backup=False)
    res = lifecycle.reactivate(world.deps, "acme", now=NOW + timedelta(days=29))
    row = world.catalog.row("acme")
    assert (res.state, row.state, row.cancelled_at, row.hold_until) == \
        ("active", "active", None, None)
    assert world.admin.servers["eu-central-1"].databases["tenant_acme"].login_writes
    assert world.catalog.actions("acme")[-1] == "tenant.reactivate"


def test_reactivate_after_the_hold_is_refused(world: World) -> None:
    in_state(world, "acme", "active")
    lifecycle.cancel(world.deps, "acme", now=NOW, backup=False)
    with pytest.raises(Conflict, match="can no longer be reactivated"):
        lifecycle.reactivate(world.deps, "acme", now=NOW + HOLD)
    assert world.catalog.row("acme").state == "cancelled"
    assert world.catalog.events("tenant.reactivate")[-1].outcome == "refused"


def test_suspend_blocks_logins_and_ends_sessions_and_resume_undoes_it(world: World) -> None:
    in_state(world, "acme", "active")
    assert lifecycle.suspend(world.deps, "acme").state == "suspended"
    sv = world.admin.servers["eu-central-1"]
    assert not sv.roles["tenant_acme"].login and sv.sessions == []
    assert world.catalog.row("acme").suspended_at == NOW
    world.clock.at = NOW + timedelta(hours=1)
    assert lifecycle.resume(world.deps, "acme").state == "active"
    assert sv.roles["tenant_acme"].login and world.catalog.row("acme").suspended_at is None
    assert world.catalog.actions("acme") == ["tenant.suspend", "tenant.resume"]


# -- legal hold ----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["active", "suspended", "cancelled", "deleted"])
def test_a_legal_hold_goes_on_and_off_with_a_reason(world: World, state: str) -> None:
    in_state(world, "acme", state)
    assert lifecycle.legal_hold(world.deps, "acme", on=True, reason=" case 42 ") == \
        {"tenant": "acme", "legal_hold": True, "reason": "case 42"}
    row = world.catalog.row("acme")
    assert (row.legal_hold, row.legal_hold_reason, row.state) == (True, "case 42", state)
    lifecycle.legal_hold(world.deps, "acme", on=False, reason="closed")
    row = world.catalog.row("acme")
    assert (row.legal_hold, row.legal_hold_reason) == (False, None)
    on, off = world.catalog.events(tenant="acme")
    assert (on.action, on.detail["reason"], off.action, off.detail["reason"]) == \
        ("tenant.legal_hold.on", "case 42", "tenant.legal_hold.off", "closed")
    assert world.admin.calls == []


@pytest.mark.parametrize("reason, error, message", [
    ("", InvalidInput, "--reason is required"),
    ("a\nb", InvalidInput, "control characters"),
])
def test_a_legal_hold_needs_a_reason(world: World, reason: str, error: type[Exception],
                                     message: str) -> None:
    in_state(world, "acme", "active")
    with pytest.raises(error, match=message):
        lifecycle.legal_hold(world.deps, "acme", on=True, reason=reason)
    assert not world.catalog.row("acme").legal_hold
    assert world.catalog.events("tenant.legal_hold")[0].outcome == "refused"


def test_a_purged_tenant_has_nothing_left_to_hold(world: World) -> None:
    in_state(world, "acme", "purged")
    with pytest.raises(Conflict, match="nothing is left to hold"):
        lifecycle.legal_hold(world.deps, "acme", on=True, reason="late")
    assert not world.catalog.row("acme").legal_hold


# -- the audit log -------------------------------------------------------------------


def test_audit_details_are_redacted() -> None:
    assert redact({"password": "hunter2", "dsn": "postgresql://u:hunter2@h/db",
                   "conninfo": "host=h password=hunter2 dbname=x", "n": 3}) == {
        "password": "[redacted]", "dsn": "postgresql://u:[redacted]@h/db",
        "conninfo": "host=h password=[redacted] dbname=x", "n": 3}
