"""The destructive-SQL rule and the rollout guard's wording: pure, no Postgres."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.adapters.postgres import alembic_runner
from orchestrator.domain.destructive_sql import MARK, annotate, classify, summarize
from orchestrator.domain.guardrails import MigrationStep, RolloutRisk, TargetMove, steps_of

TENANT_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations" / "tenant"


def kinds(sql: str) -> list[tuple[str, str]]:
    return [(f.kind, f.subject) for f in classify(sql)]


@pytest.mark.parametrize("sql, expected", [
    ("DROP TABLE products", [("DROP TABLE", "products")]),
    ("drop table if exists a, s.b cascade;", [("DROP TABLE", "a"), ("DROP TABLE", "s.b")]),
    ("DROP INDEX CONCURRENTLY IF EXISTS ix_a", [("DROP INDEX", "ix_a")]),
    ("DROP SCHEMA app CASCADE", [("DROP SCHEMA", "app")]),
    ("DROP MATERIALIZED VIEW mv", [("DROP MATERIALIZED VIEW", "mv")]),
    ("DROP VIEW v1", [("DROP VIEW", "v1")]),
    ("DROP FUNCTION f(int, text)", [("DROP FUNCTION", "f")]),
    ("DROP TRIGGER trg ON orders", [("DROP TRIGGER", "trg ON orders")]),
    ("DROP OWNED BY app, etl CASCADE", [("DROP OWNED", "app, etl")]),
    ("ALTER TABLE t\n    DROP COLUMN x,\n    ALTER COLUMN y TYPE text",
     [("DROP COLUMN", "t.x"), ("ALTER COLUMN TYPE", "t.y")]),
    ('DROP TABLE "Order Items"', [("DROP TABLE", '"Order Items"')]),
    ("ALTER TABLE products DROP COLUMN reorder_level",
     [("DROP COLUMN", "products.reorder_level")]),
    ("ALTER TABLE ONLY t DROP IF EXISTS c", [("DROP COLUMN", "t.c")]),
    ("ALTER TABLE t ADD COLUMN a int, DROP COLUMN b, DROP CONSTRAINT ck",
     [("DROP COLUMN", "t.b"), ("DROP CONSTRAINT", "t.ck")]),
    ("ALTER TABLE t ALTER COLUMN price TYPE numeric(8, 2) USING price::numeric",
     [("ALTER COLUMN TYPE", "t.price")]),
    ("ALTER TABLE t ALTER price SET DATA TYPE bigint", [("ALTER COLUMN TYPE", "t.price")]),
    ("ALTER TYPE addr DROP ATTRIBUTE zip", [("ALTER TYPE DROP ATTRIBUTE", "addr.zip")]),
    ("TRUNCATE audit_events", [("TRUNCATE", "audit_events")]),
    ("TRUNCATE TABLE ONLY a, b RESTART IDENTITY", [("TRUNCATE", "a"), ("TRUNCATE", "b")]),
    ("DELETE FROM sessions", [("DELETE without WHERE", "sessions")]),
    ("UPDATE products SET price = 0", [("UPDATE without WHERE", "products")]),
    ("UPDATE products p SET price = (SELECT 1 WHERE true)",
     [("UPDATE without WHERE", "products")]),  # the subquery's WHERE is not its own
    ("WITH gone AS (DELETE FROM t RETURNING id) SELECT count(*) FROM gone",
     [("DELETE without WHERE", "t")]),
    ("DO $$ BEGIN DROP TABLE old_stuff; END $$", [("DROP TABLE", "old_stuff")]),
    ("DO $body$ BEGIN IF true THEN DELETE FROM t; END IF; END $body$",
     [("DELETE without WHERE", "t")]),
    ("DO $$ BEGIN EXECUTE format('DROP TABLE %I', 'x'); END $$",
     [("EXECUTE", "(dynamic SQL in a DO block, not checked)")]),
])
def test_destructive(sql: str, expected: list[tuple[str, str]]) -> None:
    assert kinds(sql) == expected


@pytest.mark.parametrize("sql", [
    "CREATE INDEX ix_a ON t (a)",
    "CREATE UNIQUE INDEX CONCURRENTLY ix_b ON t (lower(email))",
    "ALTER TABLE t ADD COLUMN reorder_level integer DEFAULT 0 NOT NULL",
    "ALTER TABLE t ALTER COLUMN c DROP DEFAULT",
    "ALTER TABLE t ALTER COLUMN c DROP NOT NULL",
    "ALTER TABLE t ALTER COLUMN type SET DEFAULT 'x'",  # a column named type
    "ALTER TABLE t RENAME COLUMN a TO b",
    "ALTER TYPE status ADD VALUE 'shipped'",
    "DELETE FROM alembic_version WHERE version_num = '0001'",
    "UPDATE alembic_version SET version_num='0005' WHERE alembic_version.version_num = '0004'",
    "UPDATE t SET a = 1 FROM u WHERE t.id = u.id",
    "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = excluded.a",
    "SELECT * FROM t FOR UPDATE",
    "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
    "CREATE TABLE t (id int REFERENCES u ON DELETE CASCADE ON UPDATE CASCADE)",
    "CREATE TRIGGER trg BEFORE INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION f()",
    "GRANT SELECT, UPDATE, DELETE ON t TO r",
    # the words only inside strings, comments, quoted names and function bodies
    "INSERT INTO notes (body) VALUES ('DROP TABLE products; TRUNCATE x')",
    "INSERT INTO notes VALUES (E'it''s \\' DROP TABLE y')",
    "COMMENT ON COLUMN t.c IS 'never DELETE FROM t'",
    "-- DROP TABLE products\nSELECT 1",
    "/* outer /* DROP TABLE nested */ still a comment: DROP TABLE x */ SELECT 1",
    'ALTER TABLE t ADD COLUMN "drop" int',
    'SELECT "DELETE FROM t" FROM u',
    "CREATE FUNCTION f() RETURNS void AS $$ DELETE FROM t $$ LANGUAGE sql",
    "SELECT $tag$ DROP TABLE x $tag$",
    "DO LANGUAGE plpgsql $x$ BEGIN UPDATE t SET a = 1 WHERE b; END $x$",
    "DELETE FROM t WHERE CURRENT OF cur",
    "ALTER TABLE t ALTER COLUMN c SET NOT NULL",
    "BEGIN; COMMIT;",
    "",
])
def test_not_destructive(sql: str) -> None:
    assert kinds(sql) == []


def test_case_and_multi_statement() -> None:
    sql = "create index i on t (a);\nAlTeR tAbLe T dRoP cOlUmN Reorder;\ndelete from x where y;"
    found = classify(sql)
    assert [(f.kind, f.subject) for f in found] == [("DROP COLUMN", "t.reorder")]
    assert found[0].offset == sql.index("AlTeR")
    assert found[0].statement == "AlTeR tAbLe T dRoP cOlUmN Reorder;"


def test_annotate_marks_each_destructive_statement_and_stays_sql() -> None:
    sql = "BEGIN;\n\nCREATE INDEX i ON t (a);\n\nDROP INDEX j;\n\nDELETE FROM t;\n\nCOMMIT;\n"
    marked = annotate(sql)
    lines = marked.splitlines()
    assert lines[lines.index("DROP INDEX j;") - 1] == f"-- {MARK}: DROP INDEX j"
    assert lines[lines.index("DELETE FROM t;") - 1] == f"-- {MARK}: DELETE without WHERE t"
    assert marked.count(MARK) == 2
    # only comments were added: the same statements, the same findings
    assert [(f.kind, f.subject) for f in classify(marked)] == \
        [(f.kind, f.subject) for f in classify(sql)]
    assert annotate("SELECT 1;\n") == "SELECT 1;\n"  # nothing to mark: unchanged


def test_the_real_downgrade_0006_to_0004() -> None:
    """The tenant schema's own revisions: 0005's downgrade drops products.reorder_level."""
    sql = alembic_runner.offline_sql(TENANT_MIGRATIONS, "0006_customer_email_ci",
                                     "0004_order_status_idx")
    found = classify(sql)
    assert ("DROP COLUMN", "products.reorder_level") in [(f.kind, f.subject) for f in found]
    assert summarize(found) == ("1 DROP COLUMN (products.reorder_level), 2 DROP INDEX "
                                "(ix_customers_email_lower, ix_products_reorder_level)")
    assert f"-- {MARK}: DROP COLUMN products.reorder_level\nALTER TABLE products DROP " \
        "COLUMN reorder_level;" in annotate(sql)
    # and the upgrade back is clean: a cron rollout to head is never asked anything
    up = alembic_runner.offline_sql(TENANT_MIGRATIONS, "0004_order_status_idx",
                                    "0006_customer_email_ci")
    assert classify(up) == []
    assert classify(alembic_runner.offline_sql(TENANT_MIGRATIONS, None,
                                               "0006_customer_email_ci")) == []


def test_summary_names_few_objects_and_counts_each_once() -> None:
    found = classify("DROP INDEX a; DROP INDEX b; DROP INDEX c; DROP INDEX d; DROP INDEX a;"
                     "TRUNCATE t")
    assert summarize(found) == "1 TRUNCATE (t), 4 DROP INDEX (a, b, c, +1 more)"
    assert summarize(found, names=0) == "1 TRUNCATE, 4 DROP INDEX"


def test_rollout_risk_words_and_decision() -> None:
    drop = classify("ALTER TABLE products DROP COLUMN reorder_level")
    down = RolloutRisk("0004", (MigrationStep("0006", "0004", 5, True, tuple(drop)),
                                MigrationStep("0005", "0004", 2, True, tuple(drop))),
                       TargetMove(None, "0006", "0004", True, 3), at_target=1)
    assert down.needs_confirmation and down.downgrade and down.tenants == 7
    assert down.headline() == ("7 tenants, downgrade 0006/0005 → 0004 (7), fleet target "
                               "downgrade 0006 → 0004, 1 DROP COLUMN "
                               "(products.reorder_level)")
    lines = down.lines()
    assert lines[0] == "plan: migrate 7 tenants to 0004 (1 already there)"
    assert "  - fleet target 0006 → 0004 (downgrade); the templates on 3 servers follow" \
        in lines
    assert "  !! DROP COLUMN products.reorder_level" in lines
    assert down.to_json()["destructive"] == [{
        "kind": "DROP COLUMN", "subject": "products.reorder_level",
        "statement": "ALTER TABLE products DROP COLUMN reorder_level"}]
    up = RolloutRisk("0006", (MigrationStep("0004", "0006", 7, False),),
                     TargetMove(None, "0004", "0006", False, 3))
    assert not up.needs_confirmation
    # nobody to migrate, but the fleet target goes down: still a downgrade
    target_only = RolloutRisk("0004", (), TargetMove("eu", "0006", "0004", True, 2))
    assert target_only.needs_confirmation
    assert target_only.headline() == "0 tenants, region eu target downgrade 0006 → 0004"
    # an upgrade whose SQL truncates something asks too
    wipe = RolloutRisk("0007", (MigrationStep("0006", "0007", 1, False,
                                              tuple(classify("TRUNCATE cache"))),))
    assert wipe.needs_confirmation and not wipe.downgrade
    assert wipe.headline() == "1 tenant, upgrade 0006 → 0007, 1 TRUNCATE (cache)"


def test_a_revision_the_files_do_not_know_is_reported_not_judged() -> None:
    """Tenants marked with a newer deploy's revision: no SQL to judge (the run fails
    them untouched), so they alone ask nothing; leaving an unknown target is down."""
    assert alembic_runner.known_revision(TENANT_MIGRATIONS, "0005_reorder_level")
    assert alembic_runner.known_revision(TENANT_MIGRATIONS, None)
    assert not alembic_runner.known_revision(TENANT_MIGRATIONS, "0099_from_the_future")
    steps = steps_of([("0004", 3), ("0099", 2), ("0006", 1)], "0006", {"0004": False},
                     {"0004": []}, unknown={"0099"})
    risk = RolloutRisk("0006", steps, at_target=1)
    assert not risk.needs_confirmation
    assert risk.headline() == "5 tenants, upgrade 0004 → 0006 (3), 2 at unknown revision 0099"
    assert "  ? 2 tenants at 0099, a revision the migration files do not know: they " \
        "fail, untouched" in risk.lines()
    moved = RolloutRisk("0006", steps, TargetMove(None, "0099", "0006", True, 1))
    assert moved.needs_confirmation
