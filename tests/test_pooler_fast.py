"""The pooler's pure parts: SCRAM-SHA-256 verifiers (RFC 7677's example exchange),
the rendered files, the [[servers]] pooler keys, doctor's pooler rules; and a
server without a pooler is left alone by the lifecycle hooks."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator.config import parse_config
from orchestrator.domain import health
from orchestrator.domain.errors import ConfigError
from orchestrator.domain.pooler import (
    PoolEntry,
    desired_files,
    listed_databases,
    password_verifier,
    render_auth,
    render_databases,
    scram_verifier,
    stale_files,
)


def test_verifier_matches_rfc_7677_example_exchange() -> None:
    """RFC 7677 section 3: user "user", password "pencil", this salt and 4096 rounds;
    the server's signature and the client's proof in the RFC follow from the
    verifier's StoredKey and ServerKey."""
    v = scram_verifier("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    head, keys = v.split("$")[1:]
    assert head == "4096:W22ZaJ0SNY7soEsUEjb6gQ=="
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth_message = (f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,"
                    f"i=4096,c=biws,r={nonce}").encode()
    server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    assert base64.b64encode(server_signature).decode() == \
        "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    # the client's proof, checked as the server checks it: H(proof XOR signature)
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key


def test_password_verifier_is_the_same_every_time_and_differs_per_password() -> None:
    a = password_verifier("secret-one")
    assert a == password_verifier("secret-one")
    assert a != password_verifier("secret-two")
    assert a.startswith("SCRAM-SHA-256$4096:") and "secret-one" not in a
    # the salt is no fast hash of the password: 16 bytes out of 4096 PBKDF2 rounds
    salt = base64.b64decode(a.split("$")[1].split(":")[1])
    assert len(salt) == 16
    assert salt != hashlib.sha256(b"secret-one").digest()[:16]


def test_rendered_files() -> None:
    entries = [PoolEntry("tenant_b", "db1", 5432, "tenant_b", None),
               PoolEntry("tenant_a", "db1", 5432, "tenant_a", 4)]
    text = render_databases(entries)
    assert text.splitlines()[1:] == [
        "tenant_a = host=db1 port=5432 dbname=tenant_a pool_size=4 max_db_connections=4",
        "tenant_b = host=db1 port=5432 dbname=tenant_b"]
    assert listed_databases(text) == {"tenant_a", "tenant_b"}
    auth = render_auth({"tenant_b": password_verifier("x"), "admin": password_verifier("y")})
    assert auth.splitlines()[0].startswith('"admin" "SCRAM-SHA-256$')
    with pytest.raises(ValueError, match="SCRAM verifiers only"):
        render_auth({"tenant_a": "plaintext"})
    with pytest.raises(ValueError, match="cannot be a PgBouncer"):
        render_databases([PoolEntry("bad name", "h", 1, "x", None)])
    want = desired_files(entries, {"admin": password_verifier("y")})
    assert stale_files(want, want.databases, want.auth) == []
    assert stale_files(want, None, want.auth) == ["databases.ini"]
    assert stale_files(want, want.databases, "") == ["userlist.txt"]


def _raw(**server: object) -> dict[str, object]:
    return {"catalog": {"dsn": "postgresql://admin@db/cat"}, "master_key": {"file": "k"},
            "regions": {"eu": {"backup_store": "file:///b", "servers": [
                {"name": "eu-1", "admin_dsn": "postgresql://admin@db/postgres", **server}]}}}


POOLER = {"pooler": "pgbouncer", "pooler_host": "db", "pooler_port": 6432,
          "pooler_dir": "/etc/pgbouncer/tenantctl",
          "pooler_admin_password_file": "/etc/tenantctl/pooler.password"}


def test_pooler_config_keys() -> None:
    cfg = parse_config(_raw(**POOLER), Path("/etc/tenantctl/tenantctl.toml"))
    p = cfg.server("eu-1").pooler
    assert p is not None and (p.kind, p.host, p.port, p.admin_user) == (
        "pgbouncer", "db", 6432, "tenantctl_pooler")
    assert p.dir == Path("/etc/pgbouncer/tenantctl")
    assert parse_config(_raw(), Path("/x.toml")).server("eu-1").pooler is None


@pytest.mark.parametrize(("server", "message"), [
    ({**POOLER, "pooler": "odyssey"}, "pooler: unknown pooler 'odyssey' (known: pgbouncer)"),
    ({"pooler_port": 6432}, "pooler_port: needs pooler = \"pgbouncer\""),
    ({k: v for k, v in POOLER.items() if k != "pooler_port"}, "pooler_port: missing"),
    ({**POOLER, "pooler_port": 70000}, "pooler_port: must be at most 65535"),
    ({**POOLER, "pooler_admin_user": "Bad-User"}, "pooler_admin_user: lower-case"),
])
def test_pooler_config_errors_are_one_line(server: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(_raw(**server), Path("/x.toml"))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def _facts(**poolers: health.PoolerFact) -> health.Facts:
    return health.Facts(now=datetime(2026, 12, 7, tzinfo=UTC), head=None, use_template=True,
                        backup_interval=timedelta(hours=24), tenants=[], backups=[],
                        servers={}, server_cluster={}, clusters={}, stores={}, grants={},
                        poolers=poolers)


def test_doctor_pooler_rules() -> None:
    assert list(health.check_poolers(_facts(s1=health.PoolerFact("s1", "h:1", True, None)))) \
        == []
    down, = health.check_poolers(_facts(s1=health.PoolerFact("s1", "h:1", False, "refused")))
    assert (down.severity, down.code, down.fix) == (health.ERROR, "pooler-down", None)
    assert "h:1" in down.message and "h:1" in down.remedy
    stale, = health.check_poolers(_facts(
        s1=health.PoolerFact("s1", "h:1", True, None, ("userlist.txt",))))
    assert (stale.severity, stale.code, stale.fix, stale.arg("server")) == (
        health.WARNING, "pooler-stale", "sync_pooler", "s1")
