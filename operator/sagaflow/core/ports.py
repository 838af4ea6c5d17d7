"""Ports: what the orchestrator and the runners need from the outside world.

Named for the need, not the technology. Adapters (`sagaflow.adapters.*`) implement
them: the Postgres bus as the embedded default, Azure Service Bus in production.
The bus contract is Service Bus's: named queues, sessions (one execution's messages
are handled in order by one receiver at a time), peek-lock with lock expiry and
redelivery, a delivery count with dead-lettering past a maximum, and scheduled
delivery. Message ids are deterministic so every hop can deduplicate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable


def utc_now() -> datetime:
    return datetime.now(UTC)


Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    queue: str
    message_id: str
    session_id: str
    body: bytes
    scheduled_at: datetime | None = None
    # Application properties (Service Bus's name): the W3C `traceparent`, for one. Not
    # hashed, so a message stays hashable with a dict here.
    headers: Mapping[str, str] | None = field(default=None, hash=False)


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    queue: str
    message_id: str
    session_id: str
    body: bytes
    delivery_count: int
    enqueued_at: datetime
    locked_until: datetime
    lock_token: str
    # Adapter-private handle (a row sequence for Postgres, the SDK message for Service Bus).
    handle: Any = None
    # Deliveries that ended with the receiving process's death, where the bus can tell
    # (the Postgres bus; 0 elsewhere). From SUSPECT_AFTER_CRASHES on, the message is a
    # suspect: the runner host runs it with nothing else, so a crash it causes is
    # pinned on it alone.
    crash_count: int = 0
    headers: Mapping[str, str] | None = field(default=None, hash=False)  # as sent


@dataclass(frozen=True, slots=True)
class DeadLetter:
    queue: str
    message_id: str
    session_id: str
    body: bytes
    reason: str
    description: str
    delivery_count: int
    dead_lettered_at: datetime


# One death of a receiver holding a message is bad luck as often as not (a kill -9, an
# OOM kill of a busy process): the message just goes again, beside others. Held at a
# second death, it is a suspect (the Postgres bus's `bus_receive` and `bus_reap`
# apply the same number).
SUSPECT_AFTER_CRASHES = 2

DEAD_LETTER_SUFFIX = "/$DeadLetterQueue"


def dead_letter_queue(queue: str) -> str:
    """The dead-letter sub-queue of `queue`, named as Service Bus names it."""
    return queue + DEAD_LETTER_SUFFIX


@dataclass(frozen=True, slots=True)
class ReceivedDeadLetter:
    """A dead letter taken for handling: `message` settles it (`complete` removes it
    from the dead-letter queue), `letter` says why it was dead-lettered."""

    letter: DeadLetter
    message: ReceivedMessage


class MessageLockLostError(Exception):
    """Settling a message whose lock expired or was taken by another receiver."""


class BusSetupError(Exception):
    """The bus cannot serve a queue a process needs (it does not exist, or access is
    denied): found when the process starts, not by a message that never arrives."""


@runtime_checkable
class Bus(Protocol):
    async def prepare(self, *, send: Sequence[str] = (), receive: Sequence[str] = ()) -> None:
        """Open what sending to `send` and receiving from `receive` needs, at once and
        ahead of the first message; BusSetupError, naming the queue, if one cannot be
        served. A bus that needs nothing opened does nothing."""
        ...

    async def send(self, messages: Sequence[OutgoingMessage]) -> None: ...

    async def receive(
        self, queue: str, *, max_messages: int = 100, max_wait: float = 5.0
    ) -> list[ReceivedMessage]:
        """Lock and return up to `max_messages`; wait up to `max_wait` s for the first."""
        ...

    async def complete(self, messages: Sequence[ReceivedMessage]) -> None: ...

    async def reply(
        self, completed: Sequence[ReceivedMessage], messages: Sequence[OutgoingMessage]
    ) -> None:
        """Send `messages` and complete `completed`: atomically where the bus can (the
        Postgres bus), else send first and complete after. Either way a crash in between
        redelivers the received message, and the repeated reply is dropped by its id.
        Raises MessageLockLostError, having completed nothing, if a lock was lost."""
        ...

    async def abandon(self, messages: Sequence[ReceivedMessage]) -> None: ...

    async def dead_letter(
        self, message: ReceivedMessage, *, reason: str, description: str
    ) -> None: ...

    async def renew_lock(self, messages: Sequence[ReceivedMessage]) -> None: ...

    async def dead_letters(self, queue: str) -> list[DeadLetter]: ...

    async def receive_dead_letters(
        self, queue: str, *, max_messages: int = 100
    ) -> list[ReceivedDeadLetter]:
        """Lock and return dead letters of `queue` waiting to be handled (no waiting);
        `complete` their messages once handled."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class TransactionalBus(Bus, Protocol):
    """A bus that lives in the state database, so sends and settlements can join the
    caller's transaction: the state change, the commands it causes and the consumed
    events commit together, and no outbox relay hop is needed."""

    async def send_in(self, conn: Any, messages: Sequence[OutgoingMessage]) -> None: ...

    async def complete_in(self, conn: Any, messages: Sequence[ReceivedMessage]) -> None: ...


@dataclass(frozen=True, slots=True)
class PayloadRef:
    """Where a large payload lives, how big it is and what its content hashes to."""

    uri: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "size": self.size, "sha256": self.sha256}


class PayloadError(Exception):
    """Base of the claim-check errors: the payload behind a reference is not usable."""


class PayloadMissingError(PayloadError):
    """The blob or file a reference points to does not exist."""


class PayloadIntegrityError(PayloadError):
    """The stored bytes do not match the reference's size or SHA-256."""


@runtime_checkable
class PayloadStore(Protocol):
    """Stores bytes under a key and returns a reference; resolves references to bytes."""

    async def put(self, key: str, data: bytes) -> PayloadRef: ...

    async def get(self, ref: PayloadRef) -> bytes:
        """The bytes behind `ref`; PayloadMissingError / PayloadIntegrityError otherwise."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every payload whose key starts with `prefix`; return how many."""
        ...

    async def close(self) -> None: ...
