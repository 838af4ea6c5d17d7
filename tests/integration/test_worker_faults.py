"""What a handler can do wrong fails its own step, never the runner host; suspects run
alone; commands the state does not know are not run; settling rides out outages."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
from typing import Any

import asyncpg
import pytest
from test_worker import FakeBus, command, enqueue, running, settled

from sagaflow.runtime.outages import OutageWatch
from sagaflow.runtime.worker import RunnerWorker
from sagaflow_runner import Registry, StepContext

pytestmark = pytest.mark.timeout(30)


async def test_an_output_postgres_cannot_store_fails_only_its_step_naming_the_path() -> None:
    bus, registry = FakeBus(), Registry()

    async def handler(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {
            "nan": {"total": math.nan},
            "nul": {"lines": ["ok", "bad\x00"]},
            "fine": {"total": 1.5},
        }[ctx.step]

    registry.register("inventory.reserve", handler)
    await enqueue(bus, *(command(step=s, execution_id=f"e-{s}") for s in ("nan", "nul", "fine")))
    async with running(RunnerWorker(bus, registry)):
        await bus.wait_until(settled(bus, 3))
    results = {r.step: r for r in bus.results()}
    assert results["fine"].kind == "StepCompleted"
    for step, path in (("nan", "output.total: NaN"), ("nul", "output.lines[1]: the text")):
        r = results[step]
        assert (r.kind, r.error_type, r.retryable) == ("StepFailed", "InvalidOutput", False)
        assert path in (r.error_message or ""), r.error_message
    assert len(bus.completed) == 3 and bus.dead == []


async def test_sys_exit_and_os_exit_fail_their_step_and_the_runner_goes_on() -> None:
    bus, registry = FakeBus(), Registry()

    async def quits(input: dict[str, Any], ctx: StepContext) -> None:
        sys.exit(3)

    def hard_quits(input: dict[str, Any], ctx: StepContext) -> None:
        os._exit(7)  # in a thread, as plain `def` handlers run

    async def fine(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"ok": True}

    registry.register("quit.soft", quits)
    registry.register("quit.hard", hard_quits)
    registry.register("quit.none", fine)
    await enqueue(
        bus,
        command("quit.soft", execution_id="e-1"),
        command("quit.hard", execution_id="e-2"),
        command("quit.none", execution_id="e-3"),
    )
    async with running(RunnerWorker(bus, registry)):
        await bus.wait_until(settled(bus, 3))
    results = {r.execution_id: r for r in bus.results()}
    assert (results["e-1"].error_type, results["e-1"].retryable) == ("SystemExit", False)
    assert "sys.exit(3)" in (results["e-1"].error_message or "")
    assert (results["e-2"].error_type, results["e-2"].retryable) == ("ProcessExit", False)
    assert "os._exit(7)" in (results["e-2"].error_message or "")
    assert results["e-3"].kind == "StepCompleted"
    assert os._exit.__name__ == "_exit"  # the guard is gone once the host stopped


async def test_a_plain_def_handler_runs_in_a_thread_beside_async_ones() -> None:
    bus, registry = FakeBus(), Registry()
    release = threading.Event()

    def blocking(input: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        ctx.heartbeat_sync()
        release.wait(20)  # blocking code: fine in a thread
        return {"thread": threading.current_thread().name}

    async def quick(input: dict[str, Any], ctx: StepContext) -> None:
        return None

    registry.register("work.blocking", blocking)
    registry.register("work.quick", quick)
    await enqueue(bus, command("work.blocking", execution_id="slow"))
    await enqueue(bus, command("work.quick", execution_id="fast"))
    async with running(RunnerWorker(bus, registry)):
        await bus.wait_until(lambda: any(m.execution_id == "fast" for m in bus.results()))
        assert "slow/reserve/1" in bus.renewed  # the thread's heartbeat reached the host
        release.set()
        await bus.wait_until(settled(bus, 2))
    [slow] = [r for r in bus.results() if r.execution_id == "slow" and r.kind == "StepCompleted"]
    assert (slow.output or {})["thread"].startswith("sagaflow-step")


class _Seen(logging.Handler):
    """Sets an event when a log line with its words comes (from any thread)."""

    def __init__(self, **events: tuple[str, threading.Event]) -> None:
        super().__init__()
        self.events = events
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.records.append(text)
        for words, event in self.events.values():
            if words in text:
                event.set()


async def test_an_async_handler_that_blocks_the_loop_is_named() -> None:
    bus, registry = FakeBus(), Registry()
    reported, unblocked = threading.Event(), threading.Event()
    seen = _Seen(reported=("has been blocked", reported), unblocked=("was blocked", unblocked))
    logging.getLogger("sagaflow.runner").addHandler(seen)

    async def hog(input: dict[str, Any], ctx: StepContext) -> None:
        reported.wait(20)  # blocks the loop on purpose, until the watchdog reports it

    registry.register("work.hog", hog)
    await enqueue(bus, command("work.hog", step="hog", execution_id="e-hog"))
    try:
        async with running(RunnerWorker(bus, registry, loop_block_seconds=0.2)):
            await bus.wait_until(settled(bus, 1))
            assert await asyncio.to_thread(unblocked.wait, 20)
    finally:
        logging.getLogger("sagaflow.runner").removeHandler(seen)
    [warning] = [r for r in seen.records if "has been blocked" in r]
    assert "step hog of execution shop/order-1 (id=e-hog, attempt 1, type work.hog)" in warning


async def test_a_command_delivered_again_while_it_runs_runs_once() -> None:
    bus, registry = FakeBus(), Registry()
    started, go = asyncio.Event(), asyncio.Event()
    calls = 0

    async def slow(input: dict[str, Any], ctx: StepContext) -> None:
        nonlocal calls
        calls += 1
        started.set()
        await go.wait()

    registry.register("inventory.reserve", slow)
    cmd = command()
    await enqueue(bus, cmd)
    again = threading.Event()
    seen = _Seen(again=("delivered again while running here", again))
    runner_log = logging.getLogger("sagaflow.runner")
    level = runner_log.level
    runner_log.addHandler(seen)
    runner_log.setLevel(logging.INFO)
    try:
        async with running(RunnerWorker(bus, registry)):
            await started.wait()
            await enqueue(bus, cmd)  # its lock expired meanwhile: delivered again
            assert await asyncio.to_thread(again.wait, 10)
            go.set()
            await bus.wait_until(settled(bus, 1))
    finally:
        runner_log.removeHandler(seen)
        runner_log.setLevel(level)
    assert calls == 1
    [done] = bus.completed
    assert done.message_id == cmd.attempt_id and len(bus.results()) == 1


async def test_a_suspect_runs_with_nothing_else_running() -> None:
    bus, registry = FakeBus(), Registry()
    log: list[str] = []
    first_running, go = asyncio.Event(), asyncio.Event()

    async def work(input: dict[str, Any], ctx: StepContext) -> None:
        log.append(f"start {ctx.execution_id}")
        if ctx.execution_id == "healthy-1":
            first_running.set()
            await go.wait()
        await asyncio.sleep(0)
        log.append(f"end {ctx.execution_id}")

    registry.register("inventory.reserve", work)
    bus.crash_counts["suspect/reserve/1"] = 2  # held at two deaths
    bus.crash_counts["unlucky/reserve/1"] = 1  # one death: not a suspect
    await enqueue(bus, command(execution_id="healthy-1"))
    async with running(RunnerWorker(bus, registry)):
        await first_running.wait()
        await enqueue(bus, command(execution_id="suspect"))
        await bus.wait_until(lambda: not bus.queues["steps.inventory"])
        await enqueue(bus, command(execution_id="healthy-2"))
        go.set()
        await bus.wait_until(settled(bus, 3))
        await enqueue(bus, command(execution_id="unlucky"), command(execution_id="healthy-3"))
        await bus.wait_until(settled(bus, 5))
    at = log.index("start suspect")
    assert log[at - 1] == "end healthy-1" and log[at + 1] == "end suspect", log
    assert log[-4:-2] == ["start unlucky", "start healthy-3"], log  # side by side


async def test_commands_the_state_does_not_know_or_has_settled_are_not_run() -> None:
    bus, registry = FakeBus(), Registry()
    ran: list[str] = []

    async def work(input: dict[str, Any], ctx: StepContext) -> None:
        ran.append(ctx.execution_id)

    async def check(attempt_ids: Any) -> dict[str, str]:
        known = {"done/reserve/1": "Succeeded", "live/reserve/1": "Running"}
        return {a: known[a] for a in attempt_ids if a in known}

    registry.register("inventory.reserve", work)
    await enqueue(bus, *(command(execution_id=e) for e in ("forged", "done", "live")))
    async with running(RunnerWorker(bus, registry, check_attempts=check)):
        await bus.wait_until(settled(bus, 3))
    assert ran == ["live"]
    [dead] = bus.dead
    assert (dead.message_id, dead.reason) == ("forged/reserve/1", "UnknownAttempt")
    assert {m.message_id for m in bus.completed} == {"done/reserve/1", "live/reserve/1"}


async def test_hurry_cancels_running_handlers_without_waiting_for_the_grace() -> None:
    bus, registry = FakeBus(), Registry()
    started = asyncio.Event()

    async def forever(input: dict[str, Any], ctx: StepContext) -> None:
        started.set()
        await asyncio.Event().wait()

    registry.register("inventory.reserve", forever)
    await enqueue(bus, command())
    worker = RunnerWorker(bus, registry, grace_period=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await started.wait()
    stop.set()
    worker.hurry()
    await asyncio.wait_for(task, 10)
    assert [m.message_id for m in bus.abandoned] == ["e-1/reserve/1"]


async def test_results_wait_out_an_outage_and_are_settled_once_it_ends() -> None:
    bus, registry = FakeBus(), Registry()
    calls = 0

    async def work(input: dict[str, Any], ctx: StepContext) -> None:
        nonlocal calls
        calls += 1

    reply = bus.reply
    failures = [asyncpg.ConnectionDoesNotExistError("the server went away")]

    async def flaky_reply(completed: Any, messages: Any) -> None:
        if failures:
            raise failures.pop()
        await reply(completed, messages)

    bus.reply = flaky_reply  # type: ignore[method-assign]
    probes = 0

    async def probe() -> None:
        nonlocal probes
        probes += 1

    outages = OutageWatch("the database", probe, lambda e: isinstance(e, asyncpg.PostgresError))
    registry.register("inventory.reserve", work)
    await enqueue(bus, command())
    async with running(RunnerWorker(bus, registry, outages=outages)):
        await bus.wait_until(settled(bus, 1))
    assert calls == 1 and probes == 1 and outages.outages == 1
    assert [r.kind for r in bus.results()] == ["StepCompleted"] and bus.abandoned == []
