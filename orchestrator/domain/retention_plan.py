"""What retention must do now: a pure function of catalog facts and the time.

    plan(due_tenants, prune_verdicts, expired_audit_rows, now) -> [Action, ...]

The facts handed in are only the rows that may be due (the catalog query
reads them through partial indexes), so planning costs what is due, not the
size of the fleet. The rules below are the promises of the privacy policy:
a database is deleted once its hold has ended, never before; the backups of
a deleted tenant are purged once purge_after has passed, never before; a
legal hold blocks both, whatever the dates say.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from backups.policy import Verdict
from orchestrator.domain.jobs import Job
from orchestrator.domain.states import due_transition

# an action's kind is the retention step (orchestrator.domain.jobs) that does it,
# or BLOCKED: a delete or purge a legal hold stops
DELETE, PURGE, PRUNE, AUDIT = Job.delete, Job.purge, Job.prune, Job.audit_purge
EXPIRE_GRANT = Job.expire_grant
BLOCKED = "blocked"
ORDER = {EXPIRE_GRANT: -1, DELETE: 0, PURGE: 1, PRUNE: 2, AUDIT: 3, BLOCKED: 4}
WHAT = {DELETE: "hold ended: final backup, drop database and role",
        PURGE: "purge due: delete every backup, destroy key"}


def step_of(kind: str) -> Job:
    """The retention step (`--only`) an action of this kind belongs to: a blocked one
    to delete (as it always has, whichever of delete or purge it blocks)."""
    return Job.delete if kind == BLOCKED else Job(kind)


@dataclass(frozen=True)
class TenantFact:
    slug: str
    state: str
    hold_until: datetime | None
    purge_after: datetime | None
    legal_hold: bool
    legal_hold_reason: str | None


@dataclass(frozen=True)
class Action:
    kind: str
    tenant: str | None
    due_at: datetime | None
    detail: str
    backup_id: int | None = None
    grant_id: int | None = None
    count: int = 0

    def describe(self) -> str:
        who = f" {self.tenant}" if self.tenant else ""
        return f"{self.kind}{who}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {"action": self.kind, "tenant": self.tenant, "detail": self.detail,
                "due_at": self.due_at.isoformat() if self.due_at else None,
                "backup_id": self.backup_id, "grant_id": self.grant_id,
                "count": self.count or None}


def tenant_action(t: TenantFact, now: datetime) -> Action | None:
    """The timed transition due for one tenant, if any (a blocked one when a legal
    hold stops it); which one is due is the state graph's rule (states.TIMED)."""
    found = due_transition(t.state, t.hold_until, t.purge_after, now)
    if found is None:
        return None
    kind, due = Job(str(found[0])), found[1]
    what = WHAT[kind]
    if t.legal_hold:
        return Action(BLOCKED, t.slug, due,
                      f"{kind} blocked by legal hold: {t.legal_hold_reason or 'no reason given'}")
    return Action(kind, t.slug, due, what)


@dataclass(frozen=True)
class GrantFact:
    id: int
    tenant: str
    grantee: str
    expires_at: datetime
    tampered: str | None = None  # what its role changed about itself, if anything


def plan(tenants: Iterable[TenantFact], verdicts: Iterable[Verdict], expired_audit: int,
         audit_cutoff: datetime, now: datetime, grants: Iterable[GrantFact] = ()
         ) -> list[Action]:
    # support access that outlived its TTL goes first (it is a live door)
    actions = [Action(EXPIRE_GRANT, g.tenant, g.expires_at,
                      f"support grant {g.id} of {g.grantee} expired", grant_id=g.id)
               for g in grants if g.expires_at <= now and not g.tampered]
    actions += [Action(EXPIRE_GRANT, g.tenant, now,
                       f"support grant {g.id} of {g.grantee} tampered with: {g.tampered}",
                       grant_id=g.id) for g in grants if g.tampered]
    actions += [a for t in tenants if (a := tenant_action(t, now)) is not None]
    actions += [Action(PRUNE, v.tenant, None, f"backup {v.backup_id}: {v.reason}",
                       backup_id=v.backup_id) for v in verdicts if not v.keep]
    if expired_audit:
        actions.append(Action(AUDIT, None, audit_cutoff,
                              f"{expired_audit} audit records older than "
                              f"{audit_cutoff.date().isoformat()}", count=expired_audit))
    # deletions first (they are the promise with a date), oldest due first
    return sorted(actions, key=lambda a: (ORDER[a.kind], a.due_at or now, a.tenant or "",
                                          a.backup_id or a.grant_id or 0))
