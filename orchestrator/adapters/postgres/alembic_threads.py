"""Let Alembic migrate many databases at once, on threads of one process.

Alembic publishes "the current" EnvironmentContext and Operations as module
globals of ``alembic.context`` and ``alembic.op`` (that is how ``env.py`` and
revision files reach them). Those are process-wide: two threads running
migrations overwrite each other's context, and the second to finish crashes
removing a proxy that is already gone. We make "current" per thread: the
install/remove hooks record the object in a thread-local stack, and
``alembic.context`` / ``alembic.op`` become objects that forward every
attribute to the calling thread's current one. Env files and revision files
keep working unchanged (``from alembic import context, op``).

``install()`` must run before any revision file is imported, which is why
tenant_migrations calls it at import time.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any

_local = threading.local()
_installed = False
_install_lock = threading.Lock()


def _stack(kind: str) -> list[Any]:
    stack = getattr(_local, kind, None)
    if stack is None:
        stack = []
        setattr(_local, kind, stack)
    return stack


class _ThreadCurrent(types.ModuleType):
    """Stands in for the module ``alembic.<kind>``."""

    def __init__(self, name: str, kind: str, original: types.ModuleType) -> None:
        super().__init__(name, original.__doc__)
        self._kind = kind
        self._original = original

    def __getattr__(self, attr: str) -> Any:
        stack = _stack(self._kind)
        if stack:
            return getattr(stack[-1], attr)
        if attr.startswith("__"):
            return getattr(self._original, attr)
        raise AttributeError(f"alembic.{self._kind}.{attr}: no Alembic {self._kind} is "
                             "active in this thread (call it from inside a migration)")


def install() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        # start-up: Alembic (~0.5 s) only once something migrates (catalog/db imports us)
        import alembic
        from alembic.operations.base import Operations
        from alembic.runtime.environment import EnvironmentContext

        for cls, kind in ((EnvironmentContext, "context"), (Operations, "op")):
            def push(self: Any, _kind: str = kind) -> None:
                _stack(_kind).append(self)

            def pop(self: Any, _kind: str = kind) -> None:
                stack = _stack(_kind)
                if self in stack:
                    # Alembic's Operations.context has no try/finally: after a failed
                    # migration its Operations is never popped. Leaving an environment
                    # drops whatever it left above it (and the op stack with it).
                    del stack[stack.index(self):]
                if _kind == "context" and not stack:
                    _stack("op").clear()

            type.__setattr__(cls, "_install_proxy", push)
            type.__setattr__(cls, "_remove_proxy", pop)
            name = f"alembic.{kind}"
            proxy = _ThreadCurrent(name, kind, sys.modules[name])
            setattr(alembic, kind, proxy)
            sys.modules[name] = proxy
        _installed = True
