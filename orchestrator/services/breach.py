"""Breach response: rotate every tenant's password fleet-wide, one tenant's
failure never stopping the others, with per-tenant timings for the drill report;
and the drill itself (passwords, support grants, master key), timed step by step."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.domain.errors import InvalidInput, TenantctlError, first_line
from orchestrator.domain.states import HAS_DATABASE
from orchestrator.ports import SecretWrapper
from orchestrator.services import access, credentials

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps


@dataclass
class RotationResult:
    tenant: str
    ok: bool
    ms: float
    sessions_ended: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rotation_targets(fleet: Deps, region: str | None = None) -> list[Any]:
    """The tenants rotate_all(region) rotates: every one with a database."""
    if region is not None:
        fleet.cfg.region(region)  # unknown region: one-line error, nothing done
    return [t for t in fleet.tenants(region) if t.state in HAS_DATABASE]


def rotate_all(fleet: Deps, *, region: str | None = None, concurrency: int = 4,
               kill_sessions: bool = False,
               on_done: Callable[[RotationResult], None] | None = None
               ) -> list[RotationResult]:
    """A new password for every tenant role (of a region): stored wrapped first,
    then set on the role, so a crash leaves a pending password the next call
    applies. With kill_sessions, sessions opened with the old password end."""
    tenants = rotation_targets(fleet, region)
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


def drill_plan(fleet: Deps, new: SecretWrapper) -> dict[str, Any]:
    """What drill(new) would change, counted, nothing changed: for its confirmation
    and --dry-run."""
    if new.key_id == fleet.keys.master.key_id:
        raise InvalidInput("the new master key is the one configured now")
    wraps = credentials.rotate_master_plan(fleet, new)
    return {"passwords": len(rotation_targets(fleet)), "grants": len(access.live(fleet)),
            "master_key_id": fleet.keys.master.key_id, "new_master_key_id": new.key_id,
            "identities": wraps["identities"], "passwords_wrapped": wraps["passwords"],
            "already_rotated": wraps["already_rotated"]}


def drill(fleet: Deps, new: SecretWrapper, *, kill_sessions: bool = False,
          concurrency: int = 4) -> list[dict[str, Any]]:
    """The whole breach response, each step timed: every tenant password rotated,
    every support grant revoked, every tenant secret re-wrapped under ``new``; then
    one audit record of it. A step's failures are reported in its entry and never
    stop the next step (the master key is re-wrapped whatever else failed)."""
    if new.key_id == fleet.keys.master.key_id:
        raise InvalidInput("the new master key is the one configured now")
    steps: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    results = rotate_all(fleet, concurrency=concurrency, kill_sessions=kill_sessions)
    steps.append({"step": "rotate tenant passwords", "seconds":
                  round(time.perf_counter() - t0, 2),
                  "done": sum(r.ok for r in results),
                  "failed": [r.tenant for r in results if not r.ok]})
    t0 = time.perf_counter()
    # one grant that cannot be revoked is reported; the master key is re-wrapped
    revoked = access.revoke_all(fleet)
    steps.append({"step": "revoke support grants",
                  "seconds": round(time.perf_counter() - t0, 2),
                  "done": len(revoked.revoked), "failed": sorted(revoked.failed),
                  "errors": {str(k): v for k, v in revoked.failed.items()}})
    t0 = time.perf_counter()
    counts = credentials.rotate_master(fleet, new)
    steps.append({"step": "re-wrap under the new master key",
                  "seconds": round(time.perf_counter() - t0, 2),
                  "done": counts["identities"] + counts["passwords"], "failed": []})
    fleet.catalog.audit("breach.drill", steps=steps, new_master_key_id=new.key_id)
    return steps

