"""tenantctl.toml: loading and validation.

The file is found (`lookup_config_path`, pure) via ``--config``, then
``$TENANTCTL_CONFIG``, then the first that exists of ``./tenantctl.toml``,
``$XDG_CONFIG_HOME/tenantctl/tenantctl.toml`` (default ``~/.config``) and
``/etc/tenantctl/tenantctl.toml``. Secrets and DSNs can come from the environment
instead (`env_overrides`). Every error names the file, the key and what is wrong, in one line.
Relative paths in the file are resolved against the file's own directory, so a
config keeps working whatever the operator's current directory is.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict

from orchestrator.domain.bounds import DEFAULT_PLAN, Plan, TenantBounds
from orchestrator.domain.budget import AUTO, DEFAULT_RESERVE
from orchestrator.domain.durations import BadDuration, parse_pg_duration
from orchestrator.domain.errors import ConfigError, InvalidInput
from orchestrator.domain.pooler import POOLERS
from orchestrator.domain.quota import DEFAULT_WARNING, check_warning

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
    # the connections kept out of the tenants' budget for tenantctl and superusers, and
    # the budget: N (at most max_connections - reserve), "auto" (exactly that), or None:
    # shown but not enforced (domain/budget.py)
    connection_reserve: int = DEFAULT_RESERVE
    connection_budget: int | str | None = None
    # a pooler in front of the server (pooler = "pgbouncer"): tenants then cost their
    # plan's pool size too
    pooler: PoolerConfig | None = None


@dataclass(frozen=True)
class PoolerConfig:
    """A connection pooler in front of one server (``pooler = "pgbouncer"`` and the
    ``pooler_*`` keys of its [[servers]] entry): where clients (and tenantctl's
    admin console session) reach it, the directory tenantctl writes its database
    list and auth file into (PgBouncer's ini includes them), and the admin console
    login (its password in a file of its own, never in the config)."""

    kind: str
    host: str
    port: int
    dir: Path
    admin_user: str = "tenantctl_pooler"
    admin_password_file: Path | None = None


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
    usage_minutes: int = 60


@dataclass(frozen=True)
class UsageConfig:
    """Usage metering ([usage]): how long samples are kept, how long a server's one
    usage query may run, and what the metrics endpoint shows of it (the top
    ``top`` tenants of each server; every tenant only with ``per_tenant_metrics``)."""

    keep_days: int = 400
    statement_timeout: str = "30s"
    top: int = 5
    per_tenant_metrics: bool = False
    # the share of a plan's storage_quota at which a tenant is warned about (show,
    # report, metrics); past the whole quota its writes are revoked
    quota_warning: float = DEFAULT_WARNING


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
    usage: UsageConfig = UsageConfig()
    bounds: TenantBounds = TenantBounds()
    # [plans.NAME], always with "default" (see _plans); new tenants get default_plan
    plans: dict[str, Plan] = dataclasses.field(
        default_factory=lambda: {DEFAULT_PLAN: Plan(DEFAULT_PLAN)})
    default_plan: str = DEFAULT_PLAN
    state_dir: Path | None = None
    pg_bin_dir: Path | None = None
    # how the file was found (for `config check`) and which keys the environment set
    lookup: ConfigLookup | None = None
    from_env: tuple[EnvOverride, ...] = ()

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

    def plan(self, name: str) -> Plan:
        """The plan called ``name``; an unknown one: a one-line error."""
        try:
            return self.plans[name]
        except KeyError:
            raise InvalidInput(f"unknown plan {name!r} (plans: "
                               f"{', '.join(sorted(self.plans))})") from None

    @property
    def lock_timeout(self) -> str:
        """lock_wait_seconds as a Postgres duration (SET lock_timeout, pg_dump
        --lock-wait-timeout)."""
        return f"{self.lock_wait_seconds}s"


def builtin_migrations_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "migrations" / "tenant"


# where the file is looked for, in order, after --config and $TENANTCTL_CONFIG
SYSTEM_CONFIG = Path("/etc/tenantctl") / DEFAULT_CONFIG_NAME


@dataclass(frozen=True)
class ConfigLookup:
    """The outcome of the config lookup: the path chosen (None: none exists), what
    chose it (a key of LOOKUP_SOURCES) and every candidate looked at, in order."""

    path: Path | None
    source: str
    tried: tuple[Path, ...]

    @property
    def described(self) -> str:
        return LOOKUP_SOURCES[self.source]


LOOKUP_SOURCES = {"flag": "--config", "env": f"${CONFIG_ENV}",
                  "cwd": "the current directory",
                  "xdg": "the user's config directory ($XDG_CONFIG_HOME, else ~/.config)",
                  "system": "the system's config directory (/etc/tenantctl)",
                  "none": "nothing (no file found)"}


def xdg_config_home(env: Mapping[str, str]) -> Path | None:
    """$XDG_CONFIG_HOME, else ~/.config; a relative XDG_CONFIG_HOME is ignored, as the
    XDG spec says."""
    xdg = env.get("XDG_CONFIG_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg)
    home = env.get("HOME", "")
    return Path(home) / ".config" if home else None


def lookup_config_path(flag: str | os.PathLike[str] | None, env: Mapping[str, str],
                       cwd: Path, exists: Callable[[Path], bool]) -> ConfigLookup:
    """Pure: ``--config`` → ``$TENANTCTL_CONFIG`` (either is taken as given, existing
    or not) → the first existing of ./tenantctl.toml, the XDG one and the system
    one."""
    if flag:
        return ConfigLookup(Path(flag), "flag", (Path(flag),))
    if env.get(CONFIG_ENV):
        return ConfigLookup(Path(env[CONFIG_ENV]), "env", (Path(env[CONFIG_ENV]),))
    candidates = [("cwd", cwd / DEFAULT_CONFIG_NAME)]
    xdg = xdg_config_home(env)
    if xdg is not None:
        candidates.append(("xdg", xdg / "tenantctl" / DEFAULT_CONFIG_NAME))
    candidates.append(("system", SYSTEM_CONFIG))
    tried = tuple(path for _, path in candidates)
    for source, path in candidates:
        if exists(path):
            return ConfigLookup(path, source, tried)
    return ConfigLookup(None, "none", tried)


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where `init --local` and `quickstart` write (and then read) a config:
    --config, $TENANTCTL_CONFIG, else ./tenantctl.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return Path.cwd() / DEFAULT_CONFIG_NAME


def _present(path: Path) -> bool:
    """Exists, or cannot be looked at (e.g. /etc/tenantctl is root's only): chosen,
    so that reading it says why it cannot be read."""
    try:
        return path.exists()
    except OSError:
        return True


def _not_found(lookup: ConfigLookup) -> ConfigError:
    if lookup.path is not None:  # named by --config or $TENANTCTL_CONFIG
        return ConfigError(f"{lookup.path}: config file not found (named by "
                           f"{lookup.described})")
    return ConfigError(
        "config file not found (looked in: " + ", ".join(map(str, lookup.tried))
        + f"); run `tenantctl init --local`, or pass --config / set ${CONFIG_ENV}")


def load_config(explicit: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    lookup = lookup_config_path(explicit, env, Path.cwd(), _present)
    path = lookup.path
    if path is None or not _present(path):
        raise _not_found(lookup)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} cannot be read)"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    overrides = env_overrides(env)
    cfg = parse_config(raw, path.resolve(), overrides)
    named = {s.name.upper().replace("-", "_"): s.name for s in cfg.servers}
    placed = tuple(o if o.server is None else dataclasses.replace(
        o, key=f"servers.{named[o.server]}.admin_dsn") for o in overrides)
    return dataclasses.replace(cfg, lookup=lookup, from_env=placed)


# -- environment overrides -----------------------------------------------------------
#
#   TENANTCTL_CATALOG_DSN              catalog.dsn
#   TENANTCTL_MASTER_KEY_FILE          master_key.file (replaces env / kms_key_id)
#   TENANTCTL_SERVER_<NAME>_ADMIN_DSN  regions.*.servers[name=NAME].admin_dsn, where
#                                      <NAME> is the server's name upper-cased with
#                                      '-' as '_' (eu-central-1: EU_CENTRAL_1)
#
# A DSN from the environment may carry a password (the environment is where secrets
# go); the file's may not. Nothing prints one: `config check` names the variable and
# shows the DSN redacted.

ENV_PREFIX = "TENANTCTL_"
CATALOG_DSN_ENV = "TENANTCTL_CATALOG_DSN"
MASTER_KEY_FILE_ENV = "TENANTCTL_MASTER_KEY_FILE"
_SERVER_DSN_ENV = re.compile(r"TENANTCTL_SERVER_([A-Z0-9_]+)_ADMIN_DSN", re.ASCII)


@dataclass(frozen=True)
class EnvOverride:
    variable: str  # TENANTCTL_CATALOG_DSN
    key: str  # catalog.dsn, master_key.file, servers.NAME.admin_dsn
    value: str  # never printed: may hold a password
    server: str | None = None  # the upper-cased server name of a server's admin_dsn


def server_env_name(server: str) -> str:
    return f"TENANTCTL_SERVER_{server.upper().replace('-', '_')}_ADMIN_DSN"


def env_overrides(env: Mapping[str, str]) -> list[EnvOverride]:
    """The overrides set in ``env`` (an empty value counts as unset), sorted by
    variable."""
    out = []
    for var in sorted(env):
        value = env[var]
        if not var.startswith(ENV_PREFIX) or not value:
            continue
        if var == CATALOG_DSN_ENV:
            out.append(EnvOverride(var, "catalog.dsn", value))
        elif var == MASTER_KEY_FILE_ENV:
            out.append(EnvOverride(var, "master_key.file", value))
        elif (m := _SERVER_DSN_ENV.fullmatch(var)) is not None:
            out.append(EnvOverride(var, "admin_dsn", value, server=m.group(1)))
    return out


def _check_env_dsn(var: str, dsn: str) -> None:
    try:
        conninfo_to_dict(dsn)
    except ProgrammingError:  # its message could quote the DSN: never shown
        raise ConfigError(f"${var}: not a valid libpq connection string or "
                          "postgresql:// URL") from None


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


def _bounds(r: _Reader, tenants: dict[str, Any], where: str = "tenants",
            d: TenantBounds | None = None) -> TenantBounds:
    """The bounds in table ``where`` (keys it leaves out: ``d``'s, else the defaults)."""
    d = d or TenantBounds()
    values: dict[str, Any] = {}
    for name in ("connection_limit", "support_connection_limit"):
        values[name] = r.integer(tenants, f"{where}.{name}", name,
                                 default=getattr(d, name))
        if values[name] > 10000:
            raise r.fail(f"{where}.{name}", "at most 10000 connections")
    for name in ("statement_timeout", "idle_in_transaction_session_timeout"):
        value = tenants.get(name, getattr(d, name))
        if not isinstance(value, str):
            raise r.fail(f"{where}.{name}", "must be a string like '5min' (ms, s, min, h, "
                         f"d; 0: none), got {value!r}")
        try:  # the one duration grammar, in Postgres's spelling (stored as it is)
            values[name] = parse_pg_duration(value, f"{where}.{name}")
        except BadDuration as exc:
            raise r.fail(f"{where}.{name}", f"{value!r}: {exc.why}") from None
    for name, pattern, example in (
            ("temp_file_limit", _SIZE_RE, "'1GB' (kB, MB, GB, TB; -1: none)"),
            ("work_mem", _SIZE_RE, "'16MB' (kB, MB, GB, TB)")):
        value = tenants.get(name, getattr(d, name))
        m = pattern.fullmatch(value) if isinstance(value, str) else None
        if m is None or (name == "work_mem" and value == "-1"):
            raise r.fail(f"{where}.{name}", f"must be a string like {example}, got {value!r}")
        # in the setting's base unit (kB): Postgres's own range for these
        base = int(value.removesuffix(m.group(2) or "")) * _UNITS.get(m.group(2) or "", 1)
        if base > 2147483647 or (name == "work_mem" and base < 64):
            raise r.fail(f"{where}.{name}", f"{value!r} is out of Postgres's range for it")
        values[name] = value
    return TenantBounds(**values)


_PLAN_RE = re.compile(r"[a-z][a-z0-9_-]{0,39}", re.ASCII)
_PLAN_BOUNDS = ("connection_limit", "statement_timeout",
                "idle_in_transaction_session_timeout", "temp_file_limit", "work_mem")
_QUOTA_RE = re.compile(r"([1-9][0-9]{0,5})(kB|MB|GB|TB)", re.ASCII)


def _plans(r: _Reader, raw: dict[str, Any], tenants: dict[str, Any],
           bounds: TenantBounds) -> tuple[dict[str, Plan], str]:
    """[plans.NAME] and [tenants] default_plan. The implicit plan "default" is
    [tenants]' bounds; the keys a plan leaves out are [tenants]' (so are "default"'s,
    when it is written out)."""
    table = r.table(raw, "plans", "plans", required=False)
    plans = {DEFAULT_PLAN: Plan(DEFAULT_PLAN, bounds)}
    for name, praw in table.items():
        key = f"plans.{name}"
        if not _PLAN_RE.fullmatch(name):
            raise r.fail(key, "plan names are lower-case letters, digits, '-' and '_' "
                         "(at most 40)")
        if not isinstance(praw, dict):
            raise r.fail(key, "must be a table")
        _check_unknown(r, praw, key, {*_PLAN_BOUNDS, "storage_quota", "pool_size"})
        quota = praw.get("storage_quota")
        quota_bytes = None
        if quota is not None:
            m = _QUOTA_RE.fullmatch(quota) if isinstance(quota, str) else None
            if m is None:
                raise r.fail(f"{key}.storage_quota", "must be a size like '10GB' (kB, MB, "
                             f"GB, TB), got {quota!r}")
            quota_bytes = int(m.group(1)) * _UNITS[m.group(2)] * 1024
        pool = None
        if "pool_size" in praw:
            pool = r.integer(praw, f"{key}.pool_size", "pool_size", maximum=10000)
        plans[name] = Plan(name, _bounds(r, praw, key, bounds), quota_bytes, pool)
    default = tenants.get("default_plan", DEFAULT_PLAN)
    if not isinstance(default, str) or default not in plans:
        raise r.fail("tenants.default_plan", f"{default!r} is not a plan (plans: "
                     f"{', '.join(sorted(plans))})")
    return plans, default


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


def _usage(r: _Reader, usage: dict[str, Any]) -> UsageConfig:
    d = UsageConfig()
    _check_unknown(r, usage, "usage", {f.name for f in dataclasses.fields(UsageConfig)})
    timeout = usage.get("statement_timeout", d.statement_timeout)
    if not isinstance(timeout, str):
        raise r.fail("usage.statement_timeout", f"must be a string like '30s', got {timeout!r}")
    try:
        timeout = parse_pg_duration(timeout, "usage.statement_timeout")
    except BadDuration as exc:
        raise r.fail("usage.statement_timeout", f"{timeout!r}: {exc.why}") from None
    if timeout == "0":  # the one bound on a server's usage query: never none
        raise r.fail("usage.statement_timeout", "must be more than 0")
    return UsageConfig(
        keep_days=r.integer(usage, "usage.keep_days", "keep_days", default=d.keep_days,
                            maximum=MAX_DAYS),
        statement_timeout=timeout,
        top=r.integer(usage, "usage.top", "top", default=d.top, maximum=100),
        per_tenant_metrics=r.boolean(usage, "usage.per_tenant_metrics", "per_tenant_metrics",
                                     d.per_tenant_metrics),
        quota_warning=_quota_warning(r, usage.get("quota_warning", d.quota_warning)))


def _quota_warning(r: _Reader, value: object) -> float:
    share = check_warning(value)
    if share is None:
        raise r.fail("usage.quota_warning", "must be a share of the quota like 0.8 (more "
                     f"than 0, at most 1), got {value!r}")
    return share


_POOLER_KEYS = {"pooler", "pooler_host", "pooler_port", "pooler_dir", "pooler_admin_user",
                "pooler_admin_password_file"}
_ROLE_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}", re.ASCII)


def _pooler(r: _Reader, sraw: dict[str, Any], skey: str) -> PoolerConfig | None:
    """A server's pooler keys; without ``pooler`` none of the others may be set."""
    kind = sraw.get("pooler")
    if kind is None:
        for k in sorted(_POOLER_KEYS & set(sraw)):
            raise r.fail(f"{skey}.{k}", 'needs pooler = "pgbouncer"')
        return None
    if kind not in POOLERS:
        raise r.fail(f"{skey}.pooler", f"unknown pooler {kind!r} (known: "
                     f"{', '.join(POOLERS)})")
    host = r.string(sraw, f"{skey}.pooler_host", "pooler_host")
    port = r.integer(sraw, f"{skey}.pooler_port", "pooler_port", maximum=65535)
    pdir = r.string(sraw, f"{skey}.pooler_dir", "pooler_dir")
    user = r.string(sraw, f"{skey}.pooler_admin_user", "pooler_admin_user",
                    required=False) or PoolerConfig.admin_user
    if not _ROLE_RE.fullmatch(user):
        raise r.fail(f"{skey}.pooler_admin_user", "lower-case letters, digits and '_'")
    pw_file = r.string(sraw, f"{skey}.pooler_admin_password_file",
                       "pooler_admin_password_file")
    assert host is not None and pdir is not None and pw_file is not None
    return PoolerConfig(kind, host, port, r.resolve(pdir), user, r.resolve(pw_file))


def parse_config(raw: dict[str, Any], path: Path, overrides: list[EnvOverride] | None = None
                 ) -> Config:
    """The config of ``raw`` (the file's TOML) with the environment's ``overrides`` in
    place: a key the environment sets may be absent from the file; when present, the
    file's value is still checked (the file stays valid without the environment)."""
    r = _Reader(path)
    by_key = {o.key: o for o in overrides or () if o.server is None}
    by_server = {o.server: o for o in overrides or () if o.server is not None}
    for o in overrides or ():
        if o.key != "master_key.file":
            _check_env_dsn(o.variable, o.value)
    env_named: dict[str, str] = {}  # upper-cased server name -> server name
    pooler_dirs: dict[Path, str] = {}
    _check_unknown(r, raw, "", {"state_dir", "pg_bin_dir", "catalog", "master_key",
                                "tenants", "regions", "backups", "lifecycle",
                                "scheduler", "plans", "usage"})

    env_catalog = by_key.get("catalog.dsn")
    catalog = r.table(raw, "catalog", "catalog", required=env_catalog is None)
    _check_unknown(r, catalog, "catalog", {"dsn"})
    catalog_dsn = r.string(catalog, "catalog.dsn", "dsn", required=env_catalog is None)
    if catalog_dsn is not None:
        _check_dsn(r, "catalog.dsn", catalog_dsn)
    if env_catalog is not None:
        catalog_dsn = env_catalog.value
    assert catalog_dsn is not None

    env_key_file = by_key.get("master_key.file")
    mk = r.table(raw, "master_key", "master_key", required=env_key_file is None)
    if env_key_file is not None:  # the environment's key file replaces any source
        mk = {k: v for k, v in mk.items() if k not in (
            "file", "env", "kms_key_id", "kms_data_key_file", "kms_region",
            "kms_endpoint_url")} | {"file": env_key_file.value}
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
                                           "lock_wait_seconds", "default_plan",
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
    plans, default_plan = _plans(r, raw, tenants, bounds)

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

    usage = _usage(r, r.table(raw, "usage", "usage", required=False))

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
            _check_unknown(r, sraw, skey, {"name", "admin_dsn", "capacity", "data_dir", "port",
                                           "connection_reserve", "connection_budget",
                                           *_POOLER_KEYS})
            sname = r.string(sraw, f"{skey}.name", "name")
            assert sname is not None
            if not _SERVER_RE.fullmatch(sname):
                raise r.fail(f"{skey}.name", "lower-case letters, digits, '-' and '_' only")
            if sname in seen_servers:
                raise r.fail(f"{skey}.name", f"server {sname!r} is defined twice")
            seen_servers.add(sname)
            upper = sname.upper().replace("-", "_")
            if upper in env_named and any(o.server == upper for o in overrides or ()):
                raise r.fail(f"{skey}.name", f"${server_env_name(sname)} would name both "
                             f"{env_named[upper]!r} and {sname!r}: rename one")
            env_named[upper] = sname
            env_dsn = by_server.pop(upper, None)
            dsn = r.string(sraw, f"{skey}.admin_dsn", "admin_dsn", required=env_dsn is None)
            if dsn is not None:
                _check_dsn(r, f"{skey}.admin_dsn", dsn)
            if env_dsn is not None:
                dsn = env_dsn.value
            assert dsn is not None
            capacity = r.integer(sraw, f"{skey}.capacity", "capacity", default=500)
            data_dir = r.string(sraw, f"{skey}.data_dir", "data_dir", required=False)
            port = sraw.get("port")
            if data_dir is not None:
                port = r.integer(sraw, f"{skey}.port", "port", minimum=1024)
            reserve = r.integer(sraw, f"{skey}.connection_reserve", "connection_reserve",
                                default=DEFAULT_RESERVE, minimum=0, maximum=10000)
            budget = sraw.get("connection_budget")
            if isinstance(budget, str) and budget != AUTO:
                raise r.fail(f"{skey}.connection_budget",
                             f"must be a number of connections or \"auto\", got {budget!r}")
            if budget != AUTO and budget is not None:
                budget = r.integer(sraw, f"{skey}.connection_budget", "connection_budget",
                                   maximum=262143)  # Postgres's max_connections maximum
            pooler = _pooler(r, sraw, skey)
            if pooler is not None:
                if pooler.dir in pooler_dirs:
                    raise r.fail(f"{skey}.pooler_dir", f"{pooler.dir} is also server "
                                 f"{pooler_dirs[pooler.dir]}'s: one directory per pooler")
                pooler_dirs[pooler.dir] = sname
            servers.append(ServerConfig(
                name=sname, region=rname, admin_dsn=dsn, capacity=capacity,
                data_dir=r.resolve(data_dir) if data_dir else None, port=port,
                connection_reserve=reserve, connection_budget=budget, pooler=pooler,
            ))
        regions[rname] = RegionConfig(name=rname, backup_store=store, servers=tuple(servers))

    for o in by_server.values():
        raise ConfigError(f"${o.variable}: no server of {path} is named so (servers: "
                          f"{', '.join(sorted(seen_servers))})")
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
        usage=usage,
        bounds=bounds,
        plans=plans,
        default_plan=default_plan,
        state_dir=r.resolve(state_dir) if state_dir else None,
        pg_bin_dir=r.resolve(pg_bin_dir) if pg_bin_dir else None,
    )
