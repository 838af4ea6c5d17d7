"""The bus contract: the Service Bus semantics every `Bus` adapter must keep.

Written against the `Bus` protocol (and `TransactionalBus` where a test is about
joining the caller's transaction) and run once per adapter through the parametrised
`harness` fixture. Time moves through `harness.advance`: a fake clock for the
Postgres bus, so lock expiry and scheduled delivery need no sleeping.
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from pg import FakeClock, fresh_database
from servicebus_contract import (
    ENV,
    FakeServiceBus,
    create_test_topology,
    fake_servicebus_bus,
    servicebus_bus_from_env,
)
from tests.support.servicebus_peer import QueueSpec, running_peer

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.servicebus import ServiceBusBus
from sagaflow.core.ports import (
    Bus,
    MessageLockLostError,
    OutgoingMessage,
    ReceivedMessage,
    TransactionalBus,
)

pytestmark = pytest.mark.timeout(30)

QUEUE = "contract"
# Adapters under test are configured with these (for a broker: on the queue entity).
LOCK_DURATION = 30.0
MAX_DELIVERY_COUNT = 3
# Long enough that a test passing by timeout instead of by wake-up would be noticed.
LONG_WAIT = 20.0


@dataclass
class Harness:
    """One adapter under test, plus what tests need beyond the protocol."""

    # Makes the n-th client (n = 0, 1, ...).
    make_bus: Callable[[int], Bus]
    now: Callable[[], datetime]
    # Move the adapter's clock forward (a real broker would sleep).
    advance: Callable[[float], Awaitable[None]]
    # A connection inside a transaction, for TransactionalBus; None if not supported.
    transaction: Callable[[], AbstractAsyncContextManager[Any]] | None
    # max_wait for "is anything receivable right now?"
    quick: float = 0.0
    # Whether the adapter keeps sessions (one receiver at a time per session, in order).
    sessions: bool = True
    buses: list[Bus] = field(default_factory=list)

    @property
    def bus(self) -> Bus:
        return self.buses[0] if self.buses else self.new_bus()

    def new_bus(self) -> Bus:
        """Another independent client on the same queues, like a second process."""
        bus = self.make_bus(len(self.buses))
        self.buses.append(bus)
        return bus


def _adapters() -> list[Any]:
    # The Service Bus adapter runs always over the test peer through the real SDK (plain
    # queues, as sagaflow uses them) and over an in-memory fake of its narrow client
    # (session queues), and over a real namespace when SAGAFLOW_TEST_SERVICEBUS holds a
    # connection string.
    adapters: list[Any] = ["postgres", "servicebus-peer", "servicebus-fake"]
    if os.environ.get(ENV):
        adapters.append("servicebus")
    return adapters


# The peer's clock runs this many times as fast as real time: a 30 s lock ends in 3 s,
# which still leaves room for the SDK's half-second connection opens.
PEER_SPEED = 10.0


@asynccontextmanager
async def _servicebus_peer_harness() -> AsyncIterator[Harness]:
    """The real SDK against the test peer, on plain queues: time passes for real, but
    the peer's clock (which the adapter reads too) runs PEER_SPEED times as fast."""
    spec = QueueSpec(lock_duration=LOCK_DURATION, max_delivery_count=MAX_DELIVERY_COUNT)
    spec = replace(spec, requires_duplicate_detection=True)
    # A second queue, for "its dead letters are not another queue's".
    queues = {QUEUE: spec, "another-queue": spec}
    async with running_peer(queues, speed=PEER_SPEED) as peer:

        def make_bus(_n: int) -> Bus:
            return ServiceBusBus.from_connection_string(peer.connection_string, clock=peer.now)

        async def advance(seconds: float) -> None:
            await asyncio.sleep(seconds / PEER_SPEED)

        # A short real wait is a long one in peer time: kept well inside a lock.
        harness = Harness(make_bus, peer.now, advance, None, quick=0.1, sessions=False)
        try:
            yield harness
        finally:
            for bus in harness.buses:
                await bus.close()


@asynccontextmanager
async def _servicebus_fake_harness() -> AsyncIterator[Harness]:
    clock = FakeClock()
    namespace = FakeServiceBus(
        clock, lock_duration=LOCK_DURATION, max_delivery_count=MAX_DELIVERY_COUNT, wait=True
    )

    async def advance(seconds: float) -> None:
        clock.advance(seconds)

    harness = Harness(lambda _n: fake_servicebus_bus(namespace), clock, advance, None)
    try:
        yield harness
    finally:
        for bus in harness.buses:
            await bus.close()


@asynccontextmanager
async def _servicebus_harness() -> AsyncIterator[Harness]:
    """A real namespace: time passes for real, so `advance` sleeps (slow, by nature)."""
    await create_test_topology(
        [QUEUE], lock_duration=LOCK_DURATION, max_delivery_count=MAX_DELIVERY_COUNT
    )

    def make_bus(_n: int) -> Bus:
        bus = servicebus_bus_from_env()
        assert bus is not None
        return bus

    async def advance(seconds: float) -> None:
        await asyncio.sleep(seconds)

    harness = Harness(make_bus, lambda: datetime.now(UTC), advance, None, quick=1.0)
    try:
        yield harness
    finally:
        for bus in harness.buses:
            await bus.close()


@asynccontextmanager
async def _postgres_harness(server_dsn: str) -> AsyncIterator[Harness]:
    clock = FakeClock()
    async with fresh_database(server_dsn) as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10)

        def make_bus(n: int) -> Bus:
            return PostgresBus(
                pool,
                clock=clock,
                lock_duration=LOCK_DURATION,
                max_delivery_count=MAX_DELIVERY_COUNT,
                # The first bus listens on its own connection, the others on one
                # borrowed from the pool: both ways are exercised.
                listen_dsn=dsn if n == 0 else None,
            )

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        @asynccontextmanager
        async def transaction() -> AsyncIterator[Any]:
            async with pool.acquire() as conn, conn.transaction():
                yield conn

        harness = Harness(make_bus, clock, advance, transaction)
        try:
            yield harness
        finally:
            for bus in harness.buses:
                await bus.close()
            await pool.close()


@pytest.fixture(params=_adapters())
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "postgres":
        factory = _postgres_harness(request.getfixturevalue("pg_dsn"))
    elif request.param == "servicebus-fake":
        factory = _servicebus_fake_harness()
    elif request.param == "servicebus-peer":
        factory = _servicebus_peer_harness()
    else:
        factory = _servicebus_harness()
    async with factory as harness:
        yield harness


@pytest.fixture
def bus(harness: Harness) -> Bus:
    return harness.bus


def msg(session: str, message_id: str, *, at: datetime | None = None) -> OutgoingMessage:
    return OutgoingMessage(QUEUE, message_id, session, message_id.encode(), scheduled_at=at)


def ids(messages: Sequence[ReceivedMessage]) -> list[str]:
    return [m.message_id for m in messages]


def needs_sessions(harness: Harness) -> None:
    if not harness.sessions:
        pytest.skip("the adapter's queues have no sessions")


def transactional(harness: Harness) -> TransactionalBus:
    if harness.transaction is None or not isinstance(harness.bus, TransactionalBus):
        pytest.skip("the adapter cannot join a caller's transaction")
    return harness.bus


class Rollback(Exception):
    pass


async def in_rolled_back_transaction(
    harness: Harness, action: Callable[[Any], Awaitable[None]]
) -> None:
    """Run `action(conn)` in a transaction, then roll it back by raising Rollback."""
    assert harness.transaction is not None
    async with harness.transaction() as conn:
        await action(conn)
        raise Rollback


# -- basics --------------------------------------------------------------------------


async def test_send_receive_complete(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s1", "m1")])
    [got] = await bus.receive(QUEUE, max_wait=harness.quick)
    assert (got.queue, got.message_id, got.session_id, got.body) == (QUEUE, "m1", "s1", b"m1")
    assert got.delivery_count == 1
    assert got.locked_until > harness.now()
    await bus.complete([got])
    assert await bus.receive(QUEUE, max_wait=harness.quick) == []


async def test_receive_returns_at_most_max_messages(harness: Harness, bus: Bus) -> None:
    await bus.send([msg(f"s{i}", f"m{i}") for i in range(5)])
    assert len(await bus.receive(QUEUE, max_messages=2, max_wait=harness.quick)) == 2


async def test_each_session_is_fifo_while_sessions_interleave(harness: Harness, bus: Bus) -> None:
    sent = [msg(f"s{i % 3}", f"m{i:02}") for i in range(12)]
    await bus.send(sent[:5])
    await bus.send(sent[5:])
    seen: dict[str, list[str]] = defaultdict(list)
    while got := await bus.receive(QUEUE, max_messages=2, max_wait=harness.quick):
        for m in got:
            seen[m.session_id].append(m.message_id)
        await bus.complete(got)
    expected = {s: [m.message_id for m in sent if m.session_id == s] for s in ("s0", "s1", "s2")}
    assert seen == expected


async def test_a_duplicate_message_id_is_dropped(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s", "m1"), OutgoingMessage(QUEUE, "m1", "s", b"again")])
    await bus.send([msg("s", "m1"), msg("s", "m2")])
    got = await bus.receive(QUEUE, max_wait=harness.quick)
    assert [(m.message_id, m.body) for m in got] == [("m1", b"m1"), ("m2", b"m2")]


async def test_a_scheduled_message_is_invisible_until_due(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s", "later", at=harness.now() + timedelta(seconds=60))])
    assert await bus.receive(QUEUE, max_wait=harness.quick) == []
    await harness.advance(61)
    assert ids(await bus.receive(QUEUE, max_wait=harness.quick)) == ["later"]


# -- sessions and locks --------------------------------------------------------------


async def test_a_held_session_is_not_given_to_a_second_receiver(harness: Harness, bus: Bus) -> None:
    needs_sessions(harness)
    other = harness.new_bus()
    await bus.send([msg("s1", "a1")])
    first = await bus.receive(QUEUE, max_wait=harness.quick)
    await bus.send([msg("s1", "a2"), msg("s2", "b1")])
    # The second receiver gets the other session only; s1 stays with the first.
    second = await other.receive(QUEUE, max_wait=harness.quick)
    assert ids(second) == ["b1"]
    assert await other.receive(QUEUE, max_wait=harness.quick) == []
    await bus.complete(first)
    assert ids(await other.receive(QUEUE, max_wait=harness.quick)) == ["a2"]


async def test_abandon_redelivers_with_a_higher_delivery_count(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s", "m")])
    first = await bus.receive(QUEUE, max_wait=harness.quick)
    await bus.abandon(first)
    [again] = await bus.receive(QUEUE, max_wait=harness.quick)
    assert (again.message_id, again.delivery_count) == ("m", 2)


async def test_an_expired_lock_redelivers(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s", "m")])
    [first] = await bus.receive(QUEUE, max_wait=harness.quick)
    await harness.advance(LOCK_DURATION / 2)
    assert await bus.receive(QUEUE, max_wait=harness.quick) == []
    await harness.advance(LOCK_DURATION)
    # Asked by the receiver that held it: one that asked before and has not asked since
    # may be sent it first, and (in the Service Bus SDK) give it back only on its
    # keep-alive, 5 s later.
    [again] = await bus.receive(QUEUE, max_wait=harness.quick)
    assert (again.message_id, again.delivery_count) == ("m", 2)
    assert again.lock_token != first.lock_token


async def test_completing_after_the_lock_was_taken_over_raises(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s", "m")])
    first = await bus.receive(QUEUE, max_wait=harness.quick)
    await harness.advance(LOCK_DURATION + 1)
    again = await bus.receive(QUEUE, max_wait=harness.quick)
    with pytest.raises(MessageLockLostError):
        await bus.complete(first)
    await bus.complete(again)
    assert await bus.receive(QUEUE, max_wait=harness.quick) == []


async def test_completing_after_the_lock_expired_raises(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s", "m")])
    first = await bus.receive(QUEUE, max_wait=harness.quick)
    await harness.advance(LOCK_DURATION + 1)
    with pytest.raises(MessageLockLostError):
        await bus.complete(first)
    assert ids(await bus.receive(QUEUE, max_wait=harness.quick)) == ["m"]


async def test_an_expired_session_is_received_again_in_order_across_receives(
    harness: Harness, bus: Bus
) -> None:
    needs_sessions(harness)
    await bus.send([msg("s", "m1"), msg("s", "m2"), msg("s", "m3"), msg("t", "t1")])
    first = await bus.receive(QUEUE, max_messages=2, max_wait=harness.quick)
    assert ids(first) == ["m1", "m2"]
    await harness.advance(LOCK_DURATION + 1)
    other = harness.new_bus()
    # A window smaller than what the session has pending: the rest waits its turn.
    [again] = await other.receive(QUEUE, max_messages=1, max_wait=harness.quick)
    assert (again.message_id, again.delivery_count) == ("m1", 2)
    assert ids(await other.receive(QUEUE, max_wait=harness.quick)) == ["t1"]
    await other.complete([again])
    rest = await other.receive(QUEUE, max_wait=harness.quick)
    assert [(m.message_id, m.delivery_count) for m in rest] == [("m2", 2), ("m3", 1)]
    with pytest.raises(MessageLockLostError):
        await bus.complete(first[1:])


async def test_renewing_keeps_the_lock(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s", "m1"), msg("t", "m2")])
    got = await bus.receive(QUEUE, max_wait=harness.quick)
    await harness.advance(LOCK_DURATION * 0.75)
    await bus.renew_lock(got)
    await harness.advance(LOCK_DURATION * 0.75)
    assert await harness.new_bus().receive(QUEUE, max_wait=harness.quick) == []
    await bus.complete(got)


async def test_renewing_one_message_renews_its_session(harness: Harness, bus: Bus) -> None:
    needs_sessions(harness)
    await bus.send([msg("s", "m1"), msg("s", "m2")])
    got = await bus.receive(QUEUE, max_wait=harness.quick)
    await harness.advance(LOCK_DURATION * 0.75)
    await bus.renew_lock(got[:1])
    await harness.advance(LOCK_DURATION * 0.75)
    assert await harness.new_bus().receive(QUEUE, max_wait=harness.quick) == []
    await bus.complete(got)


async def test_each_message_has_a_lock_of_its_own_without_sessions(
    harness: Harness, bus: Bus
) -> None:
    if harness.sessions:
        pytest.skip("a session lock covers all of its messages")
    await bus.send([msg("s", "m1"), msg("s", "m2")])
    got = await bus.receive(QUEUE, max_wait=harness.quick)
    await harness.advance(LOCK_DURATION * 0.75)
    await bus.renew_lock(got[:1])
    await harness.advance(LOCK_DURATION * 0.75)
    [again] = await bus.receive(QUEUE, max_wait=harness.quick)
    assert (again.message_id, again.delivery_count) == ("m2", 2)
    await bus.complete(got[:1])
    with pytest.raises(MessageLockLostError):
        await bus.complete(got[1:])


async def test_renewing_a_lost_lock_raises(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s", "m")])
    got = await bus.receive(QUEUE, max_wait=harness.quick)
    await harness.advance(LOCK_DURATION + 1)
    with pytest.raises(MessageLockLostError):
        await bus.renew_lock(got)


# -- dead letters --------------------------------------------------------------------


async def test_dead_lettered_after_the_max_delivery_count(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s", "poison")])
    for attempt in range(1, MAX_DELIVERY_COUNT + 1):
        [got] = await bus.receive(QUEUE, max_wait=harness.quick)
        assert got.delivery_count == attempt
        # Alternate the two ways a delivery fails: abandon and lock expiry.
        if attempt % 2:
            await bus.abandon([got])
        else:
            await harness.advance(LOCK_DURATION + 1)
    assert await bus.receive(QUEUE, max_wait=harness.quick) == []
    [dead] = await bus.dead_letters(QUEUE)
    assert (dead.message_id, dead.session_id, dead.body) == ("poison", "s", b"poison")
    assert (dead.reason, dead.delivery_count) == ("MaxDeliveryCountExceeded", MAX_DELIVERY_COUNT)
    # The session is free again for its next message.
    await bus.send([msg("s", "next")])
    assert ids(await bus.receive(QUEUE, max_wait=harness.quick)) == ["next"]


async def test_explicit_dead_letter_keeps_reason_and_description(
    harness: Harness, bus: Bus
) -> None:
    await bus.send([msg("s", "bad"), msg("s", "good")])
    bad, good = await bus.receive(QUEUE, max_wait=harness.quick)
    await bus.dead_letter(bad, reason="InvalidBody", description="not JSON")
    await bus.complete([good])
    [dead] = await bus.dead_letters(QUEUE)
    assert (dead.message_id, dead.reason, dead.description) == ("bad", "InvalidBody", "not JSON")
    # Deliveries made (Postgres) or deliveries failed before it (Service Bus's count).
    assert dead.delivery_count in (0, 1)
    assert await bus.receive(QUEUE, max_wait=harness.quick) == []
    assert await bus.dead_letters("another-queue") == []


async def test_dead_lettering_after_the_lock_was_lost_raises(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s", "m")])
    [got] = await bus.receive(QUEUE, max_wait=harness.quick)
    await harness.advance(LOCK_DURATION + 1)
    with pytest.raises(MessageLockLostError):
        await bus.dead_letter(got, reason="r", description="d")
    assert await bus.dead_letters(QUEUE) == []


async def test_dead_letters_are_received_once_for_handling(harness: Harness, bus: Bus) -> None:
    await bus.send([msg("s", "m1"), msg("t", "m2")])
    for got in await bus.receive(QUEUE, max_wait=harness.quick):
        await bus.dead_letter(got, reason="Poison", description=f"cannot handle {got.message_id}")
    letters = await bus.receive_dead_letters(QUEUE, max_messages=10)
    assert [(d.letter.message_id, d.letter.reason, d.letter.description) for d in letters] == [
        ("m1", "Poison", "cannot handle m1"),
        ("m2", "Poison", "cannot handle m2"),
    ]
    assert [d.message.body for d in letters] == [b"m1", b"m2"]
    # Locked for whoever took them, and gone from handling once completed.
    assert await harness.new_bus().receive_dead_letters(QUEUE) == []
    await bus.complete([d.message for d in letters])
    await harness.advance(LOCK_DURATION + 1)
    assert await harness.new_bus().receive_dead_letters(QUEUE) == []


async def test_an_unsettled_dead_letter_is_handed_out_again_after_its_lock(
    harness: Harness, bus: Bus
) -> None:
    await bus.send([msg("s", "m")])
    [got] = await bus.receive(QUEUE, max_wait=harness.quick)
    await bus.dead_letter(got, reason="Poison", description="d")
    [first] = await bus.receive_dead_letters(QUEUE)
    await harness.advance(LOCK_DURATION + 1)
    [again] = await bus.receive_dead_letters(QUEUE)
    assert again.letter.message_id == "m"
    with pytest.raises(MessageLockLostError):
        await bus.complete([first.message])
    await bus.complete([again.message])
    assert await harness.new_bus().receive_dead_letters(QUEUE) == []


# -- waiting -------------------------------------------------------------------------


async def _blocked_receive(bus: Bus) -> asyncio.Task[list[ReceivedMessage]]:
    task = asyncio.create_task(bus.receive(QUEUE, max_wait=LONG_WAIT))
    await asyncio.sleep(0.3)  # let it look, find nothing and start waiting
    assert not task.done()
    return task


async def test_a_waiting_receive_wakes_on_a_send_from_another_client(harness: Harness) -> None:
    task = await _blocked_receive(harness.bus)
    await harness.new_bus().send([msg("s", "late")])
    assert ids(await task) == ["late"]


async def test_a_waiting_receive_wakes_when_a_held_session_is_released(
    harness: Harness, bus: Bus
) -> None:
    needs_sessions(harness)
    await bus.send([msg("s", "first")])
    first = await bus.receive(QUEUE, max_wait=harness.quick)
    await bus.send([msg("s", "second")])
    task = await _blocked_receive(harness.new_bus())
    await bus.complete(first)
    assert ids(await task) == ["second"]


async def test_competing_receivers_keep_sessions_exclusive_and_ordered(
    harness: Harness, bus: Bus
) -> None:
    needs_sessions(harness)
    sent = [msg(f"s{i % 20}", f"m{i:03}") for i in range(200)]
    for start in range(0, len(sent), 25):
        await bus.send(sent[start : start + 25])
    seen: dict[str, list[str]] = defaultdict(list)
    held: set[str] = set()

    async def consume(receiver: Bus) -> None:
        while got := await receiver.receive(QUEUE, max_messages=7, max_wait=0.2):
            sessions = {m.session_id for m in got}
            assert not sessions & held, "a session was given to two receivers at once"
            held.update(sessions)
            await asyncio.sleep(0)  # hold them while the others receive
            for m in got:
                seen[m.session_id].append(m.message_id)
            held.difference_update(sessions)  # before completing, which frees them
            await receiver.complete(got)

    await asyncio.gather(consume(bus), *(consume(harness.new_bus()) for _ in range(3)))
    assert seen == {
        f"s{n}": [m.message_id for m in sent if m.session_id == f"s{n}"] for n in range(20)
    }


async def test_competing_receivers_take_each_message_once(harness: Harness, bus: Bus) -> None:
    sent = [msg(f"s{i % 20}", f"m{i:03}") for i in range(200)]
    for start in range(0, len(sent), 25):
        await bus.send(sent[start : start + 25])
    seen: list[str] = []

    async def consume(receiver: Bus) -> None:
        while got := await receiver.receive(QUEUE, max_messages=7, max_wait=harness.quick):
            seen.extend(m.message_id for m in got)
            await receiver.complete(got)

    await asyncio.gather(consume(bus), *(consume(harness.new_bus()) for _ in range(3)))
    assert sorted(seen) == [m.message_id for m in sent]


# -- joining the caller's transaction ------------------------------------------------


async def test_send_in_a_rolled_back_transaction_sends_nothing(harness: Harness) -> None:
    bus = transactional(harness)
    assert harness.transaction is not None
    with pytest.raises(Rollback):
        await in_rolled_back_transaction(harness, lambda conn: bus.send_in(conn, [msg("s", "m")]))
    assert await bus.receive(QUEUE, max_wait=harness.quick) == []
    async with harness.transaction() as conn:
        await bus.send_in(conn, [msg("s", "m")])
    assert ids(await bus.receive(QUEUE, max_wait=harness.quick)) == ["m"]


async def test_complete_in_a_rolled_back_transaction_completes_nothing(harness: Harness) -> None:
    bus = transactional(harness)
    assert harness.transaction is not None
    await bus.send([msg("s", "m")])
    got = await bus.receive(QUEUE, max_wait=harness.quick)
    with pytest.raises(Rollback):
        await in_rolled_back_transaction(harness, lambda conn: bus.complete_in(conn, got))
    # Still locked by us, not by anybody else, and still ours to complete.
    assert await harness.new_bus().receive(QUEUE, max_wait=harness.quick) == []
    async with harness.transaction() as conn:
        await bus.complete_in(conn, got)
    await harness.advance(LOCK_DURATION + 1)
    assert await bus.receive(QUEUE, max_wait=harness.quick) == []


async def test_complete_in_raises_when_the_lock_was_lost(harness: Harness) -> None:
    bus = transactional(harness)
    assert harness.transaction is not None
    await bus.send([msg("s", "m")])
    first = await bus.receive(QUEUE, max_wait=harness.quick)
    await harness.advance(LOCK_DURATION + 1)
    again = await bus.receive(QUEUE, max_wait=harness.quick)
    with pytest.raises(MessageLockLostError):
        async with harness.transaction() as conn:
            await bus.complete_in(conn, first)
    async with harness.transaction() as conn:
        await bus.complete_in(conn, again)
    assert await bus.receive(QUEUE, max_wait=harness.quick) == []


# -- the Postgres adapter beyond the contract ----------------------------------------


async def test_a_waiting_receive_wakes_when_a_scheduled_message_is_due(
    pg_pool: asyncpg.Pool,
) -> None:
    bus = PostgresBus(pg_pool)  # the real clock: the wake-up time comes from the database
    try:
        due = datetime.now(UTC) + timedelta(seconds=0.5)
        task = asyncio.create_task(bus.receive(QUEUE, max_wait=LONG_WAIT))
        await bus.send([msg("s", "timer", at=due)])
        # Woken by the send, it finds nothing visible and sleeps until the message is
        # due, not until max_wait.
        assert ids(await asyncio.wait_for(task, LONG_WAIT / 2)) == ["timer"]
    finally:
        await bus.close()


async def test_complete_is_all_or_nothing(pg_pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    bus = PostgresBus(pg_pool, clock=clock, lock_duration=LOCK_DURATION)
    await bus.send([msg("s1", "a"), msg("s2", "b")])
    a, b = await bus.receive(QUEUE, max_wait=0)
    clock.advance(LOCK_DURATION * 0.75)
    await bus.renew_lock([a])
    clock.advance(LOCK_DURATION * 0.75)
    with pytest.raises(MessageLockLostError, match="1 of 2"):
        await bus.complete([a, b])
    await bus.complete([a])  # `a` was not completed by the failed call, and is still ours
    assert ids(await bus.receive(QUEUE, max_wait=0)) == ["b"]
