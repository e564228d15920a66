"""Fleet migrations: one rollout takes every tenant in scope to a target revision,
canary first, then in waves, within a failure budget.

How it holds together:
- The rollout and its tenants are catalog rows. Workers (threads here, and any
  other process running the same command) *claim* tenant rows with
  ``FOR UPDATE SKIP LOCKED``, so several machines divide the work and no
  tenant is claimed twice.
- Each tenant migrates in-process, in its own transaction, as its owner role,
  under the tenant's advisory lock (the one provisioning takes too), with
  ``lock_timeout``/``statement_timeout``: a busy table makes the tenant back
  off and retry instead of queueing the application behind an ALTER.
- The revision is re-read inside that transaction, so a tenant that is already
  at the target (a re-run after a crash) is never migrated again.
- A rollout of the whole fleet (or a region) first moves the fleet's target
  revision and the servers' templates, so tenants created meanwhile are
  created at the target; a last sweep catches any created just before.
- One target at a time: each process running a rollout holds that rollout's
  running lock (shared, in the catalog) from its registration to its final
  status; a rollout to another target is refused while any such lock is held,
  and a rollout whose processes died (their locks went with them) blocks nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy.exc
from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from orchestrator.adapters import clock
from orchestrator.adapters.catalog.db import lock_key, lock_key_sql, with_dbname
from orchestrator.adapters.catalog.models import Rollout, RolloutTenant, Tenant
from orchestrator.adapters.faults import checkpoint
from orchestrator.adapters.postgres import alembic_runner as tenant_migrations
from orchestrator.adapters.postgres.lock_watch import LockWatch
from orchestrator.domain import lock_blockers
from orchestrator.domain.destructive_sql import classify
from orchestrator.domain.durations import parse, parse_pg_duration
from orchestrator.domain.errors import FIELD, Conflict, ExitCode, InvalidInput, NotFound, first_line
from orchestrator.domain.guardrails import RolloutRisk, TargetMove, steps_of
from orchestrator.domain.names import catalog_mismatch, tenant_lock, validate_slug
from orchestrator.domain.rollout_plan import (
    CANARY_WAVE,
    INTERRUPTED,
    PlanTenant,
    assign_waves,
    final_status,
    parse_budget,
    parse_waves,
    stop_reason,
    wave_budget,
)
from orchestrator.domain.states import HAS_DATABASE
from orchestrator.domain.statuses import ROLLOUT_DRY_RUN, RolloutStatus, TenantMigration
from orchestrator.services import spares, templates

if TYPE_CHECKING:
    from orchestrator.bootstrap import Deps

RETRYABLE_SQLSTATES = {"55P03", "57014", "40P01"}  # lock timeout, statement timeout, deadlock
LOCK_NOT_AVAILABLE = "55P03"

# Claim the next pending row of a wave and try the claimed tenant's lock, in one
# statement on the worker's own connection (autocommit: the row update commits at
# once; the session-level lock stays until unlocked or the connection dies).
CLAIM_SQL = f"""
    WITH next AS (
        UPDATE rollout_tenants SET status = '{TenantMigration.running}', worker = %(worker)s,
               started_at = %(now)s
        WHERE (rollout_id, tenant_id) = (
            SELECT rollout_id, tenant_id FROM rollout_tenants
            WHERE rollout_id = %(rid)s AND wave = %(wave)s
              AND status = '{TenantMigration.pending}'
              AND NOT (server = ANY(%(full)s::text[]))
              -- not rollout_plan.budget_exceeded(failed, budget), fenced in the claim
              AND (SELECT count(*) FROM rollout_tenants
                   WHERE rollout_id = %(rid)s
                     AND status = '{TenantMigration.failed}') <= %(budget)s
            ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
        RETURNING tenant_id, slug, server, from_revision)
    SELECT next.tenant_id, next.slug, coalesce(t.server, next.server), next.from_revision,
           t.database, t.owner_role, t.state,
           pg_try_advisory_lock({lock_key_sql("'tenant:' || next.slug")})
    FROM next LEFT JOIN tenants t ON t.id = next.tenant_id"""

# A tenant's result, and its last known revision when it has one.
RECORD_SQL = f"""
    WITH result AS (
        UPDATE rollout_tenants SET status = %(status)s, from_revision = %(from_rev)s,
               to_revision = %(to_rev)s, attempts = %(attempts)s,
               finished_at = CASE WHEN %(pending)s THEN NULL ELSE %(now)s END,
               worker = CASE WHEN %(pending)s THEN NULL ELSE worker END,
               duration_ms = %(ms)s, error = %(error)s
        WHERE rollout_id = %(rid)s AND tenant_id = %(tid)s
          AND status = '{TenantMigration.running}'
          AND worker = %(worker)s
        RETURNING tenant_id)
    UPDATE tenants SET migrated_at = %(now)s,
           revision = CASE WHEN %(failed)s THEN revision ELSE %(to_rev)s END,
           migration_error = CASE WHEN %(failed)s THEN %(tenant_error)s END
    WHERE id IN (SELECT tenant_id FROM result) AND NOT %(pending)s"""


@dataclass
class RolloutOptions:
    to: str = "head"
    region: str | None = None
    tenants: list[str] | None = None
    concurrency: int = 8
    per_server: int = 4
    canary: int = 0
    waves: str = "100%"
    max_failures: str = "10%"
    lock_timeout: str = "2s"
    statement_timeout: str = "5min"
    retries: int = 3
    dry_run: bool = False

    @property
    def whole_scope(self) -> bool:
        """A fleet or region rollout moves the target new tenants are created at."""
        return not self.tenants


@dataclass
class TenantResult:
    slug: str
    server: str
    wave: int
    status: str  # ok | skipped | failed
    from_revision: str | None
    to_revision: str | None
    attempts: int
    duration_ms: int
    error: str | None = None
    # a lock timeout: who held the lock (redacted; [] when not seen); else None
    blocked_by: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Claim:
    tenant_id: int
    slug: str
    server: str
    planned_from: str | None
    database: str | None
    owner_role: str | None
    state: str | None
    locked: bool = False  # the claim got the tenant's lock


@dataclass
class Event:
    kind: str  # plan | template | wave | tenant | stop
    wave: int = 0
    size: int = 0
    result: TenantResult | None = None
    message: str = ""


@dataclass
class RolloutSummary:
    rollout_id: int | None
    target: str | None
    status: str
    waves: list[list[str]]
    counts: dict[str, int] = field(default_factory=dict)
    results: list[TenantResult] = field(default_factory=list)
    stopped_reason: str | None = None
    templates: dict[str, str] = field(default_factory=dict)
    sql: dict[str, str] = field(default_factory=dict)
    risk: RolloutRisk | None = None  # dry runs: what a real run would ask to confirm

    @property
    def exit_code(self) -> ExitCode:
        return {RolloutStatus.completed: ExitCode.OK, ROLLOUT_DRY_RUN: ExitCode.OK,
                RolloutStatus.failed: ExitCode.FAILED, RolloutStatus.stopped:
                ExitCode.ROLLOUT_STOPPED, RolloutStatus.interrupted: ExitCode.INTERRUPTED
                }.get(self.status, ExitCode.FAILED)

    def to_json(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id, "target": self.target, "status": self.status,
            "stopped_reason": self.stopped_reason, "counts": self.counts,
            "waves": self.waves, "templates": self.templates,
            "results": [asdict(r) for r in self.results],
            **({"sql": self.sql} if self.sql else {}),
            **({"guard": self.risk.to_json()} if self.risk is not None else {}),
        }


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None) or exc
    return getattr(orig, "sqlstate", None)


class RolloutRun:
    def __init__(self, fleet: Deps, opts: RolloutOptions,
                 on_event: Callable[[Event], None] | None = None,
                 stop: threading.Event | None = None) -> None:
        self.fleet = fleet
        self.opts = opts
        self.on_event = on_event or (lambda e: None)
        self.stop = stop or threading.Event()
        self.location = fleet.cfg.tenant_migrations
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.lock_timeout = parse_pg_duration(opts.lock_timeout, "lock_timeout")
        self.statement_timeout = parse_pg_duration(opts.statement_timeout,
                                                   "statement_timeout")
        for name, ok, must in (("concurrency", 1 <= opts.concurrency <= 64, "be 1-64"),
                               ("per_server", opts.per_server >= 1, "be at least 1"),
                               ("retries", opts.retries >= 0, "be at least 0"),
                               ("canary", opts.canary >= 0, "be at least 0")):
            if not ok:
                raise InvalidInput(f"{FIELD} must {must}", field=name)
        self.wave_steps = parse_waves(opts.waves)
        parse_budget(opts.max_failures, 100)  # syntax now; the number needs the plan
        if opts.region:
            fleet.cfg.region(opts.region)
        self.target = tenant_migrations.resolve_revision(self.location, opts.to)
        self._claim_lock = threading.Lock()
        self._inflight: dict[str, int] = {}
        self._results: list[TenantResult] = []
        self._results_lock = threading.Lock()
        # this rollout's liveness lock, from its registration to its final status
        self._running = ExitStack()
        # who blocks a migration waiting on a lock (none to watch without a timeout)
        lock_ms = parse(opts.lock_timeout, "lock_timeout", bare_ms=True).milliseconds
        self._lock_watch = LockWatch(lambda server: fleet.cfg.server(server).admin_dsn,
                                     lock_ms / 1000) if lock_ms else None

    @property
    def target_name(self) -> str:
        return self.target or "base"

    # -- planning ---------------------------------------------------------------

    def scope(self) -> list[PlanTenant]:
        """Tenants in scope, with their last known revision (pure data from here on)."""
        opts = self.opts
        q = select(Tenant).where(Tenant.state.in_(HAS_DATABASE))
        if opts.region:
            self.fleet.cfg.region(opts.region)
            q = q.where(Tenant.region == opts.region)
        if opts.tenants:
            slugs = [validate_slug(s) for s in opts.tenants]
            q = q.where(Tenant.slug.in_(slugs))
        with self.fleet.catalog.session() as s:
            rows = list(s.scalars(q))
        if opts.tenants:
            found = {t.slug for t in rows}
            missing = [s for s in opts.tenants if s not in found]
            if missing:
                raise NotFound(f"no migratable tenant named {', '.join(missing)}")
        return [PlanTenant(t.id, t.slug, t.region, t.server, t.revision) for t in rows]

    def plan(self) -> list[list[PlanTenant]]:
        return assign_waves(self.scope(), self.opts.canary, self.wave_steps)

    def key(self) -> str:
        o = self.opts
        raw = json.dumps([self.target_name, o.region, sorted(o.tenants or []), o.canary,
                          o.waves])
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    # -- dry run ----------------------------------------------------------------------

    def dry_run(self) -> RolloutSummary:
        waves = self.plan()
        sql = self._offline_sql(waves)
        return RolloutSummary(None, self.target, ROLLOUT_DRY_RUN,
                              [[t.slug for t in w] for w in waves],
                              sql={f"{src or 'base'} -> {self.target_name}": text
                                   for src, text in sql.items()},
                              counts={"tenants": sum(len(w) for w in waves)},
                              risk=self._risk(waves, sql))

    def preview(self) -> RolloutRisk:
        """What a run would do, judged on the same offline SQL the dry run prints:
        the CLI asks for a confirmation when it goes down or destroys anything.
        Reads only (the plan, the fleet target); writes nothing."""
        waves = self.plan()
        return self._risk(waves, self._offline_sql(waves))

    def _offline_sql(self, waves: list[list[PlanTenant]]) -> dict[str | None, str]:
        """Per source revision (None: base) not at the target, the SQL it runs. A
        revision these files do not know (a newer deploy's) has none: its tenants
        fail in the run, untouched."""
        sources = sorted({t.revision for w in waves for t in w if t.revision != self.target},
                         key=lambda r: r or "base")
        return {src: tenant_migrations.offline_sql(self.location, src, self.target_name)
                for src in sources if tenant_migrations.known_revision(self.location, src)}

    def _risk(self, waves: list[list[PlanTenant]], sql: dict[str | None, str]
              ) -> RolloutRisk:
        script = tenant_migrations.script_directory(self.location)
        counts: dict[str | None, int] = {}
        for t in (t for w in waves for t in w):
            counts[t.revision] = counts.get(t.revision, 0) + 1
        steps = steps_of(sorted(counts.items(), key=lambda kv: kv[0] or "base"), self.target,
                         {src: tenant_migrations.is_downgrade(script, src, self.target_name)
                          for src in sql},
                         {src: classify(text) for src, text in sql.items()},
                         unknown={src for src in counts if src != self.target
                                  and src not in sql})
        move = None
        if self.opts.whole_scope:
            current = self.fleet.target_revision(self.opts.region)
            servers = [sc for sc in self.fleet.cfg.servers
                       if self.opts.region is None or sc.region == self.opts.region]
            # a target these files do not know is a newer deploy's: leaving it is down
            down = not tenant_migrations.known_revision(self.location, current) or \
                tenant_migrations.is_downgrade(script, current, self.target_name)
            move = TargetMove(self.opts.region, current, self.target, down, len(servers))
        return RolloutRisk(self.target, steps, move, at_target=counts.get(self.target, 0))

    # -- the run ------------------------------------------------------------------------

    def run(self) -> RolloutSummary:
        if self.opts.dry_run:
            return self.dry_run()
        try:
            return self._run()
        finally:
            self._running.close()
            if self._lock_watch is not None:
                self._lock_watch.close()

    def _run(self) -> RolloutSummary:
        waves = self.plan()  # validates everything before the first write
        total = sum(len(w) for w in waves)
        allowed = parse_budget(self.opts.max_failures, total)
        rollout_id, created = self._create_or_attach(waves)
        nonempty = sum(1 for w in waves if w)
        self.on_event(Event("plan", message=f"rollout {rollout_id} "
                            f"{'created' if created else 'resumed'}: {total} tenants to "
                            f"{self.target_name} in {nonempty} wave{'s' * (nonempty != 1)}"))
        template_report: dict[str, str] = {}
        stopped: str | None = None
        # While this lock is held, this process is alive: others may reap the rows
        # it has claimed only once it is free (see _reset_stale).
        templates_done: Future[dict[str, str]] | None = None
        with self.fleet.catalog.advisory_lock(self._alive_lock(self.worker), wait=True), \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="templates") as bg:
            self._reset_stale(rollout_id)
            wave_numbers = self._waves_of(rollout_id)
            for wave in wave_numbers:
                if wave != CANARY_WAVE and templates_done is None and self.opts.whole_scope:
                    templates_done = self._move_target(bg)
                stopped = self._run_wave(rollout_id, wave, allowed)
                if stopped:
                    break
            if not stopped and templates_done is None and self.opts.whole_scope:
                templates_done = self._move_target(bg)
            if templates_done is not None:
                template_report = templates_done.result()
            if not stopped and self.opts.whole_scope and not self.stop.is_set():
                sweep = self._sweep(rollout_id, (max(wave_numbers) + 1) if wave_numbers else 1)
                if sweep:
                    stopped = self._run_wave(rollout_id, sweep, allowed)
        if self.stop.is_set() and not stopped:
            stopped = INTERRUPTED
        return self._finish(rollout_id, waves, stopped, template_report)

    def _move_target(self, bg: ThreadPoolExecutor) -> Future[dict[str, str]]:
        """Once the canary has passed: tenants created from now on are created at the
        target (fleet or region), and the templates follow in the background while
        the waves run (provisioning meanwhile waits for, or builds, an up-to-date
        template: it never clones a stale one)."""
        self.fleet.set_target_revision(self.target, self.opts.region)
        return bg.submit(self._update_templates)

    @staticmethod
    def _alive_lock(worker: str) -> str:
        return f"rollout-worker:{worker}"

    @staticmethod
    def _running_lock(rollout_id: int) -> str:
        return f"rollout-running:{rollout_id}"

    @contextmanager
    def _hold_running(self, rollout_id: int) -> Iterator[None]:
        """Held (shared: several processes may work on one rollout) by every process
        running the rollout, for as long as it does; Postgres drops it with the
        process's session, so a rollout whose processes died holds nothing."""
        with self.fleet.catalog.advisory_lock(self._running_lock(rollout_id), shared=True,
                                              wait=True):
            yield

    def _refuse_other_target(self, s: Session) -> None:
        """One fleet target at a time: a rollout to another target that some process
        is still running (it holds its running lock) refuses this one; one whose
        processes are all gone (a crash, a kill) does not count, whatever its row
        says. Two rollouts to the same target may run at once (the same command
        attaches to the same rollout; another scope converges on the same revision)."""
        others = s.execute(select(Rollout.id, Rollout.target, Rollout.actor).where(
            Rollout.status.in_((RolloutStatus.running, RolloutStatus.interrupted)),
            Rollout.target != self.target_name).order_by(Rollout.id)).all()
        for rollout_id, target, who in others:
            # free: nobody runs it (held until this transaction ends, so nobody can
            # start running it meanwhile either)
            free = s.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"),
                            {"k": lock_key(self._running_lock(rollout_id))})
            if not free:
                raise Conflict(f"rollout {rollout_id} to {target} (started by {who}) is "
                               f"still running; one target at a time: let it finish or "
                               f"stop it before a rollout to {self.target_name}")

    def _create_or_attach(self, waves: list[list[PlanTenant]]) -> tuple[int, bool]:
        key = self.key()
        with self.fleet.catalog.session() as s, s.begin():
            # One registration at a time, fleet-wide: the check for a rollout to
            # another target and this one's running lock are then one step.
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key("rollout:start")})
            self._refuse_other_target(s)
            existing = s.scalars(select(Rollout).where(
                Rollout.key == key,
                Rollout.status.in_((RolloutStatus.running, RolloutStatus.interrupted)))
                .order_by(Rollout.id.desc()).limit(1)).one_or_none()
            if existing is not None:
                existing.status = RolloutStatus.running
                self._running.enter_context(self._hold_running(existing.id))
                return existing.id, False
            rollout = Rollout(key=key, target=self.target_name, status=RolloutStatus.running,
                              actor=self.fleet.catalog.actor, options=asdict(self.opts))
            s.add(rollout)
            s.flush()
            self._running.enter_context(self._hold_running(rollout.id))
            rows = [{"rollout_id": rollout.id, "tenant_id": t.tenant_id, "slug": t.slug,
                     "server": t.server, "wave": wave, "from_revision": t.revision,
                     "status": TenantMigration.skipped if t.revision == self.target
                     else TenantMigration.pending,
                     "to_revision": t.revision if t.revision == self.target else None,
                     "error": "already at target" if t.revision == self.target else None}
                    for wave, members in enumerate(waves) for t in members]
            for seq, row in enumerate(rows):
                row["seq"] = seq
            if rows:  # one multi-row INSERT, not a unit of work per tenant
                s.execute(pg_insert(RolloutTenant), rows)
            seq = len(rows)
            self.fleet.catalog.audit("rollout.start", session=s, rollout=rollout.id,
                                     target=self.target_name, tenants=seq,
                                     options=asdict(self.opts))
            return rollout.id, True

    def _waves_of(self, rollout_id: int) -> list[int]:
        with self.fleet.catalog.session() as s:
            return sorted(s.scalars(select(RolloutTenant.wave).where(
                RolloutTenant.rollout_id == rollout_id).distinct()))

    def _update_templates(self) -> dict[str, str]:
        """Bring the in-scope servers' templates to the target. A failure is reported,
        not fatal: provisioning falls back to migrating an empty database."""
        report: dict[str, str] = {}
        servers = [s for s in self.fleet.cfg.servers
                   if self.opts.region is None or s.region == self.opts.region]
        for sc in servers:
            try:
                # a template already at the target (entries sharing a cluster share
                # it) is left alone by build, which reads it on the cluster
                rev = templates.build(self.fleet, sc.name, self.target_name)
                report[sc.name] = rev or "base"
                if self.fleet.cfg.spare_databases:  # spares of the old revision go
                    spares.fill(self.fleet, sc.name)
            except Exception as exc:  # noqa: BLE001 - any failure is reported per server
                report[sc.name] = f"error: {first_line(exc)}"
            self.on_event(Event("template", message=f"template on {sc.name}: "
                                f"{report[sc.name]}"))
        return report

    def _reset_stale(self, rollout_id: int) -> None:
        """Rows left 'running' by a process that died go back to 'pending'. A worker
        is dead when its liveness lock is free (held for its whole run, released by
        Postgres when its session ends)."""
        with self.fleet.catalog.session() as s:
            workers = set(s.scalars(select(RolloutTenant.worker).where(
                RolloutTenant.rollout_id == rollout_id,
                RolloutTenant.status == TenantMigration.running,
                RolloutTenant.worker != self.worker).distinct()))
        for worker in workers:
            if worker is None:
                continue
            with self.fleet.catalog.advisory_lock(self._alive_lock(worker)) as dead:
                if dead:
                    with self.fleet.catalog.session() as s, s.begin():
                        s.execute(update(RolloutTenant).where(
                            RolloutTenant.rollout_id == rollout_id,
                            RolloutTenant.worker == worker,
                            RolloutTenant.status == TenantMigration.running).values(
                                status=TenantMigration.pending, worker=None))

    def _sweep(self, rollout_id: int, wave: int) -> int | None:
        """Tenants in scope that the plan did not know (created just before the
        target moved) and that are not at the target: one more wave."""
        known = select(RolloutTenant.tenant_id).where(RolloutTenant.rollout_id == rollout_id)
        q = select(Tenant).where(Tenant.state.in_(HAS_DATABASE), Tenant.id.not_in(known))
        if self.opts.region:
            q = q.where(Tenant.region == self.opts.region)
        with self.fleet.catalog.session() as s, s.begin():
            late = [t for t in s.scalars(q) if t.revision != self.target]
            seq = s.scalar(select(func.coalesce(func.max(RolloutTenant.seq), 0)).where(
                RolloutTenant.rollout_id == rollout_id)) or 0
            if late:  # two processes may sweep at once: the first insert wins
                s.execute(pg_insert(RolloutTenant).values([
                    {"rollout_id": rollout_id, "tenant_id": t.id, "slug": t.slug,
                     "server": t.server, "wave": wave, "seq": seq + i,
                     "from_revision": t.revision}
                    for i, t in enumerate(late, start=1)]).on_conflict_do_nothing())
        return wave if late else None

    # -- waves and workers -----------------------------------------------------------------

    def _run_wave(self, rollout_id: int, wave: int, allowed: int) -> str | None:
        size = self._count(rollout_id, wave=wave, status=TenantMigration.pending)
        budget = wave_budget(wave, allowed)
        if size:
            self.on_event(Event("wave", wave=wave, size=size))
            workers = max(1, min(self.opts.concurrency, size))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rollout") as pool:
                for f in [pool.submit(self._worker, rollout_id, wave, budget)
                          for _ in range(workers)]:
                    f.result()
        # Barrier, even when this process found nothing to do: other processes may
        # still be finishing tenants of this wave; rows of dead ones are reaped.
        while self._count(rollout_id, wave=wave, status=TenantMigration.running) \
                and not self.stop.is_set():
            time.sleep(0.2)
            self._reset_stale(rollout_id)
            if self._count(rollout_id, wave=wave, status=TenantMigration.pending) \
                    and not self.stop.is_set():
                return self._run_wave(rollout_id, wave, allowed)
        return stop_reason(wave, self._count(rollout_id, status=TenantMigration.failed),
                           self._count(rollout_id, wave=wave, status=TenantMigration.failed),
                           allowed, self.stop.is_set())

    def _count(self, rollout_id: int, *, wave: int | None = None,
               status: str | None = None) -> int:
        q = select(func.count()).select_from(RolloutTenant).where(
            RolloutTenant.rollout_id == rollout_id)
        if wave is not None:
            q = q.where(RolloutTenant.wave == wave)
        if status is not None:
            q = q.where(RolloutTenant.status == status)
        with self.fleet.catalog.session() as s:
            return s.scalar(q) or 0

    def _claim(self, conn: psycopg.Connection, rollout_id: int, wave: int, budget: int
               ) -> Claim | None:
        """Take the next pending tenant of the wave (skipping rows other processes
        hold, and servers at their cap here), unless the failure budget is spent, and
        try the tenant's lock. One round trip, which also brings what the migration
        needs to know."""
        with self._claim_lock:
            full = [srv for srv, n in self._inflight.items() if n >= self.opts.per_server]
            row = conn.execute(CLAIM_SQL, {"worker": self.worker, "rid": rollout_id,
                                           "wave": wave, "full": full,
                                           "budget": budget, "now": clock.utcnow()}).fetchone()
            if row is None:
                return None
            tenant_id, slug, server, planned_from, database, owner_role, state, locked = row
            self._inflight[server] = self._inflight.get(server, 0) + 1
            return Claim(int(tenant_id), slug, server, planned_from, database, owner_role,
                         state, bool(locked))

    def _worker(self, rollout_id: int, wave: int, budget: int) -> None:
        # One catalog connection per worker for its whole life: claims, tenant locks
        # and results go over it (a crash drops it, and with it the locks).
        with self.fleet.catalog.direct("tenantctl-rollout") as conn:
            # Claims and results need no WAL flush of their own: a catalog crash can
            # lose only the last few, and a re-run redoes them (a lost claim is a
            # pending row again; a tenant whose result was lost is found at target).
            conn.execute("SET synchronous_commit = off")
            while not self.stop.is_set():
                claimed = self._claim(conn, rollout_id, wave, budget)
                if claimed is None:
                    with self._claim_lock:
                        busy = any(self._inflight.values())
                    if busy and self._count(rollout_id, wave=wave,
                                            status=TenantMigration.pending):
                        time.sleep(0.02)  # what is left sits on servers at their cap
                        continue
                    return
                try:
                    result = self._migrate_one(conn, rollout_id, claimed, wave)
                except Exception as exc:  # noqa: BLE001 - one tenant never stops the others
                    result = TenantResult(claimed.slug, claimed.server, wave,
                                          TenantMigration.failed,
                                          claimed.planned_from, claimed.planned_from, 1, 0,
                                          f"{type(exc).__name__}: {first_line(exc)}")
                    self._record(conn, rollout_id, claimed.tenant_id, result)
                finally:
                    with self._claim_lock:
                        self._inflight[claimed.server] -= 1
                    if not conn.closed:  # every path, whatever happened: never keep it
                        conn.execute("SELECT pg_advisory_unlock_all()")
                self.on_event(Event("tenant", wave=wave, result=result))
                checkpoint("rollout.tenant_done")

    def _migrate_one(self, conn: psycopg.Connection, rollout_id: int, claim: Claim,
                     wave: int) -> TenantResult:
        """Migrate one claimed tenant and record the result — under the tenant's lock
        whenever the tenant was touched, so no other operation's result on the same
        tenant can land in between. The claim tried the lock already."""
        started = time.monotonic()
        slug, server, planned_from = claim.slug, claim.server, claim.planned_from

        def done(status: str, before: str | None, after: str | None, attempts: int,
                 error: str | None = None, blocked: list[dict[str, Any]] | None = None
                 ) -> TenantResult:
            r = TenantResult(slug, server, wave, status, before, after, attempts,
                             int((time.monotonic() - started) * 1000), error, blocked)
            self._record(conn, rollout_id, claim.tenant_id, r)
            return r

        if claim.database is None or claim.owner_role is None or \
                claim.state not in HAS_DATABASE:
            return done(TenantMigration.skipped, planned_from, planned_from, 0,
                        f"tenant is {claim.state or 'gone'}")
        # the claim carries no login role: only the names a migration uses are checked
        if (why := catalog_mismatch(slug, claim.database, f"tenant_{slug}",
                                    claim.owner_role)) is not None:
            return done(TenantMigration.failed, planned_from, planned_from, 0,
                        f"catalog row inconsistent: {why}; not touched")
        dsn = with_dbname(self.fleet.cfg.server(server).admin_dsn, claim.database)
        owner = claim.owner_role
        key = lock_key(tenant_lock(slug))
        last_error = "never started"
        blocked_by: list[dict[str, Any]] | None = None  # of the last lock timeout
        locked = claim.locked
        for attempt in range(1, self.opts.retries + 2):
            if self.stop.is_set() and attempt > 1:
                # stopped while backing off: not this tenant's failure; a re-run retries
                return done(TenantMigration.pending, planned_from, None, attempt - 1, None)
            if attempt > 1:
                locked = bool(conn.execute("SELECT pg_try_advisory_lock(%s)",
                                           (key,)).fetchone()[0])  # type: ignore[index]
            if locked:
                watched: list[lock_blockers.Blocker] = []
                try:
                    with tenant_migrations.tenant_connection(
                            dsn, role=owner, lock_timeout=self.lock_timeout,
                            statement_timeout=self.statement_timeout) as tconn, \
                            self._watching(server, tconn, watched):
                        before, after = tenant_migrations.migrate_from(
                            tconn, self.location, self.target_name, as_role=None)
                    # at target already: a re-run after a crash, or done elsewhere
                    status = TenantMigration.ok if before != after or planned_from != after \
                        else TenantMigration.skipped
                    return done(status, before if before != after else planned_from,
                                after, attempt)
                except (sqlalchemy.exc.DBAPIError, psycopg.Error) as exc:
                    last_error, blocked_by = first_line(exc), None
                    if _sqlstate(exc) == LOCK_NOT_AVAILABLE:
                        # name who held the lock, as seen while the migration waited
                        last_error += "; " + lock_blockers.describe(watched)
                        blocked_by = [b.shown() for b in watched]
                    if _sqlstate(exc) not in RETRYABLE_SQLSTATES:
                        return done(TenantMigration.failed, planned_from, planned_from,
                                    attempt, last_error, blocked_by)
                except Exception as exc:  # noqa: BLE001 - e.g. a bug in a revision file
                    return done(TenantMigration.failed, planned_from, planned_from, attempt,
                                f"{type(exc).__name__}: {first_line(exc)}")
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            else:
                last_error, blocked_by = "tenant locked by another operation", None
            if attempt <= self.opts.retries:
                # exponential backoff with jitter: 0.2 s, 0.4 s, 0.8 s, ...
                time.sleep(0.2 * 2 ** (attempt - 1) * (0.5 + random.random()))
        return done(TenantMigration.failed, planned_from, planned_from, self.opts.retries + 1,
                    f"gave up after {self.opts.retries + 1} attempts: {last_error}",
                    blocked_by)

    @contextmanager
    def _watching(self, server: str, tconn: sqlalchemy.Connection,
                  into: list[lock_blockers.Blocker]
                  ) -> Iterator[None]:
        """While the block runs, ``into`` holds who blocked the migration's backend
        when last seen waiting on a lock (see adapters/postgres/lock_watch.py)."""
        if self._lock_watch is None:
            yield
            return
        with self._lock_watch.watching(server, tenant_migrations.backend_pid(tconn)) as w:
            try:
                yield
            finally:
                into[:] = w.blockers

    def _record(self, conn: psycopg.Connection, rollout_id: int, tenant_id: int,
                r: TenantResult) -> None:
        """The tenant's result and its last known revision, in one round trip. Fenced
        on this worker still holding the row: if the row was reaped and redone by
        another process meanwhile, this result is stale and is dropped."""
        failed = r.status == TenantMigration.failed
        pending = r.status == TenantMigration.pending
        conn.execute(RECORD_SQL, {
            "status": r.status, "from_rev": r.from_revision, "to_rev": r.to_revision,
            "attempts": r.attempts, "ms": r.duration_ms, "error": r.error,
            "rid": rollout_id, "tid": tenant_id, "failed": failed, "pending": pending,
            "worker": self.worker, "now": clock.utcnow(),
            "tenant_error": f"rollout {rollout_id}: {r.error}" if failed else None})
        if not pending:
            with self._results_lock:
                self._results.append(r)

    def _finish(self, rollout_id: int, waves: list[list[PlanTenant]], stopped: str | None,
                template_report: dict[str, str]) -> RolloutSummary:
        with self.fleet.catalog.session() as s, s.begin():
            counts = dict(s.execute(select(RolloutTenant.status, func.count()).where(
                RolloutTenant.rollout_id == rollout_id).group_by(RolloutTenant.status)).all())
            status = final_status(stopped, counts)  # running: another process is at it
            s.execute(update(Rollout).where(Rollout.id == rollout_id).values(
                status=status,
                finished_at=None if status == RolloutStatus.running else clock.utcnow()))
            self.fleet.catalog.audit("rollout.finish", session=s, rollout=rollout_id,
                                     status=status, counts=counts, reason=stopped,
                                     outcome="ok" if status == RolloutStatus.completed
                                     else "failed")
        if status == RolloutStatus.running:
            status = RolloutStatus.failed if counts.get(TenantMigration.failed) else \
                RolloutStatus.completed
        with self._results_lock:
            results = sorted(self._results, key=lambda r: (r.wave, r.slug))
        return RolloutSummary(rollout_id, self.target, status,
                              [[t.slug for t in w] for w in waves], counts=counts,
                              results=results,
                              stopped_reason=None if stopped == INTERRUPTED else stopped,
                              templates=template_report)
