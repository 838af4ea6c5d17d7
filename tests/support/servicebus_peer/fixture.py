"""The handle tests hold: start a peer, point the SDK at it, inject faults, look inside.

`running_peer` starts a `ServiceBusPeer` on a free port (or a given one) and stops it
on exit; it is a context manager for `with` and `async with` alike, because the peer
runs on its own thread and starting or stopping it is quick and blocking. Methods
that touch state run on the peer's thread (`PeerLoop.call`), so tests may call them
from any thread, including an event loop's.

Time: the peer keeps one clock for everything it decides and reports (lock expiry and
locked-until times, scheduled and enqueue times, message expiry, how long a
next-available attach is held). With `speed=S` that clock starts at the real time and
runs S times as fast, so a 30 s lock ends after 30/S real seconds and the times the SDK
sees are in the peer's time; tests read it with `peer.now()` (an aware UTC datetime)
and compute schedule times and expected lock ends from it, not from the real clock.
Waits the client asks for (`com.microsoft:timeout`) count in peer time too, while
heartbeats and `restart`'s downtime stay in real time. The default, 1, is the real
clock.
"""

from __future__ import annotations

import datetime
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

from .amqp import PeerHandler
from .broker import Broker
from .entities import EntryState, QueueSpec
from .loop import PeerLoop


@dataclass(frozen=True)
class QueueCounts:
    """How many messages a queue holds, by state; `dead_lettered` is its subqueue's total."""

    active: int
    locked: int
    deferred: int
    scheduled: int
    dead_lettered: int


class ServiceBusPeer:
    """A Service Bus namespace on `host:port`, reachable with `connection_string`."""

    def __init__(
        self,
        queues: Mapping[str, QueueSpec] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        key_name: str = "test",
        key: str = "dGVzdA==",
        speed: float = 1.0,
    ) -> None:
        """`speed`: peer seconds per real second (see the module docstring)."""
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(
                f"speed is peer seconds per real second and must be finite and > 0, not {speed!r}"
            )
        self.host = host
        self.key_name = key_name
        self.key = key
        self._speed = float(speed)
        self._origin = time.time()
        self._broker = Broker(self.clock)
        for name, spec in (queues or {}).items():
            self._broker.add_queue(name, spec)
        self._loop = PeerLoop(
            PeerHandler(self._broker, self.clock),
            host=host,
            port=port,
            verify=self._verify,
            clock=self.clock,
            speed=self._speed,
        )

    @property
    def speed(self) -> float:
        """Peer seconds per real second."""
        return self._speed

    def clock(self) -> float:
        """The peer's time, in seconds since the epoch: the clock its broker runs on."""
        if self._speed == 1.0:
            return time.time()
        return self._origin + (time.time() - self._origin) * self._speed

    def now(self) -> datetime.datetime:
        """The peer's time as an aware UTC datetime, for schedule times and lock checks."""
        return datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)

    def _verify(self, user: str, password: str) -> bool:
        return user == self.key_name and password == self.key

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    @property
    def port(self) -> int:
        return self._loop.port

    @property
    def fully_qualified_namespace(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connection_string(self) -> str:
        return (
            f"Endpoint=sb://{self.host}:{self.port}/;SharedAccessKeyName={self.key_name};"
            f"SharedAccessKey={self.key};UseDevelopmentEmulator=true"
        )

    @property
    def connections_opened(self) -> int:
        """AMQP connections accepted since the peer started (across restarts)."""
        return self._loop.connections_opened

    def add_queue(self, name: str, spec: QueueSpec | None = None) -> None:
        self._loop.call(lambda: self._broker.add_queue(name, spec or QueueSpec()))

    def queue_names(self) -> list[str]:
        return self._loop.call(self._broker.queue_names)

    def counts(self, name: str) -> QueueCounts:
        def count() -> QueueCounts:
            self._broker.run_due()
            entries = list(self._broker.entity(name).entries.values())
            dead = len(self._broker.entity(name + "/$DeadLetterQueue").entries)
            by_state = dict.fromkeys(EntryState, 0)
            for entry in entries:
                by_state[entry.state] += 1
            return QueueCounts(
                active=by_state[EntryState.AVAILABLE],
                locked=by_state[EntryState.LOCKED],
                deferred=by_state[EntryState.DEFERRED],
                scheduled=by_state[EntryState.SCHEDULED],
                dead_lettered=dead,
            )

        return self._loop.call(count)

    def lock_tokens(self, name: str) -> set[uuid.UUID]:
        """The lock tokens currently held on messages of queue (or subqueue) `name`."""
        return self._loop.call(lambda: set(self._broker.entity(name).locks))

    def drop_connections(self) -> None:
        """Close every client connection abruptly: sockets shut, no AMQP close frames."""
        self._loop.call(self._loop.drop_all)

    def restart(self, downtime: float = 0.0) -> None:
        """Stop listening and drop every connection; after `downtime` real seconds listen
        on the same port.

        Broker state (queues, messages, session state) survives, as it would across a
        Service Bus gateway restart; locks held by dropped connections are released
        as connection loss releases them.
        """

        def go_down() -> None:
            self._loop.stop_listening()
            self._loop.drop_all()

        self._loop.call(go_down)
        if downtime > 0:
            time.sleep(downtime)
        self._loop.call(self._loop.start_listening)


class running_peer:
    """Context manager (sync and async) that runs a `ServiceBusPeer` for its body."""

    def __init__(
        self,
        queues: Mapping[str, QueueSpec] | None = None,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        key_name: str = "test",
        key: str = "dGVzdA==",
        speed: float = 1.0,
    ) -> None:
        self._peer = ServiceBusPeer(
            queues, host=host, port=port, key_name=key_name, key=key, speed=speed
        )

    def __enter__(self) -> ServiceBusPeer:
        self._peer.start()
        return self._peer

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._peer.stop()

    async def __aenter__(self) -> ServiceBusPeer:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, traceback)
