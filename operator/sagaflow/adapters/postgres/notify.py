"""LISTEN/NOTIFY wake-ups for the loops that wait on the database.

One dedicated connection listens on the channels the process cares about and
sets an asyncio.Event per channel, so loops sleep until something changed (or
until a computed due time) instead of polling.

The connection dies with the server (a restart, an outage). Then every channel's
event is set, because notifications may have been missed and waiters must look
again, and a background task reconnects with a short backoff and LISTENs anew; once
it is back every event is set once more for what was missed while it was gone.
Meanwhile loops still wake on their own timeouts. Reconnecting is quiet: the loops
that use the database report the outage (`sagaflow.runtime.outages`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

log = logging.getLogger("sagaflow.notify")

_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 0.5


class Notifications:
    def __init__(self, dsn: str, channels: tuple[str, ...]) -> None:
        self._dsn = dsn
        self._events = {c: asyncio.Event() for c in channels}
        self._conn: asyncpg.Connection | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closed = False
        self.reconnects = 0  # how often LISTEN was re-opened: for tests

    async def start(self) -> None:
        await self._connect()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            for channel in self._events:
                await conn.add_listener(channel, self._on_notify)
            conn.add_termination_listener(self._on_lost)
        except BaseException:
            await asyncio.shield(conn.close())
            raise
        self._conn = conn

    def event(self, channel: str) -> asyncio.Event:
        return self._events[channel]

    def _on_notify(self, _conn: Any, _pid: int, channel: str, _payload: str) -> None:
        event = self._events.get(channel)
        if event is not None:
            event.set()

    def _on_lost(self, _conn: Any) -> None:
        self._conn = None
        self._wake_all()
        if not self._closed and self._reconnecting is None:
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = _FIRST_BACKOFF
        try:
            while not self._closed:
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                except Exception as exc:
                    log.debug("re-opening LISTEN failed: %s", exc)
                    delay = min(delay * 2, _MAX_BACKOFF)
                    continue
                self.reconnects += 1
                self._wake_all()
                return
        finally:
            self._reconnecting = None

    def _wake_all(self) -> None:
        for event in self._events.values():
            event.set()

    async def wait(self, channel: str, seconds: float) -> None:
        """Wait for a notification on `channel` or `seconds`, then re-arm.

        A notification that came while the caller was working is not lost: the event
        stays set and this returns at once.
        """
        event = self._events[channel]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=max(seconds, 0.0))
        event.clear()

    async def close(self) -> None:
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.remove_termination_listener(self._on_lost)
            with contextlib.suppress(Exception):
                await conn.close()
