"""`tenantctl retention run`: read what may be due, plan (retention_plan, pure),
then carry the plan out step by step, each step audited and idempotent, so a
crash anywhere is finished by the next run. One run at a time fleet-wide (a
catalog advisory lock); one tenant's failure never stops the others.

Deleting a tenant whose hold has ended:
  final backup, verified → end its sessions → DROP DATABASE … WITH (FORCE)
  → drop its roles → state deleted, purge_after = now + purge_days.
Purging a deleted tenant once purge_after has passed:
  delete every backup object and manifest from its region's store → destroy its
  key (crypto-shredding: a copy that escaped can no longer be read) → state
  purged; the catalog keeps a tombstone without credentials or keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from orchestrator.adapters.catalog.audit import reason_text
from orchestrator.adapters.catalog.locks import holding_tenant
from orchestrator.adapters.faults import checkpoint
from orchestrator.domain import states
from orchestrator.domain.errors import FIELD, ExitCode, InvalidInput, TenantctlError, first_line
from orchestrator.domain.jobs import STEPS, Job, parse_steps
from orchestrator.domain.marks import role_marker
from orchestrator.domain.names import tenant_names
from orchestrator.domain.retention_plan import (
    AUDIT,
    BLOCKED,
    DELETE,
    EXPIRE_GRANT,
    PRUNE,
    PURGE,
    Action,
    GrantFact,
    TenantFact,
    plan,
    step_of,
    tenant_action,
)
from orchestrator.domain.states import Op, TenantState
from orchestrator.domain.statuses import BackupStatus
from orchestrator.domain.timeliness import overdue_transition
from orchestrator.ports import CatalogWrites, TenantRecord
from orchestrator.services import access, pooler

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

LOCK = "retention"
JOBS = STEPS  # every step of a run (orchestrator.domain.jobs)
AUDIT_BATCH = 10_000  # audit records deleted per transaction


class RetentionError(TenantctlError):
    exit_code = ExitCode.RETENTION


# -- reading the facts ---------------------------------------------------------------


def due_tenant_facts(fleet: Deps, now: datetime) -> list[TenantFact]:
    """Only tenants whose hold or purge date has passed (partial indexes)."""
    return [_fact(t) for timed in states.TIMED.values()  # the graph's timed transitions
            for t in fleet.records.tenants.due(timed.source, timed.due, now)]


def _fact(t: TenantRecord) -> TenantFact:
    return TenantFact(t.slug, t.state, t.hold_until, t.purge_after, t.legal_hold,
                      t.legal_hold_reason)


def make_plan(fleet: Deps, now: datetime, jobs: Iterable[str] = JOBS) -> list[Action]:
    """The plan for these steps (Job members, or `--only` spellings)."""
    jobs = parse_steps(jobs)
    lc = fleet.cfg.lifecycle
    tenants = due_tenant_facts(fleet, now) if {Job.delete, Job.purge} & set(jobs) else []
    verdicts = []
    if Job.prune in jobs:
        verdicts = fleet.backup_jobs.prune_verdicts(now)
    audit_cutoff = now - timedelta(days=lc.audit_days)
    expired = 0
    if Job.audit_purge in jobs:
        expired = fleet.records.audit_count_before(audit_cutoff)
    grants = []
    if Job.expire_grant in jobs:
        grants = [GrantFact(g.id, g.slug, g.grantee, g.expires_at)
                  for g in access.expired(fleet, now)]
        # a role that changed its own settings ends now, whatever its TTL says
        if (changed := access.tampered(fleet)):
            grants = [g for g in grants if g.id not in changed]
            grants += [GrantFact(g.id, g.slug, g.grantee, g.expires_at, changed[g.id])
                       for g in access.live(fleet) if g.id in changed]
    return [a for a in plan(tenants, verdicts, expired, audit_cutoff, now, grants)
            if step_of(a.kind) in jobs]


# -- carrying it out -----------------------------------------------------------------


@dataclass
class StepResult:
    action: Action
    outcome: str  # done | skipped | blocked | failed
    message: str

    def to_json(self) -> dict[str, Any]:
        return {**self.action.to_json(), "outcome": self.outcome, "message": self.message}


@dataclass
class RunReport:
    now: datetime
    dry_run: bool
    plan: list[Action]
    results: list[StepResult] = field(default_factory=list)
    skipped: str | None = None  # why nothing was done (another run holds the lock)

    @property
    def failed(self) -> list[StepResult]:
        return [r for r in self.results if r.outcome == "failed"]

    def to_json(self) -> dict[str, Any]:
        return {"now": self.now.isoformat(), "dry_run": self.dry_run,
                "skipped": self.skipped, "plan": [a.to_json() for a in self.plan],
                "results": [r.to_json() for r in self.results],
                "failed": len(self.failed)}


def run(fleet: Deps, now: datetime, *, dry_run: bool, jobs: Iterable[str] = JOBS,
        on_plan: Callable[[list[Action]], None] | None = None,
        on_step: Callable[[StepResult], None] | None = None) -> RunReport:
    """Plan, report the plan, then (unless dry_run) do it. Two concurrent runs never
    both act: the second one finds the lock taken and does nothing."""
    with fleet.records.advisory_lock(LOCK) as got:
        if not got:
            return RunReport(now, dry_run, [], skipped="another retention run is in progress")
        actions = make_plan(fleet, now, jobs)
        if on_plan is not None:
            on_plan(actions)
        report = RunReport(now, dry_run, actions)
        if dry_run:
            return report
        for action in actions:
            result = _execute(fleet, action, now)
            report.results.append(result)
            if on_step is not None:
                on_step(result)
        return report


def _execute(fleet: Deps, action: Action, now: datetime) -> StepResult:
    try:
        if action.kind == BLOCKED:
            fleet.records.audit("retention.blocked", tenant=action.tenant,
                                outcome="blocked", at=now, detail=action.detail)
            return StepResult(action, "blocked", action.detail)
        if action.kind == DELETE:
            assert action.tenant is not None
            return StepResult(action, *delete_tenant(fleet, action.tenant, now))
        if action.kind == PURGE:
            assert action.tenant is not None
            return StepResult(action, *purge_tenant(fleet, action.tenant, now))
        if action.kind == PRUNE:
            assert action.backup_id is not None
            fleet.backup_jobs.delete(action.backup_id, reason=action.detail, now=now)
            return StepResult(action, "done", f"backup {action.backup_id} pruned")
        if action.kind == AUDIT:
            return StepResult(action, "done", purge_audit(fleet, now))
        if action.kind == EXPIRE_GRANT:
            assert action.grant_id is not None
            why = action.detail.partition("tampered with: ")[2] or None
            return StepResult(action, "done", access.expire(fleet, action.grant_id,
                                                            tampered=why, now=now))
        raise AssertionError(action.kind)
    except Exception as exc:  # noqa: BLE001 - one step's failure never ends the run
        error = first_line(exc) if isinstance(exc, TenantctlError) else \
            f"unexpected {type(exc).__name__}: {first_line(exc)}"
        with contextlib.suppress(Exception):  # the catalog may be what failed
            fleet.records.audit(f"retention.{action.kind}", tenant=action.tenant,
                                outcome="failed", at=now, error=error)
        return StepResult(action, "failed", error)


def _recheck(tenant: TenantRecord, kind: str, now: datetime) -> tuple[str, str] | None:
    """Under the tenant's lock, ask the planner's own rule again (the plan may be
    stale): None when ``kind`` is still due, else the outcome to report."""
    action = tenant_action(_fact(tenant), now)
    if action is not None and action.kind == BLOCKED:
        return "blocked", action.detail
    if action is None or action.kind != kind:
        return "skipped", f"no longer due (state {tenant.state})"
    return None


def _destroy_key(tx: CatalogWrites, tenant: TenantRecord, now: datetime) -> None:
    """Crypto-shredding: the wrapped identity and the password go; the public half
    stays (it names which key the old backups were written to)."""
    tx.destroy_key(tenant.id, now)
    tx.delete_credential(tenant.id)


def delete_tenant(fleet: Deps, slug: str, now: datetime) -> tuple[str, str]:
    """Hold ended → verified final backup → database and roles dropped → deleted.
    Every check is made again under the tenant's lock: the plan may be stale."""
    with holding_tenant(fleet.records, slug):
        tenant = fleet.records.tenants.get(slug)
        if tenant.state == TenantState.deleted:
            return "skipped", "already deleted"
        if (stale := _recheck(tenant, DELETE, now)) is not None:
            return stale
        # It is being deleted: end every session in it first (a transaction holding
        # a lock would block the final backup; the login role can only read, so a
        # session opened since cannot block it again), and the backup's own lock
        # waits are bounded: a failure is this step's, with who held the lock.
        fleet.admin.terminate_other_sessions(tenant.server, tenant_names(slug).database)
        backup_id = _verified_final_backup(fleet, tenant, now)
        checkpoint("retention.final_backup")
        _drop_database_and_roles(fleet, tenant, "retention", now)
        checkpoint("retention.dropped_roles")
        purge_after = now + timedelta(days=fleet.cfg.lifecycle.purge_days)
        with fleet.records.transaction() as tx:
            # its database gone, it can be over no storage quota
            tx.update_tenant(tenant.id, state=states.target(Op.delete), deleted_at=now,
                             purge_after=purge_after, final_backup_id=backup_id,
                             over_quota=False, over_quota_since=None,
                             updated_at=now)
            tx.delete_credential(tenant.id)
            tx.audit("tenant.delete", tenant=slug, region=tenant.region, at=now,
                     final_backup=backup_id, purge_after=purge_after.isoformat())
        pooler.refresh(fleet, tenant.server, changed=slug)
    return "done", f"database and role dropped; final backup {backup_id}; " \
                   f"purge after {purge_after.date().isoformat()}"


def _drop_database_and_roles(fleet: Deps, tenant: TenantRecord, step: str,
                             now: datetime) -> None:
    """End the role's sessions, drop the database (only if it is ours: owned by the
    tenant's owner role) and the roles (only if they carry our marker)."""
    names = tenant_names(tenant.slug)  # from the slug, not from a catalog column
    marker = role_marker(tenant.id, tenant.slug)
    server, admin = tenant.server, fleet.admin
    if admin.database_owner(server, names.database) == names.owner_role:
        if admin.role_exists(server, names.login_role):
            admin.set_login(server, names.login_role, False)
        admin.drop_database(server, names.database)
    checkpoint(f"{step}.dropped_database")
    admin.drop_marked_roles(server, names, marker)

    access.drop_tenant_grants(fleet, tenant.id, now)  # support access never outlives its tenant


def erase_tenant(fleet: Deps, slug: str, reason: str, now: datetime) -> dict[str, Any]:
    """Erasure on request: no hold. The key is destroyed first, so from that moment
    every backup copy anywhere is unreadable; then sessions, database and roles
    go, then the objects. A crash anywhere: running erase again (or retention,
    which sees a deleted tenant whose purge is due now) finishes it."""
    reason = reason_text(reason)
    if not reason:
        raise InvalidInput(f"{FIELD} is required (it is audited)", field="reason")
    with holding_tenant(fleet.records, slug):
        tenant = fleet.records.tenants.get(slug)
        states.check(slug, Op.erase, tenant.state, legal_hold=tenant.legal_hold,
                     legal_hold_reason=tenant.legal_hold_reason)
        with fleet.records.transaction() as tx:
            _destroy_key(tx, tenant, now)
            tx.audit("tenant.erase.key_destroyed", tenant=slug, region=tenant.region,
                     at=now, reason=reason)
        checkpoint("erase.key_destroyed")
        _drop_database_and_roles(fleet, tenant, "erase", now)
        with fleet.records.transaction() as tx:
            tx.update_tenant(tenant.id, state=TenantState.deleted,
                             deleted_at=tenant.deleted_at or now, purge_after=now,
                             over_quota=False, over_quota_since=None,
                             updated_at=now)
        pooler.refresh(fleet, tenant.server, changed=slug)
        checkpoint("erase.dropped")
        removed = _delete_all_backups(fleet, tenant)
        with fleet.records.transaction() as tx:
            tx.update_tenant(tenant.id, state=states.target(Op.erase), purged_at=now,
                             updated_at=now)
            tx.audit("tenant.erase", tenant=slug, region=tenant.region, at=now,
                     reason=reason, objects_deleted=removed)
    return {"tenant": slug, "state": states.target(Op.erase).value, "objects_deleted": removed,
            "reason": reason}


def _verified_final_backup(fleet: Deps, tenant: TenantRecord, now: datetime) -> int:
    """The backup the deletion rests on: taken after writes stopped (the hold), and
    verified (checksum, decryption, archive listing), stamped with the run's
    ``now``. A re-run after a crash reuses it."""
    if tenant.final_backup_id is not None:
        row = fleet.backup_jobs.get(tenant.final_backup_id)
        if row.status == BackupStatus.completed and row.verified_at is not None:
            return row.id
    backup_id = fleet.backup_jobs.run(tenant.slug, kind="final", now=now)
    with fleet.records.transaction() as tx:
        tx.update_tenant(tenant.id, final_backup_id=backup_id, updated_at=now)
    fleet.backup_jobs.verify(backup_id, now)
    return backup_id


def purge_tenant(fleet: Deps, slug: str, now: datetime) -> tuple[str, str]:
    """purge_after passed → every backup object gone → key destroyed → purged."""
    with holding_tenant(fleet.records, slug):
        tenant = fleet.records.tenants.get(slug)
        if tenant.state == TenantState.purged:
            return "skipped", "already purged"
        if (stale := _recheck(tenant, PURGE, now)) is not None:
            return stale
        removed = _delete_all_backups(fleet, tenant)
        checkpoint("retention.backups_deleted")
        with fleet.records.transaction() as tx:
            _destroy_key(tx, tenant, now)
            checkpoint("retention.key_destroyed")  # a kill here rolls the txn back
            tx.update_tenant(tenant.id, state=states.target(Op.purge), purged_at=now,
                             updated_at=now)
            tx.audit("tenant.purge", tenant=slug, region=tenant.region, at=now,
                     objects_deleted=removed)
    return "done", f"{removed} backup objects deleted, key destroyed"


def _delete_all_backups(fleet: Deps, tenant: TenantRecord) -> int:
    """Every object under the tenant's prefix in its region's store (and wherever a
    catalog row says a backup was written), pending uploads aborted; then the
    rows say deleted."""
    rows = fleet.records.backups.of_tenant(tenant.id)
    prefix = f"tenants/{tenant.slug}/"
    removed = 0
    for url in dict.fromkeys([fleet.cfg.region(tenant.region).backup_store,
                              *(r.store_url for r in rows)]):
        store = fleet.open_store(url)
        for b in rows:
            if b.store_url == url and b.object_key:
                store.abort_uploads(b.object_key)
        for obj in list(store.objects(prefix)):
            store.delete(obj.key)
            removed += 1
    with fleet.records.transaction() as tx:
        tx.mark_backups_deleted(tenant.id)
    return removed


def purge_audit(fleet: Deps, now: datetime) -> str:
    cutoff = now - timedelta(days=fleet.cfg.lifecycle.audit_days)
    total = 0
    while True:  # in batches: one huge DELETE would hold locks and bloat WAL at once
        n = fleet.records.purge_audit_before(cutoff, AUDIT_BATCH)
        total += n
        if n < AUDIT_BATCH:
            break
    fleet.records.audit("audit.purge", at=now, deleted=total, before=cutoff.isoformat())
    return f"{total} audit records older than {cutoff.date().isoformat()} deleted"


# -- status --------------------------------------------------------------------------


def status(fleet: Deps, now: datetime, limit: int = 10) -> dict[str, Any]:
    """Tenants per state, the next deletions and purges, and what is overdue
    (timeliness.overdue_transition: a date passed more than an hour ago and the
    action not done): monitoring alerts on the latter."""

    def row(t: TenantRecord, col: str) -> dict[str, Any]:
        return {"tenant": t.slug, "region": t.region, "due_at": getattr(t, col).isoformat(),
                "legal_hold": t.legal_hold, "legal_hold_reason": t.legal_hold_reason}

    def overdue(state: str, col: str) -> list[dict[str, Any]]:
        # read among the due ones (partial indexes), judged by the one rule
        return [row(t, col) for t in fleet.records.tenants.due(state, col, now)
                if overdue_transition(state, t.hold_until, t.purge_after, t.legal_hold, now)]

    def upcoming(state: str, col: str) -> list[dict[str, Any]]:
        return [row(t, col) for t in fleet.records.tenants.dated(state, col, limit=limit)]

    counts = fleet.records.tenants.count_by_state()
    overdue_del = overdue(TenantState.cancelled, "hold_until")
    overdue_purge = overdue(TenantState.deleted, "purge_after")
    return {
        "now": now.isoformat(),
        "states": {st.value: counts.get(st.value, 0) for st in TenantState},
        "next_deletions": upcoming(TenantState.cancelled, "hold_until"),
        "next_purges": upcoming(TenantState.deleted, "purge_after"),
        "overdue": {"deletions": overdue_del, "purges": overdue_purge},
        "overdue_count": len(overdue_del) + len(overdue_purge),
    }
