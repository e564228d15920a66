"""The installed tenantctl's version: the one reader of the package's metadata
(`tenantctl --version`, the report and the metrics' build info all show it)."""

from __future__ import annotations

from importlib import metadata


def installed_version() -> str:
    """The version pip installed, or "unknown" (a checkout never installed)."""
    try:
        return metadata.version("tenantctl")
    except metadata.PackageNotFoundError:
        return "unknown"
