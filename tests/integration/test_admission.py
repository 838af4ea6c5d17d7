"""`spec.concurrency.maxExecutions` on real Postgres, one transaction at a time.

Driven by hand (`consume_once`, a fake clock, commands answered by the test) so each
test says exactly which run finishes when: waiting in creation order with the reason
in state, history and status; the next run starting in the transaction that finished
one; a cancelled waiting run; a raised and a removed limit; a redrive past the limit;
no lock for workflows without a limit. `test_admission_loops.py` runs the same rules
with the real loops and runners, two replicas and a restart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from test_orchestrator import Harness, completed, failed, harness_on

from sagaflow.adapters.postgres import admission_sql
from sagaflow.core.facts import Redrive
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.status import execution_status
from sagaflow.runtime import admission, control

pytestmark = pytest.mark.timeout(60)

NS = "default"


def limited(limit: int | None, step_type: str = "svc.work") -> WorkflowSpec:
    body: dict[str, Any] = {"steps": [{"name": "work", "type": step_type}]}
    if limit is not None:
        body["concurrency"] = {"maxExecutions": limit}
    return WorkflowSpec.model_validate(body)


@pytest.fixture
async def h(pg_pool: asyncpg.Pool) -> AsyncIterator[Harness]:
    async with harness_on(pg_pool) as harness:
        await harness.orchestrator.apply_workflow(NS, "wf", limited(2))
        yield harness


async def start(h: Harness, *names: str, workflow: str = "wf") -> None:
    for name in names:
        await h.orchestrator.start(NS, name, workflow, {})


async def commands(h: Harness) -> dict[str, tuple[Any, Any]]:
    """The commands waiting for runners, by execution name."""
    got = await h.commands("svc")
    names = {
        s.execution_id: s.name
        for s in [await h.state(f"run-{i}") for i in range(10)]
        if s is not None
    }
    return {names[cmd.execution_id]: (msg, cmd) for msg, cmd in got}


async def finish(h: Harness, pending: dict[str, tuple[Any, Any]], *names: str) -> None:
    for name in names:
        msg, cmd = pending.pop(name)
        await h.reply(msg, completed(cmd, {}))
    await h.orchestrator.consume_once(max_wait=0)


async def phases(h: Harness, count: int) -> list[str]:
    return [(await h.state(f"run-{i}")).phase.value for i in range(count)]


async def history(h: Harness, name: str) -> list[tuple[str, str]]:
    state = await h.state(name)
    async with h.pool.acquire() as conn:
        rows = await h.store.history(conn, state.execution_id)
    return [(r["kind"], r["message"]) for r in rows]


async def test_runs_beyond_the_limit_wait_with_the_reason_and_start_in_creation_order(
    h: Harness,
) -> None:
    await start(h, *[f"run-{i}" for i in range(5)])
    assert await phases(h, 5) == ["Running", "Running", "Pending", "Pending", "Pending"]
    pending = await commands(h)
    assert set(pending) == {"run-0", "run-1"}

    reason = (
        "waiting for a slot: 2 of 2 executions of workflow wf are running "
        "(concurrency.maxExecutions)"
    )
    waiting = await h.state("run-2")
    assert waiting.waiting == reason and waiting.started_at is None
    assert await history(h, "run-2") == [("ExecutionWaiting", reason)]
    ready = next(c for c in execution_status(waiting)["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "Waiting", reason)

    # run-1 finishes: run-2 (the oldest waiting) starts in that transaction, its command
    # committed with it; run-3 and run-4 wait on.
    await finish(h, pending, "run-1")
    assert await phases(h, 5) == ["Running", "Completed", "Running", "Pending", "Pending"]
    pending |= await commands(h)
    assert set(pending) == {"run-0", "run-2"}
    admitted = await h.state("run-2")
    assert admitted.waiting is None
    kinds = [kind for kind, _ in await history(h, "run-2")]
    assert kinds[:4] == [
        "ExecutionWaiting",
        "ExecutionAdmitted",
        "ExecutionStarted",
        "StepDispatched",
    ]

    # Two finish in one batch: both waiting runs start, in order.
    await finish(h, pending, "run-0", "run-2")
    assert await phases(h, 5) == ["Completed", "Completed", "Completed", "Running", "Running"]
    pending |= await commands(h)
    await finish(h, pending, "run-3", "run-4")
    assert await phases(h, 5) == ["Completed"] * 5
    assert await h.scalar("SELECT count(*) FROM sagaflow_admission_queue") == 0


async def test_a_start_while_others_wait_goes_to_the_back_of_the_queue(h: Harness) -> None:
    await start(h, "run-0", "run-1", "run-2")
    pending = await commands(h)
    await h.orchestrator.cancel(NS, "run-0", "not needed")  # a slot comes free...
    await start(h, "run-3")  # ...and run-2 (older) took it in that transaction
    assert await phases(h, 4) == ["Cancelled", "Running", "Running", "Pending"]
    pending |= await commands(h)
    assert set(pending) - {"run-0"} == {"run-1", "run-2"}


async def test_a_waiting_run_cancelled_leaves_the_queue_and_the_order_holds(h: Harness) -> None:
    await start(h, *[f"run-{i}" for i in range(5)])
    pending = await commands(h)
    cancelled = await h.orchestrator.cancel(NS, "run-2", "changed my mind")
    assert cancelled is not None and cancelled.phase.value == "Cancelled"
    await finish(h, pending, "run-0")
    assert await phases(h, 5) == ["Completed", "Running", "Cancelled", "Running", "Pending"]
    assert await h.scalar("SELECT count(*) FROM sagaflow_admission_queue") == 1


async def test_a_raised_limit_starts_waiting_runs_at_the_next_pass(h: Harness) -> None:
    await start(h, *[f"run-{i}" for i in range(6)])
    assert (await phases(h, 6)).count("Running") == 2
    await h.orchestrator.apply_workflow(NS, "wf", limited(4))
    # What the operator's Workflow handler, start-up and periodic pass run.
    assert await admission.sweep(h.orchestrator, [(NS, "wf")]) == 2
    assert await phases(h, 6) == ["Running"] * 4 + ["Pending"] * 2
    assert await admission.sweep(h.orchestrator) == 0  # nothing more fits
    pending = await commands(h)
    assert len(pending) == 4


async def test_a_removed_limit_starts_every_waiting_run_at_the_next_finish(h: Harness) -> None:
    await start(h, *[f"run-{i}" for i in range(6)])
    pending = await commands(h)
    await h.orchestrator.apply_workflow(NS, "wf", limited(None))
    await finish(h, pending, "run-0")
    assert await phases(h, 6) == ["Completed"] + ["Running"] * 5
    await start(h, "run-6")  # the new version has no limit: it starts at once
    assert (await h.state("run-6")).phase.value == "Running"


async def test_runs_with_nothing_to_run_free_their_slots_at_once(h: Harness) -> None:
    await h.orchestrator.apply_workflow(NS, "quick", limited(1, step_type="sagaflow.pass"))
    await start(h, *[f"run-{i}" for i in range(4)], workflow="quick")
    assert await phases(h, 4) == ["Completed"] * 4


async def test_a_redrive_restarts_a_failed_run_whatever_the_limit(h: Harness) -> None:
    await h.orchestrator.apply_workflow(NS, "wf", limited(1))
    await start(h, "run-0", "run-1")
    pending = await commands(h)
    msg, cmd = pending.pop("run-0")
    await h.reply(msg, failed(cmd, retryable=False))
    await h.orchestrator.consume_once(max_wait=0)
    assert await phases(h, 2) == ["Failed", "Running"]  # run-1 took the slot run-0 freed
    outcome = await h.orchestrator.control(NS, "run-0", Redrive(), control.request_id())
    assert outcome is not None and outcome.result == "applied"
    assert await phases(h, 2) == ["Running", "Running"]  # two running under a limit of 1


async def test_workflows_without_a_limit_take_no_lock(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked: list[Any] = []
    real = admission_sql.lock_workflows

    async def spy(conn: Any, keys: Any) -> None:
        keys = list(keys)
        locked.append(keys)
        await real(conn, keys)

    monkeypatch.setattr(admission_sql, "lock_workflows", spy)
    await h.orchestrator.apply_workflow(NS, "free", limited(None))
    await start(h, "run-0", "run-1", "run-2", workflow="free")
    pending = await commands(h)
    await finish(h, pending, "run-0", "run-1", "run-2")
    assert await phases(h, 3) == ["Completed"] * 3
    assert [keys for keys in locked if keys] == []
    await start(h, "run-3")  # a limited workflow does
    assert locked[-1] == [(NS, "wf")]


async def test_the_queries_match_the_partial_indexes_so_the_planner_can_use_them(
    pg_pool: asyncpg.Pool,
) -> None:
    sql = (Path(admission_sql.__file__).parent / "migrations" / "0006_coordination.sql").read_text()
    assert f"WHERE {admission_sql.HOLDS_SLOT};" in sql
    assert f"AND {admission_sql.UNFINISHED};" in sql
    async with pg_pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        running = await conn.fetch(
            "EXPLAIN SELECT count(*) FROM sagaflow_executions WHERE namespace='a' AND "
            f"workflow='b' AND {admission_sql.HOLDS_SLOT}"
        )
        held = await conn.fetch(
            "EXPLAIN SELECT state FROM sagaflow_executions e WHERE namespace='a' AND "
            f"workflow='b' AND correlation_key='k' AND e.{admission_sql.UNFINISHED}"
        )
    assert "sagaflow_executions_started" in " ".join(r[0] for r in running)
    assert "sagaflow_executions_correlation" in " ".join(r[0] for r in held)
