"""Log formats: plain lines for a terminal, or one JSON object a line for a pipeline.

`SAGAFLOW_LOG_FORMAT=json` turns every record into a JSON object with the time, level,
logger and message, and the ids that say whose line it is: execution, step, attempt
and the current trace and span. The ids come from `attempt_context` (the runner host
binds it around each handler, so a handler's own log lines carry them without code of
its own), from a record's `extra`, and from the current OpenTelemetry span.

Expected conditions (an idle queue, a lost lock that is retried, the database away
for a moment) are logged as one line without a traceback; a traceback is for a real
bug, logged once where it is caught.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_IDS = ("execution_id", "execution", "step", "attempt", "attempt_id")
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "sagaflow_log_context", default=None
)


@contextmanager
def attempt_context(**ids: Any) -> Iterator[None]:
    """Bind ids (execution_id, execution, step, attempt, attempt_id) to every record
    logged in this context, tasks started in it included."""
    token = _context.set({**(_context.get() or {}), **ids})
    try:
        yield
    finally:
        _context.reset(token)


class SagaflowJsonFormatter(JsonFormatter):
    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        for key, value in (_context.get() or {}).items():
            log_data.setdefault(key, value)
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            log_data["trace_id"] = format(span.trace_id, "032x")
            log_data["span_id"] = format(span.span_id, "016x")


def configure(level: str, fmt: Literal["plain", "json"]) -> None:
    """Set up the root logger once for a command."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(
            SagaflowJsonFormatter(
                "%(asctime)s %(message)s",
                rename_fields={"asctime": "time"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
            )
        )
    else:
        handler.setFormatter(logging.Formatter(PLAIN))
    # A no-op when the root logger has handlers already (a host program, a test run).
    logging.basicConfig(level=level, handlers=[handler])


__all__ = ["PLAIN", "SagaflowJsonFormatter", "attempt_context", "configure"]
