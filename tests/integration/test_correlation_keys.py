"""Execution `spec.correlationKey`: one unfinished execution of a workflow per namespace
holds a key. A start with a held key is refused naming the key and the holder; once
the holder finishes the key is free. Through the orchestrator (hand-played, fake
clock) and through `sagaflow run` as a user runs it (file, field, reason, exit code).
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from test_local_mode import sagaflow
from test_orchestrator import Harness, completed, failed, harness_on

from sagaflow.core.facts import Redrive
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.runtime import control, starts
from sagaflow.runtime.starts import CorrelationKeyInUseError, StartRequest

pytestmark = pytest.mark.timeout(120)

NS = "default"
SPEC = WorkflowSpec.model_validate({"steps": [{"name": "work", "type": "svc.work"}]})


@pytest.fixture
async def h(pg_pool: asyncpg.Pool) -> AsyncIterator[Harness]:
    async with harness_on(pg_pool) as harness:
        await harness.orchestrator.apply_workflow(NS, "orders", SPEC)
        await harness.orchestrator.apply_workflow(NS, "refunds", SPEC)
        yield harness


def keyed(name: str, key: str | None, workflow: str = "orders") -> StartRequest:
    return StartRequest(NS, name, workflow, {}, correlation_key=key)


async def holder(h: Harness, key: str, workflow: str = "orders") -> Any:
    async with h.pool.acquire() as conn:
        return await h.store.execution_by_correlation_key(conn, NS, workflow, key)


async def finish(h: Harness, *, fail: bool = False) -> None:
    [(msg, cmd)] = await h.commands("svc")
    await h.reply(msg, failed(cmd, retryable=False) if fail else completed(cmd, {}))
    await h.orchestrator.consume_once(max_wait=0)


async def test_a_held_key_is_refused_naming_it_and_its_holder_until_the_holder_finishes(
    h: Harness,
) -> None:
    first, created = await starts.start(h.orchestrator, keyed("order-1", "cust-7"), None)
    assert created and first.correlation_key == "cust-7"
    assert (await holder(h, "cust-7")).name == "order-1"

    with pytest.raises(CorrelationKeyInUseError) as refused:
        await starts.start(h.orchestrator, keyed("order-2", "cust-7"), None)
    assert refused.value.reason == (
        "correlation key 'cust-7' is held by execution default/order-1 (Running) of "
        "workflow orders, which has not finished; the key may be used again once it has"
    )
    assert str(refused.value).startswith("execution default/order-2: spec.correlationKey: ")
    assert await h.state("order-2") is None  # nothing of it was stored

    # A repeat of the holder's own start is no conflict; other keys and workflows are free.
    again, created = await starts.start(h.orchestrator, keyed("order-1", "cust-7"), None)
    assert not created and again.execution_id == first.execution_id
    await starts.start(h.orchestrator, keyed("order-3", "cust-8"), None)
    await starts.start(h.orchestrator, keyed("refund-1", "cust-7", "refunds"), None)

    await h.orchestrator.cancel(NS, "order-3", "not needed")  # not the holder: no change
    msg, cmd = {c.execution_id: (m, c) for m, c in await h.commands("svc")}[first.execution_id]
    await h.reply(msg, completed(cmd, {}))
    await h.orchestrator.consume_once(max_wait=0)
    assert (await h.state("order-1")).phase.value == "Completed"
    assert await holder(h, "cust-7") is None  # finished: the key is free
    second, created = await starts.start(h.orchestrator, keyed("order-2", "cust-7"), None)
    assert created and (await holder(h, "cust-7")).execution_id == second.execution_id


async def test_a_batch_is_refused_whole_for_a_held_key_or_a_key_twice(h: Harness) -> None:
    await starts.start(h.orchestrator, keyed("order-1", "k"), None)
    with pytest.raises(CorrelationKeyInUseError, match="held by execution default/order-1"):
        await h.orchestrator.start_many([keyed("order-2", "other"), keyed("order-3", "k")])
    with pytest.raises(CorrelationKeyInUseError, match="held by execution default/order-4"):
        await h.orchestrator.start_many([keyed("order-4", "twice"), keyed("order-5", "twice")])
    assert await h.scalar("SELECT count(*) FROM sagaflow_executions") == 1
    started = await h.orchestrator.start_many([keyed("order-2", "other"), keyed("order-1", "k")])
    assert [s.name for s in started] == ["order-2", "order-1"]  # order-1: found, not refused


async def test_the_unique_index_refuses_a_second_holder_whatever_the_caller(h: Harness) -> None:
    await starts.start(h.orchestrator, keyed("order-1", "k"), None)
    async with h.pool.acquire() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO sagaflow_executions (execution_id, namespace, name, workflow, "
                "workflow_version, phase, revision, state, correlation_key, created_at, "
                "updated_at) VALUES ('x', 'default', 'other', 'orders', 1, 'Running', 0, "
                "'{}', 'k', now(), now())"
            )


async def test_a_redriven_run_does_not_take_its_key_back(h: Harness) -> None:
    await starts.start(h.orchestrator, keyed("order-1", "k"), None)
    await finish(h, fail=True)
    assert (await h.state("order-1")).phase.value == "Failed"
    newer, _ = await starts.start(h.orchestrator, keyed("order-2", "k"), None)
    outcome = await h.orchestrator.control(NS, "order-1", Redrive(), control.request_id())
    assert outcome is not None and outcome.result == "applied"
    assert (await h.state("order-1")).phase.value == "Running"
    assert (await holder(h, "k")).execution_id == newer.execution_id


MANIFESTS = """\
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: orders}
spec:
  steps:
    - {name: work, type: sagaflow.pass}
"""


def execution(name: str, key: str, *, suspend: bool = False) -> str:
    return textwrap.dedent(f"""\
        ---
        apiVersion: sagaflow.io/v1alpha1
        kind: Execution
        metadata: {{name: {name}}}
        spec:
          workflowRef: {{name: orders}}
          correlationKey: {key}
          suspend: {"true" if suspend else "false"}
        """)


@pytest.mark.slow
def test_sagaflow_run_names_the_file_the_field_and_the_holder(
    pg_database: str, tmp_path: Path
) -> None:
    env = {"SAGAFLOW_DATABASE_URL": pg_database}
    state = tmp_path / "state"

    twice = tmp_path / "twice.yaml"
    twice.write_text(MANIFESTS + execution("first", "cust-7") + execution("second", "cust-7"))
    run = sagaflow("run", "-f", twice, "--state-dir", state, env=env)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        f"error: {twice}: document 3 (Execution second): spec.correlationKey: correlation "
        "key 'cust-7' is held by execution default/first (starting) of workflow orders, "
        "which has not finished; the key may be used again once it has"
    ]

    # A holder left unfinished by an earlier run (suspended) refuses a new one...
    held = tmp_path / "held.yaml"
    held.write_text(MANIFESTS + execution("first", "cust-7", suspend=True))
    assert sagaflow("run", "-f", held, "--state-dir", state, env=env).returncode == 1
    later = tmp_path / "later.yaml"
    later.write_text(MANIFESTS + execution("second", "cust-7"))
    run = sagaflow("run", "-f", later, "--state-dir", state, env=env)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith(f"error: {later}: document 2 (Execution second): ")
    assert "spec.correlationKey: correlation key 'cust-7' is held by execution " in run.stderr
    assert "default/first (Suspended)" in run.stderr

    # ...and is taken once the holder has finished.
    cancel = sagaflow("cancel", "first", "--state-dir", state, env=env)
    assert cancel.returncode == 0, cancel.stderr
    run = sagaflow("run", "-f", later, "--state-dir", state, env=env)
    assert run.returncode == 0, run.stderr
