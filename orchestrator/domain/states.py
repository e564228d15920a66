"""Tenant states and the one state graph of the lifecycle, with no I/O (see
docs/ARCHITECTURE.md).

    provisioning ──▶ active ⇄ suspended            (operator: suspend, resume)
                      │  ▲        │
               cancel │  │ reactivate (before the hold ends)
                      ▼  │        │ cancel
                    cancelled ◀───┘
                      │ hold_until passed           (timed: delete)
                      ▼
                    deleted
                      │ purge_after passed          (timed: purge)
                      ▼
                    purged
    erase: active, suspended, cancelled or deleted ──▶ purged, at once
    legal hold on/off: any state but purged; it blocks erase, delete and purge

Every transition is data (``OPERATOR`` and ``TIMED``); ``refusal`` is the one check
the services make before one, ``due_transition`` the one rule of the timed ones.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from orchestrator.domain.errors import Conflict


class TenantState(enum.StrEnum):
    provisioning = "provisioning"
    active = "active"
    suspended = "suspended"
    cancelled = "cancelled"
    deleted = "deleted"
    purged = "purged"


S = TenantState

# Tenant.step of an active or suspended tenant while a cancellation is under way: set
# before its writes are taken away, cleared with the state change (doctor reports one
# that a crash stopped half-way).
CANCELLING = "cancel"
# Tenant.step of an active tenant whose connection string ("shown once") has not been
# handed out yet: a re-run of its `tenant create` shows it instead of "already exists".
UNSHOWN = "unshown"

# The states in which a tenant has a database on its server: the ones that can be
# backed up, restored into, migrated, exported, opened with psql, granted to support
# and whose password can be rotated.
HAS_DATABASE = (S.active, S.suspended, S.cancelled)
# States in which a tenant occupies a place on its server.
PLACED_STATES = (S.provisioning, S.active, S.suspended, S.cancelled)
# The states whose backups the retention policy prunes: not cancelled (a hold keeps
# every backup until the purge).
PRUNABLE = (S.active, S.suspended)


class Op(enum.StrEnum):
    """What may happen to a tenant: the edges of the graph."""

    cancel = "cancel"
    reactivate = "reactivate"
    suspend = "suspend"
    resume = "resume"
    legal_hold = "legal_hold"  # on or off: the state stays
    erase = "erase"
    delete = "delete"  # timed: the hold ended
    purge = "purge"  # timed: purge_after passed


_REFUSED = "is {state}; {op} needs it {allowed}"


@dataclass(frozen=True)
class Transition:
    sources: tuple[TenantState, ...]
    target: TenantState | None  # None: the state stays (legal hold)
    # why a tenant in another state is refused ({state}, {op}, {allowed}), per state
    # where it says more than the default
    refused: str = _REFUSED
    refused_in: Mapping[TenantState, str] = field(default_factory=dict)


# Transitions an operator asks for.
OPERATOR: Mapping[Op, Transition] = {
    Op.cancel: Transition((S.active, S.suspended), S.cancelled),
    Op.reactivate: Transition((S.cancelled,), S.active),  # and only before hold_until
    Op.suspend: Transition((S.active,), S.suspended),
    Op.resume: Transition((S.suspended,), S.active),
    Op.legal_hold: Transition(tuple(s for s in S if s != S.purged), None,
                              refused="is {state}: nothing is left to hold"),
    # no hold, whatever the dates say; a legal hold refuses it
    Op.erase: Transition((S.active, S.suspended, S.cancelled, S.deleted), S.purged,
                         refused="is {state}: finish or abandon its provisioning first",
                         refused_in={S.purged: "is already purged"}),
}


@dataclass(frozen=True)
class Timed:
    source: TenantState
    target: TenantState
    due: str  # the tenant's date at which it is due: "hold_until" or "purge_after"


# Transitions that happen when a date has passed (retention carries them out); a
# legal hold blocks them.
TIMED: Mapping[Op, Timed] = {
    Op.delete: Timed(S.cancelled, S.deleted, "hold_until"),
    Op.purge: Timed(S.deleted, S.purged, "purge_after"),
}


def refusal(op: Op, state: str, *, now: datetime | None = None,
            hold_until: datetime | None = None, legal_hold: bool = False,
            legal_hold_reason: str | None = None) -> str | None:
    """Why an operator's ``op`` may not happen to a tenant in ``state`` (the words
    after "tenant 'x' "), or None when it may. ``now`` matters to reactivate only
    (the hold must not have ended)."""
    t = OPERATOR[op]
    if state not in t.sources:
        text = t.refused_in.get(S(state), t.refused)
        return text.format(state=state, op=op, allowed=" or ".join(t.sources))
    if op == Op.reactivate and hold_until is not None and now is not None \
            and now >= hold_until:
        return (f"its hold ended at {hold_until.isoformat()}; it can no longer be "
                "reactivated (its database is due for deletion)")
    if op == Op.erase and legal_hold:
        return f"is under legal hold ({legal_hold_reason}): erasure refused"
    return None


def check(slug: str, op: Op, state: str, *, now: datetime | None = None,
          hold_until: datetime | None = None, legal_hold: bool = False,
          legal_hold_reason: str | None = None) -> None:
    """Raise Conflict when ``refusal`` says no (the services' one check)."""
    why = refusal(op, state, now=now, hold_until=hold_until, legal_hold=legal_hold,
                  legal_hold_reason=legal_hold_reason)
    if why is not None:
        raise Conflict(f"tenant {slug!r} {why}")


def target(op: Op) -> TenantState:
    """The state ``op`` leads to."""
    to = OPERATOR[op].target if op in OPERATOR else TIMED[op].target
    assert to is not None, f"{op} leaves the state as it is"
    return to


def cancel_retry(state: str, hold_until: datetime | None, now: datetime) -> bool:
    """Cancelling a tenant already in its hold finishes what a crashed run left
    undone (its backup) instead of being refused: the command is idempotent."""
    return state == S.cancelled and hold_until is not None and now < hold_until


def due_transition(state: str, hold_until: datetime | None, purge_after: datetime | None,
                   now: datetime) -> tuple[Op, datetime] | None:
    """The timed transition due for a tenant at ``now`` and the date it became due,
    whatever a legal hold says (the caller decides what a hold blocks)."""
    dates = {"hold_until": hold_until, "purge_after": purge_after}
    for op, t in TIMED.items():
        due = dates[t.due]
        if state == t.source and due is not None and due <= now:
            return op, due
    return None
