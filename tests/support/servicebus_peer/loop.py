"""The peer's I/O: one thread, one selector, sockets in and proton engine events out.

proton's own `Container` would serve the sockets too, but the peer needs what it
hides: the bytes before AMQP (for PLAIN, see `sasl.py`), the sockets themselves (to
drop every connection abruptly, or stop listening and listen again on the same port,
as fault injection), and wakeups exactly at the handler's deadlines (lock expiry,
held session attaches). So this module drives proton's engine API directly: per
connection a `Transport` and `Connection`, one shared `Collector`, events handed to
the protocol handler, which never touches a socket.

Two time bases meet here. The handler's deadlines are in the peer's clock, which may
run `speed` times as fast as real time (see `fixture`), so the loop divides the time
left to a deadline by `speed` to get its select timeout. proton's transports are
ticked with real time: heartbeats and idle timeouts are agreed with the client, whose
clock is not accelerated.

Everything the handler and broker own is touched only on the loop thread; other
threads reach it through `call`, which runs a function there and waits for its result.
An exception in the handler for one event closes that connection with
`amqp:internal-error` and is logged; it never stops the loop.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import math
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from proton import Collector, Condition, Connection, Event, Transport

from .sasl import SaslFront, SaslState, Verifier

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")
_READ_SIZE = 64 * 1024


class ProtocolHandler(Protocol):
    def on_event(self, event: Event) -> None: ...

    def after_events(self) -> None: ...

    def next_deadline(self) -> float | None: ...

    def connection_closed(self, connection: Connection) -> None: ...


@dataclass(eq=False)
class _Channel:
    sock: socket.socket
    transport: Transport
    connection: Connection
    sasl: SaslFront
    outgoing: bytearray = field(default_factory=bytearray)
    incoming: bytearray = field(default_factory=bytearray)
    mask: int = 0


class PeerLoop:
    """Serves AMQP on `host:port` (0 picks a free port) until `stop`."""

    def __init__(
        self,
        handler: ProtocolHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        verify: Verifier | None = None,
        clock: Callable[[], float] = time.time,
        speed: float = 1.0,
    ) -> None:
        """`clock` is the handler's clock (its deadlines are in it); it runs `speed` times
        as fast as real time."""
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a finite number greater than 0, not {speed!r}")
        self._handler = handler
        self._clock = clock
        self._speed = speed
        self._host = host
        self._port = port
        self._verify = verify
        self._selector = selectors.DefaultSelector()
        self._collector = Collector()
        self._channels: dict[Connection, _Channel] = {}
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._calls: queue.SimpleQueue[
            tuple[Callable[[], object], concurrent.futures.Future[object]]
        ]
        self._calls = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._next_tick: float | None = None
        self.connections_opened = 0

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        self.start_listening()
        self._thread = threading.Thread(target=self._run, name="servicebus-peer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._wake()
        self._thread.join(timeout=10)
        self._thread = None
        self.stop_listening()
        self.drop_all()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def call(self, fn: Callable[[], _T], timeout: float = 10.0) -> _T:
        """Run `fn` on the loop thread and return its result (or raise its exception)."""
        if threading.current_thread() is self._thread or self._thread is None:
            return fn()
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        self._calls.put((fn, future))
        self._wake()
        return future.result(timeout)  # type: ignore[return-value]

    # -- loop-thread operations ---------------------------------------------------

    def start_listening(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, self._port))
        listener.listen(64)
        listener.setblocking(False)
        self._port = listener.getsockname()[1]
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, listener)

    def stop_listening(self) -> None:
        if self._listener is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._listener)
        self._listener.close()
        self._listener = None

    def drop_all(self) -> None:
        """Close every client socket at once, with no AMQP close (a network failure)."""
        for channel in list(self._channels.values()):
            self._discard(channel)

    # -- the loop -----------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _run(self) -> None:
        while not self._stopping:
            for key, mask in self._selector.select(self._timeout()):
                source = key.data
                try:
                    self._ready(source, mask)
                except Exception:
                    _LOG.exception("servicebus peer: I/O failed; dropping the connection")
                    if isinstance(source, _Channel):
                        self._discard(source)
            self._run_calls()
            self._dispatch()
            self._guard(None, self._handler.after_events)
            self._dispatch()
            self._service_channels()

    def _timeout(self) -> float:
        """Real seconds until the nearest deadline, capped at one second."""
        waits = [1.0]
        deadline = self._handler.next_deadline()
        if deadline is not None:
            waits.append((deadline - self._clock()) / self._speed)
        if self._next_tick is not None:
            waits.append(self._next_tick - time.time())
        return max(min(waits), 0.0)

    def _ready(self, source: object, mask: int) -> None:
        if source is self._wake_r:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
        elif source is self._listener:
            self._accept()
        elif isinstance(source, _Channel) and source.connection in self._channels:
            if mask & selectors.EVENT_READ:
                self._read(source)
            if mask & selectors.EVENT_WRITE and source.connection in self._channels:
                self._write(source)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the calling thread
                future.set_exception(exc)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = Connection()
            transport = Transport(Transport.SERVER)
            transport.bind(connection)
            connection.collect(self._collector)
            channel = _Channel(sock, transport, connection, SaslFront(self._verify))
            self._channels[connection] = channel
            self.connections_opened += 1
            self._update_interest(channel)

    def _read(self, channel: _Channel) -> None:
        try:
            data = channel.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            channel.transport.close_tail()
            return
        if channel.sasl.state is not SaslState.DONE:
            step = channel.sasl.feed(data)
            channel.outgoing += step.reply
            data = step.passthrough
            if channel.sasl.state is SaslState.FAILED:
                _LOG.info("SASL failed: %s", channel.sasl.failure)
        channel.incoming += data
        self._push_incoming(channel)

    def _push_incoming(self, channel: _Channel) -> None:
        while channel.incoming:
            capacity = channel.transport.capacity()
            if capacity <= 0:
                if capacity < 0:
                    channel.incoming.clear()
                return
            chunk = bytes(channel.incoming[:capacity])
            channel.transport.push(chunk)
            del channel.incoming[: len(chunk)]

    def _write(self, channel: _Channel) -> None:
        try:
            if channel.outgoing:
                sent = channel.sock.send(channel.outgoing)
                del channel.outgoing[:sent]
                if channel.outgoing:
                    return
            pending = channel.transport.pending()
            output = channel.transport.peek(pending) if pending > 0 else None
            if output:
                channel.transport.pop(channel.sock.send(output))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            channel.transport.close_head()
            channel.transport.close_tail()

    def _dispatch(self) -> None:
        while True:
            event = self._collector.peek()
            if event is None:
                return
            connection = event.connection
            channel = self._channels.get(connection) if connection is not None else None
            if connection is None or channel is not None:
                self._guard(channel, functools.partial(self._handler.on_event, event))
            self._collector.pop()

    def _guard(self, channel: _Channel | None, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:
            _LOG.exception("servicebus peer: handler failed")
            if channel is not None:
                channel.connection.condition = Condition(
                    "amqp:internal-error", "The peer failed to handle a frame; see its log."
                )
                with contextlib.suppress(Exception):
                    channel.connection.close()

    def _service_channels(self) -> None:
        now = time.time()  # real time: see the module docstring
        self._next_tick = None
        for channel in list(self._channels.values()):
            try:
                self._service(channel, now)
            except Exception:
                _LOG.exception("servicebus peer: I/O failed; dropping the connection")
                self._discard(channel)

    def _service(self, channel: _Channel, now: float) -> None:
        self._push_incoming(channel)
        # Ticking runs proton's idle-timeout bookkeeping (heartbeats out, dead peers).
        tick = channel.transport.tick(now)
        if tick > 0 and (self._next_tick is None or tick < self._next_tick):
            self._next_tick = tick
        if channel.outgoing or channel.transport.pending() > 0:
            self._write(channel)
        sasl_failed = channel.sasl.state is SaslState.FAILED and not channel.outgoing
        if channel.transport.closed or sasl_failed:
            self._discard(channel)
        else:
            self._update_interest(channel)

    def _update_interest(self, channel: _Channel) -> None:
        mask = 0
        if channel.sasl.state is not SaslState.DONE or channel.transport.capacity() > 0:
            mask |= selectors.EVENT_READ
        if channel.outgoing or channel.transport.pending() > 0:
            mask |= selectors.EVENT_WRITE
        if mask == channel.mask:
            return
        if channel.mask == 0:
            self._selector.register(channel.sock, mask, channel)
        elif mask == 0:
            self._selector.unregister(channel.sock)
        else:
            self._selector.modify(channel.sock, mask, channel)
        channel.mask = mask

    def _discard(self, channel: _Channel) -> None:
        condition = channel.transport.condition
        # Proton ended the connection for a protocol error: say which. A client that
        # went away (a socket closed, a process killed) is "connection aborted".
        if condition is not None and "connection aborted" not in (condition.description or ""):
            _LOG.warning(
                "servicebus peer: connection ended by the AMQP engine: %s: %s",
                condition.name,
                condition.description,
            )
        self._channels.pop(channel.connection, None)
        if channel.mask:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(channel.sock)
        channel.sock.close()
        self._guard(None, lambda: self._handler.connection_closed(channel.connection))
        with contextlib.suppress(Exception):
            channel.transport.unbind()
