"""The metrics after known runs: exact counts, on real Postgres and the Postgres bus.

Covered: starts, ends and their durations; step attempts by every outcome;
compensations; signals; inbox duplicates; dead letters; schedule ticks (against the
schedule's own counts); the sampled gauges (phases, runs idle on purpose, timers,
queues, the mirror); the runner's histograms and its /metrics server.

The orchestrator's side is driven one pass at a time with a fake clock and a
hand-played runner (as in `test_orchestrator.py`), so every retry, timeout, stale
result and duplicate is one we made. Counters are process-wide: each test runs in a
namespace of its own and reads only its own series; unlabelled counters are read as
the change across the test.
"""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from pg import FakeClock
from test_orchestrator import Harness, completed, failed
from test_schedules import NS, World, w  # noqa: F401 - `w`, the schedule runner's world

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.messages import (
    EVENTS_QUEUE,
    ExecuteStep,
    SignalMessage,
    StepResult,
    commands_queue,
    decode_result,
)
from sagaflow.core.ports import OutgoingMessage
from sagaflow.runtime.gauges import GaugeSampler
from sagaflow.runtime.worker import RunnerWorker
from sagaflow.telemetry.metrics import REGISTRY, MetricsServer
from sagaflow_runner import PermanentError, Registry, StepContext

pytestmark = pytest.mark.timeout(60)

SAGA = WorkflowSpec.model_validate(
    {
        "retry": {"maxAttempts": 2, "initialInterval": "1s"},
        "steps": [
            {"name": "reserve", "type": "svc.reserve", "compensate": {"type": "svc.release"}},
            {"name": "charge", "type": "svc.charge", "dependsOn": ["reserve"], "timeout": "10s"},
        ],
    }
)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def h(pg_pool: asyncpg.Pool) -> AsyncIterator[Harness]:
    clock = FakeClock()
    bus = PostgresBus(pg_pool, clock=clock, lock_duration=30)
    harness = Harness(pg_pool, bus, clock)
    try:
        yield harness
    finally:
        await bus.close()


async def phase(h: Harness, ns: str, name: str = "run-1") -> str:
    async with h.pool.acquire() as conn:
        state = await h.store.get_execution(conn, ns, name)
    assert state is not None
    return str(state.phase.value)


async def one(h: Harness, prefix: str) -> tuple[Any, ExecuteStep]:
    got = await h.commands(prefix)
    assert len(got) == 1, got
    msg, cmd = got[0]
    return msg, cmd


async def test_a_saga_with_a_retry_a_timeout_a_stale_result_and_a_duplicate(h: Harness) -> None:
    ns = f"m-{uuid.uuid4().hex[:8]}"
    o = h.orchestrator
    await o.apply_workflow(ns, "saga", SAGA)
    duplicates_before = value("sagaflow_inbox_duplicates_total", source="events")
    await o.start(ns, "run-1", "saga", {})

    msg, cmd = await one(h, "svc")
    assert cmd.step == "reserve"
    await h.reply(msg, failed(cmd))  # attempt 1 fails: retried
    assert await o.consume_once(max_wait=0) == 1
    h.clock.advance(1.5)
    assert await o.fire_timers_once() == 1
    msg, cmd = await one(h, "svc")
    success = completed(cmd, {"id": 7})
    await h.reply(msg, success)  # attempt 2 succeeds
    await o.consume_once(max_wait=0)
    await h.bus.send(  # and the same result arrives again later: the inbox drops it
        [OutgoingMessage(EVENTS_QUEUE, success.message_id, cmd.execution_id, success.encode())]
    )
    assert await o.consume_once(max_wait=0) == 1

    msg, charge = await one(h, "svc")
    assert charge.step == "charge"
    h.clock.advance(11)
    assert await o.fire_timers_once() == 1  # attempt 1 timed out: retried
    h.clock.advance(1.5)
    await o.fire_timers_once()
    late = completed(charge, {"late": True})
    await h.reply(msg, late)  # attempt 1's result, after its timeout: stale
    await o.consume_once(max_wait=0)
    msg, charge2 = await one(h, "svc")
    assert charge2.attempt == 2
    await h.reply(msg, failed(charge2))  # the last attempt fails: compensation
    await o.consume_once(max_wait=0)
    msg, undo = await one(h, "svc")
    assert undo.compensation
    await h.reply(
        msg,
        StepResult("StepCompleted", undo.execution_id, undo.step, undo.attempt, compensation=True),
    )
    await o.consume_once(max_wait=0)
    assert await phase(h, ns) == "Compensated"

    def attempts(step: str, outcome: str) -> float:
        return value(
            "sagaflow_step_attempts_total",
            namespace=ns,
            workflow="saga",
            step=step,
            outcome=outcome,
        )

    assert value("sagaflow_executions_started_total", namespace=ns, workflow="saga") == 1
    assert attempts("reserve", "retried") == 1
    assert attempts("reserve", "succeeded") == 1
    assert attempts("charge", "timed_out") == 1
    assert attempts("charge", "retried") == 0  # the timeout is that attempt's one count
    assert attempts("charge", "ignored_stale") == 1
    assert attempts("charge", "failed") == 1
    undone = {"namespace": ns, "workflow": "saga", "step": "reserve", "outcome": "succeeded"}
    assert value("sagaflow_compensations_total", **undone) == 1
    ended = {"namespace": ns, "workflow": "saga", "phase": "Compensated"}
    assert value("sagaflow_executions_finished_total", **ended) == 1
    assert value("sagaflow_executions_finished_total", **{**ended, "phase": "Failed"}) == 0
    assert value("sagaflow_execution_duration_seconds_count", **ended) == 1
    # Started at the clock's start, ended after 1.5 + 11 + 1.5 s on the fake clock.
    assert value("sagaflow_execution_duration_seconds_sum", **ended) == pytest.approx(14.0)
    dupes = value("sagaflow_inbox_duplicates_total", source="events") - duplicates_before
    assert dupes == 1


async def test_signals_accepted_and_refused_are_counted(h: Harness) -> None:
    ns = f"m-{uuid.uuid4().hex[:8]}"
    spec = WorkflowSpec.model_validate(
        {
            "signals": [{"name": "approve"}],
            "steps": [
                {"name": "wait", "type": "sagaflow.waitForSignal", "input": {"signal": "approve"}}
            ],
        }
    )
    o = h.orchestrator
    await o.apply_workflow(ns, "gate", spec)
    await o.start(ns, "run-1", "gate", {})

    def to_run(name: str) -> SignalMessage:
        return SignalMessage(ns, name, {}, execution="run-1")

    sampler = GaugeSampler(h.pool, bus_in_database=True, clock=h.clock)
    await sampler.sample_once()
    waiting = {"namespace": ns, "workflow": "gate", "reason": "signal"}
    assert value("sagaflow_executions_waiting", **waiting) == 1
    assert value("sagaflow_executions", namespace=ns, workflow="gate", phase="Running") == 1
    refused = await o.signal(to_run("nope"), "s-1")
    accepted = await o.signal(to_run("approve"), "s-2")
    again = await o.signal(to_run("approve"), "s-2")
    assert (refused.result, accepted.result, again.result) == ("refused", "applied", "noop")
    labels = {"namespace": ns, "workflow": "gate"}
    assert value("sagaflow_signals_total", **labels, signal="approve", outcome="accepted") == 1
    assert value("sagaflow_signals_total", **labels, signal="*", outcome="refused") == 1
    assert await phase(h, ns) == "Completed"
    await sampler.sample_once()
    assert REGISTRY.get_sample_value("sagaflow_executions_waiting", waiting) is None


async def test_gauges_sample_phases_timers_and_queues(h: Harness) -> None:
    ns = f"m-{uuid.uuid4().hex[:8]}"
    o = h.orchestrator
    await o.apply_workflow(ns, "saga", SAGA)
    await o.start(ns, "run-1", "saga", {})
    await o.start(ns, "run-2", "saga", {})
    sampler = GaugeSampler(h.pool, bus_in_database=True, clock=h.clock)
    await sampler.sample_once()
    running = {"namespace": ns, "workflow": "saga", "phase": "Running"}
    assert value("sagaflow_executions", **running) == 2
    for reason in ("signal", "timer", "retry"):  # running a step is not waiting
        waiting = {"namespace": ns, "workflow": "saga", "reason": reason}
        assert REGISTRY.get_sample_value("sagaflow_executions_waiting", waiting) is None
    assert value("sagaflow_queue_depth", queue="steps.svc") == 2
    assert value("sagaflow_timers_due") == 0

    for msg, cmd in await h.commands("svc"):
        await h.reply(msg, completed(cmd, {}))
    await o.consume_once(max_wait=0)  # both on to `charge`, whose timeout is 10 s
    h.clock.advance(25)  # 15 s past due, not yet fired
    await sampler.sample_once()
    assert value("sagaflow_timers_due") == 2
    assert value("sagaflow_timers_lag_seconds") == pytest.approx(15, abs=0.5)
    assert value("sagaflow_queue_depth", queue="steps.svc") == 2  # the two charge commands
    assert value("sagaflow_queue_depth", queue="sagaflow.events") == 0

    await o.cancel(ns, "run-1", "test")
    await o.cancel(ns, "run-2", "test")
    await sampler.sample_once()
    # Ended runs leave the phase gauge; a vanished series is removed, not left at 2.
    assert REGISTRY.get_sample_value("sagaflow_executions", running) is None


async def test_runs_idle_on_purpose_are_counted_by_what_they_wait_for(h: Harness) -> None:
    ns = f"m-{uuid.uuid4().hex[:8]}"
    spec = WorkflowSpec.model_validate(
        {
            "retry": {"maxAttempts": 3, "initialInterval": "1h"},
            "signals": [{"name": "go"}],
            "steps": [
                {"name": "work", "type": "svc.work"},
                {"name": "pause", "type": "sagaflow.wait", "input": {"duration": "1d"}},
                {"name": "gate", "type": "sagaflow.waitForSignal", "input": {"signal": "go"}},
            ],
        }
    )
    o = h.orchestrator
    await o.apply_workflow(ns, "idle", spec)
    for name in ("run-1", "run-2"):
        await o.start(ns, name, "idle", {})
    msg, cmd = (await h.commands("svc"))[0]
    await h.reply(msg, failed(cmd))  # one run's work fails: an hour's backoff
    await o.consume_once(max_wait=0)
    sampler = GaugeSampler(h.pool, bus_in_database=True, clock=h.clock)
    await sampler.sample_once()

    def waiting(reason: str) -> float | None:
        labels = {"namespace": ns, "workflow": "idle", "reason": reason}
        return REGISTRY.get_sample_value("sagaflow_executions_waiting", labels)

    # Both wait for the signal (counted once each), one also backs off: signal comes first.
    assert (waiting("signal"), waiting("timer"), waiting("retry")) == (2, None, None)
    await o.signal(SignalMessage(ns, "go", {}, execution="run-1"), "s-1")
    await o.signal(SignalMessage(ns, "go", {}, execution="run-2"), "s-2")
    await sampler.sample_once()
    assert (waiting("signal"), waiting("timer"), waiting("retry")) == (None, 2, None)

    flaky = WorkflowSpec.model_validate(
        {"retry": {"maxAttempts": 3, "initialInterval": "1h"}, "steps": spec.steps[:1]}
    )
    await o.apply_workflow(ns, "flaky", flaky)
    await o.start(ns, "run-3", "flaky", {})
    msg, cmd = next((m, c) for m, c in await h.commands("svc") if c.attempt == 1)
    await h.reply(msg, failed(cmd))
    await o.consume_once(max_wait=0)
    await sampler.sample_once()
    labels = {"namespace": ns, "workflow": "flaky", "reason": "retry"}
    assert REGISTRY.get_sample_value("sagaflow_executions_waiting", labels) == 1


async def test_the_runner_counts_queue_wait_and_step_duration(pg_pool: asyncpg.Pool) -> None:
    kind = f"m{uuid.uuid4().hex[:8]}"
    registry = Registry()

    async def ok(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"n": input["n"]}

    async def bad(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        raise PermanentError("no", type="Refused")

    registry.register(f"{kind}.ok", ok)
    registry.register(f"{kind}.bad", bad)

    bus = PostgresBus(pg_pool, lock_duration=30)
    worker = RunnerWorker(bus, registry, concurrency=4)
    queue = commands_queue(f"{kind}.ok")
    waits_before = value("sagaflow_queue_wait_seconds_count", queue=queue)
    commands = [
        ExecuteStep(str(uuid.uuid4()), "x/r", "s", 1, f"{kind}.{t}", {"n": i}, None, None)
        for i, t in enumerate(["ok", "ok", "bad"])
    ]
    await bus.send(
        [OutgoingMessage(queue, c.attempt_id, c.execution_id, c.encode()) for c in commands]
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        results: list[Any] = []
        while len(results) < 3:
            got = await bus.receive(EVENTS_QUEUE, max_wait=5)
            results += [decode_result(m.body) for m in got]
            await bus.complete(got)
    finally:
        stop.set()
        await task
        await bus.close()
    assert sorted(r.kind for r in results) == ["StepCompleted", "StepCompleted", "StepFailed"]
    ok_count = value("sagaflow_step_duration_seconds_count", type=f"{kind}.ok", outcome="succeeded")
    bad_count = value("sagaflow_step_duration_seconds_count", type=f"{kind}.bad", outcome="failed")
    assert (ok_count, bad_count) == (2, 1)
    assert value("sagaflow_queue_wait_seconds_count", queue=queue) - waits_before == 3


def test_a_runner_host_serves_its_metrics() -> None:
    served = MetricsServer(0, "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{served.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
            assert answer.headers["Content-Type"].startswith("text/plain")
    finally:
        served.close()
    assert "# TYPE sagaflow_step_attempts_total counter" in text
    assert 'sagaflow_build_info{python="' in text


async def test_schedule_ticks_are_counted_as_the_schedule_counts_them(w: World) -> None:  # noqa: F811
    name = f"m-{uuid.uuid4().hex[:8]}"
    await w.put(name=name, catchupWindow="90m")  # overlap Skip
    # Down from 11:59:30 to 15:00:10: 12:00 and 13:00 are missed, 14:00 starts and
    # 15:00 is skipped while it runs; then 16:00 starts once it is done.
    assert await w.at("2026-05-10T15:00:10Z") == {"Missed": 1, "Started": 1, "Skipped": 1}
    w.launcher.finish_all()
    assert await w.at("2026-05-10T16:00:00Z") == {"Started": 1}

    def ticks(outcome: str) -> float:
        return value("sagaflow_schedule_ticks_total", namespace=NS, schedule=name, outcome=outcome)

    status = await w.status(name)
    assert (ticks("started"), ticks("skipped"), ticks("missed")) == (2, 1, 2)
    assert (status["started"], status["skipped"], status["missed"]) == (2, 1, 2)
    assert ticks("failed") == 0


async def test_dead_letters_are_counted_by_queue_and_reason(h: Harness) -> None:
    ns = f"m-{uuid.uuid4().hex[:8]}"
    o = h.orchestrator
    await o.apply_workflow(ns, "saga", SAGA)
    await o.start(ns, "run-1", "saga", {})
    msg, _ = await one(h, "svc")
    reason = f"Poison{uuid.uuid4().hex[:6]}"  # a reason no other test dead-letters with
    await h.bus.dead_letter(msg, reason=reason, description="the runner could not read it")
    assert await o.dead_letters_once() == 1
    assert value("sagaflow_dead_letters_total", queue="steps.svc", reason=reason) == 1
    assert await phase(h, ns) == "Failed"  # nothing to undo: reserve never ran
    assert await o.dead_letters_once() == 0  # handled once, counted once
    assert value("sagaflow_dead_letters_total", queue="steps.svc", reason=reason) == 1


async def test_the_mirror_backlog_and_lag_are_sampled(h: Harness) -> None:
    ns = f"m-{uuid.uuid4().hex[:8]}"
    o = h.orchestrator
    await o.apply_workflow(ns, "saga", SAGA)
    state, _ = await o.start(ns, "run-1", "saga", {})
    async with h.pool.acquire() as conn:  # as the operator registers an object's run
        await conn.execute(
            "INSERT INTO sagaflow_kube_executions (execution_id, namespace, name) "
            "VALUES ($1, $2, 'run-1')",
            state.execution_id,
            ns,
        )
    h.clock.advance(42)
    sampler = GaugeSampler(h.pool, bus_in_database=True, clock=h.clock)
    await sampler.sample_once()
    assert value("sagaflow_mirror_backlog") == 1
    assert value("sagaflow_mirror_lag_seconds") == pytest.approx(42, abs=0.5)
    async with h.pool.acquire() as conn:  # mirrored: the status shows this revision
        await conn.execute(
            "UPDATE sagaflow_kube_executions k SET mirrored_revision = e.revision "
            "FROM sagaflow_executions e WHERE e.execution_id = k.execution_id"
        )
    await sampler.sample_once()
    assert (value("sagaflow_mirror_backlog"), value("sagaflow_mirror_lag_seconds")) == (0, 0)
