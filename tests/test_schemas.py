"""The catalog's and the sample tenant schema's models agree with their Alembic
revisions, and every tenant revision can be undone."""

from __future__ import annotations

import uuid

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from psycopg import sql
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.catalog.models import Base
from orchestrator.adapters.postgres import alembic_runner as tenant_migrations
from orchestrator.api import Fleet
from tenant_schema.models import metadata as tenant_metadata
from tests.conftest import PgFleet


def test_catalog_models_match_migrations(fleet: Fleet) -> None:
    assert fleet.catalog.current() == fleet.catalog.head()
    with fleet.catalog.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_catalog_upgrade_is_idempotent(fleet: Fleet) -> None:
    head = fleet.catalog.head()
    assert fleet.catalog.upgrade() == (head, head)
    assert fleet.catalog.sync_topology() == []


def test_tenant_revisions_up_down_up_and_match_models(test_fleet: PgFleet) -> None:
    admin = test_fleet.admin_dsn("ap-south-1")
    db = f"scratch_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    location = test_fleet.config().tenant_migrations
    role = "tenantctl_admin"
    try:
        with tenant_migrations.tenant_connection(with_dbname(admin, db)) as conn:
            assert tenant_migrations.migrate(conn, location, "head", as_role=role) == \
                tenant_migrations.head_revision(location)
            with conn.begin():
                diff = compare_metadata(MigrationContext.configure(conn), tenant_metadata)
            assert diff == []
            assert tenant_migrations.migrate(conn, location, "base", as_role=role) is None
            with conn.begin():
                assert inspect(conn).get_table_names() == ["alembic_version"]
            first = tenant_migrations.script_directory(location).get_base()
            assert tenant_migrations.migrate(conn, location, first, as_role=role) == first
            assert tenant_migrations.migrate(conn, location, "head", as_role=role) == \
                tenant_migrations.head_revision(location)
        engine = create_engine("postgresql+psycopg://", poolclass=NullPool,
                               creator=lambda: psycopg.connect(with_dbname(admin, db)))
        with engine.connect() as conn:
            assert len(inspect(conn).get_table_names()) >= 11  # 10 tables + alembic_version
        engine.dispose()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


def test_advisory_locks_are_released(fleet: Fleet) -> None:
    """Every variant gives its lock back at the end of the block (a waiting lock
    returns void, which once read as 'not acquired' and leaked the lock)."""
    from orchestrator.api import Fleet as FleetCls

    other = FleetCls(fleet.cfg)
    try:
        for shared in (False, True):
            for wait in (False, True):
                with fleet.catalog.advisory_lock("test:lock", shared=shared, wait=wait) as got:
                    assert got
                    with other.catalog.advisory_lock("test:lock") as rival:
                        assert not rival  # held: an exclusive try fails
                with other.catalog.advisory_lock("test:lock") as after:
                    assert after, (shared, wait)
    finally:
        other.close()
