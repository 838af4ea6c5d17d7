"""Messages between sagaflow's wire form and the SDK's, both ways."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusMessageBatch, ServiceBusReceivedMessage
from azure.servicebus import exceptions as sdk_errors

from sagaflow.adapters.servicebus.client import Delivery, MessageTooLargeError, WireMessage
from sagaflow.core.ports import DeadLetter, utc_now


def to_sdk_message(message: WireMessage) -> ServiceBusMessage:
    properties: dict[str | bytes, Any] = dict((message.headers or {}).items())
    return ServiceBusMessage(
        message.body,
        message_id=message.message_id,
        session_id=message.session_id,
        content_type=message.content_type,
        scheduled_enqueue_time_utc=message.scheduled_enqueue_time_utc,
        application_properties=properties or None,
    )


def delivery_from_sdk(message: ServiceBusReceivedMessage) -> Delivery:
    return Delivery(
        message_id=str(message.message_id),
        session_id=str(message.session_id),
        body=_body_bytes(message.body),
        # The broker sends AMQP's zero-based count of earlier deliveries; the Python SDK
        # passes it through (the .NET SDK adds one). The port counts this delivery too.
        delivery_count=(message.delivery_count or 0) + 1,
        enqueued_at=message.enqueued_time_utc or utc_now(),
        lock_token=str(message.lock_token),
        raw=message,
        dead_letter_reason=message.dead_letter_reason or "",
        dead_letter_description=message.dead_letter_error_description or "",
        locked_until=message.locked_until_utc,
        headers=headers_from_sdk(message.application_properties),
    )


def headers_from_sdk(properties: Mapping[Any, Any] | None) -> dict[str, str] | None:
    """Application properties with string values, keys and values decoded (over AMQP
    the SDK may hand either out as bytes); None when there are none."""
    headers = {
        _text(key): _text(value)
        for key, value in (properties or {}).items()
        if isinstance(key, str | bytes) and isinstance(value, str | bytes)
    }
    return headers or None


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def dead_letter_from_sdk(queue: str, message: ServiceBusReceivedMessage) -> DeadLetter:
    return DeadLetter(
        queue=queue,
        message_id=str(message.message_id),
        session_id=str(message.session_id or ""),
        body=_body_bytes(message.body),
        reason=message.dead_letter_reason or "",
        description=message.dead_letter_error_description or "",
        # A peeked message carries the broker's own count, not the delivery header.
        delivery_count=message.delivery_count or 0,
        # Service Bus records no dead-lettering time; the enqueue time is the nearest.
        dead_lettered_at=message.enqueued_time_utc or utc_now(),
    )


def _body_bytes(body: Any) -> bytes:
    """A received body as bytes: the SDK hands out data sections as an iterator."""
    if isinstance(body, bytes | str):
        return body.encode() if isinstance(body, str) else body
    parts = list(body) if isinstance(body, Iterable) else [body]
    if all(isinstance(part, bytes) for part in parts):
        return b"".join(parts)
    # A value or sequence body from a foreign sender: not our JSON, dead-lettered downstream.
    return repr(parts).encode()


def fill_batch(
    batch: ServiceBusMessageBatch, pending: Sequence[ServiceBusMessage], queue: str
) -> int:
    """Add messages from the front of `pending` until the batch is full; how many fit."""
    for taken, message in enumerate(pending):
        try:
            batch.add_message(message)
        except sdk_errors.MessageSizeExceededError as exc:
            if taken == 0:
                raise MessageTooLargeError(
                    f"message {message.message_id!r} for {queue!r} exceeds the "
                    f"{batch.max_size_in_bytes}-byte message size limit"
                ) from exc
            return taken
    return len(pending)
