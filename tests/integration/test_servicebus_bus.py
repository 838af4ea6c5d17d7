"""The Service Bus adapter without a network.

`ServiceBusBus` runs over `FakeServiceBus` (an in-memory namespace behind the narrow
`SessionClient` interface, in `servicebus_contract.py`): mapping both ways, sessions
held until all their messages are settled, lock loss, redelivery, dead letters, size
limits, faults, close. The real client (`AzureSessionClient`) is tested over stand-ins
for the SDK's objects fed real SDK exceptions and messages: error translation, retries,
message mapping, batching, the topology helper.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError
from azure.servicebus import (
    ServiceBusMessageBatch,
    ServiceBusReceivedMessage,
    ServiceBusSubQueue,
)
from azure.servicebus import exceptions as sb_errors
from azure.servicebus._pyamqp.message import Header, Message, Properties
from pg import FakeClock
from servicebus_contract import FakeServiceBus, fake_servicebus_bus

from sagaflow.adapters.servicebus import (
    AzureSessionClient,
    MessageTooLargeError,
    RetryPolicy,
    ServiceBusAdapterError,
    ServiceBusBus,
    ServiceBusTransientError,
    TopologyError,
    create_topology,
    topology_queues,
)
from sagaflow.adapters.servicebus.client import translate_error
from sagaflow.core.ports import (
    Bus,
    MessageLockLostError,
    OutgoingMessage,
    ReceivedMessage,
    TransactionalBus,
)

pytestmark = pytest.mark.timeout(30)

Q = "steps.test"
LOCK = 30.0
START = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def ns(clock: FakeClock) -> FakeServiceBus:
    return FakeServiceBus(clock, lock_duration=LOCK, max_delivery_count=3)


@pytest.fixture
async def bus(ns: FakeServiceBus) -> AsyncIterator[ServiceBusBus]:
    bus = fake_servicebus_bus(ns, min_wait=0.25)
    yield bus
    await bus.close()


@pytest.fixture
async def other(ns: FakeServiceBus) -> AsyncIterator[ServiceBusBus]:
    """A second process on the same namespace."""
    bus = fake_servicebus_bus(ns)
    yield bus
    await bus.close()


def out(
    session: str, message_id: str, *, queue: str = Q, at: datetime | None = None
) -> OutgoingMessage:
    return OutgoingMessage(queue, message_id, session, message_id.encode(), scheduled_at=at)


def ids(messages: Sequence[ReceivedMessage]) -> list[str]:
    return [m.message_id for m in messages]


def ops(ns: FakeServiceBus, operation: str) -> list[str]:
    return [subject for op, subject in ns.log if op == operation]


# -- mapping --------------------------------------------------------------------------


async def test_is_a_bus_that_cannot_join_transactions(bus: ServiceBusBus) -> None:
    assert isinstance(bus, Bus)
    assert not isinstance(bus, TransactionalBus)


async def test_outgoing_messages_map_to_wire_messages(
    bus: ServiceBusBus, ns: FakeServiceBus
) -> None:
    due = START + timedelta(minutes=5)
    await bus.send(
        [out("e1/a", "m1"), out("e1", "r1", queue="sagaflow.events"), out("e1/a", "m2", at=due)]
    )
    by_queue = {(queue, w.message_id): w for queue, w in ns.sent}
    assert sorted(by_queue) == [("sagaflow.events", "r1"), (Q, "m1"), (Q, "m2")]
    m2 = by_queue[(Q, "m2")]
    assert (m2.session_id, m2.body, m2.content_type) == ("e1/a", b"m2", "application/json")
    assert m2.scheduled_enqueue_time_utc == due
    assert by_queue[(Q, "m1")].scheduled_enqueue_time_utc is None
    assert [w.message_id for q, w in ns.sent if q == Q] == ["m1", "m2"]  # order kept per queue


async def test_received_messages_map_from_deliveries(bus: ServiceBusBus, clock: FakeClock) -> None:
    await bus.send([out("e1/a", "m1")])
    clock.advance(2)
    [got] = await bus.receive(Q, max_wait=0)
    assert (got.queue, got.message_id, got.session_id, got.body) == (Q, "m1", "e1/a", b"m1")
    assert got.delivery_count == 1
    assert got.enqueued_at == START
    assert got.locked_until == START + timedelta(seconds=2 + LOCK)
    assert uuid.UUID(got.lock_token)


async def test_a_scheduled_message_is_invisible_until_due(
    bus: ServiceBusBus, clock: FakeClock
) -> None:
    await bus.send([out("s", "later", at=START + timedelta(seconds=60))])
    assert await bus.receive(Q, max_wait=0) == []
    clock.advance(61)
    assert ids(await bus.receive(Q, max_wait=0)) == ["later"]


# -- sessions -------------------------------------------------------------------------


async def test_a_session_is_held_until_all_its_messages_are_settled(
    bus: ServiceBusBus, other: ServiceBusBus, ns: FakeServiceBus
) -> None:
    await bus.send([out("s1", "a1"), out("s1", "a2")])
    a1, a2 = await bus.receive(Q, max_wait=0)
    await bus.send([out("s1", "a3")])
    assert await other.receive(Q, max_wait=0) == []
    await bus.complete([a1])
    assert await other.receive(Q, max_wait=0) == []
    assert ops(ns, "close") == []
    await bus.complete([a2])
    assert ops(ns, "close") == ["s1"]  # released once nothing received from it is unsettled
    assert ids(await other.receive(Q, max_wait=0)) == ["a3"]


async def test_a_receive_gathers_sessions_up_to_max_messages(
    bus: ServiceBusBus, ns: FakeServiceBus
) -> None:
    await bus.send([out(f"s{i}", f"m{i}") for i in range(5)])
    assert ids(await bus.receive(Q, max_messages=2, max_wait=3)) == ["m0", "m1"]
    # The first session is waited for; further ones are only asked for briefly.
    assert ns.accept_waits == [3, 0.25]
    assert sorted(ids(await bus.receive(Q, max_messages=10, max_wait=0))) == ["m2", "m3", "m4"]


async def test_a_receive_takes_no_more_than_max_messages_from_a_session(bus: ServiceBusBus) -> None:
    await bus.send([out("s", f"m{i}") for i in range(5)])
    got = await bus.receive(Q, max_messages=3, max_wait=0)
    assert ids(got) == ["m0", "m1", "m2"]
    await bus.complete(got)
    assert ids(await bus.receive(Q, max_wait=0)) == ["m3", "m4"]


async def test_a_session_lost_before_its_messages_came_is_released(
    bus: ServiceBusBus, ns: FakeServiceBus
) -> None:
    await bus.send([out("s", "m")])
    ns.fail("receive", MessageLockLostError("gone"))
    assert await bus.receive(Q, max_wait=0) == []
    assert ops(ns, "close") == ["s"]
    assert ids(await bus.receive(Q, max_wait=0)) == ["m"]


# -- locks ----------------------------------------------------------------------------


async def test_an_expired_lock_raises_on_complete_and_redelivers(
    bus: ServiceBusBus, other: ServiceBusBus, ns: FakeServiceBus, clock: FakeClock
) -> None:
    await bus.send([out("s", "m")])
    [first] = await bus.receive(Q, max_wait=0)
    clock.advance(LOCK + 1)
    with pytest.raises(MessageLockLostError):
        await bus.complete([first])
    assert ops(ns, "complete") == []  # refused before asking the broker
    [again] = await other.receive(Q, max_wait=0)
    assert (again.message_id, again.delivery_count) == ("m", 2)
    assert again.lock_token != first.lock_token


async def test_a_lock_lost_at_the_broker_raises_and_releases_the_session(
    bus: ServiceBusBus, ns: FakeServiceBus
) -> None:
    await bus.send([out("s", "m1"), out("s", "m2")])
    m1, m2 = await bus.receive(Q, max_wait=0)
    ns.fail("complete", MessageLockLostError("session lock lost"))
    with pytest.raises(MessageLockLostError):
        await bus.complete([m1])
    with pytest.raises(MessageLockLostError):  # the session's lock covered m2 too
        await bus.complete([m2])
    assert ops(ns, "close") == ["s"]
    assert [(m.message_id, m.delivery_count) for m in await bus.receive(Q, max_wait=0)] == [
        ("m1", 2),
        ("m2", 2),
    ]


async def test_renewing_one_message_renews_its_session(
    bus: ServiceBusBus, other: ServiceBusBus, ns: FakeServiceBus, clock: FakeClock
) -> None:
    await bus.send([out("s", "m1"), out("s", "m2")])
    got = await bus.receive(Q, max_wait=0)
    clock.advance(LOCK * 0.75)
    await bus.renew_lock(got[:1])
    clock.advance(LOCK * 0.75)
    assert await other.receive(Q, max_wait=0) == []
    await bus.complete(got)
    assert ops(ns, "renew") == ["s"] and ops(ns, "complete") == ["m1", "m2"]


async def test_renewing_a_lost_lock_raises(
    bus: ServiceBusBus, ns: FakeServiceBus, clock: FakeClock
) -> None:
    await bus.send([out("s", "m")])
    got = await bus.receive(Q, max_wait=0)
    clock.advance(LOCK + 1)
    with pytest.raises(MessageLockLostError, match="1 lock"):
        await bus.renew_lock(got)
    assert ops(ns, "renew") == [] and ops(ns, "close") == ["s"]


async def test_complete_settles_what_it_still_holds_then_raises(
    bus: ServiceBusBus, ns: FakeServiceBus, clock: FakeClock
) -> None:
    # Unlike the Postgres bus, not all-or-nothing: each settlement is its own operation.
    await bus.send([out("s1", "a"), out("s2", "b")])
    a, b = await bus.receive(Q, max_wait=0)
    clock.advance(LOCK * 0.75)
    await bus.renew_lock([a])
    clock.advance(LOCK * 0.75)
    with pytest.raises(MessageLockLostError, match="1 of 2"):
        await bus.complete([a, b])
    assert ops(ns, "complete") == ["a"]


# -- abandon and dead letters ---------------------------------------------------------


async def test_abandon_redelivers_with_a_higher_delivery_count(
    bus: ServiceBusBus, ns: FakeServiceBus
) -> None:
    await bus.send([out("s", "m")])
    await bus.abandon(await bus.receive(Q, max_wait=0))
    assert ops(ns, "abandon") == ["m"] and ops(ns, "close") == ["s"]
    [again] = await bus.receive(Q, max_wait=0)
    assert (again.message_id, again.delivery_count) == ("m", 2)


async def test_abandoning_a_lost_lock_is_ignored(
    bus: ServiceBusBus, ns: FakeServiceBus, clock: FakeClock
) -> None:
    await bus.send([out("s", "m")])
    got = await bus.receive(Q, max_wait=0)
    clock.advance(LOCK + 1)
    await bus.abandon(got)
    assert ops(ns, "abandon") == []


async def test_dead_letter_keeps_reason_and_description(
    bus: ServiceBusBus, clock: FakeClock
) -> None:
    await bus.send([out("s", "bad"), out("s", "good"), out("t", "late")])
    bad, good, late = await bus.receive(Q, max_wait=0)
    await bus.dead_letter(bad, reason="MalformedMessage", description="not JSON")
    await bus.complete([good])
    [dead] = await bus.dead_letters(Q)
    assert (dead.queue, dead.message_id, dead.session_id, dead.body) == (Q, "bad", "s", b"bad")
    assert (dead.reason, dead.description, dead.delivery_count) == (
        "MalformedMessage",
        "not JSON",
        1,
    )
    clock.advance(LOCK + 1)
    with pytest.raises(MessageLockLostError):
        await bus.dead_letter(late, reason="r", description="d")
    assert len(await bus.dead_letters(Q)) == 1


async def test_a_message_past_the_max_delivery_count_is_dead_lettered(bus: ServiceBusBus) -> None:
    await bus.send([out("s", "poison")])
    for _ in range(3):
        await bus.abandon(await bus.receive(Q, max_wait=0))
    assert await bus.receive(Q, max_wait=0) == []
    [dead] = await bus.dead_letters(Q)
    assert (dead.reason, dead.delivery_count) == ("MaxDeliveryCountExceeded", 3)


# -- size, faults ---------------------------------------------------------------------


async def test_an_oversized_body_is_refused_before_anything_is_sent(ns: FakeServiceBus) -> None:
    bus = fake_servicebus_bus(ns, max_body_bytes=100)
    big = OutgoingMessage(Q, "e/s/1/result", "e", b"x" * 101)
    with pytest.raises(MessageTooLargeError, match=r"'e/s/1/result'.*101-byte body.*100-byte"):
        await bus.send([out("e", "small"), big])
    assert ns.sent == []
    await bus.close()


async def test_a_transient_send_failure_surfaces_and_sends_nothing(
    bus: ServiceBusBus, ns: FakeServiceBus
) -> None:
    ns.fail("send", ServiceBusTransientError("busy"))
    with pytest.raises(ServiceBusTransientError):
        await bus.send([out("s", "m")])
    assert ns.sent == []
    await bus.send([out("s", "m")])
    assert ids(await bus.receive(Q, max_wait=0)) == ["m"]


async def test_a_transient_accept_failure_surfaces_unless_messages_were_taken(
    bus: ServiceBusBus, ns: FakeServiceBus
) -> None:
    await bus.send([out("s1", "a"), out("s2", "b")])
    ns.fail("accept", ServiceBusTransientError("down"))
    with pytest.raises(ServiceBusTransientError):
        await bus.receive(Q, max_wait=0)
    # The first session came; every probe for more (8 at once) failed: keep what came.
    ns.fail("accept", None, *[ServiceBusTransientError("down")] * 8)
    assert ids(await bus.receive(Q, max_wait=0)) == ["a"]
    assert ids(await bus.receive(Q, max_wait=0)) == ["b"]


async def test_a_transient_settle_failure_keeps_the_message_held(
    bus: ServiceBusBus, other: ServiceBusBus, ns: FakeServiceBus
) -> None:
    await bus.send([out("s", "m")])
    got = await bus.receive(Q, max_wait=0)
    ns.fail("complete", ServiceBusTransientError("busy"))
    with pytest.raises(ServiceBusTransientError):
        await bus.complete(got)
    assert await other.receive(Q, max_wait=0) == []
    await bus.complete(got)
    assert ops(ns, "complete") == ["m"] and ops(ns, "close") == ["s"]


# -- settling once, reply, close ------------------------------------------------------


async def test_nothing_is_settled_twice(bus: ServiceBusBus, ns: FakeServiceBus) -> None:
    await bus.send([out("s", "m"), out("s", "n")])
    m, n = await bus.receive(Q, max_wait=0)
    with pytest.raises(MessageLockLostError, match="1 of 2"):
        await bus.complete([m, m])
    results = await asyncio.gather(bus.complete([n]), bus.abandon([n]), return_exceptions=True)
    assert results == [None, None]  # the abandon found it being settled and left it
    with pytest.raises(MessageLockLostError):
        await bus.complete([m])
    assert ops(ns, "complete") == ["m", "n"] and ops(ns, "abandon") == []
    assert ns.double_settlements == 0


async def test_reply_sends_then_completes(bus: ServiceBusBus, ns: FakeServiceBus) -> None:
    await bus.send([out("e/a", "cmd")])
    got = await bus.receive(Q, max_wait=0)
    await bus.reply(got, [out("e", "e/a/1/result", queue="sagaflow.events")])
    assert ns.log[-3:] == [("send", "e/a/1/result"), ("complete", "cmd"), ("close", "e/a")]


async def test_reply_with_a_lost_lock_sends_and_completes_nothing(
    bus: ServiceBusBus, ns: FakeServiceBus, clock: FakeClock
) -> None:
    await bus.send([out("e/a", "cmd")])
    got = await bus.receive(Q, max_wait=0)
    clock.advance(LOCK + 1)
    with pytest.raises(MessageLockLostError):
        await bus.reply(got, [out("e", "e/a/1/result", queue="sagaflow.events")])
    assert ops(ns, "send") == ["cmd"] and ops(ns, "complete") == []


async def test_close_releases_sessions_and_settles_nothing(ns: FakeServiceBus) -> None:
    bus, later = fake_servicebus_bus(ns), fake_servicebus_bus(ns)
    await bus.send([out("s1", "a"), out("s2", "b")])
    got = await bus.receive(Q, max_wait=0)
    await bus.close()
    await bus.close()
    assert sorted(ops(ns, "close")) == ["s1", "s2"]
    assert all(s.close_calls == 1 for s in ns.clients[0].sessions) and ns.clients[0].closed
    assert await bus.receive(Q, max_wait=0) == []
    with pytest.raises(MessageLockLostError):
        await bus.complete(got)
    await bus.abandon(got)
    with pytest.raises(RuntimeError, match="closed"):
        await bus.send([out("s", "x")])
    assert ops(ns, "complete") == [] and ops(ns, "abandon") == [] and ns.double_settlements == 0
    assert [m.delivery_count for m in await later.receive(Q, max_wait=0)] == [2, 2]
    await later.close()


async def test_close_stops_a_waiting_receive(ns: FakeServiceBus) -> None:
    ns.wait = True
    bus = fake_servicebus_bus(ns)
    task = asyncio.create_task(bus.receive(Q, max_wait=60))
    await ns.waiting.wait()
    await bus.close()
    assert await task == []


async def test_a_waiting_receive_takes_a_message_sent_meanwhile(ns: FakeServiceBus) -> None:
    ns.wait = True
    bus, sender = fake_servicebus_bus(ns), fake_servicebus_bus(ns)
    task = asyncio.create_task(bus.receive(Q, max_wait=60))
    await ns.waiting.wait()
    ns.wait = False  # the waiting accept still waits; later ones (the probe) answer at once
    await sender.send([out("s", "late")])
    assert ids(await task) == ["late"]
    await bus.close()
    await sender.close()


def test_topology_queues() -> None:
    assert topology_queues(["inventory", "payments", "inventory"]) == [
        "sagaflow.events",
        "steps.inventory",
        "steps.payments",
    ]


# == the real client over stand-ins for the SDK ========================================


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (sb_errors.SessionLockLostError(), MessageLockLostError),
        (sb_errors.MessageLockLostError(), MessageLockLostError),
        (sb_errors.MessageAlreadySettled(action="complete"), MessageLockLostError),
        (sb_errors.MessageSizeExceededError(), MessageTooLargeError),
        (sb_errors.ServiceBusConnectionError(), ServiceBusTransientError),
        (sb_errors.ServiceBusCommunicationError(), ServiceBusTransientError),
        (sb_errors.ServiceBusServerBusyError(), ServiceBusTransientError),
        (sb_errors.OperationTimeoutError(), ServiceBusTransientError),
        (sb_errors.MessagingEntityNotFoundError(), ServiceBusAdapterError),
        (sb_errors.ServiceBusAuthenticationError(), ServiceBusAdapterError),
        (ClientAuthenticationError("no credential"), ServiceBusAdapterError),
    ],
)
def test_sdk_errors_are_translated(error: Exception, expected: type[Exception]) -> None:
    translated = translate_error(error, "doing it")
    assert type(translated) is expected
    assert str(translated).startswith("doing it: ")
    plain = ValueError("ours")
    assert translate_error(plain, "x") is plain


def test_retry_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=6, first_delay=0.5, max_delay=3.0, jitter=False)
    assert [policy.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert 0.5 <= RetryPolicy(first_delay=1.0).delay(0) <= 1.0


def sdk_message(
    message_id: str,
    session_id: str,
    *parts: bytes,
    delivery_count: int = 0,
    seq: int = 1,
    reason: str | None = None,
) -> ServiceBusReceivedMessage:
    """A received message as the SDK's transport builds it from the AMQP frame."""
    dead = {b"DeadLetterReason": (reason or "").encode(), b"DeadLetterErrorDescription": b"why"}
    raw = Message(
        data=list(parts),
        header=Header(delivery_count=delivery_count),
        properties=Properties(message_id=message_id.encode(), group_id=session_id.encode()),
        message_annotations={
            b"x-opt-enqueued-time": 1_900_000_000_000,
            b"x-opt-sequence-number": seq,
        },
        application_properties=dead if reason else None,
    )
    return ServiceBusReceivedMessage(raw, receiver=None, frame=None, lock_token=uuid.uuid4())


class StubSession:
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.locked_until_utc = START + timedelta(seconds=LOCK)

    async def renew_lock(self) -> datetime:
        self.locked_until_utc += timedelta(seconds=LOCK)
        return self.locked_until_utc


class StubReceiver:
    """Stands in for azure.servicebus.aio.ServiceBusReceiver; `errors[op]` are raised first."""

    def __init__(
        self,
        session_id: str = "s",
        *,
        open_error: Exception | None = None,
        messages: Sequence[ServiceBusReceivedMessage] = (),
        pages: Sequence[list[ServiceBusReceivedMessage]] = (),
        errors: dict[str, list[Exception]] | None = None,
    ) -> None:
        self.session = StubSession(session_id)
        self.open_error = open_error
        self.messages, self.pages = list(messages), list(pages)
        self.errors = errors or {}
        self.calls: list[tuple[Any, ...]] = []
        self.close_calls = 0

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if self.errors.get(call[0]):
            raise self.errors[call[0]].pop(0)

    async def __aenter__(self) -> StubReceiver:
        if self.open_error is not None:
            raise self.open_error
        return self

    async def receive_messages(self, max_message_count: int, max_wait_time: float) -> list[Any]:
        self._call("receive", max_message_count, max_wait_time)
        return self.messages[:max_message_count]

    async def complete_message(self, message: ServiceBusReceivedMessage) -> None:
        self._call("complete", message.message_id)

    async def abandon_message(self, message: ServiceBusReceivedMessage) -> None:
        self._call("abandon", message.message_id)

    async def dead_letter_message(
        self, message: ServiceBusReceivedMessage, reason: str, error_description: str
    ) -> None:
        self._call("dead_letter", message.message_id, reason, error_description)

    async def peek_messages(self, max_message_count: int, *, sequence_number: int) -> list[Any]:
        self._call("peek", sequence_number)
        return self.pages.pop(0) if self.pages else []

    async def close(self) -> None:
        self.close_calls += 1


class StubSender:
    def __init__(self, sdk: StubSdk) -> None:
        self.sdk, self.batches, self.closed = sdk, list[ServiceBusMessageBatch](), False

    async def create_message_batch(self) -> ServiceBusMessageBatch:
        return ServiceBusMessageBatch(max_size_in_bytes=self.sdk.batch_bytes)

    async def send_messages(self, batch: ServiceBusMessageBatch) -> None:
        if self.sdk.send_errors:
            raise self.sdk.send_errors.pop(0)
        self.batches.append(batch)

    async def close(self) -> None:
        self.closed = True


class StubSdk:
    """Stands in for azure.servicebus.aio.ServiceBusClient."""

    def __init__(self, *receivers: StubReceiver, batch_bytes: int = 4096) -> None:
        self.receivers, self.batch_bytes = list(receivers), batch_bytes
        self.receiver_args: list[tuple[str, dict[str, Any]]] = []
        self.senders: dict[str, StubSender] = {}
        self.send_errors: list[Exception] = []
        self.closed = False

    def get_queue_sender(self, queue: str, **kwargs: Any) -> StubSender:
        return self.senders.setdefault(queue, StubSender(self))

    def get_queue_receiver(self, queue: str, **kwargs: Any) -> StubReceiver:
        self.receiver_args.append((queue, kwargs))
        return self.receivers.pop(0)

    async def close(self) -> None:
        self.closed = True


def real_client(sdk: StubSdk, sleeps: list[float], credential: Any = None) -> AzureSessionClient:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    retry = RetryPolicy(attempts=3, first_delay=1.0, jitter=False)
    client: Any = sdk  # the stand-in, where the SDK client goes
    return AzureSessionClient(client, credential=credential, retry=retry, sleep=sleep)


def wire(message_id: str, body: bytes = b"{}", at: datetime | None = None) -> Any:
    from sagaflow.adapters.servicebus import WireMessage

    return WireMessage(message_id, "e1/a", body, "application/json", at)


def body_of(message: Any) -> bytes:
    return message.body if isinstance(message.body, bytes) else b"".join(message.body)


async def test_real_send_retries_transient_faults_and_maps_messages() -> None:
    sdk, sleeps = StubSdk(), list[float]()
    sdk.send_errors = [sb_errors.ServiceBusConnectionError(), sb_errors.ServiceBusServerBusyError()]
    due = START + timedelta(minutes=1)
    await real_client(sdk, sleeps).send(Q, [wire("m1", b'{"a":1}'), wire("m2", at=due)])
    assert sleeps == [1.0, 2.0]
    [batch] = sdk.senders[Q].batches
    m1, m2 = batch._messages
    assert (m1.message_id, m1.session_id, m1.content_type) == ("m1", "e1/a", "application/json")
    assert body_of(m1) == b'{"a":1}'
    assert (m1.scheduled_enqueue_time_utc, m2.scheduled_enqueue_time_utc) == (None, due)


async def test_real_send_gives_up_after_the_attempts_and_keeps_the_cause() -> None:
    sdk, sleeps = StubSdk(), list[float]()
    sdk.send_errors = [sb_errors.ServiceBusConnectionError() for _ in range(3)]
    with pytest.raises(ServiceBusTransientError) as raised:
        await real_client(sdk, sleeps).send(Q, [wire("m1")])
    assert isinstance(raised.value.__cause__, sb_errors.ServiceBusConnectionError)
    assert sleeps == [1.0, 2.0] and sdk.senders[Q].batches == []


async def test_real_send_splits_full_batches_and_refuses_a_message_too_big_for_one() -> None:
    sdk, sleeps = StubSdk(batch_bytes=1000), list[float]()
    client = real_client(sdk, sleeps)
    await client.send(Q, [wire(f"m{i}", b"x" * 400) for i in range(3)])
    batches = sdk.senders[Q].batches
    assert len(batches) == 2
    assert [m.message_id for b in batches for m in b._messages] == ["m0", "m1", "m2"]
    with pytest.raises(MessageTooLargeError, match="'huge'"):
        await client.send(Q, [wire("huge", b"x" * 2000)])
    assert len(batches) == 2


async def test_real_accept_with_no_session_available_is_none() -> None:
    receiver = StubReceiver(open_error=sb_errors.OperationTimeoutError())
    sdk, sleeps = StubSdk(receiver), list[float]()
    assert await real_client(sdk, sleeps).accept_next_session(Q, max_wait=2.0) is None
    [(queue, kwargs)] = sdk.receiver_args
    assert queue == Q and kwargs["max_wait_time"] == 2.0 and kwargs["prefetch_count"] == 0
    assert kwargs["session_id"] is not None  # NEXT_AVAILABLE_SESSION
    assert receiver.close_calls == 1 and sleeps == []  # not retried


async def test_real_accept_retries_a_connection_fault_with_a_fresh_receiver() -> None:
    broken = StubReceiver(open_error=sb_errors.ServiceBusConnectionError())
    sdk, sleeps = StubSdk(broken, StubReceiver("e1")), list[float]()
    session = await real_client(sdk, sleeps).accept_next_session(Q, max_wait=1.0)
    assert session is not None and session.session_id == "e1"
    assert broken.close_calls == 1 and sleeps == [1.0]


async def test_real_session_maps_deliveries_and_translates_a_lost_lock() -> None:
    messages = [
        sdk_message("m1", "e1", b'{"a":', b"1}"),
        sdk_message("m2", "e1", b"{}", delivery_count=2),
    ]
    errors: dict[str, list[Exception]] = {"complete": [sb_errors.SessionLockLostError()]}
    receiver = StubReceiver("e1", messages=messages, errors=errors)
    session = await real_client(StubSdk(receiver), []).accept_next_session(Q, max_wait=1.0)
    assert session is not None
    m1, m2 = await session.receive(10, 0)
    assert receiver.calls[0] == ("receive", 10, 0.01)  # the SDK refuses a zero wait
    assert (m1.message_id, m1.session_id, m1.body) == ("m1", "e1", b'{"a":1}')
    assert (m1.delivery_count, m2.delivery_count) == (1, 3)  # the wire count is zero-based
    assert m1.enqueued_at == datetime.fromtimestamp(1_900_000_000, UTC)
    assert m1.lock_token == str(messages[0].lock_token)
    assert session.locked_until == START + timedelta(seconds=LOCK)
    with pytest.raises(MessageLockLostError) as raised:
        await session.complete(m1)
    assert isinstance(raised.value.__cause__, sb_errors.SessionLockLostError)
    assert [c for c in receiver.calls if c[0] == "complete"] == [("complete", "m1")]


async def test_real_session_settles_renews_and_closes_once() -> None:
    errors: dict[str, list[Exception]] = {"abandon": [sb_errors.ServiceBusServerBusyError()]}
    receiver = StubReceiver("e1", messages=[sdk_message("m1", "e1", b"{}")], errors=errors)
    sleeps: list[float] = []
    session = await real_client(StubSdk(receiver), sleeps).accept_next_session(Q, max_wait=1.0)
    assert session is not None
    [m1] = await session.receive(1, 1.0)
    await session.abandon(m1)
    await session.dead_letter(m1, reason="MalformedMessage", description="not JSON")
    assert await session.renew_lock() == START + timedelta(seconds=2 * LOCK)
    assert receiver.calls[1:] == [
        ("abandon", "m1"),
        ("abandon", "m1"),
        ("dead_letter", "m1", "MalformedMessage", "not JSON"),
    ]
    assert sleeps == [1.0]
    await session.close()
    await session.close()
    with pytest.raises(MessageLockLostError):
        await session.complete(m1)
    assert receiver.close_calls == 1 and len(receiver.calls) == 4


async def test_real_peek_pages_through_the_dead_letters() -> None:
    receiver = StubReceiver(
        pages=[
            [sdk_message("a", "e1", b"{}", seq=1, reason="R", delivery_count=1)],
            [sdk_message("b", "e2", b"[]", seq=7, reason="MaxDeliveryCountExceeded")],
        ]
    )
    sdk = StubSdk(receiver)
    client = real_client(sdk, [])
    a, b = await client.peek_dead_letters(Q)
    assert (a.queue, a.message_id, a.session_id, a.body) == (Q, "a", "e1", b"{}")
    assert (a.reason, a.description, a.delivery_count) == ("R", "why", 1)
    assert a.dead_lettered_at == datetime.fromtimestamp(1_900_000_000, UTC)
    assert (b.message_id, b.reason) == ("b", "MaxDeliveryCountExceeded")
    assert receiver.calls == [("peek", 1), ("peek", 2), ("peek", 8)]
    assert sdk.receiver_args[0][1]["sub_queue"] == ServiceBusSubQueue.DEAD_LETTER
    # The dead-letter link is kept for the next pass, and closed with the client.
    assert receiver.close_calls == 0
    await client.peek_dead_letters(Q)
    assert len(sdk.receiver_args) == 1
    await client.close()
    assert receiver.close_calls == 1


async def test_real_close_closes_every_link_and_the_credential() -> None:
    class Credential:
        closed = False

        async def close(self) -> None:
            self.closed = True

    receiver, credential = StubReceiver("e1"), Credential()
    sdk = StubSdk(receiver)
    client = real_client(sdk, [], credential)
    await client.send(Q, [wire("m")])
    await client.accept_next_session(Q, max_wait=1.0)
    await client.close()
    assert sdk.senders[Q].closed and receiver.close_calls == 1
    assert sdk.closed and credential.closed


async def test_create_topology_creates_plain_queues_and_aligns_existing_ones() -> None:
    class Queue:
        def __init__(self, sessions: bool) -> None:
            self.requires_session = sessions
            self.lock_duration, self.max_delivery_count = timedelta(seconds=60), 10

    class Admin:
        def __init__(self) -> None:
            self.queues = {"steps.a": Queue(False), "steps.b": Queue(True)}
            self.created: dict[str, dict[str, Any]] = {}
            self.updated: list[Queue] = []

        async def get_queue(self, name: str) -> Queue:
            if name not in self.queues:
                raise ResourceNotFoundError(f"no queue {name}")
            return self.queues[name]

        async def create_queue(self, name: str, **options: Any) -> None:
            self.created[name] = options

        async def update_queue(self, queue: Queue) -> None:
            self.updated.append(queue)

    admin = Admin()
    stand_in: Any = admin
    queues = ["sagaflow.events", "steps.a"]
    assert await create_topology(stand_in, queues, lock_duration=30, max_delivery_count=5) == [
        "sagaflow.events"
    ]
    options = admin.created["sagaflow.events"]
    assert not options["requires_session"] and options["requires_duplicate_detection"]
    assert (options["lock_duration"], options["max_delivery_count"]) == (timedelta(seconds=30), 5)
    [updated] = admin.updated
    assert (updated.lock_duration, updated.max_delivery_count) == (timedelta(seconds=30), 5)
    # Sessions cannot be turned off (or on) once a queue exists.
    with pytest.raises(TopologyError, match=r"'steps\.b' exists with sessions"):
        await create_topology(stand_in, ["steps.b"])
    await create_topology(stand_in, ["steps.b"], session_queues={"steps.b"})


async def test_a_bus_from_a_connection_string_is_built_and_closed_offline() -> None:
    endpoint = (
        "Endpoint=sb://example.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=dg=="
    )
    bus = ServiceBusBus.from_connection_string(endpoint)
    assert isinstance(bus, Bus)
    await bus.close()
