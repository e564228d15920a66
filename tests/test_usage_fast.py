"""Usage metering's pure rules (orchestrator/domain/usage.py), its config and its
place in the job vocabulary: no Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.config import UsageConfig, parse_config
from orchestrator.domain import usage as u
from orchestrator.domain.errors import ConfigError
from orchestrator.domain.jobs import SCHEDULED, parse_scheduled

T0 = datetime(2026, 12, 7, 10, 15, tzinfo=UTC)
RESET = datetime(2026, 12, 1, tzinfo=UTC)


def reading(xact: int = 0, ins: int = 0, ret: int = 0, *, size: int | None = 100,
            conns: int = 0, datid: int = 16384, reset: datetime | None = None,
            server: str = "s1") -> u.Reading:
    return u.Reading(server, datid, reset, u.Counters(xact_commit=xact, tup_inserted=ins,
                                                      tup_returned=ret), size, conns)


def test_counter_delta_is_the_difference_or_after_a_reset_the_new_value() -> None:
    assert u.counter_delta(10, 25) == 15
    assert u.counter_delta(10, 10) == 0
    assert u.counter_delta(None, 25) == 25  # first sample: since the counters started
    assert u.counter_delta(100, 7) == 7  # went down: a reset, never negative
    assert u.counter_delta(10, 25, same=False) == 25  # another series
    assert u.counter_delta(None, -1) == 0


def test_delta_sees_a_reset_by_stats_reset_oid_or_server() -> None:
    prev = reading(xact=50, ins=1000, ret=5000, reset=None)
    assert u.delta(prev, reading(xact=60, ins=1200, ret=5100)) == \
        u.Counters(xact_commit=10, tup_inserted=200, tup_returned=100)
    # pg_stat_reset(): stats_reset moves; the counters grew past the old values again
    assert u.delta(prev, reading(xact=70, ins=1500, ret=9000, reset=RESET)) == \
        u.Counters(xact_commit=70, tup_inserted=1500, tup_returned=9000)
    # a crash restart without a new stats_reset: the counters went down
    d = u.delta(prev, reading(xact=3, ins=2000, ret=1, reset=None))
    assert (d.xact_commit, d.tup_inserted, d.tup_returned) == (3, 1000, 1)
    assert all(v >= 0 for v in d.__dict__.values())
    # a restored database (new oid), a move to another server
    assert u.delta(prev, reading(xact=60, datid=99999)).transactions == 60
    assert u.delta(prev, reading(xact=60, server="s2")).transactions == 60
    assert u.delta(None, reading(xact=5, ins=7)) == u.Counters(xact_commit=5, tup_inserted=7)


def test_derived_metrics() -> None:
    c = u.Counters(1, 2, 3, 4, 5, 6, 7)
    assert (c.transactions, c.rows_written, c.rows_read) == (3, 12, 6)


def test_period_is_the_utc_hour() -> None:
    assert u.period_start(T0) == datetime(2026, 12, 7, 10, tzinfo=UTC)
    # a time given in a half-hour zone still falls in its UTC hour
    other = datetime(2026, 12, 7, 12, 59, 59, tzinfo=UTC).astimezone(
        timezone(timedelta(hours=5, minutes=30)))
    assert u.period_start(other) == datetime(2026, 12, 7, 12, tzinfo=UTC)
    assert u.retention_cutoff(T0, 400) == datetime(2026, 12, 7, 10, tzinfo=UTC) - \
        timedelta(days=400)


def test_accumulate_sums_deltas_keeps_last_size_and_peaks() -> None:
    first = reading(xact=10, ins=5, size=1000, conns=3)
    p1 = u.accumulate(None, None, first)
    assert p1 == u.PeriodUsage(1000, 1000, 3, 3, 10, 5, 0, 1)
    second = reading(xact=15, ins=9, size=900, conns=1)
    p2 = u.accumulate(p1, first, second)
    assert p2 == u.PeriodUsage(900, 1000, 1, 3, 15, 9, 0, 2)
    # a reset between the two: the new counters, not a negative
    third = reading(xact=2, ins=1, size=None, conns=7, reset=RESET)
    p3 = u.accumulate(p2, second, third)
    assert p3 == u.PeriodUsage(900, 1000, 7, 7, 17, 10, 0, 3)  # unknown size: the last kept


def test_totals_and_top_per_server() -> None:
    h = timedelta(hours=1)
    p = datetime(2026, 12, 7, tzinfo=UTC)
    rows = [("acme", "s1", p, u.PeriodUsage(100, 120, 1, 4, 10, 5, 50, 1)),
            ("acme", "s1", p + h, u.PeriodUsage(130, 130, 0, 2, 20, 5, 50, 1)),
            ("beta", "s1", p, u.PeriodUsage(500, 500, 0, 1, 1, 0, 0, 1)),
            ("gamma", "s2", p, u.PeriodUsage(None, None, 0, 0, 0, 0, 0, 1)),
            ("delta", "s1", p, u.PeriodUsage(90, 90, 0, 9, 30, 0, 0, 1))]
    tots = u.totals(rows)
    assert [t.slug for t in tots] == ["acme", "beta", "delta", "gamma"]
    acme = tots[0]
    assert (acme.periods, acme.storage_bytes, acme.storage_bytes_peak, acme.connections_peak,
            acme.transactions, acme.rows_written, acme.rows_read) == (2, 130, 130, 4, 30, 10,
                                                                     100)
    assert (acme.first_period, acme.last_period) == (p, p + h)
    top = u.top_per_server(tots, 2)
    storage = [(r.server, r.rank, r.slug, r.value) for r in top if r.metric == "storage_bytes"]
    assert storage == [("s1", 1, "beta", 500), ("s1", 2, "acme", 130)]  # gamma: unknown
    conns = [(r.rank, r.slug) for r in top if r.metric == "connections_peak"]
    assert conns == [(1, "delta"), (2, "acme")]
    # at most n per server and metric, whatever the number of tenants
    many = [u.Totals(f"t{i:03}", "s1", storage_bytes=i + 1) for i in range(500)]
    assert len(u.top_per_server(many, 5, ["storage_bytes"])) == 5
    # ties: by slug
    tie = [u.Totals("b", "s1", transactions=5), u.Totals("a", "s1", transactions=5)]
    assert [r.slug for r in u.top_per_server(tie, 5, ["transactions"])] == ["a", "b"]
    sums = u.server_sums(tots)
    assert sums["s1"]["storage_bytes"] == 130 + 500 + 90 and sums["s2"]["transactions"] == 0


def test_export_row_matches_the_columns() -> None:
    start = datetime(2026, 12, 7, 10, tzinfo=UTC)
    row = u.export_row("acme", "s1", start, u.PeriodUsage(None, 5, 1, 2, 3, 4, 5, 6))
    assert len(row) == len(u.EXPORT_COLUMNS)
    assert dict(zip(u.EXPORT_COLUMNS, row, strict=True)) == {
        "tenant": "acme", "server": "s1", "period_start": "2026-12-07T10:00:00+00:00",
        "period_end": "2026-12-07T11:00:00+00:00", "storage_bytes": "",
        "storage_bytes_peak": 5, "connections_peak": 2, "transactions": 3,
        "rows_written": 4, "rows_read": 5, "samples": 6}


def test_usage_is_a_scheduled_job() -> None:
    assert "usage" in SCHEDULED
    assert parse_scheduled("usage", "jobs") == ("usage",)


BASE = """
[catalog]
dsn = "postgresql://admin@localhost/cat"
[master_key]
env = "KEY"
[regions.eu]
backup_store = "file:///tmp/b"
[[regions.eu.servers]]
name = "s1"
admin_dsn = "postgresql://admin@localhost/postgres"
"""


def _cfg(extra: str) -> UsageConfig:
    import tomllib

    return parse_config(tomllib.loads(BASE + extra), Path("/tmp/t.toml")).usage


def test_usage_config() -> None:
    assert _cfg("") == UsageConfig(400, "30s", 5, False)
    assert _cfg('[usage]\nkeep_days = 30\nstatement_timeout = "2min"\ntop = 3\n'
                "per_tenant_metrics = true\n") == UsageConfig(30, "2min", 3, True)
    for bad, message in [("keep_days = 0", "usage.keep_days: must be at least 1"),
                         ('statement_timeout = "0"', "usage.statement_timeout: must be"),
                         ('statement_timeout = "soon"', "usage.statement_timeout: 'soon'"),
                         ("top = 1000", "usage.top: must be at most 100"),
                         ('per_tenant_metrics = "yes"', "must be true or false"),
                         ("nope = 1", "usage.nope: unknown key")]:
        with pytest.raises(ConfigError, match=message):
            _cfg(f"[usage]\n{bad}\n")


def test_metrics_show_the_top_n_per_server_and_per_tenant_series_only_when_asked() -> None:
    from orchestrator.daemon.metrics import FleetGauges, MetricsSnapshot, render_metrics
    from orchestrator.services.usage import UsageGauges

    tots = [u.Totals(f"t{i:03}", "s1", storage_bytes=1000 + i, transactions=i)
            for i in range(200)]
    top = u.top_per_server(tots, 3)
    sums = {k: dict(v) for k, v in u.server_sums(tots).items()}

    def render(per_tenant: bool) -> list[str]:
        gauges = UsageGauges(top, sums, tots if per_tenant else None)
        text = render_metrics(MetricsSnapshot(True, True, FleetGauges(
            {"active": 200}, {}, 0, 0, 1.0, usage=gauges)))
        return [ln for ln in text.splitlines() if ln.startswith("tenantctl_usage_")]

    lines = render(False)
    storage = [ln for ln in lines if ln.startswith("tenantctl_usage_top_storage_bytes{")]
    assert storage == [
        'tenantctl_usage_top_storage_bytes{rank="1",server="s1",tenant="t199"} 1199.0',
        'tenantctl_usage_top_storage_bytes{rank="2",server="s1",tenant="t198"} 1198.0',
        'tenantctl_usage_top_storage_bytes{rank="3",server="s1",tenant="t197"} 1197.0']
    # bounded: top-N per metric plus one sum per metric, whatever the tenants' number
    assert len(lines) <= 5 * (3 + 1)
    assert not any(ln.startswith("tenantctl_usage_tenant_") for ln in lines)
    assert f'tenantctl_usage_server_storage_bytes{{server="s1"}} {float(sum(range(1000, 1200)))}' \
        in lines
    every = [ln for ln in render(True) if ln.startswith("tenantctl_usage_tenant_storage_bytes")]
    assert len(every) == 200


def test_usage_without_a_subcommand_is_usage_show(tmp_path: Path) -> None:
    """`tenantctl usage [SLUG] [options]` goes to `usage show`; bad input is refused
    before any config is read (there is none here)."""
    import os
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", "--config",
                               str(tmp_path / "none.toml"), "usage", *args],
                              capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parent.parent,
                              env={**os.environ, "TENANTCTL_CONFIG": ""})

    for args in (("--since", "whenever"), ("acme", "--since", "whenever"),
                 ("show", "--since", "whenever")):
        proc = cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: invalid --since 'whenever'"), proc.stderr
    group = cli("--help")
    assert group.returncode == 0 and "collect" in group.stdout and "export" in group.stdout
    assert "Examples:" in cli("acme", "--help").stdout  # show's own help
    missing = cli("export", "--since", "1d")
    assert missing.returncode == 2 and "--output" in missing.stderr
    nofile = cli("collect")
    assert nofile.returncode == 2 and "config file not found" in nofile.stderr
