"""Logging for every command: `--log-level` and `--log-format` (or
$TENANTCTL_LOG_LEVEL / $TENANTCTL_LOG_FORMAT) choose what reaches stderr and how,
in the scheduler's line format (orchestrator/daemon/jsonlog.py). Commands log at
warning and text by default, so nothing changes for a person at a terminal; a
cron job asks for `info` and `json` and logs like the daemon: each step of its
work, then one `command` line with the exit code and duration.

Start-up: nothing is imported until a line is actually written (a read command's
budget is 300 ms), and a line below the level is dropped before that.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.daemon.jsonlog import JsonLog

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}  # as jsonlog.LEVELS
FORMATS = ("text", "json")
LEVEL_ENV, FORMAT_ENV = "TENANTCTL_LOG_LEVEL", "TENANTCTL_LOG_FORMAT"
# what a command logs unless told otherwise; the scheduler: info, json
DEFAULT_LEVEL, DEFAULT_FORMAT = "warning", "text"



class _Options:
    level: str | None = None  # --log-level, else $TENANTCTL_LOG_LEVEL; None: the default
    fmt: str | None = None
    configured = False  # the root callback ran: this invocation logs
    error: str | None = None  # the command's one-line error, for its `command` line


_log: JsonLog | None = None


def configure(level: str | None, fmt: str | None) -> None:
    """Check and keep the global options (the root callback calls this)."""
    from orchestrator.domain.errors import InvalidInput

    global _log
    _log = None
    _Options.level = _Options.fmt = _Options.error = None  # nothing of an earlier call
    _Options.configured = False
    if level is not None and level.lower() not in LEVELS:
        raise InvalidInput(f"--log-level: unknown level {level!r} "
                           f"(use {', '.join(LEVELS)}; or ${LEVEL_ENV})")
    if fmt is not None and fmt.lower() not in FORMATS:
        raise InvalidInput(f"--log-format: unknown format {fmt!r} "
                           f"(use {' or '.join(FORMATS)}; or ${FORMAT_ENV})")
    _Options.level = level.lower() if level else None
    _Options.fmt = fmt.lower() if fmt else None
    _Options.configured = True


def level_or(default: str) -> str:
    return _Options.level or default


def format_or(default: str) -> str:
    return _Options.fmt or default


def log(level: str, event: str, *, force: bool = False, **fields: Any) -> None:
    """One line on stderr if `level` passes --log-level (or `force`)."""
    global _log
    if LEVELS[level] < LEVELS[level_or(DEFAULT_LEVEL)] and not force:
        return
    if _log is None:
        from orchestrator.daemon.jsonlog import JsonLog

        # the level is checked above (`force` passes it)
        _log = JsonLog(level="debug", fmt=format_or(DEFAULT_FORMAT), stderr=True)
    _log.emit(level, event, **fields)


# -- what the cron commands log ---------------------------------------------------------


def retention_step(r: Any) -> None:
    """A retention run's step (as the scheduler's `retention_step` line)."""
    log("warning" if r.outcome == "failed" else "info", "retention_step", **r.to_json())


def backup_result(r: Any) -> None:
    """One tenant's backup of `backup run` (as the scheduler's backup lines)."""
    ok = r.status in ("completed", "skipped")
    log("info" if ok else "warning", "backup", tenant=r.tenant, status=str(r.status),
        id=r.id, size=r.size, error=r.error)


def rollout_event(e: Any) -> None:
    """A rollout's progress: its plan, templates, waves, each tenant, a stop."""
    r = e.result
    if e.kind == "tenant" and r is not None:
        log("warning" if r.status == "failed" else "info", "rollout_tenant", tenant=r.slug,
            status=str(r.status), from_revision=r.from_revision, to_revision=r.to_revision,
            duration_ms=r.duration_ms, attempts=r.attempts, error=r.error)
    elif e.kind == "wave":
        log("info", "rollout_wave", wave=e.wave, size=e.size)
    else:
        log("warning" if e.kind == "stop" else "info", f"rollout_{e.kind}",
            message=e.message)


# -- one line per command ----------------------------------------------------------------


def command_path(app: Any, argv: list[str]) -> str:
    """`retention run` from `--config x retention run --dry-run`: the groups and the
    command named on the line (never their arguments: a log line carries no input)."""
    words: list[str] = []
    group, args = app, iter(argv)
    for tok in args:
        if tok.startswith("-"):
            if not words and "=" not in tok and tok in ("--config", "-C", "--actor",
                                                        "--log-level", "--log-format"):
                next(args, None)  # the root option's value
            continue
        groups = {g.name: g.typer_instance for g in group.registered_groups}
        commands = {c.name or c.callback.__name__.replace("_", "-")
                    for c in group.registered_commands if c.callback is not None}
        if tok in groups:
            words.append(tok)
            group = groups[tok]
            continue
        if tok in commands:
            words.append(tok)
        break
    return " ".join(words)


def failed(message: str) -> bool:
    """The command ends with this one-line error. True when the `command` line will
    carry it instead of a plain `error:` line (JSON logs: every stderr line parses)."""
    _Options.error = message
    return _Options.configured and _Options.fmt == "json"


def logged_command(app: Callable[[], Any]) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Wrap `main`: after the command, when --log-level or --log-format was given, one
    `command` line (info when it exits 0, else error) with its path, exit code,
    duration and one-line error."""
    def wrap(main: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(main)
        def run() -> None:
            started = time.monotonic()
            code = 1  # anything but an exit: a bug with its traceback
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
                raise
            finally:
                # asked for (either option): without, a failure stays its one `error:` line
                if _Options.configured and (_Options.level or _Options.fmt):
                    error = _Options.error if code else None
                    log("info" if code == 0 else "error", "command",
                        command=command_path(app(), sys.argv[1:]), exit_code=code,
                        duration_ms=int((time.monotonic() - started) * 1000), error=error,
                        # in place of the `error:` line: shown whatever the level
                        force=error is not None and _Options.fmt == "json")
        return run
    return wrap
