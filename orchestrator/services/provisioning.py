"""Provisioning: a state machine recorded in the catalog, one step at a time.

    registered -> roles -> database -> schema -> privileges -> login -> (active)

The catalog row (with the planned names and the wrapped password) is written
before anything exists on the server, so nothing can ever be created that the
catalog does not know of. Each step checks the server before acting, so a
re-run after a crash at any point finishes the job; the tenant's advisory lock
keeps two processes from working on the same slug at once.

With a pool of spares (``orchestrator.services.spares``) the roles, database, schema and
privileges steps are one server transaction that renames a spare into the
tenant's names; the row then goes from registered straight to privileges.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy.exc
from alembic.util.exc import CommandError
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backups import service as pipeline
from backups.restore import restore_into
from orchestrator.adapters import clock
from orchestrator.adapters.catalog.db import server_error, with_dbname
from orchestrator.adapters.catalog.locks import holding_tenant
from orchestrator.adapters.catalog.models import (
    PLACED_STATES,
    UNSHOWN,
    Server,
    Tenant,
    TenantCredential,
    TenantState,
)
from orchestrator.adapters.faults import checkpoint
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import alembic_runner as tenant_migrations
from orchestrator.adapters.postgres import spare_pool
from orchestrator.domain.errors import (
    FIELD,
    Conflict,
    ServerUnavailable,
    TenantctlError,
    first_line,
)
from orchestrator.domain.names import (
    TEMPLATE_DB,
    TenantNames,
    check_integrity,
    password_context,
    tenant_lock,
    tenant_names,
    validate_slug,
)
from orchestrator.domain.placement import ServerLoad, choose_server
from orchestrator.domain.views import tenant_json
from orchestrator.services import budget as budgets
from orchestrator.services import plans, pooler, templates

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

STEPS = ("registered", "roles", "database", "schema", "privileges", "login")


@dataclass
class ProvisionResult:
    tenant: dict[str, Any]
    dsn: str
    resumed: bool
    via_template: bool
    # one line each: what did not stop the sign-up (a pooler that is down)
    warnings: list[str] = field(default_factory=list)
    direct_dsn: str | None = None  # when ``dsn`` is the pooler's


@dataclass
class Provisioned:
    tenant: Tenant
    password: str
    resumed: bool
    via_template: bool


def provision(fleet: Deps, slug: str, region: str, *, restore_from: int | None = None,
              plan: str | None = None) -> Provisioned:
    """Create (or finish creating) a tenant. With ``restore_from``, its database is
    filled from that backup instead of the template. ``plan``: its [plans.NAME]
    (default: the config's default plan)."""
    validate_slug(slug)
    fleet.cfg.region(region)  # unknown region: error before anything else
    if plan is not None:
        fleet.cfg.plan(plan)  # unknown plan: likewise
    master = fleet.keys.master  # a missing key fails here, before any change
    with holding_tenant(fleet.catalog, slug):
        tenant = fleet.find_tenant(slug)
        resumed = tenant is not None
        if tenant is not None:

            check_integrity(tenant)
            if _unshown(tenant, region, restore_from):
                # it went live, but its connection string never reached anybody
                # (the process died before its output): show it now
                password = master.unwrap(tenant.credential.password_wrapped,  # type: ignore[union-attr]
                                         password_context(slug)).decode()
                fleet.catalog.audit("tenant.credentials.show", tenant=slug,
                                    region=tenant.region, via="tenant create")
                return Provisioned(tenant, password, True, False)
            if tenant.state != TenantState.provisioning:
                raise Conflict(f"tenant {slug!r} already exists ({tenant.state}, region "
                               f"{tenant.region})")
            if tenant.restored_from != restore_from:
                raise Conflict(f"tenant {slug!r} is being provisioned "
                               + (f"from backup {tenant.restored_from}"
                                  if tenant.restored_from else "without a backup")
                               + "; finish it the same way")
            if tenant.region != region:
                raise Conflict(f"tenant {slug!r} is being provisioned in region "
                               f"{tenant.region}, not {region}; re-run with {FIELD} "
                               f"{tenant.region} to finish it", field="region")
            if plan is not None and tenant.plan != plan:
                raise Conflict(f"tenant {slug!r} is being provisioned with plan "
                               f"{tenant.plan}, not {plan}; re-run with {FIELD} "
                               f"{tenant.plan} (or without it) to finish it", field="plan")
            password = master.unwrap(tenant.credential.password_wrapped,  # type: ignore[union-attr]
                                     password_context(slug)).decode()
        else:
            password = fleet.keys.new_password()
            tenant = _register(fleet, slug, region, password, restore_from,
                               plan or fleet.cfg.default_plan)
            checkpoint("provision.registered")
        via_template = _run_steps(fleet, tenant, password)
        done = fleet.get_tenant(slug)
        # the pooler lists it from now on; a pooler that is down is a warning only
        pooler.refresh(fleet, done.server, changed=slug)
        return Provisioned(done, password, resumed, via_template)


def provision_tenant(fleet: Deps, slug: str, region: str, *,
                     restore_from: int | None = None, shown: bool = True,
                     plan: str | None = None) -> ProvisionResult:
    """Create (or finish creating) a tenant; the result carries its connection
    string. With ``shown=False`` the caller calls ``credentials_shown`` once the
    string has reached its reader; until then a re-run returns it again."""
    done = provision(fleet, slug, region, restore_from=restore_from, plan=plan)
    dsn = fleet.tenant_dsn(done.tenant, done.password)
    direct = fleet.tenant_dsn(done.tenant, done.password, direct=True)
    result = ProvisionResult(tenant_json(done.tenant), dsn, done.resumed, done.via_template,
                             list(fleet.warnings), direct if direct != dsn else None)
    if shown:
        fleet.credentials_shown(slug)
    return result


def restore_as(fleet: Deps, backup_id: int, new_slug: str) -> ProvisionResult:
    validate_slug(new_slug)
    row = pipeline.get_backup(fleet, backup_id)
    existing = fleet.find_tenant(new_slug)
    resuming = existing is not None and existing.state == TenantState.provisioning \
        and existing.restored_from == backup_id
    if existing is not None and not resuming:
        raise Conflict(f"tenant {new_slug!r} already exists")
    pipeline.verify_backup(fleet, backup_id)  # a bad backup stops here, nothing made
    try:
        result = provision_tenant(fleet, new_slug, row.region, restore_from=backup_id,
                                  plan=existing.plan if resuming and existing is not None
                                  else _source_plan(fleet, row.slug))
    except TenantctlError:
        abandon(fleet, new_slug, backup_id)
        raise
    fleet.catalog.audit("backup.restore", tenant=new_slug, region=row.region,
                        backup=backup_id, source=row.slug)
    return result


def _source_plan(fleet: Deps, slug: str) -> str | None:
    """The plan of the tenant a backup was taken of, for its copy: the same limits
    and quota (the default plan when that tenant is gone or its plan is no longer
    configured)."""
    source = fleet.find_tenant(slug)
    return source.plan if source is not None and source.plan in fleet.cfg.plans else None


def abandon(fleet: Deps, slug: str, backup_id: int) -> None:
    """Remove a tenant that was being made from a backup and failed: its database,
    its roles (only if they carry our marker), its catalog rows."""
    with fleet.catalog.advisory_lock(tenant_lock(slug)) as got:
        if not got:
            return
        tenant = fleet.find_tenant(slug)
        if tenant is None or tenant.state != TenantState.provisioning \
                or tenant.restored_from != backup_id:
            return
        names = tenant_names(slug)
        marker = pgserver.role_marker(tenant.id, slug)
        with fleet.server_connection(tenant.server) as conn:
            pgserver.drop_marked_tenant(conn, names, marker)
        with fleet.catalog.session() as s, s.begin():
            row = s.get(Tenant, tenant.id)
            if row is not None:
                s.delete(row)
            fleet.catalog.audit("backup.restore", tenant=slug, region=tenant.region,
                                session=s, outcome="abandoned", backup=backup_id)


def _unshown(tenant: Tenant, region: str, restore_from: int | None) -> bool:
    return tenant.state == TenantState.active and tenant.step == UNSHOWN \
        and tenant.credential is not None and tenant.region == region \
        and tenant.restored_from == restore_from


def _server_loads(fleet: Deps, session: Session, region: str, plan: str
                  ) -> tuple[list[ServerLoad], dict[str, list[tuple[str, int]]]]:
    """The region's servers' loads for a new tenant of ``plan`` (budgets not read
    yet), and each server's placed tenants by plan."""
    # Lock the region's server rows: concurrent placements in one region queue
    # here, so two of them never take the last place (or connections) on a server.
    servers = session.scalars(select(Server).where(Server.region == region)
                              .order_by(Server.name).with_for_update()).all()
    placed: dict[str, list[tuple[str, int]]] = {}
    for server, tplan, n in session.execute(
            select(Tenant.server, Tenant.plan, func.count()).where(
                Tenant.region == region, Tenant.state.in_(PLACED_STATES))
            .group_by(Tenant.server, Tenant.plan)).all():
        placed.setdefault(server, []).append((tplan, n))
    known = {s.name for s in fleet.cfg.servers}
    return [ServerLoad(s.name, sum(n for _, n in placed.get(s.name, ())), s.capacity,
                       # a server out of the config, drained or retired takes no new tenant
                       s.available and s.accepting and s.name in known,
                       cost=budgets.tenant_cost(fleet.cfg, s.name, plan)
                       if s.name in known else 0)
            for s in servers], placed


def _place(fleet: Deps, session: Session, region: str, plan: str) -> str:
    """Choose the tenant's server: room in tenants and, where the server enforces a
    connection budget, in connections (its max_connections read as it is tried)."""
    loads, placed = _server_loads(fleet, session, region, plan)
    while True:
        server = choose_server(region, loads, plan)
        load = next(ld for ld in loads if ld.name == server)
        enforced = fleet.cfg.server(server).connection_budget is not None
        try:
            with fleet.server_connection(server) as conn:
                if not enforced or load.budget_left is not None:
                    return server
                left = budgets.server_budget(fleet.cfg, server, placed.get(server, ()),
                                             pgserver.connection_slots(conn)).remaining
            # read now: choose again with what it has left (it may still be the one)
            loads = [replace(ld, budget_left=left) if ld.name == server else ld
                     for ld in loads]
        except ServerUnavailable:
            # Try the next server of the region; if none is left, say why.
            loads = [replace(ld, available=False) if ld.name == server else ld
                     for ld in loads]
            if not any(ld.has_room for ld in loads):
                raise


def _register(fleet: Deps, slug: str, region: str, password: str,
              restore_from: int | None = None, plan: str | None = None) -> Tenant:
    names = tenant_names(slug)
    plan = plan or fleet.cfg.default_plan
    with fleet.catalog.session() as s, s.begin():
        server = _place(fleet, s, region, plan)
        tenant = Tenant(slug=slug, region=region, server=server, database=names.database,
                        login_role=names.login_role, owner_role=names.owner_role,
                        state=TenantState.provisioning, step="registered",
                        restored_from=restore_from, plan=plan or fleet.cfg.default_plan)
        master = fleet.keys.writing_key(s)  # a stray key: refused, nothing written
        tenant.credential = TenantCredential(
            password_wrapped=master.wrap(password.encode(), password_context(slug)),
            master_key_id=master.key_id)
        s.add(tenant)
        try:
            s.flush()
        except IntegrityError:
            raise Conflict(f"tenant {slug!r} already exists") from None
        # the tenant's own backup key, from the first moment the tenant exists
        s.add(fleet.keys.new_key(master, tenant.id, slug))
        fleet.catalog.audit("tenant.provision.start", tenant=slug, region=region,
                            session=s, server=server, plan=tenant.plan)
    return tenant


def _progress(fleet: Deps, tenant_id: int, **fields: object) -> None:
    """Record a finished step. Without waiting for the WAL flush: a lost progress
    marker only makes a re-run redo an idempotent step, never skip one."""
    with fleet.catalog.session() as s, s.begin():
        s.execute(text("SET LOCAL synchronous_commit = off"))
        s.execute(update(Tenant).where(Tenant.id == tenant_id).values(**fields))


def _run_steps(fleet: Deps, tenant: Tenant, password: str) -> bool:
    """Carry out the steps after ``tenant.step``. True if the database was cloned
    from the template."""
    names = tenant_names(tenant.slug)
    done = STEPS.index(tenant.step) if tenant.step in STEPS else 0
    revision = tenant.revision
    via_template = False
    current = "registered"
    marker = pgserver.role_marker(tenant.id, tenant.slug)
    try:
        with fleet.server_connection(tenant.server) as conn:
            if done < STEPS.index("roles") and _uses_spares(fleet, tenant):
                current = "roles"
                target = fleet.target_revision(tenant.region)
                if spare_pool.claim(conn, names, marker, target):  # roles to privileges at once
                    checkpoint("provision.spare")
                    _progress(fleet, tenant.id, step="privileges", revision=target)
                    done, revision, via_template = STEPS.index("privileges"), target, True
            if done < STEPS.index("roles"):
                current = "roles"
                pgserver.ensure_roles(conn, names, marker)
                checkpoint("provision.roles")
                _progress(fleet, tenant.id, step="roles")
            if done < STEPS.index("database"):
                current = "database"
                via_template = _create_database(fleet, conn, names, tenant.server,
                                                use_template=tenant.restored_from is None)
                checkpoint("provision.database")
                _progress(fleet, tenant.id, step="database")
            if done < STEPS.index("privileges"):
                current = "schema"
                revision = _schema_and_privileges(fleet, tenant, done)
            # A rollout may have moved the target since the schema step (it cannot
            # touch this tenant while we hold its lock): catch up before going live.
            target = fleet.target_revision(tenant.region)
            if revision != target:
                current = "schema"
                revision = _migrate_to(fleet, tenant, target)
            current = "login"
            # bounded by its plan before it can log in, whichever way its roles were
            # made (a claimed spare's too: spares get their plan here, at the claim)
            plans.apply_plan_on(conn, names.login_role, fleet.cfg.plan(tenant.plan))
            pgserver.enable_login(conn, names.login_role, password)
            checkpoint("provision.login")
    except Exception as exc:
        # Every failure is recorded on the tenant and audited, whatever raised it.
        msg = first_line(exc)
        _progress(fleet, tenant.id, last_error=f"{current}: {msg}")
        fleet.catalog.audit("tenant.provision", tenant=tenant.slug, region=tenant.region,
                            outcome="failed", step=current, error=msg)
        if isinstance(exc, TenantctlError):
            raise
        if isinstance(exc, psycopg.Error | sqlalchemy.exc.SQLAlchemyError | CommandError):
            raise TenantctlError(
                f"provisioning {tenant.slug!r} stopped at step {current}: {msg}; "
                f"re-run `tenantctl tenant create {tenant.slug} --region {tenant.region}` "
                "to finish") from None
        raise
    now = clock.utcnow()
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.id == tenant.id).values(
            state=TenantState.active, step=UNSHOWN, revision=revision, activated_at=now,
            last_error=None))
        s.execute(update(TenantCredential).where(TenantCredential.tenant_id == tenant.id)
                  .values(applied_at=now))
        fleet.catalog.audit("tenant.provision", tenant=tenant.slug, region=tenant.region,
                            session=s, server=tenant.server, revision=revision,
                            via_template=via_template)
    checkpoint("provision.active")
    if _uses_spares(fleet, tenant):
        # one spare taken, or the pool found short: top it up, off the sign-up's path
        # (and after it, when this sign-up had to build the template first)
        fleet.refill_spares(tenant.server)
    return via_template


def _uses_spares(fleet: Deps, tenant: Tenant) -> bool:
    # a restore needs an empty database, not a copy of the template
    return fleet.cfg.use_template and fleet.cfg.spare_databases > 0 and \
        tenant.restored_from is None


def _create_database(fleet: Deps, conn: psycopg.Connection, names: TenantNames,
                     server: str, *, use_template: bool = True) -> bool:
    """Clone the server's template if it is at head (building or upgrading it first
    if needed); otherwise create an empty database for the migrations to fill."""
    if fleet.cfg.use_template and use_template:
        target = fleet.target_revision(fleet.cfg.server(server).region)
        # the template is the cluster's, shared by every server entry that names it
        lock = templates.lock_name(pgserver.cluster_identity(conn))
        for attempt in range(2):
            with fleet.catalog.advisory_lock(lock, shared=True, wait=True):
                if templates.at_revision(conn, target):
                    pgserver.ensure_database(conn, names, template=TEMPLATE_DB)
                    return True
            if attempt == 0 and not _try_build_template(fleet, server, target):
                break
    pgserver.ensure_database(conn, names, template=None)
    return False


def _try_build_template(fleet: Deps, server: str, target: str | None) -> bool:
    try:
        templates.build(fleet, server, target)
        return True
    except (TenantctlError, psycopg.Error, sqlalchemy.exc.SQLAlchemyError,
            CommandError) as exc:
        # No usable template: fall back to migrating an empty database, and leave a
        # trace for `tenantctl template build` to pick up.
        fleet.catalog.audit("template.build", outcome="failed", server=server,
                            error=first_line(exc))
        return False


def _migrate_to(fleet: Deps, tenant: Tenant, target: str | None) -> str | None:
    names = tenant_names(tenant.slug)
    dsn = with_dbname(fleet.cfg.server(tenant.server).admin_dsn, names.database)
    with tenant_migrations.tenant_connection(dsn) as sconn:
        return tenant_migrations.migrate(sconn, fleet.cfg.tenant_migrations, target or "base",
                                         as_role=names.owner_role)


def _schema_and_privileges(fleet: Deps, tenant: Tenant, done: int) -> str | None:
    """In the tenant's database, on one connection: take over the template's objects,
    migrate to head if the database is behind (as the owner role), then grant.
    On the template path all of it is a single transaction."""
    names = tenant_names(tenant.slug)
    dsn = with_dbname(fleet.cfg.server(tenant.server).admin_dsn, names.database)
    # read now, not at the start: a rollout that began meanwhile has moved it
    target = fleet.target_revision(tenant.region)
    try:
        with tenant_migrations.tenant_connection(dsn) as sconn:
            pconn = sconn.connection.driver_connection
            assert isinstance(pconn, psycopg.Connection)
            with sconn.begin():
                if done < STEPS.index("schema"):
                    pgserver.reassign_from_template(pconn, names)
                revision = tenant_migrations.current_revision(sconn)
                restore = tenant.restored_from is not None and revision is None
                granted = revision == target and not restore
                if granted:
                    pgserver.secure_tenant_database(pconn, names)
            if restore:
                assert tenant.restored_from is not None
                restore_into(fleet, tenant.restored_from, dsn, names.owner_role)
                with sconn.begin():
                    revision = tenant_migrations.current_revision(sconn)
            if revision != target:
                revision = tenant_migrations.migrate(
                    sconn, fleet.cfg.tenant_migrations, target or "base",
                    as_role=names.owner_role)
            checkpoint("provision.schema")
            _progress(fleet, tenant.id, step="schema", revision=revision)
            if not granted:
                with sconn.begin():
                    pgserver.secure_tenant_database(pconn, names)
            checkpoint("provision.privileges")
            _progress(fleet, tenant.id, step="privileges")
            return revision
    except psycopg.OperationalError as exc:
        raise server_error(f"database {names.database}", exc) from None
