"""Fault injection for crash tests: ``TENANTCTL_FAULT=<step>`` makes the process
die at that named step — SIGKILL by default (a real crash: no cleanup, no
finally blocks), or an exception with ``TENANTCTL_FAULT_MODE=raise``.
``<step>:N`` fires on the N-th time the step is reached (e.g. mid-rollout)."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

from orchestrator.domain.errors import ExitCode, TenantctlError

FAULT_ENV = "TENANTCTL_FAULT"
MODE_ENV = "TENANTCTL_FAULT_MODE"

_hits: Counter[str] = Counter()
_lock = threading.Lock()


class InjectedFault(TenantctlError):
    exit_code = ExitCode.INJECTED_FAULT


def checkpoint(step: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != step:
        return
    with _lock:
        _hits[step] += 1
        if _hits[step] != (int(nth) if nth else 1):
            return
    if os.environ.get(MODE_ENV, "kill") == "raise":
        raise InjectedFault(f"injected fault at {step}")
    os.kill(os.getpid(), signal.SIGKILL)
