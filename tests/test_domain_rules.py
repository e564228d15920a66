"""The domain's one definition of each lifecycle rule, checked without a database:
the state graph, "has a database", the statuses, "overdue", the latest backup's
age, the prune decisions and the rollout's stop rule."""

from __future__ import annotations

import enum
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import CheckConstraint

from backups.policy import BackupFact, RetentionPolicy, prune_horizon, retention
from orchestrator.domain import states
from orchestrator.domain.errors import Conflict
from orchestrator.domain.rollout_plan import (
    CANARY_WAVE,
    INTERRUPTED,
    final_status,
    stop_reason,
    wave_budget,
)
from orchestrator.domain.states import (
    HAS_DATABASE,
    OPERATOR,
    PLACED_STATES,
    PRUNABLE,
    TIMED,
    Op,
    TenantState,
    due_transition,
    refusal,
)
from orchestrator.domain.statuses import BackupStatus, RolloutStatus, TenantMigration
from orchestrator.domain.timeliness import (
    GRACE,
    backup_overdue,
    backup_since,
    is_overdue,
    latest_backup_age,
    latest_completed,
    overdue_transition,
)

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
S = TenantState
ALL = tuple(S)

# -- the state graph ---------------------------------------------------------------------

# what each operator transition allows, written out by hand (as the services did before)
ALLOWED_FROM = {
    Op.cancel: {S.active, S.suspended},
    Op.reactivate: {S.cancelled},
    Op.suspend: {S.active},
    Op.resume: {S.suspended},
    Op.legal_hold: {S.provisioning, S.active, S.suspended, S.cancelled, S.deleted},
    Op.erase: {S.active, S.suspended, S.cancelled, S.deleted},
}
LEADS_TO = {Op.cancel: S.cancelled, Op.reactivate: S.active, Op.suspend: S.suspended,
            Op.resume: S.active, Op.erase: S.purged, Op.delete: S.deleted,
            Op.purge: S.purged}


@pytest.mark.parametrize("op", list(ALLOWED_FROM))
@pytest.mark.parametrize("state", ALL)
def test_every_operator_transition_is_allowed_or_refused_as_before(op: Op, state: S) -> None:
    why = refusal(op, state, now=NOW)
    assert (why is None) == (state in ALLOWED_FROM[op]), why


def test_the_graph_has_no_other_operator_transition() -> None:
    assert set(OPERATOR) == set(ALLOWED_FROM)
    assert set(TIMED) == {Op.delete, Op.purge}


@pytest.mark.parametrize("op", list(LEADS_TO))
def test_targets(op: Op) -> None:
    assert states.target(op) == LEADS_TO[op]


def test_legal_hold_leaves_the_state_as_it_is() -> None:
    assert OPERATOR[Op.legal_hold].target is None
    with pytest.raises(AssertionError):
        states.target(Op.legal_hold)


def test_refusals_say_what_the_services_said() -> None:
    assert refusal(Op.cancel, "deleted") == "is deleted; cancel needs it active or suspended"
    assert refusal(Op.suspend, "cancelled") == "is cancelled; suspend needs it active"
    assert refusal(Op.resume, "active") == "is active; resume needs it suspended"
    assert refusal(Op.reactivate, "active") == "is active; reactivate needs it cancelled"
    assert refusal(Op.legal_hold, "purged") == "is purged: nothing is left to hold"
    assert refusal(Op.erase, "purged") == "is already purged"
    assert refusal(Op.erase, "provisioning") == \
        "is provisioning: finish or abandon its provisioning first"
    assert refusal(Op.erase, "active", legal_hold=True, legal_hold_reason="court") == \
        "is under legal hold (court): erasure refused"
    ended = refusal(Op.reactivate, "cancelled", now=NOW, hold_until=NOW)
    assert ended == (f"its hold ended at {NOW.isoformat()}; it can no longer be "
                     "reactivated (its database is due for deletion)")
    assert refusal(Op.reactivate, "cancelled", now=NOW,
                   hold_until=NOW + timedelta(microseconds=1)) is None


def test_check_raises_conflict_naming_the_tenant() -> None:
    with pytest.raises(Conflict, match=r"^tenant 'acme' is deleted; cancel needs it "):
        states.check("acme", Op.cancel, "deleted")
    states.check("acme", Op.erase, "deleted")  # finishing a deletion early is allowed


def test_a_cancel_during_the_hold_is_a_retry() -> None:
    assert states.cancel_retry("cancelled", NOW + timedelta(days=1), NOW)
    assert not states.cancel_retry("cancelled", NOW, NOW)  # the hold has ended
    assert not states.cancel_retry("cancelled", None, NOW)
    assert not states.cancel_retry("active", NOW + timedelta(days=1), NOW)


def test_timed_transitions_are_due_at_their_date_never_before() -> None:
    second = timedelta(seconds=1)
    assert due_transition("cancelled", NOW, None, NOW) == (Op.delete, NOW)
    assert due_transition("cancelled", NOW + second, None, NOW) is None
    assert due_transition("deleted", None, NOW - second, NOW) == (Op.purge, NOW - second)
    assert due_transition("deleted", None, NOW + second, NOW) is None
    for state in ("provisioning", "active", "suspended", "purged"):
        assert due_transition(state, NOW - second, NOW - second, NOW) is None
    # a cancelled tenant's purge date is not its due date, nor a deleted one's hold
    assert due_transition("cancelled", None, NOW - second, NOW) is None
    assert due_transition("deleted", NOW - second, None, NOW) is None


# -- "has a database" and the other sets ----------------------------------------------------


def test_has_database() -> None:
    assert set(HAS_DATABASE) == {S.active, S.suspended, S.cancelled}
    # a tenant with a database has a place on a server; a hold keeps every backup
    assert set(HAS_DATABASE) < set(PLACED_STATES)
    assert set(PRUNABLE) == set(HAS_DATABASE) - {S.cancelled}
    # the graph agrees: what erase, delete and purge take away is exactly a database
    assert set(HAS_DATABASE) == {s for s in ALL if refusal(Op.erase, s) is None} - {S.deleted}


# -- statuses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("table", "column", "words"), [
    ("tenants", "state", TenantState),
    ("backups", "status", BackupStatus),
    ("rollouts", "status", RolloutStatus),
    ("rollout_tenants", "status", TenantMigration),
])
def test_the_catalog_accepts_exactly_the_enums_words(table: str, column: str,
                                                     words: type[enum.StrEnum]) -> None:
    """The models' CHECK constraints are built from the enums; the migrations wrote
    them once, by hand: both must say the same."""
    from orchestrator.adapters.catalog.models import Base

    (check,) = [c for c in Base.metadata.tables[table].constraints
                if isinstance(c, CheckConstraint) and column in str(c.sqltext)]
    expected = f"{column} IN ({','.join(repr(w.value) for w in words)})"
    assert str(check.sqltext) == expected
    migrations = Path(__file__).resolve().parent.parent / "migrations" / "catalog" / "versions"
    assert any(expected in p.read_text() for p in migrations.glob("*.py")), expected


def test_statuses_print_and_serialise_as_their_words() -> None:
    assert json.dumps({"status": BackupStatus.completed}) == '{"status": "completed"}'
    assert f"{RolloutStatus.stopped:9}|" == "stopped  |"
    assert TenantMigration.failed == "failed" and {"failed": 1}[TenantMigration.failed] == 1


# -- the rollout's stop rule -----------------------------------------------------------------


def test_stop_rule() -> None:
    assert wave_budget(CANARY_WAVE, 5) == 0 and wave_budget(1, 5) == 5
    assert stop_reason(CANARY_WAVE, 1, 1, 10) == "canary failed"
    assert stop_reason(CANARY_WAVE, 0, 0, 0) is None
    # a later wave: failures within the budget go on, one more stops
    assert stop_reason(2, 3, 3, 3) is None
    assert stop_reason(2, 4, 1, 3) == "failure budget exceeded (4 failed, 3 allowed)"
    assert stop_reason(2, 0, 0, 3, interrupted=True) == INTERRUPTED
    # a spent budget is the reason even when interrupted as well
    assert stop_reason(2, 4, 0, 3, interrupted=True).startswith("failure budget")  # type: ignore[union-attr]


def test_final_status() -> None:
    P, R, OK, F = (TenantMigration.pending, TenantMigration.running, TenantMigration.ok,
                   TenantMigration.failed)
    assert final_status(INTERRUPTED, {OK: 1}) == RolloutStatus.interrupted
    assert final_status("canary failed", {F: 1}) == RolloutStatus.stopped
    assert final_status(None, {OK: 2, P: 1}) == RolloutStatus.running
    assert final_status(None, {OK: 2, R: 1}) == RolloutStatus.running
    assert final_status(None, {OK: 2, F: 1}) == RolloutStatus.failed
    assert final_status(None, {"ok": 2, "skipped": 1}) == RolloutStatus.completed
    assert final_status(None, {}) == RolloutStatus.completed


# -- overdue and the latest backup's age -------------------------------------------------------


def test_overdue_means_more_than_the_grace_after_the_date() -> None:
    hour = timedelta(hours=1)
    assert not is_overdue(NOW - hour, NOW)  # exactly an hour late: not yet
    assert is_overdue(NOW - hour - timedelta(microseconds=1), NOW)
    assert not is_overdue(NOW + timedelta(days=1), NOW)


def test_overdue_transitions_and_the_legal_hold_exemption() -> None:
    late, fresh = NOW - timedelta(hours=2), NOW - timedelta(minutes=10)
    assert overdue_transition("cancelled", late, None, False, NOW) == (Op.delete, late)
    assert overdue_transition("deleted", None, late, False, NOW) == (Op.purge, late)
    assert overdue_transition("cancelled", fresh, None, False, NOW) is None  # grace
    assert overdue_transition("cancelled", late, None, True, NOW) is None  # legal hold
    assert overdue_transition("active", late, late, False, NOW) is None
    assert overdue_transition("purged", late, late, False, NOW) is None


class _B:
    def __init__(self, id: int, tenant_id: int, status: str, finished_at: datetime | None):
        self.id, self.tenant_id, self.status, self.finished_at = id, tenant_id, status, \
            finished_at


def test_latest_completed_backup_per_tenant() -> None:
    h = timedelta(hours=1)
    backups = [_B(1, 7, "completed", NOW - 5 * h), _B(2, 7, "completed", NOW - 2 * h),
               _B(3, 7, "failed", NOW - h), _B(4, 7, "running", None),
               _B(5, 8, "deleted", NOW - h), _B(6, 9, "completed", NOW - 9 * h),
               _B(7, 7, "completed", NOW - 3 * h)]  # finished earlier, listed later
    latest = latest_completed(backups)
    assert {t: b.id for t, b in latest.items()} == {7: 2, 9: 6}


def test_latest_backup_age_counts_from_activation_when_never_backed_up() -> None:
    created, activated, backed_up = (NOW - timedelta(days=3), NOW - timedelta(days=2),
                                     NOW - timedelta(hours=5))
    assert latest_backup_age(backed_up, activated, created, NOW) == timedelta(hours=5)
    assert latest_backup_age(None, activated, created, NOW) == timedelta(days=2)
    assert latest_backup_age(None, None, created, NOW) == timedelta(days=3)
    assert backup_since(None, activated, created) == activated


def test_a_backup_is_overdue_an_interval_and_the_grace_after_the_latest() -> None:
    day = timedelta(days=1)
    assert not backup_overdue(NOW - day - GRACE, day, NOW)
    assert backup_overdue(NOW - day - GRACE - timedelta(seconds=1), day, NOW)


# -- the prune rule ------------------------------------------------------------------------


def test_prune_decisions_name_their_reason() -> None:
    day = timedelta(days=1)
    facts = [BackupFact(1, "a", NOW - 70 * day), BackupFact(2, "a", NOW - 20 * day),
             BackupFact(3, "a", NOW - 19 * day), BackupFact(4, "a", NOW - 2 * day),
             BackupFact(5, "b", NOW - 400 * day)]
    verdicts = {v.backup_id: (v.keep, v.reason) for v in retention(facts, NOW,
                                                                    RetentionPolicy(7, 4))}
    assert verdicts == {4: (True, "newest backup (floor)"),
                        3: (True, "newest of week 3"),
                        2: (False, "beyond the retention policy"),
                        1: (False, "beyond the retention policy"),
                        5: (True, "newest backup (floor)")}
    assert prune_horizon(NOW, RetentionPolicy(7, 4)) == NOW - 7 * day


@pytest.mark.parametrize("policy", [RetentionPolicy(7, 4), RetentionPolicy(3, 2),
                                    RetentionPolicy(1, 0), RetentionPolicy(0, 1)])
def test_judging_only_what_prune_facts_reads_prunes_the_same(policy: RetentionPolicy) -> None:
    """backups.service.prune_facts reads only the backups from before the horizon plus
    each tenant's newest: the policy must prune the same ones as if it saw them all."""
    import random

    rng = random.Random(11)
    facts = [BackupFact(i, f"t{rng.randrange(30)}",
                        NOW - timedelta(hours=rng.uniform(0, 80 * 24))) for i in range(600)]
    horizon = prune_horizon(NOW, policy)
    newest: dict[str, BackupFact] = {}
    for b in facts:
        if b.tenant not in newest or b.finished_at > newest[b.tenant].finished_at:
            newest[b.tenant] = b
    old = [b for b in facts if b.finished_at < horizon]
    with_old = {b.tenant for b in old}
    narrowed = list({b.id: b for b in old + [newest[t] for t in with_old]}.values())
    pruned = {v.backup_id for v in retention(facts, NOW, policy) if not v.keep}
    assert pruned == {v.backup_id for v in retention(narrowed, NOW, policy) if not v.keep}
    assert pruned
    # what a planner asks for: the same prunes, without the report of what is kept
    assert retention(narrowed, NOW, policy, report_kept=False) == \
        [v for v in retention(narrowed, NOW, policy) if not v.keep]
