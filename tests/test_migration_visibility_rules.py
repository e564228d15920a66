"""The pure rules behind `migrate status --check`, `migrate history` and the lock
timeout's error: the revision tree, targets, the check, the redaction of a lock
holder's query and the next step. No Postgres."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.adapters.postgres import alembic_runner, revision_files
from orchestrator.domain.errors import ExitCode
from orchestrator.domain.lock_blockers import (
    HIDDEN,
    QUERY_CHARS,
    Blocker,
    describe,
    next_step,
    redact_query,
)
from orchestrator.domain.revisions import (
    Revision,
    check,
    heads,
    history_rows,
    ordered,
    target_of,
)

REPO = Path(__file__).resolve().parent.parent

# -- redaction --------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "shown"), [
    ("SELECT count(*) FROM products WHERE name = 'O''Brien' AND id=42",
     "SELECT count(*) FROM products WHERE name = ? AND id=?"),
    ("insert into t1 values (E'a\\'b secret', 3.5e-3, $$body$$, $q$x$q$, $1, 0x1F)",
     "insert into t1 values (?, ?, ?, ?, $1, ?)"),
    ("select B'0101', X'1F', N'nat', U&'d\\0061t' from x",
     "select ?, ?, ?, ? from x"),
    ("select /* user: bob@example.com */ 1 -- card 4111\n from x", "select ? from x"),
    ("select /* a /* nested */ secret */ 2", "select ?"),
    ("SELECT * FROM \"Weird \"\"name\" WHERE a.b2 > .5",
     'SELECT * FROM "Weird ""name" WHERE a.b2 > ?'),
    ("update customers\n\tset email = 'a@b.c'\r\nwhere id = 7",
     "update customers set email = ? where id = ?"),
])
def test_redaction_keeps_the_shape_and_drops_every_value(query: str, shown: str) -> None:
    assert redact_query(query) == shown


def test_redaction_of_a_query_cut_inside_a_literal_hides_the_rest() -> None:
    # pg_stat_activity (and our left(query, 400)) may cut a query in the middle of a
    # string: what follows the open quote is still data
    assert redact_query("select 'unterminated secret") == "select ?"
    assert redact_query("select $x$ never closed secret") == "select ?"
    assert redact_query("select 1 /* open comment secret") == "select ?"


def test_redaction_is_cut_to_its_first_characters() -> None:
    long = "SELECT " + ", ".join(f"col_{i}" for i in range(40)) + " FROM t"
    shown = redact_query(long)
    assert len(shown) == QUERY_CHARS and shown.endswith("…")
    assert redact_query("select 1", limit=5) == "sele…"


SQLISH = "abcdefghijklmnopqrstuvwxyz_ABCXYZ0123456789 =<>(),.*;\n\t"


@given(st.text(alphabet=SQLISH, max_size=80),
       st.text(alphabet="abcdefghijklmnopqrstuvwxyz@. 0123456789'\\\n", max_size=30),
       st.sampled_from(["'{}'", "E'{}'", "$${}$$", "$t${}$t$", "/* {} */", "-- {}\n"]))
@settings(max_examples=300, deadline=None)
def test_no_value_survives(prefix: str, secret: str, form: str) -> None:
    """A secret (marked by its "@") in a string constant or a comment never shows,
    whatever statement precedes it."""
    value = "@" + secret.replace("'", "''") if form.count("'") else "@" + secret
    if "$" in form or "/*" in form or "--" in form:
        value = "@" + secret.replace("$", "").replace("*/", "").replace("\n", " ")
    if form.startswith("E'"):
        value = value.replace("\\", "\\\\")
    shown = redact_query(prefix + " " + form.format(value) + " x", limit=10_000)
    assert "@" not in shown


@given(st.text(max_size=300), st.integers(min_value=1, max_value=100))
@settings(max_examples=300, deadline=None)
def test_redaction_is_one_printable_line_within_its_limit(query: str, limit: int) -> None:
    shown = redact_query(query, limit)
    assert len(shown) <= limit and (shown.isprintable() or shown == "")
    assert "\n" not in shown


def test_blockers_are_named_by_pid_application_and_redacted_query() -> None:
    b = Blocker(4242, "billing-worker", "tenant_acme", "idle in transaction",
                "SELECT * FROM customers WHERE email = 'jane@example.com' FOR UPDATE")
    line = describe([b])
    assert line == ("blocked by pid 4242 (application_name 'billing-worker', role "
                    "tenant_acme, idle in transaction): SELECT * FROM customers WHERE "
                    "email = ? FOR UPDATE")
    assert "jane" not in line
    assert b.shown()["query"] == "SELECT * FROM customers WHERE email = ? FOR UPDATE"
    hidden = Blocker(7, "\x1b[31mevil\n", None, None, HIDDEN)
    assert describe([hidden]) == ("blocked by pid 7 (application_name '?[31mevil?'): "
                                  "<insufficient privilege>")
    many = describe([Blocker(i, "a", None, None, None) for i in range(5)])
    assert many.count("pid ") == 3 and many.endswith("; and 2 more")
    assert "not seen" in describe([])


def test_next_step_says_resume_or_new_rollout() -> None:
    assert next_step("completed", 3, 0, 0) is None
    assert next_step("interrupted", 3, 0, 0) == \
        "next: re-run the same command: it resumes rollout 3"
    failed = next_step("failed", 3, 2, 1)
    assert failed is not None and failed.startswith("next: 1 tenant gave up waiting for a lock")
    assert "rollout 3 is failed, so it starts a new rollout" in failed
    stopped = next_step("stopped", 9, 5, 0)
    assert stopped is not None and "starts a new rollout" in stopped and "lock" not in stopped


# -- revisions, targets and the check -----------------------------------------------------

R = Revision


def test_history_order_heads_and_branches() -> None:
    revs = [R("c", ("b",), "third"), R("a", (), "first"), R("b", ("a",), "second"),
            R("d", ("b",), "branch"), R("m", ("c", "d"), "merge")]
    assert [r.id for r in ordered(revs)] == ["a", "b", "c", "d", "m"]
    assert heads(revs) == ["m"]
    assert heads(revs[:4]) == ["c", "d"]
    assert heads([]) == [] and ordered([]) == []


def test_history_rows_mark_target_heads_tenants_and_templates() -> None:
    revs = [R("a", (), "first"), R("b", ("a",), "second")]
    rows = history_rows(revs, fleet_target="a", region_targets={"eu": "b", "us": None},
                        tenants={"a": 3, "base": 1}, templates={"s1": "a", "s2": "b"})
    assert rows == [
        {"id": "a", "parents": [], "message": "first", "head": False, "fleet_target": True,
         "region_targets": [], "tenants": 3, "templates": ["s1"]},
        {"id": "b", "parents": ["a"], "message": "second", "head": True,
         "fleet_target": False, "region_targets": ["eu"], "tenants": 0,
         "templates": ["s2"]}]


def test_region_target_overrides_the_fleets() -> None:
    assert target_of("eu", "b", {"eu": "a"}) == "a"
    assert target_of("eu", "b", {"eu": None}) is None  # a region rolled down to base
    assert target_of("us", "b", {"eu": "a"}) == "b"


def test_the_check_and_its_exit_code() -> None:
    ok = check(0, 0, 0)
    assert ok.ok and ok.exit_code == ExitCode.OK
    assert ok.to_json() == {"ok": True, "failed": 0, "off_target": 0, "unreadable": 0,
                            "exit_code": 0}
    bad = check(1, 2, 0)
    assert not bad.ok and bad.exit_code == ExitCode.MIGRATIONS_NOT_CURRENT == 15
    assert bad.line() == ("check: 1 tenant whose last migration failed, 2 tenants not at "
                          "their target revision")
    assert check(0, 0, 1).exit_code == ExitCode.MIGRATIONS_NOT_CURRENT


def test_revision_files_read_as_alembic_reads_them() -> None:
    location = REPO / "migrations" / "tenant"
    from_files = revision_files.revisions(location)
    assert sorted(from_files, key=lambda r: r.id) == \
        sorted(alembic_runner.revisions(location), key=lambda r: r.id)
    assert heads(from_files) == [revision_files.head(location)]
