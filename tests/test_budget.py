"""Connection budgets on real clusters, through the CLI (issue 19): a sign-up whose
plan no server of the region has room for is refused in one line with nothing made,
placement goes where the budget has room, `tenant set-plan` refuses a plan that would
overrun the server's budget (role and catalog unchanged), `region list` shows each
server's used/total budget (text and JSON), and `doctor` reports a server over its
budget once its budget shrinks under what its tenants hold.

The test clusters have max_connections = 300, of which 13 are the server's
(superuser_reserved_connections 3, reserved_connections 10); a private catalog sees only this test's
tenants, so the budgets start empty."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import OwnCatalog, PgFleet, run_cli
from tests.test_tenant_bounds import role_row

PLANS = """
[plans.small]
connection_limit = 10

[plans.big]
connection_limit = 25
"""


def _budgeted(own: OwnCatalog, budgets: dict[str, int | str]) -> Path:
    """The private catalog's config with these servers' connection_budget, and plans."""
    text = own.config_path.read_text()
    for server, budget in budgets.items():
        line = f'name = "{server}"\n'
        assert line in text
        value = f'"{budget}"' if isinstance(budget, str) else budget
        text = text.replace(line, f"{line}connection_budget = {value}\n", 1)
    own.config_path.write_text(text + PLANS)
    return own.config_path


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout


def _refused(res: subprocess.CompletedProcess[str], says: str) -> None:
    assert res.returncode == 5, res  # ExitCode.CAPACITY
    assert says in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def _servers(test_fleet: PgFleet, config: Path) -> dict[str, dict[str, Any]]:
    regions = json.loads(_ok(run_cli(test_fleet, "region", "list", "--json", config=config)))
    return {s["name"]: s for r in regions for s in r["servers"]}


def test_placement_create_and_set_plan_stay_within_the_budget(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    config = _budgeted(own_catalog, {"eu-central-1": 30, "eu-central-2": 30})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(test_fleet, *args, config=config)

    def create(name: str, plan: str) -> dict[str, Any]:
        out = json.loads(_ok(cli("tenant", "create", name, "--region", "eu-central",
                                 "--plan", plan, "--json")))
        return out

    a, b, c, d = (f"{slug}_{x}" for x in "abcd")
    assert create(a, "small")["server"] == "eu-central-1"  # 10 of 30
    assert create(b, "small")["server"] == "eu-central-2"  # 10 of 30
    # 25 connections fit neither server (20 left on each): refused, nothing made
    res = cli("tenant", "create", c, "--region", "eu-central", "--plan", "big")
    _refused(res, "region 'eu-central' has no room in its servers' connection budgets for "
                  "a tenant of plan 'big' (eu-central-1 has 20 left of the 25 it needs, "
                  "eu-central-2 has 20 left of the 25 it needs)")
    assert cli("tenant", "show", c).returncode != 0  # never registered
    with_role = [r for r in _roles(test_fleet) if c in r]
    assert not with_role, with_role
    assert create(d, "small")["server"] == "eu-central-1"  # 20 of 30

    # a's plan to big: 20 - 10 + 25 = 35 > 30 on eu-central-1: refused, nothing changed
    admin = test_fleet.admin_dsn("eu-central-1")
    res = cli("tenant", "set-plan", a, "big")
    _refused(res, "plan 'big' (25 connections) would overrun server 'eu-central-1''s "
                  "connection budget: 10 of 30 in use without this tenant's 10")
    assert role_row(admin, f"tenant_{a}")[0] == 10
    assert json.loads(_ok(cli("tenant", "show", a, "--json")))["plan"] == "small"
    # b's to big: 10 - 10 + 25 = 25 <= 30 on eu-central-2: done
    changed = json.loads(_ok(cli("tenant", "set-plan", b, "big", "--json")))
    assert (changed["plan"], changed["previous"]) == ("big", "small")
    assert role_row(test_fleet.admin_dsn("eu-central-2"), f"tenant_{b}")[0] == 25

    # region list: used/total per server, in JSON and in the table
    servers = _servers(test_fleet, config)
    assert servers["eu-central-1"]["connection_budget"] == {
        "used": 20, "total": 30, "enforced": True, "configured": 30, "reserve": 10,
        "max_connections": 300, "server_reserved": 13, "pooled": False}
    assert servers["eu-central-2"]["connection_budget"]["used"] == 25
    # a server without connection_budget: shown against max_connections less the
    # server's reserved slots and the reserve
    assert servers["ap-south-1"]["connection_budget"] == {
        "used": 0, "total": 277, "enforced": False, "configured": None, "reserve": 10,
        "max_connections": 300, "server_reserved": 13, "pooled": False}
    # an unreachable server: its total is unknown, the command still answers
    assert servers["down-1"]["connection_budget"]["total"] is None
    table = _ok(cli("region", "list"))
    assert "connections" in table.splitlines()[1]  # a column of the table
    assert re.search(r"eu-central-1 .* 20/30", table), table
    assert re.search(r"eu-central-2 .* 25/30", table), table


def test_doctor_reports_a_server_over_its_budget(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    config = _budgeted(own_catalog, {"eu-central-1": "auto", "eu-central-2": "auto"})
    _ok(run_cli(test_fleet, "tenant", "create", slug, "--region", "eu-central", "--plan",
                "big", config=config))
    # the budget shrinks under what the tenant holds (as max_connections lowered would):
    # a budget of 20 for 25, and a budget above max_connections - reserve
    text = config.read_text()
    text = text.replace('connection_budget = "auto"', "connection_budget = 20", 1)
    text = text.replace('connection_budget = "auto"', "connection_budget = 1000", 1)
    config.write_text(text)
    server = json.loads(_ok(run_cli(test_fleet, "tenant", "show", slug, "--json",
                                    config=config)))["server"]
    res = run_cli(test_fleet, "doctor", "--region", "eu-central", "--json", config=config)
    findings = {(x["code"], x["subject"]): x for x in json.loads(res.stdout)["findings"]}
    assert server == "eu-central-1"  # both empty: the first by name, now with budget 20
    over = findings.get(("server-over-budget", server))
    assert over is not None, findings
    assert over["severity"] == "warning"
    assert "may hold 25 connections, over its connection budget of 20" in over["message"]
    assert ("server-budget-too-large", "eu-central-2") in findings
    assert ("server-over-budget", "eu-central-2") not in findings


def _roles(test_fleet: PgFleet) -> list[str]:
    import psycopg

    with psycopg.connect(test_fleet.admin_dsn("eu-central-1")) as conn:
        return [r for (r,) in conn.execute("SELECT rolname FROM pg_roles")]
