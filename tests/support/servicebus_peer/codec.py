"""AMQP message bytes in and out: what a client sends, and what the peer delivers.

A received message is split into its sections (proton's `Data` decodes one section at
a time) and kept mostly as bytes: the bare message (properties, application
properties, body, footer) is immutable in AMQP, so the peer hands back exactly what
was sent. Only two things are rebuilt on delivery, the way Service Bus does:

- the header, with the delivery count written explicitly even when it is 0 (the SDK
  reads an omitted field as None, and its tests expect 0 on first delivery);
- the message annotations, where the broker's facts (`x-opt-sequence-number`,
  `x-opt-enqueued-time`, `x-opt-locked-until`, ...) join the sender's own.

Dead-lettered messages also get `DeadLetterReason` / `DeadLetterErrorDescription` in
their application properties, as on Service Bus.

Batches: proton does not expose a delivery's message-format, so the SDK's batch
(format 0x80013700, one data section per message, each an encoded message) is
recognised by shape: every body section is a data section whose bytes decode completely
as an AMQP message with a body. A single message whose body happens to be a complete
encoded AMQP message would be mistaken for a batch of one; the SDK never sends that.

Binary values decoded by proton can be views into its buffers, so everything kept is
copied into `bytes` first.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from proton import UNDESCRIBED, Array, Data, Described, symbol, timestamp, uint, ulong

from .entities import Entry, EntryState, Envelope
from .errors import DecodeError

HEADER, DELIVERY_ANNOTATIONS, MESSAGE_ANNOTATIONS, PROPERTIES = 0x70, 0x71, 0x72, 0x73
APPLICATION_PROPERTIES, DATA, SEQUENCE, VALUE, FOOTER = 0x74, 0x75, 0x76, 0x77, 0x78
_SYMBOLIC = {
    "amqp:header:list": HEADER,
    "amqp:delivery-annotations:map": DELIVERY_ANNOTATIONS,
    "amqp:message-annotations:map": MESSAGE_ANNOTATIONS,
    "amqp:properties:list": PROPERTIES,
    "amqp:application-properties:map": APPLICATION_PROPERTIES,
    "amqp:data:binary": DATA,
    "amqp:amqp-sequence:list": SEQUENCE,
    "amqp:amqp-value:*": VALUE,
    "amqp:footer:map": FOOTER,
}
_BODY = (DATA, SEQUENCE, VALUE)
_DATA_DESCRIPTOR = b"\x00\x53\x75"  # described, smallulong 0x75
_BROKER_ANNOTATIONS = frozenset(
    symbol(name)
    for name in (
        "x-opt-sequence-number",
        "x-opt-enqueued-time",
        "x-opt-locked-until",
        "x-opt-message-state",
        "x-opt-deadletter-source",
    )
)
SCHEDULED_ENQUEUE_TIME = symbol("x-opt-scheduled-enqueue-time")
DOTNET_EPOCH_TICKS = 621355968000000000
# proton's own marker for an array without descriptor; its type hints leave it out.
UNDESCRIBED_ARRAY: Any = UNDESCRIBED


@dataclass(frozen=True)
class Section:
    code: int
    raw: bytes
    value: Any


@dataclass(frozen=True)
class MessageContent:
    """A stored message: the sender's sections, ready to be re-encoded on delivery."""

    header: tuple[Any, ...]
    annotations: dict[Any, Any]
    properties: bytes
    application_properties: dict[Any, Any] | None
    application_raw: bytes
    body: bytes

    @property
    def size(self) -> int:
        return len(self.properties) + len(self.application_raw) + len(self.body)


def parse_sections(payload: bytes | memoryview) -> list[Section]:
    view = memoryview(payload)
    sections = []
    pos = 0
    while pos < len(view):
        data_section = _data_section(view, pos)
        if data_section is not None:
            end, value = data_section
            sections.append(Section(DATA, bytes(view[pos:end]), value))
            pos = end
            continue
        data = Data()
        try:
            # proton's binding takes any buffer (ffi.from_buffer), its hint says bytes.
            consumed = data.decode(cast(bytes, view[pos:]))
            data.rewind()
            data.next()
            value = owned(data.get_object())
        except Exception as exc:  # proton raises DataException and friends
            raise DecodeError(f"undecodable message section at byte {pos}: {exc}") from exc
        if consumed <= 0 or not isinstance(value, Described):
            raise DecodeError(f"message section at byte {pos} is not a described type")
        descriptor = value.descriptor
        code = _SYMBOLIC.get(str(descriptor)) if isinstance(descriptor, symbol) else descriptor
        if not isinstance(code, int) or not HEADER <= code <= FOOTER:
            raise DecodeError(f"unknown message section descriptor {descriptor!r}")
        sections.append(Section(int(code), bytes(view[pos : pos + consumed]), value.value))
        pos += consumed
    return sections


def _data_section(view: memoryview, pos: int) -> tuple[int, bytes] | None:
    """A data section in its usual encoding, read without proton: most of a message's
    bytes are data sections, and decoding them through `Data` dominated the cost."""
    if bytes(view[pos : pos + 3]) != _DATA_DESCRIPTOR or len(view) < pos + 5:
        return None
    constructor = view[pos + 3]
    if constructor == 0xA0:
        start, size = pos + 5, view[pos + 4]
    elif constructor == 0xB0 and len(view) >= pos + 8:
        start, size = pos + 8, int.from_bytes(view[pos + 4 : pos + 8], "big")
    else:
        return None
    end = start + size
    if end > len(view):
        raise DecodeError(f"data section at byte {pos} runs past the end of the message")
    return end, bytes(view[start:end])


def owned(value: Any) -> Any:
    """`value` with every binary copied out of proton's buffer (which `Data` frees)."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, Described):
        return Described(value.descriptor, owned(value.value))
    if isinstance(value, Array):
        return Array(value.descriptor, value.type, *(owned(item) for item in value.elements))
    if isinstance(value, list):
        return [owned(item) for item in value]
    if isinstance(value, dict):
        return {owned(key): owned(item) for key, item in value.items()}
    return value


def unpack(payload: bytes | memoryview) -> list[Envelope]:
    """The messages of one transfer: one, or each message of an SDK batch."""
    sections = parse_sections(payload)
    inner = _batch_members(sections)
    if inner is None:
        return [_envelope(sections)]
    return [_envelope(member) for member in inner]


def _batch_members(sections: list[Section]) -> list[list[Section]] | None:
    bodies = [section for section in sections if section.code in _BODY]
    if not bodies or any(section.code != DATA for section in bodies):
        return None
    members = []
    for section in bodies:
        try:
            member = parse_sections(bytes(section.value))
        except DecodeError:
            return None
        if not any(part.code in _BODY for part in member):
            return None
        members.append(member)
    return members


def _envelope(sections: list[Section]) -> Envelope:
    by_code: dict[int, Section] = {}
    body = bytearray()
    for section in sections:
        if section.code in _BODY or section.code == FOOTER:
            body += section.raw
        else:
            by_code[section.code] = section
    if not any(section.code in _BODY for section in sections):
        raise DecodeError("message has no body section")
    header = _fields(by_code.get(HEADER), 5)
    props = _fields(by_code.get(PROPERTIES), 13)
    annotations = dict(_mapping(by_code.get(MESSAGE_ANNOTATIONS)))
    app = by_code.get(APPLICATION_PROPERTIES)
    content = MessageContent(
        header=tuple(header[:4]),
        annotations=annotations,
        properties=by_code[PROPERTIES].raw if PROPERTIES in by_code else b"",
        application_properties=dict(_mapping(app)) if app else None,
        application_raw=app.raw if app else b"",
        body=bytes(body),
    )
    ttl = header[2]
    return Envelope(
        payload=content,
        session_id=str(props[10]) if props[10] is not None else None,
        message_id=_message_id_key(props[0]),
        time_to_live=int(ttl) / 1000 if ttl else None,
        scheduled_enqueue_time=_seconds(annotations.get(SCHEDULED_ENQUEUE_TIME)),
    )


def _fields(section: Section | None, count: int) -> list[Any]:
    values = list(section.value) if section and isinstance(section.value, list) else []
    return (values + [None] * count)[:count]


def _mapping(section: Section | None) -> dict[Any, Any]:
    return section.value if section and isinstance(section.value, dict) else {}


def _message_id_key(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | memoryview):
        return "binary:" + bytes(value).hex()
    return f"{type(value).__name__}:{value}"


def _seconds(value: Any) -> float | None:
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, int):
        return value / 1000
    return None


def encode_delivery(entry: Entry, *, locked_until: float | None, token: uuid.UUID | None) -> bytes:
    """The wire form of `entry` as Service Bus would deliver (or peek) it."""
    content = entry.envelope.payload
    if not isinstance(content, MessageContent):
        raise TypeError(f"entry {entry.seq} holds no MessageContent")
    count = entry.delivery_count
    durable, priority, ttl, _ = content.header
    header = [durable, priority, ttl, count == 0, uint(count)]
    parts = [_encode(Described(ulong(HEADER), header))]
    if token is not None:
        lock_token: dict[Any, Any] = {symbol("x-opt-lock-token"): token}
        parts.append(_encode(Described(ulong(DELIVERY_ANNOTATIONS), lock_token)))
    parts.append(_encode(Described(ulong(MESSAGE_ANNOTATIONS), _annotations(entry, locked_until))))
    parts.append(content.properties)
    dead_letter = entry.dead_letter
    if dead_letter is not None and (dead_letter.reason or dead_letter.description):
        props = dict(content.application_properties or {})
        if dead_letter.reason is not None:
            props["DeadLetterReason"] = dead_letter.reason
        if dead_letter.description is not None:
            props["DeadLetterErrorDescription"] = dead_letter.description
        parts.append(_encode(Described(ulong(APPLICATION_PROPERTIES), props)))
    else:
        parts.append(content.application_raw)
    parts.append(content.body)
    return b"".join(parts)


_STATE_CODES = {EntryState.DEFERRED: 1, EntryState.SCHEDULED: 2}


def _annotations(entry: Entry, locked_until: float | None) -> dict[Any, Any]:
    content = entry.envelope.payload
    assert isinstance(content, MessageContent)
    annotations = {
        key: value for key, value in content.annotations.items() if key not in _BROKER_ANNOTATIONS
    }
    annotations[symbol("x-opt-sequence-number")] = entry.seq
    annotations[symbol("x-opt-enqueued-time")] = amqp_timestamp(entry.enqueued_at)
    if locked_until is not None:
        annotations[symbol("x-opt-locked-until")] = amqp_timestamp(locked_until)
    if entry.scheduled_at is not None:
        annotations[SCHEDULED_ENQUEUE_TIME] = amqp_timestamp(entry.scheduled_at)
    state = EntryState.DEFERRED if entry.deferred else entry.state
    annotations[symbol("x-opt-message-state")] = _STATE_CODES.get(state, 0)
    if entry.dead_letter is not None:
        annotations[symbol("x-opt-deadletter-source")] = entry.dead_letter.source
    return annotations


def _encode(value: Any) -> bytes:
    data = Data()
    data.put_object(value)
    return bytes(data.encode())


def amqp_timestamp(seconds: float) -> timestamp:
    return timestamp(round(seconds * 1000))


def dotnet_ticks(seconds: float) -> int:
    """Seconds since the Unix epoch as .NET DateTime ticks (100 ns since year 1)."""
    return DOTNET_EPOCH_TICKS + round(seconds * 10_000_000)


def typed_array(kind: int, values: Iterable[Any]) -> Array:
    """An AMQP array of one proton `Data` type, e.g. `typed_array(Data.LONG, [1, 2])`."""
    return Array(UNDESCRIBED_ARRAY, kind, *values)


def as_list(value: Any) -> list[Any]:
    """A request field that may arrive as an AMQP array or list, as a Python list."""
    if isinstance(value, Array):
        return list(value.elements)
    if isinstance(value, list | tuple):
        return list(value)
    raise TypeError(f"expected an array or list, got {type(value).__name__}")
