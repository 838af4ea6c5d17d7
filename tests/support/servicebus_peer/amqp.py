"""The AMQP face of the peer: proton engine events in, Service Bus behaviour out.

`PeerHandler` receives every event of every connection from `loop.PeerLoop` and sorts
links by what the client attached to:

- a sender link to a queue (`amqps://host/queue`): messages in, each accepted or
  rejected with the broker's error (an SDK batch is split into its messages);
- a receiver link from a queue or `queue/$DeadLetterQueue`: see `consumers.py`;
- a sender/receiver pair on `$cbs` or `<entity>/$management`: requests in, answers
  (`management.py`) out on the receiver link whose source is the request's
  `reply-to` (or, as for `$cbs`, the node's own address).

An attach to an entity that does not exist is refused with `amqp:not-found`. Links,
sessions and connections the client closes are closed in turn; when a connection goes
(closed, or dropped by `drop_connections`) every link on it is cleaned up as if
detached.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from proton import (
    Condition,
    Connection,
    Delivery,
    Endpoint,
    Event,
    Link,
    Message,
    Receiver,
    Sender,
    symbol,
)

from . import codec
from .broker import Broker
from .consumers import Consumers, refuse
from .errors import DecodeError, EntityNotFound, MessageTooLarge, NotAllowed, PeerError
from .management import Management, application_properties, cbs_response

_LOG = logging.getLogger(__name__)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://[^/]*", re.IGNORECASE)
_MANAGEMENT = "/$management"
_CBS = "$cbs"
_CREDIT = 1000
_T = TypeVar("_T")


def node_path(address: str | None) -> str:
    """`amqps://host:port/orders/$management` -> `orders/$management`."""
    return _SCHEME.sub("", address or "").strip("/")


@dataclass(eq=False)
class _Incoming:
    """A client's sender link: to an entity (`path`), or to a request node (`node`)."""

    path: str
    node: str | None = None


@dataclass(eq=False)
class _Replies:
    """A client's receiver link for responses, with answers waiting for credit."""

    address: str
    outbox: collections.deque[Message] = field(default_factory=collections.deque)


@dataclass(eq=False)
class _ConnectionState:
    number: int
    links: set[Link] = field(default_factory=set)
    replies: dict[Sender, _Replies] = field(default_factory=dict)
    incoming: dict[Receiver, _Incoming] = field(default_factory=dict)


class PeerHandler:
    """Maps proton events onto the broker. Runs on the loop thread only."""

    def __init__(self, broker: Broker, clock: Callable[[], float]) -> None:
        self._broker = broker
        self._consumers = Consumers(broker, clock)
        self._management = Management(broker)
        self._connections: dict[Connection, _ConnectionState] = {}
        self._numbers = itertools.count(1)
        self._handlers: dict[object, Callable[[Event], None]] = {
            Event.CONNECTION_REMOTE_OPEN: self._on_connection_open,
            Event.CONNECTION_REMOTE_CLOSE: self._on_connection_close,
            Event.SESSION_REMOTE_OPEN: self._on_session_open,
            Event.SESSION_REMOTE_CLOSE: self._on_session_close,
            Event.LINK_REMOTE_OPEN: self._on_link_open,
            Event.LINK_REMOTE_CLOSE: self._on_link_close,
            Event.LINK_REMOTE_DETACH: self._on_link_close,
            Event.DELIVERY: self._on_delivery,
        }

    # -- loop interface -----------------------------------------------------------

    def on_event(self, event: Event) -> None:
        handler = self._handlers.get(event.type)
        if handler is not None:
            handler(event)

    def after_events(self) -> None:
        self._consumers.pump()
        for state in self._connections.values():
            for link, replies in state.replies.items():
                self._flush_replies(link, replies)

    def next_deadline(self) -> float | None:
        deadlines = [self._broker.next_deadline(), self._consumers.next_deadline()]
        return min((deadline for deadline in deadlines if deadline is not None), default=None)

    def connection_closed(self, connection: Connection) -> None:
        state = self._connections.pop(connection, None)
        if state is None:
            return
        for link in state.links:
            if isinstance(link, Sender):
                self._consumers.detach(link)

    # -- endpoints ----------------------------------------------------------------

    def _state(self, connection: Connection) -> _ConnectionState:
        state = self._connections.get(connection)
        if state is None:
            state = self._connections[connection] = _ConnectionState(next(self._numbers))
        return state

    def _on_connection_open(self, event: Event) -> None:
        connection = _required(event.connection, "connection", event)
        self._state(connection)
        connection.container = "servicebus-peer"
        connection.open()

    def _on_connection_close(self, event: Event) -> None:
        connection = _required(event.connection, "connection", event)
        self.connection_closed(connection)
        if not connection.state & Endpoint.LOCAL_CLOSED:
            connection.close()

    def _on_session_open(self, event: Event) -> None:
        session = _required(event.session, "session", event)
        if session.state & Endpoint.LOCAL_UNINIT:
            session.open()

    def _on_session_close(self, event: Event) -> None:
        session = _required(event.session, "session", event)
        state = self._connections.get(_required(event.connection, "connection", event))
        if state is not None:
            for link in [link for link in state.links if link.session == session]:
                self._forget(state, link)
        if not session.state & Endpoint.LOCAL_CLOSED:
            session.close()

    def _on_link_close(self, event: Event) -> None:
        link = _required(event.link, "link", event)
        state = self._connections.get(_required(event.connection, "connection", event))
        if state is not None:
            self._forget(state, link)
        if link.state & Endpoint.LOCAL_UNINIT:
            # Never answered (a held next-session attach): answer it as refused, with a
            # null terminus, so the client does not take it for an attached link.
            refuse(link, None)
        elif not link.state & Endpoint.LOCAL_CLOSED:
            link.close()

    def _forget(self, state: _ConnectionState, link: Link) -> None:
        state.links.discard(link)
        if isinstance(link, Sender):
            state.replies.pop(link, None)
            self._consumers.detach(link)
        elif isinstance(link, Receiver):
            state.incoming.pop(link, None)

    def _on_link_open(self, event: Event) -> None:
        link = _required(event.link, "link", event)
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        state = self._state(_required(event.connection, "connection", event))
        state.links.add(link)
        if isinstance(link, Sender):
            self._attach_outgoing(state, link)
        elif isinstance(link, Receiver):
            self._attach_incoming(state, link)

    def _attach_outgoing(self, state: _ConnectionState, link: Sender) -> None:
        path = node_path(link.remote_source.address)
        if path.lower() == _CBS or path.lower().endswith(_MANAGEMENT):
            if self._check_node(link, path):
                state.replies[link] = _Replies(path.lower())
                _open_mirrored(link)
            return
        self._consumers.attach(link, path, f"{state.number}/{link.name}")

    def _attach_incoming(self, state: _ConnectionState, link: Receiver) -> None:
        path = node_path(link.remote_target.address)
        lowered = path.lower()
        if lowered == _CBS or lowered.endswith(_MANAGEMENT):
            if not self._check_node(link, path):
                return
            entity = None if lowered == _CBS else path[: -len(_MANAGEMENT)]
            state.incoming[link] = _Incoming(entity or "", node=lowered)
        else:
            try:
                entity_state = self._broker.entity(path)
                if entity_state.is_dead_letter:
                    raise NotAllowed(f"Messages cannot be sent to '{path}'.")
            except PeerError as error:
                refuse(link, error)
                return
            link.max_message_size = entity_state.spec.max_message_size
            state.incoming[link] = _Incoming(entity_state.path)
        _open_mirrored(link)
        link.flow(_CREDIT)

    def _check_node(self, link: Link, path: str) -> bool:
        if path.lower() == _CBS:
            return True
        try:
            self._broker.entity(path[: -len(_MANAGEMENT)])
        except EntityNotFound as error:
            refuse(link, error)
            return False
        return True

    # -- deliveries ---------------------------------------------------------------

    def _on_delivery(self, event: Event) -> None:
        delivery = _required(event.delivery, "delivery", event)
        link = delivery.link
        if isinstance(link, Sender):
            self._consumers.on_delivery(link, delivery)
            return
        if delivery.partial or not delivery.readable:
            return
        state = self._connections.get(_required(event.connection, "connection", event))
        incoming = state.incoming.get(link) if state else None
        if delivery.aborted or state is None or incoming is None:
            delivery.settle()
            return
        payload = link.recv(delivery.pending) or b""
        link.advance()
        if incoming.node is None:
            self._accept_messages(delivery, incoming.path, bytes(payload))
        else:
            self._answer(state, link, delivery, incoming, bytes(payload))
        if link.credit < _CREDIT // 2:
            link.flow(_CREDIT - link.credit)

    def _accept_messages(self, delivery: Delivery, path: str, payload: bytes) -> None:
        try:
            limit = self._broker.entity(path).spec.max_message_size
            if len(payload) > limit:
                raise MessageTooLarge(
                    f"The received message ({len(payload)} bytes) exceeds the limit "
                    f"({limit} bytes) of '{path}'."
                )
            self._broker.send(path, codec.unpack(payload))
        except PeerError as error:
            _reject(delivery, error)
            return
        _accept(delivery)

    def _answer(
        self,
        state: _ConnectionState,
        link: Receiver,
        delivery: Delivery,
        incoming: _Incoming,
        payload: bytes,
    ) -> None:
        request = Message()
        try:
            request.decode(payload)
        except Exception as exc:  # proton's MessageException on garbage
            _reject(delivery, DecodeError(f"The request is not an AMQP message: {exc}"))
            return
        _accept(delivery)
        if incoming.node == _CBS:
            response = cbs_response(request)
        else:
            associated = application_properties(request).get("associated-link-name")
            owner = f"{state.number}/{associated}" if associated else None
            if owner is not None and not self._consumers.owns(owner):
                owner = None
            response = self._management.handle(incoming.path, request, owner)
        reply_to = node_path(request.reply_to).lower() if request.reply_to else incoming.node
        candidates = [item for item in state.replies.items() if item[1].address == reply_to]
        # The client's own response link shares the request link's session; prefer it.
        candidates.sort(key=lambda item: item[0].session != link.session)
        if not candidates:
            _LOG.info("no reply link for %s on connection %d", reply_to, state.number)
            return
        reply_link, replies = candidates[0]
        replies.outbox.append(response)
        self._flush_replies(reply_link, replies)

    def _flush_replies(self, link: Sender, replies: _Replies) -> None:
        active = Endpoint.LOCAL_ACTIVE | Endpoint.REMOTE_ACTIVE
        while replies.outbox and link.credit > 0 and link.state & active == active:
            response = replies.outbox.popleft()
            delivery = link.send(response)
            if isinstance(delivery, Delivery):
                delivery.settle()


def _required(value: _T | None, what: str, event: Event) -> _T:
    if value is None:
        raise ValueError(f"{event.type} event without a {what}")
    return value


def _open_mirrored(link: Link) -> None:
    link.source.copy(link.remote_source)
    link.target.copy(link.remote_target)
    link.open()


def _accept(delivery: Delivery) -> None:
    if not delivery.settled:
        delivery.update(Delivery.ACCEPTED)
    delivery.settle()


def _reject(delivery: Delivery, error: PeerError) -> None:
    """Reject with an error that has all three fields, info included (Service Bus puts a
    tracking id there): the SDK's send and request paths index all three unconditionally,
    and a shorter error leaves the send waiting until it times out."""
    if not delivery.settled:
        info: dict[Any, Any] = {symbol("com.microsoft:tracking-id"): str(uuid.uuid4())}
        delivery.local.condition = Condition(error.condition, error.description, info)
        delivery.update(Delivery.REJECTED)
    delivery.settle()
