"""Plans ([plans.NAME] in tenantctl.toml): which one a tenant is on, and moving it to
another (`tenant set-plan`). The login role is held to its plan's bounds at
provisioning (services/provisioning.py, the login step) and by `doctor --fix`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from orchestrator.adapters.catalog import usage as usage_store
from orchestrator.adapters.catalog.locks import holding_tenant
from orchestrator.adapters.catalog.models import PLACED_STATES, Server, Tenant
from orchestrator.adapters.faults import checkpoint
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.domain.bounds import Plan
from orchestrator.domain.budget import refuse_plan
from orchestrator.domain.errors import Conflict, TenantctlError, first_line
from orchestrator.domain.states import HAS_DATABASE, TenantState
from orchestrator.services import budget as budgets
from orchestrator.services import pooler, quota
from orchestrator.services.quota import QuotaOutcome

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy.orm import Session

    from orchestrator.bootstrap import Deps


@dataclass(frozen=True)
class PlanChange:
    slug: str
    plan: Plan
    previous: str
    # what the login role was given now; None: the role is not live yet (a tenant being
    # provisioned gets its plan at the login step)
    applied: dict[str, str] | None
    # the storage quota judged again by the new plan (its writes back under a larger
    # quota or none); None: not judged (no database yet)
    quota: QuotaOutcome | None = None

    def to_json(self) -> dict[str, Any]:
        return {"slug": self.slug, "plan": self.plan.name, "previous": self.previous,
                "changed": self.plan.name != self.previous, "limits": self.plan.to_json(),
                "applied": self.applied,
                "quota": None if self.quota is None else self.quota.to_json()}


def apply_plan(deps: Deps, server: str, role: str, plan: Plan) -> dict[str, str]:
    """The plan's CONNECTION LIMIT and role settings on ``role`` (exactly those: any
    other setting the role carries is reset). Settings the admin may not store
    (temp_file_limit without SET on it) are left out, as doctor reports."""
    with deps.server_connection(server) as conn:
        return apply_plan_on(conn, role, plan)


def apply_plan_on(conn: psycopg.Connection, role: str, plan: Plan) -> dict[str, str]:
    """``apply_plan`` over an admin connection the caller holds (provisioning's)."""
    bounds = plan.bounds
    settings = pgserver.settable(conn, bounds.role_settings)
    pgserver.bound_role(conn, role, bounds.connection_limit, settings)
    return {"connection_limit": str(bounds.connection_limit), **settings}


def set_plan(deps: Deps, slug: str, name: str) -> PlanChange:
    """Move a tenant to plan ``name``, at once. An unknown plan, or a tenant without a
    database, is refused before anything changes. The role first, then the catalog:
    a crash between them leaves a role doctor finds differing from its recorded plan
    (and `doctor --fix` puts back)."""
    plan = deps.cfg.plan(name)
    with holding_tenant(deps.catalog, slug):
        tenant = deps.get_tenant(slug)
        previous = tenant.plan
        if tenant.state not in HAS_DATABASE and tenant.state != TenantState.provisioning:
            raise Conflict(f"tenant {slug!r} is {tenant.state}: it has no role to hold "
                           "to a plan")
        # the server's row locked from the budget check to the plan's record: a
        # placement or another set-plan on the server waits (as placements do)
        with deps.catalog.session() as s, s.begin():
            s.execute(select(Server.name).where(Server.name == tenant.server)
                      .with_for_update())
            _check_budget(deps, s, tenant.server, previous, plan)
            applied: dict[str, str] | None = None
            if tenant.state in HAS_DATABASE:
                applied = apply_plan(deps, tenant.server, tenant.login_role, plan)
            checkpoint("set_plan.applied")
            s.execute(update(Tenant).where(Tenant.id == tenant.id).values(plan=plan.name))
            deps.catalog.audit("tenant.set-plan", tenant=slug, region=tenant.region,
                               session=s, plan=plan.name, previous=previous)
        if tenant.state in HAS_DATABASE:  # the pool size of the pooler's entry
            pooler.refresh(deps, tenant.server, changed=slug)
    judged = None
    if applied is not None:  # by the last measured size (`usage collect`)
        latest = usage_store.latest_size(deps.catalog, tenant.id)
        size = latest[0] if latest else None
        try:
            judged = quota.apply(deps, slug, size, deps.clock.now(), trigger="set-plan")
        except TenantctlError as exc:  # the plan stands; the next `usage collect` retries
            judged = QuotaOutcome(slug, "failed", size, plan.storage_quota, None,
                                  first_line(exc))
    return PlanChange(slug, plan, previous, applied, judged)


def _check_budget(deps: Deps, s: Session, server: str, previous: str, plan: Plan) -> None:
    """Refuse a plan that would take the tenant's server over its connection budget
    (where the server enforces one); the tenant's present plan is freed first."""
    if deps.cfg.server(server).connection_budget is None:
        return
    placed = s.execute(select(Tenant.plan, func.count()).where(
        Tenant.server == server, Tenant.state.in_(PLACED_STATES))
        .group_by(Tenant.plan)).all()
    with deps.server_connection(server) as conn:
        slots = pgserver.connection_slots(conn)
    have = budgets.server_budget(deps.cfg, server, [(p, n) for p, n in placed], slots)
    refuse_plan(have, plan.name, budgets.tenant_cost(deps.cfg, server, plan.name),
                freed=budgets.tenant_cost(deps.cfg, server, previous))
