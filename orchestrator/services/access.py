"""Time-limited support access: a named person may see one tenant's data, with
approval (a reason), for a limited time, audited.

Each grant is a temporary login role on the tenant's server, `tenantctl_support_<id>`
(the name comes from the catalog id, never from user input), with CONNECT on
that one database only, SELECT on its tables (DML too with --read-write), and a
password that expires with the grant (VALID UNTIL): even if nothing ever runs
again, the grant cannot outlive its TTL. Revoke, `retention run` and the
scheduler drop expired roles and end their sessions; deleting or erasing the
tenant drops its grants with it. The password is shown once and never stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from sqlalchemy import select, update

from orchestrator.adapters import clock
from orchestrator.adapters.catalog.audit import reason_text
from orchestrator.adapters.catalog.db import actor
from orchestrator.adapters.catalog.models import SupportGrant, TenantState
from orchestrator.adapters.crypto.tenant_keys import new_password
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.domain.durations import parse_duration
from orchestrator.domain.errors import Conflict, InvalidInput, NotFound, TenantctlError, first_line
from orchestrator.domain.grants import settings, settings_changed
from orchestrator.domain.states import HAS_DATABASE

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

MAX_TTL = timedelta(days=7)


def parse_ttl(text: str, what: str = "ttl") -> timedelta:
    """How long a grant lasts: a duration of more than 0 and at most MAX_TTL."""
    return parse_duration(text, what, positive=True, at_most=MAX_TTL)


def role_name(grant_id: int) -> str:
    return f"tenantctl_support_{grant_id}"


def _marker(grant_id: int, slug: str) -> str:
    return f"tenantctl support grant {grant_id} for tenant {slug}"


def grant_json(g: SupportGrant, now: datetime | None = None) -> dict[str, Any]:
    now = now or clock.utcnow()
    status = ("revoked" if g.revoked_at else "dropped" if g.dropped_at
              else "expired" if g.expires_at <= now else "active")
    return {"id": g.id, "tenant": g.slug, "to": g.grantee, "role": g.role_name,
            "read_only": g.read_only, "reason": g.reason, "granted_by": g.actor,
            "created_at": g.created_at.isoformat() if g.created_at else None,
            "expires_at": g.expires_at.isoformat(), "status": status,
            "revoked_at": g.revoked_at.isoformat() if g.revoked_at else None}


def grant(fleet: Deps, slug: str, *, to: str, ttl: timedelta, reason: str,
          read_only: bool = True) -> dict[str, Any]:
    """Create the grant; returns it with the connection string (shown once)."""
    to, reason = to.strip(), reason_text(reason)
    if not to or len(to) > 200 or not to.isprintable():
        raise InvalidInput("--to must name the person (printable, at most 200 characters)")
    if not reason:
        raise InvalidInput("--reason is required (it is audited)")
    tenant = fleet.get_tenant(slug)
    if tenant.state not in HAS_DATABASE:
        raise Conflict(f"tenant {slug!r} is {tenant.state}: it has no database to grant")
    if not read_only and tenant.state != TenantState.active:
        # a hold (or a suspension) keeps the data as it was: nobody writes to it
        raise Conflict(f"tenant {slug!r} is {tenant.state}: write access needs an active "
                       "tenant (read-only access is allowed)")
    now = clock.utcnow()
    expires = now + ttl
    # the catalog row first: if we die before the role exists, expiry cleans up
    with fleet.catalog.session() as s, s.begin():
        g = SupportGrant(tenant_id=tenant.id, slug=slug, server=tenant.server, role_name="",
                         grantee=to, reason=reason, read_only=read_only, actor=actor(),
                         expires_at=expires)
        s.add(g)
        s.flush()
        g.role_name = role_name(g.id)
        grant_id, role = g.id, g.role_name
    password = new_password()
    ident, db = sql.Identifier(role), sql.Identifier(tenant.database)
    with fleet.server_connection(tenant.server) as conn:
        verifier = pgserver.scram_verifier(conn, role, password)
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOINHERIT CONNECTION LIMIT {} PASSWORD {} "
                             "VALID UNTIL {}").format(
            ident, sql.Literal(fleet.cfg.bounds.support_connection_limit),
            sql.Literal(verifier), sql.Literal(expires.isoformat())))
        conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(
            ident, sql.Literal(_marker(grant_id, slug))))
        # the admin reads what the role may make (a large object needs no privilege),
        # so backups of the tenant still dump everything while the grant lasts
        conn.execute(pgserver.membership_grant(conn, role))
        for name, value in settings(read_only).items():
            conn.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(
                ident, sql.Identifier(name), sql.Literal(value)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, ident))
    admin = fleet.cfg.server(tenant.server).admin_dsn
    tables = sql.SQL("SELECT" if read_only else "SELECT, INSERT, UPDATE, DELETE")
    with pgserver.connect(admin, tenant.database, server=tenant.server,
                          lock_timeout=fleet.cfg.lock_timeout) as conn:
        stmts = [sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident),
                 sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA public TO {}").format(tables, ident)]
        if not read_only:
            stmts.append(sql.SQL("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA "
                                 "public TO {}").format(ident))
            # the schema revision is tenantctl's to move (with the database's mark),
            # not support's: a hand edit would leave the mark, and status, wrong
            stmts.append(pgserver.on_alembic_version(sql.SQL(
                "REVOKE INSERT, UPDATE, DELETE ON public.alembic_version FROM {}")
                .format(ident)))
        conn.execute(sql.SQL(";\n").join(stmts))
    fleet.catalog.audit("access.grant", tenant=slug, region=tenant.region, grant=grant_id,
                        to=to, reason=reason, read_only=read_only,
                        expires_at=expires.isoformat())
    with fleet.catalog.session() as s:
        row = s.get(SupportGrant, grant_id)
        assert row is not None
        data = grant_json(row, now)
    return {**data, "dsn": fleet.tenant_dsn(tenant, password, role)}


def grants(fleet: Deps, *, include_ended: bool = False) -> list[dict[str, Any]]:
    q = select(SupportGrant).order_by(SupportGrant.id)
    if not include_ended:
        q = q.where(SupportGrant.dropped_at.is_(None))
    with fleet.catalog.session() as s:
        return [grant_json(g) for g in s.scalars(q)]


def drop_role(fleet: Deps, g: SupportGrant) -> None:
    """End the role's sessions first (whatever fails after), then what it owns goes to
    the tenant's owner role, its privileges go, and the role. Idempotent; the one
    way tenantctl drops a support role."""
    ident = sql.Identifier(g.role_name)
    try:
        with fleet.server_connection(g.server) as conn:
            if not pgserver.role_exists(conn, g.role_name):
                return
            if pgserver.role_comment(conn, g.role_name) != _marker(g.id, g.slug):
                raise Conflict(f"role {g.role_name} on {g.server} is not grant {g.id}'s: "
                               "left alone")
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
            pgserver.terminate_sessions(conn, role=g.role_name, wait=True)
            pgserver.drop_role_everywhere(conn, fleet.cfg.server(g.server).admin_dsn,
                                          g.role_name, server=g.server,
                                          lock_timeout=fleet.cfg.lock_timeout)
    except psycopg.Error as exc:
        raise TenantctlError(f"support grant {g.id}: dropping {g.role_name} on {g.server} "
                             f"failed: {first_line(exc)}") from None


def _end(fleet: Deps, g: SupportGrant, why: str, *, revoked: bool,
         now: datetime | None = None) -> None:
    drop_role(fleet, g)
    now = now or clock.utcnow()
    values: dict[str, Any] = {"dropped_at": now}
    if revoked:
        values["revoked_at"] = now
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(SupportGrant).where(SupportGrant.id == g.id).values(**values))
        fleet.catalog.audit(f"access.{why}", session=s, tenant=g.slug, grant=g.id,
                            to=g.grantee)


def revoke(fleet: Deps, grant_id: int | None = None) -> list[int]:
    """Revoke one grant, or (None) every live one: sessions ended, role dropped."""
    q = select(SupportGrant).where(SupportGrant.dropped_at.is_(None))
    if grant_id is not None:
        q = q.where(SupportGrant.id == grant_id)
    with fleet.catalog.session() as s:
        rows = list(s.scalars(q))
    if grant_id is not None and not rows:
        with fleet.catalog.session() as s:
            if s.get(SupportGrant, grant_id) is None:
                raise NotFound(f"no support grant {grant_id}")
        raise Conflict(f"support grant {grant_id} has already ended")
    if grant_id is not None:
        _end(fleet, rows[0], "revoke", revoked=True)
        return [grant_id]
    res = revoke_all(fleet)
    if res.failed:
        gid, why = next(iter(res.failed.items()))
        raise TenantctlError(f"{len(res.failed)} support grant(s) not revoked (the others "
                             f"are), e.g. {gid}: {why}")
    return res.revoked


@dataclass
class RevokeAll:
    revoked: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # grant id -> why


def revoke_all(fleet: Deps) -> RevokeAll:
    """Every live grant (breach response): one grant's failure is reported, the
    others are revoked all the same."""
    with fleet.catalog.session() as s:
        rows = list(s.scalars(select(SupportGrant).where(SupportGrant.dropped_at.is_(None))
                              .order_by(SupportGrant.id)))
    result = RevokeAll()
    for g in rows:
        try:
            _end(fleet, g, "revoke", revoked=True)
            result.revoked.append(g.id)
        except TenantctlError as exc:
            result.failed[g.id] = first_line(exc)
    return result


def live(fleet: Deps) -> list[SupportGrant]:
    with fleet.catalog.session() as s:
        return list(s.scalars(select(SupportGrant).where(SupportGrant.dropped_at.is_(None))))


def expired(fleet: Deps, now: datetime) -> list[SupportGrant]:
    with fleet.catalog.session() as s:
        return list(s.scalars(select(SupportGrant).where(
            SupportGrant.dropped_at.is_(None), SupportGrant.expires_at <= now)))


def expire(fleet: Deps, grant_id: int, *, tampered: str | None = None,
           now: datetime | None = None) -> str:
    """End an expired grant, or (``tampered``: why) one whose role was changed; at
    ``now`` when a retention run ends it."""
    with fleet.catalog.session() as s:
        g = s.get(SupportGrant, grant_id)
    if g is None or g.dropped_at is not None:
        return "already ended"
    _end(fleet, g, "tampered" if tampered else "expire", revoked=bool(tampered), now=now)
    return f"role {g.role_name} of {g.grantee} dropped" + (
        f" (tampered with: {tampered})" if tampered else "")


def tampered(fleet: Deps) -> dict[int, str]:
    """Live grants whose role changed its own settings (a role may ALTER ROLE its own
    settings and password; only its settings can be seen by a non-superuser): grant
    id -> what changed. A server that cannot be read is skipped (doctor reports it)."""
    rows = live(fleet)
    by_server: dict[str, list[SupportGrant]] = {}
    for g in rows:
        by_server.setdefault(g.server, []).append(g)
    found: dict[int, str] = {}
    for server, grants_here in by_server.items():
        try:
            with fleet.server_connection(server) as conn:
                config: dict[str, list[str]] = dict(conn.execute(
                    "SELECT r.rolname, coalesce(r.rolconfig, '{}') || coalesce("
                    "(SELECT array_agg(c) FROM pg_db_role_setting s, unnest(s.setconfig) c "
                    "WHERE s.setrole = r.oid AND s.setdatabase <> 0), '{}') "
                    "FROM pg_roles r WHERE r.rolname = ANY(%s)",
                    ([g.role_name for g in grants_here],)).fetchall())
        except (TenantctlError, psycopg.Error):
            continue
        for g in grants_here:
            why = settings_changed(config.get(g.role_name), g.read_only)
            if why is not None:
                found[g.id] = why
    return found


def end_write_grants(fleet: Deps, tenant_id: int) -> list[int]:
    """The tenant's hold began: its read-write grants end (the data stays as it was
    at cancellation); read-only ones go on."""
    with fleet.catalog.session() as s:
        rows = list(s.scalars(select(SupportGrant).where(
            SupportGrant.tenant_id == tenant_id, SupportGrant.dropped_at.is_(None),
            SupportGrant.read_only.is_(False))))
    for g in rows:
        _end(fleet, g, "hold", revoked=True)
    return [g.id for g in rows]


def drop_tenant_grants(fleet: Deps, tenant_id: int, now: datetime | None = None) -> None:
    """The tenant is going: its grants go with it (called with the database gone),
    dropped at ``now`` (the retention run's or the erasure's)."""
    with fleet.catalog.session() as s:
        rows = list(s.scalars(select(SupportGrant).where(
            SupportGrant.tenant_id == tenant_id, SupportGrant.dropped_at.is_(None))))
    for g in rows:
        drop_role(fleet, g)
        with fleet.catalog.session() as s, s.begin():
            s.execute(update(SupportGrant).where(SupportGrant.id == g.id)
                      .values(dropped_at=now or clock.utcnow()))
