"""Batching and settlement for the runner host: shared handler slots, and the settler
that sends a batch of results and completes their commands in one `Bus.reply`.

Apart from `worker.py` because it is plumbing: how messages are settled, not what a
step attempt does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sagaflow.core.ports import Bus, MessageLockLostError, OutgoingMessage, ReceivedMessage
from sagaflow.runtime.outages import OutageWatch

log = logging.getLogger("sagaflow.runner")

T = TypeVar("T")


_Item = tuple[OutgoingMessage | None, ReceivedMessage, "asyncio.Future[None]"]


class Settler:
    """Settles finished attempts in batches: one `reply` sends the results and completes
    the commands."""

    def __init__(
        self,
        bus: Bus,
        interval: float,
        max_batch: int,
        busy: Callable[[], bool],
        outages: OutageWatch | None = None,
    ) -> None:
        self._bus = bus
        self._outages = outages
        self._busy = busy
        self._interval = interval
        self._max = max_batch
        self._pending: list[_Item] = []
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()

    async def settle(self, result: OutgoingMessage | None, message: ReceivedMessage) -> None:
        """Send `result` (if any) and complete `message`; returns once done."""
        done = asyncio.get_running_loop().create_future()
        self._pending.append((result, message, done))
        self._arrived.set()
        if len(self._pending) >= self._max:
            self._full.set()
        await done

    async def run(self) -> None:
        carried_over = False
        while True:
            await self._arrived.wait()
            if not carried_over and len(self._pending) < self._max and self._busy():
                # Linger briefly while handlers run, so attempts finishing together share
                # a round trip; items that queued during the last flush waited enough.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._interval)
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            if len(self._pending) < self._max:
                self._full.clear()
            if not self._pending:
                self._arrived.clear()
            await self._flush(batch)
            carried_over = bool(self._pending)

    async def _flush(self, batch: list[_Item]) -> None:
        try:
            items = [(result, message) for result, message, _ in batch]
            await reply(self._bus, items, self._outages)
        finally:
            for _, _, done in batch:
                if not done.done():
                    done.set_result(None)


class Slots:
    """Free handler slots, shared by every receive loop of a worker."""

    def __init__(self, free: int) -> None:
        self.free = free
        self._freed = asyncio.Event()

    async def take(self, most: int) -> int:
        """Wait for at least one free slot, then take up to `most`."""
        while self.free <= 0:
            self._freed.clear()
            await self._freed.wait()
        taken = min(self.free, most)
        self.free -= taken
        return taken

    def give(self, count: int) -> None:
        self.free += count
        if count:
            self._freed.set()


async def until(stopped: asyncio.Future[Any], awaitable: Awaitable[T]) -> T | None:
    """Await `awaitable` unless `stopped` finishes first (then cancel it, return None)."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        return None
    return task.result()


async def reply(
    bus: Bus,
    items: Sequence[tuple[OutgoingMessage | None, ReceivedMessage]],
    outages: OutageWatch | None = None,
) -> None:
    """Send the results and complete the commands of a batch in one `reply`.

    Through an outage of the database the results are kept and the reply is tried
    again when it is back: after a quick restart the locks still hold and nothing
    runs twice; after a long one they are lost and the commands run again elsewhere.
    """
    results = [result for result, _ in items if result is not None]
    commands = [message for _, message in items]
    while True:
        try:
            await bus.reply(commands, results)
        except MessageLockLostError:
            if len(items) == 1:
                log.info("lock lost before completing %s; dropped", commands[0].message_id)
            else:  # one lost lock in the batch: settle one by one so the others still do
                for item in items:
                    await reply(bus, [item], outages)
        except Exception as exc:
            if outages is not None and await outages.retry(exc):
                continue
            log.exception("settling %d commands failed; abandoning them for a rerun", len(items))
            await abandon(bus, commands)
        return


async def abandon(bus: Bus, messages: Sequence[ReceivedMessage]) -> None:
    if not messages:
        return
    try:
        await bus.abandon(messages)
    except Exception as exc:
        # Their locks expire instead; redelivery just comes later.
        log.warning("abandoning %d commands failed: %s", len(messages), exc)
