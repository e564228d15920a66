"""Which master key is the fleet's, decided from what the catalog records and which
key ids wrap the stored secrets (plain data in, no I/O)."""

from __future__ import annotations

from datetime import datetime

# the fleet_settings key of the id of the master key the catalog's secrets are
# wrapped by: adopted from the first key that wraps one, changed only by
# `keys rotate-master`
MASTER_KEY_SETTING = "master_key_id"


def identity_context(slug: str) -> str:
    """What a tenant's wrapped age identity is bound to (as ``names.password_context``
    its password)."""
    return f"tenant:{slug}:age-identity"


def key_destroyed(slug: str, destroyed_at: datetime | None) -> str:
    """The one-line refusal for a tenant whose key an unfinished erasure destroyed."""
    return (f"the key of tenant {slug!r} was destroyed ({destroyed_at:%Y-%m-%d}) by an "
            f"erasure that did not finish: re-run `tenantctl tenant erase {slug} --reason "
            "…` to finish it")


def fleet_key_elsewhere(configured: str, recorded: str | None,
                        wrapped: dict[str, int]) -> str | None:
    """The fleet's master key id when the ``configured`` one is not it, else None:
    the id the catalog records, or (none recorded yet) the one wrapping most of the
    stored secrets when none is wrapped by ``configured``."""
    if recorded is not None:
        return recorded if recorded != configured else None
    if wrapped and configured not in wrapped:
        return max(sorted(wrapped), key=lambda k: wrapped[k])
    return None


def mixed_key_ids(wrapped: dict[str, int]) -> str | None:
    """A one-line description when stored secrets are wrapped by more than one key."""
    if len(wrapped) < 2:
        return None
    ids = ", ".join(f"{k} ({n})" for k, n in sorted(wrapped.items(), key=lambda kv: -kv[1]))
    return (f"stored secrets are wrapped by {len(wrapped)} master keys: {ids}; "
            "`keys rotate-master` cannot re-wrap them all with one key")
