"""The catalog read by the read commands, over one psycopg connection.

`tenant list/show`, `backup list`, `region list` and `migrate status` only read
the catalog: importing SQLAlchemy's ORM (and the models) cost each of them
~0.3 s before its first query, more than the rest of the command. This reader
answers the same questions with plain SQL into small frozen rows that carry the
same fields as the ORM rows (`orchestrator.domain.views` renders either), and
connects the way ``Catalog`` does (DSN untouched, same timeout, application
name and one-line errors). Nothing here imports SQLAlchemy or Alembic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from orchestrator.adapters import clock
from orchestrator.adapters.postgres.libpq import redact, server_error
from orchestrator.config import Config
from orchestrator.domain.errors import Conflict, InvalidInput, NotFound
from orchestrator.domain.names import check_integrity, validate_slug
from orchestrator.domain.states import HAS_DATABASE, PLACED_STATES, TenantState

# The head revision of migrations/catalog, which every command checks the catalog
# against: a constant, so that the check needs no Alembic (importing it and reading
# the revision files cost a command ~0.5 s before its first query). Alembic is
# imported only to migrate. tests/test_units.py checks this is the scripts' head.
CATALOG_HEAD = "c0009_quota"
TARGET_KEY = "target_revision"  # fleet_settings key of the fleet's target revision


@dataclass(frozen=True)
class TenantRow:
    """A row of ``tenants``: the columns of ``models.Tenant``, by the same names."""

    id: int
    slug: str
    region: str
    server: str
    database: str
    login_role: str
    owner_role: str
    state: str
    step: str | None
    revision: str | None
    last_error: str | None
    created_at: datetime
    activated_at: datetime | None
    cancelled_at: datetime | None
    hold_until: datetime | None
    deleted_at: datetime | None
    purge_after: datetime | None
    purged_at: datetime | None
    restored_from: int | None
    migration_error: str | None
    migrated_at: datetime | None
    legal_hold: bool
    legal_hold_reason: str | None
    suspended_at: datetime | None
    final_backup_id: int | None
    updated_at: datetime
    plan: str
    over_quota: bool
    over_quota_since: datetime | None


@dataclass(frozen=True)
class BackupRow:
    """A row of ``backups``: the columns of ``models.Backup``, by the same names."""

    id: int
    tenant_id: int
    slug: str
    region: str
    store_url: str
    object_key: str
    manifest_key: str
    kind: str
    status: str
    size: int | None
    sha256: str | None
    key_id: str | None
    server_version: str | None
    pg_dump_version: str | None
    revision: str | None
    started_at: datetime
    finished_at: datetime | None
    verified_at: datetime | None
    error: str | None


@dataclass(frozen=True)
class ServerRow:
    """A server as `region list` shows it: ``tenants`` counts those placed on it."""

    name: str
    region: str
    tenants: int
    capacity: int
    available: bool
    template_revision: str | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RolloutRow:
    """A row of ``rollouts`` with its tenants counted by status and the revisions
    they came from (None: base)."""

    id: int
    target: str | None
    status: str
    actor: str
    options: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None
    counts: dict[str, int]
    from_revisions: list[str | None]


@dataclass(frozen=True)
class RolloutTenantRow:
    """A row of ``rollout_tenants``: one tenant's place and outcome in a rollout."""

    slug: str
    server: str
    wave: int
    seq: int
    status: str
    from_revision: str | None
    to_revision: str | None
    attempts: int
    worker: str | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    error: str | None


# each rollout with its tenants counted by status and their source revisions
ROLLOUTS_SQL = """
    SELECT r.id, r.target, r.status, r.actor, r.options, r.created_at, r.finished_at,
           coalesce(c.counts, '{}'::jsonb) AS counts,
           coalesce(f.sources, '{}') AS from_revisions
    FROM rollouts r
    LEFT JOIN LATERAL (
        SELECT jsonb_object_agg(status, n) AS counts
        FROM (SELECT status, count(*) AS n FROM rollout_tenants
              WHERE rollout_id = r.id GROUP BY status) s) c ON true
    LEFT JOIN LATERAL (
        SELECT array_agg(DISTINCT from_revision ORDER BY from_revision NULLS FIRST)
               AS sources
        FROM rollout_tenants WHERE rollout_id = r.id) f ON true
    WHERE (%s::bigint IS NULL OR r.id = %s)
    ORDER BY r.id DESC
    LIMIT %s"""


Row = TypeVar("Row")


def _columns(row: type[Any]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(f.name) for f in dataclasses.fields(row))


class CatalogReads:
    """The catalog's rows for the read commands; one connection, opened on first use.
    Its one write is `migrate status` refreshing the revisions it read."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dsn = cfg.catalog_dsn
        self._conn: psycopg.Connection | None = None

    def __enter__(self) -> CatalogReads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None:
            try:
                # as Catalog.engine connects: the DSN as given (passfile, sslmode, ...)
                self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                                             application_name="tenantctl")
            except psycopg.OperationalError as exc:
                raise server_error(f"the catalog at {redact(self.dsn)}", exc) from None
        return self._conn

    def _rows(self, row: type[Row], query: sql.SQL | sql.Composed, params: Sequence[Any] = ()
              ) -> list[Row]:
        with self._connection().cursor(row_factory=class_row(row)) as cur:
            return cur.execute(query, params).fetchall()

    def _tenants(self, where: LiteralString, params: Sequence[Any], order: LiteralString
                 ) -> list[TenantRow]:
        return self._rows(TenantRow, sql.SQL("SELECT {} FROM tenants WHERE " + where
                                             + " ORDER BY " + order)
                          .format(_columns(TenantRow)), params)

    # -- the schema --------------------------------------------------------------

    def current(self) -> str | None:
        """The catalog's Alembic revision (None: not created yet), as Catalog.current."""
        try:
            conn = self._connection()
            exists = conn.execute("SELECT to_regclass('public.alembic_version')").fetchone()
            if exists is None or exists[0] is None:
                return None
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except psycopg.OperationalError as exc:
            raise server_error(f"the catalog at {redact(self.dsn)}", exc) from None
        return None if row is None else str(row[0])

    def require_current(self) -> None:
        cur = self.current()
        if cur != CATALOG_HEAD:
            raise Conflict(f"the catalog is at revision {cur or 'none'}, not {CATALOG_HEAD}: "
                           "run `tenantctl catalog upgrade`")

    # -- tenants -----------------------------------------------------------------

    def tenants(self, region: str | None = None, state: str | None = None
                ) -> list[TenantRow]:
        """As Fleet.tenants: by region, then slug; an unknown region or state refused."""
        if region is not None:
            self.cfg.region(region)
        if state is not None and state not in TenantState.__members__:
            raise InvalidInput(f"unknown state {state!r} (one of: "
                               f"{', '.join(TenantState.__members__)})")
        return self._tenants("(%s::text IS NULL OR region = %s) AND "
                             "(%s::text IS NULL OR state = %s)",
                             (region, region, state, state), "region, slug")

    def find_tenant(self, slug: str) -> TenantRow | None:
        rows = self._tenants("slug = %s", (slug,), "slug")
        return rows[0] if rows else None

    def get_tenant(self, slug: str) -> TenantRow:
        """As Fleet.get_tenant: the slug checked, the row found and consistent."""
        validate_slug(slug)
        tenant = self.find_tenant(slug)
        if tenant is None:
            raise NotFound(f"no tenant {slug!r}")
        check_integrity(tenant)
        return tenant

    def latest_size(self, tenant_id: int) -> tuple[int | None, datetime] | None:
        """The tenant's last measured size and when (`usage collect`); None: never."""
        row = self._connection().execute(
            "SELECT storage_bytes, collected_at FROM usage_samples WHERE tenant_id = %s "
            "ORDER BY period_start DESC LIMIT 1", (tenant_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def migratable(self, region: str | None = None) -> list[TenantRow]:
        """The tenants `migrate status` reads (a database to migrate), by slug."""
        return self._tenants("state = ANY(%s) AND (%s::text IS NULL OR region = %s)",
                             ([str(s) for s in HAS_DATABASE], region, region), "slug")

    def record_revisions(self, changed: Sequence[tuple[int, str | None]]) -> None:
        """Set the catalog's last known revision of tenants (id, revision), in one
        transaction (``updated_at`` moves, as with every ORM update of a tenant)."""
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            at = clock.utcnow()
            cur.executemany("UPDATE tenants SET revision = %s, updated_at = %s "
                            "WHERE id = %s", [(rev, at, tid) for tid, rev in changed])

    # -- servers, backups, settings ------------------------------------------------

    def servers(self, region: str | None = None) -> list[ServerRow]:
        """As Fleet.servers: every server by region and name, with its placed tenants."""
        if region is not None:
            self.cfg.region(region)
        return self._rows(ServerRow, sql.SQL(
            "SELECT s.name, s.region, coalesce(c.n, 0)::int AS tenants, s.capacity, "
            "s.available, s.template_revision FROM servers s LEFT JOIN "
            "(SELECT server, count(*) AS n FROM tenants WHERE state = ANY(%s) "
            "GROUP BY server) c ON c.server = s.name "
            "WHERE (%s::text IS NULL OR s.region = %s) ORDER BY s.region, s.name"),
            ([str(s) for s in PLACED_STATES], region, region))

    def backups(self, tenant_id: int | None = None) -> list[BackupRow]:
        """Backups in the catalog (of one tenant, by id), newest first."""
        return self._rows(BackupRow, sql.SQL(
            "SELECT {} FROM backups WHERE (%s::bigint IS NULL OR tenant_id = %s) "
            "ORDER BY id DESC").format(_columns(BackupRow)), (tenant_id, tenant_id))

    def targets(self, head: str | None) -> tuple[str | None, dict[str, str | None]]:
        """The fleet's target revision (``head`` until a rollout sets one) and each
        region's override of it, by region; "base" is None. One query."""
        rows: list[tuple[str, str]] = self._connection().execute(
            "SELECT key, value FROM fleet_settings WHERE key = %s OR key LIKE %s",
            (TARGET_KEY, TARGET_KEY + ":%")).fetchall()
        fleet, regions = head, {}
        for key, value in rows:
            if not value:
                continue
            revision = None if value == "base" else value
            if key == TARGET_KEY:
                fleet = revision
            else:
                regions[key.removeprefix(TARGET_KEY + ":")] = revision
        return fleet, regions

    def rollouts(self, limit: int) -> list[RolloutRow]:
        """The last ``limit`` rollouts, newest first."""
        return self._rows(RolloutRow, sql.SQL(ROLLOUTS_SQL), (None, None, limit))

    def rollout(self, rollout_id: int) -> RolloutRow | None:
        rows = self._rows(RolloutRow, sql.SQL(ROLLOUTS_SQL), (rollout_id, rollout_id, 1))
        return rows[0] if rows else None

    def rollout_tenants(self, rollout_id: int) -> list[RolloutTenantRow]:
        """A rollout's tenants, in the order it planned them (canary first)."""
        return self._rows(RolloutTenantRow, sql.SQL(
            "SELECT {} FROM rollout_tenants WHERE rollout_id = %s ORDER BY wave, seq")
            .format(_columns(RolloutTenantRow)), (rollout_id,))

    def target_revision(self, head: str | None, region: str | None = None) -> str | None:
        """As Fleet.target_revision: the region's override, else the fleet's target,
        else ``head`` (the tenant migrations' head); "base" is None."""
        keys = [TARGET_KEY] + ([f"{TARGET_KEY}:{region}"] if region else [])
        rows: dict[str, str] = dict(self._connection().execute(
            "SELECT key, value FROM fleet_settings WHERE key = ANY(%s)", (keys,)).fetchall())
        value = rows.get(f"{TARGET_KEY}:{region}") or rows.get(TARGET_KEY)
        if value is None:
            return head
        return None if value == "base" else value
