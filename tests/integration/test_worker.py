"""The runner worker against an in-memory bus: results, failures, dead letters, locks, shutdown."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sagaflow.core.messages import (
    EVENTS_QUEUE,
    ExecuteStep,
    StepResult,
    commands_queue,
    decode_result,
)
from sagaflow.core.ports import (
    DeadLetter,
    MessageLockLostError,
    OutgoingMessage,
    ReceivedMessage,
    utc_now,
)
from sagaflow.runtime.worker import RunnerWorker
from sagaflow_runner import PermanentError, Registry, RetryableError, StepContext

pytestmark = pytest.mark.timeout(30)


class FakeBus:
    """Just enough of the Bus protocol for the worker, recording every call."""

    def __init__(self, *, lock_seconds: float = 30.0) -> None:
        self.lock_seconds = lock_seconds
        self.queues: dict[str, list[OutgoingMessage]] = defaultdict(list)
        self.sent: list[OutgoingMessage] = []
        self.completed: list[ReceivedMessage] = []
        self.abandoned: list[ReceivedMessage] = []
        self.dead: list[DeadLetter] = []
        self.renewed: list[str] = []
        self.calls: list[str] = []  # "send", "complete", ... in order
        self.lost_locks: set[str] = set()  # message ids whose lock is "lost" on complete
        self.crash_counts: dict[str, int] = {}  # message id -> crash_count when received
        self._changed = asyncio.Event()

    def _touch(self) -> None:
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    def results(self) -> list[StepResult]:
        return [decode_result(m.body) for m in self.sent]

    async def prepare(self, *, send: Sequence[str] = (), receive: Sequence[str] = ()) -> None:
        pass

    async def send(self, messages: Sequence[OutgoingMessage]) -> None:
        self.calls.append("send")
        for message in messages:
            self.sent.append(message)
            self.queues[message.queue].append(message)
        self._touch()

    async def receive(
        self, queue: str, *, max_messages: int = 100, max_wait: float = 5.0
    ) -> list[ReceivedMessage]:
        assert max_messages >= 1
        waiting = self.queues[queue]
        if not waiting:
            # The worker cancels this when it stops, so the timeout is only a backstop.
            try:
                await asyncio.wait_for(self.wait_until(lambda: bool(waiting)), max_wait)
            except TimeoutError:
                return []
        taken, waiting[:] = waiting[:max_messages], waiting[max_messages:]
        self._touch()  # a test may wait for the queue to empty
        now = utc_now()
        return [
            ReceivedMessage(
                queue=m.queue,
                message_id=m.message_id,
                session_id=m.session_id,
                body=m.body,
                delivery_count=1,
                enqueued_at=now,
                locked_until=now + timedelta(seconds=self.lock_seconds),
                lock_token=uuid.uuid4().hex,
                crash_count=self.crash_counts.get(m.message_id, 0),
            )
            for m in taken
        ]

    async def complete(self, messages: Sequence[ReceivedMessage]) -> None:
        self.calls.append("complete")
        lost = [m for m in messages if m.message_id in self.lost_locks]
        if lost:
            self._touch()
            raise MessageLockLostError(lost[0].message_id)
        self.completed.extend(messages)
        self._touch()

    async def reply(
        self, completed: Sequence[ReceivedMessage], messages: Sequence[OutgoingMessage]
    ) -> None:
        # Atomic like the Postgres bus: a lost lock settles and sends nothing.
        self.calls.append("reply")
        lost = [m for m in completed if m.message_id in self.lost_locks]
        if lost:
            self._touch()
            raise MessageLockLostError(lost[0].message_id)
        if messages:
            await self.send(messages)
        await self.complete(completed)

    async def abandon(self, messages: Sequence[ReceivedMessage]) -> None:
        self.calls.append("abandon")
        self.abandoned.extend(messages)
        self._touch()

    async def dead_letter(self, message: ReceivedMessage, *, reason: str, description: str) -> None:
        self.calls.append("dead_letter")
        self.dead.append(
            DeadLetter(
                message.queue,
                message.message_id,
                message.session_id,
                message.body,
                reason,
                description,
                message.delivery_count,
                utc_now(),
            )
        )
        self._touch()

    async def renew_lock(self, messages: Sequence[ReceivedMessage]) -> None:
        self.renewed.extend(m.message_id for m in messages)
        self._touch()

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        return [d for d in self.dead if d.queue == queue]

    async def close(self) -> None:
        return None


def command(
    step_type: str = "inventory.reserve",
    *,
    execution_id: str = "e-1",
    step: str = "reserve",
    attempt: int = 1,
    input: dict[str, Any] | None = None,
    deadline: datetime | None = None,
) -> ExecuteStep:
    return ExecuteStep(
        execution_id=execution_id,
        execution="shop/order-1",
        step=step,
        attempt=attempt,
        type=step_type,
        input=input if input is not None else {"sku": "A1"},
        deadline=deadline.isoformat() if deadline else None,
        heartbeat_timeout=None,
    )


async def enqueue(bus: FakeBus, *commands: ExecuteStep) -> None:
    await bus.send(
        [
            OutgoingMessage(commands_queue(c.type), c.attempt_id, c.execution_id, c.encode())
            for c in commands
        ]
    )
    bus.sent.clear()  # `sent` records what the worker sends
    bus.calls.clear()


async def enqueue_raw(bus: FakeBus, queue: str, message_id: str, body: bytes) -> None:
    await enqueue(bus)
    bus.queues[queue].append(OutgoingMessage(queue, message_id, "s", body))
    bus._touch()


@asynccontextmanager
async def running(worker: RunnerWorker) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await task


def settled(bus: FakeBus, count: int) -> Callable[[], bool]:
    return lambda: len(bus.completed) + len(bus.dead) + len(bus.abandoned) >= count


# -- results --------------------------------------------------------------------------------


async def test_completes_a_step_and_sends_step_completed() -> None:
    bus, registry = FakeBus(), Registry()
    seen: list[StepContext] = []
    deadline = utc_now() + timedelta(hours=1)

    async def reserve(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        seen.append(ctx)
        return {"reserved": input["sku"]}

    registry.register("inventory.reserve", reserve)
    cmd = command(attempt=3, deadline=deadline)
    await enqueue(bus, cmd)
    async with running(RunnerWorker(bus, registry)):
        await bus.wait_until(settled(bus, 1))

    [ctx] = seen
    assert (ctx.execution, ctx.execution_id, ctx.step, ctx.attempt) == (
        "shop/order-1",
        "e-1",
        "reserve",
        3,
    )
    assert ctx.idempotency_key == "e-1/reserve/3" == cmd.attempt_id
    assert ctx.deadline == deadline
    [sent] = bus.sent
    assert sent.queue == EVENTS_QUEUE
    assert sent.message_id == "e-1/reserve/3/result"
    assert sent.session_id == "e-1"
    assert json.loads(sent.body) == {
        "kind": "StepCompleted",
        "executionId": "e-1",
        "step": "reserve",
        "attempt": 3,
        "output": {"reserved": "A1"},
    }
    assert [m.message_id for m in bus.completed] == [cmd.attempt_id]
    assert bus.calls == ["reply", "send", "complete"]  # one reply: result and command
    assert bus.abandoned == []


async def test_results_finishing_together_share_one_reply() -> None:
    bus, registry = FakeBus(), Registry()

    async def quick(input: dict[str, Any], ctx: StepContext) -> None:
        return None

    registry.register("inventory.reserve", quick)
    await enqueue(bus, *(command(execution_id=f"e-{i}") for i in range(20)))
    async with running(RunnerWorker(bus, registry)):
        await bus.wait_until(settled(bus, 20))

    assert bus.calls == ["reply", "send", "complete"]
    assert {r.execution_id for r in bus.results()} == {f"e-{i}" for i in range(20)}
    assert all(r.kind == "StepCompleted" and r.output == {} for r in bus.results())


def _raise(exc: Exception) -> Callable[[], Any]:
    def handler() -> Any:
        raise exc

    return handler


@pytest.mark.parametrize(
    ("behaviour", "error_type", "retryable"),
    [
        (_raise(RetryableError("busy", type="Throttled")), "Throttled", True),
        (_raise(RetryableError("busy")), "RetryableError", True),
        (_raise(PermanentError("none left", type="OutOfStock")), "OutOfStock", False),
        (_raise(PermanentError("bad")), "PermanentError", False),
        (_raise(KeyError("sku")), "KeyError", True),
        (_raise(TimeoutError()), "TimeoutError", True),
        (lambda: ["not", "a", "dict"], "InvalidOutput", False),
        (lambda: {"when": datetime.now(UTC)}, "InvalidOutput", False),
    ],
)
async def test_failures_become_step_failed(
    behaviour: Callable[[], Any], error_type: str, retryable: bool
) -> None:
    bus, registry = FakeBus(), Registry()

    async def handler(input: dict[str, Any], ctx: StepContext) -> Any:
        return behaviour()

    registry.register("inventory.reserve", handler)
    await enqueue(bus, command())
    async with running(RunnerWorker(bus, registry)):
        await bus.wait_until(settled(bus, 1))

    [result] = bus.results()
    assert result.kind == "StepFailed"
    assert (result.error_type, result.retryable) == (error_type, retryable)
    assert bus.sent[0].message_id == "e-1/reserve/1/result"
    assert len(bus.completed) == 1


# -- dead letters ---------------------------------------------------------------------------


async def test_malformed_and_unknown_commands_are_dead_lettered_and_the_loop_goes_on() -> None:
    bus, registry = FakeBus(), Registry()

    async def reserve(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"ok": True}

    registry.register("inventory.reserve", reserve)
    queue = commands_queue("inventory.x")
    await enqueue_raw(bus, queue, "garbage", b"not json")
    unknown = command("inventory.teleport", execution_id="e-unknown")
    bad_deadline = json.loads(command(execution_id="e-bad").encode())
    bad_deadline["deadline"] = "tomorrow"
    bus.queues[queue].append(OutgoingMessage(queue, unknown.attempt_id, "s", unknown.encode()))
    bus.queues[queue].append(OutgoingMessage(queue, "bad", "s", json.dumps(bad_deadline).encode()))

    async with running(RunnerWorker(bus, registry)):
        await bus.wait_until(settled(bus, 3))
        await enqueue(bus, command(execution_id="e-good"))
        await bus.wait_until(lambda: len(bus.completed) == 1)

    reasons = {d.message_id: d.reason for d in bus.dead}
    assert reasons == {
        "garbage": "MalformedMessage",
        unknown.attempt_id: "UnknownStepType",
        "bad": "MalformedMessage",
    }
    assert "inventory.teleport" in next(d.description for d in bus.dead if d.reason.startswith("U"))
    assert [r.execution_id for r in bus.results()] == ["e-good"]


# -- heartbeats and locks -------------------------------------------------------------------


async def test_heartbeat_sends_an_event_and_renews_the_lock() -> None:
    bus, registry = FakeBus(), Registry()

    async def slow(input: dict[str, Any], ctx: StepContext) -> None:
        await ctx.heartbeat({"progress": 0.5})
        await ctx.heartbeat()

    registry.register("inventory.reserve", slow)
    cmd = command()
    await enqueue(bus, cmd)
    async with running(RunnerWorker(bus, registry)):
        await bus.wait_until(settled(bus, 1))

    beats = [r for r in bus.results() if r.kind == "StepHeartbeat"]
    assert [b.sequence for b in beats] == [1, 2]
    assert [m.message_id for m in bus.sent[:2]] == [
        "e-1/reserve/1/heartbeat/1",
        "e-1/reserve/1/heartbeat/2",
    ]
    assert all(m.queue == EVENTS_QUEUE and m.session_id == "e-1" for m in bus.sent)
    assert bus.renewed.count(cmd.attempt_id) >= 2
    assert bus.results()[-1].kind == "StepCompleted"


async def test_a_long_handler_gets_its_lock_renewed_automatically() -> None:
    bus, registry = FakeBus(lock_seconds=0.04), Registry()

    async def long(input: dict[str, Any], ctx: StepContext) -> None:
        await bus.wait_until(lambda: len(bus.renewed) >= 2)

    registry.register("inventory.reserve", long)
    await enqueue(bus, command())
    async with running(RunnerWorker(bus, registry, lock_renew_fraction=0.5)):
        await bus.wait_until(settled(bus, 1))

    assert len(bus.renewed) >= 2
    assert set(bus.renewed) == {"e-1/reserve/1"}
    assert [r.kind for r in bus.results()] == ["StepCompleted"]


async def test_a_lost_lock_on_complete_is_dropped_and_others_still_complete() -> None:
    bus, registry = FakeBus(), Registry()

    async def quick(input: dict[str, Any], ctx: StepContext) -> None:
        return None

    registry.register("inventory.reserve", quick)
    cmds = [command(execution_id=f"e-{i}") for i in range(3)]
    bus.lost_locks.add(cmds[1].attempt_id)
    await enqueue(bus, *cmds)
    async with running(RunnerWorker(bus, registry)):
        await bus.wait_until(lambda: len(bus.completed) == 2)

    assert sorted(m.message_id for m in bus.completed) == [cmds[0].attempt_id, cmds[2].attempt_id]
    # The lost one sent nothing: its command is redelivered (or already was) and reruns.
    assert sorted(r.execution_id for r in bus.results()) == ["e-0", "e-2"]
    assert bus.abandoned == []


# -- deadlines ------------------------------------------------------------------------------


async def test_a_command_past_its_deadline_is_completed_without_running() -> None:
    bus, registry = FakeBus(), Registry()
    ran = asyncio.Event()

    async def reserve(input: dict[str, Any], ctx: StepContext) -> None:
        ran.set()

    registry.register("inventory.reserve", reserve)
    await enqueue(bus, command(deadline=utc_now() - timedelta(seconds=1)))
    async with running(RunnerWorker(bus, registry)):
        await bus.wait_until(settled(bus, 1))

    assert not ran.is_set()
    assert len(bus.completed) == 1
    assert bus.sent == []


async def test_a_handler_running_past_its_deadline_is_cancelled_without_a_result() -> None:
    bus, registry = FakeBus(), Registry()
    cancelled = asyncio.Event()

    async def hang(input: dict[str, Any], ctx: StepContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    registry.register("inventory.reserve", hang)
    await enqueue(bus, command(deadline=utc_now() + timedelta(milliseconds=50)))
    async with running(RunnerWorker(bus, registry)):
        await bus.wait_until(settled(bus, 1))

    assert cancelled.is_set()
    assert len(bus.completed) == 1
    assert bus.sent == []


# -- concurrency and shutdown ---------------------------------------------------------------


async def test_concurrency_bounds_running_handlers() -> None:
    bus, registry = FakeBus(), Registry()
    release = asyncio.Event()
    running_now, most = 0, 0

    async def gated(input: dict[str, Any], ctx: StepContext) -> None:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        bus._touch()
        await release.wait()
        running_now -= 1

    registry.register("inventory.reserve", gated)
    await enqueue(bus, *(command(execution_id=f"e-{i}") for i in range(5)))
    async with running(RunnerWorker(bus, registry, concurrency=2)):
        await bus.wait_until(lambda: running_now == 2)
        for _ in range(20):
            await asyncio.sleep(0)
        assert running_now == 2
        release.set()
        await bus.wait_until(settled(bus, 5))

    assert most == 2


async def test_serves_every_prefix_of_the_registry() -> None:
    bus, registry = FakeBus(), Registry()

    async def ok(input: dict[str, Any], ctx: StepContext) -> None:
        return None

    registry.register("inventory.reserve", ok)
    registry.register("payments.charge", ok)
    await enqueue(bus, command("inventory.reserve"), command("payments.charge", step="charge"))
    async with running(RunnerWorker(bus, registry, concurrency=4)):
        await bus.wait_until(settled(bus, 2))

    assert sorted(m.queue for m in bus.completed) == ["steps.inventory", "steps.payments"]


async def test_shutdown_lets_a_handler_finish_within_the_grace_period() -> None:
    bus, registry = FakeBus(), Registry()
    started, release = asyncio.Event(), asyncio.Event()

    async def gated(input: dict[str, Any], ctx: StepContext) -> None:
        started.set()
        await release.wait()

    registry.register("inventory.reserve", gated)
    await enqueue(bus, command())
    stop = asyncio.Event()
    task = asyncio.create_task(RunnerWorker(bus, registry, grace_period=30).run(stop))
    await started.wait()
    stop.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    release.set()
    await task

    assert len(bus.completed) == 1
    assert [r.kind for r in bus.results()] == ["StepCompleted"]
    assert bus.abandoned == []


async def test_shutdown_abandons_an_in_flight_handler_after_the_grace_period() -> None:
    bus, registry = FakeBus(), Registry()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(input: dict[str, Any], ctx: StepContext) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    registry.register("inventory.reserve", hang)
    cmd = command()
    await enqueue(bus, cmd)
    stop = asyncio.Event()
    task = asyncio.create_task(RunnerWorker(bus, registry, grace_period=0.05).run(stop))
    await started.wait()
    stop.set()
    await task

    assert cancelled.is_set()
    assert [m.message_id for m in bus.abandoned] == [cmd.attempt_id]
    assert bus.completed == []
    assert bus.sent == []
    assert bus.calls == ["abandon"]  # settled once, nothing else


async def test_cancelling_the_worker_abandons_in_flight_commands() -> None:
    bus, registry = FakeBus(), Registry()
    started = asyncio.Event()

    async def hang(input: dict[str, Any], ctx: StepContext) -> None:
        started.set()
        await asyncio.Event().wait()

    registry.register("inventory.reserve", hang)
    await enqueue(bus, command())
    task = asyncio.create_task(RunnerWorker(bus, registry).run(asyncio.Event()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert len(bus.abandoned) == 1
    assert bus.completed == []


async def test_a_worker_without_handlers_refuses_to_start() -> None:
    with pytest.raises(RuntimeError, match="no step handlers"):
        await RunnerWorker(FakeBus(), Registry()).run(asyncio.Event())
