"""A support grant ends at its expiry, open sessions included: VALID UNTIL only stops
new logins, so the leading scheduler brings its retention job forward when a live
grant's expiry has passed, instead of leaving the session to the next interval."""

from __future__ import annotations

import io
import json
import threading
import time
from datetime import timedelta

import psycopg

from orchestrator.daemon.jsonlog import JsonLog
from orchestrator.daemon.scheduler import SchedulerDaemon, SchedulerOptions
from orchestrator.services import access
from tests.conftest import OwnCatalog, connect_as


def _lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(x) for x in buf.getvalue().splitlines() if x.strip()]


def test_an_expired_grants_open_session_ends_long_before_the_next_interval(
        own_catalog: OwnCatalog, slug: str) -> None:
    fleet = own_catalog.fleet
    fleet.provision(slug, "ap-south")
    buf = io.StringIO()
    # retention once at start, then only after an hour: only the early run can end it
    daemon = SchedulerDaemon(fleet, SchedulerOptions(
        intervals={"retention": 3600.0}, standby_poll=0.2, heartbeat=0.2, grant_poll=0.3),
        JsonLog(buf))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not any(x.get("event") == "job" for x in _lines(buf)):  # the first run
            assert time.monotonic() < deadline, buf.getvalue()
            time.sleep(0.1)
        g = access.grant(fleet, slug, to="sam@support", ttl=timedelta(seconds=3),
                         reason="ticket 9")
        session = connect_as(str(g["dsn"]), autocommit=True)
        try:
            assert session.execute("SELECT count(*) FROM customers").fetchone() == (0,)
            ended = False
            deadline = time.monotonic() + 60  # bounded; the interval is an hour
            while not ended and time.monotonic() < deadline:
                time.sleep(0.2)
                try:
                    session.execute("SELECT 1")
                except psycopg.OperationalError:
                    ended = True
            assert ended, buf.getvalue()
        finally:
            session.close()
        assert "grant_expired" in [x.get("event") for x in _lines(buf)]
        # the sessions end first, then the role and the catalog row (bounded wait)
        deadline = time.monotonic() + 30
        while [x["status"] for x in access.grants(fleet, include_ended=True)] != ["dropped"]:
            assert time.monotonic() < deadline, buf.getvalue()
            time.sleep(0.2)
    finally:
        daemon.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()
