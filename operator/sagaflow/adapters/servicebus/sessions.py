"""Session queues for the Service Bus bus: whole sessions accepted, held and released.

A receive accepts the next available session, then the further ones ready now (a few
at a time), until it has enough messages. A session stays open, locked to this bus,
until every message received from it is settled; then it is closed, which releases
the lock for the next receiver (the Postgres bus behaves the same). Each accepted
session is an SDK receiver, and in this SDK a connection, of its own: sagaflow's own
queues are plain (`queues.py`, see docs/design.md); this serves session-enabled ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import NamedTuple

from sagaflow.adapters.servicebus.client import (
    Delivery,
    SessionClient,
    SessionReceiver,
    Settlement,
    gather_all,
)
from sagaflow.core.ports import Clock, MessageLockLostError, ReceivedMessage

log = logging.getLogger(__name__)


class _Held:
    """A session this bus accepted and has not released: the broker keeps it, and every
    message in it, locked to us until we close it or the lock expires."""

    __slots__ = ("lost", "queue", "released", "session", "settling", "unsettled")

    def __init__(self, queue: str, session: SessionReceiver) -> None:
        self.queue = queue
        self.session = session
        self.unsettled: dict[str, Delivery] = {}  # by lock token
        self.settling: set[str] = set()  # lock tokens with a settlement under way
        self.lost = False
        self.released = False


class SessionHandle(NamedTuple):
    """`ReceivedMessage.handle` in a session: the session holding it, and the delivery."""

    session: _Held
    delivery: Delivery


class Sessions:
    """The sessions one bus holds, across its session-enabled queues."""

    def __init__(
        self,
        client: SessionClient,
        *,
        clock: Clock,
        closing: asyncio.Event,
        min_wait: float,
        parallelism: int,
    ) -> None:
        self._client = client
        self._clock = clock
        self._closing = closing
        self._min_wait = min_wait
        self._parallelism = parallelism
        self._held: set[_Held] = set()

    async def receive(
        self, queue: str, max_messages: int, max_wait: float
    ) -> list[ReceivedMessage]:
        got: list[ReceivedMessage] = []
        mine: list[_Held] = []
        wait, width = max(max_wait, self._min_wait), 1
        try:
            while len(got) < max_messages and not self._closing.is_set():
                wanted = min(width, max_messages - len(got))
                sessions, error = await self._accept(queue, wanted, wait)
                mine.extend(sessions)
                quotas = _split(max_messages - len(got), len(sessions))
                taken = await asyncio.gather(
                    *(self._take(held, n) for held, n in zip(sessions, quotas, strict=True)),
                    return_exceptions=True,
                )
                for result in taken:
                    if isinstance(result, BaseException):
                        error = error or result
                    else:
                        got.extend(result)
                if error is not None and not got:
                    raise error
                if error is not None or len(sessions) < wanted or not any(taken):
                    break  # a fault, or no more sessions ready: keep what is locked already
                wait, width = self._min_wait, self._parallelism
        except BaseException:
            # Failed with nothing to return, or cancelled: hand every session back.
            await gather_all(self._release(held) for held in mine)
            raise
        return got

    async def _accept(
        self, queue: str, count: int, wait: float
    ) -> tuple[list[_Held], BaseException | None]:
        """Accept up to `count` sessions at once; stop waiting (and release) on close."""
        accepts = [
            asyncio.ensure_future(self._client.accept_next_session(queue, max_wait=wait))
            for _ in range(count)
        ]
        closing = asyncio.ensure_future(self._closing.wait())
        completed = False
        try:
            while not closing.done() and not all(a.done() for a in accepts):
                waiting = {closing, *(a for a in accepts if not a.done())}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            completed = True
        finally:
            closing.cancel()
            for accept in accepts:
                accept.cancel()  # a no-op for those done; the others are waiting for nothing
            await asyncio.wait(accepts)
            sessions: list[_Held] = []
            error: BaseException | None = None
            for accept in accepts:
                if accept.cancelled():
                    continue
                if (exc := accept.exception()) is not None:
                    error = error or exc
                elif (session := accept.result()) is not None:
                    sessions.append(self._register(queue, session))
            if not completed or self._closing.is_set():
                await gather_all(self._release(held) for held in sessions)
                sessions, error = [], None
        return sessions, error

    def _register(self, queue: str, session: SessionReceiver) -> _Held:
        held = _Held(queue, session)
        self._held.add(held)
        return held

    async def _take(self, held: _Held, quota: int) -> list[ReceivedMessage]:
        try:
            deliveries = await held.session.receive(quota, self._min_wait)
        except MessageLockLostError:
            deliveries = []  # lost before anything came: as good as empty
        except BaseException:
            await self._release(held)
            raise
        if not deliveries or self._closing.is_set():
            await self._release(held)
            return []
        for d in deliveries:
            held.unsettled[d.lock_token] = d
        return [_received(held, d) for d in deliveries]

    # -- settling -----------------------------------------------------------------

    def _claim(self, handle: SessionHandle) -> tuple[_Held, Delivery] | None:
        """The session and delivery of a message this bus can still settle, else None.
        A session whose lock time has passed is marked lost (released by the caller)."""
        held, delivery = handle
        token = delivery.lock_token
        if held not in self._held or held.lost:
            return None
        if token not in held.unsettled or token in held.settling:
            return None
        if held.session.locked_until <= self._clock():
            held.lost = True
            return None
        return held, delivery

    async def settle(self, handles: Sequence[SessionHandle], action: Settlement) -> int:
        """Settle what is still held (sessions at once, each in order); how many were
        lost. A fault other than a lost lock is raised: those messages stay held."""
        groups: dict[_Held, list[Delivery]] = {}
        lost = 0
        for handle in handles:
            claim = self._claim(handle)
            if claim is None:
                lost += 1
                continue
            held, delivery = claim
            held.settling.add(delivery.lock_token)  # a repeat in `handles` is now "lost"
            groups.setdefault(held, []).append(delivery)
        await self._release_lost()
        results = await asyncio.gather(
            *(self._settle_in(held, ds, action) for held, ds in groups.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
            lost += result
        return lost

    async def _settle_in(self, held: _Held, deliveries: list[Delivery], action: Settlement) -> int:
        """Settle one session's deliveries; return how many were lost."""
        try:
            for done, delivery in enumerate(deliveries):
                try:
                    await action(held.session, delivery)
                except MessageLockLostError:
                    held.lost = True  # a session lock covers all of its messages
                    return len(deliveries) - done
                del held.unsettled[delivery.lock_token]
            return 0
        finally:
            held.settling.difference_update(d.lock_token for d in deliveries)
            if held.lost or not held.unsettled:
                await self._release(held)

    def claimable(self, handle: SessionHandle) -> bool:
        """Whether a settlement of this message could go ahead now."""
        return self._claim(handle) is not None

    async def renew(self, handles: Sequence[SessionHandle]) -> int:
        """Renew the messages' sessions (a session lock covers all its messages); how
        many sessions were already lost."""
        sessions = {handle.session: None for handle in handles}
        now = self._clock()
        for held in sessions:
            held.lost = held.lost or held.session.locked_until <= now
        live = [held for held in sessions if held in self._held and not held.lost]
        renewed = await gather_all(self._renew(held) for held in live)
        await self._release_lost()
        return len(sessions) - sum(renewed)

    async def _renew(self, held: _Held) -> bool:
        try:
            await held.session.renew_lock()
        except MessageLockLostError:
            held.lost = True
            return False
        return True

    # -- releasing ----------------------------------------------------------------

    async def _release(self, held: _Held) -> None:
        """Close the session: the broker frees its lock, and its unsettled messages."""
        if held.released:
            return
        held.released = True
        self._held.discard(held)
        try:
            await held.session.close()
        except Exception as exc:  # the broker frees it on lock expiry anyway
            log.warning(
                "releasing session %r of %s failed: %s", held.session.session_id, held.queue, exc
            )

    async def _release_lost(self) -> None:
        lost = [held for held in self._held if held.lost and not held.settling]
        await gather_all(self._release(held) for held in lost)

    async def close(self) -> None:
        """Release every held session without settling anything."""
        await gather_all(self._release(held) for held in list(self._held))


def _received(held: _Held, delivery: Delivery) -> ReceivedMessage:
    return ReceivedMessage(
        queue=held.queue,
        message_id=delivery.message_id,
        session_id=delivery.session_id,
        body=delivery.body,
        delivery_count=delivery.delivery_count,
        enqueued_at=delivery.enqueued_at,
        locked_until=held.session.locked_until,
        lock_token=delivery.lock_token,
        handle=SessionHandle(held, delivery),
        headers=delivery.headers,
    )


def _split(total: int, parts: int) -> list[int]:
    """`total` in `parts` near-equal shares: each session's receive quota."""
    return [total // parts + (i < total % parts) for i in range(parts)]
