"""Running a suspect command with nothing else running beside it.

A command whose previous receiver died while holding it (`crash_count` > 0, told by
the Postgres bus) may be what killed that process. The host runs such a suspect
alone: it stops taking new work, lets the running handlers finish, runs the suspect,
then carries on. If the process dies again meanwhile the bus pins that death on the
suspect alone, and after `max_crash_count` such deaths dead-letters it
(`ReceiverCrashed`), so the step fails visibly instead of crashing the runner
forever, and the healthy commands that happened to share its process are never
blamed. A suspect waits at most `max_wait` for the others; a hung handler must not
stall the whole runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

log = logging.getLogger("sagaflow.runner")


class Gate:
    """Shared for ordinary handlers, exclusive for suspects (which go first)."""

    def __init__(self, max_wait: float = 60.0) -> None:
        self._changed = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # suspects waiting for the others to finish
        self._max_wait = max_wait

    def _closed_to_new_work(self) -> bool:
        return self._exclusive or self._waiting > 0

    async def open(self) -> None:
        """Wait until new work may be taken (no suspect waiting or running)."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self._closed_to_new_work())

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._closed_to_new_work())
            self._shared += 1
        try:
            yield
        finally:
            async with self._changed:
                self._shared -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self, who: str) -> AsyncIterator[bool]:
        """Yields whether the suspect runs alone (False: waited too long, runs anyway)."""
        async with self._changed:
            self._waiting += 1
            try:
                alone = True
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self._shared == 0 and not self._exclusive),
                        self._max_wait,
                    )
                except TimeoutError:
                    alone = False
                    log.warning(
                        "could not run %s alone within %.0fs; running it beside others",
                        who,
                        self._max_wait,
                    )
                if alone:
                    self._exclusive = True
                else:
                    self._shared += 1
            finally:
                self._waiting -= 1
                self._changed.notify_all()
        try:
            yield alone
        finally:
            async with self._changed:
                if alone:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._changed.notify_all()
