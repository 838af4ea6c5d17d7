"""The Service Bus peer (`tests/support/servicebus_peer`) against the real azure-servicebus SDK.

Every SDK test drives the unmodified SDK, sync (`ServiceBusClient`) or async
(`azure.servicebus.aio`), over a socket to a peer started for the test, and asserts
what an application would see: bodies, delivery counts, lock tokens, dead-letter
reasons, session ids and locks, the SDK's own exception types. The broker's rules are
also tested directly with a fake clock, so those tests never sleep; the few SDK tests
that wait for an expiry the peer enforces use one-second locks.

Clients are built with `retry_total=0` (as the adapter builds them) unless a test is
about the SDK's own reconnect.
"""

from __future__ import annotations

import asyncio
import datetime
import time

import pytest
from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusMessageState,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusReceiver,
    ServiceBusSubQueue,
)
from azure.servicebus import aio as sb_aio
from azure.servicebus._pyamqp._connection import Connection
from azure.servicebus._pyamqp.constants import ConnectionState
from azure.servicebus._pyamqp.sasl import SASLPlainCredential
from azure.servicebus.exceptions import (
    MessageLockLostError,
    MessagingEntityNotFoundError,
    OperationTimeoutError,
    SessionCannotBeLockedError,
    SessionLockLostError,
)
from tests.support.servicebus_peer import QueueCounts, QueueSpec, ServiceBusPeer, running_peer
from tests.support.servicebus_peer.broker import Broker, Outcome
from tests.support.servicebus_peer.entities import Envelope
from tests.support.servicebus_peer.errors import MessageLockLost, SessionCannotBeLocked

pytestmark = pytest.mark.timeout(30)

EMPTY = QueueCounts(active=0, locked=0, deferred=0, scheduled=0, dead_lettered=0)


def _client(
    peer: ServiceBusPeer, *, retry_total: int = 0, retry_backoff_factor: float = 0.8
) -> ServiceBusClient:
    return ServiceBusClient.from_connection_string(
        peer.connection_string, retry_total=retry_total, retry_backoff_factor=retry_backoff_factor
    )


def _async_client(
    peer: ServiceBusPeer, *, retry_total: int = 0, retry_backoff_factor: float = 0.8
) -> sb_aio.ServiceBusClient:
    return sb_aio.ServiceBusClient.from_connection_string(
        peer.connection_string, retry_total=retry_total, retry_backoff_factor=retry_backoff_factor
    )


def _receive(
    receiver: ServiceBusReceiver, count: int, wait: float = 5.0
) -> list[ServiceBusReceivedMessage]:
    """Exactly `count` messages (the SDK may return a batch in several pieces)."""
    received: list[ServiceBusReceivedMessage] = []
    deadline = time.monotonic() + wait
    while len(received) < count and time.monotonic() < deadline:
        received += receiver.receive_messages(
            max_message_count=count - len(received), max_wait_time=1
        )
    assert len(received) == count, f"expected {count} messages, got {len(received)}"
    return received


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# -- the broker's rules, with a fake clock ---------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_broker_lock_expiry_counts_as_a_delivery_and_max_count_dead_letters(
    clock: FakeClock,
) -> None:
    broker = Broker(clock)
    broker.add_queue("q", QueueSpec(lock_duration=10, max_delivery_count=2))
    broker.send("q", [Envelope(payload="m")])
    first = broker.receive("q", "owner")
    assert first is not None and first.token is not None
    assert first.entry.delivery_count == 0
    clock.now += 9.9
    assert broker.receive("q", "owner") is None, "still locked"
    clock.now += 0.2
    second = broker.receive("q", "owner")
    assert second is not None and second.token is not None
    assert second.entry.delivery_count == 1
    with pytest.raises(MessageLockLost):
        broker.settle("q", first.token, Outcome.COMPLETE)
    broker.settle("q", second.token, Outcome.ABANDON)
    assert broker.receive("q", "owner") is None
    [dead] = broker.peek("q/$DeadLetterQueue", 1, 10)
    assert dead.dead_letter is not None
    assert (dead.dead_letter.reason, dead.delivery_count) == ("MaxDeliveryCountExceeded", 2)


def test_broker_expired_session_lock_is_reported_and_frees_the_session(clock: FakeClock) -> None:
    broker = Broker(clock)
    broker.add_queue("q", QueueSpec(requires_session=True, lock_duration=5))
    broker.send("q", [Envelope(payload="m", session_id="s")])
    assert broker.lock_next_session("q", "a") is not None
    lease = broker.receive("q", "a", "s")
    assert lease is not None
    with pytest.raises(SessionCannotBeLocked):
        broker.lock_session("q", "s", "b")
    clock.now += 5
    broker.run_due()
    [lost] = broker.take_lost_sessions()
    assert (lost.session_id, lost.owner) == ("s", "a")
    session = broker.lock_next_session("q", "b")
    assert session is not None and session.session_id == "s"
    again = broker.receive("q", "b", "s")
    assert again is not None and again.entry.delivery_count == 1


def test_broker_scheduled_messages_wait_and_expired_ones_are_dead_lettered(
    clock: FakeClock,
) -> None:
    broker = Broker(clock)
    spec = QueueSpec(default_message_time_to_live=60, dead_lettering_on_message_expiration=True)
    broker.add_queue("q", spec)
    [seq] = broker.schedule("q", [Envelope(payload="later")], clock.now + 30)
    broker.send("q", [Envelope(payload="soon", time_to_live=10)])
    assert [entry.envelope.payload for entry in broker.peek("q", 1, 10)] == ["later", "soon"]
    clock.now += 11
    assert broker.receive("q", "o") is None, "soon expired, later not yet due"
    clock.now += 20
    lease = broker.receive("q", "o")
    assert lease is not None and (lease.entry.seq, lease.entry.envelope.payload) == (seq, "later")
    [expired] = broker.peek("q/$deadletterqueue", 1, 10)
    assert expired.dead_letter is not None and expired.dead_letter.reason == "TTLExpiredException"


def test_broker_drops_duplicates_within_the_window(clock: FakeClock) -> None:
    broker = Broker(clock)
    window = 60.0
    spec = QueueSpec(
        requires_duplicate_detection=True, duplicate_detection_history_time_window=window
    )
    broker.add_queue("q", spec)
    assert broker.send("q", [Envelope(payload=1, message_id="x")]) == [1]
    assert broker.send("q", [Envelope(payload=2, message_id="x")]) == [None]
    clock.now += window + 1
    assert broker.send("q", [Envelope(payload=3, message_id="x")]) == [2]


# -- connection level -----------------------------------------------------------------


@pytest.mark.timeout(10)
def test_sasl_plain_takes_the_shared_access_key_and_refuses_a_wrong_one() -> None:
    with running_peer() as peer:
        good = Connection(
            f"amqp://{peer.fully_qualified_namespace}",
            sasl_credential=SASLPlainCredential(peer.key_name, peer.key),  # type: ignore[no-untyped-call]
            use_tls=False,
        )
        good.open()
        deadline = time.monotonic() + 5
        while good.state is not ConnectionState.OPENED and time.monotonic() < deadline:
            good.listen(wait=0.05)
        assert good.state is ConnectionState.OPENED
        good.close()
        bad = Connection(
            f"amqp://{peer.fully_qualified_namespace}",
            sasl_credential=SASLPlainCredential(peer.key_name, "wrong"),  # type: ignore[no-untyped-call]
            use_tls=False,
        )
        with pytest.raises(ValueError, match="SASL negotiation failed"):
            bad.open()
        assert peer.connections_opened == 2


@pytest.mark.timeout(15)
def test_unknown_queue_is_not_found_for_senders_and_receivers() -> None:
    with running_peer() as peer, _client(peer) as client:
        with pytest.raises(MessagingEntityNotFoundError), client.get_queue_sender("nope") as sender:
            sender.send_messages(ServiceBusMessage("x"))
        receiver = client.get_queue_receiver("nope", max_wait_time=1)
        with pytest.raises(MessagingEntityNotFoundError):
            receiver.receive_messages()
        receiver.close()
        assert peer.queue_names() == []
        peer.add_queue("nope")
        assert peer.queue_names() == ["nope"]


# -- plain queues, sync -----------------------------------------------------------------


def test_single_and_batched_messages_arrive_with_broker_facts_and_abandon_counts() -> None:
    with running_peer({"orders": QueueSpec(lock_duration=30)}) as peer, _client(peer) as client:
        sent = _utcnow()
        with client.get_queue_sender("orders") as sender:
            sender.send_messages(
                ServiceBusMessage("hello", message_id="m-1", application_properties={"kind": "t"})
            )
            batch = sender.create_message_batch()
            for index in range(3):
                batch.add_message(ServiceBusMessage(f"m{index}"))
            sender.send_messages(batch)
        with client.get_queue_receiver("orders") as receiver:
            hello, *batched = _receive(receiver, 4)
            assert (str(hello), hello.message_id) == ("hello", "m-1")
            assert hello.application_properties == {b"kind": b"t"}
            assert (hello.sequence_number, hello.delivery_count) == (1, 0)
            assert hello.enqueued_time_utc is not None
            assert abs((hello.enqueued_time_utc - sent).total_seconds()) < 5
            assert hello.locked_until_utc is not None
            lock_seconds = (hello.locked_until_utc - hello.enqueued_time_utc).total_seconds()
            assert 29 < lock_seconds < 35
            # The batch is split into its messages, in order, each with its own number.
            assert [str(m) for m in batched] == ["m0", "m1", "m2"]
            assert [(m.sequence_number, m.delivery_count) for m in batched] == [
                (2, 0),
                (3, 0),
                (4, 0),
            ]
            # The token the peer holds, the delivery tag, and the annotation fallback agree.
            assert peer.lock_tokens("orders") == {m.lock_token for m in [hello, *batched]}
            annotations = hello.raw_amqp_message.delivery_annotations or {}
            assert annotations[b"x-opt-lock-token"] == hello.lock_token
            renewed = receiver.renew_message_lock(hello)
            assert renewed > hello.enqueued_time_utc + datetime.timedelta(seconds=29)
            receiver.abandon_message(batched[0])
            for message in [hello, *batched[1:]]:
                receiver.complete_message(message)
            [again] = _receive(receiver, 1)
            assert (str(again), again.sequence_number, again.delivery_count) == ("m0", 2, 1)
            receiver.complete_message(again)
        assert peer.counts("orders") == EMPTY


def test_dead_letter_reasons_and_max_delivery_count_are_readable_from_the_subqueue() -> None:
    spec = QueueSpec(max_delivery_count=2)
    with running_peer({"orders": spec}) as peer, _client(peer) as client:
        with client.get_queue_sender("orders") as sender:
            sender.send_messages([ServiceBusMessage("poison"), ServiceBusMessage("flaky")])
        with client.get_queue_receiver("orders") as receiver:
            poison, flaky = _receive(receiver, 2)
            receiver.dead_letter_message(poison, reason="Unparseable", error_description="bad json")
            receiver.abandon_message(flaky)
            [flaky] = _receive(receiver, 1)
            assert flaky.delivery_count == 1
            receiver.abandon_message(flaky)
        assert peer.counts("orders") == QueueCounts(0, 0, 0, 0, dead_lettered=2)
        dead_letters = client.get_queue_receiver("orders", sub_queue=ServiceBusSubQueue.DEAD_LETTER)
        with dead_letters:
            first, second = _receive(dead_letters, 2)
            assert (str(first), first.dead_letter_reason) == ("poison", "Unparseable")
            assert first.dead_letter_error_description == "bad json"
            assert (first.dead_letter_source, first.delivery_count) == ("orders", 0)
            assert (str(second), second.dead_letter_reason) == ("flaky", "MaxDeliveryCountExceeded")
            assert second.delivery_count == 2
            dead_letters.complete_message(first)
            dead_letters.complete_message(second)
        assert peer.counts("orders") == EMPTY


def test_an_expired_lock_redelivers_with_a_higher_count_and_settling_it_fails() -> None:
    with running_peer({"orders": QueueSpec(lock_duration=1.0)}) as peer, _client(peer) as client:
        with client.get_queue_sender("orders") as sender:
            sender.send_messages(ServiceBusMessage("slow"))
        with client.get_queue_receiver("orders") as receiver:
            [first] = _receive(receiver, 1)
            assert first.delivery_count == 0 and first.locked_until_utc is not None
            time.sleep(max((first.locked_until_utc - _utcnow()).total_seconds(), 0) + 0.1)
            [second] = _receive(receiver, 1)
            assert (second.sequence_number, second.delivery_count) == (first.sequence_number, 1)
            assert second.lock_token != first.lock_token
            with pytest.raises(MessageLockLostError):
                receiver.complete_message(first)
            receiver.complete_message(second)
        assert peer.counts("orders") == EMPTY


def test_scheduled_messages_appear_only_after_their_time_and_can_be_cancelled() -> None:
    with running_peer({"orders": QueueSpec()}) as peer, _client(peer) as client:
        receiver = client.get_queue_receiver("orders")
        sender = client.get_queue_sender("orders")
        with receiver, sender:
            assert receiver.peek_messages(10) == []
            at = _utcnow() + datetime.timedelta(seconds=1.5)
            [kept] = sender.schedule_messages(ServiceBusMessage("later"), at)
            [cancelled] = sender.schedule_messages(ServiceBusMessage("never"), at)
            sender.cancel_scheduled_messages(cancelled)
            assert peer.counts("orders") == QueueCounts(0, 0, 0, scheduled=1, dead_lettered=0)
            [peeked] = receiver.peek_messages(10)
            assert (peeked.sequence_number, peeked.state) == (
                kept,
                ServiceBusMessageState.SCHEDULED,
            )
            assert receiver.receive_messages(max_wait_time=0.5) == []
            [message] = _receive(receiver, 1)
            assert _utcnow() >= at
            assert (str(message), message.sequence_number) == ("later", kept)
            assert message.scheduled_enqueue_time_utc is not None
            assert abs((message.scheduled_enqueue_time_utc - at).total_seconds()) < 0.01
            receiver.complete_message(message)


def test_peek_locks_nothing_deferred_come_back_by_number_and_receive_and_delete_removes() -> None:
    with running_peer({"orders": QueueSpec()}) as peer, _client(peer) as client:
        with client.get_queue_sender("orders") as sender:
            sender.send_messages([ServiceBusMessage(f"m{index}") for index in range(3)])
            with client.get_queue_receiver("orders") as receiver:
                assert [m.sequence_number for m in receiver.peek_messages(10)] == [1, 2, 3]
                from_two = receiver.peek_messages(10, sequence_number=2)
                assert [m.sequence_number for m in from_two] == [2, 3]
                assert peer.counts("orders") == QueueCounts(3, 0, 0, 0, 0)
                messages = _receive(receiver, 3)
                receiver.defer_message(messages[0])
                for message in messages[1:]:
                    receiver.complete_message(message)
                [deferred] = receiver.peek_messages(10, sequence_number=1)
                assert deferred.state is ServiceBusMessageState.DEFERRED
                assert messages[0].sequence_number is not None
                [fetched] = receiver.receive_deferred_messages([messages[0].sequence_number])
                assert str(fetched) == "m0" and fetched.lock_token in peer.lock_tokens("orders")
                receiver.complete_message(fetched)
                assert receiver.peek_messages(10, sequence_number=1) == []
                assert peer.counts("orders") == EMPTY
            # Sent after the peek-lock receiver closed: an open one that timed out a receive
            # still holds that call's credit, and the message would go to it.
            sender.send_messages(ServiceBusMessage("gone"))
        mode = ServiceBusReceiveMode.RECEIVE_AND_DELETE
        with client.get_queue_receiver("orders", receive_mode=mode) as deleting:
            [message] = _receive(deleting, 1)
            assert str(message) == "gone"
            assert peer.counts("orders") == EMPTY


# -- session queues, sync ---------------------------------------------------------------


def test_named_session_gets_its_messages_and_a_second_lock_on_it_fails() -> None:
    spec = QueueSpec(requires_session=True)
    with running_peer({"orders": spec}) as peer, _client(peer) as client:
        with client.get_queue_sender("orders") as sender:
            sender.send_messages(
                [
                    ServiceBusMessage("a1", session_id="a"),
                    ServiceBusMessage("b1", session_id="b"),
                    ServiceBusMessage("a2", session_id="a"),
                ]
            )
        with client.get_queue_receiver("orders", session_id="a") as receiver:
            assert receiver.session.session_id == "a"
            messages = _receive(receiver, 2)
            assert [(str(m), m.session_id) for m in messages] == [("a1", "a"), ("a2", "a")]
            rival = client.get_queue_receiver("orders", session_id="a", max_wait_time=1)
            with pytest.raises(SessionCannotBeLockedError):
                rival.receive_messages()
            rival.close()
            for message in messages:
                receiver.complete_message(message)
        assert peer.counts("orders") == QueueCounts(1, 0, 0, 0, 0)


def test_session_lock_renewal_moves_locked_until_and_session_state_is_kept() -> None:
    spec = QueueSpec(requires_session=True, lock_duration=10)
    with running_peer({"orders": spec}) as peer, _client(peer) as client:
        with client.get_queue_receiver("orders", session_id="s") as receiver:
            session = receiver.session
            initial = session.locked_until_utc
            assert initial is not None
            assert 8 < (initial - _utcnow()).total_seconds() <= 10
            time.sleep(0.3)
            renewed = session.renew_lock()
            assert renewed > initial and session.locked_until_utc == renewed
            assert session.get_state() is None
            session.set_state(b"step-3")
            assert session.get_state() == b"step-3"
        with client.get_queue_receiver("orders", session_id="s") as receiver:
            assert receiver.session.get_state() == b"step-3"
        assert "orders" in peer.queue_names()


def test_next_available_session_on_an_idle_queue_times_out_quickly() -> None:
    spec = QueueSpec(requires_session=True)
    with running_peer({"orders": spec}) as peer, _client(peer) as client:
        # The receive call's deadline covers connecting too, so here the SDK gives up a
        # little before the peer's held attach would: same error type, SDK's message.
        wait = 1.2
        receiver = client.get_queue_receiver(
            "orders", session_id=NEXT_AVAILABLE_SESSION, max_wait_time=wait
        )
        started = time.monotonic()
        with pytest.raises(OperationTimeoutError):
            receiver.receive_messages()
        assert time.monotonic() - started < wait + 1
        receiver.close()
        assert peer.counts("orders") == EMPTY


# -- async ------------------------------------------------------------------------------


async def test_async_next_available_session_takes_a_ready_one_and_times_out_when_none() -> None:
    spec = QueueSpec(requires_session=True)
    async with running_peer({"orders": spec}) as peer, _async_client(peer) as client:
        async with client.get_queue_sender("orders") as sender:
            await sender.send_messages(
                [ServiceBusMessage("x1", session_id="x"), ServiceBusMessage("x2", session_id="x")]
            )
        receiver = client.get_queue_receiver(
            "orders", session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1
        )
        async with receiver:
            assert receiver.session.session_id == "x"
            assert receiver.session.locked_until_utc is not None
            messages = await receiver.receive_messages(max_message_count=5, max_wait_time=2)
            assert [str(m) for m in messages] == ["x1", "x2"]
            for message in messages:
                await receiver.complete_message(message)
        # Opened without a receive call, the SDK sets no deadline of its own, so the error
        # is the peer's: the attach held for the link's com.microsoft:timeout, then refused.
        # About half a second of SDK connecting precedes the held attach, and as much of
        # closing follows it.
        idle = client.get_queue_receiver(
            "orders", session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1
        )
        started = time.monotonic()
        with pytest.raises(OperationTimeoutError, match=r"com\.microsoft:timeout"):
            async with idle:
                pass
        assert time.monotonic() - started < 1 + 1.5


async def test_async_held_accept_is_granted_when_a_session_gets_a_message() -> None:
    spec = QueueSpec(requires_session=True)
    async with running_peer({"orders": spec}) as peer, _async_client(peer) as client:
        sender = client.get_queue_sender("orders")
        await sender.__aenter__()
        receiver = client.get_queue_receiver(
            "orders", session_id=NEXT_AVAILABLE_SESSION, max_wait_time=10
        )

        async def send_later() -> None:
            await asyncio.sleep(0.8)
            await sender.send_messages(ServiceBusMessage("late", session_id="late"))

        sending = asyncio.create_task(send_later())
        async with receiver:
            assert receiver.session.session_id == "late"
            [message] = await receiver.receive_messages(max_wait_time=2)
            assert str(message) == "late"
            await receiver.complete_message(message)
        await sending
        await sender.close()
        assert peer.counts("orders") == EMPTY


async def test_async_expired_session_lock_is_lost_and_its_messages_come_back() -> None:
    spec = QueueSpec(requires_session=True, lock_duration=1.0)
    async with running_peer({"orders": spec}) as peer, _async_client(peer) as client:
        async with client.get_queue_sender("orders") as sender:
            await sender.send_messages(ServiceBusMessage("work", session_id="s"))
        first = client.get_queue_receiver("orders", session_id="s")
        async with first:
            [message] = await first.receive_messages(max_wait_time=2)
            assert message.delivery_count == 0
            await asyncio.sleep(1.3)
            with pytest.raises(SessionLockLostError):
                await first.complete_message(message)
        async with client.get_queue_receiver("orders", session_id="s") as second:
            [again] = await second.receive_messages(max_wait_time=2)
            assert (str(again), again.delivery_count) == ("work", 1)
            await second.complete_message(again)
        assert peer.counts("orders") == EMPTY


async def test_async_sdk_survives_drop_connections_and_restart_with_state_kept() -> None:
    async with (
        running_peer({"orders": QueueSpec()}) as peer,
        _async_client(peer, retry_total=3, retry_backoff_factor=0.05) as client,
    ):
        async with client.get_queue_sender("orders") as sender:
            await sender.send_messages(ServiceBusMessage("one"))
            peer.drop_connections()
            await sender.send_messages(ServiceBusMessage("two"))
            port = peer.port
            peer.restart()
            assert peer.port == port
            await sender.send_messages(ServiceBusMessage("three"))
        async with client.get_queue_receiver("orders") as receiver:
            messages: list[ServiceBusReceivedMessage] = []
            for _ in range(5):
                messages += await receiver.receive_messages(max_message_count=3, max_wait_time=1)
                if len(messages) == 3:
                    break
            assert [str(m) for m in messages] == ["one", "two", "three"]
            for message in messages:
                await receiver.complete_message(message)
        assert peer.connections_opened >= 4
