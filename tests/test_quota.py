"""Storage quota enforcement on real clusters, through the CLI (issue 19): a tenant
past its plan's storage_quota becomes read-only at `usage collect` (INSERT refused,
SELECT works), audited, `over_quota` in show/list/JSON; deleting data + VACUUM FULL,
or `tenant set-plan` to a plan without a quota, gives the writes back; a cancelled
tenant over its quota stays read-only when it shrinks; the warning share in show,
the report and the metrics; doctor finds and fixes a drift; an unparsable quota is
refused with nothing changed."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.api import Fleet
from orchestrator.config import load_config
from orchestrator.domain.names import tenant_names
from tests.conftest import CleanFleet, OwnCatalog, PgFleet, connect_as, run_cli

MB = 1 << 20
QUOTA_LINE = re.compile(r'(\[plans\.small\]\nstorage_quota = )"[^"]*"')


def _config(own: OwnCatalog) -> Path:
    text = own.config_path.read_text()
    own.config_path.write_text(text + '\n[plans.small]\nstorage_quota = "900MB"\n'
                               "\n[plans.roomy]\n\n[usage]\nquota_warning = 0.8\n")
    return own.config_path


def _set_quota(config: Path, quota: str) -> None:
    text = config.read_text()
    assert QUOTA_LINE.search(text)
    config.write_text(QUOTA_LINE.sub(lambda m: f'{m.group(1)}"{quota}"', text))


def _cli(test_fleet: PgFleet, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(test_fleet, *args, config=config)


def _json(test_fleet: PgFleet, config: Path, *args: str, code: int | None = 0) -> Any:
    res = _cli(test_fleet, config, *args, "--json")
    assert code is None or res.returncode == code, res.stderr
    return json.loads(res.stdout)


def _collect(test_fleet: PgFleet, config: Path, slug: str) -> tuple[dict[str, Any], int]:
    """`usage collect`: the quota's outcome for the tenant, and its measured size."""
    out = _json(test_fleet, config, "usage", "collect")
    size = next(t["storage_bytes"] for t in out["tenants"] if t["slug"] == slug)
    found = [q for q in out["quota"] if q["slug"] == slug]
    assert len(found) == 1, out["quota"]
    return found[0], size


def _fill(dsn: str, mb: int) -> None:
    """About ``mb`` MB of rows the compression cannot shrink, written as the tenant."""
    tag = uuid.uuid4().hex[:6]
    with connect_as(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO warehouses (code, name, address) "
                     "SELECT %s || g, 'w', (SELECT string_agg(md5(random()::text || g || i), '')"
                     " FROM generate_series(1, 30) i) FROM generate_series(1, %s) g",
                     (tag, mb * 1000))


def _can_write(dsn: str) -> bool:
    with connect_as(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM warehouses").fetchone() is not None
        try:
            conn.execute("INSERT INTO warehouses (code, name) VALUES (%s, 'x')",
                         (uuid.uuid4().hex[:12],))
        except psycopg.errors.InsufficientPrivilege:
            return False
    return True


def _shrink(test_fleet: PgFleet, server: str, slug: str) -> None:
    """Delete the tenant's rows and give the space back (VACUUM FULL), as its owner."""
    names = tenant_names(slug)
    admin = test_fleet.admin_dsn(server)
    with psycopg.connect(admin, dbname=names.database, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(names.owner_role)))
        conn.execute("DELETE FROM warehouses")
        conn.execute("VACUUM FULL warehouses")


def _actions(test_fleet: PgFleet, config: Path, slug: str) -> list[str]:
    return [a["action"] for a in _json(test_fleet, config, "audit", "list", "--tenant", slug)]


def _over_a_small_quota(test_fleet: PgFleet, config: Path, slug: str
                        ) -> tuple[str, str, int]:
    """A tenant on plan small made past its quota (the quota set 2 MB over its empty
    size, then 5 MB written); (dsn, server, empty size)."""
    made = _json(test_fleet, config, "tenant", "create", slug, "--region", "eu-central",
                 "--plan", "small")
    dsn = made["dsn"]
    first, empty = _collect(test_fleet, config, slug)
    assert first["outcome"] == "ok", first
    _set_quota(config, f"{(empty + 2 * MB) // 1024}kB")
    _fill(dsn, 5)
    assert _can_write(dsn)
    return dsn, made["server"], empty


def test_past_its_quota_a_tenant_is_read_only_until_it_shrinks_or_its_plan_grows(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    config = _config(own_catalog)
    dsn, server, empty = _over_a_small_quota(test_fleet, config, slug)

    q, size = _collect(test_fleet, config, slug)
    assert (q["outcome"], q["size"]) == ("enforced", size) and size > empty + 2 * MB
    assert not _can_write(dsn)  # INSERT refused, SELECT works
    with connect_as(dsn, autocommit=True) as conn:  # an update and a temp table too
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE warehouses SET name = 'y'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TEMP TABLE scratch (x int)")
    shown = _json(test_fleet, config, "tenant", "show", slug)
    assert (shown["state"], shown["over_quota"], shown["quota_status"]) == \
        ("active", True, "over")
    assert shown["over_quota_since"] is not None and shown["storage_bytes"] == size
    assert shown["storage_used_percent"] > 100
    listed = _json(test_fleet, config, "tenant", "list")
    assert [t["over_quota"] for t in listed if t["slug"] == slug] == [True]
    assert "tenant.quota.enforce" in _actions(test_fleet, config, slug)
    table = _cli(test_fleet, config, "tenant", "show", slug).stdout
    assert re.search(r"over_quota\W+yes", table), table

    # the next run: still over, nothing more done (and said so in words)
    res = _cli(test_fleet, config, "usage", "collect")
    assert res.returncode == 0, res.stderr
    assert f"quota over: {slug}: still past its storage quota (" in res.stdout, res.stdout
    assert _actions(test_fleet, config, slug).count("tenant.quota.enforce") == 1

    # a plan without a quota gives the writes back at once; a quota again takes them
    out = _json(test_fleet, config, "tenant", "set-plan", slug, "roomy")
    assert out["quota"]["outcome"] == "released", out
    assert _can_write(dsn)
    out = _json(test_fleet, config, "tenant", "set-plan", slug, "small")
    assert out["quota"]["outcome"] == "enforced", out
    assert not _can_write(dsn)

    # deleted and vacuumed: the next collection gives the writes back, audited
    _shrink(test_fleet, server, slug)
    q, size = _collect(test_fleet, config, slug)
    assert q["outcome"] == "released" and size < empty + 2 * MB, q
    assert _can_write(dsn)
    shown = _json(test_fleet, config, "tenant", "show", slug)
    assert (shown["over_quota"], shown["over_quota_since"]) == (False, None)
    assert _actions(test_fleet, config, slug)[0] == "tenant.quota.release"  # newest first


def test_a_cancelled_tenant_over_its_quota_stays_read_only(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    config = _config(own_catalog)
    dsn, server, _ = _over_a_small_quota(test_fleet, config, slug)
    assert _collect(test_fleet, config, slug)[0]["outcome"] == "enforced"
    res = _cli(test_fleet, config, "tenant", "cancel", slug, "--yes")
    assert res.returncode == 0, res.stderr
    _shrink(test_fleet, server, slug)
    q, _ = _collect(test_fleet, config, slug)
    assert q["outcome"] == "skipped", q  # the hold's, not the quota's
    assert not _can_write(dsn)
    shown = _json(test_fleet, config, "tenant", "show", slug)
    assert (shown["state"], shown["over_quota"]) == ("cancelled", True)
    # set-plan to no quota does not open the hold either
    assert _json(test_fleet, config, "tenant", "set-plan", slug, "roomy")["quota"][
        "outcome"] == "skipped"
    assert not _can_write(dsn)
    # reactivated: the quota keeps the writes until a collection releases them
    assert _cli(test_fleet, config, "tenant", "reactivate", slug).returncode == 0
    assert not _can_write(dsn)
    assert _collect(test_fleet, config, slug)[0]["outcome"] == "released"
    assert _can_write(dsn)


def test_the_warning_share_shows_in_show_report_and_metrics(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    from orchestrator.adapters import clock
    from orchestrator.daemon.metrics import MetricsSnapshot, read_fleet_gauges, render_metrics

    config = _config(own_catalog)
    made = _json(test_fleet, config, "tenant", "create", slug, "--region", "eu-central",
                 "--plan", "small")
    _, empty = _collect(test_fleet, config, slug)
    _fill(made["dsn"], 3)
    _, size = _collect(test_fleet, config, slug)
    # a quota the tenant fills to about 90 %
    _set_quota(config, f"{int(size / 0.9) // 1024}kB")
    q, _ = _collect(test_fleet, config, slug)
    assert q["outcome"] == "warning" and 0.8 <= q["used"] < 1, q
    assert _can_write(made["dsn"])
    shown = _json(test_fleet, config, "tenant", "show", slug)
    assert (shown["over_quota"], shown["quota_status"]) == (False, "warning")
    assert 80 <= shown["storage_used_percent"] < 100
    report = _json(test_fleet, config, "report", code=None)
    assert [r["slug"] for r in report["storage"]["warning"]] == [slug]
    assert report["storage"]["over"] == []
    text = _cli(test_fleet, config, "report").stdout
    assert f"near: {slug}" in text, text
    fleet = Fleet(load_config(config))
    try:
        gauges = read_fleet_gauges(fleet, clock.utcnow())
    finally:
        fleet.close()
    page = render_metrics(MetricsSnapshot(True, True, gauges))
    assert f'tenantctl_quota_tenants{{server="{made["server"]}",status="warning"}} 1.0' \
        in page, page
    # a higher warning share: no longer warned
    config.write_text(config.read_text().replace("quota_warning = 0.8",
                                                 "quota_warning = 0.99"))
    assert _collect(test_fleet, config, slug)[0]["outcome"] == "ok"


def test_an_unparsable_quota_changes_nothing(test_fleet: PgFleet, own_catalog: OwnCatalog,
                                             slug: str) -> None:
    config = _config(own_catalog)
    _json(test_fleet, config, "tenant", "create", slug, "--region", "eu-central",
          "--plan", "small")
    before = _json(test_fleet, config, "usage", "show", slug)["tenants"]
    _set_quota(config, "lots")
    for args in (("usage", "collect"), ("tenant", "set-plan", slug, "roomy")):
        res = _cli(test_fleet, config, *args)
        assert res.returncode == 2, res
        err = res.stderr.strip()
        assert len(err.splitlines()) == 1 and "plans.small.storage_quota" in err, err
        assert "Traceback" not in err
    _set_quota(config, "900MB")
    assert _json(test_fleet, config, "usage", "show", slug)["tenants"] == before == []
    assert _json(test_fleet, config, "tenant", "show", slug)["plan"] == "small"


def _findings(test_fleet: PgFleet, config: Path, slug: str) -> list[str]:
    out = _json(test_fleet, config, "doctor", code=None)
    return [f["code"] for f in out["findings"] if f["subject"] == slug]


def test_doctor_finds_and_fixes_writes_that_differ_from_the_flag(
        test_fleet: PgFleet, healthy: Fleet, clean_fleet: CleanFleet, slug: str,
        tmp_path: Path) -> None:
    """On the clean fleet (doctor finds nothing else there): a collection killed
    between the role and the catalog leaves a role without writes and no flag; a
    role given its writes back by hand while flagged; each found, and --fix puts it
    as the catalog says."""
    config = tmp_path / "quota.toml"
    config.write_text(clean_fleet.config_path.read_text()
                      + '\n[plans.small]\nstorage_quota = "900MB"\n')
    made = _json(test_fleet, config, "tenant", "create", slug, "--region", "eu-central",
                 "--plan", "small")
    dsn, server = made["dsn"], made["server"]
    try:
        _, empty = _collect(test_fleet, config, slug)
        _set_quota(config, f"{(empty + 2 * MB) // 1024}kB")
        _fill(dsn, 5)
        res = run_cli(test_fleet, "usage", "collect", config=config,
                      env={"TENANTCTL_FAULT": "quota.restricted"})
        assert res.returncode < 0, res  # killed after the role, before the catalog
        assert not _can_write(dsn)
        assert _json(test_fleet, config, "tenant", "show", slug)["over_quota"] is False
        assert _findings(test_fleet, config, slug) == ["writes-revoked"]
        res = _cli(test_fleet, config, "doctor", "--fix")
        assert "writes given back" in res.stdout, res
        assert _can_write(dsn) and _findings(test_fleet, config, slug) == []
        # the next collection finishes what the killed one began
        assert _collect(test_fleet, config, slug)[0]["outcome"] == "enforced"
        assert not _can_write(dsn)
        # writes given back by hand while the catalog says over quota
        names = tenant_names(slug)
        with psycopg.connect(healthy.cfg.server(server).admin_dsn, dbname=names.database,
                             autocommit=True) as conn:
            pgserver.secure_tenant_database(conn, names)
        assert _can_write(dsn)
        assert _findings(test_fleet, config, slug) == ["writes-not-revoked"]
        res = _cli(test_fleet, config, "doctor", "--fix")
        assert "writes revoked (over its storage quota)" in res.stdout, res
        assert not _can_write(dsn) and _findings(test_fleet, config, slug) == []
    finally:
        # the clean fleet's own config has no small: back to the default plan, which
        # has no quota (the writes come back)
        out = _json(test_fleet, config, "tenant", "set-plan", slug, "default")
        assert out["quota"]["outcome"] in ("released", "ok"), out


def test_restore_as_keeps_the_source_tenants_plan(
        test_fleet: PgFleet, own_catalog: OwnCatalog, slug: str) -> None:
    config = _config(own_catalog)
    _json(test_fleet, config, "tenant", "create", slug, "--region", "eu-central",
          "--plan", "small")
    (backup,) = _json(test_fleet, config, "backup", "run", slug)
    copy = _json(test_fleet, config, "backup", "restore", str(backup["id"]), "--as",
                 f"{slug}_c")
    assert copy["plan"] == "small", copy
    assert _json(test_fleet, config, "tenant", "show", f"{slug}_c")["plan"] == "small"
    # through the Python API: set_plan on the facade
    fleet = Fleet(load_config(config))
    try:
        change = fleet.set_plan(f"{slug}_c", "roomy")
    finally:
        fleet.close()
    assert (change.plan.name, change.previous) == ("roomy", "small")
    assert _json(test_fleet, config, "tenant", "show", f"{slug}_c")["plan"] == "roomy"
