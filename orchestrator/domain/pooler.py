"""PgBouncer's view of a server, as plain data and text: which tenant databases it
lists (the active ones, each with its plan's pool size) and the SCRAM-SHA-256
verifiers of its auth file. Pure: no file, no socket.

The verifier is computed here (RFC 5802/7677), not by the server: with SCRAM on
both sides PgBouncer reaches the server only when its auth file holds the very
verifier the server stores (same salt and iterations), so tenantctl gives the role
this verifier (``ALTER ROLE … PASSWORD 'SCRAM-SHA-256$…'``) and writes the same
string to the auth file. The salt is derived from the password (PBKDF2, its own
label), so the verifier can be computed again from the password tenantctl holds;
testing a guess against the salt costs as much as against the verifier, and the
passwords are 256 random bits.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SCRAM_ITERATIONS = 4096  # Postgres's default scram_iterations
_SALT_LABEL = b"tenantctl scram salt v1"
POOLERS = ("pgbouncer",)
DATABASES_FILE = "databases.ini"
AUTH_FILE = "userlist.txt"


def scram_verifier(password: str, salt: bytes, iterations: int = SCRAM_ITERATIONS) -> str:
    """``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``, as Postgres stores it."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def password_verifier(password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    """The one verifier of ``password``: the same every time (server and auth file)."""
    salt = hashlib.pbkdf2_hmac("sha256", password.encode(), _SALT_LABEL, iterations)[:16]
    return scram_verifier(password, salt, iterations)


@dataclass(frozen=True)
class PoolEntry:
    """One line of the database list: clients ask for ``name``; PgBouncer opens at
    most ``pool_size`` server connections to ``dbname`` on host:port."""

    name: str
    host: str
    port: int
    dbname: str
    pool_size: int | None

    def line(self) -> str:
        parts = [f"host={self.host}", f"port={self.port}", f"dbname={self.dbname}"]
        if self.pool_size is not None:
            # per (user, database) pool, and the database's cap across users
            parts += [f"pool_size={self.pool_size}", f"max_db_connections={self.pool_size}"]
        return f"{self.name} = {' '.join(parts)}"


_NAME_RE = re.compile(r"[A-Za-z0-9_]+", re.ASCII)  # tenant names (domain.names) are so


def _checked(name: str) -> str:
    # PgBouncer's ini has no quoting for keys: a name it cannot hold is a bug upstream
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r} cannot be a PgBouncer database or user name")
    return name


HEADER = "; written by tenantctl: do not edit (`tenantctl pooler sync` writes it again)\n"


def render_databases(entries: Iterable[PoolEntry]) -> str:
    """The include file of PgBouncer's [databases] section, sorted (stable text: a
    file that did not change is not rewritten)."""
    lines = [e.line() for e in sorted(entries, key=lambda e: e.name) if _checked(e.name)]
    return HEADER + "".join(f"{ln}\n" for ln in lines)


def render_auth(verifiers: Mapping[str, str]) -> str:
    """PgBouncer's auth_file: ``"user" "verifier"`` lines, sorted."""
    for v in verifiers.values():
        if not v.startswith("SCRAM-SHA-256$") or '"' in v:
            raise ValueError("the auth file holds SCRAM verifiers only")
    return "".join(f'"{_checked(u)}" "{verifiers[u]}"\n' for u in sorted(verifiers))


def listed_databases(text: str) -> set[str]:
    """The names a database list (as rendered above) holds."""
    out = set()
    for ln in text.splitlines():
        ln = ln.strip()
        if ln and not ln.startswith((";", "#")) and "=" in ln:
            out.add(ln.split("=", 1)[0].strip())
    return out


@dataclass(frozen=True)
class PoolerFiles:
    databases: str
    auth: str


def desired_files(entries: Iterable[PoolEntry], verifiers: Mapping[str, str]) -> PoolerFiles:
    return PoolerFiles(render_databases(entries), render_auth(verifiers))


def stale_files(want: PoolerFiles, databases: str | None, auth: str | None) -> list[str]:
    """Which files differ from what the catalog says (None: the file is missing)."""
    out = []
    if databases != want.databases:
        out.append(DATABASES_FILE)
    if auth != want.auth:
        out.append(AUTH_FILE)
    return out
