"""The runner host: receives ExecuteStep commands, runs step handlers, reports results.

One receive loop per command queue (`steps.<prefix>` for each registered prefix)
fills a shared pool of `concurrency` handler slots. A finished attempt becomes a
StepCompleted or StepFailed event and its command is completed; attempts that
finish close together are settled with one `reply`, because per-message round trips
cap throughput long before the handlers do.

Delivery is at least once. The result is sent *before* the command is completed;
after a crash in between, the command is redelivered when its lock expires, the
handler runs again and its result carries the same deterministic message id
(`<execution>/<step>/<attempt>/result`), which the orchestrator deduplicates. So
handlers must be idempotent per `ctx.idempotency_key`. A lost lock
(MessageLockLostError) means another receiver has the command: logged, dropped. A
command delivered again while this host still runs it (a lock that expired during a
database outage) does not start a second run: the running one settles with the
newer delivery.

What a handler can do wrong fails its own step, never the host:
- its output is checked before it is sent: anything Postgres could not store (NaN,
  NUL, ...) fails the step as `InvalidOutput` naming the value's path;
- `sys.exit` and `os._exit` fail the step (`SystemExit`, `ProcessExit`, see `exits.py`);
- blocking the event loop is reported with the step's name (`watchdog.py`); plain
  `def` handlers run in a thread pool (`handlers.py`);
- a command whose receivers died holding it twice runs alone (`isolation.py`).

Where the host can check (`check_attempts`: the Postgres bus's runners can read the
state), a command whose attempt was never dispatched is dead-lettered unrun
(`UnknownAttempt`), and one whose attempt is already settled is completed unrun.

A command past its deadline is completed without running, and a handler still
running at its deadline is cancelled and completed without a result: the
orchestrator's timer has already timed that attempt out.

On `stop` the loops stop receiving, handlers get `grace_period` seconds, then are
cancelled and their commands abandoned. Each message is settled once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from sagaflow.core.messages import (
    EVENTS_QUEUE,
    MalformedMessageError,
    StepResult,
    commands_queue,
    decode_command,
)
from sagaflow.core.ports import (
    SUSPECT_AFTER_CRASHES,
    Bus,
    Clock,
    MessageLockLostError,
    ReceivedMessage,
    utc_now,
)
from sagaflow.runtime import exits
from sagaflow.runtime.attempts import (
    Attempt,
    event,
    failed,
    failed_from,
    parse_deadline,
    result,
    who,
)
from sagaflow.runtime.batching import Settler, Slots, abandon, until
from sagaflow.runtime.claimcheck import ClaimCheck
from sagaflow.runtime.handlers import as_async, claim_checked
from sagaflow.runtime.isolation import Gate
from sagaflow.runtime.outages import OutageWatch
from sagaflow.runtime.threads import DaemonThreads
from sagaflow.runtime.watchdog import LoopWatchdog
from sagaflow.telemetry import metrics, observe, tracing
from sagaflow.telemetry.logs import attempt_context
from sagaflow_runner import AsyncHandler, Registry, StepContext

log = logging.getLogger("sagaflow.runner")

# attempt ids -> status of each attempt the state knows ("Running", "Succeeded", ...).
AttemptCheck = Callable[[Sequence[str]], Awaitable[Mapping[str, str]]]
# A floor so a tiny lock duration cannot turn renewal into a busy loop.
MIN_RENEW_INTERVAL = 0.01
MAX_RECEIVE_BACKOFF = 5.0
# After the grace period and the cancellation of handlers: how long results already
# computed may take to be settled before the host gives up on them (redelivered).
SETTLE_AFTER_CANCEL = 5.0
# How a run of a handler ended, for the step duration histogram (None: past its deadline).
_OUTCOMES = {"StepCompleted": "succeeded", "StepFailed": "failed", None: "timed_out"}


class RunnerWorker:
    def __init__(
        self,
        bus: Bus,
        registry: Registry,
        *,
        concurrency: int = 64,
        clock: Clock = utc_now,
        lock_renew_fraction: float = 0.5,
        grace_period: float = 10.0,
        receive_wait: float = 5.0,
        flush_interval: float = 0.002,
        flush_max: int = 100,
        claim_check: ClaimCheck | None = None,
        check_attempts: AttemptCheck | None = None,
        outages: OutageWatch | None = None,
        loop_block_seconds: float = 1.0,
        suspect_alone_seconds: float = 5.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if not 0 < lock_renew_fraction < 1:
            raise ValueError(f"lock_renew_fraction must be in (0, 1), got {lock_renew_fraction}")
        if grace_period < 0 or flush_interval < 0 or flush_max < 1:
            raise ValueError("grace_period and flush_interval must be >= 0, flush_max >= 1")
        self._bus = bus
        self._registry = registry
        self._concurrency = concurrency
        self._clock = clock
        self._renew_fraction = lock_renew_fraction
        self._grace_period = grace_period
        self._receive_wait = receive_wait
        self._slots = Slots(concurrency)
        self._outages = outages
        self._settler = Settler(
            bus, flush_interval, flush_max, lambda: bool(self._running), outages
        )
        self._tasks: set[asyncio.Task[None]] = set()  # one per received command
        self._running: dict[asyncio.Task[Any], Attempt] = {}  # inside a handler
        self._attempts: dict[str, Attempt] = {}  # by attempt id, from start to settling
        self._background: set[asyncio.Task[None]] = set()  # lock renewals in flight
        self._to_abandon: list[ReceivedMessage] = []
        self._claim_check = claim_check
        self._check_attempts = check_attempts
        self._gate = Gate(suspect_alone_seconds)
        self._hurry = asyncio.Event()
        self._threads = DaemonThreads(concurrency, "sagaflow-step")
        self._loop_block_seconds = loop_block_seconds

    async def run(self, stop: asyncio.Event) -> None:
        """Serve commands until `stop` is set, then shut down gracefully."""
        # Derived here, not in __init__, so step modules may be loaded after construction.
        queues = sorted({commands_queue(prefix + ".x") for prefix in self._registry.prefixes()})
        if not queues:
            raise RuntimeError("no step handlers registered: load the step modules first")
        log.info("runner serving %s (%s)", ", ".join(queues), ", ".join(self._registry.types()))
        await self._bus.prepare(send=[EVENTS_QUEUE], receive=queues)
        settler = asyncio.create_task(self._settler.run(), name="sagaflow-runner-settler")
        watchdog = LoopWatchdog(
            asyncio.get_running_loop(), self._loop_block_seconds, self.describe_task
        )
        watchdog.start()
        grace = 0.0  # cancelled from outside or crashed: no grace, but still abandon cleanly
        try:
            with exits.guarding():
                try:
                    async with asyncio.TaskGroup() as group:
                        for queue in queues:
                            group.create_task(self._receive_loop(queue, stop, shares=len(queues)))
                    grace = self._grace_period
                finally:
                    await self._drain(grace)
        finally:
            settler.cancel()
            await asyncio.wait({settler})
            watchdog.stop()
            self._threads.shutdown(wait=False, cancel_futures=True)

    def hurry(self) -> None:
        """Stopping: cancel running handlers now instead of after the grace period."""
        self._hurry.set()

    def describe_task(self, task: asyncio.Task[Any] | None) -> str:
        """Who a task is, for people: a running handler by its step, else its name."""
        attempt = self._running.get(task) if task is not None else None
        if attempt is not None:
            return f"step {who(attempt.cmd)}"
        return "no step handler" if task is None else f"task {task.get_name()!r}, not a step"

    async def _receive_loop(self, queue: str, stop: asyncio.Event, *, shares: int) -> None:
        # A loop blocks in receive only while holding its fair share of the slots, so an
        # idle queue never starves a busy one; beyond that share it only takes what is
        # already waiting (a receive that does not block).
        share = max(1, self._concurrency // shares)
        stopped = asyncio.ensure_future(stop.wait())
        want = share
        failures = 0
        try:
            while not stop.is_set():
                # While a suspect waits to run alone, take nothing new.
                await until(stopped, self._gate.open())
                taken = await until(stopped, self._slots.take(want))
                if taken is None or stop.is_set():
                    if taken:
                        self._slots.give(taken)
                    return
                try:
                    received = await until(
                        stopped,
                        self._bus.receive(
                            queue,
                            max_messages=taken,
                            max_wait=self._receive_wait if taken <= share else 0,
                        ),
                    )
                except Exception as exc:
                    self._slots.give(taken)
                    if self._outages is not None and self._outages.failed(exc):
                        await until(stopped, self._outages.available())
                        continue
                    failures += 1
                    delay = min(0.1 * 2 ** min(failures, 10), MAX_RECEIVE_BACKOFF)
                    log.exception("receiving from %s failed; retrying in %.1fs", queue, delay)
                    await asyncio.wait({stopped}, timeout=delay)
                    continue
                failures = 0
                if received is None:  # stopped while waiting
                    self._slots.give(taken)
                    return
                self._slots.give(taken - len(received))
                statuses = await self._statuses(received)
                if stop.is_set() or statuses is False:
                    # Received as we were told to stop, or unverifiable: hand them back.
                    await abandon(self._bus, received)
                    self._slots.give(len(received))
                    if stop.is_set():
                        return
                    continue
                now = self._clock()
                for message in received:
                    status = None if statuses is None else statuses.get(message.message_id, "")
                    task = asyncio.create_task(self._process(message, now, status))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                # A full batch means more is waiting: ask for more next time.
                want = self._concurrency if len(received) == taken else share
        finally:
            stopped.cancel()

    async def _statuses(
        self, received: Sequence[ReceivedMessage]
    ) -> Mapping[str, str] | Literal[False] | None:
        """What the state says of each received attempt, when this host can ask it (None
        when it cannot); False when asking failed: the commands are handed back."""
        if self._check_attempts is None or not received:
            return None
        try:
            return await self._check_attempts([m.message_id for m in received])
        except Exception as exc:
            if self._outages is None or not self._outages.failed(exc):
                log.exception("checking %d commands against the state failed", len(received))
            return False

    async def _drain(self, grace: float) -> None:
        try:
            if self._tasks and grace > 0 and not self._hurry.is_set():
                everything = asyncio.ensure_future(asyncio.wait(set(self._tasks)))
                hurry = asyncio.ensure_future(self._hurry.wait())
                await asyncio.wait(
                    {everything, hurry}, timeout=grace, return_when=asyncio.FIRST_COMPLETED
                )
                everything.cancel()
                hurry.cancel()
        finally:
            # Only handlers are cancelled; attempts already settling finish through the
            # settler, so nothing is both completed and abandoned.
            for task in list(self._running):
                task.cancel()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=SETTLE_AFTER_CANCEL)
            for task in list(self._tasks):  # settling never came (the database is gone)
                task.cancel()
            if self._tasks:
                await asyncio.wait(set(self._tasks))
            if self._background:
                await asyncio.wait(set(self._background))
            leftover, self._to_abandon = self._to_abandon, []
            if leftover:
                log.info("abandoned %d running commands for redelivery", len(leftover))
                await abandon(self._bus, leftover)

    async def _process(
        self, message: ReceivedMessage, received_at: datetime, status: str | None
    ) -> None:
        try:
            await self._handle(message, received_at, status)
        except asyncio.CancelledError:
            pass  # shutdown: the command is abandoned or its lock expires
        except Exception:
            # A bug here must not kill the worker; the lock expires and it is redelivered.
            log.exception("unexpected error handling command %s", message.message_id)
        finally:
            self._slots.give(1)

    async def _handle(
        self, message: ReceivedMessage, received_at: datetime, status: str | None
    ) -> None:
        try:
            cmd = decode_command(message.body)
            deadline = parse_deadline(cmd.deadline)
            if cmd.attempt < 1:
                raise MalformedMessageError(f"attempt: expected 1 or more, got {cmd.attempt}")
        except MalformedMessageError as exc:
            await self._dead_letter(message, "MalformedMessage", str(exc))
            return
        if status == "":
            description = (
                f"no execution {cmd.execution_id} has dispatched attempt {cmd.attempt} of "
                f"step {cmd.step!r}: not run"
            )
            await self._dead_letter(message, "UnknownAttempt", description)
            return
        if status is not None and status != "Running":
            log.info("attempt already %s, not running it: %s", status.lower(), who(cmd))
            await self._settler.settle(None, message)
            return
        handler = self._registry.handler(cmd.type)
        if handler is None:
            served = ", ".join(self._registry.types())
            description = f"no handler for step type {cmd.type!r} here (serves: {served})"
            await self._dead_letter(message, "UnknownStepType", description)
            return
        running = self._attempts.get(cmd.attempt_id)
        if running is not None:
            # Delivered again while it runs here (its lock expired meanwhile): one run
            # only, settled with the newer delivery's lock.
            log.info("delivered again while running here; not started twice: %s", who(cmd))
            running.message = message
            return
        if deadline is not None and deadline <= self._clock():
            log.info("deadline passed before start, not running: %s", who(cmd))
            await self._settler.settle(None, message)
            return
        attempt = Attempt(self._bus, cmd, message, self._clock(), self._background)
        self._attempts[cmd.attempt_id] = attempt
        # Enqueue times are the bus's wall clock, so the wait is read on the wall clock.
        waited = observe.seconds_since(message.enqueued_at, utc_now())
        metrics.QUEUE_WAIT.labels(message.queue).observe(waited)
        began = time.perf_counter()
        try:
            with (
                tracing.handler_span(cmd, message.headers) as span,
                attempt_context(
                    execution_id=cmd.execution_id,
                    execution=cmd.execution,
                    step=cmd.step,
                    attempt=cmd.attempt,
                    attempt_id=cmd.attempt_id,
                ),
            ):
                result = await self._isolated(attempt, as_async(handler, self._threads), deadline)
                trace = tracing.record_result(span, result)
        finally:
            del self._attempts[cmd.attempt_id]
        outcome = _OUTCOMES.get(result.kind if result else None)
        if outcome is not None:  # a heartbeat is no outcome; shutdown raised above
            metrics.STEP_DURATION.labels(cmd.type, outcome).observe(time.perf_counter() - began)
        reply = None if result is None else event(cmd, result, trace)
        await self._settler.settle(reply, attempt.message)

    async def _isolated(
        self, attempt: Attempt, handler: AsyncHandler, deadline: datetime | None
    ) -> StepResult | None:
        if attempt.message.crash_count < SUSPECT_AFTER_CRASHES:
            async with self._gate.shared():
                return await self._run(attempt, handler, deadline)
        name = who(attempt.cmd)
        log.warning(
            "running alone: processes holding this command died %d times: %s",
            attempt.message.crash_count,
            name,
        )
        async with self._gate.exclusive(name):
            return await self._run(attempt, handler, deadline)

    async def _run(
        self, attempt: Attempt, handler: AsyncHandler, deadline: datetime | None
    ) -> StepResult | None:
        """The attempt's result, or None when it ran past its deadline."""
        cmd = attempt.cmd
        task = asyncio.current_task()
        assert task is not None
        if self._claim_check is not None:
            handler = claim_checked(handler, self._claim_check)
        ctx = StepContext(
            execution=cmd.execution,
            execution_id=cmd.execution_id,
            step=cmd.step,
            attempt=cmd.attempt,
            deadline=deadline,
            heartbeat=attempt.heartbeat,
            idempotency_key=cmd.attempt_id,
            loop=asyncio.get_running_loop(),
            compensates=cmd.step if cmd.compensation else None,
        )
        timeout = asyncio.timeout(self._seconds_left(deadline))
        lock_seconds = (attempt.message.locked_until - attempt.started_at).total_seconds()
        if lock_seconds > 0:
            attempt.keep_lock(max(lock_seconds * self._renew_fraction, MIN_RENEW_INTERVAL))
        self._running[task] = attempt
        try:
            async with timeout:
                with exits.step_code():
                    output = await handler(cmd.input, ctx)
        except asyncio.CancelledError:
            if not task.cancelling():
                # The handler leaked a CancelledError of its own: a failure, not a shutdown.
                return failed(cmd, "CancelledError", "handler raised CancelledError", True)
            self._to_abandon.append(attempt.message)
            log.info("cancelled at shutdown, will be redelivered: %s", who(cmd))
            raise
        except TimeoutError as exc:
            if timeout.expired():
                log.warning("ran past its deadline, cancelled without a result: %s", who(cmd))
                return None
            return failed_from(cmd, exc)
        except SystemExit as exc:
            return failed(cmd, *exits.exit_failure(exc), retryable=False)
        except Exception as exc:
            return failed_from(cmd, exc)
        finally:
            del self._running[task]
            attempt.close()
        if output is None:
            output = {}
        if not isinstance(output, dict):
            kind = type(output).__name__
            return failed(cmd, "InvalidOutput", f"handler returned {kind}, not a dict", False)
        return result(cmd, "StepCompleted", output=output)

    def _seconds_left(self, deadline: datetime | None) -> float | None:
        return None if deadline is None else (deadline - self._clock()).total_seconds()

    async def _dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        log.warning("dead-lettering %s: %s: %s", message.message_id, reason, description)
        try:
            await self._bus.dead_letter(message, reason=reason, description=description)
        except MessageLockLostError:
            log.info("lock lost before dead-lettering %s", message.message_id)
        except Exception:
            log.exception("dead-lettering %s failed; it will be redelivered", message.message_id)
