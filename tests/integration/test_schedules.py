"""The schedule runner on real Postgres: each tick starts one run, on a fake clock.

`ScheduleRunner.run_once` is driven pass by pass with a recording `Launcher` that
answers as the start path does (one run per key) and keeps which runs are active, so
each test sees exactly what was started, skipped, buffered, missed and cancelled:
cron and interval ticks, every overlap policy, catch-up after an outage, both DST
transitions in two zones, two runners racing on one schedule, a pass that fails
halfway, suspension, spec changes, an unknown workflow. Then the whole path once
through the real orchestrator (`DirectLauncher`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from pg import FakeClock
from test_orchestrator import harness_on

from sagaflow.core.trigger_specs import ScheduleSpec
from sagaflow.runtime.schedules import ScheduleRunner
from sagaflow.runtime.startpath import DirectLauncher, Source, StartCall

pytestmark = pytest.mark.timeout(60)

NS = "ops"
UID = "uid-1"
T0 = datetime(2026, 5, 10, 11, 59, 30, tzinfo=UTC)


@dataclass
class RecordingLauncher:
    """Starts nothing; one run per key, as the start path answers, and which are active."""

    workflows: set[str] = field(default_factory=lambda: {"report"})
    calls: list[StartCall] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)  # key -> run name
    sources: dict[str, str] = field(default_factory=dict)  # run name -> source uid
    finished: set[str] = field(default_factory=set)
    cancelled: list[tuple[str, str]] = field(default_factory=list)
    fail_after: int | None = None  # calls that succeed before the next one fails
    lose_answer: bool = False  # ... and that one starts its run before it fails
    gate: asyncio.Event | None = None  # the first start waits for it (races)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, call: StartCall) -> tuple[str, bool]:
        self.calls.append(call)
        if self.gate is not None and not self.entered.is_set():
            self.entered.set()
            await self.gate.wait()
        failing = self.fail_after == 0
        if failing:
            self.fail_after = None
            if not self.lose_answer:
                raise ConnectionResetError("connection lost")
        elif self.fail_after is not None:
            self.fail_after -= 1
        if call.workflow not in self.workflows:
            raise LookupError(f"workflow {call.namespace}/{call.workflow} does not exist")
        assert call.idempotency_key is not None and call.source.kind == "schedule"
        held = self.runs.get(call.idempotency_key)
        if held is not None:
            return held, False
        name = call.run_name()
        assert name is not None
        self.runs[call.idempotency_key] = name
        self.sources[name] = call.source.uid
        self.started.set()
        if failing:
            raise ConnectionResetError("connection lost after the start")
        return name, True

    async def active(self, namespace: str, source: Source) -> list[str]:
        return [
            n for n, uid in self.sources.items() if uid == source.uid and n not in self.finished
        ]

    async def cancel(self, namespace: str, name: str, reason: str) -> None:
        self.cancelled.append((name, reason))

    def started_keys(self) -> list[str]:
        return list(self.runs)

    def finish_all(self) -> None:
        self.finished |= set(self.sources)


@dataclass
class World:
    pool: asyncpg.Pool
    clock: FakeClock
    launcher: RecordingLauncher
    runner: ScheduleRunner
    events: list[tuple[str, str, str]] = field(default_factory=list)  # name, kind, message

    async def put(self, name: str = "nightly", uid: str = UID, **fields: Any) -> None:
        await self.runner.put(NS, name, uid, spec(**fields))

    async def at(self, when: datetime | str) -> dict[str, int]:
        self.clock.now = when if isinstance(when, datetime) else utc(when)
        return dict(await self.runner.run_once())

    async def status(self, name: str = "nightly") -> dict[str, Any]:
        found = await self.runner.status(NS, name)
        assert found is not None
        return found.model_dump(mode="json", by_alias=True)

    def kinds(self) -> list[str]:
        return [kind for _, kind, _ in self.events]


def spec(**fields: Any) -> ScheduleSpec:
    if "interval" not in fields:
        fields.setdefault("cron", "0 * * * *")
    return ScheduleSpec.model_validate({"workflowRef": {"name": "report"}, **fields})


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def runner_on(pool: asyncpg.Pool, w: World) -> ScheduleRunner:
    def report(namespace: str, name: str, kind: str, message: str) -> None:
        assert namespace == NS
        w.events.append((name, kind, message))

    return ScheduleRunner(pool, w.launcher, report=report, clock=w.clock)


@pytest.fixture
async def w(pg_pool: asyncpg.Pool) -> World:
    clock, launcher = FakeClock(T0), RecordingLauncher()
    world = World(pg_pool, clock, launcher, ScheduleRunner(pg_pool, launcher))
    world.runner = runner_on(pg_pool, world)
    return world


async def test_a_cron_tick_starts_one_run_with_its_key_and_rendered_input(w: World) -> None:
    await w.put(input={"day": "${{ schedule.time }}", "by": "${{ schedule.name }}"})
    assert (await w.status())["nextScheduleTime"] == "2026-05-10T12:00:00Z"
    assert await w.at("2026-05-10T11:59:59Z") == {}
    assert await w.at("2026-05-10T12:00:00Z") == {"Started": 1}
    [call] = w.launcher.calls
    assert call.idempotency_key == f"schedule/{UID}/2026-05-10T12:00:00Z"
    assert call.input == {"day": "2026-05-10T12:00:00Z", "by": "nightly"}
    assert call.source == Source("schedule", "nightly", UID) and call.workflow == "report"
    assert await w.at("2026-05-10T12:30:00Z") == {}  # handled: never again
    status = await w.status()
    assert status["lastScheduleTime"] == "2026-05-10T12:00:00Z"
    assert status["nextScheduleTime"] == "2026-05-10T13:00:00Z"
    assert status["started"] == 1 and status["active"] == [call.run_name()]
    [obj] = await w.runner.list_objects(NS)
    assert obj["kind"] == "Schedule" and obj["metadata"]["uid"] == UID
    assert obj["spec"]["cron"] == "0 * * * *" and obj["status"] == status
    assert await w.runner.list_objects("elsewhere") == []


async def test_interval_ticks_count_from_the_creation(w: World) -> None:
    await w.put(interval="15m", overlap="Allow")  # created at 11:59:30
    for minute in (14, 29, 44):
        assert await w.at(f"2026-05-10T12:{minute}:29Z") == {}
        assert await w.at(f"2026-05-10T12:{minute}:30Z") == {"Started": 1}
    ticks = [k.rsplit("/", 1)[1] for k in w.launcher.started_keys()]
    assert ticks == ["2026-05-10T12:14:30Z", "2026-05-10T12:29:30Z", "2026-05-10T12:44:30Z"]


async def test_skip_counts_ticks_while_the_run_goes_on(w: World) -> None:
    await w.put()
    await w.at("2026-05-10T12:00:00Z")
    assert await w.at("2026-05-10T13:00:05Z") == {"Skipped": 1}
    assert "has not finished (Skip)" in w.events[-1][2]
    w.launcher.finish_all()
    assert await w.at("2026-05-10T14:00:05Z") == {"Started": 1}
    assert (await w.status())["skipped"] == 1 and len(w.launcher.runs) == 2


async def test_allow_starts_beside_the_active_run(w: World) -> None:
    await w.put(overlap="Allow")
    await w.at("2026-05-10T12:00:00Z")
    assert await w.at("2026-05-10T13:00:00Z") == {"Started": 1}
    assert len((await w.status())["active"]) == 2


async def test_buffer_one_starts_the_waiting_tick_when_the_run_ends(w: World) -> None:
    await w.put(overlap="BufferOne", catchupWindow="5h")
    await w.at("2026-05-10T12:00:00Z")
    assert await w.at("2026-05-10T13:00:00Z") == {"Buffered": 1}
    assert await w.at("2026-05-10T14:00:00Z") == {"Skipped": 1}  # one waits, no more
    assert await w.at("2026-05-10T14:20:00Z") == {}  # still running: still waiting
    w.launcher.finish_all()
    # Not a tick time: the row is due because a tick waits for it.
    assert await w.at("2026-05-10T14:20:01Z") == {"Started": 1}
    assert w.launcher.started_keys()[-1].endswith("2026-05-10T13:00:00Z")
    status = await w.status()
    assert (status["started"], status["skipped"]) == (2, 1)


async def test_cancel_previous_cancels_the_active_run_and_starts_the_tick(w: World) -> None:
    await w.put(overlap="CancelPrevious")
    await w.at("2026-05-10T12:00:00Z")
    [first] = w.launcher.runs.values()
    assert await w.at("2026-05-10T13:00:00Z") == {"Cancelled": 1, "Started": 1}
    [(victim, reason)] = w.launcher.cancelled
    assert victim == first and "tick 2026-05-10T13:00:00Z replaces it" in reason


async def test_after_an_outage_ticks_inside_the_window_fire_and_older_are_missed(w: World) -> None:
    await w.put(overlap="Allow", catchupWindow="90m")
    # Down from 11:59:30 to 15:00:10: 12:00 and 13:00 are older than 90 minutes.
    assert await w.at("2026-05-10T15:00:10Z") == {"Missed": 1, "Started": 2}
    fired = [k.rsplit("/", 1)[1] for k in w.launcher.started_keys()]
    assert fired == ["2026-05-10T14:00:00Z", "2026-05-10T15:00:00Z"]
    [missed] = [m for _, kind, m in w.events if kind == "Missed"]
    assert missed.startswith("2 ticks, 2026-05-10T12:00:00Z to 2026-05-10T13:00:00Z")
    status = await w.status()
    assert (status["started"], status["missed"]) == (2, 2)


# Each DST transition of 2026, passed over in 5-minute steps: one start, at the instant.
DST = [
    ("Europe/Amsterdam", "30 2 * * *", "2026-03-28T22:00Z", "2026-03-29T01:00:00Z"),
    ("Europe/Amsterdam", "30 2 * * *", "2026-10-24T22:00Z", "2026-10-25T00:30:00Z"),
    ("America/New_York", "30 2 * * *", "2026-03-08T04:00Z", "2026-03-08T07:00:00Z"),
    ("America/New_York", "30 1 * * *", "2026-11-01T03:00Z", "2026-11-01T05:30:00Z"),
]


@pytest.mark.parametrize(("zone", "cron", "start", "fires"), DST)
async def test_dst_transitions_start_one_run_at_the_right_instant(
    w: World, zone: str, cron: str, start: str, fires: str
) -> None:
    w.clock.now = utc(start)
    await w.put(cron=cron, timezone=zone)
    started_at = []
    for step in range(1, 12 * 8):
        now = utc(start) + timedelta(minutes=5 * step)
        if (await w.at(now)).get("Started"):
            started_at.append(now)
        w.launcher.finish_all()
    assert w.launcher.started_keys() == [f"schedule/{UID}/{fires}"]
    assert started_at == [utc(fires)] and w.kinds() == ["Started"]


async def test_two_runners_on_one_schedule_start_each_tick_once(w: World, pg_database: str) -> None:
    other_pool = await asyncpg.create_pool(pg_database, min_size=1, max_size=4)
    try:
        other = runner_on(other_pool, w)
        await w.put(interval="1m", overlap="Allow")
        for n in range(1, 9):
            w.clock.now = T0 + timedelta(minutes=n)
            # The first start of each round holds the row until the other runner has
            # passed it by; the row lock, not luck, keeps the tick to one start.
            w.launcher.gate, w.launcher.entered = asyncio.Event(), asyncio.Event()
            tasks = [asyncio.create_task(r.run_once()) for r in (w.runner, other)]
            try:
                await asyncio.wait_for(w.launcher.entered.wait(), 10)
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED, timeout=10)
                passed_by = [dict(t.result()) for t in done]
            finally:  # a failing round must not leave a pass holding its row
                w.launcher.gate.set()
                await asyncio.gather(*tasks)
            assert passed_by == [{}]
        # An outage: several ticks due at once, both runners racing without a gate.
        w.launcher.gate = None
        w.clock.now = T0 + timedelta(minutes=20)
        await asyncio.gather(w.runner.run_once(), other.run_once(), w.runner.run_once())
    finally:
        await other_pool.close()
    keys = [c.idempotency_key for c in w.launcher.calls]
    assert len(keys) == len(set(keys)) == 20  # each tick asked for once, by one runner
    assert w.kinds() == ["Started"] * 20 and (await w.status())["started"] == 20


async def test_a_pass_that_fails_halfway_is_retried_and_counts_each_tick_once(
    w: World, caplog: pytest.LogCaptureFixture
) -> None:
    await w.put(overlap="Allow", catchupWindow="2h")
    w.launcher.fail_after = 1  # 12:00 starts, 13:00 loses the connection
    with caplog.at_level(logging.WARNING, "sagaflow.schedules"):
        assert await w.at("2026-05-10T13:00:10Z") == {}
        assert await w.at("2026-05-10T13:00:11Z") == {"Started": 2}
    [warning] = [r for r in caplog.records if r.name == "sagaflow.schedules"]
    assert "connection lost; its ticks are tried again" in warning.getMessage()
    assert w.kinds() == ["Started", "Started"] and "started by an earlier pass" in w.events[0][2]
    assert len(w.launcher.runs) == 2 and (await w.status())["started"] == 2


async def test_a_start_whose_answer_was_lost_is_not_taken_for_an_earlier_run(
    w: World,
) -> None:
    # The run of 12:00 started, the answer never came: the retry finds it active, and
    # under Skip it must count as this tick's run, not as one that blocks it.
    await w.put()
    w.launcher.fail_after, w.launcher.lose_answer = 0, True
    assert await w.at("2026-05-10T12:00:00Z") == {}
    assert (await w.status())["active"] == list(w.launcher.runs.values())
    assert await w.at("2026-05-10T12:00:01Z") == {"Started": 1}
    assert (await w.status())["skipped"] == 0 and len(w.launcher.runs) == 1


async def test_suspended_no_tick_fires_and_passed_ones_stay_unfired_after_resume(
    w: World,
) -> None:
    await w.put(suspend=True)
    assert (await w.status())["nextScheduleTime"] is None
    assert await w.at("2026-05-10T12:30:00Z") == {}
    w.clock.now = utc("2026-05-10T13:30:00Z")
    await w.put()  # resumed: 12:00 and 13:00 passed while suspended
    assert await w.at("2026-05-10T13:30:01Z") == {}
    assert await w.at("2026-05-10T14:00:00Z") == {"Started": 1}
    assert w.launcher.started_keys() == [f"schedule/{UID}/2026-05-10T14:00:00Z"]
    assert (await w.status())["missed"] == 0


async def test_a_changed_spec_keeps_the_cursor_and_a_new_uid_starts_afresh(w: World) -> None:
    await w.put(input={"v": 1})
    await w.at("2026-05-10T12:00:00Z")
    w.launcher.finish_all()
    await w.put(input={"v": 2})  # same uid: 12:00 is handled, whatever the spec says
    assert await w.at("2026-05-10T12:10:00Z") == {}
    assert await w.at("2026-05-10T13:00:00Z") == {"Started": 1}
    assert [c.input for c in w.launcher.calls] == [{"v": 1}, {"v": 2}]
    assert (await w.status())["started"] == 2
    w.launcher.finish_all()
    await w.put(uid="uid-2")  # deleted and created again under the name
    status = await w.status()
    assert status["started"] == 0 and status["lastScheduleTime"] is None
    assert await w.at("2026-05-10T14:00:00Z") == {"Started": 1}
    assert w.launcher.started_keys()[-1] == "schedule/uid-2/2026-05-10T14:00:00Z"


async def test_an_unknown_workflow_is_reported_and_the_schedule_goes_on(w: World) -> None:
    await w.put(input={"x": "${{ length(schedule.missing) }}"}, name="broken")
    await w.put()
    w.launcher.workflows = set()
    assert await w.at("2026-05-10T12:00:00Z") == {"Failed": 2}
    messages = sorted((name, message) for name, _, message in w.events)
    assert "spec.input.x" in messages[0][1] and messages[0][0] == "broken"
    assert "workflow ops/report does not exist" in messages[1][1]
    w.launcher.workflows = {"report"}
    assert await w.at("2026-05-10T13:00:00Z") == {"Failed": 1, "Started": 1}
    count = await w.pool.fetchval("SELECT failed FROM sagaflow_schedules WHERE name = 'nightly'")
    assert count == 1 and (await w.status())["started"] == 1


async def test_a_pass_pages_through_every_due_schedule(w: World) -> None:
    for n in range(5):
        await w.put(name=f"s{n}", uid=f"uid-{n}")
    small = ScheduleRunner(w.pool, w.launcher, clock=w.clock, batch_size=2)
    w.clock.now = utc("2026-05-10T12:00:00Z")
    assert dict(await small.run_once()) == {"Started": 5}
    assert sorted(c.source.name for c in w.launcher.calls) == [f"s{n}" for n in range(5)]


async def test_a_removed_schedule_fires_no_more(w: World) -> None:
    await w.put()
    await w.runner.remove(NS, "nightly")
    assert await w.at("2026-05-10T12:00:00Z") == {}
    assert await w.runner.status(NS, "nightly") is None and w.launcher.calls == []


async def test_run_fires_due_ticks_until_stopped(w: World) -> None:
    await w.put(interval="1m")
    w.clock.now = T0 + timedelta(minutes=1)
    runner = ScheduleRunner(w.pool, w.launcher, clock=w.clock, poll_seconds=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await asyncio.wait_for(w.launcher.started.wait(), 10)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert runner.reported == {"Started": 1} and len(w.launcher.calls) == 1


async def test_through_the_orchestrator_a_tick_starts_a_run_and_the_next_replaces_it(
    pg_pool: asyncpg.Pool,
) -> None:
    async with harness_on(pg_pool) as h:
        h.clock.now = T0
        runner = ScheduleRunner(h.pool, DirectLauncher(h.orchestrator), clock=h.clock)
        flow = ScheduleSpec.model_validate(
            {
                "workflowRef": {"name": "flow"},
                "cron": "0 * * * *",
                "input": {"n": 7, "at": "${{ schedule.time }}"},
                "overlap": "CancelPrevious",
            }
        )
        await runner.put("default", "hourly", UID, flow)
        h.clock.now = utc("2026-05-10T12:00:01Z")
        assert dict(await runner.run_once()) == {"Started": 1}
        [first] = (await runner.list_objects("default"))[0]["status"]["active"]
        state = await h.state(first)
        assert state.input == {"n": 7, "at": "2026-05-10T12:00:00Z"}
        assert state.phase.value == "Running"
        h.clock.now = utc("2026-05-10T13:00:01Z")
        assert dict(await runner.run_once()) == {"Cancelled": 1, "Started": 1}
        assert (await h.state(first)).phase.value != "Running"
        status = await runner.status("default", "hourly")
        assert status is not None and status.started == 2
