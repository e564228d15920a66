"""The promises of the privacy policy that `tenantctl report` checks, judged over
plain data: the same tenant and backup rows doctor's rules read (domain/health.py),
what each server's catalogs and each region's store said, and ``now``.
services/report.py gathers that data and renders the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from orchestrator.domain.health import BackupRow, StoreFacts, TenantRow
from orchestrator.domain.states import HAS_DATABASE, Op, TenantState
from orchestrator.domain.statuses import BackupStatus
from orchestrator.domain.timeliness import (
    backup_overdue,
    backup_since,
    is_overdue,
    latest_backup_age,
    latest_completed,
    overdue_transition,
)

# the audit action that must exist for a tenant in each state
STATE_AUDIT = {
    TenantState.active: ("tenant.provision.start",),
    TenantState.suspended: ("tenant.suspend",),
    TenantState.cancelled: ("tenant.cancel",),
    TenantState.deleted: ("tenant.delete", "tenant.erase.key_destroyed"),
    TenantState.purged: ("tenant.purge", "tenant.erase"),
}


@dataclass
class Promise:
    key: str
    title: str
    ok: bool
    evidence: list[str]
    offenders: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"promise": self.key, "title": self.title, "ok": self.ok,
                "evidence": self.evidence, "offenders": self.offenders}


@dataclass(frozen=True)
class GrantRow:
    """A support grant, live or ended."""

    id: int
    slug: str
    expires_at: datetime
    dropped_at: datetime | None


@dataclass(frozen=True)
class Probe:
    """Connection attempts as one tenant's own role to other databases of its server."""

    slug: str
    refused: int  # refusals for want of the privilege: the ones that count
    offence: str | None = None  # the last thing that proved nothing, or broke the promise


@dataclass
class ServerIsolation:
    """What one server's catalogs said about its live tenants' isolation. The parts
    read before a failure are kept (``error``); the probe runs only without one."""

    server: str
    databases: dict[str, bool] | None = None  # database -> PUBLIC may connect
    # login role -> (SUPERUSER, CREATEDB, CREATEROLE, BYPASSRLS)
    roles: dict[str, tuple[bool, ...]] | None = None
    # (login role, another database of the server it may connect to)
    reaches: list[tuple[str, str]] | None = None
    error: str | None = None
    probe: Probe | None = None


def _fail(offenders: dict[str, str]) -> list[str]:
    return [f"{t}: {why}" for t, why in sorted(offenders.items())]


# -- 1. isolation -------------------------------------------------------------------


def live_by_server(tenants: Sequence[TenantRow]) -> dict[str, list[TenantRow]]:
    """The live tenants, grouped by server, servers in name order."""
    by_server: dict[str, list[TenantRow]] = {}
    for t in tenants:
        if t.state in HAS_DATABASE:
            by_server.setdefault(t.server, []).append(t)
    return dict(sorted(by_server.items()))


def check_isolation(tenants: Sequence[TenantRow], seen: Sequence[ServerIsolation]) -> Promise:
    offenders: dict[str, str] = {}
    live = [t for t in tenants if t.state in HAS_DATABASE]
    by_server = live_by_server(tenants)
    checked_pairs = sampled = 0
    for s in seen:
        server, group = s.server, by_server.get(s.server, [])
        if s.databases is not None and s.roles is not None:
            dbs, roles = s.databases, s.roles
            for t in group:
                if t.database not in dbs:
                    offenders[t.slug] = f"database {t.database} missing on {server}"
                    continue
                if dbs[t.database]:
                    offenders[t.slug] = "PUBLIC may connect to its database"
                attrs = roles.get(t.login_role)
                if attrs is None:
                    offenders[t.slug] = f"role {t.login_role} missing"
                elif any(attrs):
                    offenders[t.slug] = "its role has SUPERUSER/CREATEDB/CREATEROLE/BYPASSRLS"
            # every tenant role against every other database of the server
            if s.reaches is not None:
                checked_pairs += len(group) * max(len(dbs) - 1, 0)
                for role, db in s.reaches:
                    offenders[role.removeprefix("tenant_")] = f"its role may connect to {db}"
        if s.error is not None:
            offenders[f"server {server}"] = s.error
            continue
        if s.probe is not None:
            sampled += s.probe.refused
            if s.probe.offence is not None:
                offenders[s.probe.slug] = s.probe.offence
    return Promise("isolation", "Every tenant in its own database; its role reaches no other; "
                   "PUBLIC revoked", not offenders,
                   [f"{len(live)} live tenants on {len(by_server)} servers",
                    f"{checked_pairs} role/database pairs checked in the catalogs of the "
                    "servers", f"{sampled} live connection attempts to other databases, "
                    "all refused" if not offenders else "live probe: see offenders"],
                   _fail(offenders))


# -- 2. region -----------------------------------------------------------------------


def check_region(tenants: Sequence[TenantRow], backups: Sequence[BackupRow],
                 server_region: dict[str, str], stores: dict[str, StoreFacts]
                 ) -> tuple[Promise, dict[str, set[str]]]:
    """Also returns what each region's store holds, for the backup check."""
    offenders: dict[str, str] = {}
    region_of = {t.slug: t.region for t in tenants}
    for t in tenants:
        if t.state in HAS_DATABASE and server_region.get(t.server) != t.region:
            offenders[t.slug] = f"database on {t.server} outside {t.region}"
    listed: dict[str, set[str]] = {}
    for region, st in stores.items():
        if st.keys is None:
            offenders[f"store of {region}"] = st.error or "cannot be listed"
            listed[region] = set()
        else:
            listed[region] = st.keys
        for key in listed[region]:
            slug = key.split("/")[1] if key.count("/") >= 2 else ""
            home = region_of.get(slug)
            if home is not None and home != region:
                offenders[slug] = f"backup object {key} in the {region} store, not {home}"
    urls = {region: st.url for region, st in stores.items()}
    for b in backups:
        if b.status == BackupStatus.completed and (b.region != region_of.get(b.slug)
                                        or b.store_url != urls.get(b.region)):
            offenders[b.slug] = f"backup {b.id} recorded outside its region's store"
    return Promise("region", "Every tenant's data and backups only in its chosen region",
                   not offenders,
                   [f"{sum(t.state in HAS_DATABASE for t in tenants)} databases on servers "
                    "of their region", f"{sum(map(len, listed.values()))} objects listed in "
                    f"{len(stores)} region stores",
                    f"{sum(b.status == BackupStatus.completed for b in backups)} completed backups "
                    "recorded in their region's store"], _fail(offenders)), listed


# -- 3. backups -----------------------------------------------------------------------


def check_backups(tenants: Sequence[TenantRow], backups: Sequence[BackupRow],
                  listed: dict[str, set[str]], now: datetime,
                  interval_hours: int) -> Promise:
    interval = timedelta(hours=interval_hours)
    latest = latest_completed(backups)
    offenders: dict[str, str] = {}
    oldest: timedelta | None = None  # over the tenants that have a completed backup
    active = [t for t in tenants if t.state == TenantState.active]
    never = sum(t.id not in latest for t in active)
    for t in active:
        found = latest.get(t.id)
        last = found.finished_at if found else None
        since = backup_since(last, t.activated_at, t.created_at)
        age = latest_backup_age(last, t.activated_at, t.created_at, now)
        if found is None:
            if backup_overdue(since, interval, now):
                offenders[t.slug] = f"no backup since it became active {_ago(age)}"
            continue
        b = found
        oldest = age if oldest is None or age > oldest else oldest
        if backup_overdue(since, interval, now):
            offenders[t.slug] = f"latest backup {b.id} is {_ago(age)} old"
        keys = listed.get(t.region, set())
        if b.object_key not in keys or b.manifest_key not in keys:
            offenders[t.slug] = f"latest backup {b.id}: object or manifest missing from the store"
        elif b.key_id is None:
            offenders[t.slug] = f"latest backup {b.id} is not encrypted to a tenant key"
    return Promise("backups", "Every active tenant has a successful encrypted backup within "
                   "its schedule", not offenders,
                   [f"{len(active)} active tenants, schedule every "
                    f"{interval_hours} h",
                    f"age of the oldest latest backup: {_ago(oldest)}" if oldest is not None
                    else "no active tenant has a completed backup yet",
                    *([f"{never} active tenant(s) without a completed backup yet"]
                      if never and oldest is not None else []),
                    "every backup is age-encrypted to its tenant's own key"],
                   _fail(offenders))


def _ago(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h"


# -- 4. timeliness --------------------------------------------------------------------


def check_timeliness(tenants: Sequence[TenantRow], grants: Sequence[GrantRow], now: datetime
                     ) -> Promise:
    offenders: dict[str, str] = {}
    for t in tenants:
        late = overdue_transition(t.state, t.hold_until, t.purge_after, t.legal_hold, now)
        if late is not None and late[0] == Op.delete:
            offenders[t.slug] = f"hold ended {late[1].isoformat()}, not deleted"
        elif late is not None:
            offenders[t.slug] = f"purge due {late[1].isoformat()}, not purged"
    for g in grants:
        if g.dropped_at is None and is_overdue(g.expires_at, now):
            offenders[g.slug] = f"support grant {g.id} past its TTL ({g.expires_at.isoformat()})"
    holds = sum(1 for t in tenants if t.legal_hold)
    return Promise("timeliness", "No hold past its end, no deletion or purge overdue, no "
                   "support grant past its TTL", not offenders,
                   [f"{sum(t.state == TenantState.cancelled for t in tenants)} tenants in hold",
                    f"{sum(t.state == TenantState.deleted for t in tenants)} deleted tenants "
                    "awaiting purge", f"{len([g for g in grants if g.dropped_at is None])} "
                    "live support grants", f"{holds} tenants under legal hold (exempt)"],
                   _fail(offenders))


# -- 5. audit -------------------------------------------------------------------------


def check_audit(tenants: Sequence[TenantRow], seen: set[tuple[str | None, str]],
                oldest: datetime | None, total: int, audit_days: int,
                now: datetime) -> Promise:
    """``seen``: the (tenant, action) pairs of STATE_AUDIT's actions the audit log
    holds with outcome ok; ``oldest``, ``total``: of the whole log."""
    offenders: dict[str, str] = {}
    for t in tenants:
        needed = STATE_AUDIT.get(TenantState(t.state))
        if needed and not any((t.slug, a) in seen for a in needed):
            offenders[t.slug] = f"{t.state}, but no {' or '.join(needed)} in the audit log"
    keep = timedelta(days=audit_days)
    if oldest is not None and is_overdue(oldest + keep, now):  # its purge was due
        offenders["audit log"] = f"records from {oldest.date()} kept past " \
                                 f"{audit_days} days"
    return Promise("audit", "An audit record for every state change; nothing older than "
                   f"{audit_days} days", not offenders,
                   [f"{total} audit records", f"oldest: {oldest.isoformat() if oldest else 'none'}",
                    f"{len(tenants)} tenants' states matched to their audit records"],
                   _fail(offenders))
