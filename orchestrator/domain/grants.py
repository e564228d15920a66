"""A support grant's role settings, and how to tell a role that changed its own."""

from __future__ import annotations


def settings(read_only: bool) -> dict[str, str]:
    """The role settings a support role gets; any other (the role may ALTER ROLE its
    own settings) is tampering, and ends the grant (see services.access.tampered)."""
    return {"default_transaction_read_only": "on"} if read_only else {}


def settings_changed(config: list[str] | None, read_only: bool) -> str | None:
    """What differs between a support role's settings (pg_roles.rolconfig) and those
    its grant gave it; None when nothing does (or the role is gone)."""
    if config is None:
        return None
    want = {f"{k}={v}" for k, v in settings(read_only).items()}
    extra, missing = sorted(set(config) - want), sorted(want - set(config))
    if not extra and not missing:
        return None
    return "; ".join([*(f"set {c}" for c in extra), *(f"removed {c}" for c in missing)])
