"""Who held the lock a migration gave up on, said without leaking tenant data, and
what to do next. Pure: the rollout's lock watch (adapters/postgres/lock_watch.py)
reads the blockers from ``pg_blocking_pids``; this module decides what of them is
shown.

A blocker's query is the tenant's application's SQL: its literals are the
tenant's data (an e-mail in a WHERE, a row in an INSERT). ``redact_query`` keeps
the shape of the statement (keywords, identifiers, operators, placeholders) and
replaces every string, number and comment, then cuts it to its first characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.domain.statuses import RolloutStatus

QUERY_CHARS = 60  # how much of a redacted query is shown
NAME_CHARS = 64  # application_name: NAMEDATALEN - 1 on the server
SHOWN = 3  # blockers named in one error; the rest are counted
HIDDEN = "<insufficient privilege>"  # pg_stat_activity's query of another user's backend


def _skip_string(sql: str, i: int, backslashes: bool) -> int:
    """The index after the string literal whose opening quote is at ``i`` (the end of
    ``sql`` when it is not closed: a query the server cut short)."""
    i += 1
    while i < len(sql):
        c = sql[i]
        if backslashes and c == "\\":
            i += 2
            continue
        if c == "'":
            if i + 1 < len(sql) and sql[i + 1] == "'":  # '' inside a string
                i += 2
                continue
            return i + 1
        i += 1
    return len(sql)


def _dollar_tag(sql: str, i: int) -> str | None:
    """The ``$tag$`` that opens a dollar-quoted string at ``i``, if one does ($1, a
    parameter, does not)."""
    j = i + 1
    while j < len(sql) and (sql[j].isalnum() or sql[j] == "_"):
        j += 1
    if j < len(sql) and sql[j] == "$" and not sql[i + 1:j][:1].isdigit():
        return sql[i:j + 1]
    return None


def redact_query(sql: str, limit: int = QUERY_CHARS) -> str:
    """``sql`` with every string constant, number and comment replaced by ``?`` (a
    comment by nothing), on one line, cut to ``limit`` characters (``…`` when cut).
    Identifiers, keywords, operators and ``$n`` parameters stay: the statement's
    shape, none of its values."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if c == "'":
            prefix = out[-1] if out else ""
            i = _skip_string(sql, i, backslashes=prefix in ("E", "e"))
            if prefix in ("E", "e", "B", "b", "X", "x", "N", "n") and \
                    (len(out) < 2 or not (out[-2].isalnum() or out[-2] in "_$")):
                out.pop()  # E'…', B'…', X'…', N'…': the prefix is part of the constant
            elif prefix == "&" and len(out) >= 2 and out[-2] in ("U", "u"):
                del out[-2:]  # U&'…'
            out.append("?")
        elif c == "$" and (tag := _dollar_tag(sql, i)) is not None:
            end = sql.find(tag, i + len(tag))
            i = n if end < 0 else end + len(tag)
            out.append("?")
        elif c == '"':  # a quoted identifier: kept ("" inside one stays)
            j = i + 1
            while j < n:
                if sql[j] == '"':
                    if j + 1 < n and sql[j + 1] == '"':
                        j += 2
                        continue
                    break
                j += 1
            out.append(sql[i:j + 1])
            i = j + 1
        elif c == "-" and nxt == "-":
            end = sql.find("\n", i)
            i = n if end < 0 else end
            out.append(" ")
        elif c == "/" and nxt == "*":
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            out.append(" ")
        elif (c.isdigit() or (c == "." and nxt.isdigit())) and \
                not (out and (out[-1].isalnum() or out[-1] in "_$")):
            # a number (12, 3.5, 1e-9, 0x1F, 1_000), not the digits of a name or $1
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] in "._" or
                             (sql[j] in "+-" and sql[j - 1] in "eE" and
                              not sql[i:j].lower().startswith("0x"))):
                j += 1
            out.append("?")
            i = j
        elif c.isspace() or not c.isprintable():
            out.append(" ")
            i += 1
        else:
            out.append(c)
            i += 1
    # a quoted identifier is copied as written: it may hold a newline or an escape
    text = " ".join("".join(c if c.isprintable() else " " for c in "".join(out)).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _one_line(text: str, limit: int) -> str:
    """Text a tenant's application chose (its application_name) on one printable line,
    at most ``limit`` characters."""
    shown = "".join(c if c.isprintable() else "?" for c in text)
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


@dataclass(frozen=True)
class Blocker:
    """A backend holding a lock another one waits for, as ``pg_stat_activity`` shows
    it (``query`` raw: redacted when shown)."""

    pid: int
    application_name: str
    user: str | None
    state: str | None
    query: str | None

    def shown(self) -> dict[str, Any]:
        """What may be printed or stored of it: the query redacted."""
        return {"pid": self.pid,
                "application_name": _one_line(self.application_name or "", NAME_CHARS),
                "user": _one_line(self.user, NAME_CHARS) if self.user else None,
                "state": self.state,
                "query": (self.query if self.query in (None, HIDDEN)
                          else redact_query(self.query))}


def describe(blockers: Sequence[Blocker]) -> str:
    """One line naming who held the lock: pid, application_name, role, state and the
    redacted start of its query, for the first few; or that nobody was seen."""
    if not blockers:
        return "the lock holder was not seen (it had gone, or could not be read)"
    parts = []
    for b in blockers[:SHOWN]:
        s = b.shown()
        who = [f"application_name {s['application_name']!r}"]
        if s["user"]:
            who.append(f"role {s['user']}")
        if s["state"]:
            who.append(str(s["state"]))
        query = f": {s['query']}" if s["query"] else ""
        parts.append(f"pid {s['pid']} ({', '.join(who)}){query}")
    more = len(blockers) - SHOWN
    return "blocked by " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def next_step(status: str, rollout_id: int | None, failed: int, lock_blocked: int
              ) -> str | None:
    """What to do after a rollout (or `migrate tenant`) that did not finish cleanly:
    whether the same command resumes it (an interrupted rollout, or one another
    process still runs) or starts a new one that retries the tenants not at the
    target (a rollout that ended failed or stopped). None when nothing is left."""
    waits = ""
    if lock_blocked:
        waits = (f"{lock_blocked} tenant{'s' * (lock_blocked != 1)} gave up waiting for a "
                 "lock: let the blocking session named above finish (or end it), then ")
    if status in (RolloutStatus.interrupted, RolloutStatus.running):
        return f"next: {waits}re-run the same command: it resumes rollout {rollout_id}"
    if not failed and status == RolloutStatus.completed:
        return None
    return (f"next: {waits}re-run the same command: rollout {rollout_id} is {status}, so "
            "it starts a new rollout, which migrates the tenants not at the target")
