"""Receiver links: handing messages out and taking settlements back, as Service Bus does.

A client's receiver link is a proton `Sender` on the peer's side. This module owns
everything about those links:

- attaching: a plain link to a non-session entity; a link with the
  `com.microsoft:session-filter` source filter to a named session (locked at once, or
  refused with `com.microsoft:session-cannot-be-locked`) or, with a null filter, to the
  next available session. That attach is *held* (no attach sent back) until a session
  is free or the link's `com.microsoft:timeout` (ms) passes; on timeout the peer
  attaches with a null source and detaches with `com.microsoft:timeout`, which the SDK
  raises as its operation-timeout error. A granted session's id goes back in the
  source filter and its lock expiry in the attach property
  `com.microsoft:locked-until-utc` (.NET ticks);
- delivering on credit, lowest sequence number first, with the lock token as the
  delivery tag (`uuid.bytes_le`, which the SDK reads back as the token);
- settlement: with receiver-settle-mode *second* the client sends an unsettled
  outcome and waits for the peer to settle with the same outcome. accepted completes,
  modified(delivery-failed) abandons, modified(undeliverable-here) defers, rejected
  with `com.microsoft:dead-letter` (info `DeadLetterReason`,
  `DeadLetterErrorDescription`) dead-letters, released gives a prefetched message back.
  The echo of a rejection carries no error (the SDK raises on one); a settlement the
  broker refuses (a lost lock) is echoed as rejected *with* that error;
- a session lock that expires detaches its link with `com.microsoft:session-lock-lost`;
  a link that goes away releases its session (message locks of non-session links stay
  until they expire, as on Service Bus).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from proton import (
    Condition,
    Data,
    Delivery,
    Disposition,
    Endpoint,
    Link,
    Sender,
    Terminus,
    symbol,
)

from . import codec
from .broker import Broker, Outcome
from .entities import Session
from .errors import NotAllowed, PeerError, SessionLockLost

SESSION_FILTER = "com.microsoft:session-filter"
LOCKED_UNTIL_UTC = "com.microsoft:locked-until-utc"
TIMEOUT = "com.microsoft:timeout"
DEFAULT_SESSION_WAIT = 60.0


class SessionWaitTimeout(PeerError):
    condition = "com.microsoft:timeout"
    status = 408


@dataclass(eq=False)
class Consumer:
    link: Sender
    path: str
    owner: str
    session_id: str | None
    delete: bool
    deliveries: dict[Delivery, uuid.UUID] = field(default_factory=dict)


@dataclass(eq=False)
class Waiter:
    link: Sender
    path: str
    owner: str
    delete: bool
    deadline: float


class Consumers:
    """All receiver links of the peer, across connections."""

    def __init__(self, broker: Broker, clock: Callable[[], float] = time.time) -> None:
        self._broker = broker
        self._clock = clock
        self._by_link: dict[Sender, Consumer] = {}
        self._by_owner: dict[str, Consumer] = {}
        self._waiting: dict[Sender, Waiter] = {}

    def owns(self, owner: str) -> bool:
        return owner in self._by_owner

    def attach(self, link: Sender, path: str, owner: str) -> None:
        """React to a client's attach of a receiver link to entity `path`."""
        try:
            entity = self._broker.entity(path)
            filters = data_object(link.remote_source.filter) or {}
            wants_session = SESSION_FILTER in filters
            if entity.sessionful != wants_session:
                raise NotAllowed(
                    f"The entity '{path}' requires a session receiver."
                    if entity.sessionful
                    else f"The entity '{path}' does not have sessions enabled."
                )
            delete = link.remote_snd_settle_mode == Link.SND_SETTLED
            if not wants_session:
                self._start(link, path, owner, None, delete)
                return
            requested = filters[SESSION_FILTER]
            if isinstance(requested, str):
                session = self._broker.lock_session(path, requested, owner)
                self._start(link, path, owner, session, delete)
                return
            session_or_none = self._broker.lock_next_session(path, owner)
            if session_or_none is not None:
                self._start(link, path, owner, session_or_none, delete)
                return
            properties = link.remote_properties or {}
            wait = properties.get(TIMEOUT)
            seconds = int(wait) / 1000 if wait is not None else DEFAULT_SESSION_WAIT
            self._waiting[link] = Waiter(link, path, owner, delete, self._clock() + seconds)
        except PeerError as error:
            refuse(link, error)

    def detach(self, link: Sender) -> None:
        """The link is gone (detached by the client, or its connection closed)."""
        self._waiting.pop(link, None)
        consumer = self._by_link.pop(link, None)
        if consumer is None:
            return
        self._by_owner.pop(consumer.owner, None)
        if consumer.session_id is not None:
            self._broker.release_session(consumer.path, consumer.session_id, consumer.owner)

    def next_deadline(self) -> float | None:
        return min((waiter.deadline for waiter in self._waiting.values()), default=None)

    def pump(self) -> None:
        """Apply what time and other links changed, then deliver on every link with credit."""
        self._broker.run_due()
        for lost in self._broker.take_lost_sessions():
            consumer = self._by_owner.get(lost.owner)
            if consumer is not None:
                self._detach_lost(consumer, lost.session_id)
        self._serve_waiters()
        for consumer in list(self._by_link.values()):
            self._deliver(consumer)

    def on_delivery(self, link: Sender, delivery: Delivery) -> None:
        """The client updated or settled a delivery we sent."""
        consumer = self._by_link.get(link)
        token = consumer.deliveries.get(delivery) if consumer else None
        if consumer is None or token is None:
            if delivery.settled:
                delivery.settle()
            return
        if not delivery.updated:
            return
        state = delivery.remote_state
        remote = delivery.remote
        outcome = _outcome(state, remote)
        if outcome is None:
            return
        del consumer.deliveries[delivery]
        reason, description = (
            _dead_letter_details(remote) if state == Delivery.REJECTED else (None, None)
        )
        error: PeerError | None = None
        try:
            self._broker.settle(
                consumer.path, token, outcome, reason=reason, description=description
            )
        except PeerError as refused:
            error = refused
        if not delivery.settled:
            _echo(delivery, state, remote, error)
        delivery.settle()

    def _start(
        self, link: Sender, path: str, owner: str, session: Session | None, delete: bool
    ) -> None:
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        if session is not None:
            link.source.filter.clear()
            link.source.filter.put_object({symbol(SESSION_FILTER): session.session_id})
            ticks = codec.dotnet_ticks(session.locked_until)
            link.properties = {symbol(LOCKED_UNTIL_UTC): ticks}
        link.open()
        consumer = Consumer(link, path, owner, session.session_id if session else None, delete)
        self._by_link[link] = consumer
        self._by_owner[owner] = consumer

    def _serve_waiters(self) -> None:
        now = self._clock()
        for waiter in list(self._waiting.values()):
            try:
                session = self._broker.lock_next_session(waiter.path, waiter.owner)
            except PeerError as error:
                del self._waiting[waiter.link]
                refuse(waiter.link, error)
                continue
            if session is not None:
                del self._waiting[waiter.link]
                self._start(waiter.link, waiter.path, waiter.owner, session, waiter.delete)
            elif waiter.deadline <= now:
                del self._waiting[waiter.link]
                refuse(
                    waiter.link,
                    SessionWaitTimeout(
                        "The operation did not complete within the allocated time: no session "
                        f"of '{waiter.path}' became available."
                    ),
                )

    def _deliver(self, consumer: Consumer) -> None:
        link = consumer.link
        active = Endpoint.LOCAL_ACTIVE | Endpoint.REMOTE_ACTIVE
        if link.state & active != active:
            return
        while link.credit > 0:
            try:
                lease = self._broker.receive(
                    consumer.path, consumer.owner, consumer.session_id, delete=consumer.delete
                )
            except SessionLockLost:
                return
            if lease is None:
                break
            payload = codec.encode_delivery(
                lease.entry, locked_until=lease.locked_until, token=lease.token
            )
            tag = (lease.token or uuid.uuid4()).bytes_le
            # proton takes bytes tags too (its binding passes them through unchanged).
            delivery = link.delivery(cast(str, tag))
            link.send(payload)
            link.advance()
            if lease.token is None:
                delivery.settle()
            else:
                consumer.deliveries[delivery] = lease.token
        link.drained()

    def _detach_lost(self, consumer: Consumer, session_id: str) -> None:
        self._by_link.pop(consumer.link, None)
        self._by_owner.pop(consumer.owner, None)
        error = SessionLockLost(f"The session lock has expired on the session '{session_id}'.")
        consumer.link.condition = Condition(error.condition, error.description)
        consumer.link.close()


def refuse(link: Link, error: PeerError | None) -> None:
    """Refuse an attach the AMQP way: attach back with a null source (when the client
    receives) or target (when it sends), then detach with `error` (if any)."""
    if link.is_sender:
        link.target.copy(link.remote_target)
        link.source.type = Terminus.UNSPECIFIED
    else:
        link.source.copy(link.remote_source)
        link.target.type = Terminus.UNSPECIFIED
    if error is not None:
        link.condition = Condition(error.condition, error.description)
    link.open()
    link.close()


def data_object(data: Data) -> Any:
    """The single value held by a proton `Data` (a terminus filter, say), or None."""
    data.rewind()
    if data.next() is None:
        return None
    return data.get_object()


def _outcome(state: int, remote: Disposition) -> Outcome | None:
    if state == Delivery.ACCEPTED:
        return Outcome.COMPLETE
    if state == Delivery.REJECTED:
        return Outcome.DEAD_LETTER
    if state == Delivery.RELEASED:
        return Outcome.RELEASE
    if state == Delivery.MODIFIED:
        if remote.undeliverable:
            return Outcome.DEFER
        return Outcome.ABANDON if remote.failed else Outcome.RELEASE
    return None


def _dead_letter_details(remote: Disposition) -> tuple[str | None, str | None]:
    condition = remote.condition
    info = condition.info if condition is not None and isinstance(condition.info, dict) else {}
    reason = info.get("DeadLetterReason")
    description = info.get("DeadLetterErrorDescription")
    if description is None and condition is not None:
        description = condition.description
    return (
        str(reason) if reason is not None else None,
        str(description) if description is not None else None,
    )


def _echo(delivery: Delivery, state: int, remote: Disposition, error: PeerError | None) -> None:
    local = delivery.local
    if error is not None:
        local.condition = Condition(error.condition, error.description)
        delivery.update(Delivery.REJECTED)
        return
    if state == Delivery.MODIFIED:
        local.failed = remote.failed
        local.undeliverable = remote.undeliverable
    delivery.update(state)
