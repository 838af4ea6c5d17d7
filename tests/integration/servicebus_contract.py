"""Service Bus buses for tests: a real one from the environment, and an in-memory fake.

`servicebus_bus_from_env()` gives a `ServiceBusBus` on a real namespace when
`SAGAFLOW_TEST_SERVICEBUS` holds a connection string (else None), so the shared bus
contract suite (`test_bus_contract.py`) can run against Azure; its queues must exist
(`create_test_topology` makes them).

`FakeServiceBus` is a namespace in memory behind the adapter's narrow `SessionClient`
interface, kept faithful to the broker where the adapter relies on it: a session is
locked to one receiver until it is closed or its lock expires (read from an injected
clock); a receive locks the session's available messages in send order and counts the
delivery; an abandoned or unlocked message is delivered again, and one delivered
`max_delivery_count` times goes to the dead-letter subqueue instead; scheduled messages
stay invisible until due; message ids are deduplicated per queue. It lives here, not in
a test module, so the contract suite can run the adapter over it too, with no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Unpack

from sagaflow.adapters.servicebus import (
    BusOptions,
    Delivery,
    ServiceBusBus,
    WireMessage,
    create_topology,
)
from sagaflow.core.ports import Clock, DeadLetter, MessageLockLostError, dead_letter_queue

ENV = "SAGAFLOW_TEST_SERVICEBUS"


def servicebus_bus_from_env(**options: Unpack[BusOptions]) -> ServiceBusBus | None:
    """A new adapter on the namespace in `SAGAFLOW_TEST_SERVICEBUS`, or None if unset."""
    connection_string = os.environ.get(ENV)
    if not connection_string:
        return None
    return ServiceBusBus.from_connection_string(connection_string, **options)


async def create_test_topology(
    queues: Iterable[str], *, lock_duration: float, max_delivery_count: int
) -> None:
    """Create (or align) the session-enabled queues the contract suite uses."""
    from azure.servicebus.aio.management import ServiceBusAdministrationClient

    connection_string = os.environ.get(ENV)
    if not connection_string:
        raise RuntimeError(f"{ENV} is not set")
    async with ServiceBusAdministrationClient.from_connection_string(connection_string) as admin:
        await create_topology(
            admin, queues, lock_duration=lock_duration, max_delivery_count=max_delivery_count
        )


class _EveryQueue(Collection[str]):
    """Every queue name: the fake's queues all have sessions."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def fake_servicebus_bus(namespace: FakeServiceBus, **options: Unpack[BusOptions]) -> ServiceBusBus:
    """A new adapter (with a client of its own) on the fake namespace, on its clock."""
    options.setdefault("clock", namespace.clock)
    options.setdefault("session_queues", _EveryQueue())
    return ServiceBusBus(namespace.client(), **options)


@dataclass(eq=False)
class _Message:
    seq: int
    queue: str
    wire: WireMessage
    enqueued_at: datetime
    delivery_count: int = 0
    holder: FakeSession | None = None  # the session that last locked it
    lock_token: str | None = None


class FakeServiceBus:
    """The broker side: queues, session locks, dead letters, and a log of operations."""

    def __init__(
        self,
        clock: Clock,
        *,
        lock_duration: float = 30.0,
        max_delivery_count: int = 10,
        wait: bool = False,
    ) -> None:
        self.clock = clock
        self.lock_duration = timedelta(seconds=lock_duration)
        self.max_delivery_count = max_delivery_count
        # Whether an accept with nothing available waits (real time) for a change, as the
        # broker does; tests that must not wait leave it off and get None at once.
        self.wait = wait
        self.sent: list[tuple[str, WireMessage]] = []  # accepted for delivery, in order
        self.log: list[tuple[str, str]] = []  # (operation, message id or session id)
        self.accept_waits: list[float] = []
        self.double_settlements = 0
        self.clients: list[FakeClient] = []
        self._messages: list[_Message] = []
        self._dead: dict[str, list[DeadLetter]] = defaultdict(list)
        # id of a dead letter a receiver holds -> (lock token, locked until)
        self.locked_dead: dict[int, tuple[str, datetime]] = {}
        self._seen: dict[str, set[str]] = defaultdict(set)
        self._owners: dict[tuple[str, str], FakeSession] = {}
        self._faults: dict[str, list[BaseException | None]] = defaultdict(list)
        self._changed = asyncio.Event()
        self.waiting = asyncio.Event()  # set once an accept waits for a change
        self._seq = 0

    def client(self) -> FakeClient:
        client = FakeClient(self)
        self.clients.append(client)
        return client

    def fail(self, operation: str, *errors: BaseException | None) -> None:
        """Script the next calls of `operation` (send, accept, receive, complete, abandon,
        dead_letter, renew, close, peek): each raises its error, or succeeds for None."""
        self._faults[operation].extend(errors)

    def fault(self, operation: str) -> None:
        if self._faults[operation] and (error := self._faults[operation].pop(0)) is not None:
            raise error

    def remove(self, m: _Message, operation: str) -> None:
        self._messages.remove(m)
        self.log.append((operation, m.wire.message_id))

    def pending(self, queue: str) -> list[str]:
        """Ids of the messages still in `queue` (not settled, not dead-lettered)."""
        return [m.wire.message_id for m in self._messages if m.queue == queue]

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def send(self, queue: str, messages: Sequence[WireMessage]) -> None:
        self.fault("send")
        for wire in messages:
            if wire.message_id in self._seen[queue]:
                continue  # duplicate detection, on in the topology sagaflow creates
            self._seen[queue].add(wire.message_id)
            self._seq += 1
            self._messages.append(_Message(self._seq, queue, wire, self.clock()))
            self.sent.append((queue, wire))
            self.log.append(("send", wire.message_id))
        self.notify()

    def _available(self, m: _Message) -> bool:
        due = m.wire.scheduled_enqueue_time_utc
        locked = m.holder is not None and m.lock_token is not None and m.holder.valid()
        return not locked and (due is None or due <= self.clock())

    def _session_free(self, queue: str, session_id: str) -> bool:
        owner = self._owners.get((queue, session_id))
        return owner is None or not owner.valid()

    def available(self, queue: str, session_id: str | None = None) -> list[_Message]:
        """Deliverable messages in send order; those delivered too often are buried."""
        found = []
        for m in list(self._messages):
            if m.queue != queue or (session_id is not None and m.wire.session_id != session_id):
                continue
            if not self._available(m):
                continue
            if m.delivery_count >= self.max_delivery_count:
                description = f"delivered {m.delivery_count} times, the maximum"
                self.bury(m, "MaxDeliveryCountExceeded", description)
                continue
            found.append(m)
        return found

    def bury(self, m: _Message, reason: str, description: str) -> None:
        self.remove(m, "bury")
        dead = DeadLetter(
            m.queue,
            m.wire.message_id,
            m.wire.session_id,
            m.wire.body,
            reason,
            description,
            m.delivery_count,
            self.clock(),
        )
        self._dead[m.queue].append(dead)

    async def accept(self, client: FakeClient, queue: str, max_wait: float) -> FakeSession | None:
        self.accept_waits.append(max_wait)
        self.fault("accept")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        while True:
            for m in self.available(queue):
                if self._session_free(queue, m.wire.session_id):
                    session = FakeSession(self, client, queue, m.wire.session_id)
                    self._owners[(queue, m.wire.session_id)] = session
                    return session
            remaining = deadline - loop.time()
            if not self.wait or remaining <= 0:
                return None
            self.waiting.set()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return None

    def dead_letters(self, queue: str) -> list[DeadLetter]:
        self.fault("peek")
        return list(self._dead[queue])

    def forget_dead(self, queue: str, letter: DeadLetter) -> None:
        self._dead[queue].remove(letter)
        self.log.append(("complete dead letter", letter.message_id))

    def locked_by(self, session: FakeSession, token: str) -> _Message:
        session.check()
        for m in self._messages:
            if m.holder is session and m.lock_token == token:
                return m
        self.double_settlements += 1  # settled before (or never ours): a bug in the caller
        raise MessageLockLostError(f"lock {token} is not held")


class FakeClient:
    """One process's connection: implements `SessionClient`."""

    def __init__(self, namespace: FakeServiceBus) -> None:
        self.namespace = namespace
        self.sessions: list[FakeSession] = []
        self.dead_letter_receivers: list[FakeDeadLetters] = []
        self.closed = False

    async def send(self, queue: str, messages: Sequence[WireMessage]) -> None:
        self.namespace.send(queue, messages)

    async def open_sender(self, queue: str) -> None:
        self.namespace.fault("open")

    async def accept_next_session(self, queue: str, *, max_wait: float) -> FakeSession | None:
        session = await self.namespace.accept(self, queue, max_wait)
        if session is not None:
            self.sessions.append(session)
        return session

    async def peek_dead_letters(self, queue: str) -> list[DeadLetter]:
        return self.namespace.dead_letters(queue)

    async def open_queue(self, queue: str, *, dead_letters: bool = False) -> FakeDeadLetters:
        if not dead_letters:
            raise NotImplementedError("the fake's queues all have sessions")
        receiver = FakeDeadLetters(self.namespace, queue)
        self.dead_letter_receivers.append(receiver)
        return receiver

    async def close(self) -> None:
        self.closed = True
        for session in self.sessions:
            if not session.closed:  # as the SDK client closes only the links still open
                await session.close()
        for receiver in self.dead_letter_receivers:
            await receiver.close()


class FakeSession:
    """An accepted session: implements `SessionReceiver`."""

    def __init__(self, namespace: FakeServiceBus, client: FakeClient, queue: str, sid: str) -> None:
        self.namespace = namespace
        self.client = client
        self.queue = queue
        self.session_id = sid
        self.locked_until = namespace.clock() + namespace.lock_duration
        self.closed = False
        self.close_calls = 0

    def valid(self) -> bool:
        return not self.closed and self.locked_until > self.namespace.clock()

    def check(self) -> None:
        if not self.valid():
            raise MessageLockLostError(f"session {self.session_id!r} lock lost")

    async def receive(self, max_messages: int, max_wait: float) -> list[Delivery]:
        self.check()
        self.namespace.fault("receive")
        got = []
        for m in self.namespace.available(self.queue, self.session_id)[:max_messages]:
            m.delivery_count += 1
            m.holder, m.lock_token = self, str(uuid.uuid4())
            wire = m.wire
            got.append(
                Delivery(
                    wire.message_id,
                    wire.session_id,
                    wire.body,
                    m.delivery_count,
                    m.enqueued_at,
                    m.lock_token,
                    raw=m,
                    headers=wire.headers,
                )
            )
        return got

    async def complete(self, delivery: Delivery) -> None:
        m = self.namespace.locked_by(self, delivery.lock_token)
        self.namespace.fault("complete")
        self.namespace.remove(m, "complete")

    async def abandon(self, delivery: Delivery) -> None:
        m = self.namespace.locked_by(self, delivery.lock_token)
        self.namespace.fault("abandon")
        m.holder = m.lock_token = None
        self.namespace.log.append(("abandon", m.wire.message_id))

    async def dead_letter(self, delivery: Delivery, *, reason: str, description: str) -> None:
        m = self.namespace.locked_by(self, delivery.lock_token)
        self.namespace.fault("dead_letter")
        self.namespace.bury(m, reason, description)

    async def renew_lock(self) -> datetime:
        self.check()
        self.namespace.fault("renew")
        self.locked_until = self.namespace.clock() + self.namespace.lock_duration
        self.namespace.log.append(("renew", self.session_id))
        return self.locked_until

    async def close(self) -> None:
        self.close_calls += 1
        self.namespace.fault("close")
        if not self.closed:
            self.closed = True
            self.namespace.log.append(("close", self.session_id))
            self.namespace.notify()


class FakeDeadLetters:
    """A receiver on a dead-letter sub-queue: peek-lock, a lock per message (`QueueLink`)."""

    def __init__(self, namespace: FakeServiceBus, queue: str) -> None:
        self.namespace = namespace
        self.source = queue
        self.queue = dead_letter_queue(queue)
        self.closed = False
        self._held: dict[str, DeadLetter] = {}

    async def open(self) -> None:
        self.namespace.fault("open")

    async def receive(self, max_messages: int, max_wait: float) -> list[Delivery]:
        self.namespace.fault("receive")
        now = self.namespace.clock()
        got = []
        for letter in self.namespace.dead_letters(self.source):
            if len(got) == max_messages:
                break
            lock = self.namespace.locked_dead.get(id(letter))
            if lock is not None and lock[1] > now:
                continue
            token = str(uuid.uuid4())
            self._held[token] = letter
            self.namespace.locked_dead[id(letter)] = (token, now + self.namespace.lock_duration)
            got.append(
                Delivery(
                    letter.message_id,
                    letter.session_id,
                    letter.body,
                    letter.delivery_count,
                    letter.dead_lettered_at,
                    token,
                    raw=letter,
                    dead_letter_reason=letter.reason,
                    dead_letter_description=letter.description,
                    locked_until=now + self.namespace.lock_duration,
                )
            )
        return got

    def _release(self, token: str) -> DeadLetter:
        letter = self._held.pop(token, None)
        lock = None if letter is None else self.namespace.locked_dead.get(id(letter))
        if letter is None or lock is None or lock[0] != token or self.closed:
            raise MessageLockLostError(f"lock {token} is not held")
        del self.namespace.locked_dead[id(letter)]
        if lock[1] <= self.namespace.clock():
            raise MessageLockLostError(f"lock {token} expired")
        return letter

    async def complete(self, delivery: Delivery) -> None:
        letter = self._release(delivery.lock_token)
        self.namespace.forget_dead(self.source, letter)

    async def abandon(self, delivery: Delivery) -> None:
        self._release(delivery.lock_token)

    async def dead_letter(self, delivery: Delivery, *, reason: str, description: str) -> None:
        raise MessageLockLostError("a dead letter cannot be dead-lettered again")

    async def renew_lock(self, delivery: Delivery) -> datetime:
        raise MessageLockLostError("dead letters are settled at once, not renewed")

    async def close(self) -> None:
        for token in list(self._held):
            with contextlib.suppress(MessageLockLostError):
                self._release(token)
        self.closed = True
