"""`tenantctl tenant psql`: psql on one tenant's database, audited.

The password reaches psql through its environment (PGPASSWORD) or the admin's
passfile, never argv. ``--owner`` connects as the admin role and switches to the
tenant's NOLOGIN owner role at session start (PGOPTIONS ``-c role=…``), so no
owner password exists to leak.
"""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

from psycopg.conninfo import conninfo_to_dict

from orchestrator import provisioning
from orchestrator.errors import Conflict
from orchestrator.localfleet import pg_tool
from orchestrator.models import TenantState

if TYPE_CHECKING:
    from orchestrator.api import Fleet

LIBPQ_ENV = {"host": "PGHOST", "port": "PGPORT", "sslmode": "PGSSLMODE",
             "passfile": "PGPASSFILE", "sslrootcert": "PGSSLROOTCERT"}


def psql_env(fleet: Fleet, slug: str, *, owner: bool) -> dict[str, str]:
    tenant = fleet.get_tenant(slug)
    if tenant.state not in (TenantState.active, TenantState.suspended, TenantState.cancelled):
        raise Conflict(f"tenant {slug!r} is {tenant.state}: its database is not available")
    admin = conninfo_to_dict(fleet.cfg.server(tenant.server).admin_dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    for key, var in LIBPQ_ENV.items():
        if admin.get(key):
            env[var] = str(admin[key])
    env["PGDATABASE"] = tenant.database
    env["PGAPPNAME"] = "tenantctl-psql"
    if owner:
        env["PGUSER"] = str(admin.get("user") or "")
        env["PGOPTIONS"] = f"-c role={tenant.owner_role}"
        if "PGPASSWORD" in os.environ:
            env["PGPASSWORD"] = os.environ["PGPASSWORD"]
    else:
        cred = tenant.credential
        assert cred is not None
        env.pop("PGPASSFILE", None)
        env["PGUSER"] = tenant.login_role
        env["PGPASSWORD"] = fleet.master_key.unwrap(
            cred.password_wrapped, provisioning.password_context(slug)).decode()
    return env


def run(fleet: Fleet, slug: str, *, owner: bool, command: str | None) -> int:
    env = psql_env(fleet, slug, owner=owner)
    tenant = fleet.get_tenant(slug)
    fleet.catalog.audit("tenant.psql", tenant=slug, region=tenant.region,
                        role="owner" if owner else "login",
                        command=command if command is not None else "(interactive)")
    argv = [pg_tool(fleet.cfg, "psql"), "-X", "-v", "ON_ERROR_STOP=1"]
    if command is not None:
        argv += ["-c", command]
    return subprocess.run(argv, env=env, check=False).returncode
