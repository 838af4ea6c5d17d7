"""The Service Bus peer on an accelerated clock, against the real async SDK.

With `speed=20` a 30 s lock ends after 1.5 real seconds and a message scheduled 60 s
ahead appears after 3, while every time the SDK reads (locked-until, enqueue and
scheduled times) is in the peer's time, which `peer.now()` gives. The tests wait on
the condition itself (a receive with a wait) rather than sleeping, and bound the real
time each step took, so a loop that only noticed a deadline at its one-second poll
would fail them.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import time

import pytest
from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage
from azure.servicebus import aio as sb_aio
from azure.servicebus.exceptions import MessageLockLostError
from tests.support.servicebus_peer import QueueCounts, QueueSpec, ServiceBusPeer, running_peer

SPEED = 20.0
LOCK = 30.0  # peer seconds: 1.5 real seconds at SPEED
# Slack for the SDK's receive round trips and the peer's wakeup, in real seconds.
PROMPT = 0.5
# What the peer reports is in whole milliseconds.
MS = datetime.timedelta(milliseconds=1)
EMPTY = QueueCounts(active=0, locked=0, deferred=0, scheduled=0, dead_lettered=0)


def _async_client(peer: ServiceBusPeer) -> sb_aio.ServiceBusClient:
    return sb_aio.ServiceBusClient.from_connection_string(peer.connection_string, retry_total=0)


async def _receive_one(
    receiver: sb_aio.ServiceBusReceiver, within: float
) -> tuple[ServiceBusReceivedMessage, float]:
    """The next message, waited for up to `within` real seconds, and when it came."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        messages = await receiver.receive_messages(max_wait_time=left)
        if messages:
            [message] = messages
            return message, time.monotonic()
    raise AssertionError(f"no message within {within} s")


def _seconds(delta: datetime.timedelta) -> float:
    return delta.total_seconds()


@pytest.mark.timeout(10)
def test_speed_must_be_a_positive_finite_number_and_defaults_to_the_real_clock() -> None:
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="speed"):
            ServiceBusPeer(speed=bad)
    with running_peer() as peer:
        assert peer.speed == 1.0
        before = time.time()
        now = peer.now()
        assert now.tzinfo is datetime.UTC
        assert before <= now.timestamp() <= time.time()


@pytest.mark.timeout(10)
def test_peer_time_starts_at_the_real_time_and_runs_speed_times_as_fast() -> None:
    started = time.time()
    with running_peer(speed=SPEED) as peer:
        assert peer.speed == SPEED
        real_from, first, real_by = time.time(), peer.clock(), time.time()
        # The origin lies between `started` and now, so peer time is bounded by both.
        assert real_from <= first <= started + (real_by - started) * SPEED
        time.sleep(0.2)
        second, real_then = peer.clock(), time.time()
        assert (second - first) / (real_then - real_from) == pytest.approx(SPEED, rel=0.05)
        assert abs(peer.now().timestamp() - peer.clock()) < 0.01


@pytest.mark.timeout(20)
async def test_an_unsettled_message_comes_back_once_its_lock_ends_in_peer_time() -> None:
    spec = QueueSpec(lock_duration=LOCK)
    async with running_peer({"orders": spec}, speed=SPEED) as peer, _async_client(peer) as client:
        async with client.get_queue_sender("orders") as sender:
            await sender.send_messages(ServiceBusMessage("slow"))
        async with client.get_queue_receiver("orders") as receiver:
            before = peer.now()
            first, first_at = await _receive_one(receiver, within=5)
            after = peer.now()
            assert first.delivery_count == 0 and first.locked_until_utc is not None
            lock = datetime.timedelta(seconds=LOCK)
            assert before + lock - MS <= first.locked_until_utc <= after + lock + MS

            # Locked: nothing to receive while the lock has more than PROMPT real s left.
            left = _seconds(first.locked_until_utc - peer.now()) / SPEED
            assert left > PROMPT, "the first receive took too long to leave a locked window"
            assert await receiver.receive_messages(max_wait_time=left - PROMPT / 2) == []
            assert peer.now() < first.locked_until_utc
            assert peer.counts("orders") == QueueCounts(0, 1, 0, 0, 0)

            second, second_at = await _receive_one(receiver, within=LOCK / SPEED + 3)
            assert peer.now() >= first.locked_until_utc
            assert (second.sequence_number, second.delivery_count) == (first.sequence_number, 1)
            assert second.lock_token != first.lock_token
            assert second.locked_until_utc is not None
            assert second.locked_until_utc >= first.locked_until_utc + lock - MS
            # Redelivered about LOCK / SPEED real seconds after the first delivery.
            assert LOCK / SPEED - PROMPT < second_at - first_at < LOCK / SPEED + PROMPT

            with pytest.raises(MessageLockLostError):
                await receiver.complete_message(first)
            await receiver.complete_message(second)
        assert peer.counts("orders") == EMPTY


@pytest.mark.timeout(20)
async def test_a_message_scheduled_a_minute_ahead_in_peer_time_arrives_in_seconds() -> None:
    ahead = 60.0
    async with (
        running_peer({"orders": QueueSpec()}, speed=SPEED) as peer,
        _async_client(peer) as client,
    ):
        receiver = client.get_queue_receiver("orders")
        sender = client.get_queue_sender("orders")
        async with receiver, sender:
            assert await receiver.peek_messages(10) == []
            at = peer.now() + datetime.timedelta(seconds=ahead)
            scheduled_real = time.monotonic()
            [sequence] = await sender.schedule_messages(ServiceBusMessage("later"), at)
            assert peer.counts("orders") == QueueCounts(0, 0, 0, scheduled=1, dead_lettered=0)
            assert await receiver.receive_messages(max_wait_time=0.5) == []
            assert peer.now() < at

            message, received_real = await _receive_one(receiver, within=ahead / SPEED + 3)
            assert peer.now() >= at
            assert (str(message), message.sequence_number) == ("later", sequence)
            assert message.scheduled_enqueue_time_utc is not None
            assert abs(_seconds(message.scheduled_enqueue_time_utc - at)) <= 0.001
            assert message.enqueued_time_utc is not None
            assert message.enqueued_time_utc >= at - MS
            assert received_real - scheduled_real < ahead / SPEED + PROMPT
            await receiver.complete_message(message)
        assert peer.counts("orders") == EMPTY


@pytest.mark.timeout(20)
async def test_reported_times_and_renewed_locks_follow_the_peer_clock() -> None:
    spec = QueueSpec(lock_duration=LOCK)
    async with running_peer({"orders": spec}, speed=SPEED) as peer, _async_client(peer) as client:
        lock = datetime.timedelta(seconds=LOCK)
        async with client.get_queue_sender("orders") as sender:
            sent_from = peer.now()
            await sender.send_messages(ServiceBusMessage("timed"))
            sent_by = peer.now()
        async with client.get_queue_receiver("orders") as receiver:
            message, _ = await _receive_one(receiver, within=5)
            assert message.enqueued_time_utc is not None
            assert sent_from - MS <= message.enqueued_time_utc <= sent_by + MS
            assert message.locked_until_utc is not None
            ahead = _seconds(message.locked_until_utc - peer.now())
            assert 0 < ahead <= LOCK
            # A quarter of a real second is 5 peer seconds, so the renewal must move the
            # lock end by about that much, which a real-time clock would not.
            first_until = message.locked_until_utc
            await asyncio.sleep(0.25)
            renew_from = peer.now()
            renewed = await receiver.renew_message_lock(message)
            renew_by = peer.now()
            assert renew_from + lock - MS <= renewed <= renew_by + lock + MS
            assert _seconds(renewed - first_until) > 0.25 * SPEED / 2
            await receiver.complete_message(message)
        assert peer.counts("orders") == EMPTY
