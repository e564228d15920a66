"""`tenantctl doctor`: the catalog compared with every server and every store.

Three parts, as everywhere in tenantctl:

- ``gather`` reads the catalog once, each Postgres cluster once (a handful of
  catalog queries, whatever its number of databases) and each region's store
  once, into plain data (``Facts``);
- ``diagnose`` is a pure function of those facts and ``now``: a list of
  ``Finding``s, each with a severity, what is wrong and the exact remedy;
- ``repair`` carries out the remedies that have an automatic fix. The safe
  ones (re-grants, a missing backup, an unfinished step, a stale template)
  just run; the destructive ones (dropping an orphan, deleting an object,
  finishing a deletion) run only after ``confirm`` said yes, and an orphan
  database is backed up before it is dropped.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import select, update

from orchestrator import clock, revision_marks
from orchestrator.errors import Conflict, InvalidInput, TenantctlError, first_line
from orchestrator.models import (
    PLACED_STATES,
    Backup,
    Server,
    SupportGrant,
    Tenant,
    TenantState,
)
from orchestrator.names import TenantNames, catalog_mismatch, tenant_names
from orchestrator.retention_plan import DELETE, PURGE, TenantFact, tenant_action

if TYPE_CHECKING:
    from orchestrator.api import Fleet

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}
GRACE = timedelta(hours=1)  # a scheduler tick late is not yet a problem
STUCK_BACKUP = timedelta(hours=6)
LIVE = (TenantState.active, TenantState.suspended, TenantState.cancelled)
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


@dataclass(frozen=True)
class Database:
    owner: str
    allow_connections: bool
    connect: frozenset[str]  # grantees of CONNECT; "PUBLIC" for everybody
    comment: str | None = None  # a tenant database's carries its revision mark


@dataclass(frozen=True)
class Role:
    superuser: bool
    createdb: bool
    createrole: bool
    bypassrls: bool
    replication: bool
    comment: str | None
    member_of: frozenset[str]


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


@dataclass
class StoreFacts:
    region: str
    url: str
    keys: set[str] | None = None  # None: the store could not be listed
    error: str | None = None


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
                  check_privileges, check_backups, check_store, check_revisions,
                  check_retention):
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
                     f"{t.region}", "move it back with a backup and `tenantctl backup "
                     "restore --as` in its region; correct the row by hand")


def check_servers(f: Facts) -> Iterator[Finding]:
    placed: dict[str, int] = defaultdict(int)
    for t in f.tenants:
        if t.state in PLACED_STATES:
            placed[t.server] += 1
    for cluster in f.clusters.values():
        names = ", ".join(cluster.servers)
        if not cluster.reachable:
            yield _f(ERROR, "server-unreachable", names, f"cannot connect: {cluster.error}",
                     "check the server and the admin DSN in tenantctl.toml "
                     "(`tenantctl local status` for the embedded fleet)")
        elif cluster.max_connections and \
                cluster.connections >= 0.9 * cluster.max_connections:
            yield _f(WARNING, "server-connections", names,
                     f"{cluster.connections} of max_connections {cluster.max_connections} "
                     "in use", "raise max_connections or put a pooler in front")
    for name, (_region, capacity, _tpl) in sorted(f.servers.items()):
        if placed[name] > capacity:
            yield _f(WARNING, "server-over-capacity", name,
                     f"{placed[name]} tenants on a server of capacity {capacity}",
                     f"raise regions.*.servers '{name}' capacity in tenantctl.toml or add "
                     "a server to the region")


def _cluster(f: Facts, server: str) -> ClusterFacts | None:
    c = f.clusters.get(f.server_cluster.get(server, ""))
    return c if c is not None and c.reachable else None


def check_tenant_objects(f: Facts) -> Iterator[Finding]:
    """Each placed tenant's database and roles exist, are ours, and nobody else's."""
    from orchestrator.pgserver import role_marker

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
        if t.state not in LIVE:
            continue
        db = c.databases.get(t.database)
        if db is None:
            yield _f(ERROR, "database-missing", t.slug,
                     f"database {t.database} is missing on {t.server}",
                     f"restore it: tenantctl backup list {t.slug}, then "
                     f"tenantctl backup restore <id> --as <new slug>")
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
                         f"tenantctl tenant credentials {t.slug} --rotate recreates nothing: "
                         "recreate the role by hand, then re-grant with `tenantctl doctor "
                         "--fix`")
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
                         f"REVOKE ALL ON DATABASE {name} FROM PUBLIC (tenantctl doctor --fix)",
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
                             f"REVOKE CONNECT ON DATABASE {name} FROM {grantee} "
                             "(tenantctl doctor --fix)", fix="revoke_connect", server=server,
                             database=name, role=grantee)
        for name, r in sorted(c.roles.items()):
            if name not in own and not SUPPORT_ROLE.match(name):
                continue
            powers = [p for p, on in (("SUPERUSER", r.superuser), ("CREATEDB", r.createdb),
                                      ("CREATEROLE", r.createrole),
                                      ("BYPASSRLS", r.bypassrls),
                                      ("REPLICATION", r.replication)) if on]
            if powers:
                fixable = not {"SUPERUSER", "BYPASSRLS", "REPLICATION"} & set(powers)
                yield _f(ERROR, "role-powers", f"{server}/{name}",
                         f"a tenant role with {', '.join(powers)}",
                         f"ALTER ROLE {name} " + " ".join(f"NO{p}" for p in powers)
                         + ("" if fixable else " (as a superuser)"),
                         fix="strip_powers" if fixable else None, server=server, role=name)
            for parent in sorted(r.member_of):
                yield _f(ERROR, "role-membership", f"{server}/{name}",
                         f"a tenant role that is a member of {parent}",
                         f"REVOKE {parent} FROM {name} (tenantctl doctor --fix)",
                         fix="revoke_membership", server=server, role=name, parent=parent)


def check_backups(f: Facts) -> Iterator[Finding]:
    latest: dict[int, BackupRow] = {}
    for b in f.backups:
        if b.status == "completed" and b.finished_at is not None and (
                b.tenant_id not in latest
                or b.finished_at > latest[b.tenant_id].finished_at):  # type: ignore[operator]
            latest[b.tenant_id] = b
    for t in f.tenants:
        if t.state != TenantState.active:
            continue
        last = latest.get(t.id)
        since = (last.finished_at if last else None) or t.activated_at or t.created_at
        if f.now - since > f.backup_interval + GRACE:
            yield _f(ERROR, "backup-overdue", t.slug,
                     f"no successful backup since {since.isoformat(timespec='minutes')}",
                     f"tenantctl backup run {t.slug} (tenantctl doctor --fix)",
                     fix="backup", slug=t.slug)
    for b in f.backups:
        if b.status == "running" and not b.alive:
            yield _f(WARNING, "backup-interrupted", f"backup {b.id}",
                     f"of {b.slug}: left running by a process that died",
                     "tenantctl doctor --fix (aborts the partial upload, marks it failed)",
                     fix="reap_backups")
        elif b.status == "running" and f.now - b.started_at > STUCK_BACKUP:
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
        if b.status in ("completed", "running"):
            known[b.region].update((b.object_key, b.manifest_key))
    for region, st in sorted(f.stores.items()):
        if st.keys is None:
            yield _f(ERROR, "store-unreachable", f"store of {region}",
                     f"cannot list {st.url}: {st.error}", "check the store and its credentials")
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
                         "tenantctl doctor --fix (deletes this copy, after asking)",
                         fix="delete_object", destructive=True, region=region, key=key)
            elif key not in known[region]:
                yield _f(WARNING, "orphan-object", f"{region}:{key}",
                         "an object no completed backup in the catalog knows",
                         "tenantctl doctor --fix (deletes it, after asking)",
                         fix="delete_object", destructive=True, region=region, key=key)
    for b in f.backups:
        home_store = f.stores.get(b.region)
        if b.status != "completed" or home_store is None or home_store.keys is None:
            continue
        missing = [k for k in (b.object_key, b.manifest_key) if k not in home_store.keys]
        if missing:
            what = "object" if b.object_key in missing else "manifest"
            live = tenant_state.get(b.tenant_id) in LIVE
            yield _f(ERROR, "backup-missing-object", f"backup {b.id}",
                     f"of {b.slug}: its {what} is gone from the {b.region} store",
                     "tenantctl doctor --fix (marks it failed"
                     + (", takes a new backup)" if live else ")"),
                     fix="forget_backup", backup_id=b.id, slug=b.slug, live=live)


def check_revisions(f: Facts) -> Iterator[Finding]:
    from orchestrator.models import MIGRATABLE

    for t in f.tenants:
        if t.state not in MIGRATABLE:
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
        action = tenant_action(TenantFact(t.slug, t.state, t.hold_until, t.purge_after,
                                          t.legal_hold, t.legal_hold_reason), f.now - GRACE)
        if action is None or action.kind not in (DELETE, PURGE):
            continue
        what = "deletion" if action.kind == DELETE else "purge"
        yield _f(ERROR, f"{what}-overdue", t.slug,
                 f"{what} was due {action.due_at.isoformat(timespec='minutes')}"
                 if action.due_at else f"{what} overdue",
                 f"tenantctl retention run --only {action.kind} (tenantctl doctor --fix, "
                 "after asking)", fix=action.kind, destructive=True, slug=t.slug)
    for role, (_db, expires) in sorted(f.grants.items()):
        if expires < f.now - GRACE:
            yield _f(WARNING, "grant-expired", role,
                     f"support access past its end ({expires.isoformat(timespec='minutes')})",
                     "tenantctl retention run --only access (tenantctl doctor --fix)",
                     fix="expire_grants")


# -- gathering ------------------------------------------------------------------------

DATABASES = """
SELECT d.datname, pg_get_userbyid(d.datdba), d.datallowconn,
       coalesce((SELECT array_agg(CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                       ELSE pg_get_userbyid(a.grantee) END)
                 FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
                 WHERE a.privilege_type = 'CONNECT'), '{}'),
       shobj_description(d.oid, 'pg_database')
FROM pg_database d WHERE NOT d.datistemplate
"""
ROLES = r"""
SELECT r.rolname, r.rolsuper, r.rolcreatedb, r.rolcreaterole, r.rolbypassrls,
       r.rolreplication, shobj_description(r.oid, 'pg_authid'),
       coalesce((SELECT array_agg(pg_get_userbyid(m.roleid)) FROM pg_auth_members m
                 WHERE m.member = r.oid), '{}')
FROM pg_roles r
WHERE r.rolname LIKE 'tenant\_%' OR r.rolname LIKE 'owner\_%'
   OR r.rolname LIKE 'tenantctl\_support\_%'
"""
CONNECTIONS = """
SELECT count(*) FILTER (WHERE backend_type = 'client backend'),
       current_setting('max_connections')::int FROM pg_stat_activity
"""


def cluster_id(admin_dsn: str) -> str:
    d = conninfo_to_dict(admin_dsn)
    return f"{d.get('hostaddr') or d.get('host') or 'local'}:{d.get('port') or 5432}"


def _mark(cluster: ClusterFacts | None, database: str) -> tuple[bool, str | None] | None:
    """(marked, revision) of a database on the cluster; None if it is not there."""
    db = cluster.databases.get(database) if cluster is not None else None
    return None if db is None else revision_marks.parse(db.comment)


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


def _read_cluster(fleet: Fleet, server: str, facts: ClusterFacts) -> None:
    try:
        with fleet.server_connection(server) as conn:
            for name, owner, allow, connect, comment in conn.execute(DATABASES):
                facts.databases[name] = Database(owner, allow, frozenset(connect), comment)
            for name, su, cdb, crole, bypass, repl, comment, member_of in conn.execute(ROLES):
                facts.roles[name] = Role(su, cdb, crole, bypass, repl, comment,
                                         frozenset(member_of))
            row = conn.execute(CONNECTIONS).fetchone()
            if row:
                facts.connections, facts.max_connections = int(row[0]), int(row[1])
    except TenantctlError as exc:
        facts.reachable, facts.error = False, first_line(exc)
    except Exception as exc:  # noqa: BLE001 - a server error is a finding, not a crash
        facts.reachable, facts.error = False, first_line(exc)


def _read_store(url: str, facts: StoreFacts) -> None:
    from backups.stores import open_store

    try:
        store = open_store(url)
        facts.keys = {o.key for o in store.objects("tenants/")}
        facts.keys |= {o.key for o in store.objects(ORPHAN_PREFIX)}
    except TenantctlError as exc:
        facts.error = first_line(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. botocore errors
        facts.error = first_line(exc)


def _locked_elsewhere(fleet: Fleet, names: list[str]) -> set[str]:
    """Which of these advisory locks another session holds right now (one query)."""
    if not names:
        return set()
    from sqlalchemy import text

    from orchestrator.catalog import lock_key

    keys = {lock_key(n): n for n in names}
    with fleet.catalog.session() as s:
        held = s.execute(text(
            "SELECT classid::bigint, objid::bigint FROM pg_locks WHERE locktype = "
            "'advisory' AND objsubid = 1 AND granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())")).all()
    # a bigint key is shown as two unsigned halves
    held_keys = {(hi << 32) | lo for hi, lo in held}
    return {n for k, n in keys.items() if k & 0xFFFF_FFFF_FFFF_FFFF in held_keys}


def _settle_marks(fleet: Fleet, tenants: list[Tenant], clusters: dict[str, ClusterFacts],
                  server_cluster: dict[str, str]) -> tuple[dict[int, str | None], set[str]]:
    """For tenants whose database's mark differs from the catalog row read before the
    servers: the catalog's revision now (a rollout may have moved both meanwhile),
    and the locks of those a migration holds right now (marked, not yet recorded)."""
    from orchestrator.models import MIGRATABLE
    from orchestrator.provisioning import tenant_lock

    def differs(t: Tenant) -> bool:
        found = _mark(clusters.get(server_cluster.get(t.server, "")), t.database)
        return t.state in MIGRATABLE and found is not None and found[0] \
            and found[1] != t.revision

    differ = [t for t in tenants if differs(t)]
    if not differ:
        return {}, set()
    with fleet.catalog.session() as s:
        now = dict(s.execute(select(Tenant.id, Tenant.revision)
                             .where(Tenant.id.in_([t.id for t in differ]))).tuples().all())
    return now, _locked_elsewhere(fleet, [tenant_lock(t.slug) for t in differ])


def gather(fleet: Fleet, region: str | None = None, now: datetime | None = None) -> Facts:
    from backups.pipeline import _alive
    from orchestrator.access import role_name
    from orchestrator.provisioning import tenant_lock

    cfg = fleet.cfg
    if region is not None:
        cfg.region(region)
    now = now or clock.utcnow()
    with fleet.catalog.session() as s:
        tq = select(Tenant)
        bq = select(Backup).where(Backup.status.in_(("completed", "running")))
        sq = select(Server)
        if region is not None:
            tq, bq, sq = (tq.where(Tenant.region == region), bq.where(Backup.region == region),
                          sq.where(Server.region == region))
        tenants = list(s.scalars(tq))
        backups = list(s.scalars(bq))
        servers = {sv.name: (sv.region, sv.capacity, sv.template_revision)
                   for sv in s.scalars(sq) if sv.available}
        grant_rows = list(s.execute(
            select(SupportGrant.id, SupportGrant.expires_at, Tenant.database)
            .join(Tenant, Tenant.id == SupportGrant.tenant_id)
            .where(SupportGrant.dropped_at.is_(None))))
    # the configured servers are the truth for where to look (the catalog follows it)
    configured = {sc.name: sc for sc in cfg.servers if region is None or sc.region == region}
    servers = {n: v for n, v in servers.items() if n in configured}
    server_cluster = {n: cluster_id(configured[n].admin_dsn) for n in servers}
    clusters: dict[str, ClusterFacts] = {}
    for n, cid in sorted(server_cluster.items()):
        clusters.setdefault(cid, ClusterFacts(servers=[])).servers.append(n)
    stores = {r.name: StoreFacts(r.name, r.backup_store) for r in cfg.regions.values()
              if region is None or r.name == region}
    provisioning = [t.slug for t in tenants if t.state == TenantState.provisioning]
    running = [b.id for b in backups if b.status == "running"]
    busy = _locked_elsewhere(fleet, [tenant_lock(x) for x in provisioning]
                             + [_alive(x) for x in running])
    jobs: list[Callable[[], None]] = []
    for c in clusters.values():
        jobs.append(lambda c=c: _read_cluster(fleet, c.servers[0], c))  # type: ignore[misc]
    for st in stores.values():
        jobs.append(lambda st=st: _read_store(st.url, st))  # type: ignore[misc]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(jobs)))) as pool:
        list(pool.map(lambda job: job(), jobs))
    revisions, migrating = _settle_marks(fleet, tenants, clusters, server_cluster)
    busy |= migrating
    return Facts(
        now=now, head=fleet.head_revision, use_template=cfg.use_template,
        backup_interval=timedelta(hours=cfg.backup_interval_hours),
        tenants=[TenantRow(t.id, t.slug, t.region, t.server, t.database, t.login_role,
                           t.owner_role, t.state, revisions.get(t.id, t.revision),
                           t.migration_error,
                           t.legal_hold, t.legal_hold_reason, t.hold_until, t.purge_after,
                           t.activated_at, t.created_at,
                           busy=tenant_lock(t.slug) in busy) for t in tenants],
        backups=[BackupRow(b.id, b.tenant_id, b.slug, b.region, b.object_key, b.manifest_key,
                           b.status, b.started_at, b.finished_at, alive=_alive(b.id) in busy)
                 for b in backups],
        servers=servers, server_cluster=server_cluster, clusters=clusters, stores=stores,
        grants={role_name(gid): (db, exp) for gid, exp, db in grant_rows},
        scoped_region=region)


# -- repairing ------------------------------------------------------------------------


@dataclass
class FixResult:
    finding: Finding
    outcome: str  # fixed | skipped | failed
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {**self.finding.to_json(), "outcome": self.outcome, "detail": self.detail}


def repair(fleet: Fleet, region: str | None, confirm: Callable[[Finding], bool],
           on_result: Callable[[FixResult], None] | None = None) -> list[FixResult]:
    """Diagnose, then carry out every automatic fix, destructive ones only when
    ``confirm`` agrees; one failure never stops the others. Under a fleet-wide
    lock, and diagnosed under it, so two concurrent runs repair each thing once."""
    with fleet.catalog.advisory_lock(FIX_LOCK) as got:
        if not got:
            raise Conflict("another `tenantctl doctor --fix` is running; let it finish")
        return _repair(fleet, run(fleet, region), confirm, on_result)


FIX_LOCK = "doctor:fix"


def _repair(fleet: Fleet, findings: list[Finding], confirm: Callable[[Finding], bool],
            on_result: Callable[[FixResult], None] | None) -> list[FixResult]:
    results: list[FixResult] = []
    once: set[str] = set()
    for finding in findings:
        if finding.fix is None:
            continue
        if finding.fix in ONCE:
            if finding.fix in once:
                continue
            once.add(finding.fix)
        if finding.destructive and not confirm(finding):
            result = FixResult(finding, "skipped", "not confirmed (destructive: confirm "
                               "at the prompt, or pass --yes)")
        else:
            try:
                detail = FIXES[finding.fix](fleet, finding)
                result = FixResult(finding, "fixed", detail)
                fleet.catalog.audit("doctor.fix", tenant=_tenant_of(finding),
                                    fix=finding.fix, subject=finding.subject, detail=detail)
            except Exception as exc:  # noqa: BLE001 - report it, go on with the rest
                result = FixResult(finding, "failed", first_line(exc))
                fleet.catalog.audit("doctor.fix", tenant=_tenant_of(finding),
                                    outcome="failed", fix=finding.fix,
                                    subject=finding.subject, error=first_line(exc))
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _tenant_of(finding: Finding) -> str | None:
    slug = dict(finding.args).get("slug")
    return str(slug) if slug else None


def _admin_exec(fleet: Fleet, server: str, stmt: sql.Composed) -> None:
    with fleet.server_connection(server) as conn:
        conn.execute(stmt)


def _fix_provision(fleet: Fleet, x: Finding) -> str:
    fleet.provision(x.arg("slug"), x.arg("region"))
    return "provisioning finished"


def _fix_backup(fleet: Fleet, x: Finding) -> str:
    from backups.pipeline import run_backup

    return f"backup {run_backup(fleet, x.arg('slug'), kind='doctor').id} taken"


def _fix_reap(fleet: Fleet, x: Finding) -> str:
    from backups.pipeline import reap_dead

    return f"{reap_dead(fleet)} interrupted backup(s) marked failed"


def _fix_forget_backup(fleet: Fleet, x: Finding) -> str:
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(Backup).where(Backup.id == x.arg("backup_id"), Backup.status ==
                                       "completed").values(
            status="failed", error="object or manifest gone from the store (doctor)"))
    if not x.arg("live"):
        return "marked failed"
    return "marked failed; " + _fix_backup(fleet, x)


def _fix_revoke_public(fleet: Fleet, x: Finding) -> str:
    _admin_exec(fleet, x.arg("server"), sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC")
                .format(sql.Identifier(x.arg("database"))))
    return "PUBLIC revoked"


def _fix_revoke_connect(fleet: Fleet, x: Finding) -> str:
    _admin_exec(fleet, x.arg("server"), sql.SQL("REVOKE CONNECT ON DATABASE {} FROM {}")
                .format(sql.Identifier(x.arg("database")), sql.Identifier(x.arg("role"))))
    return "CONNECT revoked"


def _fix_strip_powers(fleet: Fleet, x: Finding) -> str:
    _admin_exec(fleet, x.arg("server"), sql.SQL("ALTER ROLE {} NOCREATEDB NOCREATEROLE")
                .format(sql.Identifier(x.arg("role"))))
    return "CREATEDB/CREATEROLE removed"


def _fix_revoke_membership(fleet: Fleet, x: Finding) -> str:
    _admin_exec(fleet, x.arg("server"), sql.SQL("REVOKE {} FROM {}").format(
        sql.Identifier(x.arg("parent")), sql.Identifier(x.arg("role"))))
    return "membership revoked"


def _fix_template(fleet: Fleet, x: Finding) -> str:
    from orchestrator import templates

    return f"template at {templates.build(fleet, x.arg('server'))}"


def _fix_expire_grants(fleet: Fleet, x: Finding) -> str:
    from orchestrator import access

    ended = [access.expire(fleet, g.id) for g in access.expired(fleet, clock.utcnow())]
    return f"{len(ended)} support grant(s) ended"


def _fix_retention(fleet: Fleet, x: Finding) -> str:
    from orchestrator import retention

    step = retention.delete_tenant if x.fix == DELETE else retention.purge_tenant
    outcome, detail = step(fleet, x.arg("slug"), clock.utcnow())
    if outcome != "done":
        raise TenantctlError(f"{x.fix} {outcome}: {detail}")
    return detail


def _fix_delete_object(fleet: Fleet, x: Finding) -> str:
    from backups.stores import open_store

    open_store(fleet.cfg.region(x.arg("region")).backup_store).delete(x.arg("key"))
    return "object deleted"


def _fix_drop_orphan_role(fleet: Fleet, x: Finding) -> str:
    role = sql.Identifier(x.arg("role"))
    # DROP ROLE refuses while the role owns anything or holds privileges somewhere
    # else than this database: then the remedy stays manual, nothing is forced.
    _admin_exec(fleet, x.arg("server"), sql.SQL("DROP ROLE {}").format(role))
    return "role dropped"


def _fix_drop_orphan_database(fleet: Fleet, x: Finding) -> str:
    """pg_dump the orphan, encrypted to a fresh age key whose identity goes into the
    manifest wrapped by the master key, into the region's store; drop only once
    that dump is complete."""
    server, database = x.arg("server"), x.arg("database")
    region = fleet.cfg.server(server).region
    key = dump_orphan(fleet, server, database, region)
    _admin_exec(fleet, server, sql.SQL("DROP DATABASE {} WITH (FORCE)")
                .format(sql.Identifier(database)))
    return f"dumped to {region}:{key}, then dropped"


def dump_orphan(fleet: Fleet, server: str, database: str, region: str) -> str:
    import pyrage

    from backups.pipeline import dump_encrypt_upload
    from backups.stores import open_store
    from orchestrator.catalog import with_dbname
    from orchestrator.localfleet import pg_tool

    store = open_store(fleet.cfg.region(region).backup_store)
    identity = pyrage.x25519.Identity.generate()
    stamp = clock.utcnow().strftime("%Y%m%dT%H%M%SZ")
    base = f"{ORPHAN_PREFIX}{server}/{database}-{stamp}"
    dsn = with_dbname(fleet.cfg.server(server).admin_dsn, database)
    size, sha = dump_encrypt_upload(pg_tool(fleet.cfg, "pg_dump"), dsn, None,
                                    str(identity.to_public()), store, f"{base}.dump.age",
                                    lock_wait=fleet.cfg.lock_timeout)
    wrapped = fleet.master_key.wrap(str(identity).encode(), f"orphan:{base}")
    store.put_bytes(f"{base}.manifest.json", json.dumps({
        "format": "tenantctl-orphan/1", "server": server, "database": database,
        "region": region, "size": size, "sha256": sha,
        "identity_wrapped": wrapped, "master_key_id": fleet.master_key.key_id,
        "taken_at": stamp}, indent=2).encode())
    return f"{base}.dump.age"


FIXES: dict[str, Callable[[Fleet, Finding], str]] = {
    "provision": _fix_provision, "backup": _fix_backup, "reap_backups": _fix_reap,
    "forget_backup": _fix_forget_backup, "revoke_public": _fix_revoke_public,
    "revoke_connect": _fix_revoke_connect, "strip_powers": _fix_strip_powers,
    "revoke_membership": _fix_revoke_membership, "build_template": _fix_template,
    "expire_grants": _fix_expire_grants, DELETE: _fix_retention, PURGE: _fix_retention,
    "delete_object": _fix_delete_object, "drop_orphan_role": _fix_drop_orphan_role,
    "drop_orphan_database": _fix_drop_orphan_database,
}
ONCE = {"reap_backups", "expire_grants"}


def run(fleet: Fleet, region: str | None = None, now: datetime | None = None
        ) -> list[Finding]:
    return diagnose(gather(fleet, region, now))

