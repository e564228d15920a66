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

import re
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from psycopg import sql
from sqlalchemy import select, update

from orchestrator import clock, pgserver
from orchestrator.audit import storable
from orchestrator.catalog import actor
from orchestrator.errors import Conflict, InvalidInput, NotFound
from orchestrator.models import SupportGrant, TenantState
from orchestrator.provisioning import new_password

if TYPE_CHECKING:
    from orchestrator.api import Fleet

MAX_TTL = timedelta(days=7)
GRANTABLE = (TenantState.active, TenantState.suspended, TenantState.cancelled)
_TTL = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_ttl(text: str) -> timedelta:
    m = _TTL.match(text.strip())
    if not m:
        raise InvalidInput(f"--ttl {text!r}: use a number and s, m, h or d (e.g. 2h)")
    try:
        ttl = timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    except OverflowError:  # beyond timedelta's range: far more than MAX_TTL anyway
        ttl = timedelta.max
    if ttl <= timedelta(0) or ttl > MAX_TTL:
        raise InvalidInput(f"--ttl must be more than 0 and at most {MAX_TTL.days} days")
    return ttl


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


def grant(fleet: Fleet, slug: str, *, to: str, ttl: timedelta, reason: str,
          read_only: bool = True) -> dict[str, Any]:
    """Create the grant; returns it with the connection string (shown once)."""
    to, reason = to.strip(), storable(reason, "--reason").strip()
    if not to or len(to) > 200 or not to.isprintable():
        raise InvalidInput("--to must name the person (printable, at most 200 characters)")
    if not reason:
        raise InvalidInput("--reason is required (it is audited)")
    tenant = fleet.get_tenant(slug)
    if tenant.state not in GRANTABLE:
        raise Conflict(f"tenant {slug!r} is {tenant.state}: it has no database to grant")
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
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOINHERIT CONNECTION LIMIT 5 PASSWORD {} "
                             "VALID UNTIL {}").format(ident, sql.Literal(verifier),
                                                      sql.Literal(expires.isoformat())))
        conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(
            ident, sql.Literal(_marker(grant_id, slug))))
        if read_only:
            conn.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on")
                         .format(ident))
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


def grants(fleet: Fleet, *, include_ended: bool = False) -> list[dict[str, Any]]:
    q = select(SupportGrant).order_by(SupportGrant.id)
    if not include_ended:
        q = q.where(SupportGrant.dropped_at.is_(None))
    with fleet.catalog.session() as s:
        return [grant_json(g) for g in s.scalars(q)]


def drop_role(fleet: Fleet, g: SupportGrant, *, database_exists: bool = True) -> None:
    """End the role's sessions, take its privileges back, drop it. Idempotent."""
    tenant_db = f"tenant_{g.slug}"
    ident = sql.Identifier(g.role_name)
    with fleet.server_connection(g.server) as conn:
        if not pgserver.role_exists(conn, g.role_name):
            return
        if pgserver.role_comment(conn, g.role_name) != _marker(g.id, g.slug):
            raise Conflict(f"role {g.role_name} on {g.server} is not grant {g.id}'s: "
                           "left alone")
        conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
        pgserver.terminate_sessions(conn, role=g.role_name)
        exists = database_exists and pgserver.database_owner(conn, tenant_db) is not None
    if exists:
        admin = fleet.cfg.server(g.server).admin_dsn
        with pgserver.connect(admin, tenant_db, server=g.server,
                              lock_timeout=fleet.cfg.lock_timeout) as conn:
            conn.execute(sql.SQL(";\n").join([
                sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}").format(ident),
                sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {}").format(ident),
                sql.SQL("REVOKE ALL ON SCHEMA public FROM {}").format(ident),
                sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(
                    sql.Identifier(tenant_db), ident)]))
    with fleet.server_connection(g.server) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))


def _end(fleet: Fleet, g: SupportGrant, why: str, *, revoked: bool) -> None:
    drop_role(fleet, g)
    now = clock.utcnow()
    values: dict[str, Any] = {"dropped_at": now}
    if revoked:
        values["revoked_at"] = now
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(SupportGrant).where(SupportGrant.id == g.id).values(**values))
        fleet.catalog.audit(f"access.{why}", session=s, tenant=g.slug, grant=g.id,
                            to=g.grantee)


def revoke(fleet: Fleet, grant_id: int | None = None) -> list[int]:
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
    for g in rows:
        _end(fleet, g, "revoke", revoked=True)
    return [g.id for g in rows]


def expired(fleet: Fleet, now: datetime) -> list[SupportGrant]:
    with fleet.catalog.session() as s:
        return list(s.scalars(select(SupportGrant).where(
            SupportGrant.dropped_at.is_(None), SupportGrant.expires_at <= now)))


def expire(fleet: Fleet, grant_id: int) -> str:
    with fleet.catalog.session() as s:
        g = s.get(SupportGrant, grant_id)
    if g is None or g.dropped_at is not None:
        return "already ended"
    _end(fleet, g, "expire", revoked=False)
    return f"role {g.role_name} of {g.grantee} dropped"


def drop_tenant_grants(fleet: Fleet, tenant_id: int) -> None:
    """The tenant is going: its grants go with it (called with the database gone)."""
    with fleet.catalog.session() as s:
        rows = list(s.scalars(select(SupportGrant).where(
            SupportGrant.tenant_id == tenant_id, SupportGrant.dropped_at.is_(None))))
    for g in rows:
        drop_role(fleet, g, database_exists=False)
        with fleet.catalog.session() as s, s.begin():
            s.execute(update(SupportGrant).where(SupportGrant.id == g.id)
                      .values(dropped_at=clock.utcnow()))
