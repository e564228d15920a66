"""Support grants over in-memory fakes of the ports (no Postgres): what a grant
creates and records, which tenants may be granted what, how revoke, expiry and
tampering end a grant, and how one failure is reported without stopping the rest.
That the role really sees one tenant's data only, read-only, is test_access.py's."""

from __future__ import annotations

from datetime import timedelta

import pytest

from orchestrator.domain.errors import Conflict, InvalidInput, NotFound, TenantctlError
from orchestrator.ports import ServerOperationFailed
from orchestrator.services import access
from tests.fakes import T0, World

NOW = T0


@pytest.fixture
def world() -> World:
    w = World()
    w.clock.at = NOW
    return w


def test_a_grant_records_the_row_makes_the_role_and_audits(world: World) -> None:
    world.tenant("acme")
    g = access.grant(world.deps, "acme", to=" sam@support ", ttl=timedelta(hours=2),
                     reason="ticket 123")
    gid = g["id"]
    assert g["role"] == f"tenantctl_support_{gid}" and g["to"] == "sam@support"
    assert (g["status"], g["read_only"], g["expires_at"]) == \
        ("active", True, (NOW + timedelta(hours=2)).isoformat())
    assert f"://tenantctl_support_{gid}:" in g["dsn"] and "/tenant_acme" in g["dsn"]
    role = world.admin.servers["eu-central-1"].roles[g["role"]]
    assert role.login and role.valid_until == NOW + timedelta(hours=2)
    assert role.comment == f"tenantctl support grant {gid} for tenant acme"
    assert role.settings == {"default_transaction_read_only": "on"}
    assert role.may_write == {"tenant_acme": False}
    assert role.connection_limit == world.cfg.bounds.support_connection_limit
    row = world.catalog.t.grants[gid]
    assert (row.role_name, row.reason, row.dropped_at) == (g["role"], "ticket 123", None)
    [event] = world.catalog.events("access.grant")
    assert event.detail == {"grant": gid, "to": "sam@support", "reason": "ticket 123",
                            "read_only": True,
                            "expires_at": (NOW + timedelta(hours=2)).isoformat()}
    password = g["dsn"].split(":")[2].split("@")[0]
    assert password not in repr(world.catalog.t)  # shown once, never stored


def test_a_read_write_grant_may_write_and_has_no_read_only_setting(world: World) -> None:
    world.tenant("acme")
    g = access.grant(world.deps, "acme", to="dev", ttl=timedelta(minutes=5), reason="fix",
                     read_only=False)
    role = world.admin.servers["eu-central-1"].roles[g["role"]]
    assert role.settings == {} and role.may_write == {"tenant_acme": True}


@pytest.mark.parametrize("state, read_only, message", [
    ("provisioning", True, "it has no database to grant"),
    ("deleted", True, "it has no database to grant"),
    ("purged", True, "it has no database to grant"),
    ("suspended", False, "write access needs an active tenant"),
    ("cancelled", False, "write access needs an active tenant"),
])
def test_grants_a_tenant_cannot_have_are_refused(world: World, state: str, read_only: bool,
                                                 message: str) -> None:
    world.tenant("acme", state=state)
    roles = set(world.admin.servers["eu-central-1"].roles)
    with pytest.raises(Conflict, match=message):
        access.grant(world.deps, "acme", to="sam", ttl=timedelta(hours=1), reason="r",
                     read_only=read_only)
    assert world.catalog.t.grants == {}
    assert set(world.admin.servers["eu-central-1"].roles) == roles


@pytest.mark.parametrize("state", ["active", "suspended", "cancelled"])
def test_read_only_grants_go_to_every_tenant_with_a_database(world: World, state: str) -> None:
    world.tenant("acme", state=state)
    assert access.grant(world.deps, "acme", to="sam", ttl=timedelta(hours=1),
                        reason="r")["status"] == "active"


@pytest.mark.parametrize("to, reason, message", [
    ("", "r", "--to must name the person"), ("x" * 201, "r", "--to must name the person"),
    ("sam\x1b[2J", "r", "--to must name the person"), ("sam", " ", "--reason is required"),
])
def test_who_and_why_are_required(world: World, to: str, reason: str, message: str) -> None:
    world.tenant("acme")
    with pytest.raises(InvalidInput, match=message):
        access.grant(world.deps, "acme", to=to, ttl=timedelta(hours=1), reason=reason)
    assert world.catalog.t.grants == {} and world.admin.calls == []


def test_revoke_ends_sessions_drops_the_role_and_records_it(world: World) -> None:
    world.tenant("acme")
    g = world.grant("acme")
    world.clock.at = NOW + timedelta(minutes=10)
    assert access.revoke(world.deps, g.id) == [g.id]
    sv = world.admin.servers["eu-central-1"]
    assert g.role_name not in sv.roles
    assert all(role != g.role_name for role, _ in sv.sessions)
    # sessions end before the role goes, whatever fails after
    asked = [c[0] for c in world.admin.calls]
    assert asked.index("lock_out_role") < asked.index("drop_role_everywhere")
    row = world.catalog.t.grants[g.id]
    assert row.dropped_at == row.revoked_at == NOW + timedelta(minutes=10)
    assert [e.detail for e in world.catalog.events("access.revoke")] == \
        [{"grant": g.id, "to": "sam"}]
    with pytest.raises(Conflict, match="has already ended"):
        access.revoke(world.deps, g.id)
    with pytest.raises(NotFound, match="no support grant 999"):
        access.revoke(world.deps, 999)


def test_revoke_all_goes_past_a_grant_that_fails(world: World) -> None:
    world.tenant("acme")
    grants = [world.grant("acme", grantee=who) for who in ("a", "b", "c")]
    # someone put another comment on b's role: not ours to drop
    world.admin.servers["eu-central-1"].roles[grants[1].role_name].comment = "a stranger"
    res = access.revoke_all(world.deps)
    assert res.revoked == [grants[0].id, grants[2].id]
    assert list(res.failed) == [grants[1].id] and "left alone" in res.failed[grants[1].id]
    assert grants[1].role_name in world.admin.servers["eu-central-1"].roles
    with pytest.raises(TenantctlError, match=r"1 support grant\(s\) not revoked"):
        access.revoke(world.deps)


def test_a_server_failure_while_dropping_names_the_grant(world: World) -> None:
    world.tenant("acme")
    g = world.grant("acme")
    world.admin.fail["drop_role_everywhere"] = ServerOperationFailed("permission denied")
    with pytest.raises(TenantctlError) as failed:
        access.revoke(world.deps, g.id)
    assert str(failed.value) == (f"support grant {g.id}: dropping {g.role_name} on "
                                 "eu-central-1 failed: permission denied")
    assert world.catalog.t.grants[g.id].dropped_at is None  # tried again next time


def test_expired_grants_are_found_and_ended_at_the_time_given(world: World) -> None:
    world.tenant("acme")
    old = world.grant("acme", expires_at=NOW - timedelta(minutes=1))
    new = world.grant("acme", expires_at=NOW + timedelta(hours=1))
    assert [g.id for g in access.expired(world.deps, NOW)] == [old.id]
    assert access.expire(world.deps, old.id) == f"role {old.role_name} of sam dropped"
    row = world.catalog.t.grants[old.id]
    assert row.dropped_at == NOW and row.revoked_at is None
    assert world.catalog.events("access.expire")[0].detail["grant"] == old.id
    assert access.expire(world.deps, old.id) == "already ended"
    assert [g["status"] for g in access.grants(world.deps, include_ended=True)] == \
        ["dropped", "active"]
    assert [g["id"] for g in access.grants(world.deps)] == [new.id]
    world.clock.at = NOW + timedelta(hours=2)
    assert [g["status"] for g in access.grants(world.deps)] == ["expired"]


def test_a_role_that_changed_its_settings_is_tampered_and_ends(world: World) -> None:
    world.tenant("acme")
    world.tenant("beta", region="ap-south")
    honest, bent = world.grant("acme"), world.grant("acme", grantee="eve")
    elsewhere = world.grant("beta")
    roles = world.admin.servers["eu-central-1"].roles
    roles[bent.role_name].settings = {"default_transaction_read_only": "off"}
    world.admin.fail["role_settings"] = ServerOperationFailed("no")  # every server fails
    assert access.tampered(world.deps) == {}  # unreadable servers are skipped
    del world.admin.fail["role_settings"]
    assert access.tampered(world.deps) == {bent.id: "set default_transaction_read_only=off; "
                                                    "removed default_transaction_read_only=on"}
    assert access.expire(world.deps, bent.id, tampered="x") == \
        f"role {bent.role_name} of eve dropped (tampered with: x)"
    assert world.catalog.t.grants[bent.id].revoked_at == NOW
    assert world.catalog.events("access.tampered")[0].detail["grant"] == bent.id
    assert {honest.id, elsewhere.id} == {g.id for g in access.live(world.deps)}


def test_settings_changed_compares_with_what_the_grant_gave() -> None:
    assert access.settings_changed(None, True) is None
    assert access.settings_changed(["default_transaction_read_only=on"], True) is None
    assert access.settings_changed([], False) is None
    assert access.settings_changed([], True) == "removed default_transaction_read_only=on"
    assert access.settings_changed(["work_mem=1GB"], False) == "set work_mem=1GB"


def test_a_deleted_tenants_grants_go_with_it(world: World) -> None:
    world.tenant("acme")
    world.tenant("beta")
    mine, other = world.grant("acme"), world.grant("beta")
    tid = world.catalog.row("acme").id
    access.drop_tenant_grants(world.deps, tid)
    grants = world.catalog.t.grants
    assert grants[mine.id].dropped_at == NOW and grants[other.id].dropped_at is None
    assert mine.role_name not in world.admin.servers["eu-central-1"].roles
