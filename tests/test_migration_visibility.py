"""Migration visibility through the CLI, on real Postgres: `migrate status --check`
(exit 15 for CI and monitoring), `migrate history`, `migrate rollouts [show ID]`,
and a lock timeout that names the session holding the lock.

Each test runs behind a catalog of its own (the test fleet's servers), so the
fleet-wide answers count only the tenants it made.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import psycopg

from orchestrator.adapters import clock
from orchestrator.api import Fleet
from orchestrator.domain.errors import ExitCode
from orchestrator.services import retention
from tests.conftest import OwnCatalog, PgFleet, connect_as, run_cli

OLD = "0004_order_status_idx"
HEAD = "0006_customer_email_ci"


def _cli(test_fleet: PgFleet, own: OwnCatalog, *args: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(test_fleet, *args, config=own.config_path, env=env)


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)


def _poison(fleet: Fleet, slug: str, on: bool = True) -> None:
    """Two customers whose e-mails differ only in case: revision 0006 refuses them."""
    with connect_as(fleet.credentials(slug), autocommit=True) as conn:
        if on:
            conn.execute("INSERT INTO customers (email, name) VALUES "
                         "('Dup@Example.com', 'a'), ('dup@example.com', 'b')")
        else:
            conn.execute("DELETE FROM customers WHERE lower(email) = 'dup@example.com'")


def _status(test_fleet: PgFleet, own: OwnCatalog, *args: str
            ) -> tuple[int, dict[str, Any]]:
    proc = _cli(test_fleet, own, "migrate", "status", "--json", *args)
    return proc.returncode, _json(proc)


def test_status_check_history_and_rollouts(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                           slug: str) -> None:
    own, fleet = own_catalog, own_catalog.fleet
    fleet.set_target_revision(OLD)  # tenants are created at the fleet's target
    a, b, gone = f"{slug}_a", f"{slug}_b", f"{slug}_c"
    fleet.provision(a, "eu-central")
    fleet.provision(b, "ap-south")
    fleet.provision(gone, "eu-central")
    # a tenant without a database is not counted (its last known revision stays OLD)
    retention.erase_tenant(fleet, gone, "visibility test", clock.utcnow())

    # every tenant at the fleet target (though behind head): the check passes
    code, report = _status(test_fleet, own, "--check")
    assert code == ExitCode.OK, report
    assert report["tenants"] == 2 and report["target"] == OLD
    assert report["check"] == {"ok": True, "failed": 0, "off_target": 0, "unreadable": 0,
                               "exit_code": 0}
    assert len(report["behind"]) == 2  # behind head is information, not a failure

    # the target moves to head: both are behind it
    fleet.set_target_revision(HEAD)
    code, report = _status(test_fleet, own, "--check")
    assert code == ExitCode.MIGRATIONS_NOT_CURRENT == 15
    assert report["check"]["off_target"] == 2 and not report["check"]["ok"]
    assert {(o["slug"], o["revision"], o["target"]) for o in report["off_target"]} == \
        {(a, OLD, HEAD), (b, OLD, HEAD)}
    plain = _cli(test_fleet, own, "migrate", "status")  # without --check: exit 0, said
    assert plain.returncode == 0, plain.stderr
    assert "check: 2 tenants not at their target revision" in plain.stdout
    checked = _cli(test_fleet, own, "migrate", "status", "--check")
    assert checked.returncode == 15 and "check: 2 tenants not at" in checked.stdout

    # history: the revisions from the files, the target and where everyone stands
    proc = _cli(test_fleet, own, "migrate", "history", "--json")
    assert proc.returncode == 0, proc.stderr
    history = _json(proc)
    assert history["heads"] == [HEAD] and history["fleet_target"] == HEAD
    ids = [r["id"] for r in history["revisions"]]
    assert ids[0] == "0001_catalog" and ids[-1] == HEAD and OLD in ids
    rows = {r["id"]: r for r in history["revisions"]}
    assert rows[HEAD]["head"] and rows[HEAD]["fleet_target"]
    assert rows[HEAD]["parents"] == ["0005_reorder_level"]
    assert rows[HEAD]["message"] == "customers.email unique regardless of case"
    assert rows[OLD]["tenants"] == 2 and rows[HEAD]["tenants"] == 0
    assert not rows[OLD]["head"] and not rows[OLD]["fleet_target"]
    templates = {t["server"]: t["revision"] for t in report["templates"]}
    for r in history["revisions"]:  # each template under the revision status reads
        assert r["templates"] == sorted(s for s, rev in templates.items() if rev == r["id"])
    human = _cli(test_fleet, own, "migrate", "history")
    assert human.returncode == 0, human.stderr
    assert f"head {HEAD}, fleet target {HEAD}, 2 tenants" in human.stdout
    assert f"{HEAD} <- 0005_reorder_level (head, fleet target): 0 tenants" in human.stdout
    assert f"{OLD} <- 0003_orders: 2 tenants" in human.stdout
    assert "    customers.email unique regardless of case" in human.stdout

    # a rollout in which one tenant fails: failed and behind, the check says both
    _poison(fleet, b)
    proc = _cli(test_fleet, own, "migrate", "rollout", "--max-failures", "100%", "--json")
    assert proc.returncode == ExitCode.FAILED, proc.stderr
    summary = _json(proc)
    rollout_id = summary["rollout_id"]
    assert summary["counts"] == {"ok": 1, "failed": 1}
    assert summary["next_step"] == (f"next: re-run the same command: rollout {rollout_id} "
                                    "is failed, so it starts a new rollout, which migrates "
                                    "the tenants not at the target")
    code, report = _status(test_fleet, own, "--check")
    assert code == 15
    assert report["check"] == {"ok": False, "failed": 1, "off_target": 1, "unreadable": 0,
                               "exit_code": 15}
    assert [f["slug"] for f in report["failed"]] == [b]

    # the rollouts it left, newest first, and one rollout's tenants
    proc = _cli(test_fleet, own, "migrate", "rollouts", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = _json(proc)
    assert listed[0]["id"] == rollout_id
    assert {k: listed[0][k] for k in ("status", "from", "to", "counts", "total")} == \
        {"status": "failed", "from": [OLD], "to": HEAD, "counts": {"failed": 1, "ok": 1},
         "total": 2}
    assert listed[0]["started_at"] and listed[0]["finished_at"] and listed[0]["actor"]
    assert len(_json(_cli(test_fleet, own, "migrate", "rollouts", "--limit", "1",
                          "--json"))) == 1
    proc = _cli(test_fleet, own, "migrate", "rollouts", "show", str(rollout_id), "--json")
    assert proc.returncode == 0, proc.stderr
    shown = _json(proc)
    outcome = {t["slug"]: t for t in shown["tenants"]}
    assert outcome[a]["status"] == "ok" and outcome[a]["to"] == HEAD
    assert outcome[a]["from"] == OLD and outcome[a]["error"] is None
    assert outcome[b]["status"] == "failed" and outcome[b]["to"] == OLD
    assert "unique" in outcome[b]["error"] or "duplicate" in outcome[b]["error"]
    assert shown["errors"] == {outcome[b]["error"]: 1}
    human = _cli(test_fleet, own, "migrate", "rollouts")
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith(f"rollout {rollout_id}: failed, {OLD} -> {HEAD}; "
                                   "failed 1, ok 1 (started ")
    human = _cli(test_fleet, own, "migrate", "rollouts", "show", str(rollout_id))
    assert human.returncode == 0, human.stderr
    assert f"ok      {a} {OLD} -> {HEAD} (wave 1, 1 attempt, " in human.stdout
    assert f"failed  {b} {OLD} -> {OLD} (wave 1, 1 attempt, " in human.stdout
    assert f"rollout {rollout_id}: failed, {OLD} -> {HEAD}" in human.stdout
    assert "options: canary 0, concurrency 8, lock_timeout 2s, max_failures 100%, " \
        "per_server 4, retries 3, statement_timeout 5min, to head, waves 100%\n" in human.stdout

    # bad input: one line, its exit code
    missing = _cli(test_fleet, own, "migrate", "rollouts", "show", "999999")
    assert missing.returncode == ExitCode.NOT_FOUND
    assert missing.stderr.strip() == "error: no rollout 999999"
    huge = _cli(test_fleet, own, "migrate", "rollouts", "show", str(2**70))
    assert huge.returncode == ExitCode.NOT_FOUND, huge.stderr
    bad = _cli(test_fleet, own, "migrate", "rollouts", "--limit", "0")
    assert bad.returncode == ExitCode.INVALID and "--limit must be 1-1000" in bad.stderr
    word = _cli(test_fleet, own, "migrate", "rollouts", "show", "latest")
    assert word.returncode == ExitCode.INVALID
    assert word.stderr.strip() == "error: a rollout id must be a whole number, not 'latest'"
    assert "Traceback" not in missing.stderr + huge.stderr + bad.stderr + word.stderr

    # fixed: everyone current, the check passes again
    _poison(fleet, b, on=False)
    proc = _cli(test_fleet, own, "migrate", "tenant", b)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code, report = _status(test_fleet, own, "--check")
    assert code == 0 and report["check"]["ok"], report
    # a region's own target counts for its tenants
    fleet.set_target_revision(OLD, "ap-south")
    code, report = _status(test_fleet, own, "--check")
    assert code == 15 and report["region_targets"] == {"ap-south": OLD}
    assert [(o["slug"], o["target"]) for o in report["off_target"]] == [(b, OLD)]


def test_lock_timeout_names_the_blocking_session(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                                 slug: str) -> None:
    """A session of the tenant's application holds a lock on the table a migration
    alters: the migration gives up after its lock timeout, and its error names that
    session's pid and application_name with its query redacted, and says what next."""
    own, fleet = own_catalog, own_catalog.fleet
    fleet.set_target_revision(OLD)
    fleet.provision(slug, "eu-central")
    fleet.set_target_revision(HEAD)
    holder = psycopg.connect(fleet.credentials(slug), application_name="visibility-holder")
    try:
        # ACCESS SHARE on products until the transaction ends: 0005's ALTER must wait
        holder.execute("SELECT count(*) FROM products WHERE name = 'secret-sku-4711'")
        pid = holder.info.backend_pid
        proc = _cli(test_fleet, own, "migrate", "rollout", "--lock-timeout", "300ms",
                    "--retries", "1", "--max-failures", "100%", "--json")
        # rollout's progress lines go through rich, which wraps them at 80 columns
        # when piped: wide enough here that the names asserted on stay on one line
        human = _cli(test_fleet, own, "migrate", "tenant", slug, "--lock-timeout", "300ms",
                     "--retries", "0", env={"COLUMNS": "500"})
    finally:
        holder.close()
    assert proc.returncode == ExitCode.FAILED, proc.stderr
    summary = _json(proc)
    (result,) = summary["results"]
    assert result["status"] == "failed" and result["attempts"] == 2
    error = result["error"]
    assert "lock timeout" in error
    assert f"blocked by pid {pid} (application_name 'visibility-holder'" in error
    assert "SELECT count(*) FROM products WHERE name = ?" in error
    assert result["blocked_by"][0]["pid"] == pid
    assert result["blocked_by"][0]["application_name"] == "visibility-holder"
    assert summary["next_step"].startswith("next: 1 tenant gave up waiting for a lock")
    assert "starts a new rollout" in summary["next_step"]
    # the human output: the failed tenant's line names the holder, then the next step
    assert human.returncode == ExitCode.FAILED
    assert f"blocked by pid {pid} (application_name 'visibility-holder'" in human.stdout
    assert "next: 1 tenant gave up waiting for a lock" in human.stdout
    # the catalog keeps it, redacted: `migrate rollouts show` and `migrate status`
    shown = _json(_cli(test_fleet, own, "migrate", "rollouts", "show",
                       str(summary["rollout_id"]), "--json"))
    assert f"blocked by pid {pid}" in shown["tenants"][0]["error"]
    status = _cli(test_fleet, own, "migrate", "status", "--json")
    everything = proc.stdout + proc.stderr + human.stdout + human.stderr + status.stdout
    assert "secret-sku-4711" not in everything + json.dumps(shown)
    # once the holder is gone, the same command succeeds
    again = _cli(test_fleet, own, "migrate", "rollout", "--lock-timeout", "300ms")
    assert again.returncode == 0, again.stdout + again.stderr
