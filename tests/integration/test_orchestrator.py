"""The orchestrator on real Postgres: transitions, inbox, outbox, timers, relay.

Driven one pass at a time (`consume_once`, `fire_timers_once`, `relay_once`) with a
fake clock, and a hand-played runner, so every test controls exactly which
message arrives when; nothing sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from pg import FakeClock

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.messages import (
    EVENTS_QUEUE,
    StepResult,
    commands_queue,
    decode_command,
)
from sagaflow.core.ports import Bus, DeadLetter, OutgoingMessage, ReceivedMessage
from sagaflow.runtime.orchestrator import Orchestrator

pytestmark = pytest.mark.timeout(60)

SPEC = WorkflowSpec.model_validate(
    {
        "retry": {"maxAttempts": 3, "initialInterval": "2s", "backoffCoefficient": 3},
        "steps": [
            {"name": "a", "type": "svc.a", "input": {"n": "${{ input.n }}"}},
            {
                "name": "b",
                "type": "svc.b",
                "dependsOn": ["a"],
                "input": {"fromA": "${{ steps.a.output.v }}"},
            },
            {"name": "c", "type": "svc.c", "dependsOn": ["a"], "timeout": "10s"},
            {
                "name": "d",
                "type": "sagaflow.pass",
                "dependsOn": ["b", "c"],
                "input": {"b": "${{ steps.b.output.v }}"},
            },
        ],
    }
)


class Harness:
    def __init__(self, pool: asyncpg.Pool, bus: Bus, clock: FakeClock) -> None:
        self.pool, self.bus, self.clock = pool, bus, clock
        self.store = PostgresStore(pool)
        self.orchestrator = Orchestrator(self.store, bus, clock=clock)

    async def commands(self, prefix: str) -> list[tuple[ReceivedMessage, Any]]:
        got = await self.bus.receive(commands_queue(prefix + ".x"), max_messages=50, max_wait=0)
        return [(m, decode_command(m.body)) for m in got]

    async def reply(self, msg: ReceivedMessage, result: StepResult) -> None:
        await self.bus.send(
            [OutgoingMessage(EVENTS_QUEUE, result.message_id, result.execution_id, result.encode())]
        )
        await self.bus.complete([msg])

    async def state(self, name: str = "run-1") -> Any:
        async with self.pool.acquire() as conn:
            return await self.store.get_execution(conn, "default", name)

    async def scalar(self, sql: str, *args: Any) -> Any:
        async with self.pool.acquire() as conn:
            return await conn.fetchval(sql, *args)


def completed(cmd: Any, output: dict[str, Any]) -> StepResult:
    return StepResult("StepCompleted", cmd.execution_id, cmd.step, cmd.attempt, output=output)


def failed(cmd: Any, kind: str = "Boom", retryable: bool = True) -> StepResult:
    return StepResult(
        "StepFailed",
        cmd.execution_id,
        cmd.step,
        cmd.attempt,
        error_type=kind,
        error_message="scripted",
        retryable=retryable,
    )


@asynccontextmanager
async def harness_on(pool: asyncpg.Pool) -> AsyncIterator[Harness]:
    """A harness on a fake clock with the `flow` workflow applied (for other modules too)."""
    clock = FakeClock()
    bus = PostgresBus(pool, clock=clock, lock_duration=30)
    harness = Harness(pool, bus, clock)
    await harness.orchestrator.apply_workflow("default", "flow", SPEC)
    try:
        yield harness
    finally:
        await bus.close()


@pytest.fixture
async def h(pg_pool: asyncpg.Pool) -> AsyncIterator[Harness]:
    async with harness_on(pg_pool) as harness:
        yield harness


async def test_workflow_versions_are_immutable_and_executions_pin_theirs(h: Harness) -> None:
    assert await h.orchestrator.apply_workflow("default", "flow", SPEC) == (1, False)
    first, created = await h.orchestrator.start("default", "run-1", "flow", {"n": 1})
    assert created and first.version == 1
    changed = SPEC.model_copy(update={"timeout": "1h"})
    assert await h.orchestrator.apply_workflow("default", "flow", changed) == (2, True)
    second, _ = await h.orchestrator.start("default", "run-2", "flow", {"n": 2})
    assert second.version == 2
    assert (await h.state("run-1")).version == 1
    # Going back to an earlier spec reuses its version rather than minting a new one.
    assert await h.orchestrator.apply_workflow("default", "flow", SPEC) == (1, False)


async def test_start_is_idempotent_by_namespace_and_name(h: Harness) -> None:
    first, created = await h.orchestrator.start("default", "run-1", "flow", {"n": 1})
    again, created_again = await h.orchestrator.start("default", "run-1", "flow", {"n": 99})
    assert created and not created_again
    assert again.execution_id == first.execution_id and again.input == {"n": 1}
    assert len(await h.commands("svc")) == 1  # one command for step a, not two


async def test_start_of_a_missing_workflow_is_refused(h: Harness) -> None:
    with pytest.raises(LookupError, match="default/nope"):
        await h.orchestrator.start("default", "run-1", "nope", {})


async def test_a_run_with_a_retry_and_a_step_timeout_completes(h: Harness) -> None:
    await h.orchestrator.start("default", "run-1", "flow", {"n": 7})
    [(msg, cmd)] = await h.commands("svc")
    assert (cmd.step, cmd.attempt, cmd.input) == ("a", 1, {"n": 7})
    assert msg.message_id == f"{cmd.execution_id}/a/1"
    await h.reply(msg, completed(cmd, {"v": "A"}))
    assert await h.orchestrator.consume_once(max_wait=0) == 1

    got = {c.step: (m, c) for m, c in await h.commands("svc")}
    assert set(got) == {"b", "c"}  # parallel branches dispatched together
    assert got["b"][1].input == {"fromA": "A"}
    assert got["c"][1].deadline is not None

    # b fails once: the retry is a durable timer, due after the initial interval.
    await h.reply(*got["b"][:1], failed(got["b"][1]))
    await h.orchestrator.consume_once(max_wait=0)
    assert (await h.state()).steps["b"].phase.value == "Retrying"
    assert await h.orchestrator.fire_timers_once() == 0
    h.clock.advance(2)
    assert await h.orchestrator.fire_timers_once() == 1
    [(msg_b2, cmd_b2)] = [x for x in await h.commands("svc") if x[1].step == "b"]
    assert cmd_b2.attempt == 2
    await h.reply(msg_b2, completed(cmd_b2, {"v": "B"}))
    await h.orchestrator.consume_once(max_wait=0)

    # c never answers: its step timeout fails attempt 1 and dispatches attempt 2. The
    # runner gives the command up at its deadline, as the worker does, which frees the
    # step's session for the next attempt.
    await h.bus.complete([got["c"][0]])
    h.clock.advance(10)
    assert await h.orchestrator.fire_timers_once() == 1
    h.clock.advance(2)
    await h.orchestrator.fire_timers_once()
    [(msg_c2, cmd_c2)] = [x for x in await h.commands("svc") if x[1].step == "c"]
    assert cmd_c2.attempt == 2
    await h.reply(msg_c2, completed(cmd_c2, {}))
    await h.orchestrator.consume_once(max_wait=0)

    state = await h.state()
    assert state.phase.value == "Completed"
    assert state.output == {"d": {"b": "B"}}
    assert state.steps["c"].error is None and state.steps["c"].attempt == 2
    rows = await h.scalar(
        "SELECT json_agg(json_build_array(step, attempt, status) ORDER BY step, attempt) "
        "FROM sagaflow_step_attempts"
    )
    assert json.loads(rows) == [
        ["a", 1, "Succeeded"],
        ["b", 1, "Failed"],
        ["b", 2, "Succeeded"],
        ["c", 1, "Failed"],
        ["c", 2, "Succeeded"],
        ["d", 1, "Succeeded"],
    ]
    assert await h.scalar("SELECT count(*) FROM sagaflow_timers") == 0


async def test_duplicates_and_stale_results_change_nothing(h: Harness) -> None:
    await h.orchestrator.start("default", "run-1", "flow", {"n": 1})
    [(msg, cmd)] = await h.commands("svc")
    result = completed(cmd, {"v": 1})
    await h.reply(msg, result)
    await h.orchestrator.consume_once(max_wait=0)
    before = await h.state()

    # The same result again (a runner redelivery), and a result for an attempt that
    # never ran: the inbox drops the first, the engine ignores and records the second.
    await h.bus.send(
        [OutgoingMessage(EVENTS_QUEUE, result.message_id, cmd.execution_id, result.encode())]
    )
    stale = StepResult("StepCompleted", cmd.execution_id, "a", 5, output={"v": "late"})
    await h.bus.send(
        [OutgoingMessage(EVENTS_QUEUE, stale.message_id, cmd.execution_id, stale.encode())]
    )
    assert await h.orchestrator.consume_once(max_wait=0) == 2
    after = await h.state()
    assert after == before
    outcome = await h.scalar(
        "SELECT outcome FROM sagaflow_inbox WHERE message_id=$1", stale.message_id
    )
    assert outcome.startswith("ignored: attempt 5 is not current")
    assert await h.scalar("SELECT count(*) FROM sagaflow_history WHERE kind='MessageIgnored'") == 1
    assert await h.scalar("SELECT count(*) FROM bus_messages WHERE queue=$1", EVENTS_QUEUE) == 0


async def test_a_malformed_event_is_dead_lettered_and_the_rest_applied(h: Harness) -> None:
    await h.orchestrator.start("default", "run-1", "flow", {"n": 1})
    [(msg, cmd)] = await h.commands("svc")
    await h.bus.send([OutgoingMessage(EVENTS_QUEUE, "junk-1", cmd.execution_id, b"{not json")])
    await h.reply(msg, completed(cmd, {"v": 1}))
    assert await h.orchestrator.consume_once(max_wait=0) == 1
    letters: list[DeadLetter] = await h.bus.dead_letters(EVENTS_QUEUE)
    assert [(d.message_id, d.reason) for d in letters] == [("junk-1", "MalformedMessage")]
    assert "not JSON" in letters[0].description
    assert (await h.state()).steps["a"].phase.value == "Succeeded"


async def test_workflow_timeout_fails_the_execution(h: Harness) -> None:
    await h.orchestrator.apply_workflow(
        "default", "flow", SPEC.model_copy(update={"timeout": "1m"})
    )
    await h.orchestrator.start("default", "run-1", "flow", {"n": 1})
    h.clock.advance(61)
    await h.orchestrator.fire_timers_once()
    state = await h.state()
    assert state.phase.value == "Failed" and state.error.type == "WorkflowTimeout"
    assert [s.phase.value for s in state.steps.values()] == [
        "Running",
        "Skipped",
        "Skipped",
        "Skipped",
    ]


async def test_cancel_stops_dispatching(h: Harness) -> None:
    await h.orchestrator.start("default", "run-1", "flow", {"n": 1})
    [(msg, cmd)] = await h.commands("svc")
    state = await h.orchestrator.cancel("default", "run-1", "deleted by user")
    assert state is not None and state.phase.value == "Cancelled"
    await h.reply(msg, completed(cmd, {"v": 1}))
    await h.orchestrator.consume_once(max_wait=0)
    assert await h.commands("svc") == []
    assert (await h.state()).steps["a"].phase.value == "Succeeded"  # the truth is kept


class OutsideBus:
    """The Postgres bus seen as a bus outside the database: no transactional methods,
    so the orchestrator must use its outbox and relay, as it does for Service Bus."""

    def __init__(self, inner: PostgresBus) -> None:
        self.inner = inner

    async def prepare(self, *, send: Sequence[str] = (), receive: Sequence[str] = ()) -> None:
        await self.inner.prepare(send=send, receive=receive)

    async def send(self, messages: Sequence[OutgoingMessage]) -> None:
        await self.inner.send(messages)

    async def receive(
        self, queue: str, *, max_messages: int = 100, max_wait: float = 5.0
    ) -> list[ReceivedMessage]:
        return await self.inner.receive(queue, max_messages=max_messages, max_wait=max_wait)

    async def complete(self, messages: Sequence[ReceivedMessage]) -> None:
        await self.inner.complete(messages)

    async def reply(
        self, completed: Sequence[ReceivedMessage], messages: Sequence[OutgoingMessage]
    ) -> None:
        await self.inner.send(messages)
        await self.inner.complete(completed)

    async def abandon(self, messages: Sequence[ReceivedMessage]) -> None:
        await self.inner.abandon(messages)

    async def dead_letter(self, message: ReceivedMessage, *, reason: str, description: str) -> None:
        await self.inner.dead_letter(message, reason=reason, description=description)

    async def renew_lock(self, messages: Sequence[ReceivedMessage]) -> None:
        await self.inner.renew_lock(messages)

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        return await self.inner.dead_letters(queue)

    async def close(self) -> None:
        await self.inner.close()


async def test_without_a_transactional_bus_commands_go_through_the_outbox(
    pg_pool: asyncpg.Pool,
) -> None:
    clock = FakeClock()
    inner = PostgresBus(pg_pool, clock=clock)
    h = Harness(pg_pool, OutsideBus(inner), clock)
    assert not h.orchestrator.transactional
    await h.orchestrator.apply_workflow("default", "flow", SPEC)
    await h.orchestrator.start("default", "run-1", "flow", {"n": 1})
    assert await h.scalar("SELECT count(*) FROM sagaflow_outbox") == 1
    assert await h.commands("svc") == []  # nothing on the bus before the relay runs
    assert await h.orchestrator.relay_once() == 1
    assert await h.scalar("SELECT count(*) FROM sagaflow_outbox") == 0
    [(msg, cmd)] = await h.commands("svc")
    await h.reply(msg, completed(cmd, {"v": 1}))
    assert await h.orchestrator.consume_once(max_wait=0) == 1
    assert await h.scalar("SELECT count(*) FROM bus_messages WHERE queue=$1", EVENTS_QUEUE) == 0
    assert await h.orchestrator.relay_once() == 2  # b and c
    await inner.close()


async def test_a_replica_never_uses_a_state_another_replica_superseded(h: Harness) -> None:
    """Each orchestrator remembers the states it committed; a second replica moving an
    execution on must make the first one read the newer state, not its memory."""
    other = Orchestrator(PostgresStore(h.pool), h.bus, clock=h.clock)
    await h.orchestrator.start("default", "run-1", "flow", {"n": 1})
    [(msg, cmd)] = await h.commands("svc")
    await h.reply(msg, completed(cmd, {"v": "A"}))
    assert await other.consume_once(max_wait=0) == 1  # the other replica applies a's result

    got = {c.step: (m, c) for m, c in await h.commands("svc")}
    await h.reply(got["b"][0], completed(got["b"][1], {"v": "B"}))
    assert await h.orchestrator.consume_once(max_wait=0) == 1  # this one applies b's
    state = await h.state()
    assert state.steps["a"].phase.value == "Succeeded"  # not lost by a stale memory
    assert state.steps["b"].phase.value == "Succeeded"
    assert state.revision == 3


async def test_a_rolled_back_transition_is_not_remembered(h: Harness, monkeypatch: Any) -> None:
    await h.orchestrator.start("default", "run-1", "flow", {"n": 1})
    [(msg, cmd)] = await h.commands("svc")
    await h.reply(msg, completed(cmd, {"v": "A"}))

    complete_in = h.bus.complete_in
    seen: list[str] = []

    async def broken_once(conn: Any, messages: Any) -> None:
        # What was written in the transaction so far, as the failure rolls it back:
        seen.append((await h.state()).steps["a"].phase.value)
        if len(seen) == 1:
            raise asyncpg.ConnectionDoesNotExistError("the database went away mid-transaction")
        await complete_in(conn, messages)

    monkeypatch.setattr(h.bus, "complete_in", broken_once)
    # The batch in hand is applied again once the database answers, on top of the
    # committed state: the rolled-back revision was not remembered.
    assert await h.orchestrator.consume_once(max_wait=0) == 1
    assert seen == ["Running", "Running"]  # the first try was rolled back
    state = await h.state()
    assert state.steps["a"].phase.value == "Succeeded" and state.revision == 2
    assert h.orchestrator.outages.outages == 1
