"""Per-tenant age keys. The public half (recipient) encrypts backups; the private
half (identity) is stored only wrapped by the master key, and destroying it is
crypto-shredding: every backup copy of the tenant becomes unreadable."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pyrage
from sqlalchemy.orm import Session

from orchestrator.errors import Conflict, MasterKeyError
from orchestrator.masterkey import MasterKey
from orchestrator.models import TenantKey

if TYPE_CHECKING:
    from orchestrator.api import Fleet


def identity_context(slug: str) -> str:
    return f"tenant:{slug}:age-identity"


def key_id(recipient: str) -> str:
    return hashlib.sha256(recipient.encode()).hexdigest()[:16]


def new_key(master: MasterKey, tenant_id: int, slug: str) -> TenantKey:
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    return TenantKey(tenant_id=tenant_id, key_id=key_id(recipient), recipient=recipient,
                     identity_wrapped=master.wrap(str(identity).encode(),
                                                  identity_context(slug)),
                     master_key_id=master.key_id)


def ensure_key(fleet: Fleet, session: Session, tenant_id: int, slug: str) -> TenantKey:
    """The tenant's key, made now if the tenant predates keys. A destroyed key is
    refused: nothing is encrypted to a key whose identity is gone."""
    key = session.get(TenantKey, tenant_id)
    if key is not None and key.destroyed_at is not None:
        raise Conflict(key_destroyed(slug, key))
    if key is None:
        key = new_key(fleet.master_key, tenant_id, slug)
        session.add(key)
        session.flush()
    return key


def key_destroyed(slug: str, key: TenantKey) -> str:
    """The one-line refusal for a tenant whose key an unfinished erasure destroyed."""
    return (f"the key of tenant {slug!r} was destroyed ({key.destroyed_at:%Y-%m-%d}) by an "
            f"erasure that did not finish: re-run `tenantctl tenant erase {slug} --reason "
            "…` to finish it")


def identity(fleet: Fleet, key: TenantKey, slug: str) -> pyrage.x25519.Identity:
    if key.identity_wrapped is None:
        raise MasterKeyError(f"the key of tenant {slug!r} was destroyed "
                             f"({key.destroyed_at:%Y-%m-%d}); its backups are unreadable")
    text = fleet.master_key.unwrap(key.identity_wrapped, identity_context(slug)).decode()
    return pyrage.x25519.Identity.from_str(text)


def export_identity(fleet: Fleet, slug: str) -> str:
    """Break-glass: the tenant's age identity in clear, for `age -d -i`. Audited."""
    from orchestrator.errors import NotFound

    tenant = fleet.get_tenant(slug)
    with fleet.catalog.session() as s:
        key = s.get(TenantKey, tenant.id)
    if key is None:
        raise NotFound(f"tenant {slug!r} has no backup key yet")
    text = str(identity(fleet, key, slug))
    fleet.catalog.audit("backup.key.export", tenant=slug, region=tenant.region,
                        key_id=key.key_id)
    return text


def rotate_master(fleet: Fleet, new: MasterKey) -> dict[str, int]:
    """Re-wrap every tenant secret (age identities, login passwords) from the
    configured master key to ``new``, in one transaction: all or nothing. Backups
    are untouched (they are encrypted to the tenants' keys, not the master key).
    Values already wrapped by ``new`` (a re-run) are left as they are."""
    from sqlalchemy import select

    from orchestrator.models import Tenant, TenantCredential
    from orchestrator.provisioning import password_context

    old = fleet.master_key
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
        fleet.catalog.audit("keys.rotate_master", session=s, old=old.key_id,
                            new=new.key_id, counts=counts)
    return counts
