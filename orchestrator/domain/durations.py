"""Durations and times as an operator writes them: one grammar for every CLI option
and config value that takes one (`access grant --ttl`, `migrate rollout
--lock-timeout/--statement-timeout`, `audit list --since`, `scheduler run
--standby-poll/--interval-seconds` (where a bare number is seconds), the config's
`tenants.statement_timeout` and `tenants.idle_in_transaction_session_timeout`).

    duration := digits [blanks] unit          e.g. 500ms, 90s, 5m, 5min, 2h, 7d, 1w
    unit     := ms | s | m | min | h | d | w  (m and min are both minutes)

Digits are ASCII (Postgres reads nothing else) and a leading zero means nothing
(Postgres would read "010" as octal: we send it "10"). A bare number, without a
unit, is milliseconds as Postgres reads it, and is accepted only for a value that
goes to Postgres (a timeout). `--since` also takes `today`, `yesterday` (the start
of that UTC day) and an ISO-8601 time.

Pure: `now` is a parameter. Every refusal is one InvalidInput line naming the field
the caller passes as ``what`` (a parameter's name, which the CLI shows as its flag,
or a config key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from orchestrator.domain.errors import FIELD, InvalidInput

# the unit's length in milliseconds
UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000,
           "d": 86_400_000, "w": 7 * 86_400_000}
# how Postgres spells a unit (it has no m and no w: minutes are min, weeks are 7d)
_PG_UNIT = {"ms": "ms", "s": "s", "m": "min", "min": "min", "h": "h", "d": "d"}
# Postgres keeps lock/statement/idle timeouts as int milliseconds
PG_MAX_MS = 2**31 - 1
_GRAMMAR = re.compile(r"([0-9]+)\s*([a-z]+)?", re.ASCII)
USAGE = "use a number and a unit: ms, s, m or min, h, d, w (e.g. 90s, 5min, 2h, 7d)"


class BadDuration(InvalidInput):
    """A refused duration or time; ``why`` says what is wrong without naming the
    field (a config reader words its own error around it)."""

    def __init__(self, what: str, text: str, why: str) -> None:
        super().__init__(f"invalid {FIELD} {text!r}: {why}", field=what)
        self.why = why


@dataclass(frozen=True)
class Duration:
    amount: int
    unit: str | None  # None: a bare number, milliseconds

    @property
    def milliseconds(self) -> int:
        return self.amount * UNIT_MS[self.unit or "ms"]

    def as_timedelta(self) -> timedelta:
        """Raises OverflowError beyond timedelta's range (999999999 days)."""
        return timedelta(milliseconds=self.milliseconds)

    def postgres(self) -> str:
        """The same duration as Postgres reads it: the unit as written where Postgres
        has it (what was sent before stays what is sent), a bare 0 as "0" (how
        role settings have always been stored), another bare number as ms."""
        if self.unit is None:
            return f"{self.amount}ms" if self.amount else "0"
        if self.unit == "w":
            return f"{self.amount * 7}d"
        return f"{self.amount}{_PG_UNIT[self.unit]}"


def parse(text: str, what: str, *, bare_ms: bool = False) -> Duration:
    """The grammar alone (no range): ``bare_ms`` accepts a number without a unit as
    milliseconds, for values that go to Postgres."""
    m = _GRAMMAR.fullmatch(text.strip())
    unit = m.group(2) if m else None
    if m is None or (unit is not None and unit not in UNIT_MS) or (unit is None and not bare_ms):
        raise BadDuration(what, text, USAGE + ("; a bare number is milliseconds"
                                               if bare_ms else ""))
    digits = m.group(1).lstrip("0") or "0"
    # far beyond every field's range (and beyond what int() reads: 4300 digits): the
    # caller refuses it with its own range message
    return Duration(int(digits) if len(digits) <= 40 else 10**40, unit)


def parse_duration(text: str, what: str, *, at_most: timedelta | None = None,
                   positive: bool = False) -> timedelta:
    """A duration as a timedelta, refused beyond ``at_most`` (and at 0 if
    ``positive``)."""
    d = parse(text, what)
    try:
        value = d.as_timedelta()
    except OverflowError:  # beyond timedelta's range: beyond any at_most too
        value = timedelta.max
    if (positive and value <= timedelta(0)) or (at_most is not None and value > at_most):
        bounds = ["more than 0"] if positive else []
        if at_most is not None:
            bounds.append(f"at most {describe(at_most)}")
        raise BadDuration(what, text, "must be " + " and ".join(bounds))
    if value == timedelta.max:
        raise BadDuration(what, text, "is out of range")
    return value


_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?", re.ASCII)


def parse_seconds(text: str, what: str, *, at_most: timedelta | None = None) -> float:
    """A positive wait in seconds for an option named in seconds (`--standby-poll`,
    `--interval-seconds`): a bare number is seconds (decimals allowed, as these
    options always took), anything else the duration grammar (500ms, 90s, 5m)."""
    value = timedelta(seconds=float(text.strip())) if _SECONDS.fullmatch(text.strip()) \
        else parse_duration(text, what)
    if value <= timedelta(0) or (at_most is not None and value > at_most):
        bound = f" and at most {describe(at_most)}" if at_most is not None else ""
        raise BadDuration(what, text, f"must be more than 0{bound}")
    return value.total_seconds()


def parse_pg_duration(text: str, what: str) -> str:
    """A duration bound for Postgres (SET lock_timeout / statement_timeout, a role's
    setting), in Postgres's own spelling; 0 means no limit there."""
    d = parse(text, what, bare_ms=True)
    if d.milliseconds > PG_MAX_MS:  # refused by every server
        raise BadDuration(what, text, f"must be at most {PG_MAX_MS}ms (24 days)")
    return d.postgres()


def parse_instant(text: str, what: str) -> datetime:
    """ISO-8601, in UTC; a time without a zone is taken as UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{FIELD} {text!r} is not an ISO-8601 time "
                           "(e.g. 2026-12-24T08:00:00Z)", field=what) from None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is in year 0 in UTC
        raise InvalidInput(f"{FIELD} {text!r} is out of range", field=what) from None


def parse_since(text: str, now: datetime, what: str) -> datetime:
    """A start time: a duration back from ``now`` (7d, 12h), `today` or `yesterday`
    (the start of that UTC day), or an ISO-8601 time."""
    word = text.strip().lower()
    m = _GRAMMAR.fullmatch(text.strip())
    try:
        if word in ("today", "yesterday"):
            midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0,
                                                   microsecond=0)
            return midnight - timedelta(days=1) if word == "yesterday" else midnight
        if m is not None and m.group(2) in UNIT_MS:
            return now - parse(text, what).as_timedelta()
    except OverflowError:
        raise BadDuration(what, text, "reaches back before year 1") from None
    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise BadDuration(what, text, "use a duration (e.g. 7d, 12h), today, yesterday or "
                          "an ISO-8601 time (e.g. 2026-12-24T08:00:00Z)") from None
    return parse_instant(text, what)


def describe(delta: timedelta) -> str:
    """``7 days``, ``12 hours``: a bound in the largest unit that says it exactly."""
    ms = delta // timedelta(milliseconds=1)
    for name, unit in (("day", "d"), ("hour", "h"), ("minute", "min"), ("second", "s")):
        n, rest = divmod(ms, UNIT_MS[unit])
        if not rest:
            return f"{n} {name}{'' if n == 1 else 's'}"
    return f"{ms}ms"
