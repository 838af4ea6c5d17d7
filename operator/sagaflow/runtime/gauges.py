"""Sampling the gauges: how much is waiting, and for how long, read from the database.

The orchestrator's loops run `sample_once` every `interval` seconds (15 by default):
executions by phase, the outbox, due timers, the Postgres bus's queues, and the
Kubernetes status mirror. A scrape reads the last sample and costs no query. Series
that vanished since the last sample (a phase no execution is in any more) are
removed, so a gauge never reports a count that no longer holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

import asyncpg

from sagaflow.adapters.postgres import gauges_sql
from sagaflow.core.ports import Clock, utc_now
from sagaflow.telemetry import metrics

log = logging.getLogger("sagaflow.metrics")

DEFAULT_INTERVAL = 15.0


class GaugeSampler:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        bus_in_database: bool,
        clock: Clock = utc_now,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self._pool, self._bus, self._clock, self.interval = pool, bus_in_database, clock, interval
        self._phases: set[tuple[str, str, str]] = set()
        self._waiting: set[tuple[str, str, str]] = set()
        self._queues: set[str] = set()

    async def sample_once(self) -> gauges_sql.Sample:
        now = self._clock()
        async with self._pool.acquire() as conn:
            s = await gauges_sql.sample(conn, now, bus=self._bus)
        for key in self._phases - s.phases.keys():
            metrics.EXECUTIONS.remove(*key)
        for key, count in s.phases.items():
            metrics.EXECUTIONS.labels(*key).set(count)
        self._phases = set(s.phases)
        for key in self._waiting - s.waiting.keys():
            metrics.EXECUTIONS_WAITING.remove(*key)
        for key, count in s.waiting.items():
            metrics.EXECUTIONS_WAITING.labels(*key).set(count)
        self._waiting = set(s.waiting)
        for queue in self._queues - s.queues.keys():
            metrics.QUEUE_DEPTH.labels(queue).set(0)  # known queue, now empty
        for queue, count in s.queues.items():
            metrics.QUEUE_DEPTH.labels(queue).set(count)
        self._queues |= set(s.queues)
        metrics.OUTBOX_PENDING.set(s.outbox_pending)
        metrics.OUTBOX_OLDEST_AGE.set(_age(s.outbox_oldest, now))
        metrics.TIMERS_DUE.set(s.timers_due)
        metrics.TIMERS_LAG.set(_age(s.timers_oldest_due, now))
        if s.mirror_backlog is not None:
            metrics.MIRROR_BACKLOG.set(s.mirror_backlog)
            metrics.MIRROR_LAG.set(_age(s.mirror_oldest, now))
        return s

    async def run(self, stop: asyncio.Event) -> None:
        """Sample until `stop`; a failed sample is logged once per run of failures."""
        failing = False
        while not stop.is_set():
            try:
                await self.sample_once()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: the loops say so too
                if not failing:
                    log.warning("sampling the gauges failed: %s", exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)


def _age(oldest: datetime | None, now: datetime) -> float:
    return 0.0 if oldest is None else max((now - oldest).total_seconds(), 0.0)
