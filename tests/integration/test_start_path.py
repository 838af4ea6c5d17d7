"""The one start path: an idempotency key always yields the same execution.

Through `DirectService` (what the API and the CLI call) over a real Postgres: a
repeat returns the run that exists, a different request under a used key is a 409
naming the key, concurrent identical starts make one run, and `DirectLauncher`
finds the runs a source has going.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from test_orchestrator import Harness, completed, harness_on

from sagaflow.api.contract import ApiError
from sagaflow.api.service import DirectService
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.runtime.startpath import DirectLauncher, Source, StartCall

pytestmark = pytest.mark.timeout(120)

NS = "default"
SPEC = WorkflowSpec.model_validate({"steps": [{"name": "work", "type": "svc.work"}]})


@pytest.fixture
async def h(pg_pool: asyncpg.Pool) -> AsyncIterator[Harness]:
    async with harness_on(pg_pool) as harness:
        await harness.orchestrator.apply_workflow(NS, "orders", SPEC)
        yield harness


async def runs(h: Harness) -> int:
    async with h.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM sagaflow_executions"))


async def test_a_repeat_returns_the_run_and_a_different_request_under_the_key_is_refused(
    h: Harness,
) -> None:
    service = DirectService(h.orchestrator)
    call = StartCall(NS, "orders", {"order": 1}, idempotency_key="k-1")
    first = await service.start(call)
    again = await service.start(call)
    assert first.created and not again.created
    assert again.execution["metadata"] == first.execution["metadata"]
    name = first.execution["metadata"]["name"]
    assert name.startswith("orders-") and name == call.run_name()

    with pytest.raises(ApiError) as refused:
        await service.start(StartCall(NS, "orders", {"order": 2}, idempotency_key="k-1"))
    assert (refused.value.status, refused.value.field) == (409, "Idempotency-Key")
    assert "'k-1'" in refused.value.message and name in refused.value.message
    # The same key with another name is a different request too: no second run.
    with pytest.raises(ApiError):
        await service.start(StartCall(NS, "orders", {"order": 1}, "k-1", name="other"))
    assert await runs(h) == 1


async def test_fifty_concurrent_identical_starts_make_one_run(h: Harness) -> None:
    service = DirectService(h.orchestrator)
    call = StartCall(NS, "orders", {"n": 1}, idempotency_key="burst", name="burst-run")
    results = await asyncio.gather(*(service.start(call) for _ in range(50)))
    assert sum(r.created for r in results) == 1
    assert {r.execution["metadata"]["uid"] for r in results} == {
        results[0].execution["metadata"]["uid"]
    }
    assert await runs(h) == 1


async def test_unknown_workflow_bad_name_and_held_correlation_key_are_clear_errors(
    h: Harness,
) -> None:
    service = DirectService(h.orchestrator)
    with pytest.raises(ApiError) as unknown:
        await service.start(StartCall(NS, "nope", {}))
    assert unknown.value.status == 404 and "nope" in unknown.value.message
    with pytest.raises(ApiError) as bad:
        await service.start(StartCall(NS, "orders", {}, name="Not_A_Name"))
    assert (bad.value.status, bad.value.field) == (400, "name")
    await service.start(StartCall(NS, "orders", {}, name="a", correlation_key="c"))
    with pytest.raises(ApiError) as held:
        await service.start(StartCall(NS, "orders", {}, name="b", correlation_key="c"))
    assert (held.value.status, held.value.field) == (409, "correlationKey")


async def test_the_launcher_knows_the_unfinished_runs_of_a_source(h: Harness) -> None:
    launcher = DirectLauncher(h.orchestrator)
    nightly = Source("schedule", "nightly", "uid-1")
    first, created = await launcher.start(StartCall(NS, "orders", {}, "t1", source=nightly))
    second, _ = await launcher.start(StartCall(NS, "orders", {}, "t2", source=nightly))
    await launcher.start(StartCall(NS, "orders", {}, "other", source=Source("trigger", "x")))
    assert created and sorted(await launcher.active(NS, nightly)) == sorted([first, second])

    [(msg, cmd), *_] = await h.commands("svc")
    await h.reply(msg, completed(cmd, {}))
    await h.orchestrator.consume_once(max_wait=0)
    async with h.pool.acquire() as conn:
        done = await h.store.get_execution_by_id(conn, cmd.execution_id)
    assert done is not None and done.phase.value == "Completed"
    left = await launcher.active(NS, nightly)
    assert left == [n for n in (first, second) if n != done.name]

    await launcher.cancel(NS, left[0], "a newer tick")
    state = await h.state(left[0])
    assert state is not None and state.phase.value in {"Cancelled", "Compensating"}


async def test_pages_of_executions_filter_and_continue(h: Harness) -> None:
    service = DirectService(h.orchestrator)
    for i in range(5):
        await service.start(StartCall(NS, "orders", {}, name=f"run-{i}"))
        h.clock.advance(1)
    first = await service.list_executions(NS, limit=2)
    second = await service.list_executions(NS, limit=2, continue_token=first.continue_token)
    third = await service.list_executions(NS, limit=2, continue_token=second.continue_token)
    names = [e["metadata"]["name"] for p in (first, second, third) for e in p.items]
    assert names == [f"run-{i}" for i in range(5)] and third.continue_token is None
    running = await service.list_executions(NS, phase="Running", workflow="orders")
    assert len(running.items) == 5
    assert (await service.list_executions(NS, workflow="other")).items == []
    with pytest.raises(ApiError) as bad:
        await service.list_executions(NS, continue_token="garbage")  # noqa: S106
    assert bad.value.field == "continue"
    [workflow] = [w for w in await service.list_workflows(NS) if w["metadata"]["name"] == "orders"]
    assert workflow["metadata"]["name"] == "orders" and workflow["status"]["executions"] == {
        "Running": 5
    }
