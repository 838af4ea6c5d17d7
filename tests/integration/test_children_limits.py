"""Children and their parents at run time: a child waits for a slot under its
workflow's concurrency limit as any execution of it does; suspending, resuming and
cancelling the parent does the same to its child, in the parent's transaction."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.facts import Cancel, Resume, Suspend
from sagaflow.core.manifests import ExecutionPhase, WorkflowSpec
from sagaflow.runtime.orchestrator import Orchestrator

pytestmark = pytest.mark.timeout(120)

FILE = """
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: one-at-a-time}
spec:
  concurrency: {maxExecutions: 1}
  steps:
    - {name: hold, type: sagaflow.wait, input: {duration: 300ms}}
    - {name: done, type: sagaflow.pass, dependsOn: [hold], input: {who: '${{ input.who }}'}}
---
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: two-children}
spec:
  steps:
    - {name: a, workflowRef: {name: one-at-a-time}, input: {who: a}}
    - {name: b, workflowRef: {name: one-at-a-time}, input: {who: b}}
---
apiVersion: sagaflow.io/v1alpha1
kind: Execution
metadata: {name: parent-1}
spec: {workflowRef: {name: two-children}}
"""


async def test_the_second_child_waits_for_the_first(pg_database: str, tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text(FILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env["SAGAFLOW_DATABASE_URL"] = pg_database
    args = [sys.executable, "-m", "sagaflow.cli", "run", "-f", str(flow), "-o", "json"]
    args += ["--state-dir", str(tmp_path / "state")]
    run = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(run.communicate(), 100)
    assert run.returncode == 0, err.decode()
    (item,) = json.loads(out)["items"]
    steps = {s["name"]: s for s in item["status"]["steps"]}
    assert steps["a"]["output"] == {"done": {"who": "a"}}
    assert steps["b"]["output"] == {"done": {"who": "b"}}
    conn = await asyncpg.connect(pg_database)
    try:
        rows = await conn.fetch(
            "SELECT e.name, h.kind, h.at FROM sagaflow_history h "
            "JOIN sagaflow_executions e USING (execution_id) "
            "WHERE e.workflow = 'one-at-a-time' AND h.kind IN "
            "('ExecutionWaiting', 'ExecutionStarted', 'ExecutionCompleted') ORDER BY h.seq"
        )
    finally:
        await conn.close()
    kinds = [r["kind"] for r in rows]
    assert kinds.count("ExecutionWaiting") == 1
    # Never two children running: one completed before the other started.
    first_done = next(r["at"] for r in rows if r["kind"] == "ExecutionCompleted")
    starts = [r["at"] for r in rows if r["kind"] == "ExecutionStarted"]
    assert len(starts) == 2
    assert max(starts) >= first_done


HOLD = WorkflowSpec.model_validate(
    {"steps": [{"name": "hold", "type": "sagaflow.wait", "input": {"duration": "1h"}}]}
)
PARENT = WorkflowSpec.model_validate(
    {"steps": [{"name": "kid", "workflowRef": {"name": "hold"}, "input": {}}]}
)


async def test_suspending_and_resuming_the_parent_does_the_same_to_its_child(
    pg_pool: asyncpg.Pool,
) -> None:
    orchestrator = Orchestrator(PostgresStore(pg_pool), PostgresBus(pg_pool))
    await orchestrator.apply_workflow("default", "hold", HOLD)
    await orchestrator.apply_workflow("default", "parent", PARENT)
    await orchestrator.start("default", "p-1", "parent", {})
    async with pg_pool.acquire() as conn:
        child = await orchestrator.store.get_execution(conn, "default", "p-1-kid-1")
    assert child is not None
    assert child.phase is ExecutionPhase.RUNNING
    assert child.parent is not None
    assert (child.parent.name, child.parent.step) == ("p-1", "kid")

    async def phase_of(name: str) -> ExecutionPhase:
        async with pg_pool.acquire() as conn:
            found = await orchestrator.store.get_execution(conn, "default", name)
        assert found is not None
        return found.phase

    await orchestrator.control("default", "p-1", Suspend(), "r-1")
    assert await phase_of("p-1-kid-1") is ExecutionPhase.SUSPENDED
    await orchestrator.control("default", "p-1", Resume(), "r-2")
    assert await phase_of("p-1-kid-1") is ExecutionPhase.RUNNING
    await orchestrator.control("default", "p-1", Cancel("enough"), "r-3")
    assert await phase_of("p-1-kid-1") is ExecutionPhase.CANCELLED
