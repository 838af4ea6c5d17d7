"""The Postgres bus's receivers: leases, reaping the dead, suspects received alone, and
crash redeliveries told apart from failed deliveries."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from pg import FakeClock

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.core.ports import MessageLockLostError, OutgoingMessage

pytestmark = pytest.mark.timeout(30)

Q = "steps.work"


@pytest.fixture
async def buses(pg_pool: asyncpg.Pool) -> AsyncIterator[Callable[..., PostgresBus]]:
    clock = FakeClock()
    made: list[PostgresBus] = []

    def make(**options: int) -> PostgresBus:
        bus = PostgresBus(pg_pool, clock=clock, lock_duration=30, **options)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.close()


def _spawned_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def _die(pool: asyncpg.Pool, bus: PostgresBus) -> None:
    """Make `bus` look like a process on this machine that died (kill -9)."""
    await pool.execute(
        "UPDATE bus_receivers SET pid = $2 WHERE receiver = $1", bus.receiver_id, _spawned_pid()
    )


def msg(session: str, message_id: str) -> OutgoingMessage:
    return OutgoingMessage(Q, message_id, session, message_id.encode())


async def test_recovering_never_touches_the_locks_of_a_live_receiver(
    pg_pool: asyncpg.Pool, buses: Callable[..., PostgresBus]
) -> None:
    live, newcomer = buses(), buses()
    await live.send([msg("s1", "m1")])
    [held] = await live.receive(Q, max_wait=0)
    # A process starting up (a restarted `sagaflow run`) recovers what the dead held:
    assert await newcomer.reap() == 0
    assert await newcomer.receive(Q, max_wait=0) == []
    await live.complete([held])  # still the live receiver's to settle


async def test_a_dead_receivers_messages_come_back_at_once_and_suspects_alone(
    pg_pool: asyncpg.Pool, buses: Callable[..., PostgresBus]
) -> None:
    dead, heir = buses(), buses()
    await dead.send([msg("s1", "m1"), msg("s2", "m2"), msg("s3", "m3")])
    lost = await dead.receive(Q, max_messages=2, max_wait=0)
    assert [m.message_id for m in lost] == ["m1", "m2"]
    await _die(pg_pool, dead)
    assert await heir.reap() == 1
    # No waiting for the lock to expire; one death is no reason for suspicion.
    again = await heir.receive(Q, max_messages=2, max_wait=0)
    assert [(m.message_id, m.delivery_count, m.crash_count) for m in again] == [
        ("m1", 2, 1),
        ("m2", 2, 1),
    ]
    with pytest.raises(MessageLockLostError):
        await dead.complete(lost[:1])
    await _die(pg_pool, heir)
    last = buses()
    assert await last.reap() == 1
    # Held at two deaths: suspects, each received alone, oldest first.
    first = await last.receive(Q, max_wait=0)
    assert [(m.message_id, m.crash_count) for m in first] == [("m1", 2)]
    second = await last.receive(Q, max_wait=0)
    assert [(m.message_id, m.crash_count) for m in second] == [("m2", 2)]
    third = await last.receive(Q, max_wait=0)
    assert [(m.message_id, m.crash_count) for m in third] == [("m3", 0)]
    await last.complete([*first, *second, *third])
    assert (
        await pg_pool.fetchval(
            "SELECT count(*) FROM bus_receivers WHERE receiver = $1", dead.receiver_id
        )
        == 0
    )


async def test_a_crash_loop_dead_letters_only_the_message_that_runs_alone(
    pg_pool: asyncpg.Pool, buses: Callable[..., PostgresBus]
) -> None:
    # Deliveries ended by a crash do not count: with a maximum of 2 deliveries, the
    # healthy message survives many deaths; the one its receivers died running alone
    # (once it was a suspect, after two deaths) goes to the dead letters after 3 such.
    await buses().send([msg("bad", "poison"), msg("good", "healthy")])
    deaths = 0
    seen: list[tuple[str, int]] = []
    while deaths < 10:
        bus = buses(max_delivery_count=2, max_crash_count=3)
        await bus.reap()
        got = await bus.receive(Q, max_wait=0)
        if not got:
            break
        seen += [(m.message_id, m.crash_count) for m in got]
        if [m.message_id for m in got] == ["healthy"]:
            await bus.complete(got)  # the healthy one runs fine once it runs alone
            continue
        await _die(pg_pool, bus)  # what the poison does to every process running it
        deaths += 1
    letters = await buses().dead_letters(Q)
    assert [(d.message_id, d.reason) for d in letters] == [("poison", "ReceiverCrashed")]
    assert "died 3 times while it ran this message alone" in letters[0].description
    assert ("healthy", 2) in seen  # held at the first two deaths, not blamed since
    assert deaths == 5  # two deaths beside the healthy one, then three alone


async def test_a_receiver_whose_lease_ran_out_elsewhere_is_reaped(
    pg_pool: asyncpg.Pool, buses: Callable[..., PostgresBus]
) -> None:
    gone = uuid.uuid4()
    await pg_pool.execute(
        "INSERT INTO bus_receivers (receiver, host, hostname, pid, pid_started, started_at, "
        "lease_until) VALUES ($1, 'another-machine', 'node-7', 1, 0, now(), now() - "
        "interval '1 minute')",
        gone,
    )
    alive_elsewhere = uuid.uuid4()
    await pg_pool.execute(
        "INSERT INTO bus_receivers (receiver, host, hostname, pid, pid_started, started_at, "
        "lease_until) VALUES ($1, 'another-machine', 'node-8', 1, 0, now(), now() + "
        "interval '1 minute')",
        alive_elsewhere,
    )
    assert await buses().reap() == 1
    left = {r["receiver"] for r in await pg_pool.fetch("SELECT receiver FROM bus_receivers")}
    assert gone not in left and alive_elsewhere in left


async def test_closing_leaves_cleanly_and_hands_back_what_was_held(
    pg_pool: asyncpg.Pool, buses: Callable[..., PostgresBus]
) -> None:
    bus = buses()
    await bus.send([msg("s", "m")])
    await bus.receive(Q, max_wait=0)
    await bus.close()
    [again] = await buses().receive(Q, max_wait=0)
    assert (again.delivery_count, again.crash_count) == (2, 0)  # not a crash


async def test_a_receive_whose_answer_was_lost_hands_its_messages_back_at_once(
    buses: Callable[..., PostgresBus], monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = buses()
    await bus.send([msg("s", "m")])
    fetch = asyncpg.connection.Connection.fetch
    lost: list[str] = []

    async def answer_lost(self: asyncpg.Connection, query: str, *args: object) -> object:
        rows = await fetch(self, query, *args)
        if "bus_receive" in query and not lost:
            lost.append(query)  # the server locked the message; the answer never came
            raise asyncpg.ConnectionDoesNotExistError("connection was closed")
        return rows

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", answer_lost)
    with pytest.raises(asyncpg.ConnectionDoesNotExistError):
        await bus.receive(Q, max_wait=0)
    # Not after the 30 s lock: at once, and as if it had not been delivered.
    [again] = await bus.receive(Q, max_wait=0)
    assert (again.message_id, again.delivery_count) == ("m", 1)
