"""`tenantctl report`: the fleet checked against the promises of the privacy
policy, each with pass/fail, the evidence, and the tenants that break it.

Gathering reads the catalog, every server and every region's store once;
judging is a set of pure functions over what was gathered. Evidence is what a
reviewer can check by hand (counts, ages, names), never a secret.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy import func, select

from backups.stores import open_store
from orchestrator.adapters import clock
from orchestrator.adapters.catalog.models import (
    AuditEvent,
    Backup,
    Server,
    SupportGrant,
    Tenant,
    TenantState,
)
from orchestrator.domain.errors import TenantctlError, first_line
from orchestrator.domain.states import HAS_DATABASE, Op
from orchestrator.domain.statuses import BackupStatus
from orchestrator.domain.timeliness import (
    backup_overdue,
    backup_since,
    is_overdue,
    latest_backup_age,
    latest_completed,
    overdue_transition,
)
from orchestrator.services import credentials

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

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


def _fail(offenders: dict[str, str]) -> list[str]:
    return [f"{t}: {why}" for t, why in sorted(offenders.items())]


# -- 1. isolation -------------------------------------------------------------------


def check_isolation(fleet: Deps, tenants: list[Tenant]) -> Promise:
    offenders: dict[str, str] = {}
    live = [t for t in tenants if t.state in HAS_DATABASE]
    by_server: dict[str, list[Tenant]] = {}
    for t in live:
        by_server.setdefault(t.server, []).append(t)
    checked_pairs = sampled = 0
    for server, group in sorted(by_server.items()):
        try:
            with fleet.server_connection(server) as conn:
                rows = conn.execute(
                    "SELECT datname, has_database_privilege('public', datname, 'CONNECT'), "
                    "datallowconn FROM pg_database WHERE datallowconn OR datname LIKE "
                    "'tenant%%'").fetchall()
                dbs = {r[0]: r[1] for r in rows}
                # a closed database refuses everyone before asking for the privilege
                open_dbs = [r[0] for r in rows if r[2]]
                roles = {r[0]: r[1:] for r in conn.execute(
                    "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolbypassrls "
                    "FROM pg_roles WHERE rolname = ANY(%s)", ([t.login_role for t in group],))}
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
                rows = conn.execute(
                    "SELECT r.rolname, d.datname FROM pg_roles r CROSS JOIN pg_database d "
                    "WHERE r.rolname = ANY(%s) AND d.datname <> r.rolname AND d.datallowconn "
                    "AND has_database_privilege(r.rolname, d.datname, 'CONNECT')",
                    ([t.login_role for t in group],)).fetchall()
                checked_pairs += len(group) * max(len(dbs) - 1, 0)
                for role, db in rows:
                    offenders[role.removeprefix("tenant_")] = f"its role may connect to {db}"
        except TenantctlError as exc:
            offenders[f"server {server}"] = first_line(exc)
            continue
        # a tenant that may log in (a suspended one may not: its refusals prove nothing)
        prober = next((t for t in group if t.state != TenantState.suspended), None)
        if prober is not None:
            sampled += _live_probe(fleet, prober,
                                   [d for d in open_dbs if d != prober.database][:3],
                                   offenders)
    return Promise("isolation", "Every tenant in its own database; its role reaches no other; "
                   "PUBLIC revoked", not offenders,
                   [f"{len(live)} live tenants on {len(by_server)} servers",
                    f"{checked_pairs} role/database pairs checked in the catalogs of the "
                    "servers", f"{sampled} live connection attempts to other databases, "
                    "all refused" if not offenders else "live probe: see offenders"],
                   _fail(offenders))


def _live_probe(fleet: Deps, tenant: Tenant, others: list[str],
                offenders: dict[str, str]) -> int:
    """Connect as the tenant's own role to other databases: every attempt must be
    refused for want of the privilege. First prove the credentials log in to its own
    database: a refusal for a wrong password (or a full server) says nothing about
    isolation. Returns the number of refusals that count."""
    try:
        dsn = credentials.credentials(fleet, tenant.slug)
    except TenantctlError:
        return 0
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        offenders[tenant.slug] = ("live probe: cannot log in to its own database with the "
                                  f"credentials tenantctl holds ({first_line(exc)}); "
                                  "nothing proven (tenantctl doctor)")
        return 0
    refused = 0
    for db in others:
        try:
            psycopg.connect(make_conninfo(dsn, dbname=db), connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            if "permission denied for database" in str(exc):
                refused += 1
            else:
                offenders[tenant.slug] = f"live probe: refused by {db} for another reason " \
                    f"than privilege ({first_line(exc)}); nothing proven"
            continue
        offenders[tenant.slug] = f"live probe: its role connected to {db}"
    return refused


# -- 2. region -----------------------------------------------------------------------


def check_region(fleet: Deps, tenants: list[Tenant], backups: list[Backup],
                 server_region: dict[str, str]) -> tuple[Promise, dict[str, set[str]]]:
    """Also returns what each region's store holds, for the backup check."""
    offenders: dict[str, str] = {}
    region_of = {t.slug: t.region for t in tenants}
    for t in tenants:
        if t.state in HAS_DATABASE and server_region.get(t.server) != t.region:
            offenders[t.slug] = f"database on {t.server} outside {t.region}"
    stores = {name: rc.backup_store for name, rc in fleet.cfg.regions.items()}
    listed: dict[str, set[str]] = {}
    for region, url in stores.items():
        try:
            listed[region] = {o.key for o in open_store(url).objects("tenants/")}
        except TenantctlError as exc:
            offenders[f"store of {region}"] = first_line(exc)
            listed[region] = set()
        for key in listed[region]:
            slug = key.split("/")[1] if key.count("/") >= 2 else ""
            home = region_of.get(slug)
            if home is not None and home != region:
                offenders[slug] = f"backup object {key} in the {region} store, not {home}"
    for b in backups:
        if b.status == BackupStatus.completed and (b.region != region_of.get(b.slug)
                                        or b.store_url != stores.get(b.region)):
            offenders[b.slug] = f"backup {b.id} recorded outside its region's store"
    return Promise("region", "Every tenant's data and backups only in its chosen region",
                   not offenders,
                   [f"{sum(t.state in HAS_DATABASE for t in tenants)} databases on servers "
                    "of their region", f"{sum(map(len, listed.values()))} objects listed in "
                    f"{len(stores)} region stores",
                    f"{sum(b.status == BackupStatus.completed for b in backups)} completed backups "
                    "recorded in their region's store"], _fail(offenders)), listed  # type: ignore[return-value]


# -- 3. backups -----------------------------------------------------------------------


def check_backups(fleet: Deps, tenants: list[Tenant], backups: list[Backup],
                  listed: dict[str, set[str]], now: datetime) -> Promise:
    interval = timedelta(hours=fleet.cfg.backup_interval_hours)
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
                    f"{fleet.cfg.backup_interval_hours} h",
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


def check_timeliness(tenants: list[Tenant], grants: list[SupportGrant], now: datetime
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


def check_audit(fleet: Deps, tenants: list[Tenant], now: datetime) -> Promise:
    with fleet.catalog.session() as s:
        seen = {(r[0], r[1]) for r in s.execute(
            select(AuditEvent.tenant, AuditEvent.action).where(
                AuditEvent.action.in_({a for acts in STATE_AUDIT.values() for a in acts}),
                AuditEvent.outcome == "ok").distinct())}
        oldest = s.scalar(select(func.min(AuditEvent.at)))
        total = s.scalar(select(func.count()).select_from(AuditEvent)) or 0
    offenders: dict[str, str] = {}
    for t in tenants:
        needed = STATE_AUDIT.get(TenantState(t.state))
        if needed and not any((t.slug, a) in seen for a in needed):
            offenders[t.slug] = f"{t.state}, but no {' or '.join(needed)} in the audit log"
    keep = timedelta(days=fleet.cfg.lifecycle.audit_days)
    if oldest is not None and is_overdue(oldest + keep, now):  # its purge was due
        offenders["audit log"] = f"records from {oldest.date()} kept past " \
                                 f"{fleet.cfg.lifecycle.audit_days} days"
    return Promise("audit", "An audit record for every state change; nothing older than "
                   f"{fleet.cfg.lifecycle.audit_days} days", not offenders,
                   [f"{total} audit records", f"oldest: {oldest.isoformat() if oldest else 'none'}",
                    f"{len(tenants)} tenants' states matched to their audit records"],
                   _fail(offenders))


# -- the report -----------------------------------------------------------------------


def build(fleet: Deps, now: datetime | None = None) -> dict[str, Any]:
    now = now or clock.utcnow()
    with fleet.catalog.session() as s:
        tenants = list(s.scalars(select(Tenant).order_by(Tenant.slug)))
        backups = list(s.scalars(select(Backup).where(
            Backup.status == BackupStatus.completed)))
        grants = list(s.scalars(select(SupportGrant)))
        server_region = dict(s.execute(select(Server.name, Server.region)).all())
    region, listed = check_region(fleet, tenants, backups, server_region)
    promises = [check_isolation(fleet, tenants), region,
                check_backups(fleet, tenants, backups, listed, now),
                check_timeliness(tenants, grants, now), check_audit(fleet, tenants, now)]
    return {"generated_at": now.isoformat(), "ok": all(p.ok for p in promises),
            "promises": [p.to_json() for p in promises]}


def render_html(report: dict[str, Any]) -> str:
    """One self-contained page (inline CSS, no scripts, nothing fetched)."""
    e = html.escape
    rows = []
    for p in report["promises"]:
        status = "PASS" if p["ok"] else "FAIL"
        evidence = "".join(f"<li>{e(x)}</li>" for x in p["evidence"])
        offenders = "".join(f"<li>{e(x)}</li>" for x in p["offenders"]) or "<li>none</li>"
        rows.append(f'<section class="{status.lower()}"><h2><span>{status}</span> '
                    f"{e(p['title'])}</h2><h3>Evidence</h3><ul>{evidence}</ul>"
                    f"<h3>Offending tenants</h3><ul>{offenders}</ul></section>")
    overall = "all promises kept" if report["ok"] else "promises broken"
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>tenantctl promise report</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;"
            "color:#222}section{border:1px solid #ccc;border-radius:6px;padding:0 1rem;"
            "margin:1rem 0}.pass h2 span{color:#176b2c}.fail h2 span{color:#b00020}"
            "h3{font-size:.9rem;margin-bottom:.2rem}</style></head><body>"
            f"<h1>tenantctl promise report: {e(overall)}</h1>"
            f"<p>Generated {e(report['generated_at'])}</p>{''.join(rows)}</body></html>\n")
