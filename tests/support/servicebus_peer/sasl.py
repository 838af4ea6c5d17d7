"""The server half of SASL (ANONYMOUS and PLAIN), run ahead of proton's transport.

proton's built-in SASL (without Cyrus, as the PyPI wheel builds it) can only offer
ANONYMOUS and EXTERNAL on a server, yet Service Bus also takes PLAIN with the shared
access key name and key. So the peer answers the SASL exchange itself and hands proton
only what follows it, the plain AMQP protocol header onwards; proton's server
transport accepts a connection that starts there. A client that skips SASL and sends
the AMQP header straight away is passed through untouched.

`SaslFront.feed` is a pure state machine over bytes, so it is testable without sockets.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from proton import Array, Data, Described, symbol, ubyte, ulong

from .codec import UNDESCRIBED_ARRAY, owned

SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
_MECHANISMS, _INIT, _OUTCOME = 0x40, 0x41, 0x44
_OK, _AUTH_FAILED = 0, 1
_MAX_FRAME = 64 * 1024

Verifier = Callable[[str, str], bool]


class SaslState(enum.Enum):
    HEADER = "header"
    INIT = "init"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class SaslStep:
    """What one `feed` produced: bytes to write back, bytes that belong to AMQP."""

    reply: bytes = b""
    passthrough: bytes = b""


class SaslFront:
    """One connection's SASL negotiation. `verify(user, password)` checks PLAIN logins."""

    def __init__(self, verify: Verifier | None = None) -> None:
        self._verify = verify
        self._buffer = bytearray()
        self.state = SaslState.HEADER
        self.mechanism: str | None = None
        self.user: str | None = None
        self.failure: str | None = None

    def feed(self, data: bytes) -> SaslStep:
        if self.state is SaslState.DONE:
            return SaslStep(passthrough=data)
        if self.state is SaslState.FAILED:
            return SaslStep()
        self._buffer += data
        if self.state is SaslState.HEADER:
            if len(self._buffer) < len(SASL_HEADER):
                return SaslStep()
            header = bytes(self._buffer[:8])
            if header == AMQP_HEADER:
                self.state = SaslState.DONE
                rest, self._buffer = bytes(self._buffer), bytearray()
                return SaslStep(passthrough=rest)
            del self._buffer[:8]
            if header != SASL_HEADER:
                return self._fail(f"unsupported protocol header {header!r}", SASL_HEADER)
            self.state = SaslState.INIT
            step = self._take_init()
            return SaslStep(SASL_HEADER + _frame(_mechanisms()) + step.reply, step.passthrough)
        return self._take_init()

    def _take_init(self) -> SaslStep:
        if len(self._buffer) < 8:
            return SaslStep()
        size = int.from_bytes(self._buffer[:4], "big")
        if size < 8 or size > _MAX_FRAME:
            return self._fail(f"invalid SASL frame size {size}", b"")
        if len(self._buffer) < size:
            return SaslStep()
        frame, rest = bytes(self._buffer[:size]), bytes(self._buffer[size:])
        self._buffer = bytearray()
        offset = frame[4] * 4
        try:
            init = _decode(frame[offset:])
        except Exception as exc:  # proton's DataException, or a malformed list
            return self._fail(f"undecodable sasl-init: {exc}", b"")
        if not isinstance(init, Described) or init.descriptor != _INIT:
            return self._fail(f"expected sasl-init, got {init!r}", b"")
        values = init.value if isinstance(init.value, list) else []
        fields = [*values, None, None, None]
        mechanism = str(fields[0])
        response = bytes(fields[1]) if isinstance(fields[1], bytes) else b""
        if not self._accepts(mechanism, response):
            return self._fail(f"authentication failed for mechanism {mechanism}", b"")
        self.state = SaslState.DONE
        return SaslStep(_frame(Described(ulong(_OUTCOME), [ubyte(_OK)])), rest)

    def _accepts(self, mechanism: str, response: bytes) -> bool:
        self.mechanism = mechanism
        if mechanism == "ANONYMOUS":
            self.user = "anonymous"
            return True
        if mechanism != "PLAIN":
            return False
        parts = response.split(b"\x00")
        if len(parts) != 3:
            return False
        user, password = parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")
        self.user = user
        return self._verify is None or self._verify(user, password)

    def _fail(self, reason: str, prefix: bytes) -> SaslStep:
        self.state = SaslState.FAILED
        self.failure = reason
        outcome = _frame(Described(ulong(_OUTCOME), [ubyte(_AUTH_FAILED)]))
        return SaslStep(prefix + outcome)


def _mechanisms() -> Described:
    offered = Array(UNDESCRIBED_ARRAY, Data.SYMBOL, symbol("ANONYMOUS"), symbol("PLAIN"))
    return Described(ulong(_MECHANISMS), [offered])


def _frame(body: Described) -> bytes:
    data = Data()
    data.put_object(body)
    encoded = bytes(data.encode())
    return (8 + len(encoded)).to_bytes(4, "big") + b"\x02\x01\x00\x00" + encoded


def _decode(encoded: bytes) -> object:
    data = Data()
    data.decode(encoded)
    data.rewind()
    data.next()
    return owned(data.get_object())
