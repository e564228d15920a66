"""Storage quota (no Postgres): the decision rule over plain data, and its effects
over the fakes of the ports — what is revoked and given back, audited, left alone
(a hold, a suspension), and that one tenant's failure is its own. What only
Postgres can show (an INSERT refused, a SELECT still working) is in test_quota.py."""

from __future__ import annotations

import dataclasses
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from orchestrator.config import Config, parse_config
from orchestrator.domain.bounds import Plan
from orchestrator.domain.errors import ConfigError
from orchestrator.domain.names import tenant_lock
from orchestrator.domain.quota import (
    QuotaAction,
    QuotaLevel,
    check_warning,
    decide,
    level,
    writes_expected,
)
from orchestrator.domain.states import CANCELLING
from orchestrator.ports import ServerOperationFailed
from orchestrator.services import lifecycle, quota
from tests.fakes import T0, World

MB = 1 << 20
NOW = T0




@pytest.mark.parametrize(("state", "step", "flag", "size", "quota_", "action"), [
    ("active", None, False, 11 * MB, 10 * MB, QuotaAction.enforce),
    ("active", "unshown", False, 11 * MB, 10 * MB, QuotaAction.enforce),
    ("active", None, True, 11 * MB, 10 * MB, QuotaAction.keep),
    ("active", None, True, 9 * MB, 10 * MB, QuotaAction.release),
    ("active", None, True, 50 * MB, None, QuotaAction.release),  # plan without a quota
    ("active", None, True, None, None, QuotaAction.release),
    ("active", None, False, 8 * MB, 10 * MB, QuotaAction.warn),  # 80 %
    ("active", None, False, 10 * MB, 10 * MB, QuotaAction.warn),  # at it, not past it
    ("active", None, False, 7 * MB, 10 * MB, QuotaAction.ok),
    ("active", None, False, 50 * MB, None, QuotaAction.ok),
    ("active", None, False, None, 10 * MB, QuotaAction.skip),  # size unknown
    ("active", CANCELLING, False, 11 * MB, 10 * MB, QuotaAction.skip),
    # never the hold's, a suspension's or a deletion's privileges, flagged or not
    ("cancelled", None, False, 11 * MB, 10 * MB, QuotaAction.skip),
    ("cancelled", None, True, 1 * MB, 10 * MB, QuotaAction.skip),
    ("cancelled", None, True, 1 * MB, None, QuotaAction.skip),
    ("suspended", None, False, 11 * MB, 10 * MB, QuotaAction.skip),
    ("suspended", None, True, 1 * MB, 10 * MB, QuotaAction.skip),
    ("deleted", None, True, None, 10 * MB, QuotaAction.skip),
    ("provisioning", None, False, 11 * MB, 10 * MB, QuotaAction.skip),
])
def test_decide(state: str, step: str | None, flag: bool, size: int | None,
                quota_: int | None, action: QuotaAction) -> None:
    assert decide(state, step, flag, size, quota_, 0.8).action == action


def test_the_warning_share_is_a_parameter() -> None:
    assert decide("active", None, False, 5 * MB, 10 * MB, 0.5).action == QuotaAction.warn
    assert decide("active", None, False, 5 * MB, 10 * MB, 0.6).action == QuotaAction.ok
    assert decide("active", None, False, 10 * MB, 10 * MB, 1.0).action == QuotaAction.warn
    d = decide("active", None, False, 9 * MB, 10 * MB, 0.8)
    assert d.used == pytest.approx(0.9) and "90%" in d.reason


def test_level() -> None:
    assert level(11, 10) == QuotaLevel.over
    assert level(8, 10) == QuotaLevel.warning
    assert level(7, 10) == QuotaLevel.ok
    assert level(None, 10) is None and level(5, None) is None


@pytest.mark.parametrize(("state", "step", "flag", "expected"), [
    ("active", None, False, True), ("active", None, True, False),
    ("suspended", None, False, True), ("suspended", None, True, False),
    ("cancelled", None, False, False), ("cancelled", None, True, False),
    ("active", CANCELLING, False, None), ("deleted", None, False, None),
    ("provisioning", None, False, None),
])
def test_writes_expected(state: str, step: str | None, flag: bool,
                         expected: bool | None) -> None:
    assert writes_expected(state, step, flag) is expected


@pytest.mark.parametrize(("value", "share"), [
    (0.8, 0.8), (1, 1.0), (0.05, 0.05), (0, None), (1.2, None), (-0.5, None),
    ("0.8", None), (True, None)])
def test_check_warning(value: object, share: float | None) -> None:
    assert check_warning(value) == share


BASE = """
[catalog]
dsn = "postgresql://x@localhost/c"
[master_key]
env = "K"
[regions.eu]
backup_store = "file:///tmp/b"
[[regions.eu.servers]]
name = "eu-1"
admin_dsn = "postgresql://a@localhost/postgres"
"""


def _config(extra: str) -> Config:
    return parse_config(tomllib.loads(BASE + extra), Path("/tmp/t.toml"))


def test_config_quota_warning() -> None:
    assert _config("").usage.quota_warning == 0.8
    assert _config("[usage]\nquota_warning = 0.9\n").usage.quota_warning == 0.9
    for bad in ("0", "1.5", '"80%"'):
        with pytest.raises(ConfigError, match=r"usage\.quota_warning"):
            _config(f"[usage]\nquota_warning = {bad}\n")


@pytest.mark.parametrize("bad", ['"10 MB"', '"ten"', "10", '"10MiB"', '"0MB"'])
def test_an_unparsable_quota_is_one_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"plans\.small\.storage_quota") as e:
        _config(f"[plans.small]\nstorage_quota = {bad}\n")
    assert "\n" not in str(e.value)


# -- the effects, over the fakes -------------------------------------------------------


@pytest.fixture
def world() -> World:
    w = World()
    w.cfg = dataclasses.replace(w.cfg, plans={**w.cfg.plans,
                                              "small": Plan("small", storage_quota=10 * MB)})
    w.deps.cfg = w.cfg
    w.clock.at = NOW
    return w


def _measured(world: World, slug: str, size: int | None) -> quota.Measured:
    t = world.catalog.row(slug)
    return quota.Measured(slug, t.state, t.step, t.over_quota, t.plan, size)


def _writes(world: World, slug: str) -> bool:
    t = world.catalog.row(slug)
    return world.admin.servers[t.server].databases[t.database].login_writes


def test_past_the_quota_writes_are_revoked_and_audited(world: World) -> None:
    world.tenant("acme", plan="small")
    world.tenant("other", plan="small")
    out = quota.judge(world.deps, [_measured(world, "acme", 11 * MB),
                                   _measured(world, "other", 2 * MB)], NOW)
    assert [(o.slug, o.outcome) for o in out] == [("acme", "enforced"), ("other", "ok")]
    row = world.catalog.row("acme")
    assert (row.over_quota, row.over_quota_since, row.state) == (True, NOW, "active")
    assert not _writes(world, "acme") and _writes(world, "other")
    ev = world.catalog.events("tenant.quota.enforce", "acme")
    assert len(ev) == 1 and ev[0].detail["size"] == 11 * MB \
        and ev[0].detail["quota"] == 10 * MB
    # the next run: still over, nothing more done or audited
    calls = len(world.admin.calls)
    assert quota.judge(world.deps, [_measured(world, "acme", 12 * MB)], NOW)[0].outcome \
        == "over"
    assert len(world.admin.calls) == calls
    assert len(world.catalog.events("tenant.quota.enforce")) == 1


def test_under_the_quota_again_writes_come_back(world: World) -> None:
    world.tenant("acme", plan="small")
    quota.judge(world.deps, [_measured(world, "acme", 11 * MB)], NOW)
    later = NOW + timedelta(hours=1)
    out = quota.judge(world.deps, [_measured(world, "acme", 3 * MB)], later)
    assert out[0].outcome == "released"
    row = world.catalog.row("acme")
    assert (row.over_quota, row.over_quota_since) == (False, None)
    assert _writes(world, "acme")
    assert world.catalog.actions("acme")[-1] == "tenant.quota.release"


def test_a_plan_without_a_quota_releases(world: World) -> None:
    world.tenant("acme", plan="small")
    quota.judge(world.deps, [_measured(world, "acme", 11 * MB)], NOW)
    world.catalog.row("acme").plan = "default"
    assert quota.apply(world.deps, "acme", 11 * MB, NOW, trigger="set-plan").outcome \
        == "released"
    assert _writes(world, "acme")


def test_the_warning_share_is_reported_without_change(world: World) -> None:
    world.tenant("acme", plan="small")
    out = quota.judge(world.deps, [_measured(world, "acme", 9 * MB)], NOW)
    assert out[0].outcome == "warning" and out[0].used == pytest.approx(0.9)
    assert _writes(world, "acme") and world.admin.calls == []


def test_a_cancelled_tenant_is_never_opened_by_the_quota(world: World) -> None:
    world.tenant("acme", plan="small")
    quota.judge(world.deps, [_measured(world, "acme", 11 * MB)], NOW)
    lifecycle.cancel(world.deps, "acme", now=NOW, backup=False)
    assert world.catalog.row("acme").over_quota  # the flag outlives the hold
    # shrunk during the hold: still read-only, still flagged
    out = quota.judge(world.deps, [_measured(world, "acme", 1 * MB)], NOW)
    assert out[0].outcome == "skipped" and not _writes(world, "acme")
    assert world.catalog.row("acme").over_quota
    # reactivated: the quota still holds the writes until a run releases them
    lifecycle.reactivate(world.deps, "acme", now=NOW + timedelta(days=1))
    assert not _writes(world, "acme")
    assert quota.judge(world.deps, [_measured(world, "acme", 1 * MB)], NOW)[0].outcome \
        == "released"
    assert _writes(world, "acme")


def test_a_tenant_cancelled_within_its_quota_stays_read_only(world: World) -> None:
    world.tenant("acme", plan="small")
    lifecycle.cancel(world.deps, "acme", now=NOW, backup=False)
    assert quota.judge(world.deps, [_measured(world, "acme", 1 * MB)], NOW)[0].outcome \
        == "skipped"
    assert quota.judge(world.deps, [_measured(world, "acme", 11 * MB)], NOW)[0].outcome \
        == "skipped"
    assert not _writes(world, "acme") and not world.catalog.row("acme").over_quota


def test_a_suspended_tenant_is_left_alone(world: World) -> None:
    world.tenant("acme", plan="small", state="suspended")
    assert quota.judge(world.deps, [_measured(world, "acme", 11 * MB)], NOW)[0].outcome \
        == "skipped"
    assert world.admin.calls == [] and not world.catalog.row("acme").over_quota


def test_a_cancel_that_came_in_since_the_measure_wins(world: World) -> None:
    """The row is read again under the tenant's lock before anything is changed."""
    world.tenant("acme", plan="small")
    m = _measured(world, "acme", 11 * MB)
    lifecycle.cancel(world.deps, "acme", now=NOW, backup=False)
    assert quota.judge(world.deps, [m], NOW)[0].outcome == "skipped"
    assert not world.catalog.row("acme").over_quota


def test_one_tenants_failure_is_its_own(world: World) -> None:
    world.tenant("acme", plan="small")
    world.tenant("bravo", plan="small")
    world.catalog.held.add(tenant_lock("bravo"))  # another process changes it
    out = quota.judge(world.deps, [_measured(world, "acme", 11 * MB),
                                   _measured(world, "bravo", 11 * MB)], NOW)
    assert [(o.slug, o.outcome) for o in out] == [("acme", "enforced"),
                                                  ("bravo", "failed")]
    assert "another tenantctl process" in out[1].reason
    assert not world.catalog.row("bravo").over_quota and _writes(world, "bravo")


def test_a_server_failure_changes_nothing_in_the_catalog(world: World) -> None:
    world.tenant("acme", plan="small")
    world.admin.fail["restrict_to_reads"] = ServerOperationFailed("lock timeout")
    out = quota.judge(world.deps, [_measured(world, "acme", 11 * MB)], NOW)
    assert (out[0].outcome, out[0].reason) == ("failed", "lock timeout")
    assert not world.catalog.row("acme").over_quota
    assert world.catalog.events("tenant.quota.enforce") == []


def test_an_unknown_plan_is_skipped_not_enforced(world: World) -> None:
    world.tenant("acme", plan="gone")
    out = quota.judge(world.deps, [_measured(world, "acme", 11 * GB)], NOW)
    assert out[0].outcome == "skipped" and "not in the config" in out[0].reason
    assert world.admin.calls == []


def test_sync_writes_puts_the_role_back_as_the_catalog_says(world: World) -> None:
    world.tenant("acme", plan="small", over_quota=True)  # flagged, role still writing
    assert "revoked" in quota.sync_writes(world.deps, "acme")
    assert not _writes(world, "acme")
    world.catalog.row("acme").over_quota = False
    assert "given back" in quota.sync_writes(world.deps, "acme")
    assert _writes(world, "acme")
    world.catalog.row("acme").state = "cancelled"
    quota.sync_writes(world.deps, "acme")
    assert not _writes(world, "acme")


GB = 1 << 30


# -- doctor's drift rule -----------------------------------------------------------------


def _doctor(*, state: str = "active", over_quota: bool = False,
            temporary: frozenset[str] | None, step: str | None = None
            ) -> set[tuple[str, str]]:
    from orchestrator.domain.health import diagnose
    from tests.test_doctor_rules import cluster_with, facts, tenant

    t = tenant(1, "acme", state=state, over_quota=over_quota, step=step)
    c = cluster_with(t)
    c.databases["tenant_acme"] = dataclasses.replace(c.databases["tenant_acme"],
                                                     temporary=temporary)
    found = diagnose(facts([t], {"h:1": c}, {"s1": "h:1"}))
    return {(x.code, x.fix or "") for x in found if x.code.startswith("writes-")}


WRITES, NO_WRITES = frozenset({"tenant_acme", "owner_acme"}), frozenset({"owner_acme"})


def test_doctor_finds_the_writes_differing_from_the_flag() -> None:
    assert _doctor(temporary=WRITES) == set()
    assert _doctor(temporary=NO_WRITES) == {("writes-revoked", "sync_writes")}
    assert _doctor(over_quota=True, temporary=NO_WRITES) == set()
    assert _doctor(over_quota=True, temporary=WRITES) == {("writes-not-revoked",
                                                          "sync_writes")}
    assert _doctor(state="suspended", over_quota=True, temporary=WRITES) == {
        ("writes-not-revoked", "sync_writes")}
    assert _doctor(state="cancelled", temporary=NO_WRITES) == set()
    assert _doctor(state="cancelled", temporary=WRITES) == {("writes-not-revoked",
                                                             "sync_writes")}
    # not judged: a cancellation half-way (its own finding), or the grants not read
    assert _doctor(step=CANCELLING, temporary=NO_WRITES) == set()
    assert _doctor(temporary=None) == set()


# -- what show, the report and the metrics say ----------------------------------------


def test_storage_view() -> None:
    from orchestrator.domain.quota import storage_view

    assert storage_view(9 * MB, "t", 10 * MB, 0.8) == {
        "storage_bytes": 9 * MB, "storage_measured_at": "t", "storage_quota": 10 * MB,
        "storage_used_percent": 90.0, "quota_status": "warning"}
    assert storage_view(None, None, 10 * MB)["quota_status"] is None
    assert storage_view(5 * MB, "t", None)["storage_used_percent"] is None


def test_summary_and_server_counts() -> None:
    from orchestrator.domain.quota import Standing, server_counts, summarize

    rows = [Standing("big", "s1", "active", True, 12 * MB, 10 * MB),
            Standing("held", "s1", "cancelled", False, 11 * MB, 10 * MB),
            Standing("near", "s2", "active", False, 9 * MB, 10 * MB),
            Standing("fine", "s2", "active", False, 1 * MB, 10 * MB),
            Standing("free", "s2", "active", False, 90 * MB, None),
            # flagged, then moved to a plan without a quota: over until released
            Standing("gone", "s2", "active", True, 90 * MB, None)]
    s = summarize(rows, 0.8)
    assert s["with_quota"] == 4
    assert [r["slug"] for r in s["over"]] == ["big", "held", "gone"]
    assert [(r["slug"], r["used_percent"]) for r in s["warning"]] == [("near", 90.0)]
    assert server_counts(rows, 0.8) == {("s1", "over"): 2, ("s2", "warning"): 1,
                                        ("s2", "over"): 1}


def test_a_deleted_tenant_is_over_no_quota(world: World) -> None:
    from orchestrator.services import retention

    world.tenant("acme", plan="small")
    quota.judge(world.deps, [_measured(world, "acme", 11 * MB)], NOW)
    lifecycle.cancel(world.deps, "acme", now=NOW, backup=False)
    world.backup("acme", at=NOW + timedelta(hours=1))
    outcome, _ = retention.delete_tenant(world.deps, "acme", NOW + timedelta(days=31))
    assert outcome == "done"
    row = world.catalog.row("acme")
    assert (row.state, row.over_quota, row.over_quota_since) == ("deleted", False, None)
