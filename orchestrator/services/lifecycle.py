"""Operator-driven lifecycle transitions of one tenant: cancel (start the hold),
reactivate, suspend, resume, legal hold. The timed ones (hold expired →
deleted → purged) belong to retention.

Each transition: check it is allowed (a pure function over the state), take
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

from sqlalchemy import select, update

from backups import service as pipeline
from backups.service import reap_dead
from orchestrator.adapters import clock
from orchestrator.adapters.catalog.audit import reason_text
from orchestrator.adapters.catalog.locks import holding_tenant
from orchestrator.adapters.catalog.models import CANCELLING, Backup, Tenant, TenantState
from orchestrator.adapters.faults import checkpoint
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.domain.errors import Conflict, InvalidInput, TenantctlError, first_line
from orchestrator.domain.names import tenant_names
from orchestrator.services import access

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

S = TenantState
F = TypeVar("F", bound=Callable[..., Any])
# action → states it may start from
ALLOWED: dict[str, tuple[str, ...]] = {
    "cancel": (S.active, S.suspended),
    "reactivate": (S.cancelled,),
    "suspend": (S.active,),
    "resume": (S.suspended,),
}


def transition_error(action: str, state: str, hold_until: datetime | None,
                     now: datetime) -> str | None:
    """Why ``action`` may not happen now, or None when it may."""
    if state not in ALLOWED[action]:
        allowed = " or ".join(ALLOWED[action])
        return f"is {state}; {action} needs it {allowed}"
    if action == "reactivate" and hold_until is not None and now >= hold_until:
        return (f"its hold ended at {hold_until.isoformat()}; it can no longer be "
                "reactivated (its database is due for deletion)")
    return None


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


def _locked_tenant(fleet: Deps, slug: str, action: str, now: datetime) -> Tenant:
    tenant = fleet.get_tenant(slug)
    why = transition_error(action, tenant.state, tenant.hold_until, now)
    if why is not None:
        raise Conflict(f"tenant {slug!r} {why}")
    return tenant


def _set(fleet: Deps, tenant: Tenant, action: str, audit: dict[str, Any] | None = None,
         **values: Any) -> None:
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.id == tenant.id).values(**values))
        detail = {k: (v.isoformat() if isinstance(v, datetime) else v)
                  for k, v in values.items()}
        fleet.catalog.audit(f"tenant.{action}", session=s, tenant=tenant.slug,
                            region=tenant.region, **{**detail, **(audit or {})})


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
                    fleet.catalog.audit(f"tenant.{action}", tenant=slug, outcome="refused",
                                        error=first_line(exc))
                raise
        return inner  # type: ignore[return-value]
    return wrap


@audited("cancel")
def cancel(fleet: Deps, slug: str, *, now: datetime | None = None,
           backup: bool = True) -> TransitionResult:
    """Start the hold: writes stop at once (reads and export go on), the database
    stays where it is until the hold ends; then a backup of the final data."""
    now = now or clock.utcnow()
    hold_until = now + timedelta(days=fleet.cfg.lifecycle.hold_days)
    with holding_tenant(fleet.catalog, slug):
        tenant = fleet.get_tenant(slug)
        # Cancelling again during the hold finishes what a crashed run left undone
        # (its backup) instead of failing: the command is idempotent.
        again = tenant.state == S.cancelled and tenant.hold_until is not None \
            and now < tenant.hold_until
        if not again:
            tenant = _locked_tenant(fleet, slug, "cancel", now)
            with fleet.catalog.session() as s, s.begin():
                s.execute(update(Tenant).where(Tenant.id == tenant.id).values(
                    step=CANCELLING))
            names = tenant_names(slug)
            admin = fleet.cfg.server(tenant.server).admin_dsn
            with pgserver.connect(admin, tenant.database, server=tenant.server,
                                  lock_timeout=fleet.cfg.lock_timeout) as conn:
                pgserver.restrict_to_reads(conn, names)
            checkpoint("cancel.restricted")
            with fleet.server_connection(tenant.server) as conn:
                pgserver.set_login(conn, names.login_role, True)  # a suspended one may export
            _set(fleet, tenant, "cancel", state=S.cancelled, cancelled_at=now,
                 hold_until=hold_until, suspended_at=None, step=None)
            checkpoint("cancel.state")
        else:
            hold_until = tenant.hold_until  # type: ignore[assignment]
        # Sessions opened before the hold may still hold locks (an idle transaction
        # that would block the backup) or writes about to commit: end them. A new
        # session can only read now, and reading blocks no backup.
        held = tenant_names(slug)
        with fleet.server_connection(tenant.server) as conn:
            pgserver.terminate_sessions(conn, role=held.login_role, database=held.database,
                                        wait=True)
        # a support role allowed to write (granted while active) would write on
        access.end_write_grants(fleet, tenant.id)
    result = TransitionResult(slug, "cancel", S.cancelled, hold_until)
    if again and _backed_up_since(fleet, tenant, tenant.cancelled_at):
        return result
    if backup:
        try:
            result.backup_id = pipeline.run_backup(fleet, slug, kind="cancel").id
        except TenantctlError as exc:
            # the cancellation stands; deletion takes its own verified backup anyway
            result.backup_error = first_line(exc)
    return result


def _backed_up_since(fleet: Deps, tenant: Tenant, since: datetime | None) -> bool:
    """A backup since the cancellation, done or being done by a live process (one a
    dead process left running is reaped first): a second cancel takes none."""
    reap_dead(fleet, tenant.slug)
    with fleet.catalog.session() as s:
        return s.scalar(select(Backup.id).where(
            Backup.tenant_id == tenant.id, Backup.status.in_(("completed", "running")),
            Backup.started_at >= since).limit(1)) is not None


@audited("reactivate")
def reactivate(fleet: Deps, slug: str, *, now: datetime | None = None) -> TransitionResult:
    now = now or clock.utcnow()
    with holding_tenant(fleet.catalog, slug):
        tenant = _locked_tenant(fleet, slug, "reactivate", now)
        names = tenant_names(slug)
        admin = fleet.cfg.server(tenant.server).admin_dsn
        with pgserver.connect(admin, tenant.database, server=tenant.server,
                              lock_timeout=fleet.cfg.lock_timeout) as conn:
            pgserver.secure_tenant_database(conn, names)  # gives the writes back
        with fleet.server_connection(tenant.server) as conn:
            pgserver.set_login(conn, names.login_role, True)
        _set(fleet, tenant, "reactivate", state=S.active, cancelled_at=None, hold_until=None)
    return TransitionResult(slug, "reactivate", S.active)


@audited("suspend")
def suspend(fleet: Deps, slug: str) -> TransitionResult:
    """Block every connection of the tenant's role (e.g. an unpaid invoice); no hold
    starts, nothing is deleted."""
    with holding_tenant(fleet.catalog, slug):
        tenant = _locked_tenant(fleet, slug, "suspend", clock.utcnow())
        with fleet.server_connection(tenant.server) as conn:
            pgserver.set_login(conn, tenant.login_role, False)
        _set(fleet, tenant, "suspend", state=S.suspended, suspended_at=clock.utcnow())
    return TransitionResult(slug, "suspend", S.suspended)


@audited("resume")
def resume(fleet: Deps, slug: str) -> TransitionResult:
    with holding_tenant(fleet.catalog, slug):
        tenant = _locked_tenant(fleet, slug, "resume", clock.utcnow())
        with fleet.server_connection(tenant.server) as conn:
            pgserver.set_login(conn, tenant.login_role, True)
        _set(fleet, tenant, "resume", state=S.active, suspended_at=None)
    return TransitionResult(slug, "resume", S.active)


@audited("legal_hold")
def legal_hold(fleet: Deps, slug: str, *, on: bool, reason: str) -> dict[str, Any]:
    """A legal hold blocks deletion and purge, whatever the dates say, until lifted."""
    reason = reason_text(reason)
    if not reason:
        raise InvalidInput("--reason is required: say why (it is audited)")
    tenant = fleet.get_tenant(slug)
    if tenant.state == S.purged:
        raise Conflict(f"tenant {slug!r} is purged: nothing is left to hold")
    with holding_tenant(fleet.catalog, slug):
        _set(fleet, tenant, "legal_hold." + ("on" if on else "off"), {"reason": reason},
             legal_hold=on, legal_hold_reason=reason if on else None)
    return {"tenant": slug, "legal_hold": on, "reason": reason}
