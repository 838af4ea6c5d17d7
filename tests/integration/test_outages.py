"""Riding out database restarts and outages: one log line each way, LISTEN re-opened,
loops and timers back within a second, nothing lost or applied twice."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from pg import pg_ctl, private_server

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.embedded import EmbeddedPostgres
from sagaflow.adapters.postgres.errors import database_unavailable
from sagaflow.adapters.postgres.migrate import migrate
from sagaflow.adapters.postgres.notify import Notifications
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.runtime.orchestrator import Orchestrator, StartRequest
from sagaflow.runtime.outages import OutageWatch
from sagaflow.runtime.worker import RunnerWorker
from sagaflow_runner import Registry, RetryableError, StepContext

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self.tracebacks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")
        if record.exc_info:
            self.tracebacks.append(record.getMessage())


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    handler = Lines()
    loggers = [logging.getLogger("sagaflow"), logging.getLogger("asyncpg")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


async def test_an_outage_is_logged_once_each_way_and_waiters_resume(log_lines: Lines) -> None:
    answers = [ConnectionRefusedError("refused")] * 3

    async def probe() -> None:
        if answers:
            raise answers.pop()

    watch = OutageWatch("the database", probe, database_unavailable)
    assert watch.failed(OSError("disk on fire")) is False  # not an outage: the caller's
    assert watch.failed(ConnectionResetError("reset by peer"))
    assert watch.failed(ConnectionRefusedError("again"))  # the same outage, no new line
    waiters = [asyncio.create_task(watch.available()) for _ in range(5)]
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    # A straggler right after recovery (a pooled connection of the old server) belongs
    # to the outage that just ended.
    assert watch.failed(asyncpg.ConnectionDoesNotExistError("closed"))
    await asyncio.wait_for(watch.available(), 10)
    outage_lines = [line for line in log_lines.lines if "sagaflow.outages" in line]
    assert len(outage_lines) == 2, outage_lines
    assert "is unavailable (ConnectionResetError: reset by peer)" in outage_lines[0]
    assert "is available again after" in outage_lines[1]
    assert watch.outages == 1
    await watch.close()


async def test_listen_is_reopened_after_its_connection_dies(pg_database: str) -> None:
    notes = Notifications(pg_database, ("sagaflow_test",))
    await notes.start()
    try:
        conn = await asyncpg.connect(pg_database)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND datname = current_database()"
            )
            # Woken at once (notifications may have been missed), then re-opened.
            await asyncio.wait_for(notes.event("sagaflow_test").wait(), 10)
            notes.event("sagaflow_test").clear()
            while notes.reconnects == 0:
                await asyncio.wait_for(notes.event("sagaflow_test").wait(), 10)
                notes.event("sagaflow_test").clear()
            await conn.execute("SELECT pg_notify('sagaflow_test', 'after')")
            await asyncio.wait_for(notes.event("sagaflow_test").wait(), 10)
        finally:
            await conn.close()
    finally:
        await notes.close()


SPEC = WorkflowSpec.model_validate(
    {
        "steps": [
            {"name": "a", "type": "work.step"},
            {
                "name": "b",
                "type": "work.step",
                "dependsOn": ["a"],
                "retry": {"maxAttempts": 3, "initialInterval": "300ms"},
            },
            {"name": "c", "type": "work.step", "dependsOn": ["b"]},
        ]
    }
)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_a_run_rides_out_a_postgres_restart(mode: str, log_lines: Lines) -> None:
    """30 executions x 3 steps, a retry timer each, and a restart of the server in the
    middle: every execution completes, no success is applied twice, and the outage is
    logged once each way."""
    with private_server() as server:
        await _ride_out(server, mode, log_lines)


async def _ride_out(server: EmbeddedPostgres, mode: str, log_lines: Lines) -> None:
    pool = await asyncpg.create_pool(server.dsn, min_size=0, max_size=8)  # as the commands
    async with pool.acquire() as conn:
        await migrate(conn)
    bus = PostgresBus(pool)
    orchestrator = Orchestrator(PostgresStore(pool), bus)
    calls: Counter[str] = Counter()
    restarted = asyncio.Event()
    halfway = asyncio.Event()

    async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        calls[ctx.idempotency_key] += 1
        if sum(calls.values()) >= 40:
            halfway.set()
        if ctx.step == "b" and ctx.attempt == 1:
            raise RetryableError("once more, in 300ms")  # a durable timer across the restart
        return {"step": ctx.step}

    registry = Registry()
    registry.register("work.step", work)
    worker = RunnerWorker(bus, registry, outages=orchestrator.outages, grace_period=5)
    stop = asyncio.Event()
    loops = asyncio.create_task(orchestrator.run(stop, server.dsn))
    runner = asyncio.create_task(worker.run(stop))
    try:
        await orchestrator.apply_workflow("default", "w", SPEC)
        await orchestrator.start_many(
            [StartRequest("default", f"run-{i}", "w", {}) for i in range(30)]
        )
        await asyncio.wait_for(halfway.wait(), 60)
        await asyncio.to_thread(pg_ctl, server.pgdata, "restart", "-m", mode)
        restarted.set()
        while True:
            try:
                async with pool.acquire() as conn:
                    left = await conn.fetchval(
                        "SELECT count(*) FROM sagaflow_executions WHERE phase <> 'Completed'"
                    )
                    failed = await conn.fetchval(
                        "SELECT count(*) FROM sagaflow_executions WHERE phase = 'Failed'"
                    )
                    per_step = await conn.fetch(
                        "SELECT count(*) AS n FROM sagaflow_history WHERE kind = 'StepSucceeded' "
                        "GROUP BY execution_id, step"
                    )
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                await asyncio.sleep(0.1)  # the test's own look, not the loops'
                continue
            assert failed == 0
            if left == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(loops, runner, return_exceptions=True)
        await bus.close()
        await orchestrator.outages.close()
        await pool.close()
    assert {r["n"] for r in per_step} == {1}  # each step's success applied once
    assert len(per_step) == 90
    assert len(set(calls)) == 120  # 3 steps and a retry of b, each execution
    unavailable = [line for line in log_lines.lines if "is unavailable" in line]
    back = [line for line in log_lines.lines if "is available again" in line]
    assert len(unavailable) == 1 and len(back) == 1, log_lines.lines
    assert log_lines.tracebacks == []
