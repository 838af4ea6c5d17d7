"""The state of one Service Bus entity: a queue, or a queue's dead-letter subqueue.

Plain data and the bookkeeping that keeps it consistent, nothing else: which messages
an entity holds and in which state, which of them are ready to hand out (in sequence
order, per session on session queues), which are locked and by whom, and which sessions
are free to be accepted. The rules that move messages between states (settlement, lock
expiry, dead-lettering) live in `broker.py`; this module only guarantees that the
indexes (`available`, `ready`, `locks`) always agree with the entries' states, so the
broker never has to scan.

Times are seconds since the Unix epoch as floats, taken from the broker's clock.
"""

from __future__ import annotations

import bisect
import enum
import uuid
from dataclasses import dataclass, field

DEAD_LETTER_SUFFIX = "/$DeadLetterQueue"


@dataclass(frozen=True)
class QueueSpec:
    """A queue's configuration, the subset of Service Bus queue properties the peer honours.

    Durations are seconds. `lock_duration` may be far shorter than Service Bus allows
    (5 s minimum) so that lock-expiry tests stay fast.
    """

    requires_session: bool = False
    lock_duration: float = 30.0
    max_delivery_count: int = 10
    default_message_time_to_live: float | None = None
    dead_lettering_on_message_expiration: bool = False
    requires_duplicate_detection: bool = False
    duplicate_detection_history_time_window: float = 600.0
    max_message_size: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.lock_duration <= 0:
            raise ValueError(f"lock_duration must be positive, got {self.lock_duration}")
        if self.max_delivery_count < 1:
            raise ValueError(
                f"max_delivery_count must be at least 1, got {self.max_delivery_count}"
            )
        ttl = self.default_message_time_to_live
        if ttl is not None and ttl <= 0:
            raise ValueError(f"default_message_time_to_live must be positive, got {ttl}")
        if self.duplicate_detection_history_time_window <= 0:
            raise ValueError("duplicate_detection_history_time_window must be positive")
        if self.max_message_size < 1024:
            raise ValueError(f"max_message_size must be at least 1024, got {self.max_message_size}")


@dataclass(frozen=True)
class Envelope:
    """What the broker needs to know of a message; `payload` is opaque to it (the codec's)."""

    payload: object
    session_id: str | None = None
    message_id: str | None = None
    time_to_live: float | None = None
    scheduled_enqueue_time: float | None = None


class EntryState(enum.Enum):
    AVAILABLE = "available"
    LOCKED = "locked"
    DEFERRED = "deferred"
    SCHEDULED = "scheduled"


@dataclass(frozen=True)
class DeadLetterInfo:
    reason: str | None
    description: str | None
    source: str


@dataclass(eq=False)
class Entry:
    """One message in an entity. `seq` is its sequence number, unique in its queue."""

    seq: int
    envelope: Envelope
    enqueued_at: float
    state: EntryState
    expires_at: float | None = None
    scheduled_at: float | None = None
    delivery_count: int = 0
    deferred: bool = False
    dead_letter: DeadLetterInfo | None = None
    lock: Lock | None = None


@dataclass(eq=False)
class Lock:
    """A peek-lock on one entry. Session messages are governed by their session's lock."""

    token: uuid.UUID
    entry: Entry
    owner: str
    locked_until: float
    session: Session | None = None


@dataclass(eq=False)
class Session:
    session_id: str
    available: list[int] = field(default_factory=list)
    state: bytes | None = None
    owner: str | None = None
    locked_until: float = 0.0
    in_flight: set[uuid.UUID] = field(default_factory=set)


@dataclass(frozen=True)
class Lease:
    """An entry handed to a receiver: locked under `token`, or removed if `token` is None."""

    entry: Entry
    token: uuid.UUID | None
    locked_until: float | None


class Entity:
    """One queue or dead-letter subqueue and the indexes over its entries."""

    def __init__(self, name: str, spec: QueueSpec, *, dead_letter: bool) -> None:
        self.queue_name = name
        self.spec = spec
        self.is_dead_letter = dead_letter
        self.path = name + DEAD_LETTER_SUFFIX if dead_letter else name
        # A dead-letter subqueue is never sessionful, even under a session queue.
        self.sessionful = spec.requires_session and not dead_letter
        self.entries: dict[int, Entry] = {}
        self.available: list[int] = []
        self.sessions: dict[str, Session] = {}
        # Sessions that are unlocked and have an available message, oldest first.
        self.ready: dict[str, None] = {}
        self.locks: dict[uuid.UUID, Lock] = {}
        self.seen_message_ids: dict[str, float] = {}
        self.next_seq = 1

    def session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            session = self.sessions[session_id] = Session(session_id)
        return session

    def session_of(self, entry: Entry) -> Session | None:
        sid = entry.envelope.session_id
        return self.session(sid) if self.sessionful and sid is not None else None

    def add(self, entry: Entry) -> None:
        self.entries[entry.seq] = entry
        if entry.state is EntryState.AVAILABLE:
            self.list_available(entry)

    def list_available(self, entry: Entry) -> None:
        entry.state = EntryState.AVAILABLE
        session = self.session_of(entry)
        bisect.insort(session.available if session else self.available, entry.seq)
        if session is not None and session.owner is None:
            self.ready.setdefault(session.session_id, None)

    def unlist_available(self, entry: Entry) -> None:
        """Take an AVAILABLE entry off its ready list (it is leaving that state)."""
        session = self.session_of(entry)
        listing = session.available if session else self.available
        index = bisect.bisect_left(listing, entry.seq)
        if index < len(listing) and listing[index] == entry.seq:
            del listing[index]
        if session is not None and not session.available:
            self.ready.pop(session.session_id, None)

    def pop_available(self, session: Session | None) -> Entry | None:
        listing = session.available if session else self.available
        if not listing:
            return None
        entry = self.entries[listing.pop(0)]
        if session is not None and not session.available:
            self.ready.pop(session.session_id, None)
        return entry

    def remove(self, entry: Entry) -> None:
        if entry.state is EntryState.AVAILABLE:
            self.unlist_available(entry)
        if entry.lock is not None:
            self.drop_lock(entry.lock)
        self.entries.pop(entry.seq, None)

    def add_lock(self, lock: Lock) -> None:
        lock.entry.lock = lock
        lock.entry.state = EntryState.LOCKED
        self.locks[lock.token] = lock
        if lock.session is not None:
            lock.session.in_flight.add(lock.token)

    def drop_lock(self, lock: Lock) -> None:
        self.locks.pop(lock.token, None)
        if lock.session is not None:
            lock.session.in_flight.discard(lock.token)
        lock.entry.lock = None

    def mark_session_locked(self, session: Session, owner: str, until: float) -> None:
        session.owner = owner
        session.locked_until = until
        self.ready.pop(session.session_id, None)

    def mark_session_unlocked(self, session: Session) -> None:
        session.owner = None
        session.locked_until = 0.0
        if session.available:
            self.ready.setdefault(session.session_id, None)

    def ordered(self, from_seq: int, session_id: str | None) -> list[Entry]:
        seqs = sorted(seq for seq in self.entries if seq >= from_seq)
        entries = (self.entries[seq] for seq in seqs)
        if session_id is None:
            return list(entries)
        return [entry for entry in entries if entry.envelope.session_id == session_id]
