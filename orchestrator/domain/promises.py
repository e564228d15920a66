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
from orchestrator.domain.humanize import human_time, plural
from orchestrator.domain.remedies import remedy
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


STATE_NOUN, STATES_NOUN = "tenant's state", "tenants' states"
# pg_roles' rolsuper, rolcreatedb, rolcreaterole, rolbypassrls, as ServerIsolation reads them
ROLE_POWERS = ("SUPERUSER", "CREATEDB", "CREATEROLE", "BYPASSRLS")


@dataclass(frozen=True)
class Failure:
    """One offender of a promise: a tenant's slug (or the store, server or log that
    broke it), what is wrong, and the remedy doctor gives for the same finding code
    (domain/remedies.py)."""

    subject: str
    problem: str
    code: str
    remedy: str

    def line(self) -> str:
        return f"{self.subject}: {self.problem}"

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "problem": self.problem, "code": self.code,
                "remedy": self.remedy}


class Offences(dict[str, Failure]):
    """The offenders of one promise by subject: one failure each, the last found."""

    def add(self, subject: str, problem: str, code: str, **args: object) -> None:
        self[subject] = Failure(subject, problem, code, remedy(code, slug=subject, **args))

    def in_order(self) -> list[Failure]:
        return [self[k] for k in sorted(self)]


@dataclass
class Promise:
    key: str
    title: str
    evidence: list[str]
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def offenders(self) -> list[str]:
        return [f.line() for f in self.failures]

    def to_json(self) -> dict[str, Any]:
        return {"promise": self.key, "title": self.title, "ok": self.ok,
                "evidence": self.evidence, "offenders": self.offenders,
                "failures": [f.to_json() for f in self.failures]}


def summary(checked: Sequence[Promise]) -> str:
    """The report's first line: "4/5 promises kept; broken: backups (2 offenders)"."""
    line = f"{sum(p.ok for p in checked)}/{len(checked)} promises kept"
    broken = [f"{p.key} ({plural(len(p.failures), 'offender')})" for p in checked
              if not p.ok]
    return line + (f"; broken: {', '.join(broken)}" if broken else "")


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
    code: str = "probe-inconclusive"  # the offence's finding code (domain/remedies.py)
    database: str | None = None  # the database the offence is about, if one


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


# -- 1. isolation -------------------------------------------------------------------


def live_by_server(tenants: Sequence[TenantRow]) -> dict[str, list[TenantRow]]:
    """The live tenants, grouped by server, servers in name order."""
    by_server: dict[str, list[TenantRow]] = {}
    for t in tenants:
        if t.state in HAS_DATABASE:
            by_server.setdefault(t.server, []).append(t)
    return dict(sorted(by_server.items()))


def check_isolation(tenants: Sequence[TenantRow], seen: Sequence[ServerIsolation]) -> Promise:
    off = Offences()
    login_of = {t.slug: t.login_role for t in tenants}
    live = [t for t in tenants if t.state in HAS_DATABASE]
    by_server = live_by_server(tenants)
    checked_pairs = sampled = 0
    for s in seen:
        server, group = s.server, by_server.get(s.server, [])
        if s.databases is not None and s.roles is not None:
            dbs, roles = s.databases, s.roles
            for t in group:
                if t.database not in dbs:
                    off.add(t.slug, f"database {t.database} missing on {server}",
                            "database-missing")
                    continue
                if dbs[t.database]:
                    off.add(t.slug, "PUBLIC may connect to its database", "public-connect",
                            database=t.database)
                attrs = roles.get(t.login_role)
                if attrs is None:
                    off.add(t.slug, f"role {t.login_role} missing", "role-missing")
                elif any(attrs):
                    powers = [p for p, on in zip(ROLE_POWERS, attrs, strict=False) if on]
                    off.add(t.slug, f"its role has {'/'.join(powers)}", "role-powers",
                            role=t.login_role, powers=powers)
            # every tenant role against every other database of the server
            if s.reaches is not None:
                checked_pairs += len(group) * max(len(dbs) - 1, 0)
                for role, db in s.reaches:
                    # through PUBLIC's grant, revoking the role's own would not help
                    public = dbs.get(db, False)
                    off.add(role.removeprefix("tenant_"), f"its role may connect to {db}"
                            + (" (PUBLIC may)" if public else ""),
                            "public-connect" if public else "role-reaches-other-database",
                            database=db, role=role)
        if s.error is not None:
            off.add(f"server {server}", s.error, "server-unreachable")
            continue
        if s.probe is not None:
            sampled += s.probe.refused
            if s.probe.offence is not None:
                off.add(s.probe.slug, s.probe.offence, s.probe.code,
                        database=s.probe.database, role=login_of.get(s.probe.slug))
    return Promise("isolation", "Every tenant in its own database; its role reaches no other; "
                   "PUBLIC revoked",
                   [f"{plural(len(live), 'live tenant')} on {plural(len(by_server), 'server')}",
                    f"{plural(checked_pairs, 'role/database pair')} checked in the catalogs of "
                    "the servers", f"{plural(sampled, 'live connection attempt')} to other "
                    f"databases, {'refused' if sampled == 1 else 'all refused'}"
                    if not off else "live probe: see offenders"],
                   off.in_order())


# -- 2. region -----------------------------------------------------------------------


def check_region(tenants: Sequence[TenantRow], backups: Sequence[BackupRow],
                 server_region: dict[str, str], stores: dict[str, StoreFacts]
                 ) -> tuple[Promise, dict[str, set[str]]]:
    """Also returns what each region's store holds, for the backup check."""
    off = Offences()
    region_of = {t.slug: t.region for t in tenants}
    for t in tenants:
        if t.state in HAS_DATABASE and server_region.get(t.server) != t.region:
            off.add(t.slug, f"database on {t.server} outside {t.region}",
                    "tenant-outside-region")
    listed: dict[str, set[str]] = {}
    for region, st in stores.items():
        if st.keys is None:
            off.add(f"store of {region}", st.error or "cannot be listed", "store-unreachable")
            listed[region] = set()
        else:
            listed[region] = st.keys
        for key in listed[region]:
            slug = key.split("/")[1] if key.count("/") >= 2 else ""
            home = region_of.get(slug)
            if home is not None and home != region:
                off.add(slug, f"backup object {key} in the {region} store, not {home}",
                        "backup-outside-region")
    urls = {region: st.url for region, st in stores.items()}
    for b in backups:
        if b.status == BackupStatus.completed and (b.region != region_of.get(b.slug)
                                        or b.store_url != urls.get(b.region)):
            off.add(b.slug, f"backup {b.id} recorded outside its region's store",
                    "backup-recorded-outside-region")
    completed = sum(b.status == BackupStatus.completed for b in backups)
    return Promise("region", "Every tenant's data and backups only in its chosen region",
                   [f"{plural(sum(t.state in HAS_DATABASE for t in tenants), 'database')} on "
                    "servers of their region",
                    f"{plural(sum(map(len, listed.values())), 'object')} listed in "
                    f"{plural(len(stores), 'region store')}",
                    f"{plural(completed, 'completed backup')} recorded in their region's "
                    "store"], off.in_order()), listed


# -- 3. backups -----------------------------------------------------------------------


def check_backups(tenants: Sequence[TenantRow], backups: Sequence[BackupRow],
                  listed: dict[str, set[str]], now: datetime,
                  interval_hours: int) -> Promise:
    interval = timedelta(hours=interval_hours)
    latest = latest_completed(backups)
    off = Offences()
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
                off.add(t.slug, f"no backup since it became active {_ago(age)} ago",
                        "backup-overdue")
            continue
        b = found
        oldest = age if oldest is None or age > oldest else oldest
        if backup_overdue(since, interval, now):
            off.add(t.slug, f"latest backup {b.id} is {_ago(age)} old", "backup-overdue")
        keys = listed.get(t.region, set())
        if b.object_key not in keys or b.manifest_key not in keys:
            off.add(t.slug, f"latest backup {b.id}: object or manifest missing from the store",
                    "backup-missing-object", live=True)
        elif b.key_id is None:
            off.add(t.slug, f"latest backup {b.id} is not encrypted to a tenant key",
                    "backup-not-encrypted")
    return Promise("backups", "Every active tenant has a successful encrypted backup within "
                   "its schedule",
                   [f"{plural(len(active), 'active tenant')}, schedule every "
                    f"{interval_hours} h",
                    f"age of the oldest latest backup: {_ago(oldest)}" if oldest is not None
                    else "no active tenant has a completed backup yet",
                    *([f"{plural(never, 'active tenant')} without a completed backup yet"]
                      if never and oldest is not None else []),
                    "every backup is age-encrypted to its tenant's own key"],
                   off.in_order())


def _ago(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h"


# -- 4. timeliness --------------------------------------------------------------------


def check_timeliness(tenants: Sequence[TenantRow], grants: Sequence[GrantRow], now: datetime
                     ) -> Promise:
    off = Offences()
    for t in tenants:
        late = overdue_transition(t.state, t.hold_until, t.purge_after, t.legal_hold, now)
        if late is not None and late[0] == Op.delete:
            off.add(t.slug, f"hold ended {human_time(late[1], now)}, not deleted",
                    "deletion-overdue", kind=str(late[0]))
        elif late is not None:
            off.add(t.slug, f"purge due {human_time(late[1], now)}, not purged",
                    "purge-overdue", kind=str(late[0]))
    for g in grants:
        if g.dropped_at is None and is_overdue(g.expires_at, now):
            off.add(g.slug, f"support grant {g.id} past its TTL "
                    f"({human_time(g.expires_at, now)})", "grant-expired")
    holds = sum(1 for t in tenants if t.legal_hold)
    in_hold = sum(t.state == TenantState.cancelled for t in tenants)
    deleted = sum(t.state == TenantState.deleted for t in tenants)
    live_grants = sum(g.dropped_at is None for g in grants)
    return Promise("timeliness", "No hold past its end, no deletion or purge overdue, no "
                   "support grant past its TTL",
                   [f"{plural(in_hold, 'tenant')} in hold",
                    f"{plural(deleted, 'deleted tenant')} awaiting purge",
                    plural(live_grants, "live support grant"),
                    f"{plural(holds, 'tenant')} under legal hold (exempt)"],
                   off.in_order())


# -- 5. audit -------------------------------------------------------------------------


def check_audit(tenants: Sequence[TenantRow], seen: set[tuple[str | None, str]],
                oldest: datetime | None, total: int, audit_days: int,
                now: datetime) -> Promise:
    """``seen``: the (tenant, action) pairs of STATE_AUDIT's actions the audit log
    holds with outcome ok; ``oldest``, ``total``: of the whole log."""
    off = Offences()
    for t in tenants:
        needed = STATE_AUDIT.get(TenantState(t.state))
        if needed and not any((t.slug, a) in seen for a in needed):
            off.add(t.slug, f"{t.state}, but no {' or '.join(needed)} in the audit log",
                    "audit-record-missing")
    keep = timedelta(days=audit_days)
    if oldest is not None and is_overdue(oldest + keep, now):  # its purge was due
        off.add("audit log", f"records from {oldest.date()} kept past "
                f"{plural(audit_days, 'day')}", "audit-kept-too-long")
    return Promise("audit", "An audit record for every state change; nothing older than "
                   f"{plural(audit_days, 'day')}",
                   [plural(total, "audit record"),
                    f"oldest: {human_time(oldest, now) if oldest else 'none'}",
                    f"{plural(len(tenants), STATE_NOUN, STATES_NOUN)} matched to their "
                    "audit records"],
                   off.in_order())
