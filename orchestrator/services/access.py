"""Time-limited support access: a named person may see one tenant's data, with
approval (a reason), for a limited time, audited.

Each grant is a temporary login role on the tenant's server, `tenantctl_support_<id>`
(the name comes from the catalog id, never from user input), with CONNECT on
that one database only, SELECT on its tables (DML too with --read-write), and a
password that expires with the grant (VALID UNTIL): even if nothing ever runs
again, the grant cannot outlive its TTL. Revoke, `retention run` and the
scheduler drop expired roles and end their sessions; deleting or erasing the
tenant drops its grants with it. The password is shown once and never stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from orchestrator.adapters.catalog.audit import reason_text
from orchestrator.domain.durations import parse_duration
from orchestrator.domain.errors import (
    FIELD,
    Conflict,
    InvalidInput,
    NotFound,
    TenantctlError,
    first_line,
)
from orchestrator.domain.grants import settings, settings_changed
from orchestrator.domain.names import tenant_names
from orchestrator.domain.states import HAS_DATABASE, TenantState
from orchestrator.ports import GrantRecord, ServerOperationFailed

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

MAX_TTL = timedelta(days=7)


def parse_ttl(text: str, what: str = "ttl") -> timedelta:
    """How long a grant lasts: a duration of more than 0 and at most MAX_TTL."""
    return parse_duration(text, what, positive=True, at_most=MAX_TTL)


def role_name(grant_id: int) -> str:
    return f"tenantctl_support_{grant_id}"


def _marker(grant_id: int, slug: str) -> str:
    return f"tenantctl support grant {grant_id} for tenant {slug}"


def grant_json(g: GrantRecord, now: datetime) -> dict[str, Any]:
    status = ("revoked" if g.revoked_at else "dropped" if g.dropped_at
              else "expired" if g.expires_at <= now else "active")
    return {"id": g.id, "tenant": g.slug, "to": g.grantee, "role": g.role_name,
            "read_only": g.read_only, "reason": g.reason, "granted_by": g.actor,
            "created_at": g.created_at.isoformat() if g.created_at else None,
            "expires_at": g.expires_at.isoformat(), "status": status,
            "revoked_at": g.revoked_at.isoformat() if g.revoked_at else None}


def grant(fleet: Deps, slug: str, *, to: str, ttl: timedelta, reason: str,
          read_only: bool = True) -> dict[str, Any]:
    """Create the grant; returns it with the connection string (shown once)."""
    to, reason = to.strip(), reason_text(reason)
    if not to or len(to) > 200 or not to.isprintable():
        raise InvalidInput(f"{FIELD} must name the person (printable, at most 200 "
                           "characters)", field="to")
    if not reason:
        raise InvalidInput(f"{FIELD} is required (it is audited)", field="reason")
    tenant = fleet.records.tenants.get(slug)
    if tenant.state not in HAS_DATABASE:
        raise Conflict(f"tenant {slug!r} is {tenant.state}: it has no database to grant")
    if not read_only and tenant.state != TenantState.active:
        # a hold (or a suspension) keeps the data as it was: nobody writes to it
        raise Conflict(f"tenant {slug!r} is {tenant.state}: write access needs an active "
                       "tenant (read-only access is allowed)")
    now = fleet.clock.now()
    expires = now + ttl
    # the catalog row first: if we die before the role exists, expiry cleans up
    with fleet.records.transaction() as tx:
        grant_id = tx.add_grant(tenant_id=tenant.id, slug=slug, server=tenant.server,
                                grantee=to, reason=reason, read_only=read_only,
                                expires_at=expires)
        role = role_name(grant_id)
        tx.update_grant(grant_id, role_name=role)
    password = fleet.keys.new_password()
    fleet.admin.create_support_role(
        tenant.server, tenant_names(slug), role, password, comment=_marker(grant_id, slug),
        connection_limit=fleet.cfg.bounds.support_connection_limit, valid_until=expires,
        settings=settings(read_only), read_only=read_only)
    fleet.records.audit("access.grant", tenant=slug, region=tenant.region, grant=grant_id,
                        to=to, reason=reason, read_only=read_only,
                        expires_at=expires.isoformat())
    row = fleet.records.grants.get(grant_id)
    assert row is not None
    return {**grant_json(row, now), "dsn": fleet.tenant_dsn(tenant, password, role)}


def grants(fleet: Deps, *, include_ended: bool = False) -> list[dict[str, Any]]:
    now = fleet.clock.now()
    return [grant_json(g, now) for g in fleet.records.grants.listed(include_ended=include_ended)]


def drop_role(fleet: Deps, g: GrantRecord) -> None:
    """End the role's sessions first (whatever fails after), then what it owns goes to
    the tenant's owner role, its privileges go, and the role. Idempotent; the one
    way tenantctl drops a support role."""
    try:
        comment = fleet.admin.role_comment(g.server, g.role_name)
        if comment is None:  # no such role
            return
        if comment != _marker(g.id, g.slug):
            raise Conflict(f"role {g.role_name} on {g.server} is not grant {g.id}'s: "
                           "left alone")
        fleet.admin.lock_out_role(g.server, g.role_name)
        fleet.admin.drop_role_everywhere(g.server, g.role_name)
    except ServerOperationFailed as exc:
        raise TenantctlError(f"support grant {g.id}: dropping {g.role_name} on {g.server} "
                             f"failed: {first_line(exc)}") from None


def _end(fleet: Deps, g: GrantRecord, why: str, *, revoked: bool,
         now: datetime | None = None) -> None:
    drop_role(fleet, g)
    at = now or fleet.clock.now()
    values: dict[str, Any] = {"dropped_at": at}
    if revoked:
        values["revoked_at"] = at
    with fleet.records.transaction() as tx:
        tx.update_grant(g.id, **values)
        # a run's ``now`` (retention's expiry) also dates the record
        tx.audit(f"access.{why}", tenant=g.slug, at=now, grant=g.id, to=g.grantee)


def revoke(fleet: Deps, grant_id: int | None = None) -> list[int]:
    """Revoke one grant, or (None) every live one: sessions ended, role dropped."""
    if grant_id is not None:
        g = fleet.records.grants.get(grant_id)
        if g is None:
            raise NotFound(f"no support grant {grant_id}")
        if g.dropped_at is not None:
            raise Conflict(f"support grant {grant_id} has already ended")
        _end(fleet, g, "revoke", revoked=True)
        return [grant_id]
    res = revoke_all(fleet)
    if res.failed:
        gid, why = next(iter(res.failed.items()))
        raise TenantctlError(f"{len(res.failed)} support grant(s) not revoked (the others "
                             f"are), e.g. {gid}: {why}")
    return res.revoked


@dataclass
class RevokeAll:
    revoked: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # grant id -> why


def revoke_all(fleet: Deps) -> RevokeAll:
    """Every live grant (breach response): one grant's failure is reported, the
    others are revoked all the same."""
    result = RevokeAll()
    for g in fleet.records.grants.live():
        try:
            _end(fleet, g, "revoke", revoked=True)
            result.revoked.append(g.id)
        except TenantctlError as exc:
            result.failed[g.id] = first_line(exc)
    return result


def live(fleet: Deps) -> list[GrantRecord]:
    return fleet.records.grants.live()


def expired(fleet: Deps, now: datetime) -> list[GrantRecord]:
    return fleet.records.grants.live(expired_at=now)


def expire(fleet: Deps, grant_id: int, *, tampered: str | None = None,
           now: datetime | None = None) -> str:
    """End an expired grant, or (``tampered``: why) one whose role was changed; at
    ``now`` when a retention run ends it."""
    g = fleet.records.grants.get(grant_id)
    if g is None or g.dropped_at is not None:
        return "already ended"
    _end(fleet, g, "tampered" if tampered else "expire", revoked=bool(tampered), now=now)
    return f"role {g.role_name} of {g.grantee} dropped" + (
        f" (tampered with: {tampered})" if tampered else "")


def tampered(fleet: Deps) -> dict[int, str]:
    """Live grants whose role changed its own settings (a role may ALTER ROLE its own
    settings and password; only its settings can be seen by a non-superuser): grant
    id -> what changed. A server that cannot be read is skipped (doctor reports it)."""
    rows = live(fleet)
    by_server: dict[str, list[GrantRecord]] = {}
    for g in rows:
        by_server.setdefault(g.server, []).append(g)
    found: dict[int, str] = {}
    for server, grants_here in by_server.items():
        try:
            config = fleet.admin.role_settings(server, [g.role_name for g in grants_here])
        except TenantctlError:  # unreachable (ServerUnavailable) or failed
            continue
        for g in grants_here:
            why = settings_changed(config.get(g.role_name), g.read_only)
            if why is not None:
                found[g.id] = why
    return found


def end_write_grants(fleet: Deps, tenant_id: int) -> list[int]:
    """The tenant's hold began: its read-write grants end (the data stays as it was
    at cancellation); read-only ones go on."""
    rows = fleet.records.grants.live(tenant_id=tenant_id, read_write=True)
    for g in rows:
        _end(fleet, g, "hold", revoked=True)
    return [g.id for g in rows]


def drop_tenant_grants(fleet: Deps, tenant_id: int, now: datetime | None = None) -> None:
    """The tenant is going: its grants go with it (called with the database gone),
    dropped at ``now`` (the retention run's or the erasure's)."""
    for g in fleet.records.grants.live(tenant_id=tenant_id):
        drop_role(fleet, g)
        with fleet.records.transaction() as tx:
            tx.update_grant(g.id, dropped_at=now or fleet.clock.now())
