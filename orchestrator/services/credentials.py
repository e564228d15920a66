"""Credentials: a tenant's connection string, password rotation (one tenant), the
master key's rotation and the break-glass export of a tenant's backup key."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from orchestrator.adapters import clock
from orchestrator.adapters.catalog.locks import holding_tenant
from orchestrator.adapters.catalog.models import (
    UNSHOWN,
    FleetSetting,
    Tenant,
    TenantCredential,
    TenantKey,
)
from orchestrator.adapters.faults import checkpoint
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.bootstrap import Deps
from orchestrator.domain.errors import Conflict, NotFound
from orchestrator.domain.master_keys import MASTER_KEY_SETTING, identity_context, key_destroyed
from orchestrator.domain.names import password_context
from orchestrator.domain.states import HAS_DATABASE
from orchestrator.ports import SecretWrapper
from orchestrator.services import pooler


def credentials(fleet: Deps, slug: str, *, rotate: bool = False,
                kill_sessions: bool = False, direct: bool = False) -> str:
    """The tenant's connection string; with ``rotate``, after changing the password
    (and, with ``kill_sessions``, ending the sessions opened with the old one).
    The new password is stored (wrapped) before the role gets it, so a crash in
    between leaves a pending password that the next call applies. ``direct``: the
    server's address even when a pooler stands in front of it."""
    tenant = fleet.get_tenant(slug)
    if tenant.state not in HAS_DATABASE:
        raise Conflict(f"tenant {slug!r} is {tenant.state}: it has no usable credentials")
    cred = tenant.credential
    if cred is None:  # only an erasure removes it, with the key, before the database
        with fleet.catalog.session() as s:
            key = s.get(TenantKey, tenant.id)
        raise Conflict(key_destroyed(slug, key.destroyed_at) if key is not None
                       and key.destroyed_at is not None
                       else f"tenant {slug!r} has no stored password")
    ctx = password_context(slug)
    if rotate:
        dsn = _rotate(fleet, tenant, ctx, direct=direct)
        if kill_sessions:
            with fleet.server_connection(tenant.server) as conn:
                pgserver.terminate_sessions(conn, role=tenant.login_role)
        return dsn
    password = fleet.keys.master.unwrap(cred.password_wrapped, ctx).decode()
    if cred.applied_at is None:  # a rotation that died half-way: finish it
        return _rotate(fleet, tenant, ctx, password, direct=direct)
    fleet.catalog.audit("tenant.credentials.show", tenant=slug, region=tenant.region)
    dsn = fleet.tenant_dsn(tenant, password, direct=direct)
    if tenant.step == UNSHOWN:
        fleet.credentials_shown(slug)
    return dsn


def _rotate(fleet: Deps, tenant: Tenant, ctx: str, password: str | None = None, *,
            direct: bool = False) -> str:
    """Store the new password (wrapped) first, then give it to the role, under the
    tenant's lock so two rotations cannot cross."""
    slug = tenant.slug
    with holding_tenant(fleet.catalog, slug):
        pending = password is not None
        password = password or fleet.keys.new_password()
        if not pending:
            with fleet.catalog.session() as s, s.begin():
                master = fleet.keys.writing_key(s)
                s.execute(update(TenantCredential)
                          .where(TenantCredential.tenant_id == tenant.id)
                          .values(password_wrapped=master.wrap(password.encode(), ctx),
                                  master_key_id=master.key_id, applied_at=None))
            checkpoint("credentials.stored")
        with fleet.server_connection(tenant.server) as conn:
            pgserver.set_password(conn, tenant.login_role, password)
        with fleet.catalog.session() as s, s.begin():
            s.execute(update(TenantCredential)
                      .where(TenantCredential.tenant_id == tenant.id)
                      .values(applied_at=clock.utcnow()))
        # the pooler's auth file gets the new verifier at once (the old one refused)
        pooler.refresh(fleet, tenant.server, changed=slug)
    fleet.catalog.audit("tenant.credentials.rotate", tenant=slug, region=tenant.region)
    return fleet.tenant_dsn(tenant, password, direct=direct)


def export_identity(fleet: Deps, slug: str) -> str:
    """Break-glass: the tenant's age identity in clear, for `age -d -i`. Audited."""
    tenant = fleet.get_tenant(slug)
    with fleet.catalog.session() as s:
        key = s.get(TenantKey, tenant.id)
    if key is None:
        raise NotFound(f"tenant {slug!r} has no backup key yet")
    text = str(fleet.keys.identity(key, slug))
    fleet.catalog.audit("backup.key.export", tenant=slug, region=tenant.region,
                        key_id=key.key_id)
    return text


def rotate_master_plan(fleet: Deps, new: SecretWrapper) -> dict[str, int]:
    """What rotate_master(new) would re-wrap, counted, nothing changed: for its
    confirmation and --dry-run."""
    with fleet.catalog.session() as s:
        def count(model: type[TenantKey] | type[TenantCredential], *where: Any) -> int:
            return s.scalar(select(func.count()).select_from(model).where(*where)) or 0

        stale_key = TenantKey.master_key_id.is_distinct_from(new.key_id)
        stale_cred = TenantCredential.master_key_id.is_distinct_from(new.key_id)
        identities = count(TenantKey, TenantKey.identity_wrapped.is_not(None), stale_key)
        passwords = count(TenantCredential, stale_cred)
        done = count(TenantKey, TenantKey.identity_wrapped.is_not(None), ~stale_key) + \
            count(TenantCredential, ~stale_cred)
    return {"identities": identities, "passwords": passwords, "already_rotated": done}


def rotate_master(fleet: Deps, new: SecretWrapper) -> dict[str, int]:
    """Re-wrap every tenant secret (age identities, login passwords) from the
    configured master key to ``new``, in one transaction: all or nothing. Backups
    are untouched (they are encrypted to the tenants' keys, not the master key).
    Values already wrapped by ``new`` (a re-run) are left as they are."""
    old = fleet.keys.master
    counts = {"identities": 0, "passwords": 0, "already_rotated": 0}
    with fleet.catalog.session() as s, s.begin():
        slugs = dict(s.execute(select(Tenant.id, Tenant.slug)).all())
        for key in s.scalars(select(TenantKey).where(TenantKey.identity_wrapped.is_not(None))
                             .with_for_update()):
            ctx = identity_context(slugs[key.tenant_id])
            if key.master_key_id == new.key_id:
                counts["already_rotated"] += 1
                continue
            key.identity_wrapped = new.wrap(old.unwrap(key.identity_wrapped or "", ctx), ctx)
            key.master_key_id = new.key_id
            counts["identities"] += 1
        for cred in s.scalars(select(TenantCredential).with_for_update()):
            ctx = password_context(slugs[cred.tenant_id])
            if cred.master_key_id == new.key_id:
                counts["already_rotated"] += 1
                continue
            cred.password_wrapped = new.wrap(old.unwrap(cred.password_wrapped, ctx), ctx)
            cred.master_key_id = new.key_id
            counts["passwords"] += 1
        # from now on the new key is the fleet's: the old one wraps nothing more
        s.execute(pg_insert(FleetSetting).values(key=MASTER_KEY_SETTING, value=new.key_id)
                  .on_conflict_do_update(index_elements=[FleetSetting.key],
                                         set_={"value": new.key_id}))
        fleet.catalog.audit("keys.rotate_master", session=s, old=old.key_id,
                            new=new.key_id, counts=counts)
    return counts
