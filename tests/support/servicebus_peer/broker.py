"""The in-memory namespace: Service Bus's message rules over plain entity state.

Pure: no sockets, no threads, no AMQP types, and time comes from an injected clock, so
every rule can be tested without sleeping. `Broker` is the one entry point; it applies
what has come due before every operation, and leaves the transitions shared by several
operations to `lifecycle.py` and session locking to `sessions.py`. The AMQP side
(`amqp.py`, `consumers.py`, `management.py`) calls it from its single event-loop
thread and turns the results and `PeerError`s into frames.

The rules, as Service Bus applies them:

- Sequence numbers are per queue, from 1, assigned on enqueue (or when scheduling).
- Peek-lock hands out the lowest available sequence number (per session on session
  queues) under a fresh lock token. Complete removes the message; abandon returns it
  with its delivery count raised by one; release (a prefetched message given back)
  returns it unchanged; defer parks it until fetched by sequence number; dead-letter
  moves it to `<queue>/$DeadLetterQueue` with a reason and description.
- The delivery count a receiver sees is the number of earlier failed deliveries: 0 on
  the first. A lock that expires counts as a failed delivery. When the count reaches
  the queue's max delivery count the message is dead-lettered with reason
  `MaxDeliveryCountExceeded` instead of being offered again.
- On session queues the session lock governs all of the session's messages. A session
  is locked by one owner at a time; when its lock expires or its owner lets go, the
  session is free again and the messages its owner held come back as failed
  deliveries. Expired session locks are reported through `take_lost_sessions()`, so the
  AMQP side can detach the owner's link.
- Messages expire after their time to live (or the queue's default) while not locked;
  with `dead_lettering_on_message_expiration` they go to the dead-letter subqueue.
- Scheduled messages are invisible to receivers until their time (peek shows them).
- With duplicate detection on, a message id seen within the window is dropped.

Owners are opaque strings chosen by the caller (the AMQP side uses connection and
link name), so the broker can tell "locked by you" from "locked by someone else".
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Iterable, Sequence

from .entities import (
    DEAD_LETTER_SUFFIX,
    Entity,
    Entry,
    EntryState,
    Envelope,
    Lease,
    QueueSpec,
    Session,
)
from .errors import EntityNotFound, MessageLockLost, MessageNotFound, NotAllowed, SessionLockLost
from .lifecycle import Clock, Due, Lifecycle, Timeline
from .sessions import LostSession, Sessions

__all__ = ["Broker", "LostSession", "Outcome"]


class Outcome(enum.Enum):
    COMPLETE = "complete"
    ABANDON = "abandon"
    RELEASE = "release"
    DEFER = "defer"
    DEAD_LETTER = "dead-letter"


class Broker:
    """All queues of one namespace. Not thread-safe: one thread drives it."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._queues: dict[str, tuple[Entity, Entity]] = {}
        self._timeline = Timeline()
        self._life = Lifecycle(clock, self._timeline, self._dead_letters_of)
        self._sessions = Sessions(clock, self._timeline, self._life, self.entity)

    # -- namespace ---------------------------------------------------------------

    def add_queue(self, name: str, spec: QueueSpec) -> None:
        if not name or "/" in name or name.startswith("$"):
            raise ValueError(f"invalid queue name {name!r}")
        if name.lower() in self._queues:
            raise ValueError(f"queue {name!r} already exists")
        self._queues[name.lower()] = (
            Entity(name, spec, dead_letter=False),
            Entity(name, spec, dead_letter=True),
        )

    def queue_names(self) -> list[str]:
        return sorted(main.queue_name for main, _ in self._queues.values())

    def entity(self, path: str) -> Entity:
        """The queue or subqueue at `path` (case-insensitive), e.g. `orders/$DeadLetterQueue`."""
        lowered = path.strip("/").lower()
        suffix = DEAD_LETTER_SUFFIX.lower()
        dead_letter = lowered.endswith(suffix)
        name = lowered[: -len(suffix)] if dead_letter else lowered
        pair = self._queues.get(name)
        if pair is None:
            raise EntityNotFound(f"The messaging entity '{path}' could not be found.")
        return pair[1] if dead_letter else pair[0]

    def _dead_letters_of(self, entity: Entity) -> Entity:
        return self._queues[entity.queue_name.lower()][1]

    # -- sending -----------------------------------------------------------------

    def send(self, path: str, envelopes: Sequence[Envelope]) -> list[int | None]:
        """Enqueue (or schedule) all or none; a duplicate's sequence number is None."""
        self.run_due()
        entity = self._sendable(path, envelopes)
        return [self._enqueue(entity, envelope) for envelope in envelopes]

    def schedule(self, path: str, envelopes: Sequence[Envelope], at: float) -> list[int]:
        self.run_due()
        entity = self._sendable(path, envelopes)
        return [self._add_scheduled(entity, envelope, at) for envelope in envelopes]

    def cancel_scheduled(self, path: str, seqs: Iterable[int]) -> None:
        self.run_due()
        entity = self.entity(path)
        for seq in seqs:
            entry = entity.entries.get(seq)
            if entry is None or entry.state is not EntryState.SCHEDULED:
                raise MessageNotFound(f"No scheduled message with sequence number {seq}.")
            entity.remove(entry)

    def _sendable(self, path: str, envelopes: Sequence[Envelope]) -> Entity:
        entity = self.entity(path)
        if entity.is_dead_letter:
            raise NotAllowed(f"Messages cannot be sent to the dead-letter subqueue '{path}'.")
        if entity.sessionful and not all(envelope.session_id for envelope in envelopes):
            raise NotAllowed(
                f"The SessionId was not set on a message, and it cannot be sent to the entity "
                f"'{entity.path}'. Entities that have session support enabled can only receive "
                "messages that have the SessionId set to a valid value."
            )
        return entity

    def _enqueue(self, entity: Entity, envelope: Envelope) -> int | None:
        now = self._clock()
        if self._is_duplicate(entity, envelope, now):
            return None
        at = envelope.scheduled_enqueue_time
        if at is not None and at > now:
            return self._add_scheduled(entity, envelope, at)
        entry = Entry(entity.next_seq, envelope, now, EntryState.AVAILABLE)
        entity.next_seq += 1
        self._life.activate(entity, entry, add=True)
        return entry.seq

    def _is_duplicate(self, entity: Entity, envelope: Envelope, now: float) -> bool:
        spec = entity.spec
        if not spec.requires_duplicate_detection or envelope.message_id is None:
            return False
        seen = entity.seen_message_ids
        cutoff = now - spec.duplicate_detection_history_time_window
        if len(seen) > 10_000:
            for key in [key for key, at in seen.items() if at <= cutoff]:
                del seen[key]
        if seen.get(envelope.message_id, cutoff) > cutoff:
            return True
        seen[envelope.message_id] = now
        return False

    def _add_scheduled(self, entity: Entity, envelope: Envelope, at: float) -> int:
        now = self._clock()
        entry = Entry(entity.next_seq, envelope, now, EntryState.SCHEDULED, scheduled_at=at)
        entity.next_seq += 1
        entity.add(entry)
        self._timeline.push(at, Due.SCHEDULED, entity.path, entry.seq)
        return entry.seq

    # -- receiving and settling --------------------------------------------------

    def receive(
        self, path: str, owner: str, session_id: str | None = None, *, delete: bool = False
    ) -> Lease | None:
        """Hand out the next available message, locked to `owner` (or removed if `delete`)."""
        self.run_due()
        entity = self.entity(path)
        session = self._sessions.held(entity, session_id, owner) if session_id else None
        entry = entity.pop_available(session)
        if entry is None:
            return None
        if delete:
            entity.entries.pop(entry.seq, None)
            return Lease(entry, None, None)
        return self._life.lock(entity, entry, owner, session)

    def receive_deferred(
        self, path: str, seqs: Iterable[int], owner: str, session_id: str | None = None
    ) -> list[Lease]:
        self.run_due()
        entity = self.entity(path)
        session = self._sessions.held(entity, session_id, owner) if session_id else None
        entries = []
        for seq in seqs:
            entry = entity.entries.get(seq)
            if entry is None or entry.state is not EntryState.DEFERRED:
                raise MessageNotFound(f"No deferred message with sequence number {seq}.")
            if session is not None and entry.envelope.session_id != session.session_id:
                raise MessageNotFound(f"Message {seq} is not in session '{session_id}'.")
            entries.append(entry)
        return [self._life.lock(entity, entry, owner, session) for entry in entries]

    def settle(
        self,
        path: str,
        token: uuid.UUID,
        outcome: Outcome,
        *,
        reason: str | None = None,
        description: str | None = None,
    ) -> None:
        self.run_due()
        entity = self.entity(path)
        lock = entity.locks.get(token)
        if lock is None:
            raise MessageLockLost(
                "The lock supplied is invalid. Either the lock expired, or the message has "
                "already been removed from the queue."
            )
        if lock.session is not None and lock.session.owner != lock.owner:
            raise SessionLockLost(
                f"The session lock for session '{lock.session.session_id}' has expired."
            )
        entry = lock.entry
        if outcome is Outcome.COMPLETE:
            entity.remove(entry)
        elif outcome is Outcome.ABANDON:
            self._life.give_back(entity, entry, failed=True)
        elif outcome is Outcome.RELEASE:
            self._life.give_back(entity, entry, failed=False)
        elif outcome is Outcome.DEFER:
            entity.drop_lock(lock)
            entry.deferred = True
            entry.state = EntryState.DEFERRED
        else:
            self._life.dead_letter(entity, entry, reason, description)

    def renew_message_locks(self, path: str, tokens: Iterable[uuid.UUID]) -> list[float]:
        self.run_due()
        entity = self.entity(path)
        expirations = []
        for token in tokens:
            lock = entity.locks.get(token)
            if lock is None:
                raise MessageLockLost(f"The lock {token} is invalid or has expired.")
            if lock.session is not None:
                raise NotAllowed("Message locks of session messages cannot be renewed.")
            lock.locked_until = self._clock() + entity.spec.lock_duration
            self._timeline.push(lock.locked_until, Due.MESSAGE_LOCK, entity.path, token)
            expirations.append(lock.locked_until)
        return expirations

    # -- sessions ----------------------------------------------------------------

    def lock_session(self, path: str, session_id: str, owner: str) -> Session:
        self.run_due()
        return self._sessions.lock(path, session_id, owner)

    def lock_next_session(self, path: str, owner: str) -> Session | None:
        """Lock the session that has waited longest with a message ready, if any."""
        self.run_due()
        return self._sessions.lock_next(path, owner)

    def release_session(self, path: str, session_id: str, owner: str) -> None:
        """Let go of a session; messages `owner` still held come back as failed deliveries."""
        self._sessions.release(path, session_id, owner)

    def renew_session_lock(self, path: str, session_id: str, owner: str | None) -> float:
        self.run_due()
        return self._sessions.renew(path, session_id, owner)

    def session_state(self, path: str, session_id: str, owner: str | None) -> bytes | None:
        self.run_due()
        return self._sessions.state(path, session_id, owner)

    def set_session_state(
        self, path: str, session_id: str, owner: str | None, state: bytes | None
    ) -> None:
        self.run_due()
        self._sessions.set_state(path, session_id, owner, state)

    def take_lost_sessions(self) -> list[LostSession]:
        lost, self._sessions.lost = self._sessions.lost, []
        return lost

    # -- browsing and time -------------------------------------------------------

    def peek(
        self, path: str, from_seq: int, count: int, session_id: str | None = None
    ) -> list[Entry]:
        self.run_due()
        return self.entity(path).ordered(from_seq, session_id)[: max(count, 0)]

    def next_deadline(self) -> float | None:
        return self._timeline.next()

    def run_due(self) -> None:
        """Apply every lock expiry, scheduled enqueue and message expiry that has come due."""
        now = self._clock()
        for kind, path, key in self._timeline.pop_due(now):
            try:
                entity = self.entity(path)
            except EntityNotFound:
                continue
            if kind is Due.MESSAGE_LOCK:
                lock = entity.locks.get(key) if isinstance(key, uuid.UUID) else None
                if lock is not None and lock.session is None and lock.locked_until <= now:
                    self._life.give_back(entity, lock.entry, failed=True)
            elif kind is Due.SESSION_LOCK:
                self._sessions.expire(entity, str(key), now)
            else:
                entry = entity.entries.get(key) if isinstance(key, int) else None
                if entry is not None:
                    self._on_entry_due(entity, entry, kind, now)

    def _on_entry_due(self, entity: Entity, entry: Entry, kind: Due, now: float) -> None:
        if kind is Due.SCHEDULED and entry.state is EntryState.SCHEDULED:
            entry.enqueued_at = now
            self._life.activate(entity, entry, add=False)
        elif (
            kind is Due.EXPIRY
            and entry.expires_at is not None
            and entry.expires_at <= now
            and entry.state in (EntryState.AVAILABLE, EntryState.DEFERRED)
        ):
            self._life.expire(entity, entry)
