"""The orchestrator's loops: consume result events, fire durable timers, relay the outbox.

Each loop turns what it receives into facts, runs the pure engine, and commits
the new states, history, timers, inbox records and the commands they cause in
ONE transaction. When the bus lives in the same database (`TransactionalBus`)
commands are written straight to its queue and consumed events are settled in
that transaction too; otherwise commands go to the outbox and the relay sends
them after commit (at-least-once; message ids are deterministic, so the runner
and the bus can drop duplicates).

Several events are folded into one transaction whenever they are waiting: the
database's commit rate, not Python, is what bounds throughput.

With a `ClaimCheck`, a dispatched step's rendered input that is too large for a
message is stored by reference (`<attempt>/input`) as its command is built; state
is not touched. Step outputs that arrive as references are kept in state as
references, so execution rows stay small.

Faults, and where they are handled:
- a batch that fails to apply because one message in it cannot be applied is split:
  the others are applied, the bad one fails its own step (`faults.py`);
- dead-lettered commands and results fail the step they belong to (`faults.py`);
- the database going away: every loop waits for it through one `OutageWatch`
  (logged once per outage) and resumes; a batch in hand is applied again after the
  outage, so a quick restart costs no redelivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import asyncpg

from sagaflow.adapters.postgres.errors import database_unavailable
from sagaflow.adapters.postgres.store import (
    Applied,
    PostgresStore,
)
from sagaflow.core.engine import Decision, decide
from sagaflow.core.facts import (
    Cancel,
    Control,
    Fact,
    StepCompleted,
    StepFailed,
    StepHeartbeat,
    TimerFired,
)
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.messages import (
    EVENTS_QUEUE,
    ExecuteStep,
    MalformedMessageError,
    SignalMessage,
    StepResult,
    attempt_id,
    commands_queue,
    decode_event,
)
from sagaflow.core.ports import (
    Bus,
    Clock,
    MessageLockLostError,
    OutgoingMessage,
    ReceivedMessage,
    TransactionalBus,
    utc_now,
)
from sagaflow.core.state import ExecutionState
from sagaflow.runtime import admission, children, control, faults, signals, starts
from sagaflow.runtime.claimcheck import ClaimCheck
from sagaflow.runtime.gauges import DEFAULT_INTERVAL
from sagaflow.runtime.loops import run_loops
from sagaflow.runtime.outages import OutageWatch
from sagaflow.runtime.starts import StartRequest as StartRequest
from sagaflow.telemetry import metrics, observe, tracing

log = logging.getLogger("sagaflow.orchestrator")


def result_fact(result: StepResult) -> Fact:
    undo = result.compensation
    if result.kind == "StepCompleted":
        return StepCompleted(result.step, result.attempt, result.output or {}, undo)
    if result.kind == "StepFailed":
        return StepFailed(
            result.step,
            result.attempt,
            result.error_type or "Error",
            result.error_message or "",
            result.retryable,
            undo,
        )
    return StepHeartbeat(result.step, result.attempt, undo)


def command_messages(state: ExecutionState, decision: Decision) -> list[OutgoingMessage]:
    """Commands for the steps a decision dispatched.

    The session is the step (`<execution>/<step>`), not the whole execution: a
    step's attempts stay in order while parallel branches of one execution run on
    different runners at once.
    """
    messages = []
    for d in decision.dispatches:
        if d.workflow is not None:
            continue  # a child execution, started in the transaction (`children.py`)
        command = ExecuteStep(
            execution_id=state.execution_id,
            execution=state.key,
            step=d.step,
            attempt=d.attempt,
            type=d.type,
            input=d.input,
            deadline=d.deadline.isoformat() if d.deadline else None,
            heartbeat_timeout=d.heartbeat_timeout,
            compensation=d.compensation,
        )
        messages.append(
            OutgoingMessage(
                queue=commands_queue(d.type),
                message_id=command.attempt_id,
                session_id=f"{state.execution_id}/{d.step}",
                body=command.encode(),
                headers=tracing.step_headers(state, command),
            )
        )
    return messages


@dataclass
class _Transaction:
    conn: Any = None
    states: list[ExecutionState] = field(default_factory=list)
    # The decisions committed, with the message each consumed: counted once it commits.
    counted: list[tuple[Decision, str | None]] = field(default_factory=list)


class Orchestrator:
    def __init__(
        self,
        store: PostgresStore,
        bus: Bus,
        *,
        clock: Clock = utc_now,
        batch_size: int = 256,
        idle_wait: float = 5.0,
        consumers: int = 2,
        claim_check: ClaimCheck | None = None,
        outages: OutageWatch | None = None,
        gauge_interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self.batch_size = batch_size
        self.idle_wait = idle_wait
        # More than one consumer keeps a batch in flight while the next is received;
        # session locks and row locks keep them off each other's executions.
        self.consumers = consumers
        self.transactional = isinstance(bus, TransactionalBus)
        self.claim_check = claim_check
        self.outages = outages or database_watch(store.pool)
        self.gauge_interval = gauge_interval  # seconds between gauge samples; 0: none

    @property
    def pool(self) -> asyncpg.Pool:
        return self.store.pool

    # -- use cases -------------------------------------------------------------------
    async def apply_workflow(
        self, namespace: str, name: str, spec: WorkflowSpec
    ) -> tuple[int, bool]:
        async with self.pool.acquire() as conn:
            return await self.store.put_workflow(conn, namespace, name, spec, self.clock())

    async def retire_workflow(self, namespace: str, name: str) -> None:
        async with self.pool.acquire() as conn:
            await self.store.retire_workflow(conn, namespace, name)

    async def start(
        self,
        namespace: str,
        name: str,
        workflow: str,
        input: dict[str, Any],
        *,
        execution_id: str | None = None,
        suspend: bool = False,
    ) -> tuple[ExecutionState, bool]:
        """Start an execution once (`starts.start`): (its state, whether it started now)."""
        request = StartRequest(namespace, name, workflow, input, suspend=suspend)
        return await starts.start(self, request, execution_id)

    async def start_many(self, requests: Sequence[StartRequest]) -> list[ExecutionState]:
        """Start many executions by name in one transaction (`starts.start_many`)."""
        return await starts.start_many(self, requests)

    async def control(
        self,
        namespace: str,
        name: str,
        fact: Control,
        request_id: str,
        *,
        execution_id: str | None = None,
    ) -> control.Outcome | None:
        """Apply a control request once per `request_id` (`control.py`); None if unknown."""
        return await control.request(
            self, namespace, name, fact, request_id, execution_id=execution_id
        )

    async def signal(self, signal: SignalMessage, signal_id: str) -> signals.SignalOutcome:
        """Deliver a signal to the execution it names, once per id (`signals.py`)."""
        return await signals.deliver(self, signal, signal_id)

    async def cancel(
        self, namespace: str, name: str, reason: str, *, execution_id: str | None = None
    ) -> ExecutionState | None:
        """Cancel an execution (compensating per the workflow's policy). None if unknown."""
        outcome = await self.control(
            namespace, name, Cancel(reason), control.request_id(), execution_id=execution_id
        )
        return None if outcome is None else outcome.state

    # -- one pass of each loop ---------------------------------------------------------
    async def consume_once(self, max_wait: float) -> int:
        """Receive a batch of result events and apply them in one transaction.

        A batch that fails for want of the database is applied again once it is back;
        one that fails otherwise is applied message by message, so a message that
        cannot be applied fails its own step and no other (`faults.isolate`)."""
        received = await self.bus.receive(
            EVENTS_QUEUE, max_messages=self.batch_size, max_wait=max_wait
        )
        if not received:
            return 0
        parsed: list[tuple[ReceivedMessage, StepResult]] = []
        signalled: list[tuple[ReceivedMessage, SignalMessage]] = []
        for msg in received:
            try:
                event = decode_event(msg.body)
            except MalformedMessageError as exc:
                log.warning("dead-lettering malformed event %s: %s", msg.message_id, exc)
                await self.bus.dead_letter(msg, reason="MalformedMessage", description=str(exc))
                continue
            if isinstance(event, SignalMessage):
                signalled.append((msg, event))
            else:
                parsed.append((msg, event))
        for msg, event in signalled:  # rare next to results: each in a transaction of its own
            await signals.consume(self, msg, event)
        if not parsed:
            return len(signalled)
        try:
            await self.apply_batch(parsed)
        except MessageLockLostError:
            log.info("lost the locks of %d events; they are delivered again", len(parsed))
            return 0
        except Exception as exc:
            if self.outages.failed(exc):
                raise  # the loop waits for the database; the locks expire or are reused
            log.warning(
                "applying %d events together failed (%s); applying them one by one",
                len(parsed),
                exc,
            )
            await faults.isolate(self, parsed)
        return len(parsed)

    async def apply_batch(self, parsed: Sequence[tuple[ReceivedMessage, StepResult]]) -> None:
        """Apply and settle received events; through an outage, again once it is over."""
        settle = [m for m, _ in parsed]
        while True:
            try:
                await self._apply_events(parsed, settle)
                break
            except Exception as exc:
                if not await self.outages.retry(exc):
                    raise
        if not self.transactional:
            await self.bus.complete(settle)

    async def _apply_events(
        self,
        parsed: Sequence[tuple[ReceivedMessage, StepResult]],
        settle: Sequence[ReceivedMessage],
    ) -> None:
        now = self.clock()
        async with self._transaction("events") as tx:
            conn = tx.conn
            fresh = await self.store.claim_inbox(
                conn, [(m.message_id, r.execution_id) for m, r in parsed], now
            )
            applying = [m for m, _ in parsed if m.message_id in fresh]
            traces = {m.message_id: m.headers for m in applying}
            by_execution: dict[str, list[tuple[str, StepResult]]] = defaultdict(list)
            for msg, result in parsed:
                if msg.message_id in fresh:
                    fresh.discard(msg.message_id)
                    by_execution[result.execution_id].append((msg.message_id, result))
            states = await self.store.lock_executions(conn, by_execution)
            applied: list[Applied] = []
            unknown: list[tuple[str, str]] = []
            for eid, items in by_execution.items():
                state = states.get(eid)
                if state is None:
                    unknown += [
                        (message_id, "ignored: unknown execution") for message_id, _ in items
                    ]
                    continue
                definition = await self.store.definition(
                    conn, state.namespace, state.workflow, state.version
                )
                for message_id, result in items:
                    fact = result_fact(result)
                    with tracing.applying(state, result, traces.get(message_id)):
                        decision = decide(state, definition, fact, now)
                    state = decision.state
                    cause = f"message:{message_id}"
                    applied.append(Applied(eid, decision, message_id, fact=fact, cause=cause))
            if unknown:
                log.warning("%d event(s) for executions that do not exist ignored", len(unknown))
                await self.store.record_outcomes(conn, unknown)
            await self._commit(tx, applied, now)
            if self.transactional:
                await self.bus.complete_in(conn, settle)  # type: ignore[attr-defined]
        if len(applying) < len(parsed):
            metrics.INBOX_DUPLICATES.labels("events").inc(len(parsed) - len(applying))
        committed = utc_now()  # the wall clock: enqueue times are the bus's wall clock
        for message in applying:
            metrics.ORCHESTRATOR_HOP.observe(observe.seconds_since(message.enqueued_at, committed))

    async def fire_timers_once(self) -> int:
        """Apply every due timer of executions no other replica is working on."""
        now = self.clock()
        async with self._transaction("timers") as tx:
            conn = tx.conn
            ids = await self.store.due_timer_executions(conn, now, self.batch_size)
            if not ids:
                return 0
            states = await self.store.lock_executions(conn, ids, skip_locked=True)
            timers = await self.store.take_due_timers(conn, list(states), now)
            applied: list[Applied] = []
            for timer in timers:
                state = states[timer.execution_id]
                definition = await self.store.definition(
                    conn, state.namespace, state.workflow, state.version
                )
                fact = TimerFired(timer.kind, timer.step, timer.attempt)  # type: ignore[arg-type]
                decision = decide(state, definition, fact, now)
                states[timer.execution_id] = decision.state
                cause = f"timer:{timer.key}"
                applied.append(Applied(timer.execution_id, decision, fact=fact, cause=cause))
            await self._commit(tx, applied, now)
            return len(timers)

    async def relay_once(self) -> int:
        """Send outbox rows to the bus, then delete them (at-least-once)."""
        async with self.pool.acquire() as conn, conn.transaction():
            seqs, messages = await self.store.take_outbox(conn, self.batch_size)
            if messages:
                await self.bus.send(messages)
                await self.store.delete_outbox(conn, seqs)
            return len(messages)

    @asynccontextmanager
    async def _transaction(self, loop: str = "other") -> AsyncIterator[_Transaction]:
        """One transaction; states it saved are remembered by the store, and its
        decisions counted (`telemetry.observe`), once it commits. `loop` names what
        ran it in the transaction duration histogram."""
        tx = _Transaction()
        began = time.perf_counter()
        # Spans made in the transaction are exported only if it commits.
        with tracing.deferred():
            async with self.pool.acquire() as conn, conn.transaction():
                tx.conn = conn
                yield tx
        metrics.TRANSACTION_DURATION.labels(loop).observe(time.perf_counter() - began)
        self.store.remember(tx.states)
        observe.transitions(tx.counted)

    async def _commit(self, tx: _Transaction, applied: Sequence[Applied], now: datetime) -> None:
        conn = tx.conn
        # Runs of limited workflows that finish free slots: the oldest waiting runs start
        # in this transaction, their decisions carried out with the others (`admission.py`).
        applied = [*applied, *await admission.admit_freed_slots(self, tx, applied, now)]
        # Child executions these decisions start or control, and theirs, in this
        # transaction; a child's end goes to its parent as an event (`children.py`).
        applied, events = list(applied), []
        more = applied
        while more:
            more, sent = await children.carry_out(self, conn, more, now)
            applied += more
            events += sent
        await self.store.save(conn, applied, now)
        tx.counted.extend((a.decision, a.message_id) for a in applied)
        tx.states.extend(a.decision.state for a in applied if a.decision.applied)
        decisions = [a.decision for a in applied if a.decision.applied]
        if self.claim_check is not None:
            decisions = [await self._offload_inputs(d) for d in decisions]
        commands = [m for d in decisions for m in command_messages(d.state, d)] + events
        if not commands:
            return
        if self.transactional:
            await self.bus.send_in(conn, commands)  # type: ignore[attr-defined]
        else:
            await self.store.add_outbox(conn, commands, now)

    async def _offload_inputs(self, decision: Decision) -> Decision:
        """The decision with each dispatch's input stored by reference if it is large.

        Runs inside the transaction, so a rollback may leave a stored input behind:
        its key is the attempt's, and the retried transaction writes the same key.
        """
        if self.claim_check is None or not decision.dispatches:
            return decision
        eid = decision.state.execution_id
        dispatches = [
            replace(
                d,
                input=await self.claim_check.offload(
                    d.input, f"{attempt_id(eid, d.step, d.attempt, d.compensation)}/input"
                ),
            )
            for d in decision.dispatches
        ]
        return replace(decision, dispatches=tuple(dispatches))

    async def dead_letters_once(self) -> int:
        """Fail the steps whose commands or results were dead-lettered (`faults.py`)."""
        return await faults.handle_dead_letters(self)

    # -- the loops -------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, dsn: str) -> None:
        """Run every loop (`loops.py`) until `stop` is set."""
        await run_loops(self, stop, dsn)


def database_watch(pool: asyncpg.Pool) -> OutageWatch:
    """The outage watch of a process whose state is in `pool`'s database."""

    async def probe() -> None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    return OutageWatch("the database", probe, database_unavailable)
