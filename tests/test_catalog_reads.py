"""The read commands' catalog reader (orchestrator/adapters/catalog/reads.py) says
exactly what the SQLAlchemy catalog says, rendered byte for byte the same."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from backups import service as pipeline
from orchestrator.adapters.catalog.models import Backup, Server, Tenant
from orchestrator.adapters.catalog.reads import BackupRow, CatalogReads, ServerRow, TenantRow
from orchestrator.api import Fleet
from orchestrator.domain.errors import CatalogIntegrityError, ConfigError, InvalidInput, NotFound
from orchestrator.domain.views import backup_json, tenant_json
from orchestrator.services import lifecycle
from orchestrator.services.migrate_status import fleet_status
from tests.conftest import PgFleet, run_cli


def _same(a: Any, b: Any) -> None:
    assert json.dumps(a, indent=2, default=str) == json.dumps(b, indent=2, default=str)


def test_rows_carry_the_models_columns() -> None:
    # a column added to a model and not to its read row would vanish from `--json`
    for row, model in ((TenantRow, Tenant), (BackupRow, Backup)):
        assert [f.name for f in dataclasses.fields(row)] == \
            [c.key for c in model.__table__.columns], row
    assert {f.name for f in dataclasses.fields(ServerRow)} - {"tenants"} <= \
        {c.key for c in Server.__table__.columns}


def test_reads_render_as_the_orm_rows(fleet: Fleet, slug: str) -> None:
    fleet.provision(slug, "eu-central")
    backed = pipeline.run_backup(fleet, slug)
    assert backed.status == "completed", backed.error
    held = slug + "_h"
    fleet.provision(held, "ap-south")
    lifecycle.cancel(fleet, held, backup=False)  # hold_until, cancelled_at set

    with CatalogReads(fleet.cfg) as reads:
        reads.require_current()
        for region, state in ((None, None), ("eu-central", None), (None, "cancelled"),
                              ("ap-south", "active")):
            _same([tenant_json(t) for t in reads.tenants(region, state)],
                  [tenant_json(t) for t in fleet.tenants(region, state)])
        for s in (slug, held):
            _same(tenant_json(reads.get_tenant(s)), tenant_json(fleet.get_tenant(s)))
        for region in (None, "ap-south"):
            _same([s.to_json() for s in reads.servers(region)],
                  [s.to_json() for s in fleet.servers(region)])
        tenant_id = fleet.get_tenant(slug).id
        with fleet.catalog.session() as s:
            every = [backup_json(b) for b in s.scalars(select(Backup).order_by(Backup.id.desc()))]
            own = [backup_json(b) for b in s.scalars(
                select(Backup).where(Backup.tenant_id == tenant_id).order_by(Backup.id.desc()))]
        _same([backup_json(b) for b in reads.backups()], every)
        _same([backup_json(b) for b in reads.backups(tenant_id)], own)
        assert own and own[0]["id"] == backed.id
        for region in (None, "eu-central"):
            assert reads.target_revision(fleet.head_revision, region) == \
                fleet.target_revision(region)
        # the targets `migrate status` judges each tenant by: the same answers
        fleet_target, region_targets = reads.targets(fleet.head_revision)
        for region in (None, *fleet.cfg.regions):
            assert fleet.target_revision(region) == (
                region_targets.get(region, fleet_target) if region else fleet_target)

        # the same refusals, in the same words, as the ORM path
        refusals: list[tuple[Callable[[], Any], Callable[[], Any], type[Exception]]] = [
            (lambda: reads.tenants("mars"), lambda: fleet.tenants("mars"), ConfigError),
            (lambda: reads.tenants(None, "bogus"), lambda: fleet.tenants(None, "bogus"),
             InvalidInput),
            (lambda: reads.servers("mars"), lambda: fleet.servers("mars"), ConfigError),
            (lambda: reads.get_tenant("o'brien"), lambda: fleet.get_tenant("o'brien"),
             InvalidInput),
            (lambda: reads.get_tenant("nosuchtenant"),
             lambda: fleet.get_tenant("nosuchtenant"), NotFound)]
        for new, old, err in refusals:
            with pytest.raises(err) as got:
                new()
            with pytest.raises(err) as want:
                old()
            assert str(got.value) == str(want.value)

        # migrate status over the reader (the CLI's) and over a Fleet: one report
        _same(fleet_status(reads).to_json(), fleet_status(fleet).to_json())


def test_show_refuses_an_inconsistent_row(fleet: Fleet, slug: str) -> None:
    from sqlalchemy import update

    fleet.provision(slug, "eu-central")
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.slug == slug).values(database="tenant_other"))
    try:
        with CatalogReads(fleet.cfg) as reads, pytest.raises(CatalogIntegrityError) as got:
            reads.get_tenant(slug)
        with pytest.raises(CatalogIntegrityError) as want:
            fleet.get_tenant(slug)
        assert str(got.value) == str(want.value)
    finally:
        with fleet.catalog.session() as s, s.begin():
            s.execute(update(Tenant).where(Tenant.slug == slug)
                      .values(database=f"tenant_{slug}"))


def test_read_commands_when_the_catalog_is_down(test_fleet: PgFleet, tmp_path: Any) -> None:
    # nothing listens there: one line, exit 6, as before (Catalog.current's wording)
    from tests.conftest import _closed_port

    text = test_fleet.config_path.read_text()
    dsn = next(line for line in text.splitlines() if line.startswith("dsn = "))
    down = tmp_path / "down.toml"
    down.write_text(text.replace(dsn, f'dsn = "host=127.0.0.1 port={_closed_port()} '
                                      'user=tenantctl_admin dbname=tenantctl_catalog"'))
    for args in (["tenant", "list"], ["tenant", "show", "acme"], ["region", "list"],
                 ["backup", "list"], ["migrate", "status", "--json"],
                 ["migrate", "history"], ["migrate", "rollouts"],
                 ["migrate", "rollouts", "show", "1"]):
        proc = run_cli(test_fleet, *args, config=down)
        assert proc.returncode == 6, (args, proc.stderr)
        assert proc.stderr.startswith("error: cannot reach the catalog at tenantctl_admin@"
                                      "127.0.0.1:"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
