"""The SDK receivers the Service Bus client hands out: a kept link on a plain queue (or
dead-letter subqueue, `AzureQueue`) and an accepted session (`AzureSession`).

Each translates SDK errors through the one retry layer (`client.Retrying`) and turns a
receiver the SDK has shut down under a fault into lost locks, so that no settlement is
sent through a link that no longer holds the message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from azure.servicebus import exceptions as sdk_errors
from azure.servicebus.aio import ServiceBusReceiver, ServiceBusSender

from sagaflow.adapters.servicebus.client import (
    UNKNOWN_LOCK_EXPIRY,
    Delivery,
    Retrying,
    ServiceBusTransientError,
    translate_error,
)
from sagaflow.adapters.servicebus.conversions import delivery_from_sdk
from sagaflow.core.ports import MessageLockLostError

log = logging.getLogger(__name__)

T = TypeVar("T")

# The SDK refuses a wait of 0; the broker answers within this when something is ready,
# so it is the shortest useful "is anything there now?".
MIN_WAIT = 0.01
# `link_gone`'s stand-in for an SDK receiver attribute that does not exist.
_STILL_OPEN = object()


async def close_quietly(handler: ServiceBusReceiver | ServiceBusSender) -> None:
    try:
        await handler.close()
    except Exception as exc:  # closing a link the broker already dropped
        log.debug("closing a Service Bus link failed: %s", exc)


class AzureSession:
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
        return self._receiver.session.locked_until_utc or UNKNOWN_LOCK_EXPIRY

    async def receive(self, max_messages: int, max_wait: float) -> list[Delivery]:
        receive = functools.partial(
            self._receiver.receive_messages,
            max_message_count=max_messages,
            max_wait_time=max(max_wait, MIN_WAIT),
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
            "dead-lettering", dead_letter_call(self._receiver, delivery, reason, description)
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


def dead_letter_call(
    receiver: ServiceBusReceiver, delivery: Delivery, reason: str, description: str
) -> Callable[[], Awaitable[None]]:
    return functools.partial(
        receiver.dead_letter_message, delivery.raw, reason=reason, error_description=description
    )


class AzureQueue:
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
        # One request-response operation at a time (lock renewals, peeks): the SDK
        # numbers a transfer before it waits for the socket, so two at once on one link
        # can go out of order, and the broker ends the connection for it (a sequencing
        # error on the delivery id).
        self.management = asyncio.Lock()
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
                    await close_quietly(receiver)
                    raise
                self._receiver = receiver
            return self._receiver

    async def receive(self, max_messages: int, max_wait: float) -> list[Delivery]:
        async def attempt() -> list[Delivery]:
            receiver = await self._open()  # a fresh one after a fault: retried with it
            if link_gone(receiver):  # shut by the SDK on a fault another call met
                await self._reset(receiver)
                receiver = await self._open()
            got = await self._guarded(
                receiver,
                receiver.receive_messages(
                    max_message_count=max_messages, max_wait_time=max(max_wait, MIN_WAIT)
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
            lambda r: dead_letter_call(r, delivery, reason, description)(),
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
        async def renew(receiver: ServiceBusReceiver) -> datetime:
            async with self.management:
                return await receiver.renew_message_lock(delivery.raw)

        return await self._on_owner(delivery, "renewing the lock", renew)

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
            if link_gone(receiver):
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
                gone = receiver is not self._receiver or link_gone(receiver)
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
                await close_quietly(receiver)

    async def _reset(self, receiver: ServiceBusReceiver) -> None:
        """Stop using `receiver`; close it once no call is under way on it (closing it
        beneath settlements still in flight makes the SDK log tracebacks for each)."""
        if self._receiver is receiver:
            self._receiver = None
            self._tokens.clear()
            if receiver in self._in_flight:
                self._retired.add(receiver)
            else:
                await close_quietly(receiver)

    async def close(self) -> None:
        retired, self._retired = list(self._retired), set()
        for receiver in retired:
            await close_quietly(receiver)
        if self._receiver is not None:
            receiver, self._receiver = self._receiver, None
            self._tokens.clear()
            await close_quietly(receiver)


def link_gone(receiver: ServiceBusReceiver) -> bool:
    """Whether the SDK has shut the receiver's AMQP handler down after a fault (it then
    reopens a new one on the next receive, on which earlier locks are not held). This
    reads the SDK receiver's private state; attributes a newer SDK lacks read as "still
    open", so the broker is asked as before."""
    if not getattr(receiver, "_running", True):
        return True
    handler = getattr(receiver, "_handler", _STILL_OPEN)
    return handler is None or getattr(handler, "_shutdown", False) is True
