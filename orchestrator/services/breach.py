"""Breach response: rotate every tenant's password fleet-wide, one tenant's
failure never stopping the others, with per-tenant timings for the drill report."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.adapters.catalog.models import TenantState
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.domain.errors import TenantctlError, first_line
from orchestrator.services import credentials

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

ROTATABLE = (TenantState.active, TenantState.suspended, TenantState.cancelled)


@dataclass
class RotationResult:
    tenant: str
    ok: bool
    ms: float
    sessions_ended: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rotate_all(fleet: Deps, *, region: str | None = None, concurrency: int = 4,
               kill_sessions: bool = False,
               on_done: Callable[[RotationResult], None] | None = None
               ) -> list[RotationResult]:
    """A new password for every tenant role (of a region): stored wrapped first,
    then set on the role, so a crash leaves a pending password the next call
    applies. With kill_sessions, sessions opened with the old password end."""
    if region is not None:
        fleet.cfg.region(region)  # unknown region: one-line error, nothing done
    tenants = [t for t in fleet.tenants(region) if t.state in ROTATABLE]
    results: list[RotationResult] = []
    lock = threading.Lock()

    def one(slug: str, server: str, role: str) -> None:
        t0 = time.perf_counter()
        try:
            credentials.credentials(fleet, slug, rotate=True)
            ended = 0
            if kill_sessions:
                with fleet.server_connection(server) as conn:
                    ended = pgserver.terminate_sessions(conn, role=role)
            r = RotationResult(slug, True, round((time.perf_counter() - t0) * 1000, 1), ended)
        except TenantctlError as exc:
            r = RotationResult(slug, False, round((time.perf_counter() - t0) * 1000, 1),
                               error=first_line(exc))
        with lock:
            results.append(r)
        if on_done is not None:
            on_done(r)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(lambda t: one(t.slug, t.server, t.login_role), tenants))
    fleet.catalog.audit("tenant.credentials.rotate_all", region=region,
                        rotated=sum(r.ok for r in results),
                        failed=[r.tenant for r in results if not r.ok],
                        kill_sessions=kill_sessions)
    return sorted(results, key=lambda r: r.tenant)
