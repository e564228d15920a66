"""`tenantctl tenant psql`: psql on one tenant's database, audited.

The password reaches psql through a passfile of its own (0600, removed when psql
ends) or the admin's passfile, never argv nor psql's environment (which ``\\!``
shows); that environment is the allow-list of `childenv.child_env`. ``--owner``
connects as the admin role and switches to the tenant's NOLOGIN owner role at
session start (PGOPTIONS ``-c role=…``), so no owner password exists to leak.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.catalog.models import Tenant
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.domain.errors import Conflict
from orchestrator.domain.names import password_context
from orchestrator.domain.states import HAS_DATABASE

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

def psql_env(fleet: Deps, tenant: Tenant, *, owner: bool) -> dict[str, str]:
    slug = tenant.slug
    if tenant.state not in HAS_DATABASE:
        raise Conflict(f"tenant {slug!r} is {tenant.state}: its database is not available")
    env = pgserver.libpq_env(with_dbname(fleet.cfg.server(tenant.server).admin_dsn,
                                         tenant.database))
    env["PGAPPNAME"] = "tenantctl-psql"
    if owner:  # the admin role, switched to the NOLOGIN owner at session start
        env["PGOPTIONS"] = f"-c role={tenant.owner_role}"
    else:
        cred = tenant.credential
        assert cred is not None
        env.pop("PGPASSFILE", None)
        env["PGUSER"] = tenant.login_role
        env["PGPASSWORD"] = fleet.keys.master.unwrap(
            cred.password_wrapped, password_context(slug)).decode()
    return env


def run(fleet: Deps, slug: str, *, owner: bool, command: str | None) -> int:
    tenant = fleet.get_tenant(slug)
    env = psql_env(fleet, tenant, owner=owner)
    fleet.catalog.audit("tenant.psql", tenant=slug, region=tenant.region,
                        role="owner" if owner else "login",
                        command=command if command is not None else "(interactive)")
    argv = [fleet.pg_tools.path("psql"), "-X", "-v", "ON_ERROR_STOP=1"]
    if command is not None:
        argv += ["-c", command]
    with pgserver.passfile_env(env) as env:
        return subprocess.run(argv, env=env, check=False).returncode
