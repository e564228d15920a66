"""Tenant slugs and the Postgres names derived from them.

A slug is validated once, here; every Postgres identifier built from it is
then quoted with psycopg.sql.Identifier anyway (belt and braces).
The prefixes differ for database/login role and owner role, so no slug can
produce another tenant's owner name (``tenant_<slug>`` vs ``owner_<slug>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from orchestrator.domain.errors import CatalogIntegrityError, InvalidInput

SLUG_RE = re.compile(r"[a-z][a-z0-9_]{2,39}", re.ASCII)  # always fullmatch: `$` allows "\n"
CATALOG_DB = "tenantctl_catalog"
TEMPLATE_DB = "tenantctl_template"
TEMPLATE_OWNER = "tenantctl_template_owner"
ADMIN_ROLE = "tenantctl_admin"

RESERVED = frozenset({
    "postgres", "template0", "template1", "public", "admin", "root", "tenantctl",
    CATALOG_DB, TEMPLATE_DB, TEMPLATE_OWNER, ADMIN_ROLE,
})
RESERVED_PREFIXES = ("pg_", "tenantctl")


def validate_slug(slug: str) -> str:
    shown = slug if len(slug) <= 60 and slug.isprintable() else repr(slug[:60]) + "…"
    if not SLUG_RE.fullmatch(slug):
        raise InvalidInput(
            f"invalid slug {shown!r}: use 3-40 lower-case letters, digits or '_', "
            "starting with a letter"
        )
    if slug in RESERVED or slug.startswith(RESERVED_PREFIXES):
        raise InvalidInput(f"invalid slug {slug!r}: reserved name")
    return slug


@dataclass(frozen=True)
class TenantNames:
    database: str
    login_role: str
    owner_role: str


def tenant_names(slug: str) -> TenantNames:
    validate_slug(slug)
    return TenantNames(
        database=f"tenant_{slug}",
        login_role=f"tenant_{slug}",
        owner_role=f"owner_{slug}",
    )


def catalog_mismatch(slug: str, database: str, login_role: str, owner_role: str) -> str | None:
    """Why a catalog row's object names are not the ones its slug derives, if they
    are not: a tampered or corrupted row, which must never steer a drop, a dump or
    a restore onto another tenant's database."""
    try:
        want = tenant_names(slug)
    except InvalidInput:
        return f"slug {slug!r} is not a valid slug"
    for what, have, expected in (("database", database, want.database),
                                 ("login role", login_role, want.login_role),
                                 ("owner role", owner_role, want.owner_role)):
        if have != expected:
            return f"its {what} is {have!r}, not {expected!r}"
    return None


def tenant_lock(slug: str) -> str:
    """The catalog advisory lock every command that changes the tenant holds."""
    return f"tenant:{slug}"


def check_integrity(t: Any) -> None:
    """Every operation on one tenant loads it through `get_tenant`, so a row whose
    names point at another tenant's objects is stopped here, before any server
    is touched."""
    why = catalog_mismatch(t.slug, t.database, t.login_role, t.owner_role)
    if why is not None:
        raise CatalogIntegrityError(f"catalog row of tenant {t.slug!r} is inconsistent: "
                                    f"{why}; refusing to act on it (see `tenantctl doctor`)")


def password_context(slug: str) -> str:
    """What a tenant's wrapped password is bound to: unwrapping it under another
    tenant's name fails."""
    return f"tenant:{slug}:password"


def move_object_name(tenant_id: int) -> str:
    """The publication, subscription and replication slot (and the temporary
    replication role) of a logical move of the tenant: one name, found by doctor
    by its prefix."""
    return f"{MOVE_OBJECT_PREFIX}{tenant_id}"


MOVE_OBJECT_PREFIX = "tctl_move_"
