"""Which servers are this fleet's: the catalog holds a random fleet id (made once)
and each server carries it as a mark (pgserver.mark_fleet). Checked where it costs
no round trip on the hot path: `catalog upgrade` (which marks), `config check`,
`doctor`, and the message of a refused password (see localfleet.not_ours_at)."""

from __future__ import annotations

import secrets

from orchestrator.adapters.catalog.db import Catalog
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.config import Config
from orchestrator.domain.errors import ServerUnavailable


def server_marks(cfg: Config) -> dict[str, str | None | ServerUnavailable]:
    """Each configured server's fleet id (None: unmarked; an error: not reachable)."""
    out: dict[str, str | None | ServerUnavailable] = {}
    for sc in cfg.servers:
        try:
            with pgserver.connect(sc.admin_dsn, server=sc.name) as conn:
                out[sc.name] = pgserver.server_fleet_id(conn)
        except ServerUnavailable as exc:
            out[sc.name] = exc
    return out


def ensure(cfg: Config, catalog: Catalog) -> list[str]:
    """The catalog's fleet id, made once — adopted from the servers' marks if they
    carry one (a catalog rebuilt for a running fleet), else random — and every
    reachable unmarked server marked with it. One line per change or conflict."""
    marks = server_marks(cfg)
    found = [m for m in marks.values() if isinstance(m, str)]
    fleet_id = catalog.fleet_id() or catalog.adopt_fleet_id(
        found[0] if found else secrets.token_hex(8))
    lines: list[str] = []
    for sc in cfg.servers:
        mark = marks[sc.name]
        if mark is None:
            with pgserver.connect(sc.admin_dsn, server=sc.name) as conn:
                mark = pgserver.mark_fleet(conn, fleet_id)
            if mark == fleet_id:
                lines.append(f"server {sc.name}: marked as fleet {fleet_id}")
        if isinstance(mark, str) and mark != fleet_id:
            lines.append(not_ours(sc.name, mark, fleet_id))
    return lines


def not_ours(server: str, mark: str, fleet_id: str) -> str:
    return (f"server {server}: the server at its address is not this fleet's server "
            f"(it is fleet {mark}'s, this is fleet {fleet_id}); check its admin_dsn/port")


def problems(cfg: Config, fleet_id: str | None) -> list[str]:
    """For `config check`: configured servers that another fleet marked."""
    if fleet_id is None:
        return []
    return [not_ours(name, mark, fleet_id) for name, mark in server_marks(cfg).items()
            if isinstance(mark, str) and mark != fleet_id]
