"""The local fleet's ports stay out of the machine's ephemeral range, and a PgBouncer
that gave up at start is read from its log (no Postgres: the fast tier)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from orchestrator.devfleet import localfleet


def test_ephemeral_ports_reads_the_kernels_range(tmp_path: Path) -> None:
    f = tmp_path / "range"
    f.write_text("32768\t60999\n")
    assert localfleet.ephemeral_ports(f) == range(32768, 61000)
    f.write_text("garbage\n")
    assert localfleet.ephemeral_ports(f) is None
    assert localfleet.ephemeral_ports(tmp_path / "absent") is None


def test_the_default_ports_are_below_linuxs_default_ephemeral_range() -> None:
    assert localfleet.DEFAULT_BASE_PORT + 100 < 32768


@pytest.mark.skipif(localfleet.ephemeral_ports() is None,
                    reason="this kernel does not say its ephemeral range")
def test_free_ports_skip_the_ephemeral_range() -> None:
    ephemeral = localfleet.ephemeral_ports()
    assert ephemeral is not None
    assert not any(p in ephemeral for p in localfleet.free_ports(4))
    # a start inside the range continues after it
    inside = localfleet.free_ports(2, start=ephemeral.start)
    assert all(p >= ephemeral.stop for p in inside), inside


def test_free_ports_skip_a_port_in_use() -> None:
    start = localfleet.free_ports(1)[0]
    with socket.create_server(("127.0.0.1", start)):
        assert start not in localfleet.free_ports(2, start=start)


def test_free_ports_use_the_ephemeral_range_when_it_leaves_no_room(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localfleet, "ephemeral_ports", lambda: range(1024, 65536))
    assert localfleet.free_ports(2)[0] >= localfleet.DEFAULT_BASE_PORT


def test_an_explicit_base_port_in_the_ephemeral_range_is_warned_of() -> None:
    warned = localfleet._ephemeral_warning([55432, 55433, 20000], range(32768, 61000))
    assert warned == ("ports 55432, 55433 are in this machine's ephemeral range "
                      "(32768-60999): an outgoing connection can take one while its "
                      "cluster or pooler is down, and `local up` then cannot bind it; "
                      "a --base-port below 32768 avoids that",)
    assert localfleet._ephemeral_warning([25432, 25433], range(32768, 61000)) == ()
    assert localfleet._ephemeral_warning([55432], None) == ()


LOG = """\
2026-12-07 17:37:17.653 UTC [601] LOG kernel file descriptor limit: 1024 (hard: 20000)
2026-12-07 17:37:17.654 UTC [601] WARNING cannot listen on 127.0.0.1:45494: bind(): \
Address already in use
2026-12-07 17:37:17.654 UTC [601] FATAL nowhere to listen on
"""


def test_a_pooler_that_gave_up_is_read_from_its_log(tmp_path: Path) -> None:
    log = tmp_path / "pgbouncer.log"
    earlier = "2026-12-06 10:00:00.000 UTC [7] FATAL an earlier start's failure\n"
    log.write_text(earlier)
    offset = log.stat().st_size
    assert localfleet.pooler_start_failure(log, offset) is None  # nothing new yet
    log.write_text(earlier + LOG.split("\n", 1)[0] + "\n")
    assert localfleet.pooler_start_failure(log, offset) is None  # starting, no FATAL
    log.write_text(earlier + LOG)
    assert localfleet.pooler_start_failure(log, offset) == (
        "cannot listen on 127.0.0.1:45494: bind(): Address already in use; "
        "nowhere to listen on")
    assert localfleet.pooler_start_failure(tmp_path / "absent.log", 0) is None
