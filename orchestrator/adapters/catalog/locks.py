"""Locks held in the catalog (Postgres advisory locks): one process at a time per tenant."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from orchestrator.domain.errors import Conflict
from orchestrator.domain.names import tenant_lock
from orchestrator.ports import Locks


@contextmanager
def holding_tenant(catalog: Locks, slug: str) -> Iterator[None]:
    """The tenant's lock, taken by every command that changes the tenant; if another
    process holds it, a Conflict at once rather than a wait."""
    with catalog.advisory_lock(tenant_lock(slug)) as got:
        if not got:
            raise Conflict(f"tenant {slug!r} is being changed by another tenantctl process; "
                           "try again when it has finished")
        yield
