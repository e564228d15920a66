"""Setting the fleet up and checking it: the catalog's schema and topology
(`catalog upgrade`, `init`), and whether a config file, its master key and its
servers belong to this fleet (`config check`)."""

from __future__ import annotations

from typing import Any

from orchestrator.adapters.catalog.db import Catalog
from orchestrator.adapters.crypto import tenant_keys as keys
from orchestrator.adapters.crypto.masterkey import load_master_key
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import fleet_identity
from orchestrator.adapters.postgres.libpq import redact
from orchestrator.config import Config
from orchestrator.domain.errors import ServerUnavailable, TenantctlError, first_line


def upgrade_catalog(cfg: Config, actor: str | None = None) -> dict[str, Any]:
    """Bring the catalog schema to head, sync regions/servers from the config and
    mark the fleet's identity on the catalog and every server."""
    catalog = Catalog(cfg, actor=actor)
    try:
        before, after = catalog.upgrade()
        changes = catalog.sync_topology()
        changes += fleet_identity.ensure(cfg, catalog)
    finally:
        catalog.dispose()
    return {"from": before, "to": after, "topology": changes}


def check_config(cfg: Config, actor: str | None = None) -> dict[str, Any]:
    """The config's summary, once its master key is readable and (when the catalog
    can be reached) the fleet's, and no configured server is another fleet's; else
    the error that says which (MasterKeyError, ServerUnavailable)."""
    key = load_master_key(cfg.master_key)
    catalog = Catalog(cfg, actor=actor)
    try:
        view = keys.catalog_view(catalog)
        foreign = [] if isinstance(view, str) else \
            fleet_identity.problems(cfg, catalog.fleet_id())
    finally:
        catalog.dispose()
    if foreign:
        raise ServerUnavailable(foreign[0])
    mixed = None
    if isinstance(view, str):
        catalog_note = f"catalog not read ({view}): master key not compared with it"
    else:
        recorded, wrapped = view
        fleets = keys.fleet_key_elsewhere(key.key_id, recorded, wrapped)
        if fleets is not None:
            raise keys.not_the_fleets_key(key.key_id, fleets)
        mixed = keys.mixed_key_ids(wrapped)
        catalog_note = "the fleet's master key" if recorded or wrapped else \
            "the catalog has no secret yet"
    return {"path": str(cfg.path), "regions": {
        r.name: {"backup_store": r.backup_store, "servers": [s.name for s in r.servers]}
        for r in cfg.regions.values()}, "master_key_id": key.key_id,
        "master_key": catalog_note, "mixed_master_keys": mixed,
        "tenant_migrations": str(cfg.tenant_migrations),
        "logical_moves": logical_moves(cfg), **config_origin(cfg)}


def logical_moves(cfg: Config) -> dict[str, dict[str, Any]]:
    """Per configured server: whether tenant moves may use logical replication
    there, and why not (a note, not an error: such moves use pg_dump). A server that
    cannot be reached is said so, ``ready`` None."""
    out: dict[str, dict[str, Any]] = {}
    for sc in cfg.servers:
        try:
            with pgserver.connect(sc.admin_dsn, server=sc.name) as conn:
                readiness = pgserver.logical_readiness(conn)
        except TenantctlError as exc:
            out[sc.name] = {"ready": None, "why": [f"not reached: {first_line(exc)}"]}
            continue
        out[sc.name] = {"ready": readiness.ready, "why": readiness.blockers()}
    return out


def config_origin(cfg: Config) -> dict[str, Any]:
    """How the config was found and which keys the environment set, the values shown
    without a secret (a DSN as user@host:port/db)."""
    lookup = cfg.lookup
    return {
        "lookup": None if lookup is None else {
            "source": lookup.source, "found_by": lookup.described, "path": str(lookup.path),
            "tried": [str(p) for p in lookup.tried]},
        "from_environment": [
            {"variable": o.variable, "key": o.key,
             "value": o.value if o.key == "master_key.file" else redact(o.value)}
            for o in cfg.from_env]}
