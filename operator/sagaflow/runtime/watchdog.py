"""Telling which step blocks the event loop.

An `async def` handler that calls blocking code (`time.sleep(20)`, a synchronous
HTTP client) stops every other handler of its process, and in `sagaflow run` the
orchestrator too, without a trace. A thread watches the loop: a callback on the loop
stamps the time every quarter of `threshold`; when the stamp is older than
`threshold`, the thread names the task the loop is stuck in (`describe` turns a
running handler's task into its step, execution and attempt) in one warning, and
when the loop moves again it says for how long it was held.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("sagaflow.runner")


class LoopWatchdog:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        threshold: float,
        describe: Callable[[asyncio.Task[object] | None], str],
    ) -> None:
        self._loop = loop
        self._threshold = threshold
        self._describe = describe
        self._stamp = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="sagaflow loop watchdog", daemon=True
        )
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout=self._threshold)

    def _tick(self) -> None:
        self._stamp = time.monotonic()
        self._timer = self._loop.call_later(self._threshold / 4, self._tick)

    def _watch(self) -> None:
        blocked_by: str | None = None
        since = 0.0
        while not self._stop.wait(self._threshold / 4):
            stamp = self._stamp
            held = time.monotonic() - stamp
            if held > self._threshold and blocked_by is None:
                # Read from this thread: the loop is stuck inside this task's step.
                blocked_by = self._describe(asyncio.current_task(self._loop))
                since = stamp
                log.warning(
                    "the event loop has been blocked for %.1fs by %s: an async handler must "
                    "not call blocking code; make it a plain `def` (run in a thread) or await",
                    held,
                    blocked_by,
                )
            elif blocked_by is not None and stamp > since:
                log.warning("the event loop was blocked for %.1fs by %s", stamp - since, blocked_by)
                blocked_by = None
