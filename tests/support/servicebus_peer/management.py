"""Service Bus's request/response operations on `<entity>/$management`, and `$cbs`.

A request is an AMQP message whose application property `operation` names the
operation and whose amqp-value body is a map with string keys; the answer carries
`statusCode` and `statusDescription` (and `errorCondition` on failure) as application
properties, its `correlation-id` is the request's `message-id`, and its body is a map
with the keys the SDK reads (`expirations`, `expiration`, `sequence-numbers`,
`session-state`, `messages`). `$cbs` speaks the same pattern with `status-code` and
`status-description`; put-token is always granted (the peer does not verify tokens).

This module only maps requests onto `Broker` calls and results onto responses; it
never sees links or sockets. A malformed request is answered 400
`com.microsoft:argument-error`, an unknown operation 501, never a crash.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from proton import Data, Message, symbol

from . import codec
from .broker import Broker, Outcome
from .entities import Lease
from .errors import ArgumentError, NotImplementedByPeer, PeerError

_Handler = Callable[[str, dict[str, Any], str | None], tuple[int, dict[str, Any] | None]]

_DISPOSITIONS = {
    "completed": Outcome.COMPLETE,
    "abandoned": Outcome.ABANDON,
    "defered": Outcome.DEFER,
    "suspended": Outcome.DEAD_LETTER,
}
_RECEIVE_AND_DELETE = 0


class Management:
    """Answers `$management` requests for any entity of `broker`."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        prefix = "com.microsoft:"
        self._operations: dict[str, _Handler] = {
            prefix + "renew-lock": self._renew_lock,
            prefix + "renew-session-lock": self._renew_session_lock,
            prefix + "get-session-state": self._get_session_state,
            prefix + "set-session-state": self._set_session_state,
            prefix + "schedule-message": self._schedule,
            prefix + "cancel-scheduled-message": self._cancel_scheduled,
            prefix + "peek-message": self._peek,
            prefix + "update-disposition": self._update_disposition,
            prefix + "receive-by-sequence-number": self._receive_by_sequence_number,
        }

    def handle(self, path: str, request: Message, owner: str | None) -> Message:
        """The response to `request` on `path`/$management; `owner` is the associated link's."""
        operation = str(application_properties(request).get("operation", ""))
        try:
            handler = self._operations.get(operation)
            if handler is None:
                raise NotImplementedByPeer(f"The operation '{operation}' is not supported.")
            body = request.body
            if not isinstance(body, dict):
                raise ArgumentError("The request body must be a map.")
            status, answer = handler(path, body, owner)
        except PeerError as error:
            return _response(request, error.status, error.description, None, error.condition)
        except (KeyError, TypeError, ValueError) as error:
            description = f"Malformed '{operation}' request: {error!r}."
            return _response(
                request, ArgumentError.status, description, None, ArgumentError.condition
            )
        return _response(request, status, "OK" if status == 200 else "No Content", answer, None)

    def _renew_lock(self, path: str, body: dict[str, Any], _: str | None) -> tuple[int, Any]:
        tokens = [_uuid(token) for token in codec.as_list(body["lock-tokens"])]
        expirations = self._broker.renew_message_locks(path, tokens)
        stamps = [codec.amqp_timestamp(at) for at in expirations]
        return 200, {"expirations": codec.typed_array(Data.TIMESTAMP, stamps)}

    def _renew_session_lock(self, path: str, body: dict[str, Any], owner: str | None) -> Any:
        until = self._broker.renew_session_lock(path, str(body["session-id"]), owner)
        return 200, {"expiration": codec.amqp_timestamp(until)}

    def _get_session_state(self, path: str, body: dict[str, Any], owner: str | None) -> Any:
        state = self._broker.session_state(path, str(body["session-id"]), owner)
        return 200, {"session-state": state}

    def _set_session_state(self, path: str, body: dict[str, Any], owner: str | None) -> Any:
        state = body.get("session-state")
        value = bytes(state) if state is not None else None
        self._broker.set_session_state(path, str(body["session-id"]), owner, value)
        return 200, {}

    def _schedule(self, path: str, body: dict[str, Any], _: str | None) -> Any:
        seqs: list[int] = []
        for item in codec.as_list(body["messages"]):
            for envelope in codec.unpack(bytes(item["message"])):
                at = envelope.scheduled_enqueue_time
                if at is None:
                    raise ArgumentError("A scheduled message needs x-opt-scheduled-enqueue-time.")
                seqs.extend(self._broker.schedule(path, [envelope], at))
        return 200, {"sequence-numbers": codec.typed_array(Data.LONG, seqs)}

    def _cancel_scheduled(self, path: str, body: dict[str, Any], _: str | None) -> Any:
        seqs = [int(seq) for seq in codec.as_list(body["sequence-numbers"])]
        self._broker.cancel_scheduled(path, seqs)
        return 200, {}

    def _peek(self, path: str, body: dict[str, Any], _: str | None) -> Any:
        session_id = body.get("session-id")
        entries = self._broker.peek(
            path,
            int(body["from-sequence-number"]),
            int(body["message-count"]),
            str(session_id) if session_id is not None else None,
        )
        if not entries:
            return 204, None
        messages = [
            {
                "message": codec.encode_delivery(
                    entry,
                    locked_until=entry.lock.locked_until if entry.lock else None,
                    token=None,
                )
            }
            for entry in entries
        ]
        return 200, {"messages": messages}

    def _update_disposition(self, path: str, body: dict[str, Any], _: str | None) -> Any:
        status = str(body["disposition-status"])
        outcome = _DISPOSITIONS.get(status)
        if outcome is None:
            raise ArgumentError(f"Unknown disposition-status '{status}'.")
        reason, description = body.get("deadletter-reason"), body.get("deadletter-description")
        for token in codec.as_list(body["lock-tokens"]):
            self._broker.settle(
                path,
                _uuid(token),
                outcome,
                reason=str(reason) if reason else None,
                description=str(description) if description else None,
            )
        return 200, {}

    def _receive_by_sequence_number(
        self, path: str, body: dict[str, Any], owner: str | None
    ) -> Any:
        seqs = [int(seq) for seq in codec.as_list(body["sequence-numbers"])]
        session_id = body.get("session-id")
        leases = self._broker.receive_deferred(
            path,
            seqs,
            owner or "management",
            str(session_id) if session_id is not None else None,
        )
        delete = int(body.get("receiver-settle-mode", 1)) == _RECEIVE_AND_DELETE
        return 200, {"messages": [self._deferred(path, lease, delete) for lease in leases]}

    def _deferred(self, path: str, lease: Lease, delete: bool) -> dict[str, Any]:
        assert lease.token is not None
        if delete:
            self._broker.settle(path, lease.token, Outcome.COMPLETE)
            payload = codec.encode_delivery(lease.entry, locked_until=None, token=None)
            return {"message": payload}
        payload = codec.encode_delivery(
            lease.entry, locked_until=lease.locked_until, token=lease.token
        )
        return {"lock-token": lease.token, "message": payload}


def cbs_response(request: Message) -> Message:
    """The answer to a `$cbs` request: put-token is granted, anything else refused."""
    operation = str(application_properties(request).get("operation", ""))
    if operation == "put-token":
        properties = {"status-code": 202, "status-description": "Accepted"}
    else:
        properties = {"status-code": 400, "status-description": f"Unknown operation {operation}"}
    return Message(correlation_id=request.id, properties=properties)


def application_properties(message: Message) -> dict[str, Any]:
    """A message's application properties, keyed by plain strings."""
    properties: dict[Any, Any] = dict(message.properties or {})
    return {str(key): value for key, value in properties.items()}


def _response(
    request: Message,
    status: int,
    description: str,
    body: dict[str, Any] | None,
    condition: str | None,
) -> Message:
    properties: dict[str, Any] = {"statusCode": status, "statusDescription": description}
    if condition is not None:
        properties["errorCondition"] = symbol(condition)
    return Message(body=body, correlation_id=request.id, properties=properties)


def _uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, bytes | memoryview) and len(value) == 16:
        return uuid.UUID(bytes=bytes(value))
    return uuid.UUID(str(value))
