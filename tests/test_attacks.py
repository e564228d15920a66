"""Attack and bad-input suite, part 1: arbitrary strings (hypothesis) fed to every
place where user input reaches SQL, a path or an object key — slugs, `restore --as`
names, region and server names, backup store URLs and the object keys built under
them, export paths, and the option values that end up in SQL or in date
arithmetic. Each input either succeeds with a safe name or fails with a one-line
error, and nothing is created outside what it should.

The properties run mostly in-process against the pure validators and the Python
API (fast); a handful of CLI runs check the shape the operator sees: one line on
stderr, a non-zero exit, no traceback, nothing changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import uuid
import zipfile
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from backups import service as pipeline
from backups.stores import FileStore, S3Store, StoreError, _check_key, open_store
from cli.main import cli_name
from orchestrator.adapters import clock
from orchestrator.adapters.catalog.db import default_actor
from orchestrator.adapters.catalog.models import Tenant
from orchestrator.api import Fleet
from orchestrator.config import parse_config
from orchestrator.domain.durations import parse_pg_duration, parse_since
from orchestrator.domain.errors import ConfigError, InvalidInput, NotFound, TenantctlError
from orchestrator.domain.names import (
    ADMIN_ROLE,
    CATALOG_DB,
    TEMPLATE_DB,
    TEMPLATE_OWNER,
    tenant_names,
    validate_slug,
)
from orchestrator.domain.rollout_plan import parse_budget, parse_waves
from orchestrator.services import access, audit_log, credentials, lifecycle, psql, retention
from orchestrator.services.export import export
from orchestrator.services.provisioning import restore_as
from tests.conftest import REPO, TENANTCTL, OwnCatalog, PgFleet, connect_as, run_cli

ALL_SERVERS = ("eu-central-1", "eu-central-2", "ap-south-1")
NAMEDATALEN = 63  # Postgres silently truncates longer identifiers: two tenants could meet
# The oracle: what a slug must look like, restated independently of orchestrator.domain.names
# (ASCII only, the whole string — a trailing newline included).
SLUG_ORACLE = re.compile(r"[a-z][a-z0-9_]{2,39}", re.ASCII)
REGION_ORACLE = re.compile(r"[a-z][a-z0-9-]{1,39}", re.ASCII)
SERVER_ORACLE = re.compile(r"[a-z][a-z0-9_-]{1,62}", re.ASCII)
SAFE_IDENT = re.compile(r"[a-z][a-z0-9_]*", re.ASCII)
SERVER_WIDE = {"postgres", "template0", "template1", CATALOG_DB, TEMPLATE_DB, TEMPLATE_OWNER,
               ADMIN_ROLE}
# refused although harmless to the server: names an operator would mistake for a system's
RESERVED_BY_CHOICE = {"public", "admin", "root", "tenantctl"}

PURE = settings(max_examples=400, deadline=None, database=None)
LIVE = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.filter_too_much])

NASTY = [
    "acme\n", "acme\r\n", "acme\n; DROP DATABASE postgres", "acme\x00", "acme\u2028",
    "\u0430cme", "\uff41\uff43\uff4d\uff45", "ACME", "acme ", " acme", "acme;", "acme'--",
    'ac"me', "ac/me", "../acme", "acme/..", "..", ".", "", "tenantctl_catalog", "pg_acme",
    "tenantctl_x", "postgres", "template1", "a" * 41, "ab", "a\tbc", "acme%00", "acme\\",
    "ac$me", "acme\x1b[31m", "acme_\u0131", "ac\u00e9me", "acme)", "acme*", "[/acme]",
    "x'; DROP DATABASE tenantctl_catalog; --", "\udcff" "acme",
]
valid_slug = st.from_regex(r"\A[a-z][a-z0-9_]{2,39}\Z")
# a valid slug with one character too many: where a lax check lets things through
near_valid = st.builds(
    lambda s, c, where: {"end": s + c, "start": c + s, "mid": s[:2] + c + s[2:]}[where],
    valid_slug,
    st.one_of(st.sampled_from(["\n", "\r", "\x00", "'", '"', ";", "/", " ", "\u2028", "\t",
                               "\\", ".", "-", "A"]), st.characters()),
    st.sampled_from(["end", "start", "mid"]))
hostile = st.one_of(st.sampled_from(NASTY), st.text(max_size=60), near_valid, valid_slug)


def one_line(exc: BaseException, *needles: str) -> str:
    """What the CLI would print after `error: `: one printable line (user input in
    it is escaped), naming the problem."""
    assert isinstance(exc, TenantctlError), repr(exc)
    msg = exc.shown(cli_name(exc.field)) if exc.field else str(exc)  # as the CLI names it
    assert msg.strip(), repr(exc)
    assert len(msg.splitlines()) == 1 and msg.isprintable(), repr(msg)
    for needle in needles:
        assert needle in msg, msg
    return msg


def clean_cli_failure(proc: subprocess.CompletedProcess[str], code: int | None = None,
                      *needles: str) -> None:
    assert proc.returncode not in (0, None), (proc.returncode, proc.stdout, proc.stderr)
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in err, err


def squeeze(text: str) -> str:
    """Text without whitespace: rich wraps long lines at the console width."""
    return "".join(text.split())


def everything_on_servers(test_fleet: PgFleet) -> dict[str, tuple[frozenset[str], ...]]:
    """Every database and every role of every server: an injected statement could
    create anything, not only tenant-looking names."""
    out = {}
    for server in ALL_SERVERS:
        with psycopg.connect(test_fleet.admin_dsn(server), autocommit=True) as conn:
            dbs = frozenset(r[0] for r in conn.execute("SELECT datname FROM pg_database"))
            roles = frozenset(r[0] for r in conn.execute("SELECT rolname FROM pg_roles"))
        out[server] = (dbs, roles)
    return out


def catalog_slugs(fleet: Fleet) -> set[str]:
    with fleet.catalog.session() as s:
        return set(s.scalars(select(Tenant.slug)))


# -- slugs --------------------------------------------------------------------------------


@settings(PURE, max_examples=1000)
@given(hostile)
@example("a" * 40)
@example("admin")  # a well-formed slug refused by choice: Hypothesis found it once
def test_a_slug_is_accepted_only_if_every_name_made_from_it_is_safe(slug: str) -> None:
    try:
        accepted = validate_slug(slug)
    except InvalidInput as exc:
        one_line(exc, "invalid slug")
        assert not SLUG_ORACLE.fullmatch(slug) or slug in SERVER_WIDE | RESERVED_BY_CHOICE \
            or slug.startswith(("pg_", "tenantctl"))
        return
    assert accepted == slug and SLUG_ORACLE.fullmatch(slug), repr(slug)
    names = tenant_names(slug)
    # every derived server object: live, side copy and old copy of an in-place
    # restore, login and owner roles
    derived = [names.database, f"{names.database}__r", f"{names.database}__old",
               names.login_role, names.owner_role]
    for name in derived:
        assert SAFE_IDENT.fullmatch(name) and len(name.encode()) <= NAMEDATALEN, name
        assert name not in SERVER_WIDE and not name.startswith(("pg_", "tenantctl")), name
    # a tenant's owner role is never any tenant's login role, nor the reverse
    assert names.owner_role.startswith("owner_") and names.login_role.startswith("tenant_")
    # its backup objects stay under its own prefix, in any store
    key = f"tenants/{slug}/0000000001-20260101T000000Z.dump.age"
    assert _check_key(key) == key
    root = "/srv/store"
    path = os.path.normpath(FileStore("file://" + root, Path(root))._path(key))
    assert path.startswith(f"{root}/tenants/{slug}/")


def _entry_points(fleet: Fleet, tmp: Path) -> dict[str, Callable[[str], Any]]:
    """Every API call that takes a tenant slug from its caller."""
    now = clock.utcnow()
    return {
        "get_tenant": fleet.get_tenant,
        "credentials": fleet.credentials,
        "rotate": lambda s: fleet.credentials(s, rotate=True),
        "backup": lambda s: pipeline.run_backup(fleet, s),
        "latest_backup": lambda s: pipeline.latest_backup(fleet, s),
        "export": lambda s: export(fleet, s, "csv", tmp / "out.zip"),
        "psql": lambda s: psql.run(fleet, s, owner=False, command="SELECT 1"),
        "cancel": lambda s: lifecycle.cancel(fleet, s),
        "suspend": lambda s: lifecycle.suspend(fleet, s),
        "resume": lambda s: lifecycle.resume(fleet, s),
        "reactivate": lambda s: lifecycle.reactivate(fleet, s),
        "legal_hold": lambda s: lifecycle.legal_hold(fleet, s, on=True, reason="r"),
        "erase": lambda s: retention.erase_tenant(fleet, s, "request 1", now),
        "grant": lambda s: access.grant(fleet, s, to="sam", ttl=timedelta(hours=1),
                                        reason="ticket"),
        "key_export": lambda s: credentials.export_identity(fleet, s),
        "restore_as": lambda s: restore_as(fleet, -1, s),  # no such backup, ever
    }


def test_every_api_entry_point_refuses_a_hostile_slug_and_changes_nothing(
        fleet: Fleet, test_fleet: PgFleet, tmp_path: Path) -> None:
    calls = _entry_points(fleet, tmp_path)
    known = catalog_slugs(fleet)
    before = everything_on_servers(test_fleet)

    @LIVE
    @given(hostile)
    @example("acme\n")
    @example("x'; DROP DATABASE tenantctl_catalog; --")
    def attack(slug: str) -> None:
        if slug in known:  # an existing tenant's name is not an attack
            return
        try:
            validate_slug(slug)
            expected: type[TenantctlError] = NotFound  # valid, but no such tenant (backup)
        except InvalidInput:
            expected = InvalidInput  # refused as such, before any lookup
        for name, call in calls.items():
            with pytest.raises(TenantctlError) as err:
                call(slug)
            assert type(err.value) is expected, (name, err.value)
            one_line(err.value)
        if not SLUG_ORACLE.fullmatch(slug):
            with pytest.raises(InvalidInput) as err:
                fleet.provision(slug, "eu-central")
            one_line(err.value, "invalid slug")

    attack()
    assert everything_on_servers(test_fleet) == before
    assert catalog_slugs(fleet) == known
    assert list(tmp_path.iterdir()) == []


def test_provisioning_arbitrary_slugs_creates_exactly_the_tenant_objects(
        test_fleet: PgFleet, own_catalog: OwnCatalog) -> None:
    """End to end through real CREATE DATABASE / CREATE ROLE: a valid slug makes its
    database and two roles on one server of its region and nothing else anywhere;
    any other string is refused before anything exists."""
    fleet = own_catalog.fleet

    @settings(LIVE, max_examples=16)
    @given(st.one_of(valid_slug, hostile),
           st.sampled_from(["eu-central", "ap-south"]))
    @example("a" + "z9_" * 13, "eu-central")  # 40 characters
    @example("acme\n", "ap-south")
    def attack(slug: str, region: str) -> None:
        before = everything_on_servers(test_fleet)
        try:
            res = fleet.provision(slug, region)
        except TenantctlError as exc:
            one_line(exc)
            assert everything_on_servers(test_fleet) == before
            return
        assert SLUG_ORACLE.fullmatch(slug), repr(slug)
        after = everything_on_servers(test_fleet)
        for state in (before, after):  # a server's template is built for its first tenant
            for srv in ALL_SERVERS:
                state[srv] = (state[srv][0] - {TEMPLATE_DB}, state[srv][1] - {TEMPLATE_OWNER})
        server = res.tenant["server"]
        assert fleet.cfg.server(server).region == region
        names = tenant_names(slug)
        for srv in ALL_SERVERS:
            new_dbs = after[srv][0] - before[srv][0]
            new_roles = after[srv][1] - before[srv][1]
            if srv == server:
                assert new_dbs == {names.database}
                assert new_roles == {names.login_role, names.owner_role}
            else:
                assert not new_dbs and not new_roles, srv
            assert after[srv][0] >= before[srv][0] and after[srv][1] >= before[srv][1]
        with connect_as(res.dsn) as conn:
            assert conn.execute("SELECT current_user, current_database()").fetchone() == (
                names.login_role, names.database)

    attack()


# -- restore --as ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backed_up(test_fleet: PgFleet) -> Iterator[tuple[str, int]]:
    """One tenant of the shared catalog with data and a completed backup."""
    fleet = Fleet(test_fleet.config())
    try:
        slug = _tenant_with_a_customer(fleet, "atk", "ap-south")
        yield slug, pipeline.run_backup(fleet, slug).id
    finally:
        fleet.close()


def _tenant_with_a_customer(fleet: Fleet, prefix: str, region: str) -> str:
    slug = f"{prefix}{uuid.uuid4().hex[:8]}"
    fleet.provision(slug, region)
    with connect_as(fleet.credentials(slug), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (email, name) VALUES ('a@b.c', 'Ann')")
    return slug


def test_restore_as_refuses_hostile_names_before_reading_the_backup(
        fleet: Fleet, test_fleet: PgFleet, backed_up: tuple[str, int]) -> None:
    _, backup_id = backed_up
    known = catalog_slugs(fleet)
    before = everything_on_servers(test_fleet)

    @LIVE
    @given(hostile.filter(lambda s: not SLUG_ORACLE.fullmatch(s)))
    @example("acme\n")
    def attack(new_slug: str) -> None:
        with pytest.raises(InvalidInput) as err:
            restore_as(fleet, backup_id, new_slug)
        one_line(err.value, "invalid slug")

    attack()
    assert everything_on_servers(test_fleet) == before
    assert catalog_slugs(fleet) == known


def test_restore_as_through_the_cli(fleet: Fleet, test_fleet: PgFleet,
                                   backed_up: tuple[str, int]) -> None:
    source, backup_id = backed_up
    before = everything_on_servers(test_fleet)
    for bad in ("acme\n", "x'; DROP DATABASE tenantctl_catalog; --", "../" + source,
                source):
        proc = run_cli(test_fleet, "backup", "restore", str(backup_id), "--as", bad)
        clean_cli_failure(proc, None, "invalid slug" if bad != source else "already exists")
    assert everything_on_servers(test_fleet) == before
    # the longest valid slug: every name made from it fits NAMEDATALEN
    new = (f"r{uuid.uuid4().hex}" + "_" * 40)[:40]
    proc = run_cli(test_fleet, "backup", "restore", str(backup_id), "--as", new, "--json")
    assert proc.returncode == 0, proc.stderr
    after = everything_on_servers(test_fleet)
    server = fleet.get_tenant(new).server
    names = tenant_names(new)
    for srv in ALL_SERVERS:
        expected = ({names.database}, {names.login_role, names.owner_role}) \
            if srv == server else (set(), set())
        assert (after[srv][0] - before[srv][0], after[srv][1] - before[srv][1]) == expected
    with connect_as(fleet.credentials(new)) as conn:
        assert conn.execute("SELECT name FROM customers").fetchall() == [("Ann",)]


# -- region and server names ------------------------------------------------------------------


def _raw(region: str = "eu-central", server: str = "eu-1",
         stores: dict[str, str] | None = None) -> dict[str, Any]:
    stores = stores or {region: "s3://bucket/eu"}
    return {
        "catalog": {"dsn": "postgresql://tenantctl_admin@cat/tenantctl_catalog"},
        "master_key": {"file": "master.key"},
        "regions": {name: {"backup_store": url, "servers": [
            {"name": f"{server}" if i == 0 else f"{name}-srv",
             "admin_dsn": "postgresql://tenantctl_admin@pg/postgres"}]}
            for i, (name, url) in enumerate(stores.items())},
    }


names_strategy = st.one_of(
    st.sampled_from(["eu\n", "eu-central\n", "EU", "eu_central", "eu central", "e", "eu.c",
                     "../eu", "eu/x", "eu-" + "x" * 60, "eu\u2028x", "\u0435u", "eu\x00"]),
    st.text(max_size=40), st.from_regex(r"[a-z][a-z0-9_-]{1,62}"))


@PURE
@given(names_strategy)
@example("eu-central\n")
def test_region_and_server_names_in_the_config(name: str) -> None:
    path = Path("/etc/tenantctl/tenantctl.toml")
    try:
        cfg = parse_config(_raw(region=name, stores={name: "s3://bucket/eu"}), path)
    except ConfigError as exc:
        one_line(exc, str(path))
        assert not REGION_ORACLE.fullmatch(name)
    else:
        assert REGION_ORACLE.fullmatch(name), repr(name)
        assert cfg.region(name).name == name
    try:
        cfg = parse_config(_raw(server=name), path)
    except ConfigError as exc:
        one_line(exc, str(path))
        assert not SERVER_ORACLE.fullmatch(name)
    else:
        assert SERVER_ORACLE.fullmatch(name), repr(name)
        assert cfg.server(name).name == name


def test_hostile_region_names_through_the_api(fleet: Fleet, slug: str) -> None:
    from orchestrator.services import breach, migrate_status

    @LIVE
    @given(names_strategy)
    @example("eu-central\n")
    @example("eu-central'; --")
    def attack(region: str) -> None:
        if region in fleet.cfg.regions:
            return
        for call in (lambda: fleet.provision(slug, region), lambda: fleet.tenants(region),
                     lambda: fleet.servers(region),
                     lambda: breach.rotate_all(fleet, region=region),
                     lambda: migrate_status.fleet_status(fleet, region)):
            with pytest.raises(ConfigError) as err:
                call()
            one_line(err.value, "unknown region")

    attack()
    assert fleet.find_tenant(slug) is None


# -- backup stores and object keys ------------------------------------------------------------


segment = st.sampled_from(["a", "b", "eu", "tenants", "acme", ".", "..", "", "%2e%2e", "x;y",
                           "a b", "\u00e9", "\n", "a#b"])
store_path = st.lists(segment, max_size=4).map("/".join)
file_url = st.builds(lambda host, p: f"file://{host}/{p}",
                     st.sampled_from(["", "", "localhost", "backups", "u:pw@h"]), store_path)
s3_url = st.builds(lambda bucket, p, q: f"s3://{bucket}/{p}{q}",
                   st.sampled_from(["bkt", "bkt", "other", "B!", "", "k:s@bkt", "a"]),
                   store_path,
                   st.sampled_from(["", "", "?region=eu-central-1",
                                    "?endpoint_url=http://127.0.0.1:9", "?colour=blue",
                                    "#frag"]))
store_url = st.one_of(file_url, s3_url, st.text(max_size=30))


def _key_space(store: Any) -> tuple[str, ...]:
    """Where a store's objects live, as a path: the directory, or service/bucket/prefix."""
    if isinstance(store, FileStore):
        return ("file", *[p for p in str(store.root).split("/") if p])
    assert isinstance(store, S3Store)
    return ("s3", store.endpoint_url or "", store.bucket,
            *[p for p in store.prefix.split("/") if p])


@PURE
@given(store_url, store_url)
@example("file:///srv/backups/eu", "file:///srv/backups/eu/tenants/acme")
@example("s3://bkt/eu", "s3://bkt/eu/tenants/acme")
@example("s3://bkt/eu", "s3://bkt/eu")
@example("file://backups/eu", "file:///srv/ap")
@example("file:///srv/eu/../ap", "file:///srv/ap")
@example("s3://bkt/eu?colour=blue", "file:///srv/ap")
def test_backup_store_urls_give_each_region_a_key_space_of_its_own(a: str, b: str) -> None:
    """A store URL the config accepts opens, keeps every key of every tenant under
    its own directory or prefix, and shares no key with another region's store: a
    purge of tenant `acme` in one region deletes `tenants/acme/…` of its own store,
    never a whole other region's store nested under that prefix."""
    try:
        cfg = parse_config(_raw(stores={"eu": a, "ap": b}), Path("/etc/t.toml"))
    except ConfigError as exc:
        one_line(exc)
        return
    spaces = {}
    for region in ("eu", "ap"):
        store = open_store(cfg.region(region).backup_store)  # the config said it is fine
        space = _key_space(store)
        assert ".." not in space and "." not in space, space
        key = "tenants/acme/0000000001-20260101T000000Z.dump.age"
        if isinstance(store, FileStore):
            assert store.root.is_absolute()
            full = os.path.normpath(store._path(key))
            assert full == os.path.join(os.path.normpath(store.root), key)
        else:
            assert isinstance(store, S3Store)
            full = store._key(key)
            assert full == "/".join([*space[3:], key])
        spaces[region] = space
    eu, ap = spaces["eu"], spaces["ap"]
    shorter = min(len(eu), len(ap))
    assert eu[:shorter] != ap[:shorter], f"the stores overlap: {a!r} and {b!r}"


@PURE
@given(st.one_of(st.text(max_size=40), st.lists(segment, max_size=5).map("/".join)))
def test_object_keys_never_leave_the_store(key: str) -> None:
    root = "/srv/store"
    try:
        _check_key(key)
    except StoreError as exc:
        one_line(exc, "invalid object key")
        return
    full = os.path.normpath(os.path.join(root, key))
    assert full.startswith(root + "/"), key
    s3 = S3Store("s3://bkt/pre")
    assert s3._key(key) == f"pre/{key}"
    assert not {".", "..", ""} & set(s3._key(key).split("/"))


# -- export paths ---------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            if stat.S_ISLNK(st_.st_mode):
                out[p] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st_.st_mode):
                out[p] = ("dir",)
            else:
                out[p] = ("file", hashlib.sha256(Path(p).read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def exportable(test_fleet: PgFleet) -> Iterator[str]:
    fleet = Fleet(test_fleet.config())
    try:
        yield _tenant_with_a_customer(fleet, "exp", "eu-central")
    finally:
        fleet.close()


export_names = st.one_of(
    st.sampled_from(["x.zip", "existing.zip", "sub", "sub/", "link", "dangling", ".", "..",
                     "", "sub/x.zip", "nosuchdir/x.zip", "../x.zip", "../../../x.zip",
                     "a\nb.zip", "[/x].zip", "x" * 255, "x" * 250, "x" * 256, "x\x00y",
                     "\udcff.zip", ".x.zip.abc.partial", " ", "-", "--force", "link/x",
                     "\x1b[31mred", "sub/../x.zip"]),
    st.text(max_size=30), st.text(alphabet="ab./\n", max_size=12))


def test_export_writes_only_the_named_file(fleet: Fleet, exportable: str,
                                           tmp_path: Path) -> None:
    """Whatever the --output: the named file appears (complete: a valid zip), or one
    line explains why not — and nothing else in the tree changes: no temporary file
    left, nothing written through a symlink, no directory replaced."""
    root = tmp_path / "tree"
    base = root / "a" / "b" / "base"

    def reset() -> None:
        shutil.rmtree(root, ignore_errors=True)
        (base / "sub").mkdir(parents=True)
        (root / "outside").mkdir()
        (root / "outside" / "victim.txt").write_text("do not touch")
        (base / "existing.zip").write_bytes(b"old")
        (base / "link").symlink_to(root / "outside" / "victim.txt")
        (base / "dangling").symlink_to(root / "outside" / "nothing")

    @LIVE
    @given(export_names, st.booleans())
    @example("x" * 255, False)
    @example("x" * 256, False)
    @example("\udcff.zip", False)  # a name that is not UTF-8: a valid file name
    @example("sub", True)
    @example("..", True)
    @example("link", True)
    @example("a\nb.zip", False)
    def attack(name: str, force: bool) -> None:
        reset()
        expected = os.path.normpath(os.path.join(base, name))
        if not expected.startswith(f"{root}/"):
            return  # the operator named a file outside this test's tree
        before = _tree(root)
        try:
            res = export(fleet, exportable, "csv", base / name, force=force)
        except TenantctlError as exc:
            one_line(exc)
            assert _tree(root) == before
            return
        after = _tree(root)
        assert os.path.normpath(res["output"]) == expected
        changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
        assert changed == {expected}, changed
        assert after[expected][0] == "file" and zipfile.is_zipfile(expected)
        assert (root / "outside" / "victim.txt").read_text() == "do not touch"

    attack()


# -- option values that reach SQL or date arithmetic -------------------------------------------


values = st.one_of(st.text(max_size=30),
                   st.from_regex(r"\A[0-9\u0660-\u0669]{1,25}(ms|s|min|h|m|d)?\Z"),
                   st.sampled_from(["99999999999999999999d", "999999999d", "3000000d",
                                    "99999999999s", "2147483648ms", "2147483647ms", "1e400%",
                                    "nan%", "0001-01-01T00:00:00+01:00",
                                    "9999-12-31T23:59:59-01:00", "\u0661\u0662s", "1\n"]))


@PURE
@given(values)
@example("99999999999999999999d")
@example("0001-01-01T00:00:00+01:00")
def test_option_parsers_return_or_refuse_in_one_line(text: str) -> None:
    parsers: list[Callable[[str], Any]] = [
        access.parse_ttl, lambda s: parse_since(s, clock.utcnow(), "--since"),
        clock.parse_instant, parse_waves,
        lambda s: parse_budget(s, 100), lambda s: parse_pg_duration(s, "--lock-timeout"),
        lambda s: clock.effective_now(s, acting=False)]
    for parse in parsers:
        try:
            value = parse(text)
        except InvalidInput as exc:
            one_line(exc)
            continue
        if isinstance(value, timedelta):  # a TTL: positive, at most a week
            assert timedelta(0) < value <= access.MAX_TTL
        if isinstance(value, datetime):
            assert value.tzinfo is not None and value.utcoffset() == timedelta(0)


@pytest.fixture(scope="module")
def pg(test_fleet: PgFleet) -> Iterator[psycopg.Connection]:
    with psycopg.connect(test_fleet.admin_dsn("eu-central-1")) as conn:
        yield conn


def test_timeouts_accepted_are_timeouts_postgres_accepts(pg: psycopg.Connection) -> None:
    @settings(PURE, max_examples=150)
    @given(values)
    @example("99999999999s")
    @example("\u0661\u0662s")
    @example("08")
    @example("010s")
    @example("5m")
    @example("2w")
    def attack(text: str) -> None:
        try:
            value = parse_pg_duration(text, "--lock-timeout")
        except InvalidInput as exc:
            one_line(exc)
            return
        with pg.transaction():
            pg.execute("SELECT set_config('lock_timeout', %s, true)", (value,))
            row = pg.execute("SELECT setting::bigint FROM pg_settings "
                             "WHERE name = 'lock_timeout'").fetchone()
        # and it means what the operator wrote (not, say, "010" read as octal)
        meant = re.fullmatch(r"\s*([0-9]+)\s*(ms|s|min|m|h|d|w)?\s*", text, re.ASCII)
        assert meant and row is not None, (text, value)
        factor = {"ms": 1, "s": 1000, "min": 60_000, "m": 60_000, "h": 3_600_000,
                  "d": 86_400_000, "w": 604_800_000}[meant.group(2) or "ms"]
        assert row[0] == int(meant.group(1)) * factor, (text, value, row)

    attack()


# -- free text stored in the catalog: reasons, names, filters, the actor ------------------------


free_text = st.one_of(st.text(max_size=40),
                      st.sampled_from(["a\x00b", "\udcff", "\ud800x", "two\nlines", "[/x]",
                                       "\u00e9t\u00e9", "  ", "'; DROP TABLE tenants; --"]))


def test_free_text_is_stored_as_given_or_refused(fleet: Fleet, exportable: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A reason, a grantee, an audit filter or the actor's name: stored exactly as
    given, or refused in one line before anything changes (Postgres text holds no
    NUL byte and only UTF-8; argv bytes that are not UTF-8 arrive as surrogates)."""
    from orchestrator.adapters.catalog.models import AuditEvent

    @LIVE
    @given(free_text)
    @example("a\x00b")
    @example("\udcff")
    def attack(text: str) -> None:
        held = fleet.get_tenant(exportable)
        try:
            lifecycle.legal_hold(fleet, exportable, on=True, reason=text)
        except TenantctlError as exc:
            one_line(exc, "--reason")
            after = fleet.get_tenant(exportable)
            assert (after.legal_hold, after.legal_hold_reason) == (held.legal_hold,
                                                                   held.legal_hold_reason)
        else:
            assert fleet.get_tenant(exportable).legal_hold_reason == text.strip()
            lifecycle.legal_hold(fleet, exportable, on=False, reason="test")
        for kwargs in ({"tenant": text}, {"action": text}):
            try:
                audit_log.events(fleet, limit=1, **kwargs)
            except TenantctlError as exc:
                one_line(exc)
        # the actor is recorded after the action: whatever it is, the record is written
        # (what `--actor TEXT` hands the catalog)
        saved, fleet.catalog.actor = fleet.catalog.actor, default_actor(text)
        try:
            fleet.catalog.audit("test.actor", tenant=exportable, marker=text.isprintable())
        finally:
            fleet.catalog.actor = saved
        with fleet.catalog.session() as s:
            last = s.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1)).one()
        assert last.action == "test.actor" and last.actor.isprintable()
        if text.strip() and text.isprintable():
            assert last.actor == text

    attack()


def test_bytes_that_are_not_utf8_on_the_command_line(fleet: Fleet, test_fleet: PgFleet,
                                                     exportable: str) -> None:
    from orchestrator.adapters.catalog.models import AuditEvent

    # argv byte 0xff reaches Python as '\udcff'
    proc = run_cli(test_fleet, "tenant", "legal-hold", exportable, "--on", "--reason",
                   "case \udcff")
    clean_cli_failure(proc, 2, "--reason")
    assert not fleet.get_tenant(exportable).legal_hold
    proc = run_cli(test_fleet, "--actor", "ops-\udcff", "tenant", "legal-hold", exportable,
                   "--on", "--reason", "case 7")
    try:
        assert proc.returncode == 0, proc.stderr
        with fleet.catalog.session() as s:
            last = s.scalars(select(AuditEvent).where(AuditEvent.tenant == exportable)
                             .order_by(AuditEvent.id.desc()).limit(1)).one()
        assert (last.action, last.actor) == ("tenant.legal_hold.on", "ops-\\udcff")
    finally:
        lifecycle.legal_hold(fleet, exportable, on=False, reason="test over")


# -- the CLI: one line, exit code, nothing changed ---------------------------------------------


def test_cli_refuses_hostile_input_in_one_line(fleet: Fleet, test_fleet: PgFleet,
                                               exportable: str, slug: str,
                                               tmp_path: Path) -> None:
    known = catalog_slugs(fleet)
    before = everything_on_servers(test_fleet)
    grants = access.grants(fleet, include_ended=True)
    cases: list[tuple[list[str], int, str]] = [
        (["tenant", "create", "acme\n", "--region", "eu-central"], 2, "invalid slug"),
        (["tenant", "create", "acme\n; DROP DATABASE tenantctl_catalog", "--region",
          "eu-central"], 2, "invalid slug"),
        (["tenant", "create", slug, "--region", "eu-central\n"], 2, "unknown region"),
        (["tenant", "create", slug, "--region", "eu-central'; --"], 2, "unknown region"),
        (["tenant", "export", exportable, "--format", "csv", "--output", str(tmp_path),
          "--force"], 2, "is a directory"),
        (["tenant", "export", exportable, "--format", "sql\n", "--output",
          str(tmp_path / "x.sql")], 2, "is not one of 'sql', 'csv'"),
        (["audit", "list", "--since", "99999999d"], 2, "--since"),
        (["audit", "list", "--since", "0001-01-01T00:00:00+01:00"], 2, "--since"),
        (["access", "grant", exportable, "--to", "sam", "--ttl", "99999999999999999999d",
          "--reason", "r"], 2, "--ttl"),
        (["retention", "run", "--dry-run", "--now", "0001-01-01T00:00:00+01:00"], 2,
         "--now"),
    ]
    for args, code, needle in cases:
        clean_cli_failure(run_cli(test_fleet, *args), code, needle)
    assert everything_on_servers(test_fleet) == before
    assert catalog_slugs(fleet) == known
    assert list(tmp_path.iterdir()) == []
    assert access.grants(fleet, include_ended=True) == grants


def test_user_text_is_printed_never_interpreted(fleet: Fleet, test_fleet: PgFleet,
                                                exportable: str, tmp_path: Path) -> None:
    """Output lines and tables show what the operator typed as it is: text that looks
    like terminal markup is neither a crash after the work is done nor a style."""
    target = tmp_path / "[bold]out[red].sql"
    proc = run_cli(test_fleet, "tenant", "export", exportable, "--format", "sql",
                   "--output", str(target))
    assert proc.returncode == 0, proc.stderr
    assert squeeze(str(target)) in squeeze(proc.stdout) and target.stat().st_size > 0
    # a file name that is not UTF-8 (byte 0xff): written, reported, audited
    odd = tmp_path / "out-\udcff.sql"
    proc = subprocess.run(
        [*TENANTCTL, "--config", str(test_fleet.config_path), "tenant", "export", exportable,
         "--format", "sql", "--output", str(odd)], capture_output=True, text=True,
        errors="surrogateescape", cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert odd.stat().st_size > 0 and str(odd) in squeeze(proc.stdout)
    reason = "[/x] case [bold]42"
    proc = run_cli(test_fleet, "tenant", "legal-hold", exportable, "--on", "--reason", reason)
    try:
        assert proc.returncode == 0, proc.stderr
        assert squeeze(reason) in squeeze(proc.stdout)
        listed = run_cli(test_fleet, "audit", "list", "--tenant", exportable,
                         "--action", "tenant.legal")
        assert listed.returncode == 0, listed.stderr
        assert "[/x]" in listed.stdout and "[bold]" in listed.stdout
    finally:
        lifecycle.legal_hold(fleet, exportable, on=False, reason="test over")


def test_unparseable_option_values_are_one_line_errors(test_fleet: PgFleet) -> None:
    for args in (["backup", "restore", "abc", "--as", "x_copy"],
                 ["backup", "run", "--all", "--concurrency", "many"]):
        clean_cli_failure(run_cli(test_fleet, *args), 2)
