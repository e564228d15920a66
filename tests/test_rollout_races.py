"""Races between rollouts, template builds and sign-ups, driven in a fixed order
(threads that pause at a chosen point and wait for the test to let them go; no
sleep-and-hope), on real clusters behind a catalog of the test's own.

The test fleet's "tiny-1" (region tiny) and "ap-south-1" (region ap-south) are
two server entries naming one cluster: they share its template database.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import select

from orchestrator.adapters.catalog.models import Rollout
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import alembic_runner as tenant_migrations
from orchestrator.adapters.postgres import revision_marks
from orchestrator.api import Fleet
from orchestrator.domain.names import TEMPLATE_DB
from orchestrator.services import templates
from orchestrator.services.rollout import Event, RolloutOptions, RolloutRun
from tests.conftest import TENANTCTL, OwnCatalog, PgFleet, mark_and_version, run_cli

OLD = "0004_order_status_idx"
HEAD = "0006_customer_email_ci"
WAIT = 120.0  # bound on every wait for another thread: a hang fails, never blocks


def _template_mark(fleet: Fleet, server: str) -> tuple[bool, str | None]:
    with pgserver.connect(fleet.cfg.server(server).admin_dsn) as conn:
        marks = revision_marks.published(conn, [TEMPLATE_DB])
    return TEMPLATE_DB in marks, marks.get(TEMPLATE_DB)


def _live_servers(fleet: Fleet) -> list[str]:
    return [sc.name for sc in fleet.cfg.servers if sc.region != "down"]


@pytest.fixture
def own(own_catalog: OwnCatalog) -> Iterator[OwnCatalog]:
    """The test's own catalog; afterwards every template is back at head (the
    templates are the clusters', shared with the session catalog's tests)."""
    yield own_catalog
    for server in _live_servers(own_catalog.fleet):
        templates.build(own_catalog.fleet, server, HEAD)


class Pause:
    """Wraps ``module.name`` so that the call made in a thread named ``thread``
    stops after running (or before, with ``before``) until ``release`` is called."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str,
                 thread: str, *, before: bool = False) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        real: Callable[..., Any] = getattr(module, name)

        def wrapper(*args: Any, **kw: Any) -> Any:
            if threading.current_thread().name != thread:
                return real(*args, **kw)
            if before:
                self._wait()
            out = real(*args, **kw)
            if not before:
                self._wait()
            return out

        monkeypatch.setattr(module, name, wrapper)

    def _wait(self) -> None:
        self.reached.set()
        assert self.go.wait(WAIT), "never released"

    def release(self) -> None:
        self.go.set()


class Worker(threading.Thread):
    """A thread that keeps its result or its exception."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def outcome(self) -> Any:
        self.join(WAIT)
        assert not self.is_alive(), f"{self.name} did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def _waiting_on_a_lock(fleet: Fleet) -> bool:
    """Somebody waits for an advisory lock in the (test's own) catalog database."""
    with psycopg.connect(fleet.cfg.catalog_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database "
            "WHERE datname = current_database())").fetchone()
    return bool(row and row[0])


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


# -- item: sign-up during a template upgrade on a shared cluster -------------------------


def test_entries_naming_one_cluster_share_its_identity(fleet: Fleet) -> None:
    ids = {}
    for server in ("tiny-1", "ap-south-1", "eu-central-1"):
        with fleet.server_connection(server) as conn:
            ids[server] = pgserver.cluster_identity(conn)
    assert ids["tiny-1"] == ids["ap-south-1"]
    assert ids["ap-south-1"].startswith("sysid:")  # the admin may read it
    external = fleet.cfg.server("eu-central-1").admin_dsn == \
        fleet.cfg.server("ap-south-1").admin_dsn
    assert (ids["eu-central-1"] == ids["ap-south-1"]) is external


def test_signup_waits_for_a_template_upgrade_through_another_entry_of_its_cluster(
        own: OwnCatalog, slug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = own.fleet
    assert fleet.cfg.server("tiny-1").admin_dsn == fleet.cfg.server("ap-south-1").admin_dsn
    fleet.set_target_revision(HEAD, "ap-south")
    fleet.set_target_revision(OLD, "tiny")
    templates.build(fleet, "ap-south-1", HEAD)
    # tiny-1's template (the same database) is downgraded; it stops while connected
    # to the template, in the middle of its upgrade
    pause = Pause(monkeypatch, pgserver, "prepare_template_schema", "upgrade")
    upgrade = Worker("upgrade", lambda: templates.build(fleet, "tiny-1", OLD))
    upgrade.start()
    assert pause.reached.wait(WAIT), upgrade.error
    # a sign-up in ap-south now: it must wait for the upgrade, not clone under it
    signup = Worker("signup", lambda: fleet.provision(slug, "ap-south"))
    signup.start()
    _until(lambda: not signup.is_alive() or _waiting_on_a_lock(fleet),
           "the sign-up finished or waited for the template")
    pause.release()
    assert upgrade.outcome() == OLD
    created = signup.outcome()
    # it found the template at tiny's revision, brought it back to its own and cloned
    assert created.via_template is True
    assert created.tenant["revision"] == HEAD
    assert mark_and_version(fleet, slug) == (HEAD, HEAD)
    assert _template_mark(fleet, "tiny-1") == (True, HEAD)
    # the catalog's bookkeeping follows the cluster for both entries
    assert {s.name: s.template_revision for s in fleet.servers()
            if s.name in ("tiny-1", "ap-south-1")} == {"tiny-1": HEAD, "ap-south-1": HEAD}


def test_signup_falls_back_when_the_template_build_fails(
        own: OwnCatalog, slug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = own.fleet
    marked, now = _template_mark(fleet, "ap-south-1")
    target = OLD if (marked and now == HEAD) else HEAD
    fleet.set_target_revision(target, "ap-south")  # the template is behind: a build first
    real = tenant_migrations.migrate

    def dies_on_the_template(conn: Any, *args: Any, **kw: Any) -> Any:
        pconn = conn.connection.driver_connection
        if pconn.info.dbname == TEMPLATE_DB:  # the build's connection is cut mid-way
            with pgserver.connect(fleet.cfg.server("ap-south-1").admin_dsn) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pconn.info.backend_pid,))
        return real(conn, *args, **kw)

    monkeypatch.setattr(tenant_migrations, "migrate", dies_on_the_template)
    created = fleet.provision(slug, "ap-south")
    assert created.via_template is False  # migrated an empty database instead
    assert created.tenant["state"] == "active"
    assert mark_and_version(fleet, slug) == (target, target)
    assert _template_mark(fleet, "ap-south-1") == (marked, now)  # rolled back, untouched


# -- item: two rollouts to different targets ---------------------------------------------


def _rollout_cli(own: OwnCatalog, test_fleet: PgFleet, *args: str
                 ) -> subprocess.CompletedProcess[str]:
    return run_cli(test_fleet, "migrate", "rollout", "--max-failures", "100%", *args,
                   config=own.config_path)


def test_second_rollout_to_another_target_is_refused_while_one_runs(
        own: OwnCatalog, test_fleet: PgFleet, slug: str) -> None:
    fleet = own.fleet
    slugs = [f"{slug}_e", f"{slug}_a"]
    fleet.provision(slugs[0], "eu-central")
    fleet.provision(slugs[1], "ap-south")
    registered, go = threading.Event(), threading.Event()

    def on_event(e: Event) -> None:
        if e.kind == "plan":  # registered, nothing migrated yet: hold it there
            registered.set()
            assert go.wait(WAIT)

    first = Worker("rollout-old", lambda: RolloutRun(
        fleet, RolloutOptions(to=OLD, max_failures="100%"), on_event).run())
    first.start()
    try:
        assert registered.wait(WAIT), first.error
        with fleet.catalog.session() as s:
            (running,) = s.scalars(select(Rollout).where(Rollout.status == "running"))
        assert running.target == OLD
        other = _rollout_cli(own, test_fleet, "--to", HEAD, "--json")
        assert other.returncode == 4, other.stdout + other.stderr
        assert other.stdout == ""
        lines = other.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert f"rollout {running.id} to {OLD}" in lines[0]
        assert fleet.target_revision() == HEAD  # the refused one changed nothing
        # the same target may run alongside (the same command joins the same rollout)
        same = _rollout_cli(own, test_fleet, "--to", OLD, "--json", "--yes")  # a downgrade
        assert same.returncode == 0, same.stdout + same.stderr
    finally:
        go.set()
    summary = first.outcome()
    assert summary.status == "completed" and summary.rollout_id == running.id
    with fleet.catalog.session() as s:
        assert [r.target for r in s.scalars(select(Rollout))] == [OLD]
    # one target: the fleet's, every tenant's and every template's
    assert fleet.target_revision() == OLD
    for t in slugs:
        assert mark_and_version(fleet, t) == (OLD, OLD)
    for server in _live_servers(fleet):
        assert _template_mark(fleet, server) == (True, OLD), server


def test_a_crashed_rollout_does_not_block_the_next(
        own: OwnCatalog, test_fleet: PgFleet, slug: str) -> None:
    fleet = own.fleet
    slugs = [f"{slug}_{i}" for i in range(2)]
    for t in slugs:
        fleet.provision(t, "eu-central")
    crashed = subprocess.run(
        [*TENANTCTL, "--config", str(own.config_path), "migrate", "rollout", "--to", OLD,
         "--concurrency", "1", "--yes"],
        capture_output=True, text=True, timeout=WAIT,
        env={**os.environ, "TENANTCTL_FAULT": "rollout.tenant_done"})
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr
    with fleet.catalog.session() as s:
        (dead,) = s.scalars(select(Rollout))
    assert (dead.target, dead.status) == (OLD, "running")  # its row says so; it is gone
    after = _rollout_cli(own, test_fleet, "--to", HEAD, "--json")
    assert after.returncode == 0, after.stdout + after.stderr
    assert fleet.target_revision() == HEAD
    for t in slugs:
        assert mark_and_version(fleet, t) == (HEAD, HEAD)
