"""One process's view of whether its database is reachable, shared by all its loops.

When Postgres restarts or is down, every loop of a process (consumers, timers, relay,
receive loops, the settler, the mirror, progress) fails at about the same time. Each
reports the failure here: an outage is logged once when it begins and once when it
ends, one probe reconnects with a short backoff, and the loops wait on `available()`
instead of each retrying, sleeping and logging on its own. The backoff is capped low
(half a second) so the loops, and the durable timers that fell due meanwhile, resume
within a second of the server answering again.

The classifier decides what counts as an outage (for Postgres:
`sagaflow.adapters.postgres.errors.database_unavailable`); anything else is a real
error and stays the caller's to report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("sagaflow.outages")

_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 0.5
# Failures just after recovery (connections of the pool that died with the old server)
# belong to the outage that just ended: they do not open a new one in the log.
_SETTLE_SECONDS = 5.0


class OutageWatch:
    def __init__(
        self,
        what: str,
        probe: Callable[[], Awaitable[object]],
        is_outage: Callable[[BaseException], bool],
        *,
        max_backoff: float = _MAX_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._what = what
        self._probe = probe
        self._is_outage = is_outage
        self._max_backoff = max_backoff
        self._clock = clock
        self._up = asyncio.Event()
        self._up.set()
        self._since = 0.0
        self._ended = float("-inf")
        self._announced = False
        self._prober: asyncio.Task[None] | None = None
        self.outages = 0  # how many began: for tests and metrics

    @property
    def down(self) -> bool:
        return not self._up.is_set()

    def failed(self, exc: BaseException) -> bool:
        """Report a failure; True when it is an outage (the caller then awaits
        `available()` and tries again), False when it is the caller's own error.

        While an outage is on, any failure counts as part of it: a connection broken
        mid-operation fails in odd ways (asyncpg: "another operation is in progress")."""
        if not self._is_outage(exc):
            return self.down
        if self._up.is_set():
            self._up.clear()
            self._since = self._clock()
            if self._since - self._ended > _SETTLE_SECONDS:
                self.outages += 1
                self._announced = True
                log.warning(
                    "%s is unavailable (%s); waiting for it, retrying every %.1fs at most",
                    self._what,
                    describe(exc),
                    self._max_backoff,
                )
            self._prober = asyncio.create_task(self._reconnect(), name=f"probe {self._what}")
        return True

    async def available(self) -> None:
        """Return once the database answers again (at once when it does now)."""
        await self._up.wait()

    async def retry(self, exc: BaseException) -> bool:
        """`failed(exc)`, then wait for recovery if it was an outage; whether it was."""
        if not self.failed(exc):
            return False
        await self.available()
        return True

    async def _reconnect(self) -> None:
        delay = _FIRST_BACKOFF
        while True:
            await asyncio.sleep(delay)
            try:
                await self._probe()
            except Exception as exc:
                if not self._is_outage(exc):
                    log.debug("probing %s: %s", self._what, describe(exc))
                delay = min(delay * 2, self._max_backoff)
                continue
            break
        now = self._clock()
        if self._announced:
            self._announced = False
            log.warning("%s is available again after %.1fs", self._what, now - self._since)
        self._ended = now
        self._up.set()

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        self._up.set()  # nobody waits on a closed watch


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
