"""In-memory fakes of the ports (``orchestrator.ports``) for the fast test tier: the
catalog, the servers, the object stores, the backup pipeline and the clock. They
keep just enough state to say what a service did (rows, roles, databases, sessions,
objects) and nothing else; ``World`` wires them into a ``Deps``.

They are not Postgres: what only Postgres can show (a refused connection, a
privilege, a lock held by another session) stays in the acceptance tier.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from backups.policy import Verdict
from orchestrator.adapters.catalog.audit import redact
from orchestrator.bootstrap import Deps
from orchestrator.config import (
    Config,
    LifecycleConfig,
    MasterKeySource,
    RegionConfig,
    ServerConfig,
)
from orchestrator.domain.errors import Conflict, NotFound, TenantctlError
from orchestrator.domain.marks import role_marker
from orchestrator.domain.names import TenantNames, check_integrity, tenant_names, validate_slug
from orchestrator.ports import (
    BackupRecord,
    GrantRecord,
    ServerOperationFailed,
    ServerRecord,
    TenantRecord,
)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
REGIONS = {"eu-central": ("eu-central-1", "eu-central-2"), "ap-south": ("ap-south-1",)}


def store_url(region: str) -> str:
    return f"file:///fake/backups/{region}"


def fake_config(*, hold_days: int = 30, purge_days: int = 90, audit_days: int = 365
                ) -> Config:
    """A config naming servers nobody connects to."""
    regions = {region: RegionConfig(region, store_url(region), tuple(
        ServerConfig(name, region, f"postgresql://tenantctl_admin@{name}.invalid/postgres",
                     100) for name in servers)) for region, servers in REGIONS.items()}
    return Config(path=Path("/fake/tenantctl.toml"), catalog_dsn="postgresql://fake.invalid/c",
                  master_key=MasterKeySource(env="TENANTCTL_FAKE_MASTER_KEY"),
                  regions=regions, tenant_migrations=Path("/fake/migrations"),
                  lifecycle=LifecycleConfig(hold_days, purge_days, audit_days))


class FakeClock:
    """``ports.Clock``: a time that moves only when told. Its default is far from any
    ``now`` a test passes, so a read of it where ``now`` belongs shows."""

    def __init__(self, now: datetime = T0 - timedelta(days=3650)) -> None:
        self.at = now

    def now(self) -> datetime:
        return self.at


# -- the catalog ---------------------------------------------------------------------


@dataclass
class FakeTenant:
    id: int
    slug: str
    region: str
    server: str
    database: str
    login_role: str
    owner_role: str
    state: str = "active"
    step: str | None = None
    revision: str | None = None
    cancelled_at: datetime | None = None
    hold_until: datetime | None = None
    suspended_at: datetime | None = None
    deleted_at: datetime | None = None
    purge_after: datetime | None = None
    purged_at: datetime | None = None
    legal_hold: bool = False
    legal_hold_reason: str | None = None
    final_backup_id: int | None = None
    plan: str = "default"
    over_quota: bool = False
    over_quota_since: datetime | None = None
    updated_at: datetime | None = None


@dataclass
class FakeKey:
    identity_wrapped: str | None = "wrapped identity"
    master_key_id: str | None = "mk1"
    destroyed_at: datetime | None = None


@dataclass
class FakeBackup:
    id: int
    tenant_id: int
    slug: str
    region: str
    store_url: str
    object_key: str
    manifest_key: str
    kind: str = "manual"
    status: str = "completed"
    started_at: datetime = T0
    finished_at: datetime | None = None
    verified_at: datetime | None = None


@dataclass
class FakeGrant:
    id: int
    tenant_id: int
    slug: str
    server: str
    role_name: str
    grantee: str
    reason: str
    read_only: bool
    actor: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None
    dropped_at: datetime | None = None


@dataclass
class FakeServerRow:
    name: str
    region: str
    capacity: int = 100
    available: bool = True
    accepting: bool = True
    retired_at: datetime | None = None


@dataclass
class FakeAudit:
    action: str
    tenant: str | None
    region: str | None
    outcome: str
    detail: dict[str, Any]
    at: datetime
    actor: str = "tester"
    recorded_at: datetime | None = None  # the real time it was written; None: ``at``


def _purgeable(e: FakeAudit, cutoff: datetime) -> bool:
    """As the catalog's purge: about and written before the cutoff."""
    return e.at < cutoff and (e.recorded_at or e.at) < cutoff


@dataclass
class _Tables:
    tenants: dict[int, FakeTenant] = field(default_factory=dict)
    keys: dict[int, FakeKey] = field(default_factory=dict)
    credentials: dict[int, str] = field(default_factory=dict)
    backups: dict[int, FakeBackup] = field(default_factory=dict)
    grants: dict[int, FakeGrant] = field(default_factory=dict)
    servers: dict[str, FakeServerRow] = field(default_factory=dict)
    # unfinished rows of tenant_moves: slug -> (from_region, to_server)
    moves: dict[str, tuple[str, str]] = field(default_factory=dict)
    audit: list[FakeAudit] = field(default_factory=list)


def _copy(row: Any) -> Any:
    return dataclasses.replace(row)  # what a reader holds: a snapshot, not the row


def _set(row: Any, values: dict[str, Any]) -> None:
    for name, value in values.items():
        if not hasattr(row, name):
            raise AttributeError(f"{type(row).__name__} has no column {name!r}")
        setattr(row, name, value)


class FakeTenants:
    def __init__(self, db: FakeCatalog) -> None:
        self._db = db

    def get(self, slug: str) -> TenantRecord:
        validate_slug(slug)
        found = [t for t in self._db.t.tenants.values() if t.slug == slug]
        if not found:
            raise NotFound(f"no tenant {slug!r}")
        check_integrity(found[0])
        return _copy(found[0])

    def due(self, state: str, column: str, now: datetime) -> list[TenantRecord]:
        return [t for t in self.dated(state, column) if getattr(t, column) <= now]

    def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self._db.t.tenants.values():
            counts[t.state] = counts.get(t.state, 0) + 1
        return counts

    def dated(self, state: str, column: str, *, limit: int | None = None
              ) -> list[TenantRecord]:
        assert column in ("hold_until", "purge_after"), column
        rows = [t for t in self._db.t.tenants.values() if t.state == state
                and getattr(t, column) is not None]
        rows.sort(key=lambda t: getattr(t, column))
        return [_copy(t) for t in (rows[:limit] if limit else rows)]


class FakeBackupRows:
    def __init__(self, db: FakeCatalog) -> None:
        self._db = db

    def of_tenant(self, tenant_id: int) -> list[BackupRecord]:
        return [_copy(b) for b in self._db.t.backups.values() if b.tenant_id == tenant_id]

    def any_since(self, tenant_id: int, since: datetime | None,
                  statuses: Collection[str]) -> bool:
        return since is not None and any(
            b.tenant_id == tenant_id and b.status in statuses and b.started_at >= since
            for b in self._db.t.backups.values())


class FakeGrants:
    def __init__(self, db: FakeCatalog) -> None:
        self._db = db

    def get(self, grant_id: int) -> GrantRecord | None:
        g = self._db.t.grants.get(grant_id)
        return None if g is None else _copy(g)

    def listed(self, *, include_ended: bool = False) -> list[GrantRecord]:
        return [_copy(g) for _, g in sorted(self._db.t.grants.items())
                if include_ended or g.dropped_at is None]

    def live(self, *, tenant_id: int | None = None, read_write: bool | None = None,
             expired_at: datetime | None = None) -> list[GrantRecord]:
        return [_copy(g) for _, g in sorted(self._db.t.grants.items())
                if g.dropped_at is None
                and (tenant_id is None or g.tenant_id == tenant_id)
                and (read_write is None or g.read_only is not read_write)
                and (expired_at is None or g.expires_at <= expired_at)]


PLACED = ("provisioning", "active", "suspended", "cancelled")


class FakeServers:
    def __init__(self, db: FakeCatalog) -> None:
        self._db = db

    def get(self, name: str) -> ServerRecord:
        found = self._db.t.servers.get(name)
        if found is None:
            raise NotFound(f"no server {name!r}")
        return _copy(found)  # type: ignore[no-any-return]

    def in_region(self, region: str) -> list[ServerRecord]:
        return [_copy(sv) for _, sv in sorted(self._db.t.servers.items())
                if sv.region == region]

    def placed(self, region: str) -> list[TenantRecord]:
        return [_copy(t) for t in sorted(self._db.t.tenants.values(), key=lambda t: t.slug)
                if t.region == region and t.state in PLACED]

    def unfinished_moves(self, region: str) -> dict[str, str]:
        return {slug: to for slug, (from_region, to) in sorted(self._db.t.moves.items())
                if from_region == region}


class FakeWrites:
    def __init__(self, db: FakeCatalog) -> None:
        self._db = db

    def update_tenant(self, tenant_id: int, **values: Any) -> None:
        if tenant_id in self._db.t.tenants:
            _set(self._db.t.tenants[tenant_id], values)

    def delete_credential(self, tenant_id: int) -> None:
        self._db.t.credentials.pop(tenant_id, None)

    def destroy_key(self, tenant_id: int, now: datetime) -> None:
        key = self._db.t.keys.get(tenant_id)
        if key is not None:
            key.identity_wrapped = key.master_key_id = None
            key.destroyed_at = now

    def mark_backups_deleted(self, tenant_id: int) -> None:
        for b in self._db.t.backups.values():
            if b.tenant_id == tenant_id and b.status != "deleted":
                b.status = "deleted"

    def add_grant(self, *, tenant_id: int, slug: str, server: str, grantee: str,
                  reason: str, read_only: bool, expires_at: datetime) -> int:
        gid = next(self._db.ids)
        self._db.t.grants[gid] = FakeGrant(gid, tenant_id, slug, server, "", grantee, reason,
                                           read_only, "tester", self._db.clock.now(),
                                           expires_at)
        return gid

    def update_grant(self, grant_id: int, **values: Any) -> None:
        if grant_id in self._db.t.grants:
            _set(self._db.t.grants[grant_id], values)

    def update_server(self, name: str, **values: Any) -> None:
        if name in self._db.t.servers:
            _set(self._db.t.servers[name], values)

    def audit(self, action: str, *, tenant: str | None = None, region: str | None = None,
              outcome: str = "ok", at: datetime | None = None, **detail: Any) -> None:
        real = self._db.clock.now()
        self._db.t.audit.append(FakeAudit(action, tenant, region, outcome, redact(detail),
                                          at or real, recorded_at=real))


class FakeCatalog:
    """``ports.CatalogPort`` in memory. A transaction's writes are undone when its
    block raises (as a killed process's are never committed); ``fail_audit`` makes
    every audit write fail (a catalog gone away)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock  # the catalog's own now() (created_at, audit_log.at), not --now
        self.t = _Tables()
        self.ids = itertools.count(1)
        self.held: set[str] = set()  # advisory locks held (by anyone)
        self.fail_audit = False
        self._tenants, self._backups = FakeTenants(self), FakeBackupRows(self)
        self._grants = FakeGrants(self)
        self._servers = FakeServers(self)

    @property
    def tenants(self) -> FakeTenants:
        return self._tenants

    @property
    def backups(self) -> FakeBackupRows:
        return self._backups

    @property
    def grants(self) -> FakeGrants:
        return self._grants

    @property
    def servers(self) -> FakeServers:
        return self._servers

    @contextmanager
    def transaction(self) -> Iterator[FakeWrites]:
        before = copy.deepcopy(self.t)
        try:
            yield FakeWrites(self)
        except BaseException:
            self.t = before
            raise

    @contextmanager
    def advisory_lock(self, name: str, *, shared: bool = False, wait: bool = False
                      ) -> Iterator[bool]:
        if name in self.held:
            if wait:
                raise AssertionError(f"would wait forever for {name!r}")
            yield False
            return
        self.held.add(name)
        try:
            yield True
        finally:
            self.held.discard(name)

    def audit(self, action: str, *, tenant: str | None = None, region: str | None = None,
              outcome: str = "ok", at: datetime | None = None, **detail: Any) -> None:
        if self.fail_audit:
            raise TenantctlError("the catalog is gone")
        with self.transaction() as tx:
            tx.audit(action, tenant=tenant, region=region, outcome=outcome, at=at, **detail)

    def audit_count_before(self, cutoff: datetime) -> int:
        return sum(1 for e in self.t.audit if _purgeable(e, cutoff))

    def purge_audit_before(self, cutoff: datetime, batch: int) -> int:
        old = [e for e in self.t.audit if _purgeable(e, cutoff)][:batch]
        self.t.audit = [e for e in self.t.audit if not any(e is o for o in old)]
        return len(old)

    # -- test helpers --------------------------------------------------------------

    def row(self, slug: str) -> FakeTenant:
        """The live row (not a snapshot)."""
        return next(t for t in self.t.tenants.values() if t.slug == slug)

    def events(self, action: str | None = None, tenant: str | None = None
               ) -> list[FakeAudit]:
        return [e for e in self.t.audit if (action is None or e.action == action)
                and (tenant is None or e.tenant == tenant)]

    def actions(self, tenant: str | None = None) -> list[str]:
        return [e.action for e in self.events(tenant=tenant)]


# -- the servers ---------------------------------------------------------------------


@dataclass
class FakeRole:
    login: bool = False
    comment: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    valid_until: datetime | None = None
    connection_limit: int | None = None
    may_write: dict[str, bool] = field(default_factory=dict)  # database -> writes allowed


@dataclass
class FakeDatabase:
    owner: str
    login_writes: bool = True  # the login role's writes (taken away during a hold)


@dataclass
class FakeServer:
    databases: dict[str, FakeDatabase] = field(default_factory=dict)
    roles: dict[str, FakeRole] = field(default_factory=dict)
    sessions: list[tuple[str, str]] = field(default_factory=list)  # (role, database)


class FakeServerAdmin:
    """``ports.ServerAdmin`` over in-memory servers. ``fail[method] = exc`` makes
    that method raise; ``calls`` says what was asked, in order."""

    def __init__(self) -> None:
        self.servers: dict[str, FakeServer] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, BaseException] = {}

    def server(self, name: str) -> FakeServer:
        return self.servers.setdefault(name, FakeServer())

    def _call(self, method: str, *args: Any) -> None:
        self.calls.append((method, *args))
        if method in self.fail:
            raise self.fail[method]

    def _role(self, server: str, role: str) -> FakeRole:
        found = self.server(server).roles.get(role)
        if found is None:
            raise ServerOperationFailed(f'role "{role}" does not exist')
        return found

    def _database(self, server: str, database: str) -> FakeDatabase:
        found = self.server(server).databases.get(database)
        if found is None:
            raise ServerOperationFailed(f'database "{database}" does not exist')
        return found

    def _end(self, server: str, *, role: str | None = None, database: str | None = None
             ) -> int:
        sv = self.server(server)
        ended = [s for s in sv.sessions if (role is None or s[0] == role)
                 and (database is None or s[1] == database)]
        sv.sessions = [s for s in sv.sessions if s not in ended]
        return len(ended)

    def restrict_to_reads(self, server: str, names: TenantNames) -> None:
        self._call("restrict_to_reads", server, names.database)
        self._database(server, names.database).login_writes = False

    def secure_tenant_database(self, server: str, names: TenantNames) -> None:
        self._call("secure_tenant_database", server, names.database)
        self._database(server, names.database).login_writes = True

    def set_login(self, server: str, role: str, allowed: bool) -> None:
        self._call("set_login", server, role, allowed)
        self._role(server, role).login = allowed
        if not allowed:
            self._end(server, role=role)

    def terminate_sessions(self, server: str, *, role: str | None = None,
                           database: str | None = None, wait: bool = False) -> int:
        self._call("terminate_sessions", server, role, database)
        return self._end(server, role=role, database=database)

    def terminate_other_sessions(self, server: str, database: str) -> int:
        self._call("terminate_other_sessions", server, database)
        return self._end(server, database=database)

    def database_owner(self, server: str, database: str) -> str | None:
        self._call("database_owner", server, database)
        db = self.server(server).databases.get(database)
        return None if db is None else db.owner

    def role_exists(self, server: str, role: str) -> bool:
        self._call("role_exists", server, role)
        return role in self.server(server).roles

    def role_comment(self, server: str, role: str) -> str | None:
        self._call("role_comment", server, role)
        found = self.server(server).roles.get(role)
        return None if found is None else found.comment or ""

    def drop_database(self, server: str, database: str) -> None:
        self._call("drop_database", server, database)
        self._database(server, database)
        self._end(server, database=database)
        del self.server(server).databases[database]

    def drop_marked_roles(self, server: str, names: TenantNames, marker: str) -> None:
        self._call("drop_marked_roles", server, names.database, marker)
        roles = self.server(server).roles
        for role in (names.login_role, names.owner_role):
            if role in roles and roles[role].comment == marker:
                del roles[role]

    def create_support_role(self, server: str, names: TenantNames, role: str, password: str,
                            *, comment: str, connection_limit: int, valid_until: datetime,
                            settings: dict[str, str], read_only: bool) -> None:
        self._call("create_support_role", server, names.database, role)
        self._database(server, names.database)
        self.server(server).roles[role] = FakeRole(
            login=True, comment=comment, settings=dict(settings), valid_until=valid_until,
            connection_limit=connection_limit, may_write={names.database: not read_only})

    def lock_out_role(self, server: str, role: str) -> None:
        self._call("lock_out_role", server, role)
        self._role(server, role).login = False
        self._end(server, role=role)

    def drop_role_everywhere(self, server: str, role: str) -> None:
        self._call("drop_role_everywhere", server, role)
        self.server(server).roles.pop(role, None)

    def role_settings(self, server: str, roles: Sequence[str]) -> dict[str, list[str]]:
        self._call("role_settings", server, tuple(roles))
        found = self.server(server).roles
        return {r: [f"{k}={v}" for k, v in found[r].settings.items()] for r in roles
                if r in found}


# -- stores and the backup pipeline --------------------------------------------------


@dataclass(frozen=True)
class FakeObject:
    key: str


class FakeStore:
    """``ports.ObjectStore``: objects by key, and uploads begun and not finished."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.data: dict[str, bytes] = {}
        self.pending: set[str] = set()

    def objects(self, prefix: str = "") -> Iterator[FakeObject]:
        return iter([FakeObject(k) for k in sorted(self.data) if k.startswith(prefix)])

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def abort_uploads(self, key: str) -> int:
        if key in self.pending:
            self.pending.discard(key)
            return 1
        return 0

    def keys(self, prefix: str = "") -> list[str]:
        return [o.key for o in self.objects(prefix)]


class FakeStores:
    """``ports.StoreOpener``: one FakeStore per URL."""

    def __init__(self) -> None:
        self.by_url: dict[str, FakeStore] = {}

    def __call__(self, url: str) -> FakeStore:
        return self.by_url.setdefault(url, FakeStore(url))


class FakeBackupJobs:
    """``ports.BackupJobs``: a backup is a catalog row and two objects (dump and
    manifest) in the region's store. ``fail_run``/``fail_verify`` hold slugs whose
    backups fail; ``verdicts`` is what pruning would remove."""

    def __init__(self, catalog: FakeCatalog, stores: FakeStores, cfg: Config,
                 clock: FakeClock) -> None:
        self.catalog, self.stores, self.cfg, self.clock = catalog, stores, cfg, clock
        self.fail_run: set[str] = set()
        self.fail_verify: set[str] = set()
        self.verdicts: list[Verdict] = []
        self.reaped: list[str] = []

    def run(self, slug: str, *, kind: str, now: datetime | None = None) -> int:
        tenant = self.catalog.row(slug)
        if tenant.state not in ("active", "suspended", "cancelled"):
            raise Conflict(f"tenant {slug!r} is {tenant.state}: nothing to back up")
        if slug in self.fail_run:
            raise TenantctlError(f"backup of {slug!r} failed: pg_dump exited 1")
        at = now or self.clock.now()
        bid = next(self.catalog.ids)
        url = self.cfg.region(tenant.region).backup_store
        base = f"tenants/{slug}/{bid:010d}-{at:%Y%m%dT%H%M%SZ}"
        row = FakeBackup(bid, tenant.id, slug, tenant.region, url, base + ".dump.age",
                         base + ".manifest.json", kind, "completed", at, at)
        self.catalog.t.backups[bid] = row
        store = self.stores(url)
        store.data[row.object_key] = b"dump"
        store.data[row.manifest_key] = b"{}"
        self.catalog.audit("backup.run", tenant=slug, region=tenant.region, backup=bid,
                           kind=kind, at=now)
        return bid

    def verify(self, backup_id: int, now: datetime | None = None) -> None:
        row = self.catalog.t.backups[backup_id]
        if row.slug in self.fail_verify:
            raise TenantctlError(f"backup {backup_id}: checksum mismatch")
        row.verified_at = now or self.clock.now()
        self.catalog.audit("backup.verify", tenant=row.slug, region=row.region,
                           backup=backup_id, at=now)

    def get(self, backup_id: int) -> FakeBackup:
        if backup_id not in self.catalog.t.backups:
            raise NotFound(f"no backup {backup_id}")
        return _copy(self.catalog.t.backups[backup_id])

    def delete(self, backup_id: int, *, reason: str, now: datetime | None = None) -> None:
        row = self.catalog.t.backups[backup_id]
        if row.status == "deleted":
            return
        store = self.stores(row.store_url)
        store.delete(row.manifest_key)
        store.delete(row.object_key)
        row.status = "deleted"
        self.catalog.audit("backup.prune", tenant=row.slug, region=row.region,
                           backup=row.id, reason=reason, at=now)

    def reap_dead(self, slug: str, now: datetime | None = None) -> int:
        self.reaped.append(slug)
        dead = [b for b in self.catalog.t.backups.values()
                if b.slug == slug and b.status == "running"]
        for b in dead:
            b.status, b.finished_at = "failed", now or self.clock.now()
        return len(dead)

    def prune_verdicts(self, now: datetime) -> list[Verdict]:
        return list(self.verdicts)


# -- all of it -----------------------------------------------------------------------


class World:
    """A fleet made of fakes: ``deps`` for the services, the fakes to look at."""

    def __init__(self, cfg: Config | None = None) -> None:
        self.cfg = cfg or fake_config()
        self.clock = FakeClock()
        self.catalog = FakeCatalog(FakeClock(T0))
        for sc in self.cfg.servers:  # as `catalog upgrade` syncs them
            self.catalog.t.servers[sc.name] = FakeServerRow(sc.name, sc.region, sc.capacity)
        self.admin = FakeServerAdmin()
        self.stores = FakeStores()
        self.jobs = FakeBackupJobs(self.catalog, self.stores, self.cfg, self.clock)
        self.deps = Deps(self.cfg, records=self.catalog, admin=self.admin,
                         open_store=self.stores, backup_jobs=self.jobs, clock=self.clock)

    def tenant(self, slug: str, *, region: str = "eu-central", server: str | None = None,
               session: bool = True, **values: Any) -> FakeTenant:
        """A tenant as provisioning leaves it (catalog row, key, credential; database
        and roles on its server, marked), with one session of its application open;
        ``values`` set columns (state, dates ...)."""
        server = server or REGIONS[region][0]
        names = tenant_names(slug)
        tid = next(self.catalog.ids)
        row = FakeTenant(tid, slug, region, server, names.database, names.login_role,
                         names.owner_role)
        _set(row, values)
        self.catalog.t.tenants[tid] = row
        self.catalog.t.keys[tid] = FakeKey()
        self.catalog.t.credentials[tid] = "wrapped password"
        sv = self.admin.server(server)
        marker = role_marker(tid, slug)
        sv.databases[names.database] = FakeDatabase(names.owner_role)
        sv.roles[names.owner_role] = FakeRole(login=False, comment=marker)
        sv.roles[names.login_role] = FakeRole(login=row.state != "suspended", comment=marker)
        if session and row.state != "suspended":
            sv.sessions.append((names.login_role, names.database))
        return row

    def backup(self, slug: str, *, at: datetime | None = None, status: str = "completed",
               kind: str = "manual") -> FakeBackup:
        bid = self.jobs.run(slug, kind=kind, now=at)
        row = self.catalog.t.backups[bid]
        row.status = status
        return row

    def store(self, region: str = "eu-central") -> FakeStore:
        return self.stores(self.cfg.region(region).backup_store)

    def grant(self, slug: str, *, read_only: bool = True, expires_at: datetime | None = None,
              grantee: str = "sam") -> FakeGrant:
        """A live support grant made as `access grant` makes one (row and role)."""
        t = self.catalog.row(slug)
        with self.catalog.transaction() as tx:
            gid = tx.add_grant(tenant_id=t.id, slug=slug, server=t.server, grantee=grantee,
                               reason="ticket", read_only=read_only,
                               expires_at=expires_at or T0 + timedelta(hours=2))
            tx.update_grant(gid, role_name=f"tenantctl_support_{gid}")
        g = self.catalog.t.grants[gid]
        self.admin.server(t.server).roles[g.role_name] = FakeRole(
            login=True, comment=f"tenantctl support grant {gid} for tenant {slug}",
            settings={"default_transaction_read_only": "on"} if read_only else {},
            may_write={t.database: not read_only})
        self.admin.server(t.server).sessions.append((g.role_name, t.database))
        return g
