"""Session locks: who holds which session of a session queue, and until when.

A session is locked by one owner at a time, for the queue's lock duration, renewable;
its lock covers all of its messages. Locking a held session fails with
`SessionCannotBeLocked`; "next available" picks the session that has waited longest
with a message ready. When the owner lets go, or the lock expires, the session is free
again and the messages its owner held come back as failed deliveries. An expiry is
also recorded as a `LostSession`, so the AMQP side can detach the owner's link the way
Service Bus does.

Session state (`get`/`set-session-state`) belongs to the session, not to its holder,
but only the holder may read or write it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .entities import Entity, Session
from .errors import NotAllowed, SessionCannotBeLocked, SessionLockLost
from .lifecycle import Clock, Due, Lifecycle, Timeline


@dataclass(frozen=True)
class LostSession:
    """A session lock that expired while `owner` held it."""

    path: str
    session_id: str
    owner: str


class Sessions:
    """Session locking over the entities `entity(path)` resolves."""

    def __init__(
        self,
        clock: Clock,
        timeline: Timeline,
        lifecycle: Lifecycle,
        entity: Callable[[str], Entity],
    ) -> None:
        self._clock = clock
        self._timeline = timeline
        self._lifecycle = lifecycle
        self._entity = entity
        self.lost: list[LostSession] = []

    def lock(self, path: str, session_id: str, owner: str) -> Session:
        entity = self.sessionful(path)
        session = entity.session(session_id)
        if session.owner is not None and session.owner != owner:
            raise SessionCannotBeLocked(
                f"The requested session '{session_id}' cannot be accepted. It may be locked "
                "by another receiver."
            )
        self._hold(entity, session, owner)
        return session

    def lock_next(self, path: str, owner: str) -> Session | None:
        entity = self.sessionful(path)
        for session_id in entity.ready:
            session = entity.sessions[session_id]
            self._hold(entity, session, owner)
            return session
        return None

    def release(self, path: str, session_id: str, owner: str) -> None:
        entity = self._entity(path)
        session = entity.sessions.get(session_id)
        if session is not None and session.owner == owner:
            self._unhold(entity, session)

    def renew(self, path: str, session_id: str, owner: str | None) -> float:
        entity = self.sessionful(path)
        session = self.held(entity, session_id, owner)
        session.locked_until = self._clock() + entity.spec.lock_duration
        for token in session.in_flight:
            entity.locks[token].locked_until = session.locked_until
        self._timeline.push(session.locked_until, Due.SESSION_LOCK, entity.path, session_id)
        return session.locked_until

    def state(self, path: str, session_id: str, owner: str | None) -> bytes | None:
        return self.held(self.sessionful(path), session_id, owner).state

    def set_state(self, path: str, session_id: str, owner: str | None, state: bytes | None) -> None:
        self.held(self.sessionful(path), session_id, owner).state = state

    def held(self, entity: Entity, session_id: str | None, owner: str | None) -> Session:
        """The session, if locked (by `owner`, when given); else `SessionLockLost`."""
        session = entity.sessions.get(session_id or "")
        if session is None or session.owner is None or (owner and session.owner != owner):
            raise SessionLockLost(
                f"The session lock has expired on the session '{session_id}'. Accept a new session."
            )
        return session

    def sessionful(self, path: str) -> Entity:
        entity = self._entity(path)
        if not entity.sessionful:
            raise NotAllowed(f"The entity '{path}' does not have sessions enabled.")
        return entity

    def expire(self, entity: Entity, session_id: str, now: float) -> None:
        session = entity.sessions.get(session_id)
        if session is None or session.owner is None or session.locked_until > now:
            return
        self.lost.append(LostSession(entity.path, session_id, session.owner))
        self._unhold(entity, session)

    def _hold(self, entity: Entity, session: Session, owner: str) -> None:
        until = self._clock() + entity.spec.lock_duration
        entity.mark_session_locked(session, owner, until)
        self._timeline.push(until, Due.SESSION_LOCK, entity.path, session.session_id)

    def _unhold(self, entity: Entity, session: Session) -> None:
        held = sorted(
            (entity.locks[token].entry for token in session.in_flight), key=lambda e: e.seq
        )
        entity.mark_session_unlocked(session)
        for entry in held:
            self._lifecycle.give_back(entity, entry, failed=True)
