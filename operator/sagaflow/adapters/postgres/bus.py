"""The embedded message bus: Azure Service Bus semantics over Postgres tables.

It lives in the state database (tables in `migrations/0001_bus.sql`) so a state
change, the messages it sends and the messages it consumed commit in one
transaction (`send_in`, `complete_in`), with no outbox relay.

Semantics (Service Bus's): every message belongs to a session; a receive locks whole
sessions (a `bus_sessions` row) and the session's messages with the same token, so
one receiver at a time sees a session, in send order. A session is released when its
holder has settled every message it got; an expired lock lets the session and its
unsettled messages be received again (delivery count + 1). A message received more
than `max_delivery_count` times is dead-lettered instead. Times come from the
injected clock, passed as parameters, never from the database's now().

Beyond Service Bus: a receiving bus holds a lease (`receivers.py`), so a receiver
that died is told apart from one that is merely slow. What a dead receiver held is
released at once and counts a crash, not a failed delivery; a message held at two such
deaths is a suspect and is received alone (`ReceivedMessage.crash_count`),
and one whose receiver dies again while running it alone `max_crash_count` times is
dead-lettered as `ReceiverCrashed`. Dead letters are received too
(`receive_dead_letters`), by the orchestrator, which fails the step they belong to.

Each operation is one statement over arrays (`unnest`), so batches cost one round
trip. Waiting receivers sleep on LISTEN (channel `sagaflow_bus`, payload the queue)
or until the next scheduled message or lock expiry, never polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from sagaflow.adapters.postgres import bus_sql as sql
from sagaflow.adapters.postgres.receivers import ReceiverLease
from sagaflow.core.ports import (
    DEAD_LETTER_SUFFIX,
    Clock,
    DeadLetter,
    MessageLockLostError,
    OutgoingMessage,
    ReceivedDeadLetter,
    ReceivedMessage,
    dead_letter_queue,
    utc_now,
)

NOTIFY_CHANNEL = "sagaflow_bus"
# Notified (payload: the queue) whenever a message goes to the dead letters.
DEAD_LETTERS_CHANNEL = "sagaflow_dead_letters"

# A receive that lost every session it picked to concurrent receivers (or whose
# messages all went to the dead letters) tries again at once; bounded, in case
# contention is extreme.
_RECEIVE_ATTEMPTS = 8


def _held(messages: Sequence[ReceivedMessage]) -> list[list[Any]]:
    """[queues, seqs, tokens, session ids] of distinct messages, for `sql.LOCK_SESSIONS`."""
    held = {int(m.handle): (m.queue, int(m.handle), m.lock_token, m.session_id) for m in messages}
    return _columns(held.values())


def _columns(rows: Iterable[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows to per-column lists: the arrays `unnest` turns back into rows."""
    return [list(column) for column in zip(*rows, strict=True)]


class PostgresBus:
    """A `TransactionalBus` over an asyncpg pool on a database migrated by `migrate()`.

    `listen_dsn` opens the LISTEN connection for waiting receivers; without it one
    pool connection is borrowed until `close()`, which must come before the pool's.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        clock: Clock = utc_now,
        lock_duration: float = 60.0,
        max_delivery_count: int = 10,
        max_crash_count: int = 3,
        listen_dsn: str | None = None,
        lease_seconds: float = 10.0,
        lease_interval: float = 2.0,
    ) -> None:
        if lock_duration <= 0 or max_delivery_count < 1 or max_crash_count < 1:
            raise ValueError(
                "lock_duration must be > 0, max_delivery_count and max_crash_count >= 1"
            )
        self._pool = pool
        self._clock = clock
        self._lock_duration = timedelta(seconds=lock_duration)
        self._max_delivery_count = max_delivery_count
        self._max_crash_count = max_crash_count
        self._lease = ReceiverLease(pool, lease_seconds=lease_seconds, interval=lease_interval)
        self._listen_dsn = listen_dsn
        # One event per queue with waiters; a notification pops and sets it, so every
        # receiver that took the event before the notification wakes, none misses it.
        self._events: dict[str, asyncio.Event] = {}
        self._listener: Any = None
        self._lost_listener: Any = None
        self._listener_lock = asyncio.Lock()
        self._closed = False
        self._orphans: set[uuid.UUID] = set()  # tokens of receives that never returned

    # -- sending ------------------------------------------------------------------

    async def prepare(self, *, send: Sequence[str] = (), receive: Sequence[str] = ()) -> None:
        """Nothing to open: a queue is rows in the state database."""

    async def send(self, messages: Sequence[OutgoingMessage]) -> None:
        if messages:
            async with self._pool.acquire() as conn:
                await self.send_in(conn, messages)

    async def send_in(self, conn: Any, messages: Sequence[OutgoingMessage]) -> None:
        """Send within `conn`'s transaction: visible (and notified) when it commits."""
        if messages:
            rows = [(m.queue, m.message_id, m.session_id, m.body, m.scheduled_at) for m in messages]
            headers = [encode_headers(m.headers) for m in messages]
            await conn.execute(sql.SEND, *_columns(rows), self._clock(), headers)

    # -- receiving ----------------------------------------------------------------

    async def receive(
        self, queue: str, *, max_messages: int = 100, max_wait: float = 5.0
    ) -> list[ReceivedMessage]:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        await self._lease.ensure()
        while not self._closed:
            # Taken before looking, so a send committed after the look still wakes us.
            wake = await self._wake_event(queue) if max_wait > 0 else None
            messages = await self._receive_now(queue, max_messages)
            remaining = deadline - loop.time()
            if messages or wake is None or remaining <= 0:
                return messages
            await self._sleep(queue, wake, remaining)
        return []

    async def _receive_now(self, queue: str, max_messages: int) -> list[ReceivedMessage]:
        for _ in range(_RECEIVE_ATTEMPTS):
            now = self._clock()
            until = now + self._lock_duration
            # One token for every session this receive locks: settling always names
            # the session too, and sessions are locked by one receive at a time.
            token = uuid.uuid4()
            async with self._pool.acquire() as conn:
                if self._orphans:
                    await self._release_orphans(conn)
                try:
                    rows = await conn.fetch(
                        sql.RECEIVE,
                        queue,
                        now,
                        max_messages,
                        until,
                        self._max_delivery_count,
                        token,
                        self._lease.id,
                        self._max_crash_count,
                    )
                except BaseException:
                    # The connection died or the receive was cancelled: the server may
                    # have locked messages under a token nobody here will settle.
                    self._orphans.add(token)
                    raise
                messages = [
                    _received(queue, row, until, str(token)) for row in rows if row["kind"] == "m"
                ]
                summary = next(row for row in rows if row["kind"] == "w")
                idle = set(summary["won"] or ()) - {m.session_id for m in messages}
                if idle:
                    # Won sessions whose messages went meanwhile (or to the dead letters):
                    # abandon no message (seq 0 is never used) to release them.
                    sessions = [(queue, 0, token, session) for session in sorted(idle)]
                    await conn.fetchrow(sql.ABANDON, *_columns(sessions))
            if messages or summary["seq"] == 0:
                return sorted(messages, key=lambda m: int(m.handle))
        return []

    async def _release_orphans(self, conn: Any) -> None:
        """Hand back what receives that never returned may have locked, at once and as
        if never delivered, rather than after the lock duration."""
        tokens = list(self._orphans)
        await conn.execute(sql.RELEASE_TOKENS, tokens)
        self._orphans.difference_update(tokens)

    async def _sleep(self, queue: str, wake: asyncio.Event, remaining: float) -> None:
        async with self._pool.acquire() as conn:
            now = self._clock()
            due: datetime | None = await conn.fetchval(sql.NEXT_DUE, queue, now)
        timeout = remaining if due is None else min(remaining, (due - now).total_seconds())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), max(timeout, 0.0))

    # -- settling -----------------------------------------------------------------

    async def complete(self, messages: Sequence[ReceivedMessage]) -> None:
        """Complete all or none: a lost lock raises and completes nothing."""
        if messages:
            async with self._pool.acquire() as conn, conn.transaction():
                await self.complete_in(conn, messages)

    async def complete_in(self, conn: Any, messages: Sequence[ReceivedMessage]) -> None:
        """Complete within `conn`'s transaction. On MessageLockLostError the caller must
        roll back: the messages will be (or already were) delivered again.

        Dead letters (from `receive_dead_letters`) are marked handled and kept."""
        letters = [m for m in messages if m.queue.endswith(DEAD_LETTER_SUFFIX)]
        messages = [m for m in messages if not m.queue.endswith(DEAD_LETTER_SUFFIX)]
        if letters:
            wanted = {int(m.handle): uuid.UUID(m.lock_token) for m in letters}
            done = await conn.execute(
                sql.COMPLETE_DEAD, list(wanted), list(wanted.values()), self._clock()
            )
            if done != f"UPDATE {len(wanted)}":
                raise MessageLockLostError("a dead letter is no longer locked by this receiver")
        if messages:
            held = _held(messages)
            settled, _ = await conn.fetchrow(sql.COMPLETE, *held, self._clock())
            if settled != len(held[1]):
                raise MessageLockLostError(
                    f"{len(held[1]) - settled} of {len(held[1])} messages are no longer "
                    "locked by this receiver (lock expired or taken over)"
                )

    async def reply(
        self, completed: Sequence[ReceivedMessage], messages: Sequence[OutgoingMessage]
    ) -> None:
        """Send and complete in one transaction: a runner's result and the settlement
        of its command commit together, one commit per batch instead of two."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self.send_in(conn, messages)
            await self.complete_in(conn, completed)

    async def abandon(self, messages: Sequence[ReceivedMessage]) -> None:
        """Release the locks for redelivery; a lock already lost is left as it is."""
        if messages:
            async with self._pool.acquire() as conn:
                await conn.fetchrow(sql.ABANDON, *_held(messages))

    async def dead_letter(self, message: ReceivedMessage, *, reason: str, description: str) -> None:
        async with self._pool.acquire() as conn:
            settled, _ = await conn.fetchrow(
                sql.DEAD_LETTER, *_held([message]), self._clock(), reason, description
            )
        if settled != 1:
            raise MessageLockLostError(f"message {message.message_id!r} is no longer locked")

    async def renew_lock(self, messages: Sequence[ReceivedMessage]) -> None:
        """Extend the locks of the messages' sessions, which cover all their messages."""
        if not messages:
            return
        now = self._clock()
        async with self._pool.acquire() as conn:
            renewed, wanted = await conn.fetchrow(
                sql.RENEW, *_held(messages), now, now + self._lock_duration
            )
        if renewed != wanted:
            raise MessageLockLostError(f"{wanted - renewed} session lock(s) already lost")

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(sql.DEAD_LETTERS, queue)
        return [DeadLetter(**dict(row)) for row in rows]

    async def receive_dead_letters(
        self, queue: str, *, max_messages: int = 100
    ) -> list[ReceivedDeadLetter]:
        now = self._clock()
        until = now + self._lock_duration
        token = uuid.uuid4()
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(sql.RECEIVE_DEAD, queue, now, token, until, max_messages)
        return [
            ReceivedDeadLetter(
                DeadLetter(
                    queue=row["queue"],
                    message_id=row["message_id"],
                    session_id=row["session_id"],
                    body=bytes(row["body"]),
                    reason=row["reason"],
                    description=row["description"],
                    delivery_count=row["delivery_count"],
                    dead_lettered_at=row["dead_lettered_at"],
                ),
                _received(dead_letter_queue(queue), row, until, str(token)),
            )
            for row in sorted(rows, key=lambda r: int(r["seq"]))
        ]

    async def reap(self) -> int:
        """Release what receivers that died held (see `receivers.py`); how many."""
        return await self._lease.reap()

    @property
    def receiver_id(self) -> uuid.UUID:
        return self._lease.id

    # -- wake-ups -----------------------------------------------------------------

    async def _wake_event(self, queue: str) -> asyncio.Event:
        await self._ensure_listener()
        return self._events.setdefault(queue, asyncio.Event())

    async def _ensure_listener(self) -> None:
        async with self._listener_lock:
            if self._listener is not None or self._closed:
                return
            if self._lost_listener is not None:
                lost, self._lost_listener = self._lost_listener, None
                await self._drop_connection(lost)
            if self._listen_dsn is not None:
                conn = await asyncpg.connect(self._listen_dsn)
            else:
                conn = await self._pool.acquire()
            try:
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                conn.add_termination_listener(self._on_listener_lost)
            except BaseException:
                # Cancelled (a receive stopped at shutdown) or failed mid-setup: give the
                # connection back, or closing the pool would wait for it forever.
                await asyncio.shield(self._drop_connection(conn))
                raise
            self._listener = conn

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, queue: str) -> None:
        event = self._events.pop(queue, None)
        if event is not None:
            event.set()

    def _on_listener_lost(self, _conn: Any) -> None:
        # Notifications may have been missed: wake every waiter to look again; the
        # next wait opens a new listener.
        self._lost_listener, self._listener = self._listener, None
        self._wake_all()

    def _wake_all(self) -> None:
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    async def close(self) -> None:
        """Stop listening and wake waiting receivers, which then return nothing."""
        self._closed = True
        self._wake_all()
        if self._orphans:
            with contextlib.suppress(Exception):
                async with self._pool.acquire() as conn:
                    await self._release_orphans(conn)
        await self._lease.close()
        async with self._listener_lock:
            conn, self._listener = self._listener, None
            lost, self._lost_listener = self._lost_listener, None
            if lost is not None:
                await self._drop_connection(lost)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.remove_termination_listener(self._on_listener_lost)
                    await conn.remove_listener(NOTIFY_CHANNEL, self._on_notify)
                await self._drop_connection(conn)

    async def _drop_connection(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            if self._listen_dsn is not None:
                await conn.close()
            else:
                await self._pool.release(conn)


def _received(queue: str, row: Any, locked_until: datetime, lock_token: str) -> ReceivedMessage:
    return ReceivedMessage(
        queue=queue,
        message_id=row["message_id"],
        session_id=row["session_id"],
        body=bytes(row["body"]),
        delivery_count=row["delivery_count"],
        enqueued_at=row["enqueued_at"],
        locked_until=locked_until,
        lock_token=lock_token,
        handle=row["seq"],
        crash_count=row["crash_count"],
        headers=decode_headers(row["headers"]),
    )


def encode_headers(headers: Mapping[str, str] | None) -> str | None:
    """Headers as the JSON text a `jsonb` column takes; None when there are none."""
    return json.dumps(dict(headers), separators=(",", ":")) if headers else None


def decode_headers(raw: str | None) -> dict[str, str] | None:
    """Headers read back from a `jsonb` column (asyncpg hands it over as text)."""
    return {str(k): str(v) for k, v in json.loads(raw).items()} if raw else None
