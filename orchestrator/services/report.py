"""`tenantctl report`: the fleet checked against the promises of the privacy
policy, each with pass/fail, the evidence, and the tenants that break it.

Gathering reads the catalog, every server and every region's store once;
judging is a set of pure functions over what was gathered (domain/promises.py).
Evidence is what a reviewer can check by hand (counts, ages, names), never a secret.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
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
from orchestrator.adapters.package import installed_version
from orchestrator.adapters.postgres.libpq import redact
from orchestrator.domain import promises
from orchestrator.domain.errors import TenantctlError, first_line
from orchestrator.domain.health import BackupRow, StoreFacts, TenantRow
from orchestrator.domain.humanize import utc_minute
from orchestrator.domain.promises import (
    STATE_AUDIT,
    GrantRow,
    Probe,
    Promise,
    ServerIsolation,
)
from orchestrator.domain.quota import summarize
from orchestrator.domain.statuses import BackupStatus
from orchestrator.services import credentials, quota

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps


def tenant_row(t: Tenant) -> TenantRow:
    """A catalog row as the plain data doctor's rules and the promises read."""
    return TenantRow(t.id, t.slug, t.region, t.server, t.database, t.login_role,
                     t.owner_role, t.state, t.revision, t.migration_error, t.legal_hold,
                     t.legal_hold_reason, t.hold_until, t.purge_after, t.activated_at,
                     t.created_at)


def backup_row(b: Backup) -> BackupRow:
    return BackupRow(b.id, b.tenant_id, b.slug, b.region, b.object_key, b.manifest_key,
                     b.status, b.started_at, b.finished_at, key_id=b.key_id,
                     store_url=b.store_url)


# -- 1. isolation -------------------------------------------------------------------


def check_isolation(fleet: Deps, tenants: Sequence[TenantRow]) -> Promise:
    seen = [_read_isolation(fleet, server, group)
            for server, group in promises.live_by_server(tenants).items()]
    return promises.check_isolation(tenants, seen)


def _read_isolation(fleet: Deps, server: str, group: list[TenantRow]) -> ServerIsolation:
    seen = ServerIsolation(server)
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
            seen.databases, seen.roles = dbs, roles
            # every tenant role against every other database of the server
            rows = conn.execute(
                "SELECT r.rolname, d.datname FROM pg_roles r CROSS JOIN pg_database d "
                "WHERE r.rolname = ANY(%s) AND d.datname <> r.rolname AND d.datallowconn "
                "AND has_database_privilege(r.rolname, d.datname, 'CONNECT')",
                ([t.login_role for t in group],)).fetchall()
            seen.reaches = [(role, db) for role, db in rows]
    except TenantctlError as exc:
        seen.error = first_line(exc)
        return seen
    # a tenant that may log in (a suspended one may not: its refusals prove nothing)
    prober = next((t for t in group if t.state != TenantState.suspended), None)
    if prober is not None:
        seen.probe = _live_probe(fleet, prober,
                                 [d for d in open_dbs if d != prober.database][:3])
    return seen


def _live_probe(fleet: Deps, tenant: TenantRow, others: list[str]) -> Probe:
    """Connect as the tenant's own role to other databases: every attempt must be
    refused for want of the privilege. First prove the credentials log in to its own
    database: a refusal for a wrong password (or a full server) says nothing about
    isolation. Counts the refusals that count; keeps the last offence."""
    try:
        dsn = credentials.credentials(fleet, tenant.slug)
    except TenantctlError:
        return Probe(tenant.slug, 0)
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        return Probe(tenant.slug, 0, "live probe: cannot log in to its own database with "
                     f"the credentials tenantctl holds ({first_line(exc)}); nothing proven",
                     "login-password-changed")
    probe = Probe(tenant.slug, 0)
    for db in others:
        try:
            psycopg.connect(make_conninfo(dsn, dbname=db), connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            if "permission denied for database" in str(exc):
                probe = replace(probe, refused=probe.refused + 1)
            else:
                probe = replace(probe, offence=f"live probe: refused by {db} for another "
                                f"reason than privilege ({first_line(exc)}); nothing proven",
                                code="probe-inconclusive", database=db)
            continue
        probe = replace(probe, offence=f"live probe: its role connected to {db}",
                        code="role-reaches-other-database", database=db)
    return probe


# -- 2. region: what each region's store holds --------------------------------------


def read_stores(fleet: Deps) -> dict[str, StoreFacts]:
    stores = {name: StoreFacts(name, rc.backup_store) for name, rc in fleet.cfg.regions.items()}
    for st in stores.values():
        try:
            st.keys = {o.key for o in open_store(st.url).objects("tenants/")}
        except TenantctlError as exc:
            st.error = first_line(exc)
    return stores


# -- 5. audit: what the audit log holds ------------------------------------------------


def read_audit(fleet: Deps) -> tuple[set[tuple[str | None, str]], datetime | None, int]:
    with fleet.catalog.session() as s:
        seen = {(r[0], r[1]) for r in s.execute(
            select(AuditEvent.tenant, AuditEvent.action).where(
                AuditEvent.action.in_({a for acts in STATE_AUDIT.values() for a in acts}),
                AuditEvent.outcome == "ok").distinct())}
        oldest = s.scalar(select(func.min(AuditEvent.at)))
        total = s.scalar(select(func.count()).select_from(AuditEvent)) or 0
    return seen, oldest, total


# -- the report -----------------------------------------------------------------------


def fleet_identity(fleet: Deps) -> dict[str, str | None]:
    """Which fleet the report is of: its catalog (user, host, port, database: never a
    password) and the fleet id its servers are marked with."""
    return {"catalog": redact(fleet.cfg.catalog_dsn), "fleet_id": fleet.catalog.fleet_id()}


def build(fleet: Deps, now: datetime | None = None) -> dict[str, Any]:
    now = now or clock.utcnow()
    with fleet.catalog.session() as s:
        tenants = [tenant_row(t) for t in s.scalars(select(Tenant).order_by(Tenant.slug))]
        backups = [backup_row(b) for b in s.scalars(
            select(Backup).where(Backup.status == BackupStatus.completed))]
        grants = [GrantRow(g.id, g.slug, g.expires_at, g.dropped_at)
                  for g in s.scalars(select(SupportGrant))]
        server_region = dict(s.execute(select(Server.name, Server.region)).all())
    region, listed = promises.check_region(tenants, backups, server_region, read_stores(fleet))
    isolation = check_isolation(fleet, tenants)
    seen, oldest, total = read_audit(fleet)
    checked = [isolation, region,
               promises.check_backups(tenants, backups, listed, now,
                                      fleet.cfg.backup_interval_hours),
               promises.check_timeliness(tenants, grants, now),
               promises.check_audit(tenants, seen, oldest, total,
                                    fleet.cfg.lifecycle.audit_days, now)]
    storage = summarize(quota.standings(fleet), fleet.cfg.usage.quota_warning)
    return assemble(checked, now, fleet_identity(fleet), installed_version(), storage)


def assemble(checked: Sequence[Promise], now: datetime, fleet: dict[str, str | None],
             version: str, storage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report as `report --json` prints it (and the HTML page embeds). ``storage``:
    the tenants over their storage quota or near it (not a promise: it breaks none)."""
    return {"summary": promises.summary(checked), "ok": all(p.ok for p in checked),
            "generated_at": now.isoformat(timespec="seconds"), "tenantctl_version": version,
            "fleet": fleet, "promises": [p.to_json() for p in checked],
            "storage": storage}


def storage_lines(storage: dict[str, Any] | None) -> list[str]:
    """The storage section in words (text and HTML): one line per tenant over or near
    its quota."""
    if not storage or not storage["with_quota"]:
        return []
    share = f"{storage['quota_warning']:.0%}"
    lines = [f"{storage['with_quota']} tenant(s) on a plan with a storage quota: "
             f"{len(storage['over'])} over it (writes revoked while active), "
             f"{len(storage['warning'])} at {share} of it or more"]
    for kind, rows in (("over", storage["over"]), ("near", storage["warning"])):
        for r in rows:
            used = "size unknown" if r["used_percent"] is None else f"{r['used_percent']}%"
            lines.append(f"{kind}: {r['slug']} ({r['state']}, {r['server']}): {used} of "
                         f"{r['quota']} bytes")
    return lines


def script_json(report: dict[str, Any]) -> str:
    """The report as `report --json` prints it, made safe inside a <script> element:
    "<", ">" and "&" only occur inside JSON strings, where \\u003c and the like parse
    back to the same characters, so no "</script>" or "<!--" in a tenant's data can
    end the element or change how it is read."""
    return (json.dumps(report, indent=2, default=str).replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("&", "\\u0026"))


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#222}"
          "section{border:1px solid #ccc;border-radius:6px;padding:0 1rem;margin:1rem 0}"
          ".pass h2 span,.summary.pass{color:#176b2c}.fail h2 span,.summary.fail{color:#b00020}"
          ".summary{font-size:1.3rem;font-weight:600}h3{font-size:.9rem;margin-bottom:.2rem}"
          "dl{display:grid;grid-template-columns:max-content 1fr;gap:.1rem 1rem;color:#555}"
          "dd{margin:0}table{border-collapse:collapse;width:100%;margin-bottom:1rem}"
          "td,th{text-align:left;vertical-align:top;padding:.2rem .4rem;"
          "border-bottom:1px solid #eee}code{font-size:.85rem;overflow-wrap:anywhere}")


def _failures(p: dict[str, Any]) -> str:
    e = html.escape
    if not p["failures"]:
        return "<p>none</p>"
    rows = "".join(f"<tr><td>{e(f['subject'])}</td><td>{e(f['problem'])}</td>"
                   f"<td><code>{e(f['remedy'])}</code></td></tr>" for f in p["failures"])
    return f"<table><tr><th>Offender</th><th>Problem</th><th>Remedy</th></tr>{rows}</table>"


def render_html(report: dict[str, Any]) -> str:
    """One self-contained page (inline CSS, nothing fetched) with the JSON of
    `report --json` in a data block; its policy lets no script run."""
    e = html.escape
    rows = []
    for p in report["promises"]:
        status = "PASS" if p["ok"] else "FAIL"
        evidence = "".join(f"<li>{e(x)}</li>" for x in p["evidence"])
        rows.append(f'<section class="{status.lower()}"><h2><span>{status}</span> '
                    f"{e(p['title'])}</h2><h3>Evidence</h3><ul>{evidence}</ul>"
                    f"<h3>Offenders</h3>{_failures(p)}</section>")
    lines = storage_lines(report.get("storage"))
    storage = ("<section><h2>Storage quotas</h2><ul>"
               + "".join(f"<li>{e(x)}</li>" for x in lines) + "</ul></section>"
               if lines else "")
    fleet = report["fleet"]
    generated = utc_minute(datetime.fromisoformat(report["generated_at"]))
    identity = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in (
        ("Fleet", fleet["fleet_id"] or "(no fleet id yet: tenantctl catalog upgrade)"),
        ("Catalog", fleet["catalog"]), ("tenantctl", report["tenantctl_version"]),
        ("Generated", generated)))
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'\"><title>tenantctl promise report</title>"
            f"<style>{_STYLE}</style></head><body><h1>tenantctl promise report</h1>"
            f'<p id="summary" class="summary {"pass" if report["ok"] else "fail"}">'
            f"{e(report['summary'])}</p><dl>{identity}</dl>{''.join(rows)}{storage}"
            '<script type="application/json" id="tenantctl-report">'
            f"{script_json(report)}</script></body></html>\n")
