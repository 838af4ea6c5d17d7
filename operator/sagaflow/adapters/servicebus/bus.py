"""The production message bus: the `Bus` port over Azure Service Bus session queues.

It owns the mapping between the port and Service Bus (an `OutgoingMessage` becomes a
message with its id, session id, JSON body and scheduled enqueue time; a received one a
`ReceivedMessage` whose lock is its session's lock) and the session bookkeeping that
makes the broker behave like the Postgres bus: a receive accepts whole sessions, and a
session stays open, locked to this bus, until every message received from it is
settled; then it is closed, which releases the lock for the next receiver. It talks to
the broker only through the narrow `SessionClient` (`client.py`), so it is tested
without a network.

What it cannot do that the Postgres bus does: join a database transaction (so commands
go through the orchestrator's outbox), settle several messages all-or-nothing (each
settlement is its own broker operation), or send and complete atomically (`reply`
sends first; a crash in between redelivers the command, and the repeated result is
dropped by its message id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple, TypedDict, TypeVar, Unpack, cast

from sagaflow.adapters.servicebus.client import (
    AzureSessionClient,
    Delivery,
    MessageTooLargeError,
    RetryPolicy,
    SessionClient,
    SessionReceiver,
    WireMessage,
)
from sagaflow.core.messages import COMMANDS_QUEUE_PREFIX, EVENTS_QUEUE
from sagaflow.core.ports import (
    Clock,
    DeadLetter,
    MessageLockLostError,
    OutgoingMessage,
    ReceivedDeadLetter,
    ReceivedMessage,
    dead_letter_queue,
    utc_now,
)

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

log = logging.getLogger(__name__)

T = TypeVar("T")

# Service Bus standard tier's message size limit (premium allows more).
STANDARD_TIER_MAX_BYTES = 256 * 1024
CONTENT_TYPE = "application/json"


class BusOptions(TypedDict, total=False):
    clock: Clock
    max_body_bytes: int
    min_wait: float
    accept_parallelism: int


def topology_queues(step_prefixes: Iterable[str]) -> list[str]:
    """The queues sagaflow uses: the events queue and one per step-type prefix."""
    return [EVENTS_QUEUE, *(COMMANDS_QUEUE_PREFIX + p for p in sorted(set(step_prefixes)))]


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


class _Handle(NamedTuple):
    """`ReceivedMessage.handle`: the session holding the message, and the delivery."""

    session: _Held
    delivery: Delivery


class ServiceBusBus:
    """A `Bus` over Service Bus session queues (see `docs/servicebus.md`).

    `max_body_bytes`: larger bodies are refused before sending (the claim-check layer
    keeps bodies far smaller). `min_wait`: how long a receive asks the broker for further
    sessions once it has one, and its shortest wait for the first (the SDK refuses 0).
    `accept_parallelism`: how many further sessions a receive asks for at once."""

    def __init__(
        self,
        client: SessionClient,
        *,
        clock: Clock = utc_now,
        max_body_bytes: int = STANDARD_TIER_MAX_BYTES,
        min_wait: float = 0.2,
        accept_parallelism: int = 8,
    ) -> None:
        if max_body_bytes < 1 or min_wait <= 0 or accept_parallelism < 1:
            raise ValueError("max_body_bytes, min_wait and accept_parallelism must be > 0")
        self._client = client
        self._clock = clock
        self._max_body_bytes = max_body_bytes
        self._min_wait = min_wait
        self._parallelism = accept_parallelism
        self._held: set[_Held] = set()
        self._closing = asyncio.Event()

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str,
        *,
        retry: RetryPolicy | None = None,
        **options: Unpack[BusOptions],
    ) -> ServiceBusBus:
        return cls(
            AzureSessionClient.from_connection_string(connection_string, retry=retry), **options
        )

    @classmethod
    def from_namespace(
        cls,
        namespace: str,
        *,
        credential: AsyncTokenCredential | None = None,
        retry: RetryPolicy | None = None,
        **options: Unpack[BusOptions],
    ) -> ServiceBusBus:
        """azure-identity auth on NAME.servicebus.windows.net (see AzureSessionClient)."""
        client = AzureSessionClient.from_namespace(namespace, credential=credential, retry=retry)
        return cls(client, **options)

    @property
    def _closed(self) -> bool:
        return self._closing.is_set()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the Service Bus bus is closed")

    # -- sending ------------------------------------------------------------------

    async def send(self, messages: Sequence[OutgoingMessage]) -> None:
        """Send per queue, in order within each queue. Every body is checked first, so an
        oversized one fails the call before anything is sent."""
        self._check_open()
        by_queue: dict[str, list[WireMessage]] = {}
        for m in messages:
            if len(m.body) > self._max_body_bytes:
                raise MessageTooLargeError(
                    f"message {m.message_id!r} for {m.queue!r} has a {len(m.body)}-byte body, "
                    f"over the {self._max_body_bytes}-byte limit; large payloads must travel "
                    "by claim check"
                )
            wire = WireMessage(m.message_id, m.session_id, m.body, CONTENT_TYPE, m.scheduled_at)
            by_queue.setdefault(m.queue, []).append(wire)
        await _all(self._client.send(queue, batch) for queue, batch in by_queue.items())

    # -- receiving ----------------------------------------------------------------

    async def receive(
        self, queue: str, *, max_messages: int = 100, max_wait: float = 5.0
    ) -> list[ReceivedMessage]:
        """Wait up to `max_wait` s for a session, then take the further sessions that are
        ready now (a few at a time), until `max_messages` messages are locked."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        got: list[ReceivedMessage] = []
        mine: list[_Held] = []
        wait, width = max(max_wait, self._min_wait), 1
        try:
            while len(got) < max_messages and not self._closed:
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
            await _all(self._release(held) for held in mine)
            raise
        return [] if self._closed else got

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
            if not completed or self._closed:
                await _all(self._release(held) for held in sessions)
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
        if not deliveries or self._closed:
            await self._release(held)
            return []
        locked_until = held.session.locked_until
        for d in deliveries:
            held.unsettled[d.lock_token] = d
        return [_received(held, d, locked_until) for d in deliveries]

    # -- settling -----------------------------------------------------------------

    async def complete(self, messages: Sequence[ReceivedMessage]) -> None:
        """Complete every message still held; then raise MessageLockLostError if some
        were not (one settlement per message: not all-or-nothing)."""
        await self._settle(messages, lambda s, d: s.complete(d), strict=True)

    async def reply(
        self, completed: Sequence[ReceivedMessage], messages: Sequence[OutgoingMessage]
    ) -> None:
        """Send, then complete: Service Bus cannot do both atomically here. If a lock is
        already lost nothing is sent or completed. A crash between the two redelivers the
        command; its repeated result has the same message id and is dropped (by the
        broker's duplicate detection, else at the orchestrator's inbox)."""
        lost = sum(self._claim(m) is None for m in completed)
        if lost:
            await self._release_lost()
            raise MessageLockLostError(f"{lost} of {len(completed)} messages are no longer locked")
        await self.send(messages)
        await self.complete(completed)

    async def abandon(self, messages: Sequence[ReceivedMessage]) -> None:
        """Release the locks for redelivery; a lock already lost is left as it is."""
        await self._settle(messages, lambda s, d: s.abandon(d), strict=False)

    async def dead_letter(self, message: ReceivedMessage, *, reason: str, description: str) -> None:
        await self._settle(
            [message],
            lambda s, d: s.dead_letter(d, reason=reason, description=description),
            strict=True,
        )

    def _claim(self, message: ReceivedMessage) -> tuple[_Held, Delivery] | None:
        """The session and delivery of a message this bus can still settle, else None.
        A session whose lock time has passed is marked lost (released by the caller)."""
        handle = message.handle
        if not isinstance(handle, _Handle) or handle.session not in self._held:
            return None
        held, delivery = handle
        token = delivery.lock_token
        if held.lost or token not in held.unsettled or token in held.settling:
            return None
        if held.session.locked_until <= self._clock():
            held.lost = True
            return None
        return held, delivery

    async def _settle(
        self,
        messages: Sequence[ReceivedMessage],
        action: Callable[[SessionReceiver, Delivery], Awaitable[None]],
        *,
        strict: bool,
    ) -> None:
        groups: dict[_Held, list[Delivery]] = {}
        lost = 0
        for m in messages:
            claim = self._claim(m)
            if claim is None:
                lost += 1
                continue
            held, delivery = claim
            held.settling.add(delivery.lock_token)  # a repeat in `messages` is now "lost"
            groups.setdefault(held, []).append(delivery)
        await self._release_lost()
        # Sessions settle concurrently; within one, in order.
        results = await asyncio.gather(
            *(self._settle_in(held, ds, action) for held, ds in groups.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result  # a fault, not a lost lock: those messages are still held
            lost += result
        if lost and strict:
            raise MessageLockLostError(
                f"{lost} of {len(messages)} messages are no longer locked by this receiver "
                "(lock expired, taken over, or already settled)"
            )

    async def _settle_in(
        self,
        held: _Held,
        deliveries: list[Delivery],
        action: Callable[[SessionReceiver, Delivery], Awaitable[None]],
    ) -> int:
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

    async def renew_lock(self, messages: Sequence[ReceivedMessage]) -> None:
        """Renew the locks of the messages' sessions, which cover all their messages."""
        foreign = sum(not isinstance(m.handle, _Handle) for m in messages)
        sessions = {m.handle.session: None for m in messages if isinstance(m.handle, _Handle)}
        now = self._clock()
        for held in sessions:
            held.lost = held.lost or held.session.locked_until <= now
        live = [held for held in sessions if held in self._held and not held.lost]
        renewed = await _all(self._renew(held) for held in live)
        await self._release_lost()
        lost = foreign + len(sessions) - sum(renewed)
        if lost:
            raise MessageLockLostError(f"{lost} session lock(s) already lost")

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
        await _all(self._release(held) for held in lost)

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        self._check_open()
        return await self._client.peek_dead_letters(queue)

    async def receive_dead_letters(
        self, queue: str, *, max_messages: int = 100
    ) -> list[ReceivedDeadLetter]:
        """Peek-lock up to `max_messages` of `queue`'s dead letters; `complete` removes
        them (the receiver is held like a session until all are settled)."""
        self._check_open()
        held = self._register(dead_letter_queue(queue), await self._client.open_dead_letters(queue))
        letters = []
        for message in await self._take(held, max_messages):
            delivery = cast("_Handle", message.handle).delivery
            letter = DeadLetter(
                queue,
                message.message_id,
                message.session_id,
                message.body,
                delivery.dead_letter_reason,
                delivery.dead_letter_description,
                message.delivery_count,
                message.enqueued_at,
            )
            letters.append(ReceivedDeadLetter(letter, message))
        return letters

    async def close(self) -> None:
        """Release every held session without settling anything (their unsettled
        messages are delivered again), stop waiting receives, close the client."""
        if self._closed:
            return
        self._closing.set()
        await _all(self._release(held) for held in list(self._held))
        await self._client.close()


def _received(held: _Held, delivery: Delivery, locked_until: datetime) -> ReceivedMessage:
    return ReceivedMessage(
        queue=held.queue,
        message_id=delivery.message_id,
        session_id=delivery.session_id,
        body=delivery.body,
        delivery_count=delivery.delivery_count,
        enqueued_at=delivery.enqueued_at,
        locked_until=locked_until,
        lock_token=delivery.lock_token,
        handle=_Handle(held, delivery),
    )


def _split(total: int, parts: int) -> list[int]:
    """`total` in `parts` near-equal shares: each session's receive quota."""
    return [total // parts + (i < total % parts) for i in range(parts)]


async def _all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await all, let every one finish, then raise the first failure if any."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast("list[T]", results)
