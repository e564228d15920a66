"""`tenantctl quickstart`: a fresh checkout to a running two-region fleet with a
demo tenant per region, each holding a few rows written through its own
credentials. Every step is idempotent, so re-running it is safe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg

from orchestrator.adapters.catalog.models import TenantState
from orchestrator.adapters.postgres import fleet_identity
from orchestrator.api import Fleet
from orchestrator.config import load_config
from orchestrator.devfleet import localfleet

DEMO_TENANTS = {"eu-central": "demo_eu", "ap-south": "demo_ap"}

SAMPLE_ROWS = """
INSERT INTO categories (name) SELECT 'Hardware'
  WHERE NOT EXISTS (SELECT 1 FROM categories WHERE name = 'Hardware');
INSERT INTO warehouses (code, name) VALUES ('MAIN', 'Main warehouse')
  ON CONFLICT (code) DO NOTHING;
INSERT INTO products (sku, name, category_id, unit_price)
  SELECT v.sku, v.name, (SELECT min(id) FROM categories WHERE name = 'Hardware'), v.price
  FROM (VALUES ('BOLT-M6', 'M6 bolt', 0.12), ('NUT-M6', 'M6 nut', 0.05),
               ('WASHER-M6', 'M6 washer', 0.02)) AS v(sku, name, price)
  ON CONFLICT (sku) DO NOTHING;
INSERT INTO stock_levels (product_id, warehouse_id, quantity)
  SELECT p.id, w.id, 1000 FROM products p, warehouses w WHERE w.code = 'MAIN'
  ON CONFLICT DO NOTHING;
"""


def write_sample_rows(dsn: str) -> int:
    """Connect as the tenant's own login role and write demo rows; returns the
    number of products the tenant now has."""
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        conn.execute(SAMPLE_ROWS)  # type: ignore[arg-type]
        row = conn.execute("SELECT count(*) FROM products").fetchone()
    return int(row[0]) if row else 0


def run(config_path: Path, state_dir: Path, *, servers_per_region: int = 1
        ) -> Iterator[str]:
    result = localfleet.init_local(config_path, state_dir,
                                   servers_per_region=servers_per_region)
    yield (f"wrote {result.config_path}" if result.created
           else f"using existing {result.config_path}")
    cfg = load_config(config_path)
    yield from localfleet.up(cfg)
    fleet = Fleet(cfg)
    try:
        before, after = fleet.catalog.upgrade()
        yield f"catalog at {after}" + (f" (was {before or 'empty'})" if before != after else "")
        yield from fleet.catalog.sync_topology()
        # as `catalog upgrade` does: the fleet's id on the catalog and every server
        yield from fleet_identity.ensure(cfg, fleet.catalog)
        for region, slug in DEMO_TENANTS.items():
            if region not in cfg.regions:
                continue
            existing = fleet.find_tenant(slug)
            if existing is not None and existing.state == TenantState.active:
                dsn = fleet.credentials(slug)
                yield f"tenant {slug}: already active in {region}"
            else:
                res = fleet.provision(slug, region)
                dsn = res.dsn
                yield f"tenant {slug}: provisioned in {region} on {res.tenant['server']}"
            products = write_sample_rows(dsn)
            yield f"tenant {slug}: {products} products, written with its own credentials"
    finally:
        fleet.close()
