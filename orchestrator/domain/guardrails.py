"""What a change to many tenants will do, in words an operator confirms: the rollout's
plan (direction, destructive statements, the fleet target and templates it moves)
and when it needs a confirmation (a terminal prompt or --yes). Pure: the service
gathers the plan, the offline SQL and the revision order; this decides and words it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.domain.destructive_sql import DATA_LOSS, Finding, summarize, unique


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def rev(revision: str | None) -> str:
    return revision or "base"


@dataclass(frozen=True)
class MigrationStep:
    """Tenants going from one revision to the target: the same SQL for each."""
    source: str | None
    target: str | None
    tenants: int
    downgrade: bool
    findings: tuple[Finding, ...] = ()
    unknown: bool = False  # a revision the migration files do not know: no SQL, fails

    @property
    def arrow(self) -> str:
        return f"{rev(self.source)} → {rev(self.target)}"


@dataclass(frozen=True)
class TargetMove:
    """A fleet or region rollout moves the target new tenants are created at, and the
    servers' templates follow it."""
    region: str | None  # None: the whole fleet
    current: str | None
    new: str | None
    downgrade: bool
    servers: int

    @property
    def scope(self) -> str:
        return f"region {self.region} target" if self.region else "fleet target"


@dataclass(frozen=True)
class RolloutRisk:
    target: str | None
    steps: tuple[MigrationStep, ...]
    target_move: TargetMove | None = None
    at_target: int = 0  # tenants in scope already there
    findings: tuple[Finding, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "findings",
                           tuple(unique(f for s in self.steps for f in s.findings)))

    @property
    def tenants(self) -> int:
        return sum(s.tenants for s in self.steps)

    @property
    def downgrade(self) -> bool:
        return any(s.downgrade for s in self.steps) or \
            bool(self.target_move and self.target_move.downgrade and
                 self.target_move.current != self.target_move.new)

    @property
    def needs_confirmation(self) -> bool:
        """Down, or anything destructive: a person (or --yes) says so first."""
        return self.downgrade or bool(self.findings)

    def headline(self) -> str:
        """One line: ``7 tenants, downgrade 0006_… → 0004_…, 1 DROP COLUMN (…)``."""
        parts = [plural(self.tenants, "tenant")]
        for down in (True, False):
            steps = [s for s in self.steps if s.downgrade == down and not s.unknown]
            if steps:
                sources = "/".join(rev(s.source) for s in steps)
                parts.append(f"{'downgrade' if down else 'upgrade'} {sources} → "
                             f"{rev(self.target)}" + (f" ({sum(s.tenants for s in steps)})"
                                                      if len(self.steps) > 1 else ""))
        for s in (s for s in self.steps if s.unknown):
            parts.append(f"{s.tenants} at unknown revision {rev(s.source)}")
        move = self.target_move
        if move is not None and move.current != move.new:
            parts.append(f"{move.scope} {'downgrade ' if move.downgrade else ''}"
                         f"{rev(move.current)} → {rev(move.new)}")
        if self.findings:
            parts.append(summarize(self.findings))
        return ", ".join(parts)

    def lines(self) -> list[str]:
        """The terraform-like plan shown before the prompt."""
        out = [f"plan: migrate {plural(self.tenants, 'tenant')} to {rev(self.target)}"
               + (f" ({self.at_target} already there)" if self.at_target else "")]
        for s in self.steps:
            if s.unknown:
                out.append(f"  ? {plural(s.tenants, 'tenant')} at {rev(s.source)}, a "
                           "revision the migration files do not know: they fail, untouched")
                continue
            out.append(f"  {'-' if s.downgrade else '~'} {plural(s.tenants, 'tenant')} "
                       f"{s.arrow}{' (downgrade)' if s.downgrade else ''}")
        move = self.target_move
        if move is not None and move.current != move.new:
            out.append(f"  {'-' if move.downgrade else '~'} {move.scope} "
                       f"{rev(move.current)} → {rev(move.new)}"
                       f"{' (downgrade)' if move.downgrade else ''}; the templates on "
                       f"{plural(move.servers, 'server')} follow")
        for f in sorted(self.findings, key=lambda f: f.kind not in DATA_LOSS):
            out.append(f"  !! {f.describe()}")
        if self.findings:
            out.append(f"destructive: {summarize(self.findings, names=0)}")
        return out

    def to_json(self) -> dict[str, Any]:
        move = self.target_move
        return {
            "tenants": self.tenants, "target": self.target, "downgrade": self.downgrade,
            "needs_confirmation": self.needs_confirmation, "summary": self.headline(),
            "steps": [{"from": s.source, "to": s.target, "tenants": s.tenants,
                       "downgrade": s.downgrade, "unknown": s.unknown} for s in self.steps],
            "target_move": None if move is None else {
                "region": move.region, "from": move.current, "to": move.new,
                "downgrade": move.downgrade, "servers": move.servers},
            "destructive": [f.to_json() for f in self.findings],
        }


def steps_of(sources: Sequence[tuple[str | None, int]], target: str | None,
             downgrades: dict[str | None, bool],
             findings: dict[str | None, list[Finding]],
             unknown: set[str | None] | frozenset[str | None] = frozenset()
             ) -> tuple[MigrationStep, ...]:
    """One step per source revision (tenants at the target are no step)."""
    return tuple(MigrationStep(src, target, n, downgrades.get(src, False),
                               tuple(findings.get(src, ())), src in unknown)
                 for src, n in sources if src != target and n)
