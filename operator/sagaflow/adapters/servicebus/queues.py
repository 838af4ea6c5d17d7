"""Plain queues for the Service Bus bus: one kept link per queue, a lock per message.

A receive waits on the queue's link for the first message, then gathers what else is
ready, in growing asks each bounded by `gather_wait` (a short pause: the SDK's own
batch receive waits a further 0.2 s after the first message, which would cost every
hop of a run that much).
Every message has its own lock: settled, renewed and lost on its own. Receives on one
queue take turns on its link; settlements and renewals do not wait for them.

Dead-letter subqueues are read the same way, through a kept link each.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from datetime import datetime
from typing import NamedTuple, TypeVar

from sagaflow.adapters.servicebus.client import (
    UNKNOWN_LOCK_EXPIRY,
    Delivery,
    QueueLink,
    SessionClient,
    Settlement,
    gather_all,
)
from sagaflow.core.ports import Clock, MessageLockLostError, ReceivedMessage, dead_letter_queue

T = TypeVar("T")


class QueueHandle(NamedTuple):
    """`ReceivedMessage.handle` on a plain queue: the link it came on, and the delivery."""

    link: QueueLink
    delivery: Delivery


class Queues:
    """The messages one bus holds on plain queues, and the receives it has waiting."""

    def __init__(
        self,
        client: SessionClient,
        *,
        clock: Clock,
        closing: asyncio.Event,
        gather_wait: float,
        dead_letter_wait: float,
        settle_parallelism: int,
    ) -> None:
        self._client = client
        self._clock = clock
        self._closing = closing
        self._gather_wait = gather_wait
        self._dead_letter_wait = dead_letter_wait
        self._held: dict[str, datetime] = {}  # lock token -> its expiry as last known
        self._settling: set[str] = set()
        self._turns: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._settling_slots = asyncio.Semaphore(settle_parallelism)
        self._last: defaultdict[str, int] = defaultdict(int)  # messages the last receive took

    async def receive(
        self, queue: str, max_messages: int, max_wait: float
    ) -> list[ReceivedMessage]:
        link = await self._client.open_queue(queue)
        async with self._turns[queue]:
            got = await self._unless_closed(link.receive(1, max_wait))
            # Then ask for twice what came so far, while each ask is met in full. A
            # receive the broker cannot fill leaves its credit open, and the broker
            # pushes later messages to it while nobody reads this link (the SDK gives
            # them back on its keep-alive, every 5 s): asking in steps bounds that to
            # what this receive took. Under load, the last receive's size is where the
            # asking starts: it was taken then, so leaving that much credit is as bounded.
            ask = max(1, self._last[queue] // 2)
            while got and len(got) < max_messages and not self._closing.is_set():
                ask = min(ask * 2, max_messages - len(got))
                more = await link.receive(ask, self._gather_wait)
                got += more
                if len(more) < ask:
                    break
            self._last[queue] = len(got)
        return self._hold(queue, link, got)

    async def receive_dead_letters(
        self, queue: str, max_messages: int
    ) -> list[tuple[Delivery, ReceivedMessage]]:
        link = await self._client.open_queue(queue, dead_letters=True)
        async with self._turns[link.queue]:
            got = await link.receive(max_messages, self._dead_letter_wait)
        held = self._hold(dead_letter_queue(queue), link, got)
        return list(zip(got, held, strict=True))

    async def _unless_closed(self, receive: Awaitable[list[Delivery]]) -> list[Delivery]:
        """The receive's messages, or none if the bus closes first."""
        task = asyncio.ensure_future(receive)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        # Received just as the bus closed: unsettled, they come back when their locks end.
        return [] if task.cancelled() or self._closing.is_set() else task.result()

    def _hold(
        self, queue: str, link: QueueLink, deliveries: Sequence[Delivery]
    ) -> list[ReceivedMessage]:
        received = []
        for d in deliveries:
            until = d.locked_until or UNKNOWN_LOCK_EXPIRY
            self._held[d.lock_token] = until
            received.append(
                ReceivedMessage(
                    queue=queue,
                    message_id=d.message_id,
                    session_id=d.session_id,
                    body=d.body,
                    delivery_count=d.delivery_count,
                    enqueued_at=d.enqueued_at,
                    locked_until=until,
                    lock_token=d.lock_token,
                    handle=QueueHandle(link, d),
                    headers=d.headers,
                )
            )
        return received

    def claimable(self, handle: QueueHandle) -> bool:
        """Whether this bus can still settle the message (and it is not being settled)."""
        token = handle.delivery.lock_token
        until = self._held.get(token)
        if until is None or token in self._settling:
            return False
        if until <= self._clock():
            del self._held[token]  # expired: the broker has handed it out again, or will
            return False
        return True

    async def settle(self, handles: Sequence[QueueHandle], action: Settlement) -> int:
        """Settle every message still held (`settle_parallelism` at a time); how many
        were lost. A fault other than a lost lock is raised: those messages stay held."""
        mine = []
        for handle in handles:
            if self.claimable(handle):
                self._settling.add(handle.delivery.lock_token)  # a repeat is now "lost"
                mine.append(handle)
        results = await asyncio.gather(
            *(self._settle_one(handle, action) for handle in mine), return_exceptions=True
        )
        lost = len(handles) - len(mine)
        for result in results:
            if isinstance(result, BaseException):
                raise result
            lost += not result
        return lost

    async def _settle_one(self, handle: QueueHandle, action: Settlement) -> bool:
        token = handle.delivery.lock_token
        try:
            async with self._settling_slots:
                await action(handle.link, handle.delivery)
        except MessageLockLostError:
            return False
        else:
            return True
        finally:
            self._settling.discard(token)
            self._held.pop(token, None)

    async def renew(self, handles: Sequence[QueueHandle]) -> int:
        """Renew each message's lock; how many were already lost."""
        unique = {h.delivery.lock_token: h for h in handles}
        live = [handle for handle in unique.values() if self.claimable(handle)]
        renewed = await gather_all(self._renew(handle) for handle in live)
        return len(unique) - sum(renewed)

    async def _renew(self, handle: QueueHandle) -> bool:
        token = handle.delivery.lock_token
        try:
            until = await handle.link.renew_lock(handle.delivery)
        except MessageLockLostError:
            self._held.pop(token, None)
            return False
        if token in self._held:
            self._held[token] = until
        return True

    def close(self) -> None:
        """Forget every held message without settling it: it comes back after its lock."""
        self._held.clear()
