"""`tenantctl doctor`: the catalog compared with every server and every store.

Three parts, as everywhere in tenantctl:

- ``gather`` reads the catalog once, each Postgres cluster once (a handful of
  catalog queries, whatever its number of databases) and each region's store
  once, into plain data (``Facts``);
- ``diagnose`` (orchestrator/domain/health.py, with the facts' types) is a pure
  function of those facts and ``now``: a list of ``Finding``s, each with a
  severity, what is wrong and the exact remedy;
- ``repair`` carries out the remedies that have an automatic fix. The safe
  ones (re-grants, a missing backup, an unfinished step, a stale template)
  just run; the destructive ones (dropping an orphan, deleting an object,
  finishing a deletion) run only after ``confirm`` said yes, and an orphan
  database is backed up before it is dropped.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
import pyrage
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import select, text, update
from sqlalchemy.orm import selectinload

from backups.service import _alive, dump_encrypt_upload, hold_large_objects, reap_dead, run_backup
from backups.stores import open_store
from orchestrator.adapters import clock
from orchestrator.adapters.catalog.db import lock_key, with_dbname
from orchestrator.adapters.catalog.locks import holding_tenant
from orchestrator.adapters.catalog.models import (
    PLACED_STATES,
    Backup,
    Server,
    SupportGrant,
    Tenant,
    TenantKey,
    TenantMove,
    TenantState,
)
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import move_copy
from orchestrator.domain.budget import ServerBudget
from orchestrator.domain.errors import (
    Conflict,
    MasterKeyError,
    TenantctlError,
    first_line,
)
from orchestrator.domain.health import (
    ORPHAN_PREFIX,
    SUPPORT_ROLE,
    BackupRow,
    ClusterFacts,
    Database,
    Facts,
    Finding,
    MoveRow,
    PoolerFact,
    Role,
    StoreFacts,
    TenantRow,
    _mark,
    _names,
    diagnose,
)
from orchestrator.domain.names import password_context, tenant_lock
from orchestrator.domain.retention_plan import DELETE, PURGE
from orchestrator.domain.states import HAS_DATABASE
from orchestrator.domain.statuses import BackupStatus
from orchestrator.services import (
    access,
    move,
    plans,
    pooler,
    provisioning,
    quota,
    retention,
    templates,
)
from orchestrator.services import budget as budgets
from orchestrator.services.access import role_name

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps
    from orchestrator.config import Config


# -- gathering ------------------------------------------------------------------------

DATABASES = """
SELECT d.datname, pg_get_userbyid(d.datdba), d.datallowconn,
       coalesce((SELECT array_agg(CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                       ELSE pg_get_userbyid(a.grantee) END)
                 FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
                 WHERE a.privilege_type = 'CONNECT'), '{}'),
       shobj_description(d.oid, 'pg_database'),
       coalesce((SELECT array_agg(pg_get_userbyid(a.grantee))
                 FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a
                 WHERE a.privilege_type = 'TEMPORARY' AND a.grantee <> 0), '{}')
FROM pg_database d WHERE NOT d.datistemplate
"""
ROLES = r"""
SELECT r.rolname, r.rolsuper, r.rolcreatedb, r.rolcreaterole, r.rolbypassrls,
       r.rolreplication, shobj_description(r.oid, 'pg_authid'),
       coalesce((SELECT array_agg(pg_get_userbyid(m.roleid)) FROM pg_auth_members m
                 WHERE m.member = r.oid), '{}'),
       r.rolconnlimit,
       coalesce((SELECT array_agg(CASE WHEN s.setdatabase = 0 THEN c
                                       ELSE '@' || coalesce(d.datname, s.setdatabase::text)
                                            || ':' || c END)
                 FROM pg_db_role_setting s CROSS JOIN unnest(s.setconfig) c
                 LEFT JOIN pg_database d ON d.oid = s.setdatabase
                 WHERE s.setrole = r.oid), '{}'),
       pg_has_role(r.oid, 'USAGE')
FROM pg_roles r
WHERE r.rolname LIKE 'tenant\_%' OR r.rolname LIKE 'owner\_%'
   OR r.rolname LIKE 'tenantctl\_support\_%'
"""
# large objects per database and owner, for the whole cluster from one shared catalog
LARGE_OBJECTS = """
SELECT d.datname, pg_get_userbyid(s.refobjid), count(*)
FROM pg_shdepend s JOIN pg_database d ON d.oid = s.dbid
WHERE s.classid = 'pg_largeobject'::regclass AND s.deptype = 'o'
GROUP BY 1, 2
"""
# other roles' sessions show no backend_type to the admin (no pg_read_all_stats),
# but do show their database: a tenant's flood is counted too
CONNECTIONS = """
SELECT count(*) FILTER (WHERE backend_type = 'client backend'
                        OR (backend_type IS NULL AND datid IS NOT NULL)),
       current_setting('max_connections')::int FROM pg_stat_activity
"""
RESERVE = """
SELECT current_setting('server_version_num')::int, current_user,
       coalesce((SELECT setting::int FROM pg_settings
                 WHERE name = 'reserved_connections'), 0),
       coalesce((SELECT pending_restart FROM pg_settings
                 WHERE name = 'reserved_connections'), false),
       current_setting('superuser_reserved_connections')::int,
       CASE WHEN to_regrole('pg_use_reserved_connections') IS NULL THEN false
            ELSE pg_has_role(to_regrole('pg_use_reserved_connections'), 'USAGE') END
"""


def cluster_id(admin_dsn: str) -> str:
    d = conninfo_to_dict(admin_dsn)
    return f"{d.get('hostaddr') or d.get('host') or 'local'}:{d.get('port') or 5432}"


# a logical move's objects (domain/names.move_object_name): slots, subscriptions (in
# which database) and temporary roles, cluster-wide
MOVE_OBJECTS = r"""
SELECT 'slot', slot_name::text, NULL FROM pg_replication_slots
 WHERE slot_name LIKE 'tctl\_move\_%'
UNION ALL
SELECT 'subscription', s.subname::text, d.datname::text FROM pg_subscription s
  JOIN pg_database d ON d.oid = s.subdbid WHERE s.subname LIKE 'tctl\_move\_%'
UNION ALL
SELECT 'role', rolname::text, NULL FROM pg_roles WHERE rolname LIKE 'tctl\_move\_%'
"""


def _read_cluster(fleet: Deps, server: str, facts: ClusterFacts) -> None:
    try:
        with fleet.server_connection(server) as conn:
            for name, owner, allow, connect, comment, temp in conn.execute(DATABASES):
                facts.databases[name] = Database(owner, allow, frozenset(connect), comment,
                                                 frozenset(temp))
            for (name, su, cdb, crole, bypass, repl, comment, member_of, limit,
                 settings, reads) in conn.execute(ROLES):
                facts.roles[name] = Role(su, cdb, crole, bypass, repl, comment,
                                         frozenset(member_of), limit, frozenset(settings),
                                         reads)
            reserve = conn.execute(RESERVE).fetchone()
            if reserve:
                (facts.version, facts.admin, facts.reserved_connections,
                 facts.reserve_pending, facts.superuser_reserved,
                 facts.admin_reserved) = reserve
            facts.admin_bounds_temp = pgserver.can_set_parameter(conn, "temp_file_limit")
            facts.logical = pgserver.logical_readiness(conn)
            for dbname, owner, n in conn.execute(LARGE_OBJECTS):
                facts.large_objects.setdefault(dbname, {})[owner] = int(n)
            row = conn.execute(CONNECTIONS).fetchone()
            if row:
                facts.connections, facts.max_connections = int(row[0]), int(row[1])
            facts.fleet_mark = pgserver.server_fleet_id(conn)
            facts.move_objects = {(k, n, d or "") for k, n, d in conn.execute(MOVE_OBJECTS)}
    except TenantctlError as exc:
        facts.reachable, facts.error = False, first_line(exc)
    except Exception as exc:  # noqa: BLE001 - a server error is a finding, not a crash
        facts.reachable, facts.error = False, first_line(exc)


def _read_store(url: str, facts: StoreFacts) -> None:
    try:
        store = open_store(url)
        facts.keys = {o.key for o in store.objects("tenants/")}
        facts.keys |= {o.key for o in store.objects(ORPHAN_PREFIX)}
        facts.unfinished = [(u.name, u.key, u.started_at) for u in store.unfinished()]
    except TenantctlError as exc:
        facts.error = first_line(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. botocore errors
        facts.error = first_line(exc)


def _locked_elsewhere(fleet: Deps, names: list[str]) -> set[str]:
    """Which of these advisory locks another session holds right now (one query)."""
    if not names:
        return set()

    keys = {lock_key(n): n for n in names}
    with fleet.catalog.session() as s:
        held = s.execute(text(
            "SELECT classid::bigint, objid::bigint FROM pg_locks WHERE locktype = "
            "'advisory' AND objsubid = 1 AND granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())")).all()
    # a bigint key is shown as two unsigned halves
    held_keys = {(hi << 32) | lo for hi, lo in held}
    return {n for k, n in keys.items() if k & 0xFFFF_FFFF_FFFF_FFFF in held_keys}


def _settle_marks(fleet: Deps, tenants: list[Tenant], clusters: dict[str, ClusterFacts],
                  server_cluster: dict[str, str]) -> tuple[dict[int, str | None], set[str]]:
    """For tenants whose database's mark differs from the catalog row read before the
    servers: the catalog's revision now (a rollout may have moved both meanwhile),
    and the locks of those a migration holds right now (marked, not yet recorded)."""
    def differs(t: Tenant) -> bool:
        found = _mark(clusters.get(server_cluster.get(t.server, "")), t.database)
        return t.state in HAS_DATABASE and found is not None and found[0] \
            and found[1] != t.revision

    differ = [t for t in tenants if differs(t)]
    if not differ:
        return {}, set()
    with fleet.catalog.session() as s:
        now = dict(s.execute(select(Tenant.id, Tenant.revision)
                             .where(Tenant.id.in_([t.id for t in differ]))).tuples().all())
    return now, _locked_elsewhere(fleet, [tenant_lock(t.slug) for t in differ])


def _probe_logins(fleet: Deps, tenants: list[Tenant], clusters: dict[str, ClusterFacts],
                  server_cluster: dict[str, str]) -> tuple[set[str], str | None]:
    """Log in as each tenant that may log in, with the password tenantctl holds for it
    (a tenant may change its own role's password): the slugs the server refused on
    the password, and why none were tried if so. Any other refusal (server full, the
    role at its connection limit) proves nothing and is not reported here."""
    def may_log_in(t: Tenant) -> bool:
        c = clusters.get(server_cluster.get(t.server, ""))
        role = c.roles.get(t.login_role) if c is not None and c.reachable else None
        cred = t.credential
        return t.state in (TenantState.active, TenantState.cancelled) and role is not None \
            and cred is not None and cred.applied_at is not None \
            and _names(t.slug) is not None
    candidates = [t for t in tenants if may_log_in(t)]
    if not candidates:
        return set(), None
    try:
        master = fleet.keys.master
    except TenantctlError as exc:
        return set(), first_line(exc)
    dsns = {}
    for t in candidates:
        assert t.credential is not None
        try:
            password = master.unwrap(t.credential.password_wrapped,
                                     password_context(t.slug)).decode()
        except TenantctlError:
            continue  # a key problem: not this check's to report
        dsns[t.slug] = fleet.tenant_dsn(t, password, direct=True)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(dsns)))) as pool:
        works = dict(zip(dsns, pool.map(pgserver.role_works, dsns.values()), strict=True))
    return {slug for slug, ok in works.items() if ok is False}, None


def gather(fleet: Deps, region: str | None = None, now: datetime | None = None) -> Facts:
    cfg = fleet.cfg
    if region is not None:
        cfg.region(region)
    now = now or clock.utcnow()
    with fleet.catalog.session() as s:
        tq = select(Tenant).options(selectinload(Tenant.credential))
        bq = select(Backup).where(Backup.status.in_((BackupStatus.completed,
                                                    BackupStatus.running)))
        sq = select(Server)
        if region is not None:
            tq, bq, sq = (tq.where(Tenant.region == region), bq.where(Backup.region == region),
                          sq.where(Server.region == region))
        tenants = list(s.scalars(tq))
        destroyed = set(s.scalars(select(TenantKey.tenant_id).where(
            TenantKey.destroyed_at.is_not(None))))
        backups = list(s.scalars(bq))
        servers = {sv.name: (sv.region, sv.capacity, sv.template_revision)
                   for sv in s.scalars(sq) if sv.available}
        grant_rows = list(s.execute(
            select(SupportGrant.id, SupportGrant.expires_at, Tenant.database,
                   SupportGrant.read_only)
            .join(Tenant, Tenant.id == SupportGrant.tenant_id)
            .where(SupportGrant.dropped_at.is_(None))))
        recorded_key, wrapped = fleet.keys.catalog_key_id(s), fleet.keys.wrapped_key_ids(s)
    try:
        configured_key: str | None = fleet.keys.master.key_id
        key_error = None
    except MasterKeyError as exc:
        configured_key, key_error = None, str(exc)
    # the configured servers are the truth for where to look (the catalog follows it)
    configured = {sc.name: sc for sc in cfg.servers if region is None or sc.region == region}
    servers = {n: v for n, v in servers.items() if n in configured}
    server_cluster = {n: cluster_id(configured[n].admin_dsn) for n in servers}
    clusters: dict[str, ClusterFacts] = {}
    for n, cid in sorted(server_cluster.items()):
        clusters.setdefault(cid, ClusterFacts(servers=[])).servers.append(n)
    stores = {r.name: StoreFacts(r.name, r.backup_store) for r in cfg.regions.values()
              if region is None or r.name == region}
    # tenants a step may be working on right now: is a process holding their lock?
    provisioning = [t.slug for t in tenants if t.state == TenantState.provisioning
                    or (t.state in HAS_DATABASE and (t.step is not None or t.id in destroyed))]
    with fleet.catalog.session() as s:
        move_rows = list(s.scalars(select(TenantMove).where(TenantMove.finished_at.is_(None))))
    provisioning += [m.slug for m in move_rows]
    running = [b.id for b in backups if b.status == BackupStatus.running]
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
    dead, unchecked = _probe_logins(fleet, [t for t in tenants
                                            if tenant_lock(t.slug) not in busy],
                                    clusters, server_cluster)
    return Facts(
        now=now, head=fleet.head_revision, use_template=cfg.use_template,
        backup_interval=timedelta(hours=cfg.backup_interval_hours),
        tenants=[TenantRow(t.id, t.slug, t.region, t.server, t.database, t.login_role,
                           t.owner_role, t.state, revisions.get(t.id, t.revision),
                           t.migration_error,
                           t.legal_hold, t.legal_hold_reason, t.hold_until, t.purge_after,
                           t.activated_at, t.created_at,
                           busy=tenant_lock(t.slug) in busy, step=t.step,
                           key_destroyed=t.id in destroyed, plan=t.plan,
                           over_quota=t.over_quota)
                 for t in tenants],
        backups=[BackupRow(b.id, b.tenant_id, b.slug, b.region, b.object_key, b.manifest_key,
                           b.status, b.started_at, b.finished_at, alive=_alive(b.id) in busy)
                 for b in backups],
        servers=servers, server_cluster=server_cluster, clusters=clusters, stores=stores,
        grants={role_name(gid): (db, exp) for gid, exp, db, _ro in grant_rows},
        scoped_region=region, master_key_id=configured_key, key_error=key_error,
        catalog_key_id=recorded_key, wrapped_key_ids=wrapped,
        fleet_id=fleet.catalog.fleet_id(), bounds=cfg.bounds,
        plans={name: p.bounds for name, p in cfg.plans.items()}, dead_logins=frozenset(dead),
        logins_unchecked=unchecked,
        grant_ids={role_name(gid): (gid, ro) for gid, _exp, _db, ro in grant_rows},
        moves=[MoveRow(m.tenant_id, m.slug, m.from_server, m.to_server, m.step,
                       busy=tenant_lock(m.slug) in busy) for m in move_rows],
        budgets=_budgets(cfg, tenants, servers, server_cluster, clusters),
        poolers=_poolers(fleet, [n for n, sc in configured.items() if sc.pooler is not None]))


def _poolers(fleet: Deps, servers: list[str]) -> dict[str, PoolerFact]:
    out = {}
    for name in servers:
        h = pooler.check(fleet, name)
        out[name] = PoolerFact(name, h.pooler, h.up, h.down_reason, tuple(h.stale))
    return out


def _budgets(cfg: Config, tenants: Iterable[Tenant], servers: Iterable[str],
             server_cluster: dict[str, str], clusters: dict[str, ClusterFacts]
             ) -> dict[str, ServerBudget]:
    """Each configured server's budget, against the max_connections just read."""
    placed: dict[str, Counter[str]] = defaultdict(Counter)
    for t in tenants:
        if t.state in PLACED_STATES:
            placed[t.server][t.plan] += 1
    out = {}
    for name in servers:
        c = clusters.get(server_cluster.get(name, ""))
        if c is None or not any(s.name == name for s in cfg.servers):
            continue
        slots = (c.max_connections, c.superuser_reserved + c.reserved_connections) \
            if c.reachable and c.max_connections else None
        out[name] = budgets.server_budget(cfg, name, placed[name].items(), slots)
    return out


# -- repairing ------------------------------------------------------------------------


@dataclass
class FixResult:
    finding: Finding
    outcome: str  # fixed | skipped | failed
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {**self.finding.to_json(), "outcome": self.outcome, "detail": self.detail}


def repair(fleet: Deps, region: str | None, confirm: Callable[[Finding], bool],
           on_result: Callable[[FixResult], None] | None = None) -> list[FixResult]:
    """Diagnose, then carry out every automatic fix, destructive ones only when
    ``confirm`` agrees; one failure never stops the others. Under a fleet-wide
    lock, and diagnosed under it, so two concurrent runs repair each thing once."""
    with fleet.catalog.advisory_lock(FIX_LOCK) as got:
        if not got:
            raise Conflict("another `tenantctl doctor --fix` is running; let it finish")
        return _repair(fleet, run(fleet, region), confirm, on_result)


FIX_LOCK = "doctor:fix"


def _repair(fleet: Deps, findings: list[Finding], confirm: Callable[[Finding], bool],
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


def _admin(fleet: Deps, server: str, op: Callable[..., None], *args: str) -> None:
    with fleet.server_connection(server) as conn:
        op(conn, *args)


def _fix_provision(fleet: Deps, x: Finding) -> str:
    # shown to nobody yet: a re-run of the tenant's create shows its connection string
    provisioning.provision_tenant(fleet, x.arg("slug"), x.arg("region"), shown=False)
    return "provisioning finished"


def _fix_backup(fleet: Deps, x: Finding) -> str:
    return f"backup {run_backup(fleet, x.arg('slug'), kind='doctor').id} taken"


def _fix_reap(fleet: Deps, x: Finding) -> str:
    return f"{reap_dead(fleet)} interrupted backup(s) marked failed"


def _fix_forget_backup(fleet: Deps, x: Finding) -> str:
    with fleet.catalog.session() as s, s.begin():
        s.execute(update(Backup).where(Backup.id == x.arg("backup_id"), Backup.status ==
                                       BackupStatus.completed).values(
            status=BackupStatus.failed, error="object or manifest gone from the store (doctor)"))
    if not x.arg("live"):
        return "marked failed"
    return "marked failed; " + _fix_backup(fleet, x)


def _fix_revoke_public(fleet: Deps, x: Finding) -> str:
    _admin(fleet, x.arg("server"), pgserver.revoke_public, x.arg("database"))
    return "PUBLIC revoked"


def _fix_revoke_connect(fleet: Deps, x: Finding) -> str:
    _admin(fleet, x.arg("server"), pgserver.revoke_connect, x.arg("database"), x.arg("role"))
    return "CONNECT revoked"


def _fix_strip_powers(fleet: Deps, x: Finding) -> str:
    _admin(fleet, x.arg("server"), pgserver.strip_role_powers, x.arg("role"))
    return "CREATEDB/CREATEROLE removed"


def _fix_revoke_membership(fleet: Deps, x: Finding) -> str:
    _admin(fleet, x.arg("server"), pgserver.revoke_membership, x.arg("parent"), x.arg("role"))
    return "membership revoked"


def _fix_template(fleet: Deps, x: Finding) -> str:
    return f"template at {templates.build(fleet, x.arg('server'))}"


def _fix_expire_grants(fleet: Deps, x: Finding) -> str:
    ended = [access.expire(fleet, g.id) for g in access.expired(fleet, clock.utcnow())]
    ended += [access.expire(fleet, gid, tampered=why)
              for gid, why in access.tampered(fleet).items()]
    return f"{len(ended)} support grant(s) ended"


def _fix_grant_membership(fleet: Deps, x: Finding) -> str:
    with fleet.server_connection(x.arg("server")) as conn:
        pgserver.grant_membership(conn, x.arg("role"))
    return "membership granted"


def _fix_hold_large_objects(fleet: Deps, x: Finding) -> str:
    hold_large_objects(fleet, x.arg("slug"))
    return "large objects taken over (read-only for the login role)"


def _fix_sync_writes(fleet: Deps, x: Finding) -> str:
    return quota.sync_writes(fleet, x.arg("slug"))


def _fix_retention(fleet: Deps, x: Finding) -> str:
    step = retention.delete_tenant if x.fix == DELETE else retention.purge_tenant
    outcome, detail = step(fleet, x.arg("slug"), clock.utcnow())
    if outcome != "done":
        raise TenantctlError(f"{x.fix} {outcome}: {detail}")
    return detail


def _fix_finish_erase(fleet: Deps, x: Finding) -> str:
    retention.erase_tenant(fleet, x.arg("slug"), "finishing an interrupted erasure "
                           "(doctor --fix)", clock.utcnow())
    return "erasure finished"


def _fix_delete_object(fleet: Deps, x: Finding) -> str:
    open_store(fleet.cfg.region(x.arg("region")).backup_store).delete(x.arg("key"))
    return "object deleted"


def _fix_discard_upload(fleet: Deps, x: Finding) -> str:
    open_store(fleet.cfg.region(x.arg("region")).backup_store).discard_unfinished(
        x.arg("name"))
    return "unfinished upload removed"


def _fix_bound_role(fleet: Deps, x: Finding) -> str:
    applied = plans.apply_plan(fleet, x.arg("server"), x.arg("role"),
                               fleet.cfg.plan(x.arg("plan")))
    limit = applied.pop("connection_limit")
    return f"plan {x.arg('plan')}: connection limit {limit}, settings " + \
        ", ".join(f"{k}={v}" for k, v in sorted(applied.items()))


def _fix_sync_pooler(fleet: Deps, x: Finding) -> str:
    res = pooler.sync(fleet, x.arg("server"))
    if res.warning is not None:
        raise Conflict(res.warning)
    return f"pooler files written ({res.tenants} tenant database(s) listed), RELOAD done"


def _fix_reapply_password(fleet: Deps, x: Finding) -> str:
    """The stored password, as a fresh verifier, under the tenant's lock (a rotation
    cannot cross it); a rotation left pending is `tenant credentials`' to finish."""
    slug = x.arg("slug")
    with holding_tenant(fleet.catalog, slug):
        tenant = fleet.get_tenant(slug)
        cred = tenant.credential
        if cred is None or cred.applied_at is None:
            raise Conflict(f"a password rotation of {slug!r} is pending: run "
                           f"`tenantctl tenant credentials {slug}` to finish it")
        password = fleet.keys.master.unwrap(cred.password_wrapped,
                                           password_context(slug)).decode()
        with fleet.server_connection(tenant.server) as conn:
            pgserver.set_password(conn, tenant.login_role, password)
    return "stored password re-applied"


def _fix_drop_orphan_role(fleet: Deps, x: Finding) -> str:
    if SUPPORT_ROLE.match(x.arg("role")):  # what it made goes to the database's owner
        server = x.arg("server")
        with fleet.server_connection(server) as conn:
            pgserver.set_login(conn, x.arg("role"), False)
            pgserver.terminate_sessions(conn, role=x.arg("role"), wait=True)
            pgserver.drop_role_everywhere(conn, fleet.cfg.server(server).admin_dsn,
                                          x.arg("role"), server=server,
                                          lock_timeout=fleet.cfg.lock_timeout)
        return "role dropped (what it owned handed to the database's owner)"
    # DROP ROLE refuses while the role owns anything or holds privileges somewhere
    # else than this database: then the remedy stays manual, nothing is forced.
    _admin(fleet, x.arg("server"), pgserver.drop_role, x.arg("role"))
    return "role dropped"


def _fix_drop_orphan_database(fleet: Deps, x: Finding) -> str:
    """pg_dump the orphan, encrypted to a fresh age key whose identity goes into the
    manifest wrapped by the master key, into the region's store; drop only once
    that dump is complete."""
    server, database = x.arg("server"), x.arg("database")
    region = fleet.cfg.server(server).region
    key = dump_orphan(fleet, server, database, region)
    _admin(fleet, server, pgserver.drop_database, database)
    return f"dumped to {region}:{key}, then dropped"


def dump_orphan(fleet: Deps, server: str, database: str, region: str) -> str:
    store = open_store(fleet.cfg.region(region).backup_store, fleet.cfg.s3)
    identity = pyrage.x25519.Identity.generate()
    stamp = clock.utcnow().strftime("%Y%m%dT%H%M%SZ")
    base = f"{ORPHAN_PREFIX}{server}/{database}-{stamp}"
    dsn = with_dbname(fleet.cfg.server(server).admin_dsn, database)
    with fleet.catalog.session() as s, s.begin():
        master = fleet.keys.writing_key(s)  # before anything is dumped
    size, sha = dump_encrypt_upload(fleet.pg_tools.path("pg_dump"), dsn, None,
                                    str(identity.to_public()), store, f"{base}.dump.age",
                                    lock_wait=fleet.cfg.lock_timeout)
    wrapped = master.wrap(str(identity).encode(), f"orphan:{base}")
    store.put_bytes(f"{base}.manifest.json", json.dumps({
        "format": "tenantctl-orphan/1", "server": server, "database": database,
        "region": region, "size": size, "sha256": sha,
        "identity_wrapped": wrapped, "master_key_id": master.key_id,
        "taken_at": stamp}, indent=2).encode())
    return f"{base}.dump.age"


def _fix_finish_move(fleet: Deps, x: Finding) -> str:
    res = move.move_tenant(fleet, x.arg("slug"), server=x.arg("server"))
    return f"move finished: on {res.new_server}"


def _fix_abort_move(fleet: Deps, x: Finding) -> str:
    res = move.abort_move(fleet, x.arg("slug"))
    return f"move aborted: it stays on {res.old_server}"


def _fix_drop_move_leftover(fleet: Deps, x: Finding) -> str:
    server, kind, name = x.arg("server"), x.arg("kind"), x.arg("name")
    if kind == "subscription":
        with pgserver.connect(fleet.cfg.server(server).admin_dsn, x.arg("database"),
                              server=server) as conn:
            try:
                move_copy.drop_subscription(conn, name)
            except psycopg.OperationalError:  # its publisher is gone: its slot too
                move_copy.drop_subscription(conn, name, keep_slot=True)
    else:
        with fleet.server_connection(server) as conn:
            if kind == "slot":
                move_copy.drop_slot(conn, name)
            else:
                pgserver.drop_role_everywhere(conn, fleet.cfg.server(server).admin_dsn, name,
                                              server=server,
                                              lock_timeout=fleet.cfg.lock_timeout)
    return f"{kind} {name} dropped"


FIXES: dict[str, Callable[[Deps, Finding], str]] = {
    "provision": _fix_provision, "backup": _fix_backup, "reap_backups": _fix_reap,
    "forget_backup": _fix_forget_backup, "revoke_public": _fix_revoke_public,
    "revoke_connect": _fix_revoke_connect, "strip_powers": _fix_strip_powers,
    "revoke_membership": _fix_revoke_membership, "build_template": _fix_template,
    "expire_grants": _fix_expire_grants, DELETE: _fix_retention, PURGE: _fix_retention,
    "delete_object": _fix_delete_object, "drop_orphan_role": _fix_drop_orphan_role,
    "drop_orphan_database": _fix_drop_orphan_database, "discard_upload": _fix_discard_upload,
    "finish_erase": _fix_finish_erase, "bound_role": _fix_bound_role,
    "reapply_password": _fix_reapply_password, "sync_pooler": _fix_sync_pooler,
    "grant_membership": _fix_grant_membership, "hold_large_objects": _fix_hold_large_objects,
    "sync_writes": _fix_sync_writes,
    "finish_move": _fix_finish_move, "abort_move": _fix_abort_move,
    "drop_move_leftover": _fix_drop_move_leftover,
}
ONCE = {"reap_backups", "expire_grants"}


def run(fleet: Deps, region: str | None = None, now: datetime | None = None
        ) -> list[Finding]:
    return diagnose(gather(fleet, region, now))

