"""The runner host: receives ExecuteStep commands, runs step handlers, reports results.

One receive loop per command queue (`steps.<prefix>` for each registered prefix)
fills a shared pool of `concurrency` handler slots. A finished attempt becomes a
StepCompleted or StepFailed event and its command is completed; attempts that
finish close together are settled with one `send` and one `complete`, because
per-message round trips cap throughput long before the handlers do.

Delivery is at least once. The result is sent *before* the command is completed;
after a crash in between, the command is redelivered when its lock expires, the
handler runs again and its result carries the same deterministic message id
(`<execution>/<step>/<attempt>/result`), which the orchestrator deduplicates. So
handlers must be idempotent per `ctx.idempotency_key`. A lost lock
(MessageLockLostError) means another receiver has the command: logged, dropped.

A command past its deadline is completed without running, and a handler still
running at its deadline is cancelled and completed without a result: the
orchestrator's timer has already timed that attempt out, and a hung handler must
not hold a slot (and, by lock renewal, its command) forever.

On `stop` the loops stop receiving, handlers get `grace_period` seconds, then are
cancelled and their commands abandoned. Each message is settled once.

With a `ClaimCheck` (see the section at the end) the handler is wrapped: references
in its input are resolved before it runs, and a large output or a long error message
is stored by reference before the result is sent. Both happen inside the attempt
(deadline, lock renewal, shutdown cancel), since moving 50 MB can take a while.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any, Literal

from sagaflow.core.messages import (
    EVENTS_QUEUE,
    ExecuteStep,
    MalformedMessageError,
    StepResult,
    commands_queue,
    decode_command,
)
from sagaflow.core.payload_refs import ref_of
from sagaflow.core.ports import (
    Bus,
    Clock,
    MessageLockLostError,
    OutgoingMessage,
    PayloadIntegrityError,
    PayloadMissingError,
    ReceivedMessage,
    utc_now,
)
from sagaflow.runtime.batching import Settler, Slots, abandon, until
from sagaflow.runtime.claimcheck import ClaimCheck
from sagaflow_runner import (
    Handler,
    PermanentError,
    Registry,
    RetryableError,
    StepContext,
    StepError,
)

log = logging.getLogger("sagaflow.runner")

ResultKind = Literal["StepCompleted", "StepFailed", "StepHeartbeat"]
# Error messages travel in events and land in execution status; keep them small.
MAX_ERROR_MESSAGE = 2000
# A floor so a tiny lock duration cannot turn renewal into a busy loop.
MIN_RENEW_INTERVAL = 0.01
MAX_RECEIVE_BACKOFF = 5.0


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
        self._settler = Settler(bus, flush_interval, flush_max, lambda: bool(self._running))
        self._tasks: set[asyncio.Task[None]] = set()  # one per received command
        self._running: dict[asyncio.Task[None], ReceivedMessage] = {}  # inside a handler
        self._background: set[asyncio.Task[None]] = set()  # lock renewals in flight
        self._to_abandon: list[ReceivedMessage] = []
        self._claim_check = claim_check

    async def run(self, stop: asyncio.Event) -> None:
        """Serve commands until `stop` is set, then shut down gracefully."""
        # Derived here, not in __init__, so step modules may be loaded after construction.
        queues = sorted({commands_queue(prefix + ".x") for prefix in self._registry.prefixes()})
        if not queues:
            raise RuntimeError("no step handlers registered: load the step modules first")
        log.info("runner serving %s (%s)", ", ".join(queues), ", ".join(self._registry.types()))
        settler = asyncio.create_task(self._settler.run(), name="sagaflow-runner-settler")
        grace = 0.0  # cancelled from outside or crashed: no grace, but still abandon cleanly
        try:
            async with asyncio.TaskGroup() as group:
                for queue in queues:
                    group.create_task(self._receive_loop(queue, stop, shares=len(queues)))
            grace = self._grace_period
        finally:
            try:
                await self._drain(grace)
            finally:
                settler.cancel()
                await asyncio.wait({settler})

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
                taken = await until(stopped, self._slots.take(want))
                if taken is None:
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
                except Exception:
                    self._slots.give(taken)
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
                if stop.is_set():
                    # Received as we were told to stop: hand them straight back.
                    await abandon(self._bus, received)
                    self._slots.give(len(received))
                    return
                now = self._clock()
                for message in received:
                    task = asyncio.create_task(self._process(message, now))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                # A full batch means more is waiting: ask for more next time.
                want = self._concurrency if len(received) == taken else share
        finally:
            stopped.cancel()

    async def _drain(self, grace: float) -> None:
        try:
            if self._tasks and grace > 0:
                await asyncio.wait(set(self._tasks), timeout=grace)
        finally:
            # Only handlers are cancelled; attempts already settling finish through the
            # settler, so nothing is both completed and abandoned.
            for task in list(self._running):
                task.cancel()
            if self._tasks:
                await asyncio.wait(set(self._tasks))
            if self._background:
                await asyncio.wait(set(self._background))
            leftover, self._to_abandon = self._to_abandon, []
            if leftover:
                log.info("abandoned %d running commands for redelivery", len(leftover))
                await abandon(self._bus, leftover)

    async def _process(self, message: ReceivedMessage, received_at: datetime) -> None:
        try:
            await self._handle(message, received_at)
        except Exception:
            # A bug here must not kill the worker; the lock expires and it is redelivered.
            log.exception("unexpected error handling command %s", message.message_id)
        finally:
            self._slots.give(1)

    async def _handle(self, message: ReceivedMessage, received_at: datetime) -> None:
        try:
            cmd = decode_command(message.body)
            deadline = _parse_deadline(cmd.deadline)
            if cmd.attempt < 1:
                raise MalformedMessageError(f"attempt: expected 1 or more, got {cmd.attempt}")
        except MalformedMessageError as exc:
            await self._dead_letter(message, "MalformedMessage", str(exc))
            return
        handler = self._registry.handler(cmd.type)
        if handler is None:
            served = ", ".join(self._registry.types())
            description = f"no handler for step type {cmd.type!r} here (serves: {served})"
            await self._dead_letter(message, "UnknownStepType", description)
            return
        if self._claim_check is not None:
            handler = _claim_checked(handler, self._claim_check)
        if deadline is not None and deadline <= self._clock():
            log.info("deadline passed before start, not running: %s", _who(cmd))
            await self._settler.settle(None, message)
            return
        result = await self._run(cmd, handler, message, received_at, deadline)
        await self._settler.settle(None if result is None else _event(cmd, result), message)

    async def _run(
        self,
        cmd: ExecuteStep,
        handler: Handler,
        message: ReceivedMessage,
        received_at: datetime,
        deadline: datetime | None,
    ) -> StepResult | None:
        """The attempt's result, or None when it ran past its deadline."""
        task = asyncio.current_task()
        assert task is not None
        attempt = _Attempt(self, cmd, message)
        ctx = StepContext(
            execution=cmd.execution,
            execution_id=cmd.execution_id,
            step=cmd.step,
            attempt=cmd.attempt,
            deadline=deadline,
            heartbeat=attempt.heartbeat,
            idempotency_key=cmd.attempt_id,
        )
        timeout = asyncio.timeout(self._seconds_left(deadline))
        lock_seconds = (message.locked_until - received_at).total_seconds()
        if lock_seconds > 0:
            attempt.keep_lock(max(lock_seconds * self._renew_fraction, MIN_RENEW_INTERVAL))
        self._running[task] = message
        try:
            async with timeout:
                output = await handler(cmd.input, ctx)
        except asyncio.CancelledError:
            if not task.cancelling():
                # The handler leaked a CancelledError of its own: a failure, not a shutdown.
                return _failed(cmd, "CancelledError", "handler raised CancelledError", True)
            self._to_abandon.append(message)
            log.info("cancelled at shutdown, will be redelivered: %s", _who(cmd))
            raise
        except TimeoutError as exc:
            if timeout.expired():
                log.warning("ran past its deadline, cancelled without a result: %s", _who(cmd))
                return None
            return _failed_from(cmd, exc)
        except Exception as exc:
            return _failed_from(cmd, exc)
        finally:
            del self._running[task]
            attempt.close()
        if output is None:
            output = {}
        if not isinstance(output, dict):
            kind = type(output).__name__
            return _failed(cmd, "InvalidOutput", f"handler returned {kind}, not a dict", False)
        return _result(cmd, "StepCompleted", output=output)

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


class _Attempt:
    """One running handler's heartbeats and lock renewals."""

    def __init__(self, worker: RunnerWorker, cmd: ExecuteStep, message: ReceivedMessage) -> None:
        self._worker = worker
        self._bus = worker._bus
        self._cmd = cmd
        self._message = message
        self._sequence = 0
        self._closed = False
        self._interval = 0.0
        self._timer: asyncio.TimerHandle | None = None

    async def heartbeat(self, details: dict[str, Any] | None = None) -> None:
        # The wire event has no field for `details`; it is accepted for the SDK's sake.
        # Heartbeats never raise into the handler: they are advisory, and a failed
        # one must not turn a healthy attempt into a failed one.
        if self._closed:
            return
        self._sequence += 1
        beat = _result(self._cmd, "StepHeartbeat", sequence=self._sequence)
        try:
            await self._bus.send([_event(self._cmd, beat)])
        except Exception as exc:
            log.warning("heartbeat send failed (%s): %s", exc, _who(self._cmd))
        await self._renew()

    def keep_lock(self, interval: float) -> None:
        # A timer, not a task per command: most handlers finish long before it fires.
        self._interval = interval
        self._timer = asyncio.get_running_loop().call_later(interval, self._fire)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()

    def _fire(self) -> None:
        if self._closed:
            return
        task = asyncio.create_task(self._renew(rearm=True))
        self._worker._background.add(task)
        task.add_done_callback(self._worker._background.discard)

    async def _renew(self, *, rearm: bool = False) -> None:
        try:
            await self._bus.renew_lock([self._message])
        except MessageLockLostError:
            log.warning("lock lost, the command may run twice: %s", _who(self._cmd))
            return
        except Exception as exc:
            log.warning("lock renewal failed (%s): %s", exc, _who(self._cmd))
        if rearm and not self._closed:
            self.keep_lock(self._interval)


# A finished attempt waiting to be settled: its event (if any), its command, a done signal.
def _event(cmd: ExecuteStep, result: StepResult) -> OutgoingMessage:
    try:
        body = result.encode()
    except (TypeError, ValueError) as exc:
        # Only a handler's output can fail to encode.
        result = _failed(cmd, "InvalidOutput", f"output is not JSON-serialisable: {exc}", False)
        body = result.encode()
    return OutgoingMessage(EVENTS_QUEUE, result.message_id, result.execution_id, body)


def _failed_from(cmd: ExecuteStep, exc: Exception) -> StepResult:
    if isinstance(exc, StepError):
        return _failed(cmd, exc.type, str(exc), exc.retryable)
    log.debug("handler traceback: %s", _who(cmd), exc_info=exc)
    return _failed(cmd, type(exc).__name__, str(exc) or type(exc).__name__, True)


def _failed(cmd: ExecuteStep, error_type: str, message: str, retryable: bool) -> StepResult:
    log.warning(
        "step failed: %s type=%s retryable=%s: %s", _who(cmd), error_type, retryable, message
    )
    return _result(
        cmd,
        "StepFailed",
        error_type=error_type,
        error_message=message[:MAX_ERROR_MESSAGE],
        retryable=retryable,
    )


def _result(cmd: ExecuteStep, kind: ResultKind, **fields: Any) -> StepResult:
    return StepResult(kind, cmd.execution_id, cmd.step, cmd.attempt, **fields)


def _who(cmd: ExecuteStep) -> str:
    return (
        f"execution={cmd.execution} id={cmd.execution_id} step={cmd.step} "
        f"attempt={cmd.attempt} type={cmd.type}"
    )


def _parse_deadline(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedMessageError("deadline: expected an ISO-8601 string or null")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise MalformedMessageError(f"deadline: {exc}") from exc
    # A deadline without an offset is taken as UTC, the orchestrator's clock.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# -- claim check: payloads by reference -----------------------------------------------
# Kept apart from the worker's delivery logic: a wrapper around the handler, so
# resolving and storing run inside the attempt exactly as the handler does, and
# their failures become StepFailed results through the usual path.

# What a reference that cannot be resolved means for the attempt: the same command
# can never succeed when its payload is gone or corrupt; a store that failed may work
# on the next attempt.
_UNUSABLE = {PayloadMissingError: "PayloadMissing", PayloadIntegrityError: "PayloadIntegrity"}


def _claim_checked(handler: Handler, claim_check: ClaimCheck) -> Handler:
    async def run(input: dict[str, Any], ctx: StepContext) -> dict[str, Any] | None:
        try:
            resolved = await claim_check.resolve(input)
        except Exception as exc:
            kind = next((t for c, t in _UNUSABLE.items() if isinstance(exc, c)), None)
            if kind is not None:
                raise PermanentError(f"step input: {exc}", type=kind) from exc
            raise RetryableError(f"step input: {exc}", type="PayloadUnavailable") from exc
        try:
            output = await handler(resolved, ctx)
        except Exception as exc:
            replacement = await _with_long_message_stored(exc, claim_check, ctx)
            if replacement is exc:
                raise
            raise replacement from exc
        if not isinstance(output, dict):
            return output  # the worker reports InvalidOutput
        try:
            return await claim_check.offload(output, f"{ctx.idempotency_key}/output")
        except (TypeError, ValueError):
            return output  # not JSON: the worker reports InvalidOutput when encoding
        except Exception as exc:
            raise RetryableError(
                f"storing the step output failed: {exc}", type="PayloadUnavailable"
            ) from exc

    return run


async def _with_long_message_stored(
    exc: Exception, claim_check: ClaimCheck, ctx: StepContext
) -> Exception:
    """`exc`, or when its message is too long for the event, a StepError of the same
    type and retryability whose message ends with the reference to the full text."""
    message = str(exc)
    if len(message) <= MAX_ERROR_MESSAGE:
        return exc
    try:
        marker = await claim_check.store_always(
            {"message": message}, f"{ctx.idempotency_key}/error"
        )
    except Exception as store_exc:
        log.warning("storing a long error message failed, truncating it: %s", store_exc)
        return exc
    ref = ref_of(marker)
    suffix = f" ... [full message, {ref.size} bytes: {ref.uri}]"
    short = message[: max(0, MAX_ERROR_MESSAGE - len(suffix))] + suffix
    if isinstance(exc, StepError):
        kind = RetryableError if exc.retryable else PermanentError
        return kind(short, type=exc.type)
    log.debug("handler traceback: %s", ctx.idempotency_key, exc_info=exc)
    return RetryableError(short, type=type(exc).__name__)
