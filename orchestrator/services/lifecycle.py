"""Operator-driven lifecycle transitions of one tenant: cancel (start the hold),
reactivate, suspend, resume, legal hold. The timed ones (hold expired →
deleted → purged) belong to retention.

Each transition: check it is allowed (domain.states, the one state graph), take
the tenant's lock, change the server (privileges, LOGIN), then the catalog,
audited. The server change is idempotent, so a crash between the two is
finished by running the same command again.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from orchestrator.adapters.catalog.audit import reason_text
from orchestrator.adapters.catalog.locks import holding_tenant
from orchestrator.adapters.faults import checkpoint
from orchestrator.domain import states
from orchestrator.domain.errors import FIELD, InvalidInput, TenantctlError, first_line
from orchestrator.domain.names import tenant_names
from orchestrator.domain.states import CANCELLING, Op
from orchestrator.domain.statuses import BackupStatus
from orchestrator.ports import TenantRecord
from orchestrator.services import access, pooler

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class TransitionResult:
    tenant: str
    action: str
    state: str
    hold_until: datetime | None = None
    backup_id: int | None = None
    backup_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "action": self.action, "state": self.state,
                "hold_until": self.hold_until.isoformat() if self.hold_until else None,
                "backup_id": self.backup_id, "backup_error": self.backup_error}


def _locked_tenant(fleet: Deps, slug: str, action: str, now: datetime) -> TenantRecord:
    tenant = fleet.records.tenants.get(slug)
    states.check(slug, Op(action), tenant.state, now=now, hold_until=tenant.hold_until)
    return tenant


def _set(fleet: Deps, tenant: TenantRecord, action: str, audit: dict[str, Any] | None = None,
         **values: Any) -> None:
    with fleet.records.transaction() as tx:
        tx.update_tenant(tenant.id, **values)
        detail = {k: (v.isoformat() if isinstance(v, datetime) else v)
                  for k, v in values.items()}
        tx.audit(f"tenant.{action}", tenant=tenant.slug, region=tenant.region,
                 **{**detail, **(audit or {})})


def audited(action: str) -> Callable[[F], F]:
    """Refusals are audited too (outcome refused, with the reason): the log shows
    who tried what, not only what succeeded."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(fleet: Deps, slug: str, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(fleet, slug, *args, **kwargs)
            except TenantctlError as exc:
                with contextlib.suppress(Exception):  # the catalog may be what failed
                    fleet.records.audit(f"tenant.{action}", tenant=slug, outcome="refused",
                                        error=first_line(exc))
                raise
        return inner  # type: ignore[return-value]
    return wrap


@audited("cancel")
def cancel(fleet: Deps, slug: str, *, now: datetime | None = None,
           backup: bool = True) -> TransitionResult:
    """Start the hold: writes stop at once (reads and export go on), the database
    stays where it is until the hold ends; then a backup of the final data."""
    now = now or fleet.clock.now()
    hold_until = now + timedelta(days=fleet.cfg.lifecycle.hold_days)
    with holding_tenant(fleet.records, slug):
        tenant = fleet.records.tenants.get(slug)
        # Cancelling again during the hold finishes what a crashed run left undone
        # (its backup) instead of failing: the command is idempotent.
        again = states.cancel_retry(tenant.state, tenant.hold_until, now)
        if not again:  # the row read under the lock above: not read a second time
            states.check(slug, Op.cancel, tenant.state, now=now, hold_until=tenant.hold_until)
            with fleet.records.transaction() as tx:
                tx.update_tenant(tenant.id, step=CANCELLING)
            names = tenant_names(slug)
            fleet.admin.restrict_to_reads(tenant.server, names)
            checkpoint("cancel.restricted")
            # a suspended one may export
            fleet.admin.set_login(tenant.server, names.login_role, True)
            _set(fleet, tenant, "cancel", state=states.target(Op.cancel), cancelled_at=now,
                 hold_until=hold_until, suspended_at=None, step=None)
            checkpoint("cancel.state")
            pooler.refresh(fleet, tenant.server, changed=slug)  # off the pooler's list
        else:
            hold_until = tenant.hold_until  # type: ignore[assignment]
        # Sessions opened before the hold may still hold locks (an idle transaction
        # that would block the backup) or writes about to commit: end them. A new
        # session can only read now, and reading blocks no backup.
        held = tenant_names(slug)
        fleet.admin.terminate_sessions(tenant.server, role=held.login_role,
                                       database=held.database, wait=True)
        # a support role allowed to write (granted while active) would write on
        access.end_write_grants(fleet, tenant.id)
    result = TransitionResult(slug, "cancel", states.target(Op.cancel), hold_until)
    if again and _backed_up_since(fleet, tenant, tenant.cancelled_at):
        return result
    if backup:
        try:
            result.backup_id = fleet.backup_jobs.run(slug, kind="cancel")
        except TenantctlError as exc:
            # the cancellation stands; deletion takes its own verified backup anyway
            result.backup_error = first_line(exc)
    return result


def _backed_up_since(fleet: Deps, tenant: TenantRecord, since: datetime | None) -> bool:
    """A backup since the cancellation, done or being done by a live process (one a
    dead process left running is reaped first): a second cancel takes none."""
    fleet.backup_jobs.reap_dead(tenant.slug)
    return fleet.records.backups.any_since(
        tenant.id, since, (BackupStatus.completed, BackupStatus.running))


@audited("reactivate")
def reactivate(fleet: Deps, slug: str, *, now: datetime | None = None) -> TransitionResult:
    now = now or fleet.clock.now()
    with holding_tenant(fleet.records, slug):
        tenant = _locked_tenant(fleet, slug, "reactivate", now)
        names = tenant_names(slug)
        if not tenant.over_quota:  # else the quota keeps them until it releases it
            fleet.admin.secure_tenant_database(tenant.server, names)  # the writes back
        fleet.admin.set_login(tenant.server, names.login_role, True)
        _set(fleet, tenant, "reactivate", state=states.target(Op.reactivate),
             cancelled_at=None, hold_until=None)
        pooler.refresh(fleet, tenant.server, changed=slug)
    return TransitionResult(slug, "reactivate", states.target(Op.reactivate))


@audited("suspend")
def suspend(fleet: Deps, slug: str) -> TransitionResult:
    """Block every connection of the tenant's role (e.g. an unpaid invoice); no hold
    starts, nothing is deleted."""
    now = fleet.clock.now()
    with holding_tenant(fleet.records, slug):
        tenant = _locked_tenant(fleet, slug, "suspend", now)
        fleet.admin.set_login(tenant.server, tenant.login_role, False)
        _set(fleet, tenant, "suspend", state=states.target(Op.suspend), suspended_at=now)
        # refused at the pooler too: off its list, its pooled clients ended
        pooler.refresh(fleet, tenant.server, changed=slug)
    return TransitionResult(slug, "suspend", states.target(Op.suspend))


@audited("resume")
def resume(fleet: Deps, slug: str) -> TransitionResult:
    with holding_tenant(fleet.records, slug):
        tenant = _locked_tenant(fleet, slug, "resume", fleet.clock.now())
        fleet.admin.set_login(tenant.server, tenant.login_role, True)
        _set(fleet, tenant, "resume", state=states.target(Op.resume), suspended_at=None)
        pooler.refresh(fleet, tenant.server, changed=slug)
    return TransitionResult(slug, "resume", states.target(Op.resume))


@audited("legal_hold")
def legal_hold(fleet: Deps, slug: str, *, on: bool, reason: str) -> dict[str, Any]:
    """A legal hold blocks deletion and purge, whatever the dates say, until lifted."""
    reason = reason_text(reason)
    if not reason:
        raise InvalidInput(f"{FIELD} is required: say why (it is audited)", field="reason")
    tenant = fleet.records.tenants.get(slug)
    states.check(slug, Op.legal_hold, tenant.state)
    with holding_tenant(fleet.records, slug):
        _set(fleet, tenant, "legal_hold." + ("on" if on else "off"), {"reason": reason},
             legal_hold=on, legal_hold_reason=reason if on else None)
    return {"tenant": slug, "legal_hold": on, "reason": reason}
