"""LISTEN/NOTIFY wake-ups for the loops that wait on the database.

One dedicated connection listens on the channels the process cares about and
sets an asyncio.Event per channel, so loops sleep until something changed (or
until a computed due time) instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

log = logging.getLogger("sagaflow.notify")


class Notifications:
    def __init__(self, dsn: str, channels: tuple[str, ...]) -> None:
        self._dsn = dsn
        self._events = {c: asyncio.Event() for c in channels}
        self._conn: asyncpg.Connection | None = None

    async def start(self) -> None:
        self._conn = await asyncpg.connect(self._dsn)
        for channel in self._events:
            await self._conn.add_listener(channel, self._on_notify)

    def event(self, channel: str) -> asyncio.Event:
        return self._events[channel]

    def _on_notify(self, _conn: Any, _pid: int, channel: str, _payload: str) -> None:
        event = self._events.get(channel)
        if event is not None:
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
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
