"""What happens to a message once it is in a queue: locked, given back, dead-lettered, expired.

These are the transitions several broker operations share (a settlement, a lock
expiry and a session letting go all "give back" a message), so they live in one place
and every path applies the same rules: a failed delivery raises the delivery count, a
count that reaches the queue's maximum dead-letters with `MaxDeliveryCountExceeded`,
a message whose time to live ran out while it was locked expires when it comes back.

`Timeline` is the broker's single clock-ordered list of things that will come due
(lock expiries, scheduled enqueues, message expiries); stale items are allowed and
simply found to have nothing to do when they fall due.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import uuid
from collections.abc import Callable, Iterator

from .entities import DeadLetterInfo, Entity, Entry, EntryState, Lease, Lock, Session

Clock = Callable[[], float]

MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"
TTL_EXPIRED = "TTLExpiredException"


class Due(enum.Enum):
    MESSAGE_LOCK = 1
    SESSION_LOCK = 2
    SCHEDULED = 3
    EXPIRY = 4


class Timeline:
    """Items (kind, entity path, key) ordered by the time they come due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Due, str, object]] = []
        self._counter = itertools.count()

    def push(self, when: float, kind: Due, path: str, key: object) -> None:
        heapq.heappush(self._heap, (when, next(self._counter), kind, path, key))

    def next(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Iterator[tuple[Due, str, object]]:
        while self._heap and self._heap[0][0] <= now:
            _, _, kind, path, key = heapq.heappop(self._heap)
            yield kind, path, key


class Lifecycle:
    """The shared transitions; `dead_letters(entity)` finds an entity's subqueue."""

    def __init__(
        self, clock: Clock, timeline: Timeline, dead_letters: Callable[[Entity], Entity]
    ) -> None:
        self._clock = clock
        self._timeline = timeline
        self._dead_letters = dead_letters

    def activate(self, entity: Entity, entry: Entry, *, add: bool) -> None:
        """Make `entry` receivable from now on, starting its time to live."""
        now = self._clock()
        ttl = entry.envelope.time_to_live or entity.spec.default_message_time_to_live
        if ttl is not None and not entity.is_dead_letter:
            entry.expires_at = now + ttl
            self._timeline.push(entry.expires_at, Due.EXPIRY, entity.path, entry.seq)
        if add:
            entity.add(entry)
        else:
            entity.list_available(entry)

    def lock(self, entity: Entity, entry: Entry, owner: str, session: Session | None) -> Lease:
        if session is not None:
            until = session.locked_until
        else:
            until = self._clock() + entity.spec.lock_duration
        lock = Lock(uuid.uuid4(), entry, owner, until, session)
        if session is None:
            self._timeline.push(until, Due.MESSAGE_LOCK, entity.path, lock.token)
        entity.add_lock(lock)
        return Lease(entry, lock.token, until)

    def give_back(self, entity: Entity, entry: Entry, *, failed: bool) -> None:
        """Return a locked entry after a failed (or, if not `failed`, undone) delivery."""
        if entry.lock is not None:
            entity.drop_lock(entry.lock)
        if failed:
            entry.delivery_count += 1
            limit = entity.spec.max_delivery_count
            if not entity.is_dead_letter and entry.delivery_count >= limit:
                description = f"Message could not be consumed after {limit} delivery attempts."
                self.dead_letter(entity, entry, MAX_DELIVERY_COUNT_EXCEEDED, description)
                return
        if entry.expires_at is not None and entry.expires_at <= self._clock():
            self.expire(entity, entry)
        elif entry.deferred:
            entry.state = EntryState.DEFERRED
        else:
            entity.list_available(entry)

    def dead_letter(
        self, entity: Entity, entry: Entry, reason: str | None, description: str | None
    ) -> None:
        entity.remove(entry)
        moved = Entry(
            entry.seq,
            entry.envelope,
            entry.enqueued_at,
            EntryState.AVAILABLE,
            delivery_count=entry.delivery_count,
            dead_letter=DeadLetterInfo(reason, description, entity.queue_name),
        )
        self._dead_letters(entity).add(moved)

    def expire(self, entity: Entity, entry: Entry) -> None:
        if entity.spec.dead_lettering_on_message_expiration:
            description = "The message expired and was dead lettered."
            self.dead_letter(entity, entry, TTL_EXPIRED, description)
        else:
            entity.remove(entry)
