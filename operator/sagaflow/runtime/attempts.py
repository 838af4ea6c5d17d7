"""One attempt at the runner host: its heartbeats and lock renewals while it runs, and
how its outcome becomes the result event it sends.

Apart from `worker.py`, which owns delivery (receiving, isolating, settling): this
is what one attempt is, whatever delivered it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from sagaflow.core.jsonsafe import scrub_text, unstorable
from sagaflow.core.messages import (
    EVENTS_QUEUE,
    ExecuteStep,
    MalformedMessageError,
    StepResult,
    output_problem,
)
from sagaflow.core.ports import Bus, MessageLockLostError, OutgoingMessage, ReceivedMessage
from sagaflow.runtime.handlers import MAX_ERROR_MESSAGE
from sagaflow_runner import StepError

log = logging.getLogger("sagaflow.runner")

ResultKind = Literal["StepCompleted", "StepFailed", "StepHeartbeat"]


class Attempt:
    """One running attempt: its command, the delivery it settles with, heartbeats and
    lock renewals (renewals in flight are kept in `background`, which the host awaits
    at shutdown)."""

    def __init__(
        self,
        bus: Bus,
        cmd: ExecuteStep,
        message: ReceivedMessage,
        started: datetime,
        background: set[asyncio.Task[None]],
    ) -> None:
        self._background = background
        self._bus = bus
        self.cmd = cmd
        self.message = message  # replaced when the command is delivered again meanwhile
        self.started_at = started
        self._sequence = 0
        self._closed = False
        self._interval = 0.0
        self._timer: asyncio.TimerHandle | None = None

    async def heartbeat(self, details: dict[str, Any] | None = None) -> None:
        # The wire event has no field for `details`; it is accepted for the SDK's sake.
        # Heartbeats never raise into the handler: they are advisory, and a failed
        # one must not turn a healthy attempt into a failed one.
        if self._closed:
            return
        self._sequence += 1
        beat = result(self.cmd, "StepHeartbeat", sequence=self._sequence)
        try:
            await self._bus.send([event(self.cmd, beat)])
        except Exception as exc:
            log.warning("heartbeat send failed (%s): %s", exc, who(self.cmd))
        await self._renew()

    def keep_lock(self, interval: float) -> None:
        # A timer, not a task per command: most handlers finish long before it fires.
        self._interval = interval
        self._timer = asyncio.get_running_loop().call_later(interval, self._fire)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()

    def _fire(self) -> None:
        if self._closed:
            return
        task = asyncio.create_task(self._renew(rearm=True))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _renew(self, *, rearm: bool = False) -> None:
        try:
            await self._bus.renew_lock([self.message])
        except MessageLockLostError:
            log.warning("lock lost, the command may run twice: %s", who(self.cmd))
            return
        except Exception as exc:
            log.warning("lock renewal failed (%s): %s", exc, who(self.cmd))
        if rearm and not self._closed:
            self.keep_lock(self._interval)


def event(
    cmd: ExecuteStep, result: StepResult, headers: Mapping[str, str] | None = None
) -> OutgoingMessage:
    """The result as a message (with `headers`: its trace); an output that could not be
    sent or stored becomes the step's InvalidOutput failure, naming where in the output
    the problem is."""
    try:
        body = result.encode()
        problem = output_problem(result.output, body) if result.kind == "StepCompleted" else None
    except (TypeError, ValueError) as exc:
        # Only a handler's output can fail to encode.
        problem = unstorable(result.output, "output")
        problem = f"the step's output cannot be stored: {problem}" if problem else None
        problem = problem or f"output is not JSON-serialisable: {exc}"
    if problem is not None:
        result = failed(cmd, "InvalidOutput", problem, False)
        body = result.encode()
    return OutgoingMessage(
        EVENTS_QUEUE, result.message_id, result.execution_id, body, headers=headers
    )


def failed_from(cmd: ExecuteStep, exc: Exception) -> StepResult:
    if isinstance(exc, StepError):
        return failed(cmd, exc.type, str(exc), exc.retryable)
    log.debug("handler traceback: %s", who(cmd), exc_info=exc)
    return failed(cmd, type(exc).__name__, str(exc) or type(exc).__name__, True)


def failed(cmd: ExecuteStep, error_type: str, message: str, retryable: bool) -> StepResult:
    log.warning(
        "step failed: %s type=%s retryable=%s: %s", who(cmd), error_type, retryable, message
    )
    return result(
        cmd,
        "StepFailed",
        error_type=scrub_text(error_type),
        error_message=scrub_text(message[:MAX_ERROR_MESSAGE]),
        retryable=retryable,
    )


def result(cmd: ExecuteStep, kind: ResultKind, **fields: Any) -> StepResult:
    return StepResult(
        kind, cmd.execution_id, cmd.step, cmd.attempt, compensation=cmd.compensation, **fields
    )


def who(cmd: ExecuteStep) -> str:
    what = f"compensation of {cmd.step}" if cmd.compensation else cmd.step
    return (
        f"{what} of execution {cmd.execution} (id={cmd.execution_id}, "
        f"attempt {cmd.attempt}, type {cmd.type})"
    )


def parse_deadline(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedMessageError("deadline: expected an ISO-8601 string or null")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise MalformedMessageError(f"deadline: {exc}") from exc
    # A deadline without an offset is taken as UTC, the orchestrator's clock.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
