"""libpq connection strings and connection failures, over psycopg alone.

Shared by the catalog adapters (the SQLAlchemy one and the psycopg reader of the
read commands) and the server adapters; nothing here imports SQLAlchemy, so a
read command that only needs these stays clear of it (~0.3 s of start-up).
"""

from __future__ import annotations

import re

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.domain.errors import ServerUnavailable, first_line


def redact(dsn: str) -> str:
    """A DSN fit for messages: host, port, user and database only."""
    try:
        d = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable dsn>"
    return f"{d.get('user', '?')}@{d.get('host', 'localhost')}:{d.get('port', 5432)}/" \
           f"{d.get('dbname', '')}"


AUTH_FAILED = re.compile(r'server at "([^"]+)", port (\d+) failed: FATAL:\s+password '
                         r"authentication failed")


def server_error(where: str, exc: BaseException) -> ServerUnavailable:
    """One line from a psycopg/SQLAlchemy connection failure, with no secret in it.
    A refused password is often another cluster at the address (two local fleets on
    one machine): said as a hint (the CLI says more for an embedded cluster)."""
    line = first_line(exc)
    if AUTH_FAILED.search(line):
        line += ("; if another PostgreSQL now listens at that address, it is not this "
                 "fleet's server (`tenantctl local status`, `tenantctl doctor`)")
    return ServerUnavailable(f"cannot reach {where}: {line}")


def with_dbname(dsn: str, dbname: str) -> str:
    return make_conninfo(dsn, dbname=dbname)
