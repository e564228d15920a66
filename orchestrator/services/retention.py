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

from sqlalchemy import delete, func, select, update

from backups import service as pipeline
from backups.policy import RetentionPolicy
from backups.stores import open_store
from orchestrator.adapters.catalog.audit import reason_text
from orchestrator.adapters.catalog.locks import holding_tenant
from orchestrator.adapters.catalog.models import (
    AuditEvent,
    Backup,
    Tenant,
    TenantCredential,
    TenantKey,
    TenantState,
)
from orchestrator.adapters.faults import checkpoint
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.domain.errors import Conflict, ExitCode, InvalidInput, TenantctlError, first_line
from orchestrator.domain.jobs import STEPS, Job, parse_steps
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
from orchestrator.services import access

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

LOCK = "retention"
JOBS = STEPS  # every step of a run (orchestrator.domain.jobs)
OVERDUE_AFTER = timedelta(hours=1)


class RetentionError(TenantctlError):
    exit_code = ExitCode.RETENTION


# -- reading the facts ---------------------------------------------------------------


def due_tenant_facts(fleet: Deps, now: datetime) -> list[TenantFact]:
    """Only tenants whose hold or purge date has passed (partial indexes)."""
    cols = (Tenant.slug, Tenant.state, Tenant.hold_until, Tenant.purge_after,
            Tenant.legal_hold, Tenant.legal_hold_reason)
    with fleet.catalog.session() as s:
        rows = list(s.execute(select(*cols).where(
            Tenant.state == TenantState.cancelled, Tenant.hold_until <= now)))
        rows += s.execute(select(*cols).where(
            Tenant.state == TenantState.deleted, Tenant.purge_after <= now))
    return [TenantFact(*r) for r in rows]


def make_plan(fleet: Deps, now: datetime, jobs: Iterable[str] = JOBS) -> list[Action]:
    """The plan for these steps (Job members, or `--only` spellings)."""
    jobs = parse_steps(jobs)
    lc = fleet.cfg.lifecycle
    tenants = due_tenant_facts(fleet, now) if {Job.delete, Job.purge} & set(jobs) else []
    verdicts = []
    if Job.prune in jobs:
        policy = RetentionPolicy(fleet.cfg.backup_keep_days, fleet.cfg.backup_keep_weeks)
        verdicts = pipeline.prune_candidates(fleet, now, policy)
    audit_cutoff = now - timedelta(days=lc.audit_days)
    expired = 0
    if Job.audit_purge in jobs:
        with fleet.catalog.session() as s:
            expired = s.scalar(select(func.count()).select_from(AuditEvent)
                               .where(AuditEvent.at < audit_cutoff)) or 0
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
    with fleet.catalog.advisory_lock(LOCK) as got:
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
            fleet.catalog.audit("retention.blocked", tenant=action.tenant,
                                outcome="blocked", detail=action.detail)
            return StepResult(action, "blocked", action.detail)
        if action.kind == DELETE:
            assert action.tenant is not None
            return StepResult(action, *delete_tenant(fleet, action.tenant, now))
        if action.kind == PURGE:
            assert action.tenant is not None
            return StepResult(action, *purge_tenant(fleet, action.tenant, now))
        if action.kind == PRUNE:
            assert action.backup_id is not None
            pipeline.delete_backup(fleet, action.backup_id, reason=action.detail)
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
            fleet.catalog.audit(f"retention.{action.kind}", tenant=action.tenant,
                                outcome="failed", error=error)
        return StepResult(action, "failed", error)


def _recheck(tenant: Tenant, kind: str, now: datetime) -> tuple[str, str] | None:
    """Under the tenant's lock, ask the planner's own rule again (the plan may be
    stale): None when ``kind`` is still due, else the outcome to report."""
    action = tenant_action(TenantFact(tenant.slug, tenant.state, tenant.hold_until,
                                      tenant.purge_after, tenant.legal_hold,
                                      tenant.legal_hold_reason), now)
    if action is not None and action.kind == BLOCKED:
        return "blocked", action.detail
    if action is None or action.kind != kind:
        return "skipped", f"no longer due (state {tenant.state})"
    return None


def _destroy_key(s: Any, tenant: Tenant, now: datetime) -> None:
    """Crypto-shredding: the wrapped identity and the password go; the public half
    stays (it names which key the old backups were written to)."""
    s.execute(update(TenantKey).where(TenantKey.tenant_id == tenant.id).values(
        identity_wrapped=None, master_key_id=None, destroyed_at=now))
    s.execute(delete(TenantCredential).where(TenantCredential.tenant_id == tenant.id))


def delete_tenant(fleet: Deps, slug: str, now: datetime) -> tuple[str, str]:
    """Hold ended → verified final backup → database and roles dropped → deleted.
    Every check is made again under the tenant's lock: the plan may be stale."""
    with holding_tenant(fleet.catalog, slug):
        tenant = fleet.get_tenant(slug)
        if tenant.state == TenantState.deleted:
            return "skipped", "already deleted"
        if (stale := _recheck(tenant, DELETE, now)) is not None:
            return stale
        # It is being deleted: end every session in it first (a transaction holding
        # a lock would block the final backup; the login role can only read, so a
        # session opened since cannot block it again), and the backup's own lock
        # waits are bounded: a failure is this step's, with who held the lock.
        with fleet.server_connection(tenant.server) as conn:
            pgserver.terminate_other_sessions(conn, tenant_names(slug).database)
        backup_id = _verified_final_backup(fleet, tenant, now)
        checkpoint("retention.final_backup")
        _drop_database_and_roles(fleet, tenant, "retention", now)
        checkpoint("retention.dropped_roles")
        purge_after = now + timedelta(days=fleet.cfg.lifecycle.purge_days)
        with fleet.catalog.session() as s, s.begin():
            s.execute(update(Tenant).where(Tenant.id == tenant.id).values(
                state=TenantState.deleted, deleted_at=now, purge_after=purge_after,
                final_backup_id=backup_id))
            s.execute(delete(TenantCredential).where(TenantCredential.tenant_id == tenant.id))
            fleet.catalog.audit("tenant.delete", session=s, tenant=slug, region=tenant.region,
                                final_backup=backup_id, purge_after=purge_after.isoformat())
    return "done", f"database and role dropped; final backup {backup_id}; " \
                   f"purge after {purge_after.date().isoformat()}"


def _drop_database_and_roles(fleet: Deps, tenant: Tenant, step: str, now: datetime) -> None:
    """End the role's sessions, drop the database (only if it is ours: owned by the
    tenant's owner role) and the roles (only if they carry our marker)."""
    names = tenant_names(tenant.slug)  # from the slug, not from a catalog column
    marker = pgserver.role_marker(tenant.id, tenant.slug)
    with fleet.server_connection(tenant.server) as conn:
        if pgserver.database_owner(conn, names.database) == names.owner_role:
            if pgserver.role_exists(conn, names.login_role):
                pgserver.set_login(conn, names.login_role, False)
            pgserver.drop_database(conn, names.database)
        checkpoint(f"{step}.dropped_database")
        pgserver.drop_marked_roles(conn, names, marker)

    access.drop_tenant_grants(fleet, tenant.id, now)  # support access never outlives its tenant


ERASABLE = (TenantState.active, TenantState.suspended, TenantState.cancelled,
            TenantState.deleted)


def erase_tenant(fleet: Deps, slug: str, reason: str, now: datetime) -> dict[str, Any]:
    """Erasure on request: no hold. The key is destroyed first, so from that moment
    every backup copy anywhere is unreadable; then sessions, database and roles
    go, then the objects. A crash anywhere: running erase again (or retention,
    which sees a deleted tenant whose purge is due now) finishes it."""
    reason = reason_text(reason)
    if not reason:
        raise InvalidInput("--reason is required (it is audited)")
    with holding_tenant(fleet.catalog, slug):
        tenant = fleet.get_tenant(slug)
        if tenant.state == TenantState.purged:
            raise Conflict(f"tenant {slug!r} is already purged")
        if tenant.state not in ERASABLE:
            raise Conflict(f"tenant {slug!r} is {tenant.state}: finish or abandon its "
                           "provisioning first")
        if tenant.legal_hold:
            raise Conflict(f"tenant {slug!r} is under legal hold "
                           f"({tenant.legal_hold_reason}): erasure refused")
        with fleet.catalog.session() as s, s.begin():
            _destroy_key(s, tenant, now)
            fleet.catalog.audit("tenant.erase.key_destroyed", session=s, tenant=slug,
                                region=tenant.region, reason=reason)
        checkpoint("erase.key_destroyed")
        _drop_database_and_roles(fleet, tenant, "erase", now)
        with fleet.catalog.session() as s, s.begin():
            s.execute(update(Tenant).where(Tenant.id == tenant.id).values(
                state=TenantState.deleted, deleted_at=tenant.deleted_at or now,
                purge_after=now))
        checkpoint("erase.dropped")
        removed = _delete_all_backups(fleet, tenant)
        with fleet.catalog.session() as s, s.begin():
            s.execute(update(Tenant).where(Tenant.id == tenant.id).values(
                state=TenantState.purged, purged_at=now))
            fleet.catalog.audit("tenant.erase", session=s, tenant=slug, region=tenant.region,
                                reason=reason, objects_deleted=removed)
    return {"tenant": slug, "state": TenantState.purged.value, "objects_deleted": removed,
            "reason": reason}


def _verified_final_backup(fleet: Deps, tenant: Tenant, now: datetime) -> int:
    """The backup the deletion rests on: taken after writes stopped (the hold), and
    verified (checksum, decryption, archive listing), stamped with the run's
    ``now``. A re-run after a crash reuses it."""
    if tenant.final_backup_id is not None:
        row = pipeline.get_backup(fleet, tenant.final_backup_id)
        if row.status == "completed" and row.verified_at is not None:
            return row.id
    backup_id = pipeline.run_backup(fleet, tenant.slug, kind="final", now=now).id
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.id == tenant.id)
                  .values(final_backup_id=backup_id))
    pipeline.verify_backup(fleet, backup_id, now)
    return backup_id


def purge_tenant(fleet: Deps, slug: str, now: datetime) -> tuple[str, str]:
    """purge_after passed → every backup object gone → key destroyed → purged."""
    with holding_tenant(fleet.catalog, slug):
        tenant = fleet.get_tenant(slug)
        if tenant.state == TenantState.purged:
            return "skipped", "already purged"
        if (stale := _recheck(tenant, PURGE, now)) is not None:
            return stale
        removed = _delete_all_backups(fleet, tenant)
        checkpoint("retention.backups_deleted")
        with fleet.catalog.session() as s, s.begin():
            _destroy_key(s, tenant, now)
            checkpoint("retention.key_destroyed")  # a kill here rolls the txn back
            s.execute(update(Tenant).where(Tenant.id == tenant.id).values(
                state=TenantState.purged, purged_at=now))
            fleet.catalog.audit("tenant.purge", session=s, tenant=slug, region=tenant.region,
                                objects_deleted=removed)
    return "done", f"{removed} backup objects deleted, key destroyed"


def _delete_all_backups(fleet: Deps, tenant: Tenant) -> int:
    """Every object under the tenant's prefix in its region's store (and wherever a
    catalog row says a backup was written), pending uploads aborted; then the
    rows say deleted."""
    with fleet.catalog.session() as s:
        rows = list(s.scalars(select(Backup).where(Backup.tenant_id == tenant.id)))
    prefix = f"tenants/{tenant.slug}/"
    removed = 0
    for url in dict.fromkeys([fleet.cfg.region(tenant.region).backup_store,
                              *(r.store_url for r in rows)]):
        store = open_store(url)
        for b in rows:
            if b.store_url == url and b.object_key:
                store.abort_uploads(b.object_key)
        for obj in list(store.objects(prefix)):
            store.delete(obj.key)
            removed += 1
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(Backup).where(Backup.tenant_id == tenant.id,
                                       Backup.status != "deleted")
                  .values(status="deleted"))
    return removed


def purge_audit(fleet: Deps, now: datetime) -> str:
    cutoff = now - timedelta(days=fleet.cfg.lifecycle.audit_days)
    total = 0
    while True:  # in batches: one huge DELETE would hold locks and bloat WAL at once
        with fleet.catalog.session() as s, s.begin():
            ids = select(AuditEvent.id).where(AuditEvent.at < cutoff).limit(10_000)
            n = s.execute(delete(AuditEvent).where(AuditEvent.id.in_(ids))).rowcount  # type: ignore[attr-defined]
        total += n
        if n < 10_000:
            break
    fleet.catalog.audit("audit.purge", deleted=total, before=cutoff.isoformat())
    return f"{total} audit records older than {cutoff.date().isoformat()} deleted"


# -- status --------------------------------------------------------------------------


def status(fleet: Deps, now: datetime, limit: int = 10) -> dict[str, Any]:
    """Tenants per state, the next deletions and purges, and what is overdue (a
    date passed more than an hour ago and the action not done): monitoring alerts
    on the latter."""
    late = now - OVERDUE_AFTER

    def rows(state: str, col: Any, where: Any, n: int | None) -> list[dict[str, Any]]:
        q = (select(Tenant.slug, Tenant.region, col, Tenant.legal_hold,
                    Tenant.legal_hold_reason)
             .where(Tenant.state == state, where).order_by(col))
        with fleet.catalog.session() as s:
            found = s.execute(q.limit(n) if n else q).all()
        return [{"tenant": r[0], "region": r[1], "due_at": r[2].isoformat(),
                 "legal_hold": r[3], "legal_hold_reason": r[4]} for r in found]

    with fleet.catalog.session() as s:
        counts = dict(s.execute(select(Tenant.state, func.count()).group_by(Tenant.state)).all())
    overdue_del = [r for r in rows(TenantState.cancelled, Tenant.hold_until,
                                   Tenant.hold_until < late, None) if not r["legal_hold"]]
    overdue_purge = [r for r in rows(TenantState.deleted, Tenant.purge_after,
                                     Tenant.purge_after < late, None) if not r["legal_hold"]]
    return {
        "now": now.isoformat(),
        "states": {st.value: counts.get(st.value, 0) for st in TenantState},
        "next_deletions": rows(TenantState.cancelled, Tenant.hold_until,
                               Tenant.hold_until.is_not(None), limit),
        "next_purges": rows(TenantState.deleted, Tenant.purge_after,
                            Tenant.purge_after.is_not(None), limit),
        "overdue": {"deletions": overdue_del, "purges": overdue_purge},
        "overdue_count": len(overdue_del) + len(overdue_purge),
    }
