"""The environment of every process tenantctl starts (psql, pg_dump, pg_restore,
pg_ctl, initdb, useradd): an allow-list, never a copy of our own. Our environment
may hold the master key (``[master_key] env``), a PGPASSWORD or a cloud token; a
child (and whatever a psql user starts with ``\\!``) sees none of them."""

from __future__ import annotations

import os
from collections.abc import Mapping

# what a client tool, its pager/editor and a shell escape need to behave as usual
ALLOWED = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "TMPDIR", "LANG",
    "LANGUAGE", "COLUMNS", "LINES", "PAGER", "PSQL_PAGER", "EDITOR", "VISUAL",
    "PSQL_EDITOR", "LD_LIBRARY_PATH",
})
ALLOWED_PREFIXES = ("LC_",)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of our environment, plus ``extra`` (e.g. the PG*
    variables of the one connection the child makes)."""
    env = {k: v for k, v in os.environ.items()
           if k in ALLOWED or k.startswith(ALLOWED_PREFIXES)}
    if extra:
        env.update(extra)
    return env
