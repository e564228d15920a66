"""The report's pure parts, without a database: the words (plurals, times with
``now`` passed in), the summary line, and the remedy beside each broken promise,
which is the one doctor gives for the same finding (domain/remedies.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from orchestrator.domain import promises
from orchestrator.domain.health import diagnose
from orchestrator.domain.humanize import age, human_time, plural, utc_minute
from orchestrator.domain.remedies import REMEDIES, remedy
from tests.test_doctor_rules import NOW, cluster_with, facts, tenant


def test_plural() -> None:
    assert [plural(n, "tenant") for n in (0, 1, 2)] == ["0 tenants", "1 tenant", "2 tenants"]
    assert plural(1, "tenant's state", "tenants' states") == "1 tenant's state"
    assert plural(3, "tenant's state", "tenants' states") == "3 tenants' states"


@pytest.mark.parametrize(("seconds", "want"), [
    (0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h"),
    (48 * 3600 - 1, "47h"), (48 * 3600, "2d"), (400 * 86400, "400d"), (-90, "1m")])
def test_age_is_the_largest_whole_unit(seconds: int, want: str) -> None:
    assert age(timedelta(seconds=seconds)) == want


def test_human_time_is_a_utc_minute_and_its_age_from_now() -> None:
    now = datetime(2026, 12, 7, 1, 30, 45, 123456, tzinfo=UTC)
    assert human_time(datetime(2026, 12, 6, 22, 30, 1, 999999, tzinfo=UTC), now) == \
        "2026-12-06 22:30 UTC (3h ago)"
    assert human_time(now + timedelta(days=2, hours=1), now) == "2026-12-09 02:30 UTC (in 2d)"
    assert human_time(now, now) == "2026-12-07 01:30 UTC (now)"
    # another zone is shown in UTC; a naive time is taken as UTC
    cest = datetime(2026, 12, 7, 3, 0, tzinfo=timezone(timedelta(hours=2)))
    assert human_time(cest, now) == "2026-12-07 01:00 UTC (30m ago)"
    assert human_time(datetime(2026, 12, 7, 1, 29), now) == "2026-12-07 01:29 UTC (1m ago)"
    assert utc_minute(datetime.fromisoformat("2026-12-07T01:30:00+00:00")) == \
        "2026-12-07 01:30 UTC"


def _promise(key: str, failures: int) -> promises.Promise:
    return promises.Promise(key, key.title(), [], [
        promises.Failure(f"t{i}", "wrong", "backup-overdue", "fix it")
        for i in range(failures)])


def test_summary_counts_the_promises_kept_and_names_the_broken_ones() -> None:
    assert promises.summary([_promise(k, 0) for k in ("a", "b", "c")]) == \
        "3/3 promises kept"
    assert promises.summary([_promise("isolation", 0), _promise("backups", 2),
                             _promise("audit", 1)]) == \
        "1/3 promises kept; broken: backups (2 offenders), audit (1 offender)"


@pytest.mark.parametrize("code", sorted(REMEDIES))
def test_every_remedy_fills_in(code: str) -> None:
    text = remedy(code, slug="acme", database="tenant_acme", role="tenant_acme",
                  powers=["CREATEDB"], kind="delete", live=True)
    assert text and "{" not in text and "}" not in text


def test_each_broken_promise_carries_doctors_remedy_for_the_same_finding() -> None:
    """The same fleet judged by doctor and by the report: where both find a tenant
    wrong, for the same finding code, they print the same remedy."""
    pub, strong = tenant(1, "pub"), tenant(2, "strong")
    stale = tenant(3, "stale", activated_at=NOW - timedelta(days=3))
    late = tenant(4, "late", state="cancelled", hold_until=NOW - timedelta(hours=2))
    gone = tenant(5, "gone", state="deleted", purge_after=NOW - timedelta(hours=3))
    everyone = [pub, strong, stale, late, gone]
    c = cluster_with(pub, strong, stale, late)
    c.databases["tenant_pub"] = replace(c.databases["tenant_pub"],
                                        connect=frozenset({"tenant_pub", "PUBLIC"}))
    c.roles["tenant_strong"] = replace(c.roles["tenant_strong"], createdb=True)
    doctor = {x.code: x.remedy for x in diagnose(facts(everyone, {"h:1": c}, {"s1": "h:1"}))}

    seen = promises.ServerIsolation(
        "s1", databases={name: "PUBLIC" in db.connect for name, db in c.databases.items()},
        roles={name: (r.superuser, r.createdb, r.createrole, r.bypassrls)
               for name, r in c.roles.items()}, reaches=[])
    checked = [promises.check_isolation(everyone, [seen]),
               promises.check_backups(everyone, [], {"eu": set()}, NOW, 24),
               promises.check_timeliness(everyone, [], NOW)]
    report = {(f.code, f.subject): f.remedy for p in checked for f in p.failures}
    assert set(report) == {("public-connect", "pub"), ("role-powers", "strong"),
                           ("backup-overdue", "stale"), ("deletion-overdue", "late"),
                           ("purge-overdue", "gone")}
    for (code, _subject), text in report.items():
        assert text == doctor[code], code
    assert report[("role-powers", "strong")] == "ALTER ROLE tenant_strong NOCREATEDB"
    assert report[("deletion-overdue", "late")].startswith(
        "tenantctl retention run --only delete ")


def test_findings_only_the_report_makes_have_their_remedy_too() -> None:
    a = tenant(1, "alpha", revision="r1")
    probe = promises.ServerIsolation(
        "s1", databases={"tenant_alpha": False, "tenant_other": False},
        roles={"tenant_alpha": (False,) * 4}, reaches=[],
        probe=promises.Probe("alpha", 0, "live probe: its role connected to tenant_other",
                             "role-reaches-other-database", "tenant_other"))
    (f,) = promises.check_isolation([a], [probe]).failures
    assert f.remedy == "REVOKE CONNECT ON DATABASE tenant_other FROM tenant_alpha " \
                       "(tenantctl doctor --fix)"
    p = promises.check_audit([a], set(), NOW - timedelta(days=400), 9, 365, NOW)
    assert [(f.subject, f.code) for f in p.failures] == [
        ("alpha", "audit-record-missing"), ("audit log", "audit-kept-too-long")]
    assert p.failures[0].remedy.startswith("tenantctl audit list --tenant alpha ")
    assert p.failures[1].remedy.startswith("tenantctl retention run --only audit ")
    assert p.evidence[:2] == ["9 audit records", "oldest: 2025-10-19 12:00 UTC (400d ago)"]
    assert p.title.endswith("nothing older than 365 days")


def test_timeliness_says_when_in_human_time() -> None:
    late = tenant(1, "late", state="cancelled", hold_until=NOW - timedelta(hours=2))
    grants = [promises.GrantRow(7, "late", NOW - timedelta(days=3), None)]
    p = promises.check_timeliness([late], grants, NOW)
    assert p.offenders == ["late: support grant 7 past its TTL (2026-11-20 12:00 UTC (3d ago))"]
    p = promises.check_timeliness([late], [], NOW)
    assert p.offenders == ["late: hold ended 2026-11-23 10:00 UTC (2h ago), not deleted"]
    assert p.to_json()["failures"] == [{
        "subject": "late", "problem": "hold ended 2026-11-23 10:00 UTC (2h ago), not deleted",
        "code": "deletion-overdue",
        "remedy": "tenantctl retention run --only delete (tenantctl doctor --fix, after "
                  "asking)"}]
