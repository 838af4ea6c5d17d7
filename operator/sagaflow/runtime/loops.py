"""The orchestrator's loops: consumers, timers, dead letters and (for buses outside the
database) the outbox relay, each one pass of `Orchestrator` after another.

A pass that fails for want of the database waits for it through the orchestrator's
`OutageWatch` (one log line when the outage begins, one when it ends) and runs again
at once when it is back: due timers fire within a second of recovery. Any other
failure is logged with its traceback and the loop pauses briefly. Between passes the
loops sleep on LISTEN/NOTIFY (`Notifications`, which re-opens LISTEN after a restart)
or until the next timer is due.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sagaflow.adapters.postgres.bus import DEAD_LETTERS_CHANNEL
from sagaflow.adapters.postgres.notify import Notifications
from sagaflow.adapters.postgres.store import OUTBOX_CHANNEL, TIMERS_CHANNEL
from sagaflow.runtime.gauges import GaugeSampler

if TYPE_CHECKING:
    from sagaflow.runtime.orchestrator import Orchestrator

log = logging.getLogger("sagaflow.orchestrator")


async def run_loops(orchestrator: Orchestrator, stop: asyncio.Event, dsn: str) -> None:
    """Run every loop until `stop` is set."""
    notes = Notifications(dsn, (TIMERS_CHANNEL, OUTBOX_CHANNEL, DEAD_LETTERS_CHANNEL))
    await notes.start()
    o = orchestrator
    try:
        loops = [_consume_loop(o, stop) for _ in range(o.consumers)]
        loops.append(_timer_loop(o, stop, notes))
        loops.append(_pass_loop(o, stop, notes, DEAD_LETTERS_CHANNEL, o.dead_letters_once))
        if not o.transactional:
            loops.append(_pass_loop(o, stop, notes, OUTBOX_CHANNEL, o.relay_once))
        if o.gauge_interval > 0:
            gauges = GaugeSampler(
                o.pool, bus_in_database=o.transactional, interval=o.gauge_interval
            )
            loops.append(gauges.run(stop))
        tasks = [asyncio.create_task(c) for c in loops]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await notes.close()


async def _failed(orchestrator: Orchestrator, what: str, exc: Exception) -> None:
    """After a pass failed: wait out an outage, or log the error and pause."""
    if await orchestrator.outages.retry(exc):
        return
    log.exception("%s failed", what)
    await asyncio.sleep(0.5)  # back off before the redelivery


async def _consume_loop(o: Orchestrator, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await o.consume_once(max_wait=o.idle_wait)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _failed(o, "event consumer pass", exc)


async def _timer_loop(o: Orchestrator, stop: asyncio.Event, notes: Notifications) -> None:
    while not stop.is_set():
        due = None
        try:
            while await o.fire_timers_once():
                pass
            async with o.pool.acquire() as conn:
                due = await o.store.next_timer_due(conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _failed(o, "timer pass", exc)
            continue  # due timers first, at once
        wait = o.idle_wait
        if due is not None:
            # A floor, so a due timer held by another replica's lock is not spun on.
            wait = max(0.02, min(wait, (due - o.clock()).total_seconds()))
        await notes.wait(TIMERS_CHANNEL, wait)


async def _pass_loop(
    o: Orchestrator,
    stop: asyncio.Event,
    notes: Notifications,
    channel: str,
    one_pass: Callable[[], Awaitable[int]],
) -> None:
    """Run `one_pass` until it finds nothing, then wait for `channel` or idle_wait."""
    while not stop.is_set():
        try:
            while await one_pass():
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _failed(o, f"{one_pass.__name__} pass", exc)
            continue
        await notes.wait(channel, o.idle_wait)
