"""tenantctl.toml: loading and validation.

The file is found via ``--config``, ``$TENANTCTL_CONFIG`` or ``./tenantctl.toml``.
Every error names the file, the key and what is wrong, in one line.
Relative paths in the file are resolved against the file's own directory, so a
config keeps working whatever the operator's current directory is.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict

from orchestrator.domain.bounds import TenantBounds
from orchestrator.domain.durations import BadDuration, parse_pg_duration
from orchestrator.domain.errors import ConfigError

CONFIG_ENV = "TENANTCTL_CONFIG"
DEFAULT_CONFIG_NAME = "tenantctl.toml"
BUILTIN_MIGRATIONS = "builtin"

# always fullmatch: `$` would let a trailing newline through
_REGION_RE = re.compile(r"[a-z][a-z0-9-]{1,39}", re.ASCII)
_SERVER_RE = re.compile(r"[a-z][a-z0-9_-]{1,62}", re.ASCII)


@dataclass(frozen=True)
class ServerConfig:
    name: str
    region: str
    admin_dsn: str
    capacity: int
    # Set only for servers that `tenantctl local` manages (embedded clusters).
    data_dir: Path | None = None
    port: int | None = None


@dataclass(frozen=True)
class RegionConfig:
    name: str
    backup_store: str
    servers: tuple[ServerConfig, ...]


@dataclass(frozen=True)
class MasterKeySource:
    """Exactly one of: a key file, an environment variable, or an AWS KMS key whose
    encrypted data key sits in ``kms_data_key_file`` (envelope encryption: the
    master key exists in clear only in this process's memory)."""

    file: Path | None = None
    env: str | None = None
    kms_key_id: str | None = None
    kms_data_key_file: Path | None = None
    kms_region: str | None = None
    kms_endpoint_url: str | None = None


# Periods (days, hours, weeks, minutes) are at most a century: dates computed from
# them (a hold's end, a purge date) must stay representable, whatever --now says
# within clock.NOW_RANGE.
MAX_DAYS = 36500


@dataclass(frozen=True)
class LifecycleConfig:
    """The promises of the privacy policy, in days."""

    hold_days: int = 30  # exportable, read-only, after cancellation
    purge_days: int = 90  # backups kept after deletion
    audit_days: int = 365  # audit records kept


_SIZE_RE = re.compile(r"(-1|[1-9][0-9]{0,8}(kB|MB|GB|TB))", re.ASCII)
_UNITS = {"kB": 1, "MB": 1024, "GB": 1024**2, "TB": 1024**3}


MIB = 1 << 20
# S3's own limits: every part but the last at least 5 MiB, at most 5 GiB
S3_MIN_PART_SIZE = 5 * MIB
S3_MAX_PART_SIZE = 5 * 1024 * MIB
# the classes an object can be read back from at once (verify, restore-test and restore
# read every backup; GLACIER and DEEP_ARCHIVE would need a restore request first)
S3_STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
                      "GLACIER_IR", "REDUCED_REDUNDANCY")
S3_SSE = ("AES256", "aws:kms")
_BYTES_RE = re.compile(r"([1-9][0-9]{0,6})\s*(KiB|MiB|GiB)", re.ASCII)
_BYTE_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_S3_UPLOAD_KEYS = {"s3_part_size", "s3_max_concurrency", "s3_storage_class", "s3_sse",
                   "s3_sse_kms_key_id"}


@dataclass(frozen=True)
class S3UploadConfig:
    """How backups are written to s3:// stores ([backups] s3_*): boto3's managed
    transfer, parts of ``part_size`` (raised automatically for a big database so
    a dump stays under S3's 10,000 parts), ``max_concurrency`` parts in flight
    (memory is about part_size x (max_concurrency + 2)), and the storage class and
    server-side encryption every object is written with."""

    part_size: int = 8 * MIB
    max_concurrency: int = 4
    storage_class: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    """How often `tenantctl scheduler run` runs each job, in minutes."""

    backups_minutes: int = 15
    retention_minutes: int = 10
    prune_minutes: int = 60
    audit_purge_minutes: int = 1440


@dataclass(frozen=True)
class Config:
    path: Path
    catalog_dsn: str
    master_key: MasterKeySource
    regions: dict[str, RegionConfig]
    tenant_migrations: Path
    use_template: bool = True
    spare_databases: int = 0
    # how long tenantctl waits for a lock on a tenant's objects (a backup's dump and
    # row counts, an export, grants) before that tenant's step fails, in seconds: a
    # tenant's transaction holding a lock must not hang a command or a fleet run
    lock_wait_seconds: int = 5
    backup_interval_hours: int = 24
    backup_keep_days: int = 7
    backup_keep_weeks: int = 4
    lifecycle: LifecycleConfig = LifecycleConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    s3: S3UploadConfig = S3UploadConfig()
    bounds: TenantBounds = TenantBounds()
    state_dir: Path | None = None
    pg_bin_dir: Path | None = None

    @property
    def servers(self) -> list[ServerConfig]:
        return [s for r in self.regions.values() for s in r.servers]

    def server(self, name: str) -> ServerConfig:
        for s in self.servers:
            if s.name == name:
                return s
        raise ConfigError(f"{self.path}: no server named {name!r}")

    def region(self, name: str) -> RegionConfig:
        try:
            return self.regions[name]
        except KeyError:
            known = ", ".join(sorted(self.regions)) or "none"
            raise ConfigError(f"unknown region {name!r} (known: {known})") from None

    @property
    def lock_timeout(self) -> str:
        """lock_wait_seconds as a Postgres duration (SET lock_timeout, pg_dump
        --lock-wait-timeout)."""
        return f"{self.lock_wait_seconds}s"


def builtin_migrations_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "migrations" / "tenant"


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return Path.cwd() / DEFAULT_CONFIG_NAME


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    path = find_config_path(explicit)
    if not path.exists():
        raise ConfigError(
            f"{path}: config file not found (run `tenantctl init --local`, "
            f"or pass --config / set ${CONFIG_ENV})"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} cannot be read)"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(raw, path.resolve())


class _Reader:
    """Typed access to the raw TOML with errors that name file and key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}")

    def table(self, raw: dict[str, Any], key: str, name: str, *, required: bool = True
              ) -> dict[str, Any]:
        value = raw.get(name)
        if value is None:
            if required:
                raise self.fail(key, "missing table")
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {type(value).__name__}")
        return value

    def string(self, raw: dict[str, Any], key: str, name: str, *, required: bool = True
               ) -> str | None:
        value = raw.get(name)
        if value is None:
            if required:
                raise self.fail(key, "missing")
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "must be a non-empty string")
        return value

    def integer(self, raw: dict[str, Any], key: str, name: str, *, default: int | None = None,
                minimum: int = 1, maximum: int | None = None) -> int:
        value = raw.get(name, default)
        if value is None:
            raise self.fail(key, "missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {value!r}")
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be at most {maximum}, got {value}")
        return value

    def boolean(self, raw: dict[str, Any], key: str, name: str, default: bool) -> bool:
        value = raw.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()


def _check_unknown(r: _Reader, raw: dict[str, Any], prefix: str, allowed: set[str]) -> None:
    for k in raw:
        if k not in allowed:
            where = f"{prefix}.{k}" if prefix else k
            raise r.fail(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")


def _check_dsn(r: _Reader, key: str, dsn: str) -> None:
    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        raise r.fail(key, "not a valid libpq connection string or postgresql:// URL") from None
    if params.get("password"):
        raise r.fail(
            key,
            "must not contain a password; use passfile=PATH or the PGPASSWORD environment",
        )


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", re.ASCII)
_S3_OPTIONS = {"endpoint_url", "region"}


def _store_location(r: _Reader, key: str, url: str) -> tuple[str, ...]:
    """Where a backup store keeps its objects — (file, dirs…) or (s3, endpoint, bucket,
    prefix parts…) — refusing any URL that is not plainly one directory or one
    bucket prefix (a store opens exactly where the URL says, or not at all)."""
    if not url.startswith(("file://", "s3://")):
        raise r.fail(key, "must be a file:// or s3:// URL")
    parsed = urlparse(url)
    parts = parsed.path.strip("/").split("/") if parsed.path.strip("/") else []
    if not url.isprintable() or parsed.params or parsed.fragment or \
            any(p in ("", ".", "..") for p in parts):
        raise r.fail(key, "the path must be plain: no '.', '..' or empty segments, "
                     "no ';', '#' or control characters")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or parsed.query:
            raise r.fail(key, "use file:///absolute/path (no host, no options)")
        return ("file", *parts)
    if not _BUCKET_RE.fullmatch(parsed.netloc):
        raise r.fail(key, "s3://BUCKET/prefix needs a bucket name (and no credentials: "
                     "they come from the AWS environment)")
    options = parse_qs(parsed.query, keep_blank_values=True)
    unknown = sorted(set(options) - _S3_OPTIONS)
    if unknown:
        raise r.fail(key, f"unknown option(s) {', '.join(unknown)} (known: endpoint_url, "
                     "region)")
    return ("s3", options.get("endpoint_url", [""])[-1], parsed.netloc, *parts)


def _bounds(r: _Reader, tenants: dict[str, Any]) -> TenantBounds:
    d = TenantBounds()
    values: dict[str, Any] = {}
    for name in ("connection_limit", "support_connection_limit"):
        values[name] = r.integer(tenants, f"tenants.{name}", name,
                                 default=getattr(d, name))
        if values[name] > 10000:
            raise r.fail(f"tenants.{name}", "at most 10000 connections")
    for name in ("statement_timeout", "idle_in_transaction_session_timeout"):
        value = tenants.get(name, getattr(d, name))
        if not isinstance(value, str):
            raise r.fail(f"tenants.{name}", "must be a string like '5min' (ms, s, min, h, "
                         f"d; 0: none), got {value!r}")
        try:  # the one duration grammar, in Postgres's spelling (stored as it is)
            values[name] = parse_pg_duration(value, f"tenants.{name}")
        except BadDuration as exc:
            raise r.fail(f"tenants.{name}", f"{value!r}: {exc.why}") from None
    for name, pattern, example in (
            ("temp_file_limit", _SIZE_RE, "'1GB' (kB, MB, GB, TB; -1: none)"),
            ("work_mem", _SIZE_RE, "'16MB' (kB, MB, GB, TB)")):
        value = tenants.get(name, getattr(d, name))
        m = pattern.fullmatch(value) if isinstance(value, str) else None
        if m is None or (name == "work_mem" and value == "-1"):
            raise r.fail(f"tenants.{name}", f"must be a string like {example}, got {value!r}")
        # in the setting's base unit (kB): Postgres's own range for these
        base = int(value.removesuffix(m.group(2) or "")) * _UNITS.get(m.group(2) or "", 1)
        if base > 2147483647 or (name == "work_mem" and base < 64):
            raise r.fail(f"tenants.{name}", f"{value!r} is out of Postgres's range for it")
        values[name] = value
    return TenantBounds(**values)


def _s3_upload(r: _Reader, backups: dict[str, Any]) -> S3UploadConfig:
    d = S3UploadConfig()
    part = backups.get("s3_part_size", f"{d.part_size // MIB}MiB")
    m = _BYTES_RE.fullmatch(part) if isinstance(part, str) else None
    if m is None:
        raise r.fail("backups.s3_part_size", f"must be a size like '64MiB' (KiB, MiB, GiB), "
                     f"got {part!r}")
    part_size = int(m.group(1)) * _BYTE_UNITS[m.group(2)]
    if not S3_MIN_PART_SIZE <= part_size <= S3_MAX_PART_SIZE:
        raise r.fail("backups.s3_part_size", f"{part!r} is outside S3's part sizes "
                     "(5MiB to 5GiB)")
    concurrency = r.integer(backups, "backups.s3_max_concurrency", "s3_max_concurrency",
                            default=d.max_concurrency, maximum=64)
    storage_class = r.string(backups, "backups.s3_storage_class", "s3_storage_class",
                             required=False)
    if storage_class is not None and storage_class not in S3_STORAGE_CLASSES:
        raise r.fail("backups.s3_storage_class", f"{storage_class!r} is not one of "
                     f"{', '.join(S3_STORAGE_CLASSES)} (backups must be readable at once)")
    sse = r.string(backups, "backups.s3_sse", "s3_sse", required=False)
    if sse is not None and sse not in S3_SSE:
        raise r.fail("backups.s3_sse", f"must be AES256 or aws:kms, got {sse!r}")
    kms_key = r.string(backups, "backups.s3_sse_kms_key_id", "s3_sse_kms_key_id",
                       required=False)
    if kms_key is not None and sse != "aws:kms":
        raise r.fail("backups.s3_sse_kms_key_id", 'needs s3_sse = "aws:kms"')
    return S3UploadConfig(part_size=part_size, max_concurrency=concurrency,
                          storage_class=storage_class, sse=sse, sse_kms_key_id=kms_key)


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    r = _Reader(path)
    _check_unknown(r, raw, "", {"state_dir", "pg_bin_dir", "catalog", "master_key",
                                "tenants", "regions", "backups", "lifecycle",
                                "scheduler"})

    catalog = r.table(raw, "catalog", "catalog")
    _check_unknown(r, catalog, "catalog", {"dsn"})
    catalog_dsn = r.string(catalog, "catalog.dsn", "dsn")
    assert catalog_dsn is not None
    _check_dsn(r, "catalog.dsn", catalog_dsn)

    mk = r.table(raw, "master_key", "master_key")
    if "key" in mk or "value" in mk:
        raise r.fail("master_key", "the key itself never goes in the config")
    _check_unknown(r, mk, "master_key", {"file", "env", "kms_key_id", "kms_data_key_file",
                                         "kms_region", "kms_endpoint_url"})
    mk_file = r.string(mk, "master_key.file", "file", required=False)
    mk_env = r.string(mk, "master_key.env", "env", required=False)
    kms = r.string(mk, "master_key.kms_key_id", "kms_key_id", required=False)
    if sum(map(bool, (mk_file, mk_env, kms))) != 1:
        raise r.fail("master_key", "set exactly one of `file`, `env` or `kms_key_id`")
    kms_blob = r.string(mk, "master_key.kms_data_key_file", "kms_data_key_file",
                        required=bool(kms))
    master_key = MasterKeySource(
        file=r.resolve(mk_file) if mk_file else None, env=mk_env, kms_key_id=kms,
        kms_data_key_file=r.resolve(kms_blob) if kms_blob else None,
        kms_region=r.string(mk, "master_key.kms_region", "kms_region", required=False),
        kms_endpoint_url=r.string(mk, "master_key.kms_endpoint_url", "kms_endpoint_url",
                                  required=False))

    tenants = r.table(raw, "tenants", "tenants", required=False)
    _check_unknown(r, tenants, "tenants", {"migrations", "use_template", "spare_databases",
                                           "lock_wait_seconds",
                                           *(f.name for f in dataclasses.fields(TenantBounds))})
    migrations = r.string(tenants, "tenants.migrations", "migrations", required=False)
    if migrations in (None, BUILTIN_MIGRATIONS):
        migrations_dir = builtin_migrations_dir()
    else:
        assert migrations is not None
        migrations_dir = r.resolve(migrations)
        if not (migrations_dir / "env.py").is_file():
            raise r.fail("tenants.migrations",
                         f"{migrations_dir} is not an Alembic script directory (no env.py)")
    use_template = r.boolean(tenants, "tenants.use_template", "use_template", True)
    spare_databases = r.integer(tenants, "tenants.spare_databases", "spare_databases",
                                default=0, minimum=0)
    if spare_databases > 100:
        raise r.fail("tenants.spare_databases", "at most 100 spares per server")
    lock_wait_seconds = r.integer(tenants, "tenants.lock_wait_seconds", "lock_wait_seconds",
                                  default=5)
    if lock_wait_seconds > 3600:
        raise r.fail("tenants.lock_wait_seconds", "at most 3600 (an hour)")

    bounds = _bounds(r, tenants)

    backups = r.table(raw, "backups", "backups", required=False)
    _check_unknown(r, backups, "backups", {"interval_hours", "keep_days", "keep_weeks",
                                           *_S3_UPLOAD_KEYS})
    interval_hours = r.integer(backups, "backups.interval_hours", "interval_hours", default=24,
                               maximum=MAX_DAYS * 24)
    keep_days = r.integer(backups, "backups.keep_days", "keep_days", default=7,
                          maximum=MAX_DAYS)
    keep_weeks = r.integer(backups, "backups.keep_weeks", "keep_weeks", default=4, minimum=0,
                           maximum=MAX_DAYS // 7)

    s3_upload = _s3_upload(r, backups)

    lc = r.table(raw, "lifecycle", "lifecycle", required=False)
    _check_unknown(r, lc, "lifecycle", {"hold_days", "purge_days", "audit_days"})
    lifecycle = LifecycleConfig(
        hold_days=r.integer(lc, "lifecycle.hold_days", "hold_days", default=30,
                            maximum=MAX_DAYS),
        purge_days=r.integer(lc, "lifecycle.purge_days", "purge_days", default=90,
                             maximum=MAX_DAYS),
        audit_days=r.integer(lc, "lifecycle.audit_days", "audit_days", default=365,
                             maximum=MAX_DAYS))
    sch = r.table(raw, "scheduler", "scheduler", required=False)
    jobs = {f.name: f.default for f in dataclasses.fields(SchedulerConfig)}
    _check_unknown(r, sch, "scheduler", set(jobs))
    scheduler = SchedulerConfig(**{
        name: r.integer(sch, f"scheduler.{name}", name, default=int(default),  # type: ignore[arg-type]
                        maximum=MAX_DAYS * 24 * 60)
        for name, default in jobs.items()})

    regions_raw = r.table(raw, "regions", "regions")
    if not regions_raw:
        raise r.fail("regions", "at least one region is required")
    regions: dict[str, RegionConfig] = {}
    seen_servers: set[str] = set()
    store_locations: dict[str, tuple[str, ...]] = {}
    for rname, rraw in regions_raw.items():
        key = f"regions.{rname}"
        if not _REGION_RE.fullmatch(rname):
            raise r.fail(key, "region names are lower-case letters, digits and '-'")
        if not isinstance(rraw, dict):
            raise r.fail(key, "must be a table")
        _check_unknown(r, rraw, key, {"backup_store", "servers"})
        store = r.string(rraw, f"{key}.backup_store", "backup_store")
        assert store is not None
        where = _store_location(r, f"{key}.backup_store", store)
        for other, other_where in store_locations.items():
            shorter = min(len(where), len(other_where))
            if where[:shorter] == other_where[:shorter]:
                raise r.fail(f"{key}.backup_store", f"overlaps the store of region {other}: "
                             "each region needs a store of its own")
        store_locations[rname] = where
        servers_raw = rraw.get("servers")
        if not isinstance(servers_raw, list) or not servers_raw:
            raise r.fail(f"{key}.servers", "at least one [[servers]] entry is required")
        servers: list[ServerConfig] = []
        for i, sraw in enumerate(servers_raw):
            skey = f"{key}.servers[{i}]"
            if not isinstance(sraw, dict):
                raise r.fail(skey, "must be a table")
            _check_unknown(r, sraw, skey, {"name", "admin_dsn", "capacity", "data_dir", "port"})
            sname = r.string(sraw, f"{skey}.name", "name")
            assert sname is not None
            if not _SERVER_RE.fullmatch(sname):
                raise r.fail(f"{skey}.name", "lower-case letters, digits, '-' and '_' only")
            if sname in seen_servers:
                raise r.fail(f"{skey}.name", f"server {sname!r} is defined twice")
            seen_servers.add(sname)
            dsn = r.string(sraw, f"{skey}.admin_dsn", "admin_dsn")
            assert dsn is not None
            _check_dsn(r, f"{skey}.admin_dsn", dsn)
            capacity = r.integer(sraw, f"{skey}.capacity", "capacity", default=500)
            data_dir = r.string(sraw, f"{skey}.data_dir", "data_dir", required=False)
            port = sraw.get("port")
            if data_dir is not None:
                port = r.integer(sraw, f"{skey}.port", "port", minimum=1024)
            servers.append(ServerConfig(
                name=sname, region=rname, admin_dsn=dsn, capacity=capacity,
                data_dir=r.resolve(data_dir) if data_dir else None, port=port,
            ))
        regions[rname] = RegionConfig(name=rname, backup_store=store, servers=tuple(servers))

    state_dir = r.string(raw, "state_dir", "state_dir", required=False)
    pg_bin_dir = r.string(raw, "pg_bin_dir", "pg_bin_dir", required=False)
    return Config(
        path=path,
        catalog_dsn=catalog_dsn,
        master_key=master_key,
        regions=regions,
        tenant_migrations=migrations_dir,
        use_template=use_template,
        spare_databases=spare_databases,
        lock_wait_seconds=lock_wait_seconds,
        backup_interval_hours=interval_hours,
        backup_keep_days=keep_days,
        backup_keep_weeks=keep_weeks,
        lifecycle=lifecycle,
        scheduler=scheduler,
        s3=s3_upload,
        bounds=bounds,
        state_dir=r.resolve(state_dir) if state_dir else None,
        pg_bin_dir=r.resolve(pg_bin_dir) if pg_bin_dir else None,
    )
