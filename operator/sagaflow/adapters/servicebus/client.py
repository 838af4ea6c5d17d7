"""The narrow client the Service Bus bus is written against, and the SDK's errors.

`SessionClient` names exactly what `bus.py` and its receivers use (send a batch, accept
the next session of a session queue, open a long-lived link on a plain queue or a
dead-letter subqueue, peek dead letters), so the adapter is tested against an in-memory
fake as well as over the real SDK; `azure_client.py` implements it and no SDK type
leaves that module. SDK exceptions are translated here, the SDK error kept as
`__cause__`: a lost session or message lock becomes the port's `MessageLockLostError`,
an oversized message `MessageTooLargeError`, a transient fault is retried with
exponential backoff a bounded number of times and then raised as
`ServiceBusTransientError`, any other Azure error `ServiceBusAdapterError`. The SDK's own
retries are off (`retry_total=0`): one retry layer, whose count and delays are ours.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, cast

from azure.core.exceptions import AzureError
from azure.servicebus import exceptions as sdk_errors

from sagaflow.core.ports import DeadLetter, MessageLockLostError

log = logging.getLogger(__name__)

# A lock whose expiry the SDK did not report: the broker judges when it is settled.
UNKNOWN_LOCK_EXPIRY = datetime.max.replace(tzinfo=UTC)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WireMessage:
    """A message as sent: what the adapter asks the client to put on a queue."""

    message_id: str
    session_id: str
    body: bytes
    content_type: str
    scheduled_enqueue_time_utc: datetime | None = None
    # Sent as the message's application properties (the W3C `traceparent`, for one).
    headers: Mapping[str, str] | None = field(default=None, hash=False)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A received message: locked by its own lock on a plain queue, by its session's
    lock in a session."""

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
    # The message's own lock (plain queues); None in a session, whose lock covers it.
    locked_until: datetime | None = None
    # Its application properties with string values, as the sender set them.
    headers: Mapping[str, str] | None = field(default=None, compare=False)


class ServiceBusAdapterError(Exception):
    """A Service Bus operation failed for a reason retrying will not fix (auth, a
    missing queue, quota, ...); the SDK error is the `__cause__`."""


class ServiceBusTransientError(ServiceBusAdapterError):
    """A transient fault (connection, busy server, timeout) outlasted the retries."""


class MessageTooLargeError(ServiceBusAdapterError, ValueError):
    """A message does not fit the entity's size limit; large payloads go by claim check."""


class TopologyError(ServiceBusAdapterError):
    """An existing queue cannot serve sagaflow (sessions are off and cannot be turned on)."""


class Settler(Protocol):
    """What settles a delivery: the session or queue link it was received on."""

    async def complete(self, delivery: Delivery) -> None: ...

    async def abandon(self, delivery: Delivery) -> None: ...

    async def dead_letter(self, delivery: Delivery, *, reason: str, description: str) -> None: ...


Settlement = Callable[[Settler, Delivery], Awaitable[None]]


class SessionReceiver(Settler, Protocol):
    """One accepted session: locked to this receiver until closed or the lock expires.
    Operations raise `MessageLockLostError` once the session lock is lost."""

    @property
    def session_id(self) -> str: ...

    @property
    def locked_until(self) -> datetime: ...

    async def receive(self, max_messages: int, max_wait: float) -> list[Delivery]: ...

    async def renew_lock(self) -> datetime:
        """Extend the session lock (which covers its messages); return the new expiry."""
        ...

    async def close(self) -> None:
        """Release the session: its unsettled messages become receivable again."""
        ...


class QueueLink(Settler, Protocol):
    """A long-lived peek-lock receiver on a queue without sessions, or on a dead-letter
    subqueue: every message has a lock of its own. Kept open and reused by every receive,
    so a receive costs no link or connection of its own."""

    @property
    def queue(self) -> str: ...

    async def open(self) -> None:
        """Open the link now (it opens on first use otherwise)."""
        ...

    async def receive(self, max_messages: int, max_wait: float) -> list[Delivery]:
        """Lock up to `max_messages`; wait up to `max_wait` s for them (returns as soon as
        `max_messages` came, else when the wait ends)."""
        ...

    async def renew_lock(self, delivery: Delivery) -> datetime:
        """Extend this message's lock; return the new expiry."""
        ...


class SessionClient(Protocol):
    """What the Service Bus bus needs from a Service Bus namespace."""

    async def send(self, queue: str, messages: Sequence[WireMessage]) -> None: ...

    async def open_sender(self, queue: str) -> None:
        """Open the link `send` uses for `queue` now (it opens on first send otherwise)."""
        ...

    async def accept_next_session(self, queue: str, *, max_wait: float) -> SessionReceiver | None:
        """Lock the next session with available messages; None if none within `max_wait` s."""
        ...

    async def open_queue(self, queue: str, *, dead_letters: bool = False) -> QueueLink:
        """The link on `queue` (or its dead-letter subqueue), opened once and kept."""
        ...

    async def peek_dead_letters(self, queue: str) -> list[DeadLetter]: ...

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


class Retrying:
    """The one retry layer: transient faults retried per `RetryPolicy`, errors translated."""

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


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await all, let every one finish, then raise the first failure if any."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast("list[T]", results)
