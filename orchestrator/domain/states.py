"""Tenant states: the words of the lifecycle, with no I/O (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import enum


class TenantState(enum.StrEnum):
    provisioning = "provisioning"
    active = "active"
    suspended = "suspended"
    cancelled = "cancelled"
    deleted = "deleted"
    purged = "purged"


# Tenant.step of an active or suspended tenant while a cancellation is under way: set
# before its writes are taken away, cleared with the state change (doctor reports one
# that a crash stopped half-way).
CANCELLING = "cancel"
# Tenant.step of an active tenant whose connection string ("shown once") has not been
# handed out yet: a re-run of its `tenant create` shows it instead of "already exists".
UNSHOWN = "unshown"

# the states whose database a rollout migrates and `migrate status` reads
MIGRATABLE = (TenantState.active, TenantState.suspended, TenantState.cancelled)
# States in which a tenant occupies a place on its server.
PLACED_STATES = (TenantState.provisioning, TenantState.active, TenantState.suspended,
                 TenantState.cancelled)
