"""The production message bus: the `Bus` port over Azure Service Bus queues.

It owns the mapping between the port and Service Bus (an `OutgoingMessage` becomes a
message with its id, session id, JSON body and scheduled enqueue time; a received one a
`ReceivedMessage`) and sends every receive and settlement to the bookkeeping of its
queue's kind: plain queues (`queues.py`: a kept link per queue, a lock per message),
which sagaflow's own queues are, or session-enabled queues (`sessions.py`: whole
sessions accepted, held and released). It talks to the broker only through the narrow
`SessionClient` (`client.py`), so it is tested over an in-memory fake as well as over
the real SDK.

What it cannot do that the Postgres bus does: join a database transaction (so commands
go through the orchestrator's outbox), settle several messages all-or-nothing (each
settlement is its own broker operation), or send and complete atomically (`reply`
sends first; a crash in between redelivers the command, and the repeated result is
dropped by its message id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, TypedDict, Unpack

from sagaflow.adapters.servicebus.azure_client import AzureSessionClient
from sagaflow.adapters.servicebus.client import (
    MessageTooLargeError,
    RetryPolicy,
    ServiceBusAdapterError,
    SessionClient,
    Settlement,
    WireMessage,
    gather_all,
)
from sagaflow.adapters.servicebus.queues import QueueHandle, Queues
from sagaflow.adapters.servicebus.sessions import SessionHandle, Sessions
from sagaflow.core.messages import COMMANDS_QUEUE_PREFIX, EVENTS_QUEUE
from sagaflow.core.ports import (
    BusSetupError,
    Clock,
    DeadLetter,
    MessageLockLostError,
    OutgoingMessage,
    ReceivedDeadLetter,
    ReceivedMessage,
    utc_now,
)

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

# Service Bus standard tier's message size limit (premium allows more).
STANDARD_TIER_MAX_BYTES = 256 * 1024
CONTENT_TYPE = "application/json"


class BusOptions(TypedDict, total=False):
    clock: Clock
    max_body_bytes: int
    session_queues: Collection[str]
    gather_wait: float
    min_wait: float
    accept_parallelism: int
    settle_parallelism: int


def topology_queues(step_prefixes: Iterable[str]) -> list[str]:
    """The queues sagaflow uses: the events queue and one per step-type prefix."""
    return [EVENTS_QUEUE, *(COMMANDS_QUEUE_PREFIX + p for p in sorted(set(step_prefixes)))]


class ServiceBusBus:
    """A `Bus` over Service Bus queues (see `docs/servicebus.md`).

    `max_body_bytes`: larger bodies are refused before sending (the claim-check layer
    keeps bodies far smaller). `session_queues`: queues created with sessions on
    (sagaflow's own are plain). `gather_wait`: how long a receive on a plain queue
    gathers further messages once it has one. `min_wait`: on a session queue, how long
    a receive asks the broker for further sessions once it has one, and its shortest
    wait for the first (the SDK refuses 0); `accept_parallelism`: how many further
    sessions it asks for at once. `settle_parallelism`: settlements on plain queues
    under way at once (the SDK polls the connection for each one's echo)."""

    def __init__(
        self,
        client: SessionClient,
        *,
        clock: Clock = utc_now,
        max_body_bytes: int = STANDARD_TIER_MAX_BYTES,
        session_queues: Collection[str] = (),
        gather_wait: float = 0.02,
        min_wait: float = 0.2,
        accept_parallelism: int = 8,
        settle_parallelism: int = 4,
    ) -> None:
        if min(max_body_bytes, accept_parallelism, settle_parallelism) < 1:
            raise ValueError(
                "max_body_bytes, accept_parallelism and settle_parallelism must be at least 1"
            )
        if min_wait <= 0 or gather_wait <= 0:
            raise ValueError("min_wait and gather_wait must be > 0")
        self._client = client
        self._max_body_bytes = max_body_bytes
        self._session_queues = session_queues
        self._closing = asyncio.Event()
        self._sessions = Sessions(
            client,
            clock=clock,
            closing=self._closing,
            min_wait=min_wait,
            parallelism=accept_parallelism,
        )
        self._queues = Queues(
            client,
            clock=clock,
            closing=self._closing,
            gather_wait=gather_wait,
            dead_letter_wait=min_wait,
            settle_parallelism=settle_parallelism,
        )

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

    # -- opening ------------------------------------------------------------------

    async def prepare(self, *, send: Sequence[str] = (), receive: Sequence[str] = ()) -> None:
        """Open every link these queues need, all at once: in this SDK each is a
        connection of its own, about half a second to open, which the first message
        of each queue would otherwise wait for. A queue that is missing (or not
        allowed) fails here, named, instead of leaving its messages unsent."""
        self._check_open()
        plain = [q for q in dict.fromkeys(receive) if q not in self._session_queues]
        opening = [(q, self._client.open_sender(q)) for q in dict.fromkeys(send)]
        opening += [(q, self._open_link(q)) for q in plain]
        results = await asyncio.gather(*(o for _, o in opening), return_exceptions=True)
        problems = [
            f"{queue}: {result}"
            for (queue, _), result in zip(opening, results, strict=True)
            if isinstance(result, ServiceBusAdapterError)
        ]
        if problems:
            raise BusSetupError(
                "Service Bus cannot serve "
                + "; ".join(problems)
                + " (create the queues with `sagaflow servicebus-topology`)"
            )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _open_link(self, queue: str) -> None:
        await (await self._client.open_queue(queue)).open()

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
            wire = WireMessage(
                m.message_id, m.session_id, m.body, CONTENT_TYPE, m.scheduled_at, m.headers
            )
            by_queue.setdefault(m.queue, []).append(wire)
        await gather_all(self._client.send(queue, batch) for queue, batch in by_queue.items())

    # -- receiving ----------------------------------------------------------------

    async def receive(
        self, queue: str, *, max_messages: int = 100, max_wait: float = 5.0
    ) -> list[ReceivedMessage]:
        """Wait up to `max_wait` s for a message, then take what else is ready now, up to
        `max_messages`."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        if self._closed:
            return []
        if queue in self._session_queues:
            got = await self._sessions.receive(queue, max_messages, max_wait)
        else:
            got = await self._queues.receive(queue, max_messages, max_wait)
        return [] if self._closed else got

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
        lost = sum(not self._claimable(m) for m in completed)
        if lost:
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

    def _claimable(self, message: ReceivedMessage) -> bool:
        handle = message.handle
        if isinstance(handle, QueueHandle):
            return self._queues.claimable(handle)
        if isinstance(handle, SessionHandle):
            return self._sessions.claimable(handle)
        return False

    async def _settle(
        self, messages: Sequence[ReceivedMessage], action: Settlement, *, strict: bool
    ) -> None:
        plain, sessions, foreign = _by_kind(messages)
        lost = sum(
            await gather_all(
                [self._queues.settle(plain, action), self._sessions.settle(sessions, action)]
            )
        )
        if (lost or foreign) and strict:
            raise MessageLockLostError(
                f"{lost + foreign} of {len(messages)} messages are no longer locked by this "
                "receiver (lock expired, taken over, or already settled)"
            )

    async def renew_lock(self, messages: Sequence[ReceivedMessage]) -> None:
        """Renew the messages' locks (on a session queue: their sessions' locks, which
        cover all their messages)."""
        plain, sessions, foreign = _by_kind(messages)
        lost = foreign + sum(
            await gather_all([self._queues.renew(plain), self._sessions.renew(sessions)])
        )
        if lost:
            raise MessageLockLostError(f"{lost} lock(s) already lost")

    # -- dead letters -------------------------------------------------------------

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        self._check_open()
        return await self._client.peek_dead_letters(queue)

    async def receive_dead_letters(
        self, queue: str, *, max_messages: int = 100
    ) -> list[ReceivedDeadLetter]:
        """Peek-lock up to `max_messages` of `queue`'s dead letters; `complete` removes
        them. Each has a lock of its own, as on a plain queue."""
        self._check_open()
        letters = []
        for delivery, message in await self._queues.receive_dead_letters(queue, max_messages):
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
        """Settle nothing (unsettled messages are delivered again: at once from a
        released session, after their locks from a plain queue), stop waiting receives,
        close the client."""
        if self._closed:
            return
        self._closing.set()
        await self._sessions.close()
        self._queues.close()
        await self._client.close()


def _by_kind(
    messages: Sequence[ReceivedMessage],
) -> tuple[list[QueueHandle], list[SessionHandle], int]:
    """The messages' handles on plain queues and in sessions, and how many are neither
    (received by another bus, so not ours to settle)."""
    plain = [m.handle for m in messages if isinstance(m.handle, QueueHandle)]
    sessions = [m.handle for m in messages if isinstance(m.handle, SessionHandle)]
    return plain, sessions, len(messages) - len(plain) - len(sessions)
