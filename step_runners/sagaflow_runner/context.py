"""What a running step knows about its attempt, and how it reports liveness.

The host (the runner worker) builds one `StepContext` per attempt and injects the
heartbeat callback, so this module needs no bus and step authors can build a
context by hand in their own tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

HeartbeatCallback = Callable[[dict[str, Any] | None], Awaitable[None]]


async def _no_heartbeat(details: dict[str, Any] | None) -> None:
    # Outside a host (a unit test of a handler) heartbeats have nowhere to go.
    return None


def attempt_key(execution_id: str, step: str, attempt: int, compensation: bool = False) -> str:
    """The attempt id, `<execution_id>/<step>/<attempt>`, or for the compensation of a
    step `<execution_id>/<step>/compensate/<attempt>`.

    Mirrors the orchestrator's wire contract (message ids derive from it); the SDK
    may not import the orchestrator, so the format is restated here.
    """
    if compensation:
        return f"{execution_id}/{step}/compensate/{attempt}"
    return f"{execution_id}/{step}/{attempt}"


class StepContext:
    """One attempt of one step of one execution.

    `idempotency_key` is the same every time this attempt is delivered, and differs
    between attempts: pass it to downstream services so a redelivered command does
    not, say, charge a card twice.

    `compensates` names the step this attempt undoes when the handler runs as a
    step's compensation (then `step` is that step too, `attempt` counts the undo's
    attempts, and the key is the undo's own); it is None on the forward path.
    """

    __slots__ = (
        "_heartbeat",
        "_loop",
        "attempt",
        "compensates",
        "deadline",
        "execution",
        "execution_id",
        "idempotency_key",
        "step",
    )

    def __init__(
        self,
        *,
        execution: str,
        execution_id: str,
        step: str,
        attempt: int,
        deadline: datetime | None = None,
        heartbeat: HeartbeatCallback | None = None,
        idempotency_key: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        compensates: str | None = None,
    ) -> None:
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, got {attempt}")
        self.execution = execution
        self.execution_id = execution_id
        self.step = step
        self.attempt = attempt
        self.deadline = deadline
        self.compensates = compensates
        self.idempotency_key = idempotency_key or attempt_key(
            execution_id, step, attempt, compensates is not None
        )
        self._heartbeat = heartbeat or _no_heartbeat
        self._loop = loop  # the host's event loop, for heartbeats from a handler's thread

    async def heartbeat(self, details: dict[str, Any] | None = None) -> None:
        """Tell the orchestrator this attempt is alive (resets its heartbeat timeout)
        and keep the command's lock, so a long step is not redelivered meanwhile."""
        await self._heartbeat(details)

    def heartbeat_sync(self, details: dict[str, Any] | None = None, timeout: float = 30) -> None:
        """`heartbeat` for a plain `def` handler, which runs in a thread: waits (at most
        `timeout` seconds) until the host has sent it."""
        loop = self._loop
        if loop is None:
            return  # outside a host: nowhere to send it, as with `heartbeat`
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError(
                "heartbeat_sync() is for plain `def` handlers: in an async "
                "handler use `await ctx.heartbeat()`"
            )

        async def send() -> None:
            await self._heartbeat(details)

        asyncio.run_coroutine_threadsafe(send(), loop).result(timeout)

    def __repr__(self) -> str:
        return (
            f"StepContext(execution={self.execution!r}, step={self.step!r}, "
            f"attempt={self.attempt}, idempotency_key={self.idempotency_key!r})"
        )
