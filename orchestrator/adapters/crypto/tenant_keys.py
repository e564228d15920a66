"""Per-tenant age keys. The public half (recipient) encrypts backups; the private
half (identity) is stored only wrapped by the master key, and destroying it is
crypto-shredding: every backup copy of the tenant becomes unreadable.
``CatalogKeyVault`` is the key vault port (``ports.KeyVault``, ``deps.keys``) over
these functions and the configured master key."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from typing import Any

import pyrage
from sqlalchemy import func, select, union_all
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from orchestrator.adapters.catalog.db import Catalog
from orchestrator.adapters.catalog.models import FleetSetting, TenantCredential, TenantKey
from orchestrator.domain import master_keys
from orchestrator.domain.errors import Conflict, MasterKeyError, first_line
from orchestrator.domain.master_keys import MASTER_KEY_SETTING as MASTER_KEY_SETTING
from orchestrator.domain.master_keys import fleet_key_elsewhere
from orchestrator.domain.master_keys import identity_context as identity_context
from orchestrator.domain.master_keys import mixed_key_ids as mixed_key_ids  # keys.mixed_key_ids
from orchestrator.ports import SecretWrapper


def wrapped_key_ids(session: Session) -> dict[str, int]:
    """How many stored secrets (login passwords, live age identities) each master
    key id wraps: more than one id means some were wrapped under a stray key."""
    both = union_all(
        select(TenantCredential.master_key_id.label("key_id")),
        select(TenantKey.master_key_id.label("key_id"))
        .where(TenantKey.identity_wrapped.is_not(None))).subquery()
    return {str(k): n for k, n in session.execute(
        select(both.c.key_id, func.count()).group_by(both.c.key_id)).all()}


def catalog_key_id(session: Session) -> str | None:
    """The fleet's master key id as the catalog records it (None: not yet adopted)."""
    return session.scalar(select(FleetSetting.value)
                          .where(FleetSetting.key == MASTER_KEY_SETTING))


def not_the_fleets_key(configured: str, catalog: str) -> MasterKeyError:
    return MasterKeyError(f"the configured master key {configured} is not this fleet's "
                          f"(the catalog's secrets are wrapped by master key {catalog}); "
                          "refusing to wrap new secrets under it: point [master_key] "
                          "at the fleet's key")


def catalog_view(catalog: Catalog) -> tuple[str | None, dict[str, int]] | str:
    """(the fleet's key id as recorded, stored secrets per wrapping key id) read from
    the catalog, or why the catalog could not be read (not reachable, not created)."""
    try:
        with catalog.session() as s:
            return catalog_key_id(s), wrapped_key_ids(s)
    except SQLAlchemyError as exc:
        return first_line(exc)


def writing_key(master: SecretWrapper, session: Session) -> SecretWrapper:
    """The configured master key, for a secret stored in ``session``'s transaction,
    once the catalog agrees it is the fleet's: a stray key (another fleet's, a typo
    in the config) is refused before it wraps anything. A catalog that records no
    key adopts this one, unless secrets are already wrapped by others only. The row
    is read FOR SHARE: a concurrent `keys rotate-master` waits, or is waited for."""
    setting = select(FleetSetting.value).where(
        FleetSetting.key == MASTER_KEY_SETTING).with_for_update(read=True)
    current = session.scalar(setting)
    if current is None:
        fleets = fleet_key_elsewhere(master.key_id, None, wrapped_key_ids(session))
        if fleets is not None:
            raise not_the_fleets_key(master.key_id, fleets)
        session.execute(pg_insert(FleetSetting).values(key=MASTER_KEY_SETTING,
                                                       value=master.key_id)
                        .on_conflict_do_nothing())
        current = session.scalar(setting)
    if current != master.key_id:
        raise not_the_fleets_key(master.key_id, str(current))
    return master


def new_password() -> str:
    return secrets.token_urlsafe(32)  # 32 random bytes


def key_id(recipient: str) -> str:
    return hashlib.sha256(recipient.encode()).hexdigest()[:16]


def new_key(master: SecretWrapper, tenant_id: int, slug: str) -> TenantKey:
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    return TenantKey(tenant_id=tenant_id, key_id=key_id(recipient), recipient=recipient,
                     identity_wrapped=master.wrap(str(identity).encode(),
                                                  identity_context(slug)),
                     master_key_id=master.key_id)


def ensure_key(master: SecretWrapper, session: Session, tenant_id: int, slug: str
               ) -> TenantKey:
    """The tenant's key, made now if the tenant predates keys. A destroyed key is
    refused: nothing is encrypted to a key whose identity is gone."""
    key = session.get(TenantKey, tenant_id)
    if key is not None and key.destroyed_at is not None:
        raise Conflict(key_destroyed(slug, key))
    if key is None:
        key = new_key(writing_key(master, session), tenant_id, slug)
        session.add(key)
        session.flush()
    return key


def key_destroyed(slug: str, key: TenantKey) -> str:
    """The one-line refusal for a tenant whose key an unfinished erasure destroyed."""
    return master_keys.key_destroyed(slug, key.destroyed_at)


def identity(master: SecretWrapper, key: Any, slug: str) -> pyrage.x25519.Identity:
    if key.identity_wrapped is None:
        raise MasterKeyError(f"the key of tenant {slug!r} was destroyed "
                             f"({key.destroyed_at:%Y-%m-%d}); its backups are unreadable")
    text = master.unwrap(key.identity_wrapped, identity_context(slug)).decode()
    return pyrage.x25519.Identity.from_str(text)


class CatalogKeyVault:
    """``ports.KeyVault``: the configured master key (loaded by ``load`` when first
    needed: a missing key fails only what needs it) and the tenant keys the catalog
    stores wrapped by it."""

    def __init__(self, load: Callable[[], SecretWrapper]) -> None:
        self._load = load

    @property
    def master(self) -> SecretWrapper:
        return self._load()

    def new_password(self) -> str:
        return new_password()

    def writing_key(self, session: Session) -> SecretWrapper:
        return writing_key(self.master, session)

    def new_key(self, master: SecretWrapper, tenant_id: int, slug: str) -> TenantKey:
        return new_key(master, tenant_id, slug)

    def ensure_key(self, session: Session, tenant_id: int, slug: str) -> TenantKey:
        return ensure_key(self.master, session, tenant_id, slug)

    def identity(self, key: Any, slug: str) -> pyrage.x25519.Identity:
        return identity(self.master, key, slug)

    def catalog_key_id(self, session: Session) -> str | None:
        return catalog_key_id(session)

    def wrapped_key_ids(self, session: Session) -> dict[str, int]:
        return wrapped_key_ids(session)
