"""The state at any instant, rebuilt from history by the engine, is the state the run had.

Real runs on real Postgres, driven one pass at a time on a fake clock: a retry and a
step timeout with a stale result ignored; a saga that fails and compensates; a signal
wait with a suspend and a resume; a cancel that lets a waiting run of a limited
workflow in. The store is wrapped to snapshot, in each transaction, every state it
saves and the timers table as that transaction leaves it. Then `replay` at every
recorded instant, and at instants drawn between them, must give that state and those
timers; before the first transition it must refuse.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg import FakeClock

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.store import Applied, PostgresStore
from sagaflow.core.definition import Definition
from sagaflow.core.facts import Resume, Suspend
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.messages import (
    EVENTS_QUEUE,
    SignalMessage,
    StepResult,
    commands_queue,
    decode_command,
)
from sagaflow.core.ports import OutgoingMessage
from sagaflow.core.replay import BeforeStartError, replay
from sagaflow.core.state import ExecutionState
from sagaflow.runtime.orchestrator import Orchestrator

pytestmark = pytest.mark.timeout(120)
NS = "default"

Timers = list[tuple[str, str, str, int, datetime]]


@dataclass(frozen=True)
class Snapshot:
    at: datetime
    state: dict[str, Any]
    timers: Timers


class RecordingStore(PostgresStore):
    """Saves as the store does, then notes each saved run's state and timers."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.snapshots: dict[str, list[Snapshot]] = {}

    async def save(
        self, conn: asyncpg.Connection, applied: Sequence[Applied], now: datetime
    ) -> None:
        await super().save(conn, applied, now)
        states: dict[str, ExecutionState] = {}
        for item in applied:
            states.setdefault(item.execution_id, item.decision.state)
            if item.decision.applied:
                states[item.execution_id] = item.decision.state
        for eid, state in states.items():
            rows = await conn.fetch(
                "SELECT key, kind, step, attempt, due_at FROM sagaflow_timers "
                "WHERE execution_id = $1 ORDER BY due_at, key",
                eid,
            )
            timers = [(r["key"], r["kind"], r["step"], r["attempt"], r["due_at"]) for r in rows]
            self.snapshots.setdefault(eid, []).append(Snapshot(now, _plain(state), timers))


def _plain(state: ExecutionState) -> dict[str, Any]:
    return dict(json.loads(json.dumps(state.to_json())))


class Runs:
    def __init__(self, pool: asyncpg.Pool, bus: PostgresBus, clock: FakeClock) -> None:
        self.pool, self.bus, self.clock = pool, bus, clock
        self.store = RecordingStore(pool)
        self.o = Orchestrator(self.store, bus, clock=clock)

    async def commands(self, step_type: str) -> list[Any]:
        got = await self.bus.receive(commands_queue(step_type), max_messages=50, max_wait=0)
        await self.bus.complete(got)
        return [decode_command(m.body) for m in got]

    async def reply(self, *results: StepResult) -> None:
        await self.bus.send(
            [
                OutgoingMessage(EVENTS_QUEUE, r.message_id, r.execution_id, r.encode())
                for r in results
            ]
        )
        self.clock.advance(0.5)
        while await self.o.consume_once(0):
            pass

    async def later(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await self.o.fire_timers_once()

    async def state(self, name: str) -> ExecutionState:
        async with self.pool.acquire() as conn:
            found = await self.store.get_execution(conn, NS, name)
        assert found is not None
        return found


def ok(cmd: Any, output: dict[str, Any] | None = None, *, attempt: int | None = None) -> StepResult:
    number = cmd.attempt if attempt is None else attempt
    return StepResult(
        "StepCompleted",
        cmd.execution_id,
        cmd.step,
        number,
        output=output or {"v": 1},
        compensation=cmd.compensation,
    )


def fail(cmd: Any, retryable: bool = True) -> StepResult:
    return StepResult(
        "StepFailed",
        cmd.execution_id,
        cmd.step,
        cmd.attempt,
        error_type="Boom",
        error_message="scripted",
        retryable=retryable,
    )


def spec(body: dict[str, Any]) -> WorkflowSpec:
    return WorkflowSpec.model_validate(body)


RETRYING = spec(
    {
        "steps": [
            {"name": "a", "type": "ra.a", "retry": {"maxAttempts": 3, "initialInterval": "2s"}},
            {
                "name": "b",
                "type": "rb.b",
                "dependsOn": ["a"],
                "timeout": "5s",
                "retry": {"maxAttempts": 2, "initialInterval": "1s"},
            },
        ]
    }
)
SAGA = spec(
    {
        "steps": [
            {"name": "reserve", "type": "sa.reserve", "compensate": {"type": "sa.release"}},
            {"name": "charge", "type": "sb.charge", "dependsOn": ["reserve"]},
        ]
    }
)
SIGNALLED = spec(
    {
        "signals": [{"name": "go"}],
        "steps": [
            {"name": "first", "type": "sc.first"},
            {
                "name": "wait",
                "type": "sagaflow.waitForSignal",
                "dependsOn": ["first"],
                "input": {"signal": "go", "timeout": "1h"},
            },
            {"name": "last", "type": "sd.last", "dependsOn": ["wait"]},
        ],
    }
)
LIMITED = spec(
    {
        "concurrency": {"maxExecutions": 1},
        "steps": [{"name": "hold", "type": "se.hold"}],
    }
)


@pytest.fixture
async def runs(pg_pool: asyncpg.Pool) -> AsyncIterator[Runs]:
    clock = FakeClock()
    bus = PostgresBus(pg_pool, clock=clock, lock_duration=30)
    recorded = Runs(pg_pool, bus, clock)
    for name, body in (
        ("retrying", RETRYING),
        ("saga", SAGA),
        ("signalled", SIGNALLED),
        ("limited", LIMITED),
    ):
        await recorded.o.apply_workflow(NS, name, body)
    try:
        yield recorded
    finally:
        await bus.close()


async def record_all(r: Runs) -> None:
    """Play the four runs, interleaved on one clock."""
    await r.o.start(NS, "retry-1", "retrying", {})
    await r.o.start(NS, "saga-1", "saga", {})
    await r.o.start(NS, "sig-1", "signalled", {})
    await r.o.start(NS, "held-1", "limited", {})
    r.clock.advance(1)
    await r.o.start(NS, "held-2", "limited", {})  # waits for held-1's slot

    (a,) = await r.commands("ra.a")
    await r.reply(fail(a))  # a retries in 2s
    await r.later(2.5)
    (a2,) = await r.commands("ra.a")
    await r.reply(ok(a2))
    (b,) = await r.commands("rb.b")
    await r.later(6)  # b times out, retries in 1s
    await r.reply(ok(b))  # too late: ignored
    await r.later(1.5)
    (b2,) = await r.commands("rb.b")
    await r.reply(ok(b2))
    assert (await r.state("retry-1")).phase.value == "Completed"

    (reserve,) = await r.commands("sa.reserve")
    await r.reply(ok(reserve))
    (charge,) = await r.commands("sb.charge")
    await r.reply(fail(charge, retryable=False))
    (release,) = await r.commands("sa.release")
    await r.reply(ok(release, {}))
    assert (await r.state("saga-1")).phase.value == "Compensated"

    (first,) = await r.commands("sc.first")
    await r.reply(ok(first))
    r.clock.advance(1)
    await r.o.control(NS, "sig-1", Suspend(), "req-suspend")
    r.clock.advance(1)
    await r.o.control(NS, "sig-1", Resume(), "req-resume")
    r.clock.advance(1)
    await r.o.control(NS, "sig-1", Resume(), "req-resume-again")  # not suspended: ignored
    r.clock.advance(1)
    go = SignalMessage(namespace=NS, signal="go", data=None, execution="sig-1")
    await r.o.signal(go, "sig-go")
    (last,) = await r.commands("sd.last")
    await r.reply(ok(last))
    assert (await r.state("sig-1")).phase.value == "Completed"

    r.clock.advance(1)
    await r.o.cancel(NS, "held-1", "not needed")  # frees the slot: held-2 starts
    assert (await r.state("held-1")).phase.value == "Cancelled"
    held = await r.commands("se.hold")
    waited = (await r.state("held-2")).execution_id
    second = next(c for c in held if c.execution_id == waited)
    await r.reply(ok(second))
    assert (await r.state("held-2")).phase.value == "Completed"


async def rows_and_definitions(
    r: Runs, execution_id: str
) -> tuple[list[dict[str, Any]], dict[int, Definition]]:
    async with r.pool.acquire() as conn:
        rows = [dict(x) for x in await r.store.history(conn, execution_id, transitions=True)]
        state = await r.store.get_execution_by_id(conn, execution_id)
        assert state is not None
        versions = {json.loads(x["data"])["version"] for x in rows if x["kind"] == "Transition"}
        definitions = {v: await r.store.definition(conn, NS, state.workflow, v) for v in versions}
    return rows, definitions


def expected_at(snapshots: Sequence[Snapshot], at: datetime) -> Snapshot:
    return [s for s in snapshots if s.at <= at][-1]


def timers_of(replayed: Any) -> Timers:
    return [(t.key, t.kind, t.step, t.attempt, t.due_at) for t in replayed.timers]


def check_instants_between(
    rows: list[dict[str, Any]], definitions: dict[int, Definition], snapshots: list[Snapshot]
) -> None:
    """At instants drawn between the first transition and the last, as at the recorded."""
    first, last = snapshots[0].at, snapshots[-1].at

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.floats(0, 1))
    def between(fraction: float) -> None:
        at = first + (last - first) * fraction
        replayed = replay(rows, definitions.__getitem__, at)
        want = expected_at(snapshots, at)
        assert _plain(replayed.state) == want.state
        assert timers_of(replayed) == want.timers

    between()


async def test_replay_at_any_instant_gives_the_state_and_timers_the_run_had(runs: Runs) -> None:
    await record_all(runs)
    recorded = runs.store.snapshots
    assert len(recorded) == 5
    kinds_seen: set[str] = set()
    for execution_id, snapshots in recorded.items():
        rows, definitions = await rows_and_definitions(runs, execution_id)
        facts = [json.loads(x["data"])["fact"]["type"] for x in rows if x["kind"] == "Transition"]
        kinds_seen |= set(facts)
        for snap in snapshots:
            replayed = replay(rows, definitions.__getitem__, snap.at)
            want = expected_at(snapshots, snap.at)  # the last of those sharing an instant
            assert _plain(replayed.state) == want.state, (execution_id, snap.at)
            assert timers_of(replayed) == want.timers, (execution_id, snap.at)
            assert replayed.as_of <= snap.at
        first = snapshots[0].at
        with pytest.raises(BeforeStartError, match="before the execution's first transition"):
            replay(rows, definitions.__getitem__, first - timedelta(microseconds=1))
        check_instants_between(rows, definitions, snapshots)
        final = replay(rows, definitions.__getitem__)
        assert _plain(final.state) == snapshots[-1].state
    # Every kind of transition took part: results, timers, controls, signals, admission.
    assert {
        "Start",
        "StepCompleted",
        "StepFailed",
        "TimerFired",
        "Suspend",
        "Resume",
        "SignalReceived",
        "Cancel",
        "Waited",
        "Admitted",
    } <= kinds_seen


async def test_transition_rows_carry_the_cause_and_stay_out_of_plain_history(
    runs: Runs,
) -> None:
    await record_all(runs)
    state = await runs.state("retry-1")
    async with runs.pool.acquire() as conn:
        plain = await runs.store.history(conn, state.execution_id)
        full = await runs.store.history(conn, state.execution_id, transitions=True)
    assert "Transition" not in {x["kind"] for x in plain}
    assert [x["kind"] for x in full if x["kind"] != "Transition"] == [x["kind"] for x in plain]
    causes = [json.loads(x["data"])["cause"] for x in full if x["kind"] == "Transition"]
    assert causes[0] == "start"
    assert json.loads(full[0]["data"])["initial"]["phase"] == "Pending"
    assert any(c.startswith("timer:retry:a:") for c in causes)
    assert any(c.startswith("timer:step-timeout:b:") for c in causes)
    assert sum(c.startswith("message:") for c in causes) == 4  # a fail, a ok, b late, b2 ok
    ignored = [json.loads(x["data"]) for x in full if x["kind"] == "Transition"]
    assert sum("ignored" in d for d in ignored) == 1  # the late result of b's attempt 1
