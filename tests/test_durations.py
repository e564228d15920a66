"""The one duration grammar (orchestrator.domain.durations): every accepted form and
every refused one with its message. Pure: no Postgres, no clock (``now`` is given)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.config import parse_config
from orchestrator.domain.durations import (
    BadDuration,
    describe,
    parse_duration,
    parse_instant,
    parse_pg_duration,
    parse_since,
)
from orchestrator.domain.errors import ConfigError, InvalidInput
from orchestrator.services.access import MAX_TTL, parse_ttl

NOW = datetime(2026, 3, 10, 15, 30, 45, tzinfo=UTC)
USAGE = "use a number and a unit: ms, s, m or min, h, d, w (e.g. 90s, 5min, 2h, 7d)"


@pytest.mark.parametrize("text, expected", [
    ("500ms", timedelta(milliseconds=500)), ("90s", timedelta(seconds=90)),
    ("5m", timedelta(minutes=5)), ("5min", timedelta(minutes=5)), ("2h", timedelta(hours=2)),
    ("7d", timedelta(days=7)), ("1w", timedelta(weeks=1)),
    # blanks around and between, and a leading zero, mean nothing
    (" 2h ", timedelta(hours=2)), ("2 h", timedelta(hours=2)), ("02h", timedelta(hours=2)),
    ("0s", timedelta(0)),
])
def test_every_unit_means_the_same_everywhere(text: str, expected: timedelta) -> None:
    assert parse_duration(text, "f") == expected
    since = NOW - expected
    assert parse_since(text, NOW, "f") == since
    assert parse_pg_duration(text, "f")  # each is a valid Postgres duration too


@pytest.mark.parametrize("text", ["", " ", "soon", "h", "2", "-5s", "+5s", "2.5h", "1e3s",
                                  "2H", "2 hours", "1y", "5 s; DROP TABLE x", "2h2m",
                                  "\u0661\u0662s", "5s\x00"])
def test_refused_forms_say_what_is_accepted(text: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_duration(text, "ttl")
    assert str(err.value) == f"invalid ttl {text!r}: {USAGE}"


def test_ranges_overflow_and_the_message_names_the_field() -> None:
    week = timedelta(days=7)
    assert parse_duration("7d", "ttl", positive=True, at_most=week) == week
    for text in ("8d", "604801s", "2w", "99999999999999999999d"):  # the last: no timedelta
        with pytest.raises(BadDuration) as err:
            parse_duration(text, "ttl", positive=True, at_most=week)
        assert str(err.value) == f"invalid ttl {text!r}: must be more than 0 and at most 7 days"
        assert err.value.why == "must be more than 0 and at most 7 days"
    with pytest.raises(BadDuration, match=r"^invalid ttl '0h': must be more than 0$"):
        parse_duration("0h", "ttl", positive=True)
    with pytest.raises(BadDuration, match=r"^invalid f '99999999999999999999d': is out of range$"):
        parse_duration("99999999999999999999d", "f")
    huge = "9" * 5000 + "s"  # more digits than int() reads: still a range error
    with pytest.raises(BadDuration, match="must be more than 0 and at most 7 days"):
        parse_duration(huge, "ttl", positive=True, at_most=week)
    with pytest.raises(BadDuration, match="must be at most 2147483647ms"):
        parse_pg_duration(huge, "--lock-timeout")
    with pytest.raises(BadDuration, match="reaches back before year 1"):
        parse_since(huge, NOW, "--since")
    assert [describe(d) for d in (week, timedelta(hours=36), timedelta(minutes=1),
                                  timedelta(seconds=90), timedelta(milliseconds=1500))] == \
        ["7 days", "36 hours", "1 minute", "90 seconds", "1500ms"]


def test_the_ttl_of_a_support_grant() -> None:
    assert parse_ttl("2h") == timedelta(hours=2)
    assert parse_ttl("30m") == parse_ttl("30min") == timedelta(minutes=30)
    assert parse_ttl("1w") == MAX_TTL
    with pytest.raises(InvalidInput, match=r"^invalid --ttl '8d': must be more than 0 and at "
                                           r"most 7 days$"):
        parse_ttl("8d", "--ttl")
    with pytest.raises(InvalidInput, match=r"^invalid ttl 'soon': use a number"):
        parse_ttl("soon")


@pytest.mark.parametrize("text, sent", [
    # what was accepted before is sent to Postgres exactly as before
    ("2s", "2s"), ("500", "500ms"), ("500ms", "500ms"), ("5min", "5min"), ("1h", "1h"),
    ("0", "0"), ("010s", "10s"), (" 5 min ", "5min"), ("2147483647ms", "2147483647ms"),
    ("2147483647", "2147483647ms"),
    # the spellings Postgres has no unit for, in its own
    ("5m", "5min"), ("1d", "1d"), ("2w", "14d"), ("0s", "0s"),
])
def test_durations_for_postgres(text: str, sent: str) -> None:
    assert parse_pg_duration(text, "--lock-timeout") == sent


@pytest.mark.parametrize("text, why", [
    ("soon", USAGE + "; a bare number is milliseconds"),
    ("1y", USAGE + "; a bare number is milliseconds"),
    ("2147483648ms", "must be at most 2147483647ms (24 days)"),
    ("2147483648", "must be at most 2147483647ms (24 days)"),
    ("25d", "must be at most 2147483647ms (24 days)"),
    ("4w", "must be at most 2147483647ms (24 days)"),
])
def test_postgres_durations_refused(text: str, why: str) -> None:
    with pytest.raises(BadDuration) as err:
        parse_pg_duration(text, "--lock-timeout")
    assert str(err.value) == f"invalid --lock-timeout {text!r}: {why}"


def test_since_takes_durations_days_and_iso_times() -> None:
    midnight = datetime(2026, 3, 10, tzinfo=UTC)
    assert parse_since("today", NOW, "--since") == midnight
    assert parse_since(" Yesterday ", NOW, "--since") == midnight - timedelta(days=1)
    assert parse_since("7d", NOW, "--since") == NOW - timedelta(days=7)
    assert parse_since("2026-01-01", NOW, "--since") == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_since("2026-01-01T00:00:00+01:00", NOW, "--since") == \
        datetime(2025, 12, 31, 23, tzinfo=UTC)
    # a `now` given in another zone: still the UTC day (01:30 on the 11th at +10:00)
    east = NOW.astimezone(timezone(timedelta(hours=10)))
    assert parse_since("today", east, "--since") == midnight


@pytest.mark.parametrize("text, message", [
    ("last week", "invalid --since 'last week': use a duration (e.g. 7d, 12h), today, "
                  "yesterday or an ISO-8601 time (e.g. 2026-12-24T08:00:00Z)"),
    ("5", "invalid --since '5': use a duration (e.g. 7d, 12h), today, yesterday or an "
          "ISO-8601 time (e.g. 2026-12-24T08:00:00Z)"),
    ("99999999d", "invalid --since '99999999d': reaches back before year 1"),
    ("99999999999999999999d", "invalid --since '99999999999999999999d': reaches back "
                              "before year 1"),
    ("0001-01-01T00:00:00+01:00", "--since '0001-01-01T00:00:00+01:00' is out of range"),
])
def test_since_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_since(text, NOW, "--since")
    assert str(err.value) == message
    with pytest.raises(BadDuration, match="reaches back before year 1"):
        parse_since("yesterday", datetime(1, 1, 1, 12, tzinfo=UTC), "--since")


def test_instants() -> None:
    assert parse_instant("2026-12-24T08:00:00Z", "--now") == datetime(2026, 12, 24, 8, tzinfo=UTC)
    assert parse_instant("2026-12-24T08:00:00", "--now") == datetime(2026, 12, 24, 8, tzinfo=UTC)
    with pytest.raises(InvalidInput, match=r"^--now 'soon' is not an ISO-8601 time \(e\.g\. "
                                           r"2026-12-24T08:00:00Z\)$"):
        parse_instant("soon", "--now")


def _config(tenants: dict[str, object]) -> dict[str, object]:
    return {"catalog": {"dsn": "host=x dbname=c"}, "master_key": {"file": "k"},
            "tenants": tenants,
            "regions": {"eu": {"backup_store": "file:///tmp/x",
                               "servers": [{"name": "s1", "admin_dsn": "host=x"}]}}}


def test_config_durations_use_the_grammar_and_keep_what_postgres_got() -> None:
    def bounds(value: object) -> str:
        cfg = parse_config(_config({"statement_timeout": value,
                                    "idle_in_transaction_session_timeout": value}), Path("t"))
        assert cfg.bounds.idle_in_transaction_session_timeout == cfg.bounds.statement_timeout
        return cfg.bounds.statement_timeout

    # stored in pg_db_role_setting as they always were: doctor compares these strings
    for same in ("5min", "0", "30s", "1h", "2d", "100ms"):
        assert bounds(same) == same
    assert (bounds("5m"), bounds("1w"), bounds("90 s")) == ("5min", "7d", "90s")
    for bad, why in [(300, "must be a string like '5min'"),
                     ("5 minutes", USAGE), ("3000000d", "at most 2147483647ms")]:
        with pytest.raises(ConfigError) as err:
            bounds(bad)
        assert str(err.value).startswith("t: tenants.statement_timeout: ")
        assert why in str(err.value) and "\n" not in str(err.value)
