"""doctor's judgement: the facts it gathers, as plain data, and the rules over them.

``Facts`` is what `tenantctl doctor` read of the catalog, of each Postgres cluster
and of each region's store (services/doctor.py gathers it). ``diagnose`` is a pure
function of those facts, ``Facts.now`` included (no clock is read here): a list of
``Finding``s, each with a severity, what is wrong, the exact remedy and the name of
its automatic repair if there is one (services/doctor.py carries those out).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from orchestrator.domain import marks
from orchestrator.domain.bounds import DEFAULT_PLAN, SUSET_SETTINGS, TenantBounds
from orchestrator.domain.budget import ServerBudget
from orchestrator.domain.errors import InvalidInput
from orchestrator.domain.grants import settings_changed
from orchestrator.domain.marks import role_marker
from orchestrator.domain.master_keys import fleet_key_elsewhere, mixed_key_ids
from orchestrator.domain.moves import cut_over
from orchestrator.domain.names import (
    MOVE_OBJECT_PREFIX,
    TenantNames,
    catalog_mismatch,
    tenant_names,
)
from orchestrator.domain.quota import writes_expected
from orchestrator.domain.remedies import SUPERUSER_ONLY, remedy
from orchestrator.domain.replication import LOGICAL_REMEDY, LogicalReadiness
from orchestrator.domain.retention_plan import DELETE
from orchestrator.domain.states import (
    CANCELLING,
    HAS_DATABASE,
    PLACED_STATES,
    TenantState,
)
from orchestrator.domain.statuses import BackupStatus
from orchestrator.domain.timeliness import (
    backup_overdue,
    backup_since,
    is_overdue,
    latest_completed,
    overdue_transition,
)

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}
STUCK_BACKUP = timedelta(hours=6)
# what a tenant's objects on a server look like; anything else is not ours to judge
TENANT_DB = re.compile(r"^tenant_[a-z][a-z0-9_]*$")
TENANT_ROLE = re.compile(r"^(tenant|owner)_[a-z][a-z0-9_]*$")
SUPPORT_ROLE = re.compile(r"^tenantctl_support_[0-9]+$")
SIDE_SUFFIXES = ("__r", "__old")  # an in-place restore's side copies
ORPHAN_PREFIX = "orphans/"


# -- the facts ------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantRow:
    id: int
    slug: str
    region: str
    server: str
    database: str
    login_role: str
    owner_role: str
    state: str
    revision: str | None
    migration_error: str | None
    legal_hold: bool
    legal_hold_reason: str | None
    hold_until: datetime | None
    purge_after: datetime | None
    activated_at: datetime | None
    created_at: datetime
    busy: bool = False  # another process holds its lock (provisioning in flight)
    step: str | None = None  # a step in flight (provisioning, or lifecycle.CANCELLING)
    key_destroyed: bool = False  # an erasure destroyed its key
    plan: str = DEFAULT_PLAN  # its [plans.NAME]
    over_quota: bool = False  # its writes revoked for its storage quota


@dataclass(frozen=True)
class BackupRow:
    id: int
    tenant_id: int
    slug: str
    region: str
    object_key: str
    manifest_key: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    alive: bool = False  # a live process holds its lock
    key_id: str | None = None  # the tenant key it is encrypted to (read by the report)
    store_url: str | None = None  # the store it was written to (read by the report)


@dataclass(frozen=True)
class Database:
    owner: str
    allow_connections: bool
    connect: frozenset[str]  # grantees of CONNECT; "PUBLIC" for everybody
    comment: str | None = None  # a tenant database's carries its revision mark
    # grantees of TEMPORARY: the login role holds it exactly while it may write (the
    # hold and the quota take it with the table writes, in one statement); None: not read
    temporary: frozenset[str] | None = None


@dataclass(frozen=True)
class Role:
    superuser: bool
    createdb: bool
    createrole: bool
    bypassrls: bool
    replication: bool
    comment: str | None
    member_of: frozenset[str]
    # None: not read (then not judged). Settings as pg_db_role_setting stores them,
    # "name=value"; those set for one database only as "@database:name=value".
    connection_limit: int | None = None
    settings: frozenset[str] | None = None
    admin_reads: bool = True  # the admin has its privileges (reads what it owns)


@dataclass(frozen=True)
class MoveRow:
    """An unfinished tenant move (orchestrator/services/move.py)."""
    tenant_id: int
    slug: str
    from_server: str
    to_server: str
    step: str
    busy: bool = False  # a live process holds the tenant's lock


@dataclass(frozen=True)
class PoolerFact:
    """A server's pooler as doctor found it: does its admin console answer, and
    which of its files differ from what the catalog says."""

    server: str
    where: str  # host:port
    up: bool
    down_reason: str | None
    stale: tuple[str, ...] = ()


@dataclass
class ClusterFacts:
    """One Postgres cluster; several configured servers may point at it."""
    servers: list[str]
    reachable: bool = True
    error: str | None = None
    databases: dict[str, Database] = field(default_factory=dict)
    roles: dict[str, Role] = field(default_factory=dict)
    connections: int = 0
    max_connections: int = 0
    fleet_mark: str | None = None  # the fleet id the server is marked with
    version: int = 0  # server_version_num; 0: not read
    admin: str = ""
    reserved_connections: int = 0
    superuser_reserved: int = 0
    reserve_pending: bool = False  # set, waiting for a restart
    admin_reserved: bool = False  # the admin holds pg_use_reserved_connections
    admin_bounds_temp: bool = True  # the admin may set temp_file_limit on roles
    # database -> owner role -> how many large objects it owns there
    large_objects: dict[str, dict[str, int]] = field(default_factory=dict)
    logical: LogicalReadiness | None = None  # None: not read
    # a logical move's objects (MOVE_OBJECT_PREFIX): (kind, name, database or "")
    move_objects: set[tuple[str, str, str]] = field(default_factory=set)


@dataclass
class StoreFacts:
    region: str
    url: str
    keys: set[str] | None = None  # None: the store could not be listed
    error: str | None = None
    # uploads neither committed nor aborted: (name, the object it was to be, since)
    unfinished: list[tuple[str, str, datetime]] = field(default_factory=list)


@dataclass
class Facts:
    now: datetime
    head: str | None
    use_template: bool
    backup_interval: timedelta
    tenants: list[TenantRow]
    backups: list[BackupRow]
    servers: dict[str, tuple[str, int, str | None]]  # name -> (region, capacity, template)
    server_cluster: dict[str, str]  # server -> cluster id
    clusters: dict[str, ClusterFacts]
    stores: dict[str, StoreFacts]
    grants: dict[str, tuple[str, datetime]]  # live support role -> (tenant db, expires)
    scoped_region: str | None = None
    # the master key: configured id (None: unreadable, then key_error), the id the
    # catalog records as the fleet's, and stored secrets per wrapping key id
    master_key_id: str | None = None
    key_error: str | None = None
    catalog_key_id: str | None = None
    wrapped_key_ids: dict[str, int] = field(default_factory=dict)
    fleet_id: str | None = None  # the catalog's fleet identity (None: not made yet)
    bounds: TenantBounds = TenantBounds()
    # each plan's bounds, by name (empty: every tenant is held to ``bounds``)
    plans: dict[str, TenantBounds] = field(default_factory=dict)
    # tenants whose stored password no longer logs in (the role's was changed)
    dead_logins: frozenset[str] = frozenset()
    logins_unchecked: str | None = None  # why the stored passwords were not tried
    grant_ids: dict[str, tuple[int, bool]] = field(default_factory=dict)  # -> (id, read-only)
    moves: list[MoveRow] = field(default_factory=list)  # unfinished tenant moves
    # each server's connection budget, against the max_connections read now
    budgets: dict[str, ServerBudget] = field(default_factory=dict)
    poolers: dict[str, PoolerFact] = field(default_factory=dict)  # by server


# -- findings -------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    severity: str
    code: str
    subject: str
    message: str
    remedy: str
    fix: str | None = None  # the name of the automatic repair, if there is one
    destructive: bool = False
    args: tuple[tuple[str, Any], ...] = ()

    def arg(self, name: str) -> Any:
        return dict(self.args)[name]

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "code": self.code, "subject": self.subject,
                "message": self.message, "remedy": self.remedy,
                "fix": self.fix, "destructive": self.destructive}

    def describe(self) -> str:
        return f"{self.severity}: {self.subject}: {self.message}"


def _f(severity: str, code: str, subject: str, message: str, remedy: str,
       fix: str | None = None, destructive: bool = False, **args: Any) -> Finding:
    return Finding(severity, code, subject, message, remedy, fix, destructive,
                   tuple(sorted(args.items())))


def diagnose(f: Facts) -> list[Finding]:
    out: list[Finding] = []
    for check in (check_catalog_rows, check_servers, check_tenant_objects, check_orphans,
                  check_privileges, check_role_bounds, check_large_objects, check_backups,
                  check_store, check_revisions, check_retention, check_transitions,
                  check_master_key, check_fleet_identity, check_grants, check_writes,
                  check_moves, check_poolers):
        out.extend(check(f))
    return sorted(out, key=lambda x: (SEVERITY_ORDER[x.severity], x.code, x.subject))


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(x.severity == ERROR for x in findings)


# -- pure checks ----------------------------------------------------------------------


def check_catalog_rows(f: Facts) -> Iterator[Finding]:
    for t in f.tenants:
        why = catalog_mismatch(t.slug, t.database, t.login_role, t.owner_role)
        if why is not None:
            yield _f(ERROR, "catalog-row-inconsistent", t.slug,
                     f"catalog row is inconsistent ({why}); every command refuses to act "
                     "on it", "compare with the audit log and correct the row by hand "
                     f"(UPDATE tenants … WHERE slug = '{t.slug}')")
        server = f.servers.get(t.server)
        if t.state in PLACED_STATES and server is not None and server[0] != t.region:
            yield _f(ERROR, "tenant-outside-region", t.slug,
                     f"placed on {t.server}, a server of {server[0]}, but its region is "
                     f"{t.region}", remedy("tenant-outside-region"))


def check_master_key(f: Facts) -> Iterator[Finding]:
    """The configured master key is the fleet's, and every stored secret is wrapped
    by that one key (else `keys rotate-master` refuses the whole fleet)."""
    if f.master_key_id is None:
        if f.key_error is not None:
            yield _f(ERROR, "master-key-unavailable", "master key",
                     f"the configured master key cannot be loaded: {f.key_error}",
                     "fix [master_key] in tenantctl.toml (`tenantctl config check`)")
        return
    fleets = fleet_key_elsewhere(f.master_key_id, f.catalog_key_id, f.wrapped_key_ids)
    if fleets is not None:
        yield _f(ERROR, "master-key-not-fleets", "master key",
                 f"the configured master key {f.master_key_id} is not this fleet's "
                 f"({fleets}): every command that wraps a secret refuses",
                 f"point [master_key] in tenantctl.toml at the fleet's key {fleets}")
    mixed = mixed_key_ids(f.wrapped_key_ids)
    if mixed is not None:
        strays = sorted(k for k in f.wrapped_key_ids if k != (fleets or f.master_key_id))
        yield _f(ERROR, "master-key-mixed", "master key", mixed,
                 f"with [master_key] pointing at the stray key ({', '.join(strays)}) for "
                 "one command, run `tenantctl keys rotate-master --new-key-file <the "
                 f"fleet's key {fleets or f.master_key_id}>`: it re-wraps only the strays")


def check_fleet_identity(f: Facts) -> Iterator[Finding]:
    """Each server carries this fleet's mark: one marked by another fleet is another
    cluster at its address (two local fleets on one machine, a recycled host)."""
    if f.fleet_id is None:  # made by `catalog upgrade`; nothing to compare with before
        return
    for cluster in f.clusters.values():
        names = ", ".join(cluster.servers)
        if not cluster.reachable:
            continue
        if cluster.fleet_mark is None:
            yield _f(INFO, "server-unmarked", names, "carries no fleet mark yet",
                     "tenantctl catalog upgrade (marks it as this fleet's)")
        elif cluster.fleet_mark != f.fleet_id:
            yield _f(ERROR, "server-not-this-fleets", names,
                     f"the server at its address is not this fleet's server (it is "
                     f"marked as fleet {cluster.fleet_mark}, this is fleet {f.fleet_id})",
                     "check its admin_dsn and port in tenantctl.toml "
                     "(`tenantctl local status` for the embedded fleet)")


def check_servers(f: Facts) -> Iterator[Finding]:
    placed: dict[str, int] = defaultdict(int)
    for t in f.tenants:
        if t.state in PLACED_STATES:
            placed[t.server] += 1
    for cluster in f.clusters.values():
        names = ", ".join(cluster.servers)
        if not cluster.reachable:
            yield _f(ERROR, "server-unreachable", names, f"cannot connect: {cluster.error}",
                     remedy("server-unreachable"))
        elif cluster.max_connections and cluster.connections >= 0.9 * (
                cluster.max_connections - cluster.reserved_connections
                - cluster.superuser_reserved):
            yield _f(WARNING, "server-connections", names,
                     f"{cluster.connections} of max_connections {cluster.max_connections} "
                     f"in use ({cluster.reserved_connections + cluster.superuser_reserved} "
                     "of them reserved)", "raise max_connections or put a pooler in front; "
                     "see which roles hold them in pg_stat_activity")
        if cluster.reachable:
            yield from _check_reserve(f, cluster, names)
            yield from _check_logical(cluster, names)
    for name, b in sorted(f.budgets.items()):
        if b.enforced and b.over:
            yield _f(WARNING, "server-over-budget", name,
                     f"its tenants may hold {b.used} connections, over its connection "
                     f"budget of {b.total} (max_connections {b.max_connections} less "
                     f"{b.server_reserved} reserved by the server and a reserve of "
                     f"{b.reserve}"
                     + (f", connection_budget {b.configured}" if b.configured != "auto"
                        else "") + "): no new tenant or larger plan goes there",
                     f"raise max_connections on {name}, or move tenants to smaller plans "
                     "(tenantctl tenant set-plan) or to another server")
        if b.too_large:
            yield _f(WARNING, "server-budget-too-large", name,
                     f"connection_budget {b.configured} is more than max_connections "
                     f"{b.max_connections} less {b.server_reserved} reserved by the "
                     f"server and a reserve of {b.reserve}: {b.total} is used",
                     f"lower regions.*.servers '{name}' connection_budget in tenantctl.toml "
                     "(or raise max_connections)")
    for name, (_region, capacity, _tpl) in sorted(f.servers.items()):
        if placed[name] > capacity:
            yield _f(WARNING, "server-over-capacity", name,
                     f"{placed[name]} tenants on a server of capacity {capacity}",
                     f"raise regions.*.servers '{name}' capacity in tenantctl.toml or add "
                     "a server to the region")


RESERVE_REMEDY = ("as a superuser: ALTER SYSTEM SET reserved_connections = 10, restart the "
                  "server, and GRANT pg_use_reserved_connections TO {admin} (`tenantctl "
                  "local up` does this for the embedded fleet; the Ansible role too)")


def _check_reserve(f: Facts, c: ClusterFacts, names: str) -> Iterator[Finding]:
    """Connections kept for the admin, so tenants that fill the server cannot lock
    tenantctl out (suspend, doctor, the catalog on a shared server); the admin's
    right to store the hard temp-file bound on tenant roles."""
    if not c.version:
        return
    if c.version < 160000:
        yield _f(WARNING, "server-reserve-missing", names,
                 "Postgres < 16 reserves no connections for a non-superuser admin: tenants "
                 "that fill max_connections lock tenantctl out",
                 "upgrade to Postgres 16 or later; until then keep connection_limit × "
                 "tenants below max_connections - superuser_reserved_connections, or put a "
                 "pooler in front of tenants")
    elif c.reserved_connections == 0 or not c.admin_reserved:
        missing = [what for what, ok in (
            ("reserved_connections is 0" + (" until the next restart"
                                            if c.reserve_pending else ""),
             c.reserved_connections > 0),
            (f"{c.admin or 'the admin'} lacks pg_use_reserved_connections",
             c.admin_reserved)) if not ok]
        yield _f(WARNING, "server-reserve-missing", names,
                 f"no connections reserved for the admin ({'; '.join(missing)}): tenants "
                 "that fill max_connections lock tenantctl out",
                 "restart the server (tenantctl local down, then up)"
                 if c.reserve_pending and c.admin_reserved
                 else RESERVE_REMEDY.format(admin=c.admin or "<admin role>"))
    if not c.admin_bounds_temp and any(b.temp_file_limit != "-1"
                                       for b in (f.bounds, *f.plans.values())):
        yield _f(WARNING, "server-temp-file-limit-unbounded", names,
                 f"{c.admin or 'the admin'} may not set temp_file_limit (superuser-only): "
                 "tenants' temporary files are unbounded here",
                 f"as a superuser: GRANT SET ON PARAMETER temp_file_limit TO "
                 f"{c.admin or '<admin role>'} (Postgres >= 15), then tenantctl doctor --fix")


def _check_logical(c: ClusterFacts, names: str) -> Iterator[Finding]:
    """A server that cannot take part in a logical tenant move: information, not a
    fault (its tenants move with pg_dump, pausing writes for the copy)."""
    if c.logical is not None and not c.logical.ready:
        yield _f(INFO, "server-no-logical-moves", names, c.logical.describe(),
                 LOGICAL_REMEDY.format(admin=c.admin or "<admin role>"))


def expected_settings(bounds: TenantBounds, c: ClusterFacts) -> frozenset[str]:
    return frozenset(f"{k}={v}" for k, v in bounds.role_settings.items()
                     if c.admin_bounds_temp or k not in SUSET_SETTINGS)


def plan_bounds(f: Facts, t: TenantRow) -> TenantBounds | None:
    """The bounds of the tenant's plan; None: the config has no such plan."""
    if not f.plans:
        return f.bounds
    return f.plans.get(t.plan)


def check_role_bounds(f: Facts) -> Iterator[Finding]:
    """A tenant's login role has its plan's CONNECTION LIMIT and exactly its plan's
    role settings (a tenant may change its own settings and password; tenantctl puts
    them back), and still logs in with the password tenantctl holds."""
    for t in f.tenants:
        c = _cluster(f, t.server)
        if c is None or t.state not in HAS_DATABASE or t.busy or _names(t.slug) is None:
            continue
        if t.slug in f.dead_logins:
            yield _f(ERROR, "login-password-changed", t.slug,
                     f"{t.login_role} no longer logs in with the password tenantctl holds "
                     "(changed with ALTER ROLE … PASSWORD?): its connection string is dead",
                     remedy("login-password-changed"),
                     fix="reapply_password", slug=t.slug)
        bounds = plan_bounds(f, t)
        if bounds is None:
            yield _f(WARNING, "plan-unknown", t.slug,
                     f"its plan {t.plan!r} is not in the config: its limits are not "
                     "checked", remedy("plan-unknown"))
            continue
        r = c.roles.get(t.login_role)
        if r is None or r.connection_limit is None or r.settings is None:
            continue
        wrong = []
        if r.connection_limit != bounds.connection_limit:
            wrong.append(f"connection limit {r.connection_limit} (want "
                         f"{bounds.connection_limit})")
        want, have = expected_settings(bounds, c), r.settings
        if not c.admin_bounds_temp:  # what the admin may not set, it does not judge
            have = frozenset(x for x in have if x.split("=", 1)[0].rsplit(":", 1)[-1]
                             not in SUSET_SETTINGS)
        if have != want:
            extra, missing = sorted(have - want), sorted(want - have)
            wrong += [f"has {x}" for x in extra] + [f"lacks {x}" for x in missing]
        if wrong:
            yield _f(WARNING, "role-bounds-differ", t.slug,
                     f"{t.login_role} differs from plan {t.plan}: {', '.join(wrong)}",
                     "tenantctl doctor --fix (re-applies the plan's bounds)",
                     fix="bound_role", server=t.server, role=t.login_role, slug=t.slug,
                     plan=t.plan)


def _cluster(f: Facts, server: str) -> ClusterFacts | None:
    c = f.clusters.get(f.server_cluster.get(server, ""))
    return c if c is not None and c.reachable else None


def check_tenant_objects(f: Facts) -> Iterator[Finding]:
    """Each placed tenant's database and roles exist, are ours, and nobody else's."""
    for t in f.tenants:
        c = _cluster(f, t.server)
        if c is None or catalog_mismatch(t.slug, t.database, t.login_role, t.owner_role):
            continue
        if t.state == TenantState.provisioning:
            if not t.busy:
                yield _f(WARNING, "provisioning-unfinished", t.slug,
                         "provisioning stopped half-way (no process is working on it)",
                         f"tenantctl tenant create {t.slug} --region {t.region}",
                         fix="provision", slug=t.slug, region=t.region)
            continue
        if t.state not in HAS_DATABASE:
            continue
        db = c.databases.get(t.database)
        if db is None:
            yield _f(ERROR, "database-missing", t.slug,
                     f"database {t.database} is missing on {t.server}",
                     remedy("database-missing", slug=t.slug))
        elif db.owner != t.owner_role:
            yield _f(ERROR, "database-foreign-owner", t.slug,
                     f"database {t.database} is owned by {db.owner}, not {t.owner_role}",
                     f"ALTER DATABASE {t.database} OWNER TO {t.owner_role} after checking "
                     "whose data it holds")
        marker = role_marker(t.id, t.slug)
        for role in (t.login_role, t.owner_role):
            r = c.roles.get(role)
            if r is None:
                yield _f(ERROR, "role-missing", t.slug, f"role {role} is missing on {t.server}",
                         remedy("role-missing", slug=t.slug))
            elif r.comment != marker:
                yield _f(ERROR, "role-not-ours", t.slug,
                         f"role {role} does not carry this tenant's marker",
                         "find out who created it; tenantctl will not drop or adopt it")


def _known_objects(f: Facts) -> dict[str, tuple[set[str], set[str]]]:
    """Per cluster, the tenant databases and roles the catalog accounts for."""
    known: dict[str, tuple[set[str], set[str]]] = defaultdict(lambda: (set(), set()))
    for t in f.tenants:
        if t.state not in PLACED_STATES or t.server not in f.server_cluster:
            continue
        # from the slug, not the row's columns: a tampered row must not turn its
        # tenant's real database into an "orphan" that --fix would drop
        names = _names(t.slug)
        if names is None:
            continue
        dbs, roles = known[f.server_cluster[t.server]]
        dbs.add(names.database)
        roles.update((names.login_role, names.owner_role))
    # an unfinished move's copy on its target is the move's (finished or aborted by it)
    for m in f.moves:
        names = _names(m.slug)
        if names is not None and m.to_server in f.server_cluster:
            dbs, roles = known[f.server_cluster[m.to_server]]
            dbs.add(names.database)
            roles.update((names.login_role, names.owner_role))
    return known


def _names(slug: str) -> TenantNames | None:
    try:
        return tenant_names(slug)
    except InvalidInput:
        return None


def check_orphans(f: Facts) -> Iterator[Finding]:
    known = _known_objects(f)
    gone = {t.database: t for t in f.tenants if t.state not in PLACED_STATES}
    for cid, c in sorted(f.clusters.items()):
        if not c.reachable:
            continue
        server = c.servers[0]
        kdbs, kroles = known[cid]
        for name in sorted(c.databases):
            if not TENANT_DB.match(name) or name in kdbs:
                continue
            base = next((name[:-len(s)] for s in SIDE_SUFFIXES if name.endswith(s)), None)
            if base in kdbs:
                what = "a side copy left by an interrupted in-place restore"
            elif name in gone:
                what = f"the database of {gone[name].state} tenant {gone[name].slug}: its " \
                       "deletion did not finish"
            else:
                what = "a database the catalog does not know"
            yield _f(ERROR, "orphan-database", f"{server}/{name}", what,
                     f"tenantctl doctor --fix (backs it up to the {f.servers[server][0]} "
                     "store, then drops it, after asking)", fix="drop_orphan_database",
                     destructive=True, server=server, database=name)
        for name in sorted(c.roles):
            if TENANT_ROLE.match(name) and name not in kroles:
                yield _f(WARNING, "orphan-role", f"{server}/{name}",
                         "a tenant-style role the catalog does not know",
                         "tenantctl doctor --fix (drops it, after asking)",
                         fix="drop_orphan_role", destructive=True, server=server, role=name)
            elif SUPPORT_ROLE.match(name) and name not in f.grants:
                yield _f(WARNING, "orphan-role", f"{server}/{name}",
                         "a support-access role with no live grant",
                         "tenantctl doctor --fix (drops it, after asking)",
                         fix="drop_orphan_role", destructive=True, server=server, role=name)


def check_privileges(f: Facts) -> Iterator[Finding]:
    """A tenant's role reaches its own database and nothing else; PUBLIC reaches no
    tenant database; no tenant role holds a server-wide power."""
    own: dict[str, str] = {}
    for t in f.tenants:
        names = _names(t.slug)
        if t.state in PLACED_STATES and names is not None:
            own[names.login_role] = own[names.owner_role] = names.database
    tenant_dbs = set(own.values())
    for _cid, c in sorted(f.clusters.items()):
        if not c.reachable:
            continue
        server = c.servers[0]
        for name, db in sorted(c.databases.items()):
            if not db.allow_connections:
                continue
            if "PUBLIC" in db.connect and (name in tenant_dbs or TENANT_DB.match(name)):
                yield _f(ERROR, "public-connect", f"{server}/{name}",
                         "PUBLIC may connect to a tenant database",
                         remedy("public-connect", database=name),
                         fix="revoke_public", server=server, database=name)
            for grantee in sorted(db.connect - {"PUBLIC"}):
                home = own.get(grantee)
                if SUPPORT_ROLE.match(grantee):
                    home = f.grants.get(grantee, ("", None))[0]
                elif home is None:
                    continue  # the admin, or a role that is not a tenant's
                if home != name:
                    yield _f(ERROR, "role-reaches-other-database", f"{server}/{grantee}",
                             f"may connect to {name}, not its own database",
                             remedy("role-reaches-other-database", database=name,
                                    role=grantee), fix="revoke_connect", server=server,
                             database=name, role=grantee)
        for name, r in sorted(c.roles.items()):
            if name not in own and not SUPPORT_ROLE.match(name):
                continue
            powers = [p for p, on in (("SUPERUSER", r.superuser), ("CREATEDB", r.createdb),
                                      ("CREATEROLE", r.createrole),
                                      ("BYPASSRLS", r.bypassrls),
                                      ("REPLICATION", r.replication)) if on]
            if powers:
                fixable = not SUPERUSER_ONLY & set(powers)
                yield _f(ERROR, "role-powers", f"{server}/{name}",
                         f"a tenant role with {', '.join(powers)}",
                         remedy("role-powers", role=name, powers=powers),
                         fix="strip_powers" if fixable else None, server=server, role=name)
            for parent in sorted(r.member_of):
                yield _f(ERROR, "role-membership", f"{server}/{name}",
                         f"a tenant role that is a member of {parent}",
                         f"REVOKE {parent} FROM {name} (tenantctl doctor --fix)",
                         fix="revoke_membership", server=server, role=name, parent=parent)


def check_large_objects(f: Facts) -> Iterator[Finding]:
    """Backups dump as the admin, which reads the large objects of the roles it has
    the privileges of: the tenant's owner and login roles, and support roles (granted
    to it at `access grant`). Anybody else's make every backup fail; the hold makes
    the login role's read-only."""
    for t in f.tenants:
        c = _cluster(f, t.server)
        names = _names(t.slug)
        if c is None or t.state not in HAS_DATABASE or names is None:
            continue
        owners = c.large_objects.get(names.database, {})
        login = c.roles.get(names.login_role)
        if login is not None and not login.admin_reads:
            n = owners.get(names.login_role, 0)
            yield _f(ERROR if n else WARNING, "admin-membership-missing", t.slug,
                     f"the admin role lacks the privileges of {names.login_role}, so it "
                     "cannot read (back up) large objects that role owns"
                     + (f": {n} now, every backup fails" if n else ""),
                     f"GRANT {names.login_role} TO <admin> WITH INHERIT TRUE, SET TRUE "
                     "(tenantctl doctor --fix)", fix="grant_membership", server=t.server,
                     role=names.login_role)
        for owner, n in sorted(owners.items()):
            role = c.roles.get(owner)
            if owner in (names.login_role, names.owner_role) or (
                    role is not None and role.admin_reads):  # e.g. a support role
                continue
            grant = f.grant_ids.get(owner)
            remedy = (f"tenantctl access revoke {grant[0]} (what it owns goes to "
                      f"{names.owner_role})" if grant is not None else
                      f"tenantctl doctor --fix drops the orphan role {owner} (what it owns "
                      f"goes to {names.owner_role})" if SUPPORT_ROLE.match(owner) else
                      f"ALTER LARGE OBJECT … OWNER TO {names.owner_role}, as a member of "
                      f"{owner}")
            yield _f(ERROR, "large-objects-unreadable", t.slug,
                     f"{n} large object(s) in {names.database} owned by {owner}, which the "
                     "backup role cannot read: every backup of it fails", remedy)
        n = owners.get(names.login_role, 0)
        if t.state == TenantState.cancelled and n:
            yield _f(WARNING, "large-objects-writable", t.slug,
                     f"{n} large object(s) its login role made during the hold, still "
                     "writable by it", f"tenantctl backup run {t.slug} takes them over "
                     "(tenantctl doctor --fix)", fix="hold_large_objects", slug=t.slug)


def check_grants(f: Facts) -> Iterator[Finding]:
    """A support role may ALTER ROLE its own settings: one that did is tampered with,
    and its grant ends."""
    for _cid, c in sorted(f.clusters.items()):
        if not c.reachable:
            continue
        for name, r in sorted(c.roles.items()):
            grant = f.grant_ids.get(name)
            if grant is None or r.settings is None:
                continue
            why = settings_changed(sorted(r.settings), grant[1])
            if why is not None:
                yield _f(ERROR, "grant-tampered", name,
                         f"support grant {grant[0]}: its role changed its own settings ({why})",
                         "tenantctl retention run --only access ends it (tenantctl doctor "
                         "--fix)", fix="expire_grants")


def check_backups(f: Facts) -> Iterator[Finding]:
    latest = latest_completed(f.backups)
    for t in f.tenants:
        if t.state != TenantState.active:
            continue
        last = latest.get(t.id)
        since = backup_since(last.finished_at if last else None, t.activated_at, t.created_at)
        if backup_overdue(since, f.backup_interval, f.now):
            yield _f(ERROR, "backup-overdue", t.slug,
                     f"no successful backup since {since.isoformat(timespec='minutes')}",
                     remedy("backup-overdue", slug=t.slug),
                     fix="backup", slug=t.slug)
    for b in f.backups:
        if b.status == BackupStatus.running and not b.alive:
            yield _f(WARNING, "backup-interrupted", f"backup {b.id}",
                     f"of {b.slug}: left running by a process that died",
                     "tenantctl doctor --fix (aborts the partial upload, marks it failed)",
                     fix="reap_backups")
        elif b.status == BackupStatus.running and f.now - b.started_at > STUCK_BACKUP:
            yield _f(WARNING, "backup-slow", f"backup {b.id}",
                     f"of {b.slug}: running since {b.started_at.isoformat(timespec='minutes')}",
                     "check the process that runs it")


def check_store(f: Facts) -> Iterator[Finding]:
    """Completed backups have both objects; no object without a catalog row; a
    tenant's objects only in its own region's store."""
    region_of = {t.slug: t.region for t in f.tenants}
    tenant_state = {t.id: t.state for t in f.tenants}
    known: dict[str, set[str]] = defaultdict(set)
    for b in f.backups:
        if b.status in (BackupStatus.completed, BackupStatus.running):
            known[b.region].update((b.object_key, b.manifest_key))
    for region, st in sorted(f.stores.items()):
        if st.keys is None:
            yield _f(ERROR, "store-unreachable", f"store of {region}",
                     f"cannot list {st.url}: {st.error}", remedy("store-unreachable"))
            continue
        for key in sorted(st.keys):
            if key.startswith(ORPHAN_PREFIX):
                yield _f(INFO, "orphan-dump", f"{region}:{key}",
                         "a dump doctor took of an orphan database before dropping it",
                         "delete it once reviewed")
                continue
            slug = key.split("/")[1] if key.startswith("tenants/") and key.count("/") >= 2 \
                else None
            home = region_of.get(slug or "")
            if home is not None and home != region:
                yield _f(ERROR, "backup-outside-region", f"{region}:{key}",
                         f"an object of tenant {slug} (region {home}) in the {region} store",
                         remedy("backup-outside-region"),
                         fix="delete_object", destructive=True, region=region, key=key)
            elif key not in known[region]:
                yield _f(WARNING, "orphan-object", f"{region}:{key}",
                         "an object no completed backup in the catalog knows",
                         "tenantctl doctor --fix (deletes it, after asking)",
                         fix="delete_object", destructive=True, region=region, key=key)
    writing = {b.object_key for b in f.backups if b.status == BackupStatus.running and b.alive}
    for region, st in sorted(f.stores.items()):
        for name, key, since in st.unfinished:
            if key not in writing and f.now - since > STUCK_BACKUP:
                yield _f(WARNING, "unfinished-upload", f"{region}:{name}",
                         f"an upload of {key} left unfinished since "
                         f"{since.isoformat(timespec='minutes')} (a writer that failed or "
                         "was killed): hidden from listings, it takes space",
                         "tenantctl doctor --fix (removes it)", fix="discard_upload",
                         region=region, name=name)
    for b in f.backups:
        home_store = f.stores.get(b.region)
        if b.status != BackupStatus.completed or home_store is None or home_store.keys is None:
            continue
        missing = [k for k in (b.object_key, b.manifest_key) if k not in home_store.keys]
        if missing:
            what = "object" if b.object_key in missing else "manifest"
            live = tenant_state.get(b.tenant_id) in HAS_DATABASE
            yield _f(ERROR, "backup-missing-object", f"backup {b.id}",
                     f"of {b.slug}: its {what} is gone from the {b.region} store",
                     remedy("backup-missing-object", live=live),
                     fix="forget_backup", backup_id=b.id, slug=b.slug, live=live)


def check_revisions(f: Facts) -> Iterator[Finding]:
    for t in f.tenants:
        if t.state not in HAS_DATABASE:
            continue
        if t.migration_error:
            yield _f(ERROR, "migration-failed", t.slug,
                     f"last migration failed: {t.migration_error}",
                     f"fix the cause, then tenantctl migrate tenant {t.slug} --to head")
        elif f.head is not None and t.revision != f.head:
            yield _f(WARNING, "tenant-behind-head", t.slug,
                     f"at {t.revision or 'base'}, head is {f.head}",
                     "tenantctl migrate rollout --to head")
        yield from _check_mark(f, t)
    if not f.use_template:
        return
    for name, (_region, _cap, template) in sorted(f.servers.items()):
        # no template yet is fine: the first provisioning on the server builds it
        if _cluster(f, name) is not None and template is not None and f.head is not None \
                and template != f.head:
            yield _f(WARNING, "template-behind-head", name,
                     f"template at {template or 'none'}, head is {f.head}",
                     f"tenantctl template build --server {name} (tenantctl doctor --fix)",
                     fix="build_template", server=name)


def check_retention(f: Facts) -> Iterator[Finding]:
    for t in f.tenants:
        late = overdue_transition(t.state, t.hold_until, t.purge_after, t.legal_hold, f.now)
        if late is None:
            continue
        kind, due_at = str(late[0]), late[1]
        what = "deletion" if kind == DELETE else "purge"
        yield _f(ERROR, f"{what}-overdue", t.slug,
                 f"{what} was due {due_at.isoformat(timespec='minutes')}",
                 remedy(f"{what}-overdue", kind=kind), fix=kind, destructive=True,
                 slug=t.slug)
    for role, (_db, expires) in sorted(f.grants.items()):
        if is_overdue(expires, f.now):
            yield _f(WARNING, "grant-expired", role,
                     f"support access past its end ({expires.isoformat(timespec='minutes')})",
                     remedy("grant-expired"),
                     fix="expire_grants")


def check_transitions(f: Facts) -> Iterator[Finding]:
    """Lifecycle transitions that a crash stopped half-way, with no process on them."""
    for t in f.tenants:
        if t.busy or t.state not in HAS_DATABASE:
            continue
        if t.key_destroyed:
            yield _f(ERROR, "erase-unfinished", t.slug,
                     f"an erasure destroyed its key and stopped: it is still {t.state}, "
                     "its backups unreadable, it has no credentials",
                     f"tenantctl tenant erase {t.slug} --reason … (finishes it; tenantctl "
                     "doctor --fix, after asking)", fix="finish_erase", destructive=True,
                     slug=t.slug)
        elif t.step == CANCELLING and t.state != TenantState.cancelled:
            yield _f(ERROR, "cancel-unfinished", t.slug,
                     f"a cancellation stopped half-way: every write is refused, but it is "
                     f"still {t.state} and no hold has started",
                     f"tenantctl tenant cancel {t.slug} --yes (finishes it; tenantctl "
                     "tenant reactivate afterwards gives the writes back)")


def _mark(cluster: ClusterFacts | None, database: str) -> tuple[bool, str | None] | None:
    """(marked, revision) of a database on the cluster; None if it is not there."""
    db = cluster.databases.get(database) if cluster is not None else None
    return None if db is None else marks.parse(db.comment)


def _check_mark(f: Facts, t: TenantRow) -> Iterator[Finding]:
    """The revision its database is marked with (what `migrate status` reads) is the
    catalog's: both are written with every migration, so a difference means one of
    them was changed behind tenantctl's back, or a step it took was lost."""
    found = _mark(_cluster(f, t.server), t.database)
    if found is None or t.busy:
        return  # a missing database is check_tenant_objects' finding
    marked, revision = found
    if not marked:
        yield _f(INFO, "revision-unmarked", t.slug,
                 "its database carries no revision mark: migrate status reads it live",
                 "tenantctl migrate status (marks it)")
    elif revision != t.revision:
        yield _f(WARNING, "revision-mark-differs", t.slug,
                 f"its database is marked {revision or 'base'}, the catalog says "
                 f"{t.revision or 'base'}",
                 "tenantctl migrate status --live (reads the database, corrects both)")


def check_writes(f: Facts) -> Iterator[Finding]:
    """The login role may write exactly when the catalog says so: an active or
    suspended tenant within its storage quota, never one over it or on hold (a
    crash between the server and the catalog, or a hand-made GRANT/REVOKE)."""
    moving = {m.slug for m in f.moves}  # paused by its move: check_moves speaks of it
    for t in f.tenants:
        expected = writes_expected(t.state, t.step, t.over_quota)
        c = _cluster(f, t.server)
        db = c.databases.get(t.database) if c is not None else None
        if expected is None or t.busy or t.slug in moving or db is None \
                or db.temporary is None:
            continue
        writes = t.login_role in db.temporary
        if writes == expected:
            continue
        if expected:
            yield _f(ERROR, "writes-revoked", t.slug,
                     f"{t.state} and within its storage quota, but its login role "
                     "cannot write", "tenantctl doctor --fix (gives the writes back)",
                     fix="sync_writes", slug=t.slug)
        else:
            why = "over its storage quota" if t.over_quota else "on hold (cancelled)"
            yield _f(ERROR, "writes-not-revoked", t.slug,
                     f"{why}, but its login role can still write",
                     "tenantctl doctor --fix (revokes them; reads go on)",
                     fix="sync_writes", slug=t.slug)


def check_moves(f: Facts) -> Iterator[Finding]:
    """A move no process is working on (a crash), and a logical move's replication
    objects that no unfinished move accounts for: an abandoned slot keeps WAL on its
    server until the disk is full."""
    for m in f.moves:
        if m.busy:
            continue
        if cut_over(m.step):
            yield _f(WARNING, "move-stalled", m.slug,
                     f"its move to {m.to_server} stopped after the cutover (step {m.step})",
                     f"tenantctl tenant move {m.slug} --server {m.to_server} (finishes it)",
                     fix="finish_move", slug=m.slug, server=m.to_server)
        else:
            yield _f(WARNING, "move-stalled", m.slug,
                     f"its move to {m.to_server} stopped at step {m.step}; it may be "
                     f"read-only on {m.from_server} meanwhile",
                     f"tenantctl tenant move {m.slug} --server {m.to_server} to finish it, "
                     f"or tenantctl tenant move {m.slug} --abort (doctor --fix aborts it, "
                     "after asking)", fix="abort_move", destructive=True, slug=m.slug)
    moving = {m.tenant_id for m in f.moves}
    for _cid, c in sorted(f.clusters.items()):
        if not c.reachable:
            continue
        for kind, name, database in sorted(c.move_objects):
            suffix = name[len(MOVE_OBJECT_PREFIX):]
            if suffix.isdigit() and int(suffix) in moving:
                continue
            where = f" in {database}" if database else ""
            yield _f(ERROR if kind == "slot" else WARNING, "move-leftover",
                     f"{c.servers[0]}/{name}",
                     f"a {kind}{where} of a tenant move that no unfinished move accounts for"
                     + (": it holds WAL until dropped" if kind == "slot" else ""),
                     "tenantctl doctor --fix (drops it)", fix="drop_move_leftover",
                     server=c.servers[0], kind=kind, name=name, database=database)


def check_poolers(f: Facts) -> Iterator[Finding]:
    """A pooler down refuses every client of its server's pooled connection strings;
    files out of step with the catalog admit a suspended tenant, or refuse a new one
    or a rotated password."""
    for name, p in sorted(f.poolers.items()):
        if not p.up:
            yield _f(ERROR, "pooler-down", name, f"pooler at {p.where} does not answer: "
                     f"{p.down_reason}", remedy("pooler-down", where=p.where))
        if p.stale:
            yield _f(WARNING, "pooler-stale", name, f"pooler files differ from the catalog: "
                     f"{', '.join(p.stale)}", remedy("pooler-stale", server=name),
                     fix="sync_pooler", server=name)
