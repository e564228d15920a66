"""The one usage query of a server: size, connections and pg_stat_database's
counters of many databases at once, on the admin connection (no connection to a
tenant's database), bounded by statement_timeout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from orchestrator.domain.usage import COUNTERS, Counters

# pg_database_size needs CONNECT on the database or pg_read_all_stats: without either
# the size is unknown (NULL) rather than the whole query failing
_QUERY = sql.SQL("""
SELECT d.datname, d.oid::bigint, s.stats_reset, coalesce(s.numbackends, 0),
       {counters},
       CASE WHEN has_database_privilege(d.oid, 'CONNECT')
                 OR pg_has_role('pg_read_all_stats', 'USAGE')
            THEN pg_database_size(d.oid) END
  FROM pg_database d LEFT JOIN pg_stat_database s ON s.datid = d.oid
 WHERE d.datname = ANY(%s)
""").format(counters=sql.SQL(", ").join(
    sql.SQL("coalesce(s.{}, 0)").format(sql.Identifier(c)) for c in COUNTERS))


@dataclass(frozen=True)
class DatabaseStats:
    database: str
    datid: int
    stats_reset: datetime | None
    connections: int
    counters: Counters
    size: int | None


def read_database_stats(conn: psycopg.Connection, databases: Sequence[str],
                        statement_timeout: str) -> dict[str, DatabaseStats]:
    """database name -> its stats, for those of ``databases`` that exist; the query
    is cancelled by the server after ``statement_timeout`` (a Postgres duration)."""
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
            sql.Literal(statement_timeout)))
        rows = conn.execute(_QUERY, (list(databases),)).fetchall()
    out = {}
    for name, datid, reset, numbackends, *rest in rows:
        *counts, size = rest
        out[name] = DatabaseStats(name, int(datid), reset, int(numbackends),
                                  Counters(*(int(c) for c in counts)),
                                  None if size is None else int(size))
    return out
