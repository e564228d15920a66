"""Fault injection for crash tests: ``TENANTCTL_FAULT=<step>`` makes the process
die at that named step — SIGKILL by default (a real crash: no cleanup, no
finally blocks), or an exception with ``TENANTCTL_FAULT_MODE=raise``."""

from __future__ import annotations

import os
import signal

from orchestrator.errors import TenantctlError

FAULT_ENV = "TENANTCTL_FAULT"
MODE_ENV = "TENANTCTL_FAULT_MODE"


class InjectedFault(TenantctlError):
    exit_code = 99


def checkpoint(step: str) -> None:
    if os.environ.get(FAULT_ENV) != step:
        return
    if os.environ.get(MODE_ENV, "kill") == "raise":
        raise InjectedFault(f"injected fault at {step}")
    os.kill(os.getpid(), signal.SIGKILL)
