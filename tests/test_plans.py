"""Plans ([plans.NAME]): per-tenant limits on the login role (issue 19, first part).

The fast tier: the config's plans (the implicit "default" is [tenants]' bounds, so a
config without [plans] keeps its tenants as they were), and doctor judging each role
against its own plan. The pg tier, through the CLI on the real test clusters: a
connection over the plan's limit refused, a query over its statement_timeout
cancelled, a temp file over its temp_file_limit refused, `tenant set-plan` changing
the role at once, an unknown plan refused with nothing changed, a tampered role found
by `doctor` and put back by `doctor --fix`, and a migration longer than the plan's
statement_timeout still succeeding (tenantctl's work is not the tenant's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orchestrator.api import Fleet
from orchestrator.config import parse_config
from orchestrator.domain.bounds import DEFAULT_PLAN, TenantBounds
from orchestrator.domain.errors import ConfigError, InvalidInput
from orchestrator.domain.health import Facts, Role, diagnose
from tests.conftest import REPO, TENANTCTL, CleanFleet, OwnCatalog, PgFleet, connect_as, run_cli
from tests.test_doctor_rules import cluster_with, facts, tenant
from tests.test_tenant_bounds import configured, role_row

# -- the config ---------------------------------------------------------------------------


def _config(tenants: dict[str, object], plans: dict[str, object] | None = None
            ) -> dict[str, object]:
    raw: dict[str, object] = {
        "catalog": {"dsn": "host=x dbname=c"}, "master_key": {"file": "k"},
        "tenants": tenants,
        "regions": {"eu": {"backup_store": "file:///tmp/x",
                           "servers": [{"name": "s1", "admin_dsn": "host=x"}]}}}
    if plans is not None:
        raw["plans"] = plans
    return raw


def test_without_plans_every_tenant_is_on_the_implicit_default_plan() -> None:
    cfg = parse_config(_config({"connection_limit": 9, "work_mem": "8MB"}), Path("t"))
    assert cfg.default_plan == DEFAULT_PLAN
    assert list(cfg.plans) == [DEFAULT_PLAN]
    assert cfg.plan(DEFAULT_PLAN).bounds == cfg.bounds  # one source of truth
    assert cfg.bounds.connection_limit == 9 and cfg.bounds.work_mem == "8MB"
    assert cfg.plan(DEFAULT_PLAN).storage_quota is None


def test_plans_take_what_they_leave_out_from_tenants() -> None:
    cfg = parse_config(_config(
        {"connection_limit": 9, "statement_timeout": "30s", "default_plan": "pro"},
        {"pro": {"connection_limit": 50, "statement_timeout": "2min",
                 "idle_in_transaction_session_timeout": "1min", "temp_file_limit": "4GB",
                 "work_mem": "64MB", "storage_quota": "10GB", "pool_size": 20},
         "basic": {"work_mem": "4MB"}}), Path("t"))
    assert cfg.default_plan == "pro"
    pro, basic = cfg.plan("pro"), cfg.plan("basic")
    assert pro.bounds == replace(TenantBounds(), connection_limit=50,
                                 statement_timeout="2min",
                                 idle_in_transaction_session_timeout="1min",
                                 temp_file_limit="4GB", work_mem="64MB")
    assert (pro.storage_quota, pro.pool_size) == (10 * 1024**3, 20)
    assert basic.bounds == replace(cfg.bounds, work_mem="4MB")
    assert (basic.storage_quota, basic.pool_size) == (None, None)
    assert cfg.plan(DEFAULT_PLAN).bounds == cfg.bounds
    assert pro.to_json()["statement_timeout"] == "2min"
    with pytest.raises(InvalidInput, match="unknown plan 'gold' \\(plans: basic, default, "
                       "pro\\)"):
        cfg.plan("gold")


def test_a_default_plan_written_out_replaces_the_implicit_one() -> None:
    cfg = parse_config(_config({"connection_limit": 9},
                               {"default": {"connection_limit": 3}}), Path("t"))
    assert cfg.plan(DEFAULT_PLAN).bounds.connection_limit == 3
    assert cfg.bounds.connection_limit == 9  # [tenants]' own (support roles read it)


@pytest.mark.parametrize(("tenants", "plans", "key"), [
    ({}, {"pro": {"connection_limit": 0}}, "plans.pro.connection_limit"),
    ({}, {"pro": {"connection_limit": "5"}}, "plans.pro.connection_limit"),
    ({}, {"pro": {"statement_timeout": "5 minutes"}}, "plans.pro.statement_timeout"),
    ({}, {"pro": {"statement_timeout": 30}}, "plans.pro.statement_timeout"),
    ({}, {"pro": {"temp_file_limit": "1 GB"}}, "plans.pro.temp_file_limit"),
    ({}, {"pro": {"work_mem": "1kB"}}, "plans.pro.work_mem"),
    ({}, {"pro": {"work_mem": "'; DROP ROLE x; --"}}, "plans.pro.work_mem"),
    ({}, {"pro": {"storage_quota": "lots"}}, "plans.pro.storage_quota"),
    ({}, {"pro": {"storage_quota": 1000}}, "plans.pro.storage_quota"),
    ({}, {"pro": {"pool_size": 0}}, "plans.pro.pool_size"),
    ({}, {"pro": {"support_connection_limit": 1}}, "plans.pro"),
    ({}, {"pro": {"conection_limit": 1}}, "plans.pro"),
    ({}, {"Pro!": {}}, "plans.Pro!"),
    ({}, {"pro": 5}, "plans.pro"),
    ({"default_plan": "gold"}, {"pro": {}}, "tenants.default_plan"),
    ({"default_plan": 1}, None, "tenants.default_plan"),
])
def test_a_bad_plan_is_a_one_line_error_naming_its_key(
        tenants: dict[str, object], plans: dict[str, object] | None, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_config(tenants, plans), Path("t"))
    assert "\n" not in str(err.value) and key in str(err.value), str(err.value)


# -- doctor judges each role against its own plan --------------------------------------------

TINY = TenantBounds(connection_limit=2, statement_timeout="1s", work_mem="64kB")


def _role(limit: int, bounds: TenantBounds) -> Role:
    return Role(False, False, False, False, False, None, frozenset(),
                connection_limit=limit, settings=frozenset(configured(bounds)))


def _plan_facts(role: Role, plan: str) -> Facts:
    t = tenant(1, "acme", plan=plan)
    c = cluster_with(t)
    c.roles[t.login_role] = replace(c.roles[t.login_role], connection_limit=role.connection_limit,
                                    settings=role.settings)
    f = facts([t], {"c": c}, {"s1": "c"})
    f.plans = {DEFAULT_PLAN: TenantBounds(), "tiny": TINY}
    return f


def test_doctor_judges_a_role_by_its_tenants_plan() -> None:
    mine = [x for x in diagnose(_plan_facts(_role(2, TINY), "tiny")) if x.subject == "acme"]
    assert mine == []
    # held to the default plan's bounds while on tiny: found, with the plan to fix it by
    found = [x for x in diagnose(_plan_facts(_role(20, TenantBounds()), "tiny"))
             if x.subject == "acme"]
    assert [x.code for x in found] == ["role-bounds-differ"]
    assert "plan tiny" in found[0].message and "want 2" in found[0].message
    assert found[0].arg("plan") == "tiny" and found[0].fix == "bound_role"
    # a plan the config no longer has: said, not judged
    found = [x for x in diagnose(_plan_facts(_role(2, TINY), "gone")) if x.subject == "acme"]
    assert [x.code for x in found] == ["plan-unknown"]
    assert "set-plan" in found[0].remedy


# -- on real clusters, through the CLI --------------------------------------------------------

PLANS = """
[plans.tiny]
connection_limit = 2
statement_timeout = "1s"
idle_in_transaction_session_timeout = "2s"
temp_file_limit = "1MB"
work_mem = "64kB"
storage_quota = "100MB"
pool_size = 2

[plans.roomy]
connection_limit = 5
statement_timeout = "0"
temp_file_limit = "-1"
work_mem = "8MB"
"""


ROOMY = TenantBounds(connection_limit=5, statement_timeout="0", temp_file_limit="-1",
                     work_mem="8MB")


def run_cli_with(config: Path, *args: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TENANTCTL, "--config", str(config), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120, env={**os.environ, **(env or {})})


def _with_plans(own: OwnCatalog, extra_tenants: str = "", plans: str = PLANS) -> Path:
    text = own.config_path.read_text()
    assert "\n[tenants]\n" in text
    text = text.replace("\n[tenants]\n", "\n[tenants]\n" + extra_tenants, 1)
    own.config_path.write_text(text + plans)
    return own.config_path


def _cli(test_fleet: PgFleet, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(test_fleet, *args, config=config)


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_a_plans_limits_hold_the_tenant_and_set_plan_changes_them(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    config = _with_plans(own_catalog)
    created = json.loads(_ok(_cli(test_fleet, config, "tenant", "create", slug,
                                  "--region", "eu-central", "--plan", "tiny", "--json")))
    assert created["plan"] == "tiny"
    dsn, server = created["dsn"], created["server"]
    admin = test_fleet.admin_dsn(server)
    role = created["role"]
    tiny = TenantBounds(connection_limit=2, statement_timeout="1s",
                        idle_in_transaction_session_timeout="2s", temp_file_limit="1MB",
                        work_mem="64kB")
    assert role_row(admin, role) == (2, configured(tiny))

    # the connection limit: a third connection is refused, the tenant's own two go on
    with connect_as(dsn, autocommit=True) as c1, connect_as(dsn, autocommit=True) as c2:
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            connect_as(dsn).close()
        # statement_timeout: a query longer than 1s is cancelled
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            c1.execute("SELECT pg_sleep(3)")
        # temp_file_limit: a sort spilling past 1MB is refused
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="temp_file_limit"):
            c2.execute("SELECT count(*) FROM (SELECT g::text || repeat('x', 50) "
                       "FROM generate_series(1, 200000) g ORDER BY 1 DESC) s")

    # shown in show and list (a column), and in their JSON
    shown = json.loads(_ok(_cli(test_fleet, config, "tenant", "show", slug, "--json")))
    assert shown["plan"] == "tiny"
    listed = json.loads(_ok(_cli(test_fleet, config, "tenant", "list", "--json")))
    assert [t["plan"] for t in listed if t["slug"] == slug] == ["tiny"]
    table = _ok(_cli(test_fleet, config, "tenant", "list"))
    assert "plan" in table.splitlines()[1]  # a column of the table
    assert any(slug in line and "tiny" in line for line in table.splitlines())

    # set-plan: at once, on the role, audited
    out = json.loads(_ok(_cli(test_fleet, config, "tenant", "set-plan", slug, "roomy",
                              "--json")))
    assert (out["plan"], out["previous"], out["changed"]) == ("roomy", "tiny", True)
    roomy = ROOMY
    assert role_row(admin, role) == (5, configured(roomy))
    with connect_as(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_sleep(1.5)")  # no longer cancelled
        conn.execute("SELECT count(*) FROM (SELECT g::text || repeat('x', 50) "
                     "FROM generate_series(1, 200000) g ORDER BY 1 DESC) s")
    audit = json.loads(_ok(_cli(test_fleet, config, "audit", "list", "--tenant", slug, "--json")))
    assert any(a["action"] == "tenant.set-plan" for a in audit), audit

    # an unknown plan: one line, exit 2, nothing changed
    res = _cli(test_fleet, config, "tenant", "set-plan", slug, "gold")
    assert res.returncode == 2, res
    assert "unknown plan 'gold'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr
    assert role_row(admin, role) == (5, configured(roomy))
    shown = json.loads(_ok(_cli(test_fleet, config, "tenant", "show", slug, "--json")))
    assert shown["plan"] == "roomy"
    res = _cli(test_fleet, config, "tenant", "create", slug + "_x", "--region", "eu-central",
               "--plan", "gold")
    assert res.returncode == 2 and "unknown plan 'gold'" in res.stderr, res
    res = _cli(test_fleet, config, "tenant", "show", slug + "_x")
    assert res.returncode != 0  # never registered



def _of(slug: str, findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """doctor's findings about this tenant (the clean fleet may hold info findings of
    earlier tests, such as the dumps doctor took of orphans)."""
    return [x for x in findings if x["subject"] == slug]


def _problems(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [x for x in report["findings"] if x["severity"] != "info"]


def test_a_role_that_differs_from_its_plan_is_found_and_fixed_by_doctor(
        healthy: Fleet, clean_fleet: CleanFleet, slug: str, tmp_path: Path) -> None:
    """On the clean fleet (doctor finds nothing else there): a tenant on plan roomy
    changes its own settings; doctor reports it against roomy, --fix puts roomy back."""
    config = tmp_path / "plans.toml"
    config.write_text(clean_fleet.config_path.read_text() + PLANS)
    created = json.loads(_ok(run_cli_with(config, "tenant", "create", slug, "--region",
                                          "eu-central", "--plan", "roomy", "--json")))
    dsn, role = created["dsn"], created["role"]
    admin = healthy.cfg.server(created["server"]).admin_dsn
    try:
        assert role_row(admin, role) == (5, configured(ROOMY))
        with connect_as(dsn, autocommit=True) as conn:
            conn.execute(f"ALTER ROLE {role} SET work_mem = '1GB'")
            conn.execute(f"ALTER ROLE {role} SET statement_timeout = '1h'")
        res = run_cli_with(config, "doctor", "--json")
        found = _of(slug, json.loads(res.stdout)["findings"])
        assert [x["code"] for x in found] == ["role-bounds-differ"], found
        assert found[0]["subject"] == slug
        assert "plan roomy" in found[0]["message"] and "work_mem=1GB" in found[0]["message"]
        res = run_cli_with(config, "doctor", "--fix")
        assert res.returncode == 0 and "plan roomy" in res.stdout, res
        assert role_row(admin, role) == (5, configured(ROOMY))
        assert _problems(json.loads(_ok(run_cli_with(config, "doctor", "--json")))) == []

        # a set-plan that dies between the role and the catalog: the catalog still says
        # roomy, doctor finds the role on tiny's bounds and --fix puts roomy's back
        res = run_cli_with(config, "tenant", "set-plan", slug, "tiny",
                           env={"TENANTCTL_FAULT": "set_plan.applied"})
        assert res.returncode < 0, res  # killed
        assert role_row(admin, role)[0] == 2
        shown = json.loads(_ok(run_cli_with(config, "tenant", "show", slug, "--json")))
        assert shown["plan"] == "roomy"
        found = _of(slug, json.loads(run_cli_with(config, "doctor", "--json").stdout)["findings"])
        assert [x["code"] for x in found] == ["role-bounds-differ"], found
        _ok(run_cli_with(config, "doctor", "--fix"))
        assert role_row(admin, role) == (5, configured(ROOMY))
    finally:
        # the clean fleet's own config has no roomy: back to the default plan
        _ok(run_cli_with(config, "tenant", "set-plan", slug, "default"))
        assert role_row(admin, role) == (TenantBounds().connection_limit,
                                         configured(TenantBounds()))


def test_the_default_plan_and_a_config_without_plans(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    """Without [plans], a tenant is on "default" = [tenants]' bounds, as before plans;
    with default_plan, a tenant created without --plan gets it."""
    config = own_catalog.config_path
    before = json.loads(_ok(_cli(test_fleet, config, "tenant", "create", slug,
                                 "--region", "eu-central", "--json")))
    assert before["plan"] == DEFAULT_PLAN
    admin = test_fleet.admin_dsn(before["server"])
    assert role_row(admin, before["role"]) == (TenantBounds().connection_limit,
                                               configured(TenantBounds()))
    _with_plans(own_catalog, extra_tenants='default_plan = "tiny"\n')
    after = json.loads(_ok(_cli(test_fleet, config, "tenant", "create", slug + "_2",
                                "--region", "eu-central", "--json")))
    assert after["plan"] == "tiny"
    assert role_row(test_fleet.admin_dsn(after["server"]), after["role"])[0] == 2
    assert role_row(admin, before["role"])[0] == TenantBounds().connection_limit
    # the earlier tenant stays on "default"
    shown = json.loads(_ok(_cli(test_fleet, config, "tenant", "show", slug, "--json")))
    assert shown["plan"] == DEFAULT_PLAN


SLEEPY = '''"""Takes longer than the tiny plan's statement_timeout.

Revision ID: zz_plans_sleep
Revises: {down}
"""

from alembic import op

revision = "zz_plans_sleep"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SELECT pg_sleep(1.5)")


def downgrade() -> None:
    pass
'''


def test_a_migration_longer_than_the_plans_statement_timeout_succeeds(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str, tmp_path: Path) -> None:
    """Migrations run as the admin (SET ROLE to the owner), not as the login role:
    the plan's statement_timeout is not theirs."""
    from orchestrator.config import builtin_migrations_dir

    migrations = tmp_path / "migrations"
    shutil.copytree(builtin_migrations_dir(), migrations,
                    ignore=shutil.ignore_patterns("__pycache__"))
    heads = sorted(p.stem for p in (migrations / "versions").glob("0*.py"))
    (migrations / "versions" / "zz_plans_sleep.py").write_text(SLEEPY.format(down=heads[-1]))
    config = _with_plans(own_catalog, extra_tenants=f'migrations = "{migrations}"\n'
                         'default_plan = "tiny"\n')
    text = config.read_text()
    assert "use_template = true" in text  # off: each database migrated on its own
    config.write_text(text.replace("use_template = true", "use_template = false"))
    created = json.loads(_ok(_cli(test_fleet, config, "tenant", "create", slug,
                                  "--region", "eu-central", "--json")))
    assert (created["plan"], created["revision"]) == ("tiny", "zz_plans_sleep")
    # the tenant's own sessions are bounded
    with connect_as(created["dsn"], autocommit=True) as conn, \
            pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(1.5)")
