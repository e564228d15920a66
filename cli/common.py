"""What the CLI modules share: the config, fleet and catalog reader of this invocation
(output is cli/output.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from orchestrator.adapters.catalog.reads import CatalogReads
    from orchestrator.api import Fleet
    from orchestrator.config import Config


# catalog ids are bigints: a larger number is refused as bad input (exit 2), not sent
ID_MAX = 2**63 - 1


# most commands' --json (a few groups word their help otherwise, and keep it)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class State:
    config_path: str | None = None
    actor: str | None = None  # --actor, for the audit log (passed to the catalog)


def current_config() -> Config:
    from orchestrator.config import load_config

    return load_config(State.config_path)


def open_fleet() -> Fleet:
    from orchestrator.api import Fleet

    fleet = Fleet(current_config(), actor=State.actor)
    try:
        fleet.catalog.require_current()  # a clear error instead of "relation does not exist"
    except BaseException:
        fleet.close()
        raise
    return fleet


def open_reads() -> CatalogReads:
    """The catalog for a command that only reads it: plain SQL over psycopg, with none
    of SQLAlchemy's ~0.3 s of imports (see orchestrator/adapters/catalog/reads.py)."""
    from orchestrator.adapters.catalog.reads import CatalogReads

    reads = CatalogReads(current_config())
    try:
        reads.require_current()  # as open_fleet
    except BaseException:
        reads.close()
        raise
    return reads
