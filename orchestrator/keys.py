"""Per-tenant age keys. The public half (recipient) encrypts backups; the private
half (identity) is stored only wrapped by the master key, and destroying it is
crypto-shredding: every backup copy of the tenant becomes unreadable."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pyrage
from sqlalchemy.orm import Session

from orchestrator.errors import MasterKeyError
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
    """The tenant's key, made now if the tenant predates keys."""
    key = session.get(TenantKey, tenant_id)
    if key is None:
        key = new_key(fleet.master_key, tenant_id, slug)
        session.add(key)
        session.flush()
    return key


def identity(fleet: Fleet, key: TenantKey, slug: str) -> pyrage.x25519.Identity:
    if key.identity_wrapped is None:
        raise MasterKeyError(f"the key of tenant {slug!r} was destroyed "
                             f"({key.destroyed_at:%Y-%m-%d}); its backups are unreadable")
    text = fleet.master_key.unwrap(key.identity_wrapped, identity_context(slug)).decode()
    return pyrage.x25519.Identity.from_str(text)
