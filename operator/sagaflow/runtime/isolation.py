"""Running a suspect command with nothing else running beside it, for a while.

A command whose receivers died twice while holding it (`crash_count` >= 2, told by
the Postgres bus) may be what killed them. The host runs such a suspect
alone: it stops taking new work, lets the running handlers finish (waiting at most
`window` seconds for them), runs the suspect, and takes new work again once the
suspect is done or has run for `window` seconds. If the process dies meanwhile, the
bus pins that death on the suspect alone, and after `max_crash_count` such deaths
dead-letters it (`ReceiverCrashed`): the step fails visibly instead of crashing the
runner forever, and the healthy commands that happened to share its process are
never blamed.

Both waits are bounded: a crash that is the command's doing comes soon after it
starts, while a long step or a hung handler must not stall the whole runner. A
suspect that outlives its window runs on beside the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

log = logging.getLogger("sagaflow.runner")


class Gate:
    """Shared for ordinary handlers, exclusive (for a while) for suspects."""

    def __init__(self, window: float = 5.0) -> None:
        self._changed = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # suspects waiting for the others to finish
        self._window = window

    def _closed_to_new_work(self) -> bool:
        return self._exclusive or self._waiting > 0

    async def open(self) -> None:
        """Wait until new work may be taken (no suspect waiting or running alone)."""
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
            await self._leave_shared()

    async def _leave_shared(self) -> None:
        async with self._changed:
            self._shared -= 1
            self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self, who: str) -> AsyncIterator[bool]:
        """Yields whether the suspect starts alone (False: others ran on too long)."""
        async with self._changed:
            self._waiting += 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self._shared == 0 and not self._exclusive),
                        self._window,
                    )
                alone = self._shared == 0 and not self._exclusive
                if alone:
                    self._exclusive = True
                else:
                    self._shared += 1
                    log.warning(
                        "could not run %s alone: others still ran after %gs", who, self._window
                    )
            finally:
                self._waiting -= 1
                self._changed.notify_all()
        demoted = False

        async def demote_later() -> None:
            # The window is over: from now on the suspect is an ordinary running handler.
            nonlocal demoted
            await asyncio.sleep(self._window)
            async with self._changed:
                self._exclusive, self._shared, demoted = False, self._shared + 1, True
                self._changed.notify_all()

        timer = asyncio.create_task(demote_later()) if alone else None
        try:
            yield alone
        finally:
            if timer is not None:
                timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await timer
            async with self._changed:
                if alone and not demoted:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._changed.notify_all()
