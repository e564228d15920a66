"""Pure decision functions and parsers: no database needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.adapters.crypto.masterkey import MasterKey, load_master_key, write_key_file
from orchestrator.config import MasterKeySource, parse_config
from orchestrator.domain.durations import parse_pg_duration
from orchestrator.domain.errors import CapacityError, ConfigError, InvalidInput, MasterKeyError
from orchestrator.domain.names import tenant_names, validate_slug
from orchestrator.domain.placement import ServerLoad, choose_server
from orchestrator.domain.rollout_plan import (
    PlanTenant,
    assign_waves,
    budget_exceeded,
    interleave_by_server,
    parse_budget,
    parse_waves,
)

# -- placement -------------------------------------------------------------------


def test_placement_picks_least_filled_server() -> None:
    loads = [ServerLoad("a", 5, 10), ServerLoad("b", 3, 10), ServerLoad("c", 4, 10)]
    assert choose_server("r", loads) == "b"


def test_placement_uses_fill_ratio_not_raw_count() -> None:
    # 40/100 is emptier than 5/10 even though it holds more tenants
    loads = [ServerLoad("small", 5, 10), ServerLoad("big", 40, 100)]
    assert choose_server("r", loads) == "big"


def test_placement_skips_full_and_unavailable_servers() -> None:
    loads = [ServerLoad("full", 10, 10), ServerLoad("off", 0, 10, available=False),
             ServerLoad("ok", 9, 10)]
    assert choose_server("r", loads) == "ok"


def test_placement_ties_break_by_name() -> None:
    assert choose_server("r", [ServerLoad("b", 1, 10), ServerLoad("a", 1, 10)]) == "a"


def test_placement_full_region_is_an_error() -> None:
    with pytest.raises(CapacityError, match="region 'r' is full \\(20/20"):
        choose_server("r", [ServerLoad("a", 10, 10), ServerLoad("b", 10, 10)])


def test_placement_full_region_counts_only_accepting_servers() -> None:
    loads = [ServerLoad("a", 10, 10), ServerLoad("drained", 0, 50, available=False)]
    with pytest.raises(CapacityError, match=r"region 'r' is full \(10/10 tenants on 1 "
                       "server\\(s\\) accepting"):
        choose_server("r", loads)


def test_placement_region_without_an_accepting_server() -> None:
    loads = [ServerLoad("a", 0, 10, available=False), ServerLoad("b", 0, 10, available=False)]
    with pytest.raises(CapacityError, match="region 'r' has no server accepting new tenants "
                       r"\(a, b: drained, retired"):
        choose_server("r", loads)


def test_placement_region_without_servers() -> None:
    with pytest.raises(CapacityError, match="no servers"):
        choose_server("r", [])


# -- slugs -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    "Acme", "ac'me", 'ac"me', "acme;drop", "ac me", "a" * 41, "ab", "1acme", "_acme",
    "acme-co", "postgres", "template1", "tenantctl_catalog", "pg_acme", "", "acmé",
])
def test_invalid_slugs_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidInput):
        validate_slug(bad)


@pytest.mark.parametrize("good", ["acme", "acme_co", "a12", "a" * 40])
def test_valid_slugs(good: str) -> None:
    assert validate_slug(good) == good


def test_owner_and_login_names_never_collide_across_slugs() -> None:
    # slug "x_owner"'s login role must not be slug "x"'s owner role
    assert tenant_names("acme").owner_role != tenant_names("acme_owner").login_role
    assert len(tenant_names("a" * 40).database) <= 63


# -- master key ----------------------------------------------------------------------


def test_wrap_unwrap_round_trip_and_binding() -> None:
    key = MasterKey(os.urandom(32))
    wrapped = key.wrap(b"s3cret", "tenant:a:password")
    assert "s3cret" not in wrapped
    assert key.unwrap(wrapped, "tenant:a:password") == b"s3cret"
    with pytest.raises(MasterKeyError, match="failed authentication"):
        key.unwrap(wrapped, "tenant:b:password")  # copied onto another row
    with pytest.raises(MasterKeyError, match="wrapped by master key"):
        MasterKey(os.urandom(32)).unwrap(wrapped, "tenant:a:password")
    tampered = wrapped[:-4] + ("AAAA" if not wrapped.endswith("AAAA") else "BBBB")
    with pytest.raises(MasterKeyError):
        key.unwrap(tampered, "tenant:a:password")


def test_key_repr_hides_material() -> None:
    key = MasterKey(b"k" * 32)
    assert "kkkk" not in repr(key)


def test_key_file_mode_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "master.key"
    write_key_file(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    load_master_key(MasterKeySource(file=path))
    path.chmod(0o644)
    with pytest.raises(MasterKeyError, match="readable by others"):
        load_master_key(MasterKeySource(file=path))
    with pytest.raises(MasterKeyError, match="does not exist"):
        load_master_key(MasterKeySource(file=tmp_path / "nope"))
    monkeypatch.delenv("TCTL_TEST_KEY", raising=False)
    with pytest.raises(MasterKeyError, match="not set"):
        load_master_key(MasterKeySource(env="TCTL_TEST_KEY"))
    monkeypatch.setenv("TCTL_TEST_KEY", "bm90IGEga2V5")
    with pytest.raises(MasterKeyError, match="must be 32 bytes"):
        load_master_key(MasterKeySource(env="TCTL_TEST_KEY"))


# -- config ----------------------------------------------------------------------------


def _raw() -> dict:
    return {
        "catalog": {"dsn": "postgresql://admin@db:5432/cat"},
        "master_key": {"file": "master.key"},
        "regions": {"eu-central": {
            "backup_store": "s3://bucket/eu",
            "servers": [{"name": "eu-1", "admin_dsn": "postgresql://admin@eu1/postgres",
                         "capacity": 50}],
        }},
    }


def test_config_parses_and_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = parse_config(_raw(), tmp_path / "tenantctl.toml")
    assert cfg.master_key.file == tmp_path / "master.key"
    assert cfg.region("eu-central").servers[0].capacity == 50
    assert cfg.tenant_migrations.name == "tenant"


@pytest.mark.parametrize("mutate, key, problem", [
    (lambda r: r.pop("catalog"), "catalog", "missing table"),
    (lambda r: r["catalog"].pop("dsn"), "catalog.dsn", "missing"),
    (lambda r: r["catalog"].update(dsn="postgresql://u:pw@h/db"), "catalog.dsn",
     "must not contain a password"),
    (lambda r: r["master_key"].update(env="X"), "master_key", "exactly one"),
    (lambda r: r.update(regions={"EU": r["regions"]["eu-central"]}), "regions.EU",
     "lower-case"),
    (lambda r: r["regions"]["eu-central"]["servers"][0].update(capacity="ten"),
     "regions.eu-central.servers[0].capacity", "must be an integer"),
    (lambda r: r["regions"]["eu-central"].update(backup_store="ftp://x"),
     "regions.eu-central.backup_store", "file:// or s3://"),
    (lambda r: r.update(colour="blue"), "colour", "unknown key"),
    (lambda r: r["regions"]["eu-central"]["servers"].append(
        dict(r["regions"]["eu-central"]["servers"][0])),
     "regions.eu-central.servers[1].name", "defined twice"),
    (lambda r: r.update(tenants={"migrations": "/nonexistent"}), "tenants.migrations",
     "not an Alembic script directory"),
    (lambda r: r.update(tenants={"spare_databases": -1}), "tenants.spare_databases",
     "at least 0"),
    (lambda r: r.update(tenants={"spare_databases": 101}), "tenants.spare_databases",
     "at most 100"),
    (lambda r: r.update(tenants={"lock_wait_seconds": 0}), "tenants.lock_wait_seconds",
     "at least 1"),
    (lambda r: r.update(tenants={"lock_wait_seconds": "5s"}), "tenants.lock_wait_seconds",
     "must be an integer"),
    (lambda r: r.update(tenants={"lock_wait_seconds": 99999999999}),
     "tenants.lock_wait_seconds", "at most 3600"),
])
def test_config_errors_name_file_key_and_problem(tmp_path: Path, mutate, key: str,
                                                 problem: str) -> None:
    raw = _raw()
    mutate(raw)
    path = tmp_path / "tenantctl.toml"
    with pytest.raises(ConfigError) as err:
        parse_config(raw, path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: ")
    assert problem in message
    assert "\n" not in message


def test_lock_wait_defaults_to_a_few_seconds(tmp_path: Path) -> None:
    assert parse_config(_raw(), tmp_path / "t.toml").lock_timeout == "5s"
    raw = _raw()
    raw["tenants"] = {"lock_wait_seconds": 2}
    assert parse_config(raw, tmp_path / "t.toml").lock_timeout == "2s"


def test_unknown_region_lists_known_ones(tmp_path: Path) -> None:
    cfg = parse_config(_raw(), tmp_path / "t.toml")
    with pytest.raises(ConfigError, match="unknown region 'mars' \\(known: eu-central\\)"):
        cfg.region("mars")


# -- rollout planning ----------------------------------------------------------------



def _tenants(spec: dict[str, int]) -> list[PlanTenant]:
    out = []
    for server, n in spec.items():
        out += [PlanTenant(len(out) + i, f"{server}_t{i:02d}", "r", server, "0001")
                for i in range(n)]
    return out


def test_interleave_spreads_over_servers() -> None:
    order = [t.server for t in interleave_by_server(_tenants({"a": 3, "b": 1, "c": 2}))]
    assert order == ["a", "b", "c", "a", "c", "a"]


def test_waves_are_cumulative_with_canary_first() -> None:
    waves = assign_waves(_tenants({"a": 50, "b": 50}), 2, parse_waves("1,10%,100%"))
    assert [len(w) for w in waves] == [2, 1, 9, 88]
    assert {t.server for t in waves[0]} == {"a", "b"}  # the canary touches both servers
    flat = [t.tenant_id for w in waves for t in w]
    assert sorted(flat) == list(range(100)) and len(set(flat)) == 100


def test_last_wave_always_takes_the_rest() -> None:
    assert [len(w) for w in assign_waves(_tenants({"a": 10}), 0, parse_waves("3,5"))] == \
        [0, 3, 7]


def test_empty_plan() -> None:
    assert assign_waves([], 3, parse_waves("100%")) == [[]]


@pytest.mark.parametrize("spec", ["", "0", "x", "10%%", "150%", "-1", "1,,2"])
def test_bad_waves(spec: str) -> None:
    with pytest.raises(InvalidInput):
        parse_waves(spec)


def test_budget() -> None:
    assert parse_budget("3", 100) == 3
    assert parse_budget("10%", 45) == 4
    assert parse_budget("0%", 45) == 0
    assert not budget_exceeded(3, 3) and budget_exceeded(4, 3)
    for bad in ("-1", "x", "101%"):
        with pytest.raises(InvalidInput):
            parse_budget(bad, 10)


def test_timeouts() -> None:
    assert parse_pg_duration("2s", "--lock-timeout") == "2s"
    assert parse_pg_duration("500", "--lock-timeout") == "500ms"
    assert parse_pg_duration("5min", "--statement-timeout") == "5min"
    # the one duration grammar: 1d is a day (Postgres has d), 5m is 5min
    assert parse_pg_duration("1d", "--lock-timeout") == "1d"
    for bad in ("soon", "1y", "-5s", "5 s; DROP TABLE x"):
        with pytest.raises(InvalidInput):
            parse_pg_duration(bad, "--lock-timeout")


# -- backup schedules and retention ---------------------------------------------------

from datetime import UTC, datetime, timedelta  # noqa: E402

from backups.policy import (  # noqa: E402
    BackupFact,
    RetentionPolicy,
    Schedule,
    is_due,
    last_slot,
    retention,
    slot_offset,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_slots_spread_tenants_over_the_day() -> None:
    hours = {slot_offset(f"tenant_{i}", timedelta(days=1)).seconds // 3600
             for i in range(2000)}
    assert len(hours) == 24  # every hour of the day gets some tenants
    assert slot_offset("acme", timedelta(days=1)) == slot_offset("acme", timedelta(days=1))


def test_due_after_the_last_slot_only() -> None:
    sched = Schedule()
    slot = last_slot("acme", NOW, sched)
    assert NOW - timedelta(days=1) < slot <= NOW
    assert is_due("acme", None, NOW, sched)
    assert is_due("acme", slot - timedelta(seconds=1), NOW, sched)
    assert not is_due("acme", slot + timedelta(seconds=1), NOW, sched)


def test_retention_keeps_recent_weekly_and_the_newest() -> None:
    days = [0, 1, 3, 6, 8, 9, 15, 22, 29, 40, 60]
    facts = [BackupFact(i, "acme", NOW - timedelta(days=d, hours=1))
             for i, d in enumerate(days)]
    verdicts = {v.backup_id: v for v in retention(facts, NOW, RetentionPolicy())}
    kept = sorted(days[i] for i, v in verdicts.items() if v.keep)
    assert kept == [0, 1, 3, 6, 8, 15, 22]  # 7 days, then the newest of weeks 2, 3, 4
    assert all(v.reason for v in verdicts.values())


def test_retention_never_drops_the_last_backup() -> None:
    old = [BackupFact(1, "acme", NOW - timedelta(days=400))]
    (verdict,) = retention(old, NOW, RetentionPolicy(keep_days=1, keep_weeks=0))
    assert verdict.keep and "floor" in verdict.reason


def test_retention_plan_never_early_and_legal_hold_blocks() -> None:
    from datetime import UTC, datetime, timedelta

    from backups.policy import Verdict
    from orchestrator.domain.retention_plan import TenantFact, plan, tenant_action

    now = datetime(2026, 12, 1, tzinfo=UTC)
    second = timedelta(seconds=1)

    def fact(state: str, hold: datetime | None = None, purge: datetime | None = None,
             legal: bool = False) -> TenantFact:
        return TenantFact("t", state, hold, purge, legal, "case 7" if legal else None)

    assert tenant_action(fact("cancelled", hold=now + second), now) is None  # a second early
    delete = tenant_action(fact("cancelled", hold=now), now)
    assert delete is not None and delete.kind == "delete"
    assert tenant_action(fact("deleted", purge=now + second), now) is None
    purge = tenant_action(fact("deleted", purge=now - second), now)
    assert purge is not None and purge.kind == "purge"
    blocked = tenant_action(fact("deleted", purge=now - second, legal=True), now)
    assert blocked is not None and blocked.kind == "blocked" and "case 7" in blocked.detail
    for state in ("active", "suspended", "provisioning", "purged"):
        assert tenant_action(fact(state, now - second, now - second), now) is None
    actions = plan([fact("deleted", purge=now - second),
                    TenantFact("a", "cancelled", now - timedelta(days=2), None, False, None)],
                   [Verdict(9, "b", False, "old"), Verdict(8, "b", True, "kept")], 3,
                   now - timedelta(days=365), now)
    assert [a.kind for a in actions] == ["delete", "purge", "prune", "audit_purge"]
    assert actions[2].backup_id == 9 and actions[3].count == 3


def test_lifecycle_transitions() -> None:
    from datetime import UTC, datetime, timedelta

    from orchestrator.domain.states import Op, refusal

    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert refusal(Op.cancel, "active", now=now) is None
    assert refusal(Op.cancel, "suspended", now=now) is None
    assert "is deleted" in (refusal(Op.cancel, "deleted", now=now) or "")
    assert refusal(Op.reactivate, "cancelled", now=now, hold_until=now + timedelta(days=1)) \
        is None
    assert "no longer" in (refusal(Op.reactivate, "cancelled", now=now, hold_until=now) or "")
    assert refusal(Op.suspend, "cancelled", now=now) is not None
    assert refusal(Op.resume, "active", now=now) is not None


@pytest.mark.parametrize("pg_dump", ["/usr/lib/postgresql/15/bin/pg_dump"])
def test_compression_probe_understands_an_older_pg_dump(pg_dump: str) -> None:
    """pg_dump 15 refuses an unknown method with "invalid value", not with "does not
    support compression": the probe once took that for zstd support."""
    from backups.service import compression_arg

    if not Path(pg_dump).exists():
        pytest.skip(f"{pg_dump} is not installed")
    assert compression_arg(pg_dump) == "--compress=6"


def test_session_options_are_escaped_and_keep_the_dsns_own() -> None:
    from psycopg.conninfo import conninfo_to_dict

    from orchestrator.adapters.postgres.alembic_runner import session_options

    dsn = "host=h dbname=d options='-c search_path=app'"
    got = conninfo_to_dict(session_options(dsn, {"role": "owner_acme", "lock_timeout": "2s",
                                                 "statement_timeout": ""}))
    assert got["options"] == "-c search_path=app -c role=owner_acme -c lock_timeout=2s"
    assert got["host"] == "h" and got["dbname"] == "d"
    odd = conninfo_to_dict(session_options("dbname=d", {"application_name": "a b\\c"}))
    assert odd["options"] == "-c application_name=a\\ b\\\\c"
    assert session_options("dbname=d", {"role": ""}) == "dbname=d"


# -- heads without Alembic ---------------------------------------------------------


def _alembic_head(location: Path) -> str | None:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(location))
    return ScriptDirectory.from_config(cfg).get_current_head()


def test_catalog_head_constant_is_the_head_of_the_catalog_migrations() -> None:
    from orchestrator.adapters.catalog.db import CATALOG_HEAD, CATALOG_MIGRATIONS

    # a new catalog revision must move CATALOG_HEAD with it: every command compares
    # the catalog's alembic_version with it
    assert _alembic_head(CATALOG_MIGRATIONS) == CATALOG_HEAD


def _rev(versions: Path, name: str, revision: str, down: object, annotated: bool = False
         ) -> None:
    ann = ": str" if annotated else ""
    (versions / f"{name}.py").write_text(
        f'"""{name}"""\nfrom alembic import op\n\nrevision{ann} = {revision!r}\n'
        f"down_revision = {down!r}\n\n\ndef upgrade() -> None:\n    pass\n")


def test_revision_files_head_agrees_with_alembic(tmp_path: Path) -> None:
    from bench.synthetic_history import write_history
    from orchestrator.adapters.postgres import revision_files

    repo = Path(__file__).resolve().parent.parent
    for location in (repo / "migrations" / "tenant", repo / "migrations" / "catalog",
                     write_history(tmp_path / "synthetic", 30)):
        assert revision_files.head(location) == _alembic_head(location), location
    merged = tmp_path / "merged"
    versions = merged / "versions"
    versions.mkdir(parents=True)
    (versions / "__init__.py").write_text("revision = 'not a revision'\n")  # Alembic skips it
    _rev(versions, "a", "a1", None, annotated=True)
    _rev(versions, "b", "b1", "a1")
    _rev(versions, "c", "c1", "a1")
    _rev(versions, "m", "m1", ("b1", "c1"))
    assert revision_files.head(merged) == _alembic_head(merged) == "m1"
    empty = tmp_path / "empty"
    (empty / "versions").mkdir(parents=True)
    assert revision_files.head(empty) is None


def test_revision_files_undecided_leaves_it_to_alembic(tmp_path: Path) -> None:
    from orchestrator.adapters.postgres import revision_files

    def case(name: str, files: dict[str, str]) -> Path:
        (tmp_path / name / "versions").mkdir(parents=True)
        for file, text in files.items():
            (tmp_path / name / "versions" / file).write_text(text)
        return tmp_path / name

    base = 'revision = "a1"\ndown_revision = None\n'
    for location in (
        tmp_path / "missing",
        case("computed", {"a.py": 'revision = "a" + "1"\ndown_revision = None\n'}),
        case("no_down", {"a.py": 'revision = "a1"\n'}),
        case("twice", {"a.py": base + 'revision = "a2"\n'}),
        case("two_heads", {"a.py": base, "b.py": 'revision = "b1"\ndown_revision = "a1"\n',
                           "c.py": 'revision = "c1"\ndown_revision = "a1"\n'}),
        case("dangling", {"a.py": 'revision = "a1"\ndown_revision = "gone"\n'}),
        case("broken", {"a.py": "revision = (\n"}),
    ):
        with pytest.raises(revision_files.Undecided):
            revision_files.head(location)


# -- CLI rendering ---------------------------------------------------------------


def test_rollout_lines_are_shown_as_typed(capsys: pytest.CaptureFixture[str]) -> None:
    """A rollout's lines carry server text (an error, redacted by the audit rules):
    shown through cli/output as every other line, never read as rich markup (which
    dropped a "[redacted]" and crashed on a "[/x]") and with escapes shown escaped."""
    from cli.migrate import _Renderer
    from orchestrator.services.rollout import Event

    for as_json in (False, True):
        _Renderer(as_json).event(Event(
            "plan", message="password '[redacted]' failed at [/x] \x1b]0;title\x07"))
        out, err = capsys.readouterr()
        line = err if as_json else out  # with --json, stdout holds the JSON only
        assert line == "password '[redacted]' failed at [/x] \\x1b]0;title\\x07\n", line
        assert (out if as_json else err) == ""
