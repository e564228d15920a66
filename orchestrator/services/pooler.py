"""The pooler in front of a server (PgBouncer): what it should list, computed from
the catalog, written to its files and applied by RELOAD.

Active and cancelled tenants are listed (a cancelled tenant keeps reading, to
export its data during its hold; the server refuses its writes): a suspended one
(or one being provisioned, or gone) is refused at the pooler as at the server, and
its client connections are ended (KILL) when it leaves the list. The lifecycle hooks call
``refresh`` after their change; a pooler that is down or files that cannot be
written never fail the change itself: ``refresh`` returns (and logs) a warning
line, and ``doctor`` reports the pooler until ``doctor --fix`` (``sync``) puts it
right. Support grants connect directly (their password is never stored, so no
verifier can be written for them).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from orchestrator.adapters.catalog.models import Tenant
from orchestrator.adapters.postgres import pgbouncer
from orchestrator.config import PoolerConfig
from orchestrator.domain.errors import TenantctlError, first_line
from orchestrator.domain.names import password_context
from orchestrator.domain.pooler import (
    PoolEntry,
    PoolerFiles,
    desired_files,
    listed_databases,
    password_verifier,
    stale_files,
)
from orchestrator.domain.states import TenantState

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

log = logging.getLogger("tenantctl.pooler")

# who may log in at the server: a cancelled tenant reads (its export) until it is deleted
POOLED_STATES = (TenantState.active, TenantState.cancelled)


def _auth_entries(text: str | None) -> dict[str, str]:
    out = {}
    for ln in (text or "").splitlines():
        parts = ln.split('"')
        if len(parts) >= 4:
            out[parts[1]] = parts[3]
    return out


def desired(deps: Deps, server: str, *, reuse: str | None = None,
            changed: str | None = None) -> PoolerFiles:
    """The files the catalog asks for. With ``reuse`` (the auth file as it is), a
    listed role keeps the verifier it has there unless it is ``changed``'s (a
    slug): a refresh after one tenant's change computes one verifier, not one per
    tenant (4,096 PBKDF2 rounds each)."""
    pooler = deps.cfg.server(server).pooler
    assert pooler is not None
    admin = conninfo_to_dict(deps.cfg.server(server).admin_dsn)
    host, port = str(admin.get("host") or "localhost"), int(admin.get("port") or 5432)
    with deps.catalog.session() as s:
        tenants = list(s.scalars(
            select(Tenant).options(selectinload(Tenant.credential))
            .where(Tenant.server == server, Tenant.state.in_(POOLED_STATES))))
    kept = _auth_entries(reuse) if reuse is not None else {}
    entries, verifiers = [], {}
    for t in tenants:
        if t.credential is None:
            continue
        plan = deps.cfg.plans.get(t.plan)
        entries.append(PoolEntry(t.database, host, port, t.database,
                                 plan.pool_size if plan else None))
        if t.login_role in kept and t.slug != changed:
            verifiers[t.login_role] = kept[t.login_role]
        else:
            password = deps.master_key.unwrap(t.credential.password_wrapped,
                                              password_context(t.slug)).decode()
            verifiers[t.login_role] = password_verifier(password)
    verifiers[pooler.admin_user] = password_verifier(pgbouncer.admin_password(pooler))
    return desired_files(entries, verifiers)


@contextlib.contextmanager
def _writing(pooler: PoolerConfig) -> Iterator[None]:
    """One writer per pooler directory at a time: two sign-ups at once must not
    write lists that each lack the other's tenant."""
    pooler.dir.mkdir(parents=True, exist_ok=True)
    with open(pooler.dir / ".tenantctl.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class SyncResult:
    server: str
    pooler: str
    written: bool
    reloaded: bool
    tenants: int
    removed: list[str] = field(default_factory=list)
    warning: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sync(deps: Deps, server: str, *, changed: str | None = None,
         full: bool = True) -> SyncResult:
    """Write the server's pooler files from the catalog and RELOAD it (KILL the
    databases taken off the list). ``full``: every verifier computed again (doctor
    --fix, `pooler sync`); else only ``changed``'s and the missing ones. A failure
    is the result's ``warning``, never an exception."""
    pooler = deps.cfg.server(server).pooler
    assert pooler is not None
    res = SyncResult(server, pgbouncer.where(pooler), False, False, 0)
    try:
        with _writing(pooler):
            old_dbs, old_auth = pgbouncer.current_files(pooler)
            want = desired(deps, server, reuse=None if full else old_auth, changed=changed)
            res.tenants = len(listed_databases(want.databases))
            res.removed = sorted(listed_databases(old_dbs or "")
                                 - listed_databases(want.databases))
            res.written = pgbouncer.write_files(pooler, want)
            pgbouncer.reload(pooler, res.removed)
            res.reloaded = True
    except (TenantctlError, OSError) as exc:
        what = "files not written" if not res.written and not res.reloaded else "not reloaded"
        res.warning = (f"pooler of {server} ({res.pooler}): {what}: {first_line(exc)}; "
                       "the change is made on the server; `tenantctl doctor --fix` "
                       "re-syncs the pooler")
        log.warning("warning: %s", res.warning)
    return res


def refresh(deps: Deps, server: str, changed: str | None = None) -> str | None:
    """After a change to one of ``server``'s tenants (``changed``: its slug): the
    pooler's files and RELOAD, if the server has a pooler. The warning, or None."""
    if not any(s.name == server and s.pooler is not None for s in deps.cfg.servers):
        return None
    res = sync(deps, server, changed=changed, full=False)
    if res.warning is not None:
        deps.warnings.append(res.warning)
    return res.warning


@dataclass
class PoolerHealth:
    server: str
    pooler: str
    up: bool
    down_reason: str | None
    stale: list[str]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check(deps: Deps, server: str) -> PoolerHealth:
    """Is the pooler up (its admin console answers), and do its files say what the
    catalog says (every verifier computed again)?"""
    pooler = deps.cfg.server(server).pooler
    assert pooler is not None
    try:
        pgbouncer.version(pooler)
        up, reason = True, None
    except TenantctlError as exc:
        up, reason = False, first_line(exc)
    try:
        stale = stale_files(desired(deps, server), *pgbouncer.current_files(pooler))
    except (TenantctlError, OSError) as exc:
        stale, reason = ["(cannot compute)"], reason or first_line(exc)
    return PoolerHealth(server, pgbouncer.where(pooler), up, reason, stale)


def pooled_servers(deps: Deps) -> list[str]:
    return [s.name for s in deps.cfg.servers if s.pooler is not None]
