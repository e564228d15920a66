"""Per-tenant age keys. The public half (recipient) encrypts backups; the private
half (identity) is stored only wrapped by the master key, and destroying it is
crypto-shredding: every backup copy of the tenant becomes unreadable."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pyrage
from sqlalchemy import func, select, union_all
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from orchestrator.adapters.catalog.db import Catalog
from orchestrator.adapters.catalog.models import FleetSetting, TenantCredential, TenantKey
from orchestrator.adapters.crypto.masterkey import MasterKey
from orchestrator.domain.errors import Conflict, MasterKeyError, first_line
from orchestrator.domain.master_keys import fleet_key_elsewhere
from orchestrator.domain.master_keys import mixed_key_ids as mixed_key_ids  # keys.mixed_key_ids

if TYPE_CHECKING:
    from orchestrator.api import Fleet


# the id of the master key the catalog's secrets are wrapped by: adopted from the
# first key that wraps one, changed only by `keys rotate-master`
MASTER_KEY_SETTING = "master_key_id"


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


def writing_key(fleet: Fleet, session: Session) -> MasterKey:
    """The configured master key, for a secret stored in ``session``'s transaction,
    once the catalog agrees it is the fleet's: a stray key (another fleet's, a typo
    in the config) is refused before it wraps anything. A catalog that records no
    key adopts this one, unless secrets are already wrapped by others only. The row
    is read FOR SHARE: a concurrent `keys rotate-master` waits, or is waited for."""
    master = fleet.master_key
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
        key = new_key(writing_key(fleet, session), tenant_id, slug)
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
    from orchestrator.domain.errors import NotFound

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
    from orchestrator.adapters.catalog.models import Tenant
    from orchestrator.services.provisioning import password_context

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
        # from now on the new key is the fleet's: the old one wraps nothing more
        s.execute(pg_insert(FleetSetting).values(key=MASTER_KEY_SETTING, value=new.key_id)
                  .on_conflict_do_update(index_elements=[FleetSetting.key],
                                         set_={"value": new.key_id}))
        fleet.catalog.audit("keys.rotate_master", session=s, old=old.key_id,
                            new=new.key_id, counts=counts)
    return counts
