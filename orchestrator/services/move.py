"""Moving a tenant to another server, in its region or to another region: a step
machine recorded in the catalog (``tenant_moves``), under the tenant's lock for
its whole run, so rollouts, lifecycle changes and a second move of the same
tenant wait or are refused (exit 4).

The `dump` method: the target gets the tenant's roles (still unable to log in)
and an empty database; the source is made read-only as a hold does (sessions
ended); `pg_dump | pg_restore` copies it, streamed; row counts, per-table
checksums, sequence values and large objects are compared; then one catalog
transaction points the tenant at the target, the target's login role gets the
same password and the tenant's write state (a cancelled tenant stays read-only,
a suspended one unable to log in), and the source database and roles are
dropped. A region move then backs the tenant up in its new region's store,
verifies it, and deletes every object of the tenant in the old region's store.

Every step is checkpointed (``TENANTCTL_FAULT=move.<step>``). Before the cutover
a re-run redoes the copy (the target is a copy to throw away) and ``abort_move``
undoes it; after it, a re-run finishes the clean-up. A failure before the
cutover undoes the move by itself and gives the tenant its writes back.

Domain rules (method, refusals, step order, the checks' comparison):
orchestrator/domain/moves.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import func, select, update

from orchestrator.adapters.catalog.audit import reason_text
from orchestrator.adapters.catalog.db import with_dbname
from orchestrator.adapters.catalog.locks import holding_tenant
from orchestrator.adapters.catalog.models import (
    PLACED_STATES,
    Backup,
    Server,
    SupportGrant,
    Tenant,
    TenantMove,
)
from orchestrator.adapters.faults import InjectedFault, checkpoint
from orchestrator.adapters.postgres import admin as pgserver
from orchestrator.adapters.postgres import move_copy
from orchestrator.domain import moves
from orchestrator.domain.errors import (
    FIELD,
    Conflict,
    ExitCode,
    InvalidInput,
    NotFound,
    TenantctlError,
    first_line,
)
from orchestrator.domain.moves import MoveMethod, MoveOutcome, MovePlan, ServerFacts, TenantFacts
from orchestrator.domain.names import move_object_name, password_context, tenant_names
from orchestrator.domain.states import TenantState
from orchestrator.domain.statuses import BackupStatus
from orchestrator.services import plans, pooler

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

LOGICAL_AVAILABLE = True
# the logical method pauses writes once the subscription is this close to the source
LAG_TO_PAUSE = 16 * 1024 * 1024
CATCH_UP_S = 60.0  # after the pause: the last changes reach the target within this
POLL_S = 0.1


class MoveChecksFailed(TenantctlError):
    """The copy does not match the source: no cutover."""

    exit_code = ExitCode.DUMP_OR_RESTORE


@dataclass(frozen=True)
class MoveResult:
    tenant: str
    method: str
    bytes_copied: int
    write_pause_s: float
    old_server: str
    new_server: str
    old_region: str
    new_region: str
    checks: dict[str, Any] = field(default_factory=dict)
    move_id: int | None = None
    outcome: str = MoveOutcome.done
    resumed: bool = False
    dry_run: bool = False
    plan: dict[str, Any] | None = None
    backup_id: int | None = None  # a region move's backup in the new region
    old_objects_deleted: int = 0

    def to_json(self, dsn: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tenant": self.tenant, "move_id": self.move_id, "outcome": self.outcome,
            "dry_run": self.dry_run, "resumed": self.resumed, "method": self.method,
            "bytes_copied": self.bytes_copied, "write_pause_s": round(self.write_pause_s, 3),
            "old_server": self.old_server, "new_server": self.new_server,
            "old_region": self.old_region, "new_region": self.new_region,
            "checks": self.checks, "backup_id": self.backup_id,
            "old_region_objects_deleted": self.old_objects_deleted}
        if self.plan is not None:
            out["plan"] = self.plan
        if dsn is not None:
            out["dsn"] = dsn
        return out


Progress = Callable[[str], None]


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


# -- the entry points ----------------------------------------------------------------


def move_tenant(deps: Deps, slug: str, *, server: str | None = None,
                region: str | None = None, reason: str | None = None,
                method: str | None = None, now: datetime | None = None,
                progress: Progress | None = None, dry_run: bool = False) -> MoveResult:
    """Move (or finish moving) ``slug`` to ``server``, or to the least-filled server
    of ``region``. Leaving the tenant's region needs ``reason`` (audited)."""
    reason = reason_text(reason or "") or None
    if server is None and region is None:
        raise InvalidInput(f"say where to: {FIELD} NAME or a region", field="server")
    if server is not None:
        server_region = deps.cfg.server(server).region  # unknown: one line, exit 2
        if region is not None and server_region != region:
            raise InvalidInput(f"server {server} is in region {server_region}, not {region}",
                               field="server")
    if region is not None:
        deps.cfg.region(region)
    if method is not None and method not in MoveMethod.__members__:
        raise InvalidInput(f"unknown method {method!r} (one of: logical, dump)",
                           field="method")
    deps.get_tenant(slug)  # unknown tenant: exit 3, before any lock
    with holding_tenant(deps.catalog, slug):
        tenant = deps.get_tenant(slug)
        row = _unfinished(deps, tenant.id)
        if row is not None:
            wanted = server or region
            if (server is not None and server != row.to_server) or \
                    (server is None and region is not None and region != row.to_region):
                raise Conflict(f"tenant {slug!r} has an unfinished move to {row.to_server} "
                               f"({row.to_region}), not {wanted}: finish that move (to "
                               f"{row.to_server}) or abort it first")
            if dry_run:
                return _result(row, tenant, resumed=True, dry_run=True)
            _say(progress, f"resuming move {row.id} of {slug} at step {row.step}")
            return _run(deps, tenant, row, progress, resumed=True)
        plan = _plan(deps, tenant, server, region, reason, method)
        if dry_run:
            return MoveResult(slug, plan.method, 0, plan.expected_pause_s, plan.from_server,
                              plan.to_server, plan.from_region, plan.to_region,
                              outcome="planned", dry_run=True, plan=plan.to_json())
        row = _start(deps, tenant, plan, reason)
        return _run(deps, tenant, row, progress, resumed=False)


def abort_move(deps: Deps, slug: str, *, now: datetime | None = None,
               progress: Progress | None = None) -> MoveResult:
    """Undo an unfinished move that has not cut over: the copy on the target goes,
    the source gets its writes back. After the cutover there is nothing to abort
    (re-run the move to finish its clean-up)."""
    deps.get_tenant(slug)
    with holding_tenant(deps.catalog, slug):
        tenant = deps.get_tenant(slug)
        row = _unfinished(deps, tenant.id)
        if row is None:
            raise NotFound(f"tenant {slug!r} has no unfinished move")
        if moves.cut_over(row.step):
            raise Conflict(f"the move of {slug!r} to {row.to_server} has cut over already: "
                           f"re-run `tenantctl tenant move {slug} --server {row.to_server}` "
                           "to finish it")
        _undo(deps, tenant, row, progress)
        _finish(deps, row, MoveOutcome.aborted, error=row.error or "aborted by request")
        deps.catalog.audit("tenant.move.abort", tenant=slug, region=tenant.region,
                           move=row.id, to_server=row.to_server)
        return _result(_reload(deps, row.id), deps.get_tenant(slug))


def moves_of(deps: Deps, slug: str) -> list[dict[str, Any]]:
    """The tenant's move history, newest first."""
    tenant = deps.get_tenant(slug)
    with deps.catalog.session() as s:
        rows = list(s.scalars(select(TenantMove).where(TenantMove.tenant_id == tenant.id)
                              .order_by(TenantMove.id.desc())))
    return [_row_json(r) for r in rows]


# -- planning ------------------------------------------------------------------------


def _unfinished(deps: Deps, tenant_id: int) -> TenantMove | None:
    with deps.catalog.session() as s:
        return s.scalars(select(TenantMove).where(TenantMove.tenant_id == tenant_id,
                                                  TenantMove.finished_at.is_(None))
                         ).one_or_none()


def _reload(deps: Deps, move_id: int) -> TenantMove:
    with deps.catalog.session() as s:
        row = s.get(TenantMove, move_id)
    assert row is not None
    return row


def _server_facts(deps: Deps, name: str, tenants: dict[str, int],
                  available: dict[str, bool]) -> ServerFacts:
    sc = deps.cfg.server(name)
    with deps.server_connection(name) as conn:  # unreachable: ServerUnavailable, exit 6
        version = pgserver.server_version(conn)
        cluster = pgserver.cluster_identity(conn)
        ready = move_copy.logical_readiness(conn)
    return ServerFacts(name, sc.region, sc.capacity, tenants.get(name, 0),
                       available.get(name, False), version, ready, cluster)


def _plan(deps: Deps, tenant: Tenant, server: str | None, region: str | None,
          reason: str | None, method: str | None) -> MovePlan:
    with deps.catalog.session() as s:
        counts = dict(s.execute(select(Tenant.server, func.count())
                                .where(Tenant.state.in_(PLACED_STATES))
                                .group_by(Tenant.server)).all())
        # a target must be in the config and accepting (not drained or retired)
        available = {name: bool(avail and accepting) for name, avail, accepting in s.execute(
            select(Server.name, Server.available, Server.accepting)).all()}
        grants = s.scalar(select(func.count()).select_from(SupportGrant).where(
            SupportGrant.tenant_id == tenant.id, SupportGrant.dropped_at.is_(None))) or 0
    facts = TenantFacts(tenant.slug, tenant.state, tenant.server, tenant.region, tenant.step,
                        tenant.legal_hold, live_grants=int(grants))
    moves.check_tenant_movable(facts)
    if server is None:
        assert region is not None
        candidates = [ServerFacts(sc.name, sc.region, sc.capacity, counts.get(sc.name, 0),
                                  available.get(sc.name, False), None)
                      for sc in deps.cfg.region(region).servers]
        server = moves.choose_target(facts, candidates).name
    if server == tenant.server:  # before reaching any server: nothing to read there
        moves.check_target(facts, ServerFacts(server, tenant.region, 1, 0, True, None),
                           reason=reason)
    source = _server_facts(deps, tenant.server, counts, available)
    target = _server_facts(deps, server, counts, available)
    dsn = with_dbname(deps.cfg.server(tenant.server).admin_dsn, tenant.database)
    with pgserver.connect(dsn, server=tenant.server) as conn:
        facts = TenantFacts(tenant.slug, tenant.state, tenant.server, tenant.region,
                            tenant.step, tenant.legal_hold,
                            size_bytes=move_copy.database_size(conn),
                            large_objects=move_copy.large_objects_count(conn),
                            tables_without_key=tuple(move_copy.tables_without_key(conn)),
                            live_grants=int(grants))
    return moves.plan_move(facts, source, target, method, reason,
                           logical_available=LOGICAL_AVAILABLE)


def _start(deps: Deps, tenant: Tenant, plan: MovePlan, reason: str | None) -> TenantMove:
    """Record the move (nothing touched yet). A backup of the tenant under way makes
    it wait for none: refused, as a backup started during a move is (see
    backups.service.run_backup): whichever commits its row second sees the other."""
    _refuse_if_backing_up(deps, tenant)
    with deps.catalog.session() as s, s.begin():
        row = TenantMove(tenant_id=tenant.id, slug=tenant.slug, from_server=plan.from_server,
                         to_server=plan.to_server, from_region=plan.from_region,
                         to_region=plan.to_region, method=plan.method, reason=reason,
                         step="planned", actor=deps.catalog.actor,
                         checks={"method_reason": plan.method_reason})
        s.add(row)
        s.flush()
        deps.catalog.audit("tenant.move.start", session=s, tenant=tenant.slug,
                           region=tenant.region, move=row.id, method=plan.method,
                           from_server=plan.from_server, to_server=plan.to_server,
                           to_region=plan.to_region, reason=reason)
    try:
        _refuse_if_backing_up(deps, tenant)
    except Conflict:
        _finish(deps, row, MoveOutcome.aborted, error="a backup of the tenant was running")
        raise
    checkpoint("move.planned")
    return row


def _refuse_if_backing_up(deps: Deps, tenant: Tenant) -> None:
    deps.backup_jobs.reap_dead(tenant.slug)
    with deps.catalog.session() as s:
        running = s.scalar(select(func.count()).select_from(Backup).where(
            Backup.tenant_id == tenant.id, Backup.status == BackupStatus.running)) or 0
    if running:
        raise Conflict(f"a backup of tenant {tenant.slug!r} is running: move it when the "
                       "backup has finished")


# -- running the steps ---------------------------------------------------------------


def _record(deps: Deps, row: TenantMove, step: str, **values: Any) -> None:
    with deps.catalog.session() as s, s.begin():
        s.execute(update(TenantMove).where(TenantMove.id == row.id)
                  .values(step=step, updated_at=deps.clock.now(), **values))
    row.step = step
    for k, v in values.items():
        setattr(row, k, v)


def _finish(deps: Deps, row: TenantMove, outcome: str, error: str | None = None) -> None:
    with deps.catalog.session() as s, s.begin():
        s.execute(update(TenantMove).where(TenantMove.id == row.id).values(
            outcome=outcome, finished_at=deps.clock.now(), updated_at=deps.clock.now(),
            error=error,
            **({"step": "done"} if outcome == MoveOutcome.done else {})))


def _dsn(deps: Deps, server: str, database: str) -> str:
    return with_dbname(deps.cfg.server(server).admin_dsn, database)


def _run(deps: Deps, tenant: Tenant, row: TenantMove, progress: Progress | None,
         *, resumed: bool) -> MoveResult:
    region_move = row.from_region != row.to_region
    if not moves.cut_over(row.step):
        try:
            _copy(deps, tenant, row, progress)
        except BaseException as exc:
            # a failure is undone at once; an injected fault stands for a crash
            if isinstance(exc, TenantctlError | psycopg.Error) and \
                    not isinstance(exc, InjectedFault):
                # the tenant must not stay paused for a move that cannot finish
                msg = first_line(exc)
                with contextlib.suppress(Exception):
                    _undo(deps, tenant, row, progress)
                    _finish(deps, row, MoveOutcome.aborted, error=msg)
                deps.catalog.audit("tenant.move", tenant=tenant.slug, region=tenant.region,
                                   outcome="failed", move=row.id, step=row.step, error=msg)
                if isinstance(exc, TenantctlError):
                    raise
                raise TenantctlError(f"moving {tenant.slug!r} failed at step {row.step}, "
                                     f"undone (it stays on {row.from_server}): {msg}") from None
            raise
        _cutover(deps, tenant, row, progress)
    _open_target(deps, tenant, row)
    # the poolers follow the catalog: listed (and its verifier) at the new server's,
    # taken off (and its pooled sessions killed) at the old one's; a pooler that is
    # down is a warning, never a failed move
    pooler.refresh(deps, row.to_server, changed=tenant.slug)
    pooler.refresh(deps, row.from_server, changed=tenant.slug)
    result: dict[str, Any] = {}
    if moves.step_index(row.step) < moves.step_index("source_dropped"):
        _drop_source(deps, tenant, row, progress)
    if region_move:
        result = _region_cleanup(deps, tenant, row, progress)
    _finish(deps, row, MoveOutcome.done)
    deps.catalog.audit("tenant.move", tenant=tenant.slug, region=row.to_region, move=row.id,
                       method=row.method, from_server=row.from_server,
                       to_server=row.to_server, from_region=row.from_region,
                       reason=row.reason, bytes_copied=row.bytes_copied,
                       write_pause_ms=row.write_pause_ms)
    _say(progress, f"moved {tenant.slug} to {row.to_server} ({row.to_region})")
    return _result(_reload(deps, row.id), deps.get_tenant(tenant.slug), resumed=resumed,
                   **result)


def _copy(deps: Deps, tenant: Tenant, row: TenantMove, progress: Progress | None) -> None:
    """From the target step to the checks: redone whole by a re-run (anything a crash
    left on the target is thrown away first)."""
    names = tenant_names(tenant.slug)
    marker = pgserver.role_marker(tenant.id, tenant.slug)
    logical = row.method == MoveMethod.logical
    if logical:
        _drop_replication(deps, tenant, row)  # a crashed attempt's publication, slot ...
    _say(progress, f"target: roles and an empty database on {row.to_server}")
    with deps.server_connection(row.to_server) as conn:
        pgserver.ensure_roles(conn, names, marker)  # NOLOGIN until the cutover
        if pgserver.database_owner(conn, names.database) == names.owner_role:
            pgserver.drop_database(conn, names.database)  # a crashed attempt's copy
        pgserver.ensure_database(conn, names, template=None)
    checkpoint("move.target")
    _record(deps, row, "target")

    source_dsn = _dsn(deps, row.from_server, names.database)
    target_dsn = _dsn(deps, row.to_server, names.database)
    if logical:
        _replicate(deps, tenant, row, source_dsn, target_dsn, progress)

    _say(progress, f"paused: {tenant.slug} is read-only on {row.from_server}")
    paused_at = row.checks.get("paused_at") or deps.clock.now().isoformat()
    # where the write pause goes (seconds per phase), kept with the move's checks
    took: dict[str, float] = {}
    lap = _Lap(took)
    deps.admin.restrict_to_reads(tenant.server, names)
    lap("revoke")
    deps.admin.terminate_sessions(tenant.server, role=names.login_role,
                                  database=names.database, wait=True)
    lap("terminate")
    checkpoint("move.paused")
    _record(deps, row, "paused", checks={**row.checks, "paused_at": paused_at})

    if logical:
        copied = _catch_up(deps, tenant, row, source_dsn, target_dsn, progress, lap)
    else:
        _say(progress, f"copying {tenant.slug}: pg_dump | pg_restore")
        copied = move_copy.dump_restore(
            deps.pg_tools.path("pg_dump"), deps.pg_tools.path("pg_restore"), source_dsn,
            target_dsn, names.owner_role, lock_wait=deps.cfg.lock_timeout,
            chunk_hook=lambda: checkpoint("move.copy_chunk"))
        lap("copy")
    _prepare_target(deps, tenant, row, target_dsn)
    lap("prepare_target")
    checkpoint("move.copied")
    _record(deps, row, "copied", bytes_copied=copied)

    _say(progress, "checks: row counts, per-table checksums, sequences, large objects")
    # both sides at once: the checks run while writes are paused
    with ThreadPoolExecutor(max_workers=2) as pool:
        source, target = pool.map(_timed_checks, (source_dsn, target_dsn))
    took["source_checks"], took["target_checks"] = source.pop("took"), target.pop("took")
    lap("checks")
    differ = moves.compare_checks(source, target)
    if differ:
        raise MoveChecksFailed(f"the copy of {tenant.slug!r} on {row.to_server} does not "
                               f"match the source ({differ[0]}"
                               + (f"; {len(differ) - 1} more" if len(differ) > 1 else "")
                               + f"): no cutover, the move is undone and it stays on "
                               f"{row.from_server}")
    checkpoint("move.checked")
    _record(deps, row, "checked", checks={**row.checks, **moves.checks_json(source),
                                          "pause_breakdown_s": _rounded(took)})


class _Lap:
    """Seconds since the last lap, recorded under a phase's name."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into, self.last = into, time.monotonic()

    def __call__(self, phase: str) -> None:
        now = time.monotonic()
        self.into[phase] = self.into.get(phase, 0.0) + now - self.last
        self.last = now


def _rounded(took: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in took.items()}


def _timed_checks(dsn: str) -> dict[str, Any]:
    started = time.monotonic()
    out = move_copy.checks(dsn)
    out["took"] = time.monotonic() - started
    return out


def _replicate(deps: Deps, tenant: Tenant, row: TenantMove, source_dsn: str,
               target_dsn: str, progress: Progress | None) -> None:
    """The logical method's copy while the tenant still writes: the schema (pg_dump
    --schema-only), a publication of its tables on the source (owned by its owner
    role), a subscription on the target (initial copy, then streaming); returns
    once every table is copied and the lag is small."""
    names = tenant_names(tenant.slug)
    name = move_object_name(tenant.id)
    _say(progress, f"schema: copying {tenant.slug}'s schema to {row.to_server}")
    move_copy.dump_restore(deps.pg_tools.path("pg_dump"), deps.pg_tools.path("pg_restore"),
                           source_dsn, target_dsn, names.owner_role,
                           lock_wait=deps.cfg.lock_timeout, schema_only=True)
    password = deps.keys.new_password()  # the temporary replication role's, for this run only
    with pgserver.connect(source_dsn, server=row.from_server,
                          lock_timeout=deps.cfg.lock_timeout) as sconn, \
            deps.server_connection(row.from_server) as aconn:
        move_copy.create_publisher(sconn, aconn, name, names.owner_role, names.database,
                                   password)
    admin = conninfo_to_dict(deps.cfg.server(row.from_server).admin_dsn)
    conninfo = make_conninfo("", **{k: v for k, v in admin.items() if k in (
        "host", "port", "sslmode", "sslrootcert")}, user=name, password=password,
        dbname=names.database)
    with pgserver.connect(target_dsn, server=row.to_server) as tconn:
        move_copy.create_subscription(tconn, name, conninfo)
    checkpoint("move.replicating")
    _record(deps, row, "replicating")
    _say(progress, "replicating: initial copy, then streaming")
    size = 0
    with pgserver.connect(source_dsn, server=row.from_server) as sconn:
        size = move_copy.database_size(sconn)
    # bounded: a copy that makes no headway within this (5 MB/s at the least) fails
    deadline = time.monotonic() + 120 + size / (5 * 1024 * 1024)
    with pgserver.connect(target_dsn, server=row.to_server) as tconn, \
            deps.server_connection(row.from_server) as aconn:
        while True:
            if move_copy.tables_not_ready(tconn, name) == 0:
                lag = move_copy.slot_lag(aconn, name)
                if lag is not None and lag < LAG_TO_PAUSE:
                    break
            if time.monotonic() > deadline:
                raise TenantctlError(f"the subscription of {tenant.slug!r} on "
                                     f"{row.to_server} did not catch up in time")
            time.sleep(POLL_S)
    checkpoint("move.synced")
    _record(deps, row, "synced")


def _catch_up(deps: Deps, tenant: Tenant, row: TenantMove, source_dsn: str,
              target_dsn: str, progress: Progress | None,
              lap: Callable[[str], None] = lambda _: None) -> int:
    """Writes are paused: the subscription confirms the source's current position
    (every commit before the pause), then the sequences are copied (logical
    replication does not carry them). Returns the bytes the copy holds."""
    name = move_object_name(tenant.id)
    _say(progress, "catching up with the source's last commits")
    with deps.server_connection(row.from_server) as aconn:
        lsn = move_copy.current_lsn(aconn)
        deadline = time.monotonic() + CATCH_UP_S
        while (lag := move_copy.slot_lag(aconn, name, lsn)) is None or lag > 0:
            if lag is None:
                raise TenantctlError(f"the replication slot {name} on {row.from_server} "
                                     "is gone")
            if time.monotonic() > deadline:
                raise TenantctlError(f"the subscription of {tenant.slug!r} did not catch "
                                     f"up within {CATCH_UP_S:.0f} s of the pause")
            time.sleep(POLL_S / 2)
    lap("catch_up")
    with pgserver.connect(source_dsn, server=row.from_server) as sconn, \
            pgserver.connect(target_dsn, server=row.to_server) as tconn:
        move_copy.set_sequences(tconn, move_copy.sequence_values(sconn))
        lap("sequences")
        return move_copy.database_size(sconn)


def _drop_replication(deps: Deps, tenant: Tenant, row: TenantMove) -> None:
    """The logical method's objects, wherever they are: the subscription (in the
    tenant's database on the target; its slot goes with it), the publication, a
    slot left behind and the temporary role on the source. Idempotent."""
    names = tenant_names(tenant.slug)
    name = move_object_name(tenant.id)
    with deps.server_connection(row.to_server) as conn:
        has_target = pgserver.database_owner(conn, names.database) == names.owner_role
    if has_target:
        with pgserver.connect(_dsn(deps, row.to_server, names.database),
                              server=row.to_server) as tconn:
            try:
                move_copy.drop_subscription(tconn, name)
            except psycopg.OperationalError:  # the source cannot be reached: slot later
                move_copy.drop_subscription(tconn, name, keep_slot=True)
    with deps.server_connection(row.from_server) as conn:
        has_source = pgserver.database_owner(conn, names.database) == names.owner_role
    if has_source:
        with pgserver.connect(_dsn(deps, row.from_server, names.database),
                              server=row.from_server) as sconn:
            move_copy.drop_publication(sconn, name, names.owner_role)
    with deps.server_connection(row.from_server) as conn:
        move_copy.drop_slot(conn, name)
        pgserver.drop_role_everywhere(conn, deps.cfg.server(row.from_server).admin_dsn,
                                      name, server=row.from_server,
                                      lock_timeout=deps.cfg.lock_timeout)


def _prepare_target(deps: Deps, tenant: Tenant, row: TenantMove, target_dsn: str) -> None:
    """The copy's grants, the tenant's write state and plan, and the same password
    (its login stays off until the cutover)."""
    names = tenant_names(tenant.slug)
    with pgserver.connect(target_dsn, server=row.to_server,
                          lock_timeout=deps.cfg.lock_timeout) as conn:
        pgserver.secure_tenant_database(conn, names)
        if tenant.state == TenantState.cancelled:  # on hold: it stays read-only
            pgserver.restrict_to_reads(conn, names)
    assert tenant.credential is not None
    password = deps.keys.master.unwrap(tenant.credential.password_wrapped,
                                      password_context(tenant.slug)).decode()
    with deps.server_connection(row.to_server) as conn:
        plans.apply_plan_on(conn, names.login_role, deps.cfg.plan(tenant.plan))
        pgserver.set_password(conn, names.login_role, password)


def _cutover(deps: Deps, tenant: Tenant, row: TenantMove, progress: Progress | None) -> None:
    """One catalog transaction: the tenant is on the target from here on."""
    with deps.catalog.session() as s, s.begin():
        s.execute(update(Tenant).where(Tenant.id == tenant.id, Tenant.server == row.from_server)
                  .values(server=row.to_server, region=row.to_region))
        s.execute(update(TenantMove).where(TenantMove.id == row.id)
                  .values(step=moves.CUTOVER, updated_at=deps.clock.now()))
        deps.catalog.audit("tenant.move.cutover", session=s, tenant=tenant.slug,
                           region=row.to_region, move=row.id, from_server=row.from_server,
                           to_server=row.to_server, from_region=row.from_region)
    row.step = moves.CUTOVER
    checkpoint("move.cutover")
    _say(progress, f"cutover: {tenant.slug} is on {row.to_server}")


def _open_target(deps: Deps, tenant: Tenant, row: TenantMove) -> None:
    """After the cutover (again on a re-run): the target's login role may log in
    unless the tenant is suspended. The write pause ends here."""
    names = tenant_names(tenant.slug)
    allowed = tenant.state != TenantState.suspended
    deps.admin.set_login(row.to_server, names.login_role, allowed)
    if row.write_pause_ms is None:
        paused_at = row.checks.get("paused_at")
        pause_ms = int((deps.clock.now() - datetime.fromisoformat(paused_at))
                       .total_seconds() * 1000) if paused_at else 0
        with deps.catalog.session() as s, s.begin():
            s.execute(update(TenantMove).where(TenantMove.id == row.id)
                      .values(write_pause_ms=pause_ms))
        row.write_pause_ms = pause_ms


def _drop_source(deps: Deps, tenant: Tenant, row: TenantMove, progress: Progress | None
                 ) -> None:
    names = tenant_names(tenant.slug)
    marker = pgserver.role_marker(tenant.id, tenant.slug)
    if row.method == MoveMethod.logical:
        _drop_replication(deps, tenant, row)  # the source cannot be dropped with its slot
    _say(progress, f"dropping the source database on {row.from_server}")
    with deps.server_connection(row.from_server) as conn:
        if pgserver.database_owner(conn, names.database) == names.owner_role:
            pgserver.drop_database(conn, names.database)
        checkpoint("move.source_database_dropped")
        pgserver.drop_marked_roles(conn, names, marker)
    checkpoint("move.source_dropped")
    _record(deps, row, "source_dropped")


def _region_cleanup(deps: Deps, tenant: Tenant, row: TenantMove, progress: Progress | None
                    ) -> dict[str, Any]:
    """The residency promise after a region move: a verified backup in the new region
    first, then every object of the tenant in the old region's store deleted (the
    catalog keeps the rows, marked deleted, and the move's record)."""
    backup_id = row.checks.get("backup_id")
    if moves.step_index(row.step) < moves.step_index("backed_up"):
        _say(progress, f"backing {tenant.slug} up in {row.to_region}")
        backup_id = deps.backup_jobs.run(tenant.slug, kind="move")
        deps.backup_jobs.verify(backup_id)
        checkpoint("move.backed_up")
        _record(deps, row, "backed_up", checks={**row.checks, "backup_id": backup_id})
    deleted = 0
    if moves.step_index(row.step) < moves.step_index("old_backups_deleted"):
        _say(progress, f"deleting {tenant.slug}'s backup objects in {row.from_region}")
        deleted = _delete_old_region_objects(deps, tenant, row)
        _record(deps, row, "old_backups_deleted",
                checks={**row.checks, "old_region_objects_deleted": deleted})
    return {"backup_id": backup_id, "old_objects_deleted":
            row.checks.get("old_region_objects_deleted", deleted)}


def _delete_old_region_objects(deps: Deps, tenant: Tenant, row: TenantMove) -> int:
    store_url = deps.cfg.region(row.from_region).backup_store
    store = deps.open_store(store_url)
    with deps.catalog.session() as s:
        old = list(s.scalars(select(Backup).where(Backup.tenant_id == tenant.id,
                                                  Backup.region == row.from_region)))
    deleted = 0
    for b in old:
        for key in (b.manifest_key, b.object_key):  # manifest first: no longer offered
            if key:
                store.delete(key)
                deleted += 1
        checkpoint("move.old_backup_deleted")
        if b.status != BackupStatus.deleted:
            with deps.catalog.session() as s, s.begin():
                s.execute(update(Backup).where(Backup.id == b.id)
                          .values(status=BackupStatus.deleted))
            deps.catalog.audit("backup.prune", tenant=tenant.slug, region=row.from_region,
                               backup=b.id, reason=f"tenant moved to {row.to_region}")
    # whatever else of the tenant's the old store holds (a crashed upload's remains)
    for obj in list(store.objects(f"tenants/{tenant.slug}/")):
        store.delete(obj.key)
        deleted += 1
    return deleted


def _undo(deps: Deps, tenant: Tenant, row: TenantMove, progress: Progress | None) -> None:
    """Before the cutover: drop the copy on the target (its database and roles, only
    if they are this tenant's), give the source its writes back."""
    names = tenant_names(tenant.slug)
    marker = pgserver.role_marker(tenant.id, tenant.slug)
    _say(progress, f"undoing: dropping the copy on {row.to_server}")
    if row.method == MoveMethod.logical:
        _drop_replication(deps, tenant, row)
    with deps.server_connection(row.to_server) as conn:
        pgserver.drop_marked_tenant(conn, names, marker)
    checkpoint("move.undo_target_dropped")
    if tenant.state in (TenantState.active, TenantState.suspended):
        deps.admin.secure_tenant_database(tenant.server, names)  # its writes back
    _say(progress, f"{tenant.slug} writes again on {row.from_server}")


# -- results -------------------------------------------------------------------------


def _row_json(r: TenantMove) -> dict[str, Any]:
    return {"id": r.id, "tenant": r.slug, "from_server": r.from_server,
            "to_server": r.to_server, "from_region": r.from_region, "to_region": r.to_region,
            "method": r.method, "reason": r.reason, "step": r.step, "outcome": r.outcome,
            "actor": r.actor, "bytes_copied": r.bytes_copied,
            "write_pause_ms": r.write_pause_ms, "error": r.error,
            "started_at": r.started_at.isoformat() if r.started_at else None,
            "finished_at": r.finished_at.isoformat() if r.finished_at else None}


_CHECK_KEYS = ("tables", "rows", "sequences", "large_objects", "compared",
               "pause_breakdown_s")


def _result(row: TenantMove, tenant: Tenant, *, resumed: bool = False, dry_run: bool = False,
            backup_id: int | None = None, old_objects_deleted: int = 0) -> MoveResult:
    checks = {k: row.checks[k] for k in _CHECK_KEYS if k in row.checks}
    return MoveResult(tenant.slug, row.method, row.bytes_copied or 0,
                      (row.write_pause_ms or 0) / 1000, row.from_server, row.to_server,
                      row.from_region, row.to_region, checks, row.id,
                      row.outcome if row.finished_at else MoveOutcome.running, resumed,
                      dry_run, None, backup_id or row.checks.get("backup_id"),
                      old_objects_deleted)
