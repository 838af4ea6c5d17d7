"""`SessionClient` over `azure.servicebus.aio`: the SDK client, its senders and links.

It keeps one sender link per queue and one long-lived receiver link per plain queue
(and per dead-letter subqueue, `links.AzureQueue`) for the life of the client, and
opens a receiver per accepted session (`links.AzureSession`), closed when the session
is released. Every SDK call goes through the one retry layer (`client.Retrying`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusReceivedMessage, ServiceBusSubQueue
from azure.servicebus import exceptions as sdk_errors
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender

from sagaflow.adapters.servicebus.client import Retrying, RetryPolicy, WireMessage, gather_all
from sagaflow.adapters.servicebus.conversions import (
    dead_letter_from_sdk,
    fill_batch,
    to_sdk_message,
)
from sagaflow.adapters.servicebus.links import MIN_WAIT, AzureQueue, AzureSession, close_quietly
from sagaflow.core.ports import DeadLetter, dead_letter_queue

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

log = logging.getLogger(__name__)

# How long one pass of the SDK's connection loop waits for a frame (its default is
# 0.2 s). A receive can only end between passes, so this is its granularity: at the
# default, gathering "what else is ready" after a first message costs 0.2 s a hop.
_SOCKET_TIMEOUT = 0.01
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
        self._sending: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._links: dict[str, AzureQueue] = {}  # by queue (or dead-letter subqueue) name
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
        # One send at a time per sender: the SDK numbers a transfer before it waits for
        # the socket, so two at once can go out of order, and the broker ends the
        # connection for it (a sequencing error on the delivery id).
        async with self._sending[queue]:
            # Batch by batch, each retried alone: a retry never resends a batch that went.
            while pending:
                batch = await self._call(
                    f"opening a batch for {queue!r}", sender.create_message_batch
                )
                taken = fill_batch(batch, pending, queue)
                send = functools.partial(sender.send_messages, batch)
                await self._call(f"sending {taken} message(s) to {queue!r}", send)
                pending = pending[taken:]

    async def accept_next_session(self, queue: str, *, max_wait: float) -> AzureSession | None:
        open_next = functools.partial(self._open_next_session, queue, max(max_wait, MIN_WAIT))
        receiver = await self._call(f"accepting a session of {queue!r}", open_next)
        return None if receiver is None else AzureSession(self._call, receiver, self._discard)

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

    async def open_queue(self, queue: str, *, dead_letters: bool = False) -> AzureQueue:
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

            link = self._links[name] = AzureQueue(name, self._call, make)
        return link

    async def peek_dead_letters(self, queue: str) -> list[DeadLetter]:
        link = await self.open_queue(queue, dead_letters=True)
        receiver = await link.receiver()
        found: list[DeadLetter] = []
        sequence = 1
        while True:

            async def peek(at: int = sequence) -> list[ServiceBusReceivedMessage]:
                async with link.management:
                    return await receiver.peek_messages(self._peek_batch, sequence_number=at)

            page = await self._call(f"peeking the dead letters of {queue!r}", peek)
            if not page:
                return found
            found.extend(dead_letter_from_sdk(queue, m) for m in page)
            sequence = max(m.sequence_number or 0 for m in page) + 1

    async def _discard(self, receiver: ServiceBusReceiver) -> None:
        self._receivers.discard(receiver)
        await close_quietly(receiver)

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
                *(close_quietly(sender) for sender in senders),
                *(close_quietly(receiver) for receiver in receivers),
            ]
        )
        await self._sdk.close()
        if self._credential is not None:
            await self._credential.close()
