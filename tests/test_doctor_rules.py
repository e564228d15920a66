"""doctor's judgement is a pure function of gathered facts: checked here without
a database, on the cases that are easy to get wrong."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from orchestrator.domain import marks as revision_marks
from orchestrator.domain.health import (
    ClusterFacts,
    Database,
    Facts,
    Role,
    StoreFacts,
    TenantRow,
    diagnose,
)
from orchestrator.domain.marks import role_marker

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


def tenant(i: int, slug: str, *, server: str = "s1", state: str = "active",
           database: str | None = None, **kw: object) -> TenantRow:
    base = dict(id=i, slug=slug, region="eu", server=server,
                database=database or f"tenant_{slug}", login_role=f"tenant_{slug}",
                owner_role=f"owner_{slug}", state=state, revision="r2",
                migration_error=None, legal_hold=False, legal_hold_reason=None,
                hold_until=None, purge_after=None, activated_at=NOW, created_at=NOW)
    base.update(kw)
    return TenantRow(**base)  # type: ignore[arg-type]


def cluster_with(*tenants: TenantRow, servers: list[str] | None = None) -> ClusterFacts:
    c = ClusterFacts(servers=servers or ["s1"])
    for t in tenants:
        slug = t.slug
        c.databases[f"tenant_{slug}"] = Database(f"owner_{slug}", True,
                                                 frozenset({f"tenant_{slug}"}),
                                                 revision_marks.mark(t.revision))
        for role in (f"tenant_{slug}", f"owner_{slug}"):
            c.roles[role] = Role(False, False, False, False, False,
                                 role_marker(t.id, slug), frozenset())
    return c


def facts(tenants: list[TenantRow], clusters: dict[str, ClusterFacts],
          server_cluster: dict[str, str]) -> Facts:
    return Facts(now=NOW, head="r2", use_template=True, backup_interval=timedelta(days=1),
                 tenants=tenants, backups=[],
                 servers={s: ("eu", 100, "r2") for s in server_cluster},
                 server_cluster=server_cluster, clusters=clusters,
                 stores={"eu": StoreFacts("eu", "file:///x", keys=set())}, grants={})


def codes(f: Facts) -> set[tuple[str, str]]:
    return {(x.code, x.subject) for x in diagnose(f)}


def test_two_servers_on_one_cluster_see_each_others_tenants_as_known() -> None:
    a, b = tenant(1, "alpha", server="s1"), tenant(2, "beta", server="s2")
    c = cluster_with(a, b, servers=["s1", "s2"])
    assert codes(facts([a, b], {"h:1": c}, {"s1": "h:1", "s2": "h:1"})) == set()


def test_tampered_row_is_reported_and_its_real_database_is_not_an_orphan() -> None:
    x, y = tenant(1, "xray"), tenant(2, "yank")
    c = cluster_with(x, y)
    bad = tenant(1, "xray", database="tenant_yank")
    found = codes(facts([bad, y], {"h:1": c}, {"s1": "h:1"}))
    assert ("catalog-row-inconsistent", "xray") in found
    assert not any(code.startswith("orphan") for code, _ in found)


def test_legal_hold_blocks_overdue_deletion_and_grace_is_honoured() -> None:
    held = tenant(1, "held", state="cancelled", hold_until=NOW - timedelta(days=3),
                  legal_hold=True, legal_hold_reason="court")
    fresh = tenant(2, "fresh", state="cancelled", hold_until=NOW - timedelta(minutes=10))
    late = tenant(3, "late", state="cancelled", hold_until=NOW - timedelta(hours=2))
    c = cluster_with(held, fresh, late)
    found = codes(facts([held, fresh, late], {"h:1": c}, {"s1": "h:1"}))
    assert ("deletion-overdue", "late") in found
    assert not {("deletion-overdue", "held"), ("deletion-overdue", "fresh")} & found


def test_support_role_may_reach_only_the_database_of_its_grant() -> None:
    a, b = tenant(1, "alpha"), tenant(2, "beta")
    c = cluster_with(a, b)
    c.roles["tenantctl_support_7"] = Role(False, False, False, False, False, None,
                                          frozenset())
    c.databases["tenant_alpha"] = replace(c.databases["tenant_alpha"], connect=frozenset(
        {"tenant_alpha", "tenantctl_support_7"}))
    f = facts([a, b], {"h:1": c}, {"s1": "h:1"})
    f.grants = {"tenantctl_support_7": ("tenant_alpha", NOW + timedelta(hours=1))}
    assert codes(f) == set()
    c.databases["tenant_beta"] = replace(c.databases["tenant_beta"], connect=frozenset(
        {"tenant_beta", "tenantctl_support_7"}))
    assert codes(f) == {("role-reaches-other-database", "s1/tenantctl_support_7")}
    f.grants = {}
    assert ("orphan-role", "s1/tenantctl_support_7") in codes(f)


def test_unreachable_cluster_hides_nothing_else_and_reports_itself() -> None:
    a = tenant(1, "alpha")
    c = ClusterFacts(servers=["s1"], reachable=False, error="connection refused")
    found = codes(facts([a], {"h:1": c}, {"s1": "h:1"}))
    assert found == {("server-unreachable", "s1")}


def test_a_revision_mark_that_differs_from_the_catalog_or_is_missing() -> None:
    same, moved, bare, busy = (tenant(1, "same"), tenant(2, "moved"), tenant(3, "bare"),
                               tenant(4, "busy", busy=True))
    c = cluster_with(same, moved, bare, busy)
    c.databases["tenant_moved"] = replace(c.databases["tenant_moved"],
                                          comment=revision_marks.mark("r1"))
    c.databases["tenant_bare"] = replace(c.databases["tenant_bare"], comment=None)
    c.databases["tenant_busy"] = replace(c.databases["tenant_busy"], comment=None)
    found = diagnose(facts([same, moved, bare, busy], {"h:1": c}, {"s1": "h:1"}))
    by_code = {(x.code, x.subject): x.severity for x in found}
    assert by_code == {("revision-mark-differs", "moved"): "warning",
                       ("revision-unmarked", "bare"): "info"}
