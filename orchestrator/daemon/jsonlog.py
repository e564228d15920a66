"""The one log-line format of tenantctl: the scheduler's lines (stdout) and every
command's (stderr, `--log-level`/`--log-format`, cli/logs.py). A line is an
event with fields: JSON (`{"ts", "level", "event", ...fields}`, one object a
line) or text (`ts level event key=value ...`). Values that look like secrets
(a field named like a password, a DSN's password) are masked on the way out."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import datetime
from typing import Any, TextIO

from orchestrator.adapters.clock import utcnow

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
FORMATS = ("text", "json")
MASK = "***"
_SECRET_KEY = re.compile(r"(^|_)(password|passwd|pass|secret|token)($|_)", re.IGNORECASE)
_DSN_PASSWORD = re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@")  # scheme://user:PASSWORD@


def _clean(key: str, value: Any) -> Any:
    if isinstance(value, str):
        return MASK if _SECRET_KEY.search(key) and value else \
            _DSN_PASSWORD.sub(rf"\g<1>{MASK}@", value)
    if isinstance(value, dict):
        return {k: _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(key, v) for v in value]
    return value


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\n\t'):
        return value
    return json.dumps(value, default=str, separators=(",", ":"))


def format_line(fmt: str, ts: datetime, level: str, event: str, fields: dict[str, Any]
                ) -> str:
    fields = {k: _clean(k, v) for k, v in fields.items()}
    stamp = ts.isoformat(timespec="milliseconds")
    if fmt == "json":
        return json.dumps({"ts": stamp, "level": level, "event": event, **fields},
                          default=str, separators=(",", ":")) + "\n"
    pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items() if v is not None)
    return f"{stamp} {level:7} {event}{' ' if pairs else ''}{pairs}\n"


class JsonLog:
    """Log lines on a stream (default: stdout, looked up at each line), at `level`
    and above, in `fmt` (json or text), each with the `context` fields. Thread-safe.
    (The name is the scheduler's, from when its lines were only JSON.)"""

    def __init__(self, stream: TextIO | None = None, *, level: str = "info",
                 fmt: str = "json", stderr: bool = False, **context: Any) -> None:
        self.stream = stream
        self.stderr = stderr
        self.threshold = LEVELS[level]
        self.fmt = fmt
        self.context = context
        self._lock = threading.Lock()

    def enabled(self, level: str) -> bool:
        return LEVELS.get(level, 40) >= self.threshold

    def emit(self, level: str, event: str, **fields: Any) -> None:
        if not self.enabled(level):
            return
        line = format_line(self.fmt, utcnow(), level, event, {**self.context, **fields})
        stream = self.stream or (sys.stderr if self.stderr else sys.stdout)
        with self._lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not kill a job thread

    def debug(self, event: str, **fields: Any) -> None:
        self.emit("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.emit("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit("error", event, **fields)


class _LoggingToJson(logging.Handler):
    """APScheduler's own warnings (a run skipped, a misfire) as our lines too."""

    def __init__(self, log: JsonLog) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        self.log.emit(level if level in LEVELS else "error", "apscheduler",
                      message=record.getMessage())


def route_apscheduler_logs(log: JsonLog) -> None:
    logger = logging.getLogger("apscheduler")
    logger.handlers[:] = [_LoggingToJson(log)]
    logger.setLevel(logging.WARNING)
    logger.propagate = False

