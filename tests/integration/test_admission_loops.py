"""`spec.concurrency.maxExecutions` with the real loops and an in-process runner.

How many run at once is measured by the database itself: a test-only statement
trigger on the executions table records, after every UPDATE (every start, admission
and finish writes the rows that way), how many executions of each workflow hold a
slot, counted inside the writing transaction. That count includes the transaction's
own changes and everything committed; starts of a limited workflow are serialised by
its admission lock, so the highest count seen bounds the true one from above.
The last test runs `sagaflow run` on a file the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from test_local_mode import sagaflow

from sagaflow.adapters.postgres.admission_sql import HOLDS_SLOT
from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.runtime.orchestrator import Orchestrator, StartRequest
from sagaflow.runtime.worker import RunnerWorker
from sagaflow_runner import Registry, StepContext

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

NS = "default"
Handler = Callable[[dict[str, Any], StepContext], Awaitable[dict[str, Any]]]

OBSERVE = f"""
CREATE TABLE test_running (
    seq      bigserial PRIMARY KEY,
    workflow text      NOT NULL,
    running  integer   NOT NULL
);
CREATE FUNCTION test_observe() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_running (workflow, running)
    SELECT workflow, count(*) FROM sagaflow_executions WHERE {HOLDS_SLOT} GROUP BY workflow;
    RETURN NULL;
END $$;
CREATE TRIGGER test_observe AFTER UPDATE ON sagaflow_executions
    FOR EACH STATEMENT EXECUTE FUNCTION test_observe();
"""


def spec(limit: int) -> WorkflowSpec:
    return WorkflowSpec.model_validate(
        {
            "concurrency": {"maxExecutions": limit},
            "steps": [
                {"name": "first", "type": "svc.work"},
                {"name": "second", "type": "svc.work", "dependsOn": ["first"]},
            ],
        }
    )


@asynccontextmanager
async def replicas(
    dsn: str, count: int, handler: Handler | None
) -> AsyncIterator[list[Orchestrator]]:
    """`count` orchestrators on the database, each with its own pool, bus and loops (as
    replicas have), and a runner serving `svc.work` with `handler` (None: no runner)."""
    stop = asyncio.Event()
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=8) for _ in range(count)]
    buses = [PostgresBus(pool) for pool in pools]
    orchestrators = [Orchestrator(PostgresStore(p), b) for p, b in zip(pools, buses, strict=True)]
    tasks = [asyncio.create_task(o.run(stop, dsn)) for o in orchestrators]
    if handler is not None:
        registry = Registry()
        registry.register("svc.work", handler)
        tasks.append(asyncio.create_task(RunnerWorker(buses[0], registry).run(stop)))
    try:
        yield orchestrators
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for bus in buses:
            await bus.close()
        for o in orchestrators:
            await o.outages.close()
        for pool in pools:
            await pool.close()
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == [], errors


@pytest.fixture
async def observed(pg_database: str, pg_pool: asyncpg.Pool) -> str:
    async with pg_pool.acquire() as conn:
        await conn.execute(OBSERVE)
    return pg_database


async def all_completed(pool: asyncpg.Pool, count: int, within: float = 90.0) -> None:
    """Poll (with a deadline) until `count` executions are Completed and none is left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT phase, count(*) AS n FROM sagaflow_executions GROUP BY 1"
            )
        counts = {r["phase"]: r["n"] for r in rows}
        if counts == {"Completed": count}:
            return
        assert loop.time() < deadline, counts
        await asyncio.sleep(0.05)


async def most_running(pool: asyncpg.Pool, workflow: str = "wf") -> int:
    async with pool.acquire() as conn:
        value = await conn.fetchval(
            "SELECT max(running) FROM test_running WHERE workflow = $1", workflow
        )
    return int(value or 0)


async def start_order(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT e.name FROM sagaflow_history h JOIN sagaflow_executions e "
            "USING (execution_id) WHERE h.kind = 'ExecutionStarted' ORDER BY h.seq"
        )
    return [r["name"] for r in rows]


async def test_ten_runs_under_a_limit_of_two(observed: str, pg_pool: asyncpg.Pool) -> None:
    entered = 0
    two_in = asyncio.Event()
    release = asyncio.Event()

    async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        nonlocal entered
        entered += 1
        if entered == 2:
            two_in.set()
        await release.wait()
        return {"step": ctx.step}

    names = [f"run-{i}" for i in range(10)]
    async with replicas(observed, 1, work) as [o]:
        await o.apply_workflow(NS, "wf", spec(2))
        await o.start_many([StartRequest(NS, n, "wf", {}) for n in names])
        await asyncio.wait_for(two_in.wait(), 30)
        async with pg_pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT name, phase, state->>'waiting' AS waiting FROM sagaflow_executions"
            )
            told = await conn.fetchval(
                "SELECT count(*) FROM sagaflow_history WHERE kind = 'ExecutionWaiting'"
            )
        by_name = {r["name"]: r for r in rows}
        assert [by_name[n]["phase"] for n in names] == ["Running"] * 2 + ["Pending"] * 8
        reason = (
            "waiting for a slot: 2 of 2 executions of workflow wf are running "
            "(concurrency.maxExecutions)"
        )
        assert {by_name[n]["waiting"] for n in names[2:]} == {reason}
        assert told == 8
        assert entered == 2  # the runner got no more than two runs' commands
        release.set()
        await all_completed(pg_pool, 10)
    assert await most_running(pg_pool) == 2
    assert await start_order(pg_pool) == names  # creation order


async def test_two_replicas_finishing_and_starting_at_once_keep_the_limit(
    observed: str, pg_pool: asyncpg.Pool
) -> None:
    entered = 0
    full = asyncio.Event()

    async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        # The first three hold until all three run: the limit is reached for sure.
        nonlocal entered
        entered += 1
        if entered >= 3:
            full.set()
        await full.wait()
        return {}

    async with replicas(observed, 2, work) as (a, b):
        await a.apply_workflow(NS, "wf", spec(3))
        # Starts through both replicas at once, while runs finish on both.
        await asyncio.gather(
            *[(a if i % 2 else b).start(NS, f"run-{i:02}", "wf", {}) for i in range(24)]
        )
        await all_completed(pg_pool, 24)
    assert await most_running(pg_pool) == 3
    order = await start_order(pg_pool)
    assert sorted(order) == [f"run-{i:02}" for i in range(24)]  # each started once


async def test_waiting_runs_survive_a_restart(observed: str, pg_pool: asyncpg.Pool) -> None:
    names = [f"run-{i}" for i in range(6)]
    async with replicas(observed, 1, None) as [o]:  # no runner: nothing finishes
        await o.apply_workflow(NS, "wf", spec(2))
        for name in names:
            await o.start(NS, name, "wf", {})
    async with pg_pool.acquire() as conn:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM sagaflow_executions WHERE phase = 'Pending'"
        )
    assert waiting == 4

    async def work(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {}

    async with replicas(observed, 1, work):  # a new process: only the rows carry over
        await all_completed(pg_pool, 6)
    assert await most_running(pg_pool) == 2
    assert await start_order(pg_pool) == names


async def test_sagaflow_run_keeps_a_files_executions_to_the_limit(
    observed: str, pg_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    manifest = tmp_path / "limited.yaml"
    documents = [
        "apiVersion: sagaflow.io/v1alpha1\nkind: Workflow\nmetadata: {name: wf}\n"
        "spec:\n  concurrency: {maxExecutions: 2}\n"
        "  steps: [{name: nap, type: sagaflow.wait, input: {duration: 20ms}}]\n"
    ] + [
        f"apiVersion: sagaflow.io/v1alpha1\nkind: Execution\nmetadata: {{name: run-{i}}}\n"
        "spec: {workflowRef: {name: wf}}\n"
        for i in range(6)
    ]
    manifest.write_text("---\n".join(documents))
    env = {"SAGAFLOW_DATABASE_URL": observed}
    state = tmp_path / "state"
    run = await asyncio.to_thread(sagaflow, "run", "-f", manifest, "--state-dir", state, env=env)
    assert run.returncode == 0, run.stderr
    assert await most_running(pg_pool) == 2
    assert await start_order(pg_pool) == [f"run-{i}" for i in range(6)]
    async with pg_pool.acquire() as conn:
        told = await conn.fetchval(
            "SELECT count(*) FROM sagaflow_history WHERE kind = 'ExecutionWaiting'"
        )
    assert told == 4
