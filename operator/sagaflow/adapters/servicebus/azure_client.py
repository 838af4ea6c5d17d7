"""`SessionClient` over `azure.servicebus.aio`: the only module that touches the SDK.

It maps wire messages to SDK messages and back, keeps one sender link per queue and
one long-lived receiver link per plain queue (and per dead-letter subqueue) for the life
of the client, and opens a receiver per accepted session, closed when the session is
released. Every SDK call goes through the one retry layer (`client.Retrying`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusMessage,
    ServiceBusMessageBatch,
    ServiceBusReceivedMessage,
    ServiceBusSubQueue,
)
from azure.servicebus import exceptions as sdk_errors
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender

from sagaflow.adapters.servicebus.client import (
    Delivery,
    MessageTooLargeError,
    Retrying,
    RetryPolicy,
    ServiceBusTransientError,
    WireMessage,
    gather_all,
    translate_error,
)
from sagaflow.core.ports import DeadLetter, MessageLockLostError, dead_letter_queue, utc_now

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

log = logging.getLogger(__name__)

T = TypeVar("T")

# The SDK refuses a wait of 0; the broker answers within this when something is ready,
# so it is the shortest useful "is anything there now?".
_MIN_WAIT = 0.01
# How long one pass of the SDK's connection loop waits for a frame (its default is
# 0.2 s). A receive can only end between passes, so this is its granularity: at the
# default, gathering "what else is ready" after a first message costs 0.2 s a hop.
_SOCKET_TIMEOUT = 0.01
# A session lock the SDK did not report: let the broker judge when settling.
_UNKNOWN_LOCK_EXPIRY = datetime.max.replace(tzinfo=UTC)
# `_link_gone`'s stand-in for an SDK receiver attribute that does not exist.
_STILL_OPEN = object()
# The SDK module that logs a handler's unexpected errors, with their tracebacks.
_SDK_HANDLER_LOG = "azure.servicebus.aio._base_handler_async"


class _HandlerRaceFilter(logging.Filter):
    """Keeps one known SDK race out of the error log. When a connection breaks under
    several calls on one receiver at once, the call that meets the fault first shuts
    the SDK's AMQP handler down, and the others, still under way, then use it as None
    (Azure/azure-sdk-for-python#35618 and #36334, open): the SDK logs an ERROR with
    a traceback for each and raises a generic error, which this adapter turns into a
    lost lock (`_AzureQueue._on_owner`). The record is logged again here at INFO,
    without the traceback; any other SDK error passes untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, AttributeError) and str(exc).startswith("'NoneType' object"):
            log.info("the SDK used a handler it had shut down after a connection fault: %s", exc)
            return False
        return True


_HANDLER_RACE_FILTER = _HandlerRaceFilter()


def to_sdk_message(message: WireMessage) -> ServiceBusMessage:
    return ServiceBusMessage(
        message.body,
        message_id=message.message_id,
        session_id=message.session_id,
        content_type=message.content_type,
        scheduled_enqueue_time_utc=message.scheduled_enqueue_time_utc,
    )


def delivery_from_sdk(message: ServiceBusReceivedMessage) -> Delivery:
    return Delivery(
        message_id=str(message.message_id),
        session_id=str(message.session_id),
        body=_body_bytes(message.body),
        # The broker sends AMQP's zero-based count of earlier deliveries; the Python SDK
        # passes it through (the .NET SDK adds one). The port counts this delivery too.
        delivery_count=(message.delivery_count or 0) + 1,
        enqueued_at=message.enqueued_time_utc or utc_now(),
        lock_token=str(message.lock_token),
        raw=message,
        dead_letter_reason=message.dead_letter_reason or "",
        dead_letter_description=message.dead_letter_error_description or "",
        locked_until=message.locked_until_utc,
    )


def dead_letter_from_sdk(queue: str, message: ServiceBusReceivedMessage) -> DeadLetter:
    return DeadLetter(
        queue=queue,
        message_id=str(message.message_id),
        session_id=str(message.session_id or ""),
        body=_body_bytes(message.body),
        reason=message.dead_letter_reason or "",
        description=message.dead_letter_error_description or "",
        # A peeked message carries the broker's own count, not the delivery header.
        delivery_count=message.delivery_count or 0,
        # Service Bus records no dead-lettering time; the enqueue time is the nearest.
        dead_lettered_at=message.enqueued_time_utc or utc_now(),
    )


def _body_bytes(body: Any) -> bytes:
    """A received body as bytes: the SDK hands out data sections as an iterator."""
    if isinstance(body, bytes | str):
        return body.encode() if isinstance(body, str) else body
    parts = list(body) if isinstance(body, Iterable) else [body]
    if all(isinstance(part, bytes) for part in parts):
        return b"".join(parts)
    # A value or sequence body from a foreign sender: not our JSON, dead-lettered downstream.
    return repr(parts).encode()


def _fill(batch: ServiceBusMessageBatch, pending: Sequence[ServiceBusMessage], queue: str) -> int:
    """Add messages from the front of `pending` until the batch is full; how many fit."""
    for taken, message in enumerate(pending):
        try:
            batch.add_message(message)
        except sdk_errors.MessageSizeExceededError as exc:
            if taken == 0:
                raise MessageTooLargeError(
                    f"message {message.message_id!r} for {queue!r} exceeds the "
                    f"{batch.max_size_in_bytes}-byte message size limit"
                ) from exc
            return taken
    return len(pending)


class AzureSessionClient:
    """`SessionClient` over an `azure.servicebus.aio.ServiceBusClient`.

    In this SDK every sender and receiver is an AMQP connection of its own (about half a
    second to open), so links are opened once and kept: a sender per queue, a receiver
    per plain queue and per dead-letter subqueue. Only an accepted session costs a
    receiver of its own, closed when the session is released."""

    def __init__(
        self,
        sdk: ServiceBusClient,
        *,
        credential: AsyncTokenCredential | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        peek_batch: int = 250,
    ) -> None:
        self._sdk = sdk
        sdk_log = logging.getLogger(_SDK_HANDLER_LOG)
        if _HANDLER_RACE_FILTER not in sdk_log.filters:
            sdk_log.addFilter(_HANDLER_RACE_FILTER)
        self._credential = credential  # closed with the client when it made it
        self._call = Retrying(retry or RetryPolicy(), sleep)
        self._peek_batch = peek_batch
        self._senders: dict[str, ServiceBusSender] = {}
        self._links: dict[str, _AzureQueue] = {}  # by queue (or dead-letter subqueue) name
        self._receivers: set[ServiceBusReceiver] = set()

    @classmethod
    def from_connection_string(
        cls, connection_string: str, *, retry: RetryPolicy | None = None
    ) -> AzureSessionClient:
        sdk = ServiceBusClient.from_connection_string(connection_string, retry_total=0)
        return cls(sdk, retry=retry)

    @classmethod
    def from_namespace(
        cls,
        namespace: str,
        *,
        credential: AsyncTokenCredential | None = None,
        retry: RetryPolicy | None = None,
    ) -> AzureSessionClient:
        """`namespace` is NAME.servicebus.windows.net. Without a credential, azure-identity's
        DefaultAzureCredential (workload identity on AKS, managed identity, az login)."""
        owned = None
        if credential is None:
            from azure.identity.aio import DefaultAzureCredential

            credential = owned = DefaultAzureCredential()
        sdk = ServiceBusClient(namespace, credential, retry_total=0)
        return cls(sdk, credential=owned, retry=retry)

    def _sender(self, queue: str) -> ServiceBusSender:
        sender = self._senders.get(queue)
        if sender is None:
            sender = self._senders[queue] = self._sdk.get_queue_sender(
                queue, socket_timeout=_SOCKET_TIMEOUT
            )
        return sender

    async def open_sender(self, queue: str) -> None:
        await self._call(f"opening a sender on {queue!r}", self._sender(queue).__aenter__)

    async def send(self, queue: str, messages: Sequence[WireMessage]) -> None:
        sender = self._sender(queue)
        pending = [to_sdk_message(m) for m in messages]
        # Batch by batch, each retried alone: a retry never resends a batch that went.
        while pending:
            batch = await self._call(f"opening a batch for {queue!r}", sender.create_message_batch)
            taken = _fill(batch, pending, queue)
            send = functools.partial(sender.send_messages, batch)
            await self._call(f"sending {taken} message(s) to {queue!r}", send)
            pending = pending[taken:]

    async def accept_next_session(self, queue: str, *, max_wait: float) -> _AzureSession | None:
        open_next = functools.partial(self._open_next_session, queue, max(max_wait, _MIN_WAIT))
        receiver = await self._call(f"accepting a session of {queue!r}", open_next)
        return None if receiver is None else _AzureSession(self._call, receiver, self._discard)

    async def _open_next_session(self, queue: str, wait: float) -> ServiceBusReceiver | None:
        # A fresh receiver per try: one whose open failed is not reused.
        receiver = self._sdk.get_queue_receiver(
            queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=wait, prefetch_count=0
        )
        self._receivers.add(receiver)
        try:
            await receiver.__aenter__()
        except sdk_errors.OperationTimeoutError:
            # The answer when no session became available in time (the SDK's own
            # deadline or the broker's com.microsoft:timeout): an idle queue.
            await self._discard(receiver)
            return None
        except BaseException:
            await self._discard(receiver)
            raise
        return receiver

    async def open_queue(self, queue: str, *, dead_letters: bool = False) -> _AzureQueue:
        name = dead_letter_queue(queue) if dead_letters else queue
        link = self._links.get(name)
        if link is None:
            sub_queue = ServiceBusSubQueue.DEAD_LETTER if dead_letters else None

            def make() -> ServiceBusReceiver:
                # prefetch 0: the SDK asks the broker for exactly what a receive wants and
                # gives back what comes in between receives, so no message waits out its
                # lock in a buffer this process is not reading.
                return self._sdk.get_queue_receiver(
                    queue, sub_queue=sub_queue, prefetch_count=0, socket_timeout=_SOCKET_TIMEOUT
                )

            link = self._links[name] = _AzureQueue(name, self._call, make)
        return link

    async def peek_dead_letters(self, queue: str) -> list[DeadLetter]:
        receiver = await (await self.open_queue(queue, dead_letters=True)).receiver()
        found: list[DeadLetter] = []
        sequence = 1
        while True:
            peek = functools.partial(
                receiver.peek_messages, self._peek_batch, sequence_number=sequence
            )
            page = await self._call(f"peeking the dead letters of {queue!r}", peek)
            if not page:
                return found
            found.extend(dead_letter_from_sdk(queue, m) for m in page)
            sequence = max(m.sequence_number or 0 for m in page) + 1

    async def _discard(self, receiver: ServiceBusReceiver) -> None:
        self._receivers.discard(receiver)
        await _close_quietly(receiver)

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        senders, receivers = list(self._senders.values()), list(self._receivers)
        self._senders, self._receivers = {}, set()
        # All at once: the SDK's close of a sender or receiver waits for the link's
        # keep-alive task, which sleeps in one-second steps, so closing them one after
        # another costs up to a second per link (about ten for a process on five queues).
        await gather_all(
            [
                *(link.close() for link in links),
                *(_close_quietly(sender) for sender in senders),
                *(_close_quietly(receiver) for receiver in receivers),
            ]
        )
        await self._sdk.close()
        if self._credential is not None:
            await self._credential.close()


async def _close_quietly(handler: ServiceBusReceiver | ServiceBusSender) -> None:
    try:
        await handler.close()
    except Exception as exc:  # closing a link the broker already dropped
        log.debug("closing a Service Bus link failed: %s", exc)


class _AzureSession:
    """A session receiver: the SDK receiver whose link holds the session lock."""

    def __init__(
        self,
        call: Retrying,
        receiver: ServiceBusReceiver,
        discard: Callable[[ServiceBusReceiver], Awaitable[None]],
    ) -> None:
        self._call = call
        self._receiver = receiver
        self._discard = discard
        self._closed = False
        self._id = str(receiver.session.session_id)

    @property
    def session_id(self) -> str:
        return self._id

    @property
    def locked_until(self) -> datetime:
        return self._receiver.session.locked_until_utc or _UNKNOWN_LOCK_EXPIRY

    async def receive(self, max_messages: int, max_wait: float) -> list[Delivery]:
        receive = functools.partial(
            self._receiver.receive_messages,
            max_message_count=max_messages,
            max_wait_time=max(max_wait, _MIN_WAIT),
        )
        return [delivery_from_sdk(m) for m in await self._run("receiving", receive)]

    async def complete(self, delivery: Delivery) -> None:
        await self._run(
            "completing", functools.partial(self._receiver.complete_message, delivery.raw)
        )

    async def abandon(self, delivery: Delivery) -> None:
        await self._run(
            "abandoning", functools.partial(self._receiver.abandon_message, delivery.raw)
        )

    async def dead_letter(self, delivery: Delivery, *, reason: str, description: str) -> None:
        await self._run(
            "dead-lettering", _dead_letter(self._receiver, delivery, reason, description)
        )

    async def renew_lock(self) -> datetime:
        return await self._run("renewing the lock", self._receiver.session.renew_lock)

    async def _run(self, verb: str, operation: Callable[[], Awaitable[T]]) -> T:
        if self._closed:  # the SDK would raise a bare ValueError for a closed receiver
            raise MessageLockLostError(f"session {self._id!r} was released")
        return await self._call(f"{verb} in session {self._id!r}", operation)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._discard(self._receiver)


def _dead_letter(
    receiver: ServiceBusReceiver, delivery: Delivery, reason: str, description: str
) -> Callable[[], Awaitable[None]]:
    return functools.partial(
        receiver.dead_letter_message, delivery.raw, reason=reason, error_description=description
    )


class _AzureQueue:
    """The kept receiver of a plain queue or dead-letter subqueue (`QueueLink`).

    A transient fault on the SDK receiver (a dropped connection, a restarted broker)
    closes it at once, before the fault is retried, and the retry opens a fresh one.
    The SDK would otherwise reopen its connection inside the same receiver, and a
    message received before the fault would then be settled through a handler that no
    longer has its link: the SDK logs a traceback and raises an error that does not say
    the lock is lost. Messages received on a closed receiver can no longer be settled
    (MessageLockLostError, without asking the broker) and come back once their locks
    expire."""

    def __init__(self, queue: str, call: Retrying, make: Callable[[], ServiceBusReceiver]) -> None:
        self.queue = queue
        self._call = call
        self._make = make
        self._receiver: ServiceBusReceiver | None = None
        self._opening = asyncio.Lock()
        # Lock tokens of messages received on the open receiver and not yet settled.
        self._tokens: set[str] = set()
        # Calls under way per SDK receiver, and receivers given up to close after theirs.
        self._in_flight: dict[ServiceBusReceiver, int] = {}
        self._retired: set[ServiceBusReceiver] = set()

    async def open(self) -> None:
        await self.receiver()

    async def receiver(self) -> ServiceBusReceiver:
        return await self._call(f"opening a receiver on {self.queue!r}", self._open)

    async def _open(self) -> ServiceBusReceiver:
        async with self._opening:
            if self._receiver is None:
                receiver = self._make()
                try:
                    await receiver.__aenter__()
                except BaseException:
                    await _close_quietly(receiver)
                    raise
                self._receiver = receiver
            return self._receiver

    async def receive(self, max_messages: int, max_wait: float) -> list[Delivery]:
        async def attempt() -> list[Delivery]:
            receiver = await self._open()  # a fresh one after a fault: retried with it
            if _link_gone(receiver):  # shut by the SDK on a fault another call met
                await self._reset(receiver)
                receiver = await self._open()
            got = await self._guarded(
                receiver,
                receiver.receive_messages(
                    max_message_count=max_messages, max_wait_time=max(max_wait, _MIN_WAIT)
                ),
            )
            deliveries = [delivery_from_sdk(m) for m in got]
            if receiver is self._receiver:
                self._tokens.update(d.lock_token for d in deliveries)
            return deliveries

        return await self._call(f"receiving on {self.queue!r}", attempt)

    async def complete(self, delivery: Delivery) -> None:
        await self._settle(delivery, "completing", lambda r: r.complete_message(delivery.raw))

    async def abandon(self, delivery: Delivery) -> None:
        await self._settle(delivery, "abandoning", lambda r: r.abandon_message(delivery.raw))

    async def dead_letter(self, delivery: Delivery, *, reason: str, description: str) -> None:
        await self._settle(
            delivery,
            "dead-lettering",
            lambda r: _dead_letter(r, delivery, reason, description)(),
        )

    async def _settle(
        self,
        delivery: Delivery,
        verb: str,
        operation: Callable[[ServiceBusReceiver], Awaitable[None]],
    ) -> None:
        try:
            await self._on_owner(delivery, verb, operation)
        except MessageLockLostError:
            self._tokens.discard(delivery.lock_token)
            raise
        self._tokens.discard(delivery.lock_token)

    async def renew_lock(self, delivery: Delivery) -> datetime:
        return await self._on_owner(
            delivery, "renewing the lock", lambda r: r.renew_message_lock(delivery.raw)
        )

    async def _on_owner(
        self,
        delivery: Delivery,
        verb: str,
        operation: Callable[[ServiceBusReceiver], Awaitable[T]],
    ) -> T:
        """`operation` on the receiver `delivery` came on; each retry checks again that it
        is still the open one (after a fault it is not: the lock is lost)."""

        async def attempt() -> T:
            receiver = self._owner(delivery)
            if _link_gone(receiver):
                # The SDK shut the link down on a fault another call met: its locks can
                # no longer be settled, and asking would only log a traceback.
                await self._reset(receiver)
                raise MessageLockLostError(
                    f"message {delivery.message_id!r}: its link on {self.queue!r} broke"
                )
            try:
                return await self._guarded(receiver, operation(receiver))
            except (sdk_errors.ServiceBusError, ValueError) as exc:
                # The link broke while this call was under way (the SDK raises a bare
                # ValueError, or an error wrapping an AttributeError, for a handler it
                # shut down meanwhile): the lock is lost with the link.
                gone = receiver is not self._receiver or _link_gone(receiver)
                if gone and not self._transient(exc):
                    await self._reset(receiver)
                    raise MessageLockLostError(
                        f"message {delivery.message_id!r}: its link on {self.queue!r} broke ({exc})"
                    ) from exc
                raise

        return await self._call(f"{verb} on {self.queue!r}", attempt)

    def _owner(self, delivery: Delivery) -> ServiceBusReceiver:
        """The receiver `delivery` came on, if it is still the open one."""
        receiver = self._receiver
        if receiver is None or delivery.lock_token not in self._tokens:
            raise MessageLockLostError(
                f"message {delivery.message_id!r} is not held on {self.queue!r}: settled "
                "already, or received on a receiver since closed"
            )
        return receiver

    @staticmethod
    def _transient(exc: BaseException) -> bool:
        return isinstance(translate_error(exc, ""), ServiceBusTransientError)

    async def _guarded(self, receiver: ServiceBusReceiver, operation: Awaitable[T]) -> T:
        """`operation`; a transient fault retires `receiver` before it is raised (and
        retried by the caller's retry layer)."""
        self._in_flight[receiver] = self._in_flight.get(receiver, 0) + 1
        try:
            return await operation
        except Exception as exc:
            if self._transient(exc):
                await self._reset(receiver)
            raise
        finally:
            left = self._in_flight.pop(receiver) - 1
            if left:
                self._in_flight[receiver] = left
            elif receiver in self._retired:
                self._retired.discard(receiver)
                await _close_quietly(receiver)

    async def _reset(self, receiver: ServiceBusReceiver) -> None:
        """Stop using `receiver`; close it once no call is under way on it (closing it
        beneath settlements still in flight makes the SDK log tracebacks for each)."""
        if self._receiver is receiver:
            self._receiver = None
            self._tokens.clear()
            if receiver in self._in_flight:
                self._retired.add(receiver)
            else:
                await _close_quietly(receiver)

    async def close(self) -> None:
        retired, self._retired = list(self._retired), set()
        for receiver in retired:
            await _close_quietly(receiver)
        if self._receiver is not None:
            receiver, self._receiver = self._receiver, None
            self._tokens.clear()
            await _close_quietly(receiver)


def _link_gone(receiver: ServiceBusReceiver) -> bool:
    """Whether the SDK has shut the receiver's AMQP handler down after a fault (it then
    reopens a new one on the next receive, on which earlier locks are not held). This
    reads the SDK receiver's private state; attributes a newer SDK lacks read as "still
    open", so the broker is asked as before."""
    if not getattr(receiver, "_running", True):
        return True
    handler = getattr(receiver, "_handler", _STILL_OPEN)
    return handler is None or getattr(handler, "_shutdown", False) is True
