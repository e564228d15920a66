"""Rollout planning: pure functions over plain data. Which tenants go in which
wave, in which order, and when the rollout stops (the failure budget, the canary)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.domain.errors import FIELD, InvalidInput
from orchestrator.domain.statuses import RolloutStatus, TenantMigration

CANARY_WAVE = 0


@dataclass(frozen=True)
class PlanTenant:
    tenant_id: int
    slug: str
    region: str
    server: str
    revision: str | None


@dataclass(frozen=True)
class WaveStep:
    """One entry of ``--waves``: a cumulative count or a cumulative percentage."""

    count: int | None = None
    percent: float | None = None

    def cumulative(self, total: int) -> int:
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, math.ceil(total * self.percent / 100))


def parse_waves(spec: str) -> list[WaveStep]:
    """``"1,10%,100%"`` → wave 1 has one tenant, wave 2 brings the total to 10 %,
    wave 3 to everything. The last wave always reaches 100 %."""
    steps: list[WaveStep] = []
    for part in (p.strip() for p in spec.split(",")):
        try:
            if part.endswith("%"):
                pct = float(part[:-1])
                if not 0 < pct <= 100:
                    raise ValueError
                steps.append(WaveStep(percent=pct))
            else:
                n = int(part)
                if n < 1:
                    raise ValueError
                steps.append(WaveStep(count=n))
        except ValueError:
            raise InvalidInput(f"invalid {FIELD} {spec!r}: use counts and percentages, "
                               "e.g. 1,10%,100%", field="waves") from None
    return steps


def parse_budget(spec: str, total: int) -> int:
    """``--max-failures``: ``N`` tenants or ``P%`` of the rollout. Returns the number
    of failures allowed; one more stops the rollout."""
    try:
        if spec.endswith("%"):
            pct = float(spec[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return math.floor(total * pct / 100)
        n = int(spec)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        raise InvalidInput(f"invalid {FIELD} {spec!r}: use N or P%",
                           field="max_failures") from None


def interleave_by_server(tenants: Sequence[PlanTenant]) -> list[PlanTenant]:
    """Order tenants round-robin over their servers (each server's tenants by slug),
    so every wave — the canary first — spreads over as many servers as it can,
    and per-server caps do not serialise a wave."""
    by_server: dict[str, list[PlanTenant]] = {}
    for t in sorted(tenants, key=lambda t: (t.server, t.slug)):
        by_server.setdefault(t.server, []).append(t)
    queues = [by_server[s] for s in sorted(by_server)]
    longest = max((len(q) for q in queues), default=0)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


def assign_waves(tenants: Sequence[PlanTenant], canary: int, waves: Sequence[WaveStep]
                 ) -> list[list[PlanTenant]]:
    """Split the ordered tenants into [canary, wave 1, wave 2, ...]. The canary
    (possibly empty) comes first; wave sizes are cumulative over the rest."""
    ordered = interleave_by_server(tenants)
    canary = max(0, min(canary, len(ordered)))
    out: list[list[PlanTenant]] = [ordered[:canary]]
    rest = ordered[canary:]
    done = 0
    for i, step in enumerate(waves):
        upto = len(rest) if i == len(waves) - 1 else step.cumulative(len(rest))
        if upto > done:
            out.append(rest[done:upto])
            done = upto
    if done < len(rest):
        out.append(rest[done:])
    return out


# The stop rule: after each wave (and before each claim, see services/rollout.py's
# CLAIM_SQL, which fences on the same comparison) the rollout asks whether to go on.

# the stop reason of a rollout told to stop (its status says so too)
INTERRUPTED = "interrupted"


def budget_exceeded(failures: int, allowed: int) -> bool:
    return failures > allowed


def wave_budget(wave: int, allowed: int) -> int:
    """The failures a wave may reach and still claim tenants: none in the canary."""
    return 0 if wave == CANARY_WAVE else allowed


def stop_reason(wave: int, failed: int, failed_in_wave: int, allowed: int,
                interrupted: bool = False) -> str | None:
    """Why the rollout stops after ``wave`` (None: it goes on). ``failed`` counts the
    whole rollout's failures, ``failed_in_wave`` this wave's."""
    if wave == CANARY_WAVE and failed_in_wave:
        return "canary failed"
    if budget_exceeded(failed, allowed):
        return f"failure budget exceeded ({failed} failed, {allowed} allowed)"
    if interrupted:
        return INTERRUPTED
    return None


def final_status(stopped: str | None, counts: Mapping[str, int]) -> RolloutStatus:
    """The rollout's status once this process is done with it, from why it stopped
    (if it did) and its tenants' statuses; ``running`` while another process still
    has tenants of it pending or in flight."""
    if stopped == INTERRUPTED:
        return RolloutStatus.interrupted
    if stopped:
        return RolloutStatus.stopped
    if counts.get(TenantMigration.pending) or counts.get(TenantMigration.running):
        return RolloutStatus.running
    return RolloutStatus.failed if counts.get(TenantMigration.failed) else \
        RolloutStatus.completed
