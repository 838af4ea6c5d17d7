"""The orchestrator with messages it cannot apply: poison fails its own step and no
other, dead letters fail their step, events for unknown executions are recorded as
such, starts come in batches."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from test_orchestrator import Harness, completed, harness_on

from sagaflow.core.messages import EVENTS_QUEUE, commands_queue
from sagaflow.core.ports import OutgoingMessage
from sagaflow.runtime import orchestrator as orchestrator_module
from sagaflow.runtime.orchestrator import StartRequest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def h(pg_pool: asyncpg.Pool) -> AsyncIterator[Harness]:
    async with harness_on(pg_pool) as harness:
        yield harness


def raw_event(execution_id: str, step: str, attempt: int, output_json: str) -> OutgoingMessage:
    body = (
        f'{{"kind":"StepCompleted","executionId":"{execution_id}","step":"{step}",'
        f'"attempt":{attempt},"output":{output_json}}}'
    ).encode()
    return OutgoingMessage(
        EVENTS_QUEUE, f"{execution_id}/{step}/{attempt}/result", execution_id, body
    )


async def start_runs(h: Harness, count: int) -> list[Any]:
    for i in range(count):
        await h.orchestrator.start("default", f"run-{i}", "flow", {"n": i})
    return [cmd for _, cmd in await h.commands("svc")]


async def test_a_result_postgres_cannot_store_fails_only_its_own_step(h: Harness) -> None:
    # The case of 1 NaN and 100 healthy results: before, the whole batch rolled back
    # together and was dead-lettered together.
    commands = await start_runs(h, 20)
    poisoned, healthy = commands[0], commands[1:]
    await h.bus.send([raw_event(poisoned.execution_id, "a", 1, '{"v": NaN}')])
    for cmd in healthy:
        result = completed(cmd, {"v": f"ok-{cmd.execution_id}"})
        await h.bus.send(
            [OutgoingMessage(EVENTS_QUEUE, result.message_id, cmd.execution_id, result.encode())]
        )
    assert await h.orchestrator.consume_once(max_wait=0) == 20
    bad = await h.state("run-0")
    assert bad.phase.value == "Failed"
    assert bad.steps["a"].error.type == "InvalidOutput"
    assert "output.v: NaN is not a JSON number" in bad.steps["a"].error.message
    for i in range(1, 20):
        assert (await h.state(f"run-{i}")).steps["a"].phase.value == "Succeeded"
    assert await h.bus.dead_letters(EVENTS_QUEUE) == []


async def test_a_batch_that_fails_is_applied_one_by_one_and_the_culprit_rejected(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = await start_runs(h, 5)
    culprit = commands[2]
    real = orchestrator_module.result_fact

    def fragile(result: Any) -> Any:
        if result.execution_id == culprit.execution_id:
            raise RuntimeError("a bug that only this result meets")
        return real(result)

    monkeypatch.setattr(orchestrator_module, "result_fact", fragile)
    for cmd in commands:
        result = completed(cmd, {"v": "x"})
        await h.bus.send(
            [OutgoingMessage(EVENTS_QUEUE, result.message_id, cmd.execution_id, result.encode())]
        )
    assert await h.orchestrator.consume_once(max_wait=0) == 5
    for i, cmd in enumerate(commands):
        state = await h.state(f"run-{i}")
        if cmd is culprit:
            assert state.phase.value == "Failed"
            assert state.steps["a"].error.type == "ResultRejected"
            assert (
                "RuntimeError: a bug that only this result meets" in state.steps["a"].error.message
            )
        else:
            assert state.steps["a"].phase.value == "Succeeded"
    outcome = await h.scalar(
        "SELECT outcome FROM sagaflow_inbox WHERE message_id = $1", f"{culprit.attempt_id}/result"
    )
    assert outcome == "applied"  # its rejection was applied to its execution
    assert await h.scalar("SELECT count(*) FROM bus_messages WHERE queue = $1", EVENTS_QUEUE) == 0


async def test_an_event_that_cannot_even_be_rejected_is_dead_lettered_and_the_rest_applied(
    h: Harness,
) -> None:
    commands = await start_runs(h, 3)
    broken = commands[1]
    # Its pinned workflow version is gone: neither the result nor its rejection applies.
    await h.scalar(
        "UPDATE sagaflow_executions SET workflow_version = 99, revision = 7, "
        "state = jsonb_set(jsonb_set(state, '{version}', '99'), '{revision}', '7') "
        "WHERE execution_id = $1",
        broken.execution_id,
    )
    for cmd in commands:
        result = completed(cmd, {"v": "x"})
        await h.bus.send(
            [OutgoingMessage(EVENTS_QUEUE, result.message_id, cmd.execution_id, result.encode())]
        )
    await h.orchestrator.consume_once(max_wait=0)
    [letter] = await h.bus.dead_letters(EVENTS_QUEUE)
    assert (letter.message_id, letter.reason) == (f"{broken.attempt_id}/result", "ApplyFailed")
    assert "v99 is not stored" in letter.description
    assert (await h.state("run-0")).steps["a"].phase.value == "Succeeded"
    assert (await h.state("run-2")).steps["a"].phase.value == "Succeeded"


async def test_an_event_for_an_execution_that_does_not_exist_is_recorded_as_ignored(
    h: Harness,
) -> None:
    await h.bus.send([raw_event("no-such-execution", "a", 1, "{}")])
    assert await h.orchestrator.consume_once(max_wait=0) == 1
    outcome = await h.scalar(
        "SELECT outcome FROM sagaflow_inbox WHERE message_id = 'no-such-execution/a/1/result'"
    )
    assert outcome == "ignored: unknown execution"


async def test_a_dead_lettered_command_fails_its_step_naming_the_dead_letter(h: Harness) -> None:
    await h.orchestrator.start("default", "run-0", "flow", {"n": 0})
    [(msg, cmd)] = await h.commands("svc")
    await h.bus.dead_letter(msg, reason="UnknownStepType", description="no handler for svc.a")
    assert await h.orchestrator.dead_letters_once() == 1
    state = await h.state("run-0")
    assert state.phase.value == "Failed"
    error = state.steps["a"].error
    assert error.type == "DeadLettered"
    assert f"its command {cmd.attempt_id} was dead-lettered on steps.svc" in error.message
    assert "UnknownStepType: no handler for svc.a" in error.message
    history = await h.scalar(
        "SELECT string_agg(message, ' | ' ORDER BY seq) FROM sagaflow_history "
        "WHERE kind = 'StepFailed'"
    )
    assert "DeadLettered" in history
    # Handled once: a second pass finds nothing, and the dead letter is kept for people.
    assert await h.orchestrator.dead_letters_once() == 0
    assert len(await h.bus.dead_letters(commands_queue("svc.a"))) == 1


async def test_a_dead_lettered_result_fails_its_step_and_a_heartbeat_only_logs(h: Harness) -> None:
    commands = await start_runs(h, 2)
    for cmd, kind in zip(commands, ("result", "heartbeat"), strict=True):
        message_id = f"{cmd.attempt_id}/{kind}" + ("/1" if kind == "heartbeat" else "")
        body = json.dumps({"kind": "Bogus"}).encode()  # unreadable: the id names the attempt
        await h.bus.send([OutgoingMessage(EVENTS_QUEUE, message_id, cmd.execution_id, body)])
    got = await h.bus.receive(EVENTS_QUEUE, max_messages=10, max_wait=0)
    for m in got:
        await h.bus.dead_letter(
            m, reason="MaxDeliveryCountExceeded", description="delivered 10 times"
        )
    assert await h.orchestrator.dead_letters_once() == 2
    first, second = await h.state("run-0"), await h.state("run-1")
    assert first.steps["a"].error.type == "DeadLettered" and first.phase.value == "Failed"
    assert "its result" in first.steps["a"].error.message
    assert second.phase.value == "Running"  # heartbeats are advisory


async def test_start_many_starts_a_batch_in_one_go_and_is_idempotent(h: Harness) -> None:
    requests = [StartRequest("default", f"run-{i}", "flow", {"n": i}) for i in range(30)]
    first = await h.orchestrator.start_many(requests)
    again = await h.orchestrator.start_many(requests)
    assert [s.execution_id for s in first] == [s.execution_id for s in again]
    assert {s.phase.value for s in first} == {"Running"}
    assert len(await h.commands("svc")) == 30  # one first command each, not two
    with pytest.raises(LookupError, match="default/nope"):
        await h.orchestrator.start_many([StartRequest("default", "x", "nope", {})])


async def test_an_outage_in_the_middle_of_a_batch_applies_it_after_without_redelivery(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = await start_runs(h, 3)
    for cmd in commands:
        result = completed(cmd, {"v": "x"})
        await h.bus.send(
            [OutgoingMessage(EVENTS_QUEUE, result.message_id, cmd.execution_id, result.encode())]
        )
    save = h.store.save
    failures = [asyncpg.CannotConnectNowError("the database system is starting up")]

    async def flaky(*args: Any) -> None:
        if failures:
            raise failures.pop()
        await save(*args)

    monkeypatch.setattr(h.store, "save", flaky)
    assert await h.orchestrator.consume_once(max_wait=0) == 3
    phases = [(await h.state(f"run-{i}")).steps["a"].phase.value for i in range(3)]
    assert phases == ["Succeeded"] * 3
    assert await h.scalar("SELECT count(*) FROM bus_messages WHERE queue = $1", EVENTS_QUEUE) == 0
    redelivered = await h.scalar(
        "SELECT count(*) FROM sagaflow_history WHERE kind = 'MessageIgnored'"
    )
    assert redelivered == 0 and h.orchestrator.outages.outages == 1
