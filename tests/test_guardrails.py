"""Guardrails through the CLI, on real clusters behind a catalog of the test's own: a
downgrade or destructive rollout, fleet-wide password rotation, master-key rotation
and the breach drill ask first (a terminal) or need --yes; with neither they refuse
with exit 2 and change nothing. A plain upgrade never asks."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import func, select, update

from orchestrator.adapters.catalog.models import Rollout, Tenant, TenantCredential
from orchestrator.adapters.crypto import tenant_keys as keys
from orchestrator.adapters.crypto.masterkey import write_key_file
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import revision_marks
from orchestrator.api import Fleet
from orchestrator.domain.destructive_sql import MARK
from orchestrator.domain.names import TEMPLATE_DB
from tests.conftest import REPO, TENANTCTL, OwnCatalog, PgFleet, connect_as, mark_and_version

OLD = "0004_order_status_idx"
HEAD = "0006_customer_email_ci"
SERVERS = ("eu-central-1", "eu-central-2", "ap-south-1")


def cli(own: OwnCatalog, *args: str) -> subprocess.CompletedProcess[str]:
    """No terminal: stdin is /dev/null (never the terminal pytest may run on)."""
    return subprocess.run([*TENANTCTL, "--config", str(own.config_path), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          stdin=subprocess.DEVNULL)


def tty_cli(own: OwnCatalog, answer: str, *args: str) -> subprocess.CompletedProcess[str]:
    """stdin is a terminal (a pty) on which ``answer`` is typed."""
    primary, secondary = pty.openpty()
    try:
        os.write(primary, answer.encode())
        proc = subprocess.run([*TENANTCTL, "--config", str(own.config_path), *args],
                              capture_output=True, text=True, cwd=REPO, timeout=300,
                              stdin=secondary)
    finally:
        os.close(secondary)
        os.close(primary)
    return proc


def refused(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line, proc.stderr
    for w in ("--yes", "nothing changed", *words):
        assert w in line, (w, line)


def snapshot(fleet: Fleet, slugs: list[str]) -> dict[str, Any]:
    """What any of these commands could change: each tenant's revision (catalog, its
    mark, its database), the fleet target, the templates, the rollouts, the stored
    passwords and the master key."""
    templates = {}
    for server in SERVERS:
        with pgserver.connect(fleet.cfg.server(server).admin_dsn) as conn:
            templates[server] = revision_marks.published(conn, [TEMPLATE_DB]).get(TEMPLATE_DB)
    with fleet.catalog.session() as s:
        rollouts = s.scalar(select(func.count()).select_from(Rollout))
        passwords = sorted(s.execute(select(TenantCredential.tenant_id,
                                            TenantCredential.password_wrapped,
                                            TenantCredential.master_key_id)).all())
        master = (keys.catalog_key_id(s), keys.wrapped_key_ids(s))
    return {"tenants": {x: (fleet.get_tenant(x).revision, *mark_and_version(fleet, x))
                        for x in slugs},
            "target": fleet.target_revision(), "templates": templates,
            "rollouts": rollouts, "passwords": passwords, "master": master}


def _tenants(own: OwnCatalog, slug: str, n: int = 2) -> tuple[list[str], dict[str, str]]:
    slugs = [f"{slug}_{i}" for i in range(n)]
    for i, x in enumerate(slugs):
        own.fleet.provision(x, "eu-central" if i % 2 else "ap-south")
    return slugs, {x: own.fleet.credentials(x) for x in slugs}


def test_downgrade_rollout_refused_without_terminal_or_yes(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    slugs, _ = _tenants(own, slug)
    before = snapshot(own.fleet, slugs)
    assert set(before["tenants"].values()) == {(HEAD, HEAD, HEAD)}
    # the whole fleet (which would also move the target and the templates), JSON or
    # not, and one tenant: refused, one line saying what it would have done
    for args in (["migrate", "rollout", "--canary", "1", "--waves", "1,100%", "--to", OLD],
                 ["migrate", "rollout", "--to", OLD, "--json"]):
        refused(cli(own, *args), "2 tenants", f"downgrade {HEAD} → {OLD}",
                f"fleet target downgrade {HEAD} → {OLD}",
                "1 DROP COLUMN (products.reorder_level)")
    refused(cli(own, "migrate", "tenant", slugs[0], "--to", OLD), "1 tenant",
            f"downgrade {HEAD} → {OLD}", "DROP COLUMN (products.reorder_level)")
    assert snapshot(own.fleet, slugs) == before  # not a tenant, target, template or row

    # the dry run marks the statement, and says a real run would ask
    dry = cli(own, "migrate", "rollout", "--to", OLD, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"-- {MARK}: DROP COLUMN products.reorder_level\nALTER TABLE products DROP " \
        "COLUMN reorder_level;" in dry.stdout
    assert f"-- {MARK}: DROP INDEX ix_customers_email_lower\n" in dry.stdout
    assert "  !! DROP COLUMN products.reorder_level" in dry.stdout
    assert "destructive: 1 DROP COLUMN, 2 DROP INDEX" in dry.stdout
    guard = json.loads(cli(own, "migrate", "rollout", "--to", OLD, "--dry-run",
                           "--json").stdout)["guard"]
    assert guard["needs_confirmation"] and guard["downgrade"] and guard["tenants"] == 2
    assert {"kind": "DROP COLUMN", "subject": "products.reorder_level",
            "statement": "ALTER TABLE products DROP COLUMN reorder_level;"} \
        in guard["destructive"]
    assert guard["target_move"] == {"region": None, "from": HEAD, "to": OLD,
                                    "downgrade": True, "servers": 5}
    assert snapshot(own.fleet, slugs) == before

    # --yes: done (scoped to the tenants, so the shared templates stay at head)
    down = cli(own, "migrate", "rollout", "--tenants", ",".join(slugs), "--to", OLD,
               "--yes", "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["counts"] == {"ok": 2}
    assert {mark_and_version(own.fleet, x) for x in slugs} == {(OLD, OLD)}
    # the way back up adds a column and indexes: no question, no --yes, no terminal
    up = cli(own, "migrate", "rollout", "--tenants", ",".join(slugs), "--json")
    assert up.returncode == 0, up.stderr
    assert {mark_and_version(own.fleet, x) for x in slugs} == {(HEAD, HEAD)}
    one = cli(own, "migrate", "tenant", slugs[0], "--to", OLD, "--yes", "--json")
    assert one.returncode == 0 and mark_and_version(own.fleet, slugs[0]) == (OLD, OLD)
    assert cli(own, "migrate", "tenant", slugs[0], "--json").returncode == 0
    assert mark_and_version(own.fleet, slugs[0]) == (HEAD, HEAD)
    # a catalog revision the files do not know (a newer deploy's): nothing to judge,
    # no question; the run reads the database's own revision
    with own.fleet.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.slug == slugs[1]).values(
            revision="0099_from_the_future"))
    dry = cli(own, "migrate", "rollout", "--tenants", slugs[1], "--dry-run")
    assert dry.returncode == 0 and "Traceback" not in dry.stderr, dry.stderr
    run = cli(own, "migrate", "rollout", "--tenants", slugs[1], "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    assert mark_and_version(own.fleet, slugs[1]) == (HEAD, HEAD)


def test_a_no_at_the_terminal_changes_nothing(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    slugs, _ = _tenants(own, slug)
    before = snapshot(own.fleet, slugs)
    proc = tty_cli(own, "n\n", "migrate", "rollout", "--to", OLD)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # the plan, then the question, on stderr
    assert "plan: migrate 2 tenants to " + OLD in proc.stderr
    assert f"  - 2 tenants {HEAD} → {OLD} (downgrade)" in proc.stderr
    assert f"  - fleet target {HEAD} → {OLD} (downgrade)" in proc.stderr
    assert "  !! DROP COLUMN products.reorder_level" in proc.stderr
    assert "Apply this rollout? [y/N]" in proc.stderr and "nothing changed" in proc.stderr
    assert snapshot(own.fleet, slugs) == before


def test_fleet_wide_password_rotation_confirms(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    own = own_catalog
    slugs, dsns = _tenants(own, slug)
    before = snapshot(own.fleet, slugs)
    refused(cli(own, "tenant", "credentials", "--rotate", "--all"),
            "2 tenant passwords in every region rotated")
    refused(cli(own, "tenant", "credentials", "--rotate", "--all", "--region", "ap-south",
                "--kill-sessions", "--json"), "1 tenant password in region ap-south",
            "sessions ended")
    dry = cli(own, "tenant", "credentials", "--rotate", "--all", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {"dry_run": True, "would_rotate": 2,
                                      "kill_sessions": False, "tenants": sorted(slugs)}
    assert snapshot(own.fleet, slugs) == before
    for dsn in dsns.values():  # the old passwords still work
        connect_as(dsn).close()
    done = cli(own, "tenant", "credentials", "--rotate", "--all", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rotated"] == 2
    for x, dsn in dsns.items():
        try:
            connect_as(dsn).close()
            raise AssertionError(f"{x}'s old password still works")
        except psycopg.OperationalError:
            pass


def test_master_key_rotation_and_breach_drill_confirm(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str, tmp_path: Path) -> None:
    own = own_catalog
    slugs, dsns = _tenants(own, slug)
    grant = cli(own, "access", "grant", slugs[0], "--to", "sam", "--ttl", "1h",
                "--reason", "ticket", "--json")
    assert grant.returncode == 0, grant.stderr
    new_key = tmp_path / "new.key"
    write_key_file(new_key)
    old_id = own.fleet.master_key.key_id
    before = snapshot(own.fleet, slugs)
    assert before["master"] == (old_id, {old_id: 4})
    refused(cli(own, "keys", "rotate-master", "--new-key-file", str(new_key)),
            "2 tenant keys and 2 passwords re-wrapped", f"from master key {old_id}")
    refused(cli(own, "breach", "drill", "--new-key-file", str(new_key), "--json"),
            "2 tenant passwords rotated", "1 support grant revoked",
            "2 tenant keys and 2 passwords re-wrapped")
    dry = cli(own, "keys", "rotate-master", "--new-key-file", str(new_key), "--dry-run",
              "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["identities"] == 2
    drill = cli(own, "breach", "drill", "--new-key-file", str(new_key), "--dry-run")
    assert drill.returncode == 0 and drill.stdout.startswith("dry run, nothing changed: "
                                                             "2 tenant passwords rotated")
    assert snapshot(own.fleet, slugs) == before
    for dsn in dsns.values():
        connect_as(dsn).close()
    connect_as(json.loads(grant.stdout)["dsn"]).close()  # the grant still lets sam in
    # with --yes: the master key moves
    done = cli(own, "keys", "rotate-master", "--new-key-file", str(new_key), "--yes",
               "--json")
    assert done.returncode == 0, done.stderr
    with own.fleet.catalog.session() as s:
        assert keys.catalog_key_id(s) == json.loads(done.stdout)["new_master_key_id"] \
            != old_id
