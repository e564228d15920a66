"""The scheduler's log: JSON lines on stdout (APScheduler's own warnings too)."""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any, TextIO

from orchestrator.adapters.clock import utcnow


class JsonLog:
    """One JSON object per line: ts, level, event, then the fields. Thread-safe."""

    def __init__(self, stream: TextIO | None = None, **context: Any) -> None:
        self.stream = stream
        self.context = context
        self._lock = threading.Lock()

    def emit(self, level: str, event: str, **fields: Any) -> None:
        record = {"ts": utcnow().isoformat(timespec="milliseconds"),
                  "level": level, "event": event, **self.context, **fields}
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        stream = self.stream or sys.stdout
        with self._lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not kill a job thread

    def info(self, event: str, **fields: Any) -> None:
        self.emit("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit("error", event, **fields)


class _LoggingToJson(logging.Handler):
    """APScheduler's own warnings (a run skipped, a misfire) as JSON lines too."""

    def __init__(self, log: JsonLog) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.emit(record.levelname.lower(), "apscheduler", message=record.getMessage())


def route_apscheduler_logs(log: JsonLog) -> None:
    logger = logging.getLogger("apscheduler")
    logger.handlers[:] = [_LoggingToJson(log)]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
