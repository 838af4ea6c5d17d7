"""The Azure SDK boundary: the narrow client the Service Bus bus needs (`SessionClient`)
and its implementation over `azure.servicebus.aio`, plus the topology helper.

`SessionClient` names exactly what `bus.py` uses, so the adapter is tested against an
in-memory fake and no SDK type leaves this module. SDK exceptions are translated here,
the SDK error kept as `__cause__`: a lost session or message lock becomes the port's
`MessageLockLostError`, an oversized message `MessageTooLargeError`, a transient fault is
retried with exponential backoff a bounded number of times and then raised as
`ServiceBusTransientError`, any other Azure error `ServiceBusAdapterError`. The SDK's own
retries are off (`retry_total=0`): one retry layer, whose count and delays are ours.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from azure.core.exceptions import AzureError
from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusMessage,
    ServiceBusMessageBatch,
    ServiceBusReceivedMessage,
    ServiceBusSubQueue,
)
from azure.servicebus import exceptions as sdk_errors
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender

from sagaflow.core.ports import DeadLetter, MessageLockLostError, utc_now

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

log = logging.getLogger(__name__)

T = TypeVar("T")

# The SDK refuses a wait of 0; the broker answers an accept within this when a session
# is ready, so it is the shortest useful "is anything there now?".
_MIN_WAIT = 0.05
# A session lock the SDK did not report: let the broker judge when settling.
_UNKNOWN_LOCK_EXPIRY = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class WireMessage:
    """A message as sent: what the adapter asks the client to put on a queue."""

    message_id: str
    session_id: str
    body: bytes
    content_type: str
    scheduled_enqueue_time_utc: datetime | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message received in a session, locked by that session's lock."""

    message_id: str
    session_id: str
    body: bytes
    delivery_count: int  # this delivery included: 1 the first time
    enqueued_at: datetime
    lock_token: str
    # The SDK message, which settlement needs; only the client that made it reads it.
    raw: Any = field(default=None, compare=False, repr=False)
    # Received from a dead-letter sub-queue: why it was put there.
    dead_letter_reason: str = ""
    dead_letter_description: str = ""


class ServiceBusAdapterError(Exception):
    """A Service Bus operation failed for a reason retrying will not fix (auth, a
    missing queue, quota, ...); the SDK error is the `__cause__`."""


class ServiceBusTransientError(ServiceBusAdapterError):
    """A transient fault (connection, busy server, timeout) outlasted the retries."""


class MessageTooLargeError(ServiceBusAdapterError, ValueError):
    """A message does not fit the entity's size limit; large payloads go by claim check."""


class TopologyError(ServiceBusAdapterError):
    """An existing queue cannot serve sagaflow (sessions are off and cannot be turned on)."""


class SessionReceiver(Protocol):
    """One accepted session: locked to this receiver until closed or the lock expires.
    Operations raise `MessageLockLostError` once the session lock is lost."""

    @property
    def session_id(self) -> str: ...

    @property
    def locked_until(self) -> datetime: ...

    async def receive(self, max_messages: int, max_wait: float) -> list[Delivery]: ...

    async def complete(self, delivery: Delivery) -> None: ...

    async def abandon(self, delivery: Delivery) -> None: ...

    async def dead_letter(self, delivery: Delivery, *, reason: str, description: str) -> None: ...

    async def renew_lock(self) -> datetime:
        """Extend the session lock (which covers its messages); return the new expiry."""
        ...

    async def close(self) -> None:
        """Release the session: its unsettled messages become receivable again."""
        ...


class SessionClient(Protocol):
    """What the Service Bus bus needs from a Service Bus namespace."""

    async def send(self, queue: str, messages: Sequence[WireMessage]) -> None: ...

    async def accept_next_session(self, queue: str, *, max_wait: float) -> SessionReceiver | None:
        """Lock the next session with available messages; None if none within `max_wait` s."""
        ...

    async def peek_dead_letters(self, queue: str) -> list[DeadLetter]: ...

    async def open_dead_letters(self, queue: str) -> SessionReceiver:
        """A peek-lock receiver on `queue`'s dead-letter sub-queue (no session: its
        `session_id` is empty and its lock is the earliest of its messages')."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff for transient faults: `attempts` tries in all."""

    attempts: int = 4
    first_delay: float = 0.5
    max_delay: float = 10.0
    # Spread the retries of many replicas that failed together (a throttled namespace).
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.first_delay < 0 or self.max_delay < self.first_delay:
            raise ValueError("attempts must be >= 1 and 0 <= first_delay <= max_delay")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0 for the first retry)."""
        delay = min(self.max_delay, self.first_delay * 2.0**retry)
        # Not security: a random spread of retry times.
        return delay * (0.5 + random.random() / 2) if self.jitter else delay  # noqa: S311


_LOCK_LOST = (
    sdk_errors.SessionLockLostError,
    sdk_errors.MessageLockLostError,
    sdk_errors.MessageAlreadySettled,
)
_TRANSIENT = (
    sdk_errors.ServiceBusConnectionError,
    sdk_errors.ServiceBusCommunicationError,
    sdk_errors.ServiceBusServerBusyError,
    sdk_errors.OperationTimeoutError,
)


def translate_error(exc: BaseException, what: str) -> BaseException:
    """Our exception for an SDK exception (`exc` itself if it is not the SDK's)."""
    if isinstance(exc, _LOCK_LOST):
        return MessageLockLostError(f"{what}: {exc}")
    if isinstance(exc, sdk_errors.MessageSizeExceededError):
        return MessageTooLargeError(f"{what}: {exc}")
    if isinstance(exc, _TRANSIENT):
        return ServiceBusTransientError(f"{what}: {exc}")
    if isinstance(exc, AzureError):  # ServiceBusError and azure-identity's errors alike
        return ServiceBusAdapterError(f"{what}: {exc}")
    return exc


class _Retrying:
    def __init__(self, policy: RetryPolicy, sleep: Callable[[float], Awaitable[None]]) -> None:
        self._policy = policy
        self._sleep = sleep

    async def __call__(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation`, retrying transient faults; raise translated errors."""
        attempt = 1
        while True:
            try:
                return await operation()
            except Exception as exc:
                error = translate_error(exc, what)
                if error is exc:
                    raise
                if isinstance(error, ServiceBusTransientError) and attempt < self._policy.attempts:
                    delay = self._policy.delay(attempt - 1)
                    log.info("%s failed (%s); retry %d in %.2fs", what, exc, attempt, delay)
                    await self._sleep(delay)
                    attempt += 1
                    continue
                raise error from exc


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

    Senders are kept per queue (a link each); every accepted session is a receiver of
    its own, closed when the session is released."""

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
        self._credential = credential  # closed with the client when it made it
        self._call = _Retrying(retry or RetryPolicy(), sleep)
        self._peek_batch = peek_batch
        self._senders: dict[str, ServiceBusSender] = {}
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

    async def send(self, queue: str, messages: Sequence[WireMessage]) -> None:
        sender = self._senders.get(queue)
        if sender is None:
            sender = self._senders[queue] = self._sdk.get_queue_sender(queue)
        pending = [to_sdk_message(m) for m in messages]
        # Batch by batch, each retried alone: a retry never resends a batch that went.
        while pending:
            batch = await self._call(f"opening a batch for {queue!r}", sender.create_message_batch)
            taken = _fill(batch, pending, queue)
            send = functools.partial(sender.send_messages, batch)
            await self._call(f"sending {taken} message(s) to {queue!r}", send)
            pending = pending[taken:]

    async def accept_next_session(self, queue: str, *, max_wait: float) -> SessionReceiver | None:
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
            # The broker's answer when no session became available in time.
            await self._discard(receiver)
            return None
        except BaseException:
            await self._discard(receiver)
            raise
        return receiver

    async def peek_dead_letters(self, queue: str) -> list[DeadLetter]:
        receiver = self._sdk.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
        self._receivers.add(receiver)
        found: list[DeadLetter] = []
        try:
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
        finally:
            await self._discard(receiver)

    async def open_dead_letters(self, queue: str) -> SessionReceiver:
        receiver = self._sdk.get_queue_receiver(
            queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER, prefetch_count=0
        )
        self._receivers.add(receiver)
        try:
            await self._call(f"opening the dead letters of {queue!r}", receiver.__aenter__)
        except BaseException:
            await self._discard(receiver)
            raise
        return _AzureDeadLetters(self._call, receiver, self._discard)

    async def _discard(self, receiver: ServiceBusReceiver) -> None:
        self._receivers.discard(receiver)
        try:
            await receiver.close()
        except Exception as exc:  # closing a link the broker already dropped
            log.debug("closing a Service Bus receiver failed: %s", exc)

    async def close(self) -> None:
        links = [*self._senders.values(), *self._receivers]
        self._senders, self._receivers = {}, set()
        for link in links:
            try:
                await link.close()
            except Exception as exc:  # a link the broker already dropped
                log.debug("closing a Service Bus link failed: %s", exc)
        await self._sdk.close()
        if self._credential is not None:
            await self._credential.close()


class _AzureSession:
    """A session receiver: the SDK receiver whose link holds the session lock."""

    def __init__(
        self,
        call: _Retrying,
        receiver: ServiceBusReceiver,
        discard: Callable[[ServiceBusReceiver], Awaitable[None]],
    ) -> None:
        self._call = call
        self._receiver = receiver
        self._discard = discard
        self._closed = False
        self._id = self._session_id()

    def _session_id(self) -> str:
        return str(self._receiver.session.session_id)

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
        dead_letter = functools.partial(
            self._receiver.dead_letter_message,
            delivery.raw,
            reason=reason,
            error_description=description,
        )
        await self._run("dead-lettering", dead_letter)

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


class _AzureDeadLetters(_AzureSession):
    """A receiver on a dead-letter sub-queue: no session; each message has its own lock,
    and the earliest of them stands for the receiver's."""

    _locked_until = _UNKNOWN_LOCK_EXPIRY

    def _session_id(self) -> str:
        return ""

    @property
    def locked_until(self) -> datetime:
        return self._locked_until

    async def receive(self, max_messages: int, max_wait: float) -> list[Delivery]:
        got = await super().receive(max_messages, max_wait)
        locks = [d.raw.locked_until_utc for d in got if d.raw.locked_until_utc is not None]
        if locks:
            self._locked_until = min(locks)
        return got

    async def renew_lock(self) -> datetime:
        raise MessageLockLostError("dead letters are settled at once, not renewed")
