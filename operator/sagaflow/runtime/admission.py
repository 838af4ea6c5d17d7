"""Admission under concurrency limits: the I/O around `sagaflow.core.admission`.

`spec.concurrency.maxExecutions` caps the executions of a workflow per namespace that
hold a slot (started, not finished). This module owns when waiting executions start:

- at a start (`Gate`, used by `starts.py`): the new execution starts if there is a slot
  and nobody waits before it; otherwise it is stored Pending with the reason and put at
  the end of the workflow's queue;
- when an execution of a limited workflow finishes (`admit_freed_slots`, called by the
  orchestrator in the transaction that finishes it, before it saves): the oldest
  waiting ones start in that same transaction, their decisions saved and carried out
  with the others, so their first commands commit with the finish;
- in a pass over every queue (`sweep`, at start-up and every `SWEEP_SECONDS` in
  `sagaflow run` and the operator, and when a Workflow is applied): for a raised or
  removed limit, and for the corners a finish does not reach (a limit added to a
  workflow whose runs in flight started without one).

Every one of these takes the transaction-level advisory lock of the (namespace,
workflow) before it counts, so two replicas never see the same free slot. Workflows
without a limit take no lock and pay nothing: a finish only looks at the definition
it has cached. The limit that applies is the one of the workflow's current version
(the pinned one of the waiting execution if the Workflow was deleted); a waiting
execution starts on the version it was pinned to when it was requested. A redrive
restarts a Failed run whatever the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sagaflow.adapters.postgres import admission_sql as sql
from sagaflow.adapters.postgres.store import Applied
from sagaflow.core import admission as rules
from sagaflow.core.definition import Definition
from sagaflow.core.engine import decide
from sagaflow.core.fact_codec import Transition
from sagaflow.core.facts import Start
from sagaflow.core.manifests import ExecutionPhase
from sagaflow.core.state import ExecutionState

if TYPE_CHECKING:
    from sagaflow.runtime.orchestrator import Orchestrator

log = logging.getLogger("sagaflow.admission")

SWEEP_SECONDS = 10.0
Key = tuple[str, str]  # (namespace, workflow)


@dataclass
class _Lane:
    """One limited workflow in a transaction that holds its lock."""

    namespace: str
    workflow: str
    limit: int | None  # None: the limit was removed; the waiting ones go
    running: int
    queued: bool = True  # executions still wait (until the queue is seen to run dry)


class Gate:
    """The concurrency limits met by one transaction that starts or admits executions.

    In order: `lock` the limited workflows (before inserting rows, so a transaction
    never waits for a lock while holding one of those rows), `admit_waiting`, `place`
    each new execution, `enqueue` the ones that wait; then save every decision.
    """

    def __init__(
        self,
        o: Orchestrator,
        conn: Any,
        now: datetime,
        unsaved: Mapping[str, ExecutionState] | None = None,
    ) -> None:
        """`unsaved`: states this transaction has decided but not written yet, by id;
        slots are counted, and waiting runs taken, as if they were written."""
        self._o, self._conn, self._now = o, conn, now
        self._unsaved = dict(unsaved or {})
        self._limits: dict[Key, int | None] = {}
        self._lanes: dict[Key, _Lane] = {}
        self._queue: list[tuple[str, str, str, bool]] = []

    async def lock(self, limits: Mapping[Key, int | None]) -> None:
        await sql.lock_workflows(self._conn, limits)
        self._limits.update(limits)

    async def admit_waiting(self, budget: int) -> list[Applied]:
        """Start the waiting executions there are slots for, oldest first (at most
        `budget` in all); the decisions, not yet saved."""
        out: list[Applied] = []
        for key in sorted(self._limits):
            running = await self._running(key)
            lane = _Lane(key[0], key[1], self._limits[key], running)
            self._lanes[key] = lane
            out += await self._admit(lane, budget - len(out))
        return out

    async def _admit(self, lane: _Lane, budget: int) -> list[Applied]:
        out: list[Applied] = []
        while budget > 0:
            free = rules.room(lane.limit, lane.running)
            want = budget if free is None else min(free, budget)
            if want == 0:
                break
            taken = await sql.take_waiting(self._conn, lane.namespace, lane.workflow, want)
            lane.queued = len(taken) == want
            budget -= len(taken)
            for item in taken:
                state = self._unsaved.get(item.state.execution_id, item.state)
                if state.phase is not ExecutionPhase.PENDING:
                    continue  # cancelled while it waited: off the queue, nothing to start
                definition = await self._definition(state)
                limit, running = lane.limit, lane.running
                decision = rules.admit(
                    state, definition, item.suspend, self._now, limit=limit, running=running
                )
                fact = rules.Admitted(item.suspend, limit, running)
                out.append(Applied(state.execution_id, decision, fact=fact, cause="admission"))
                # One that ended at once (nothing to run) leaves the slot free.
                lane.running += rules.holds_slot(decision.state.phase)
            if not lane.queued:
                break
        return out

    async def _running(self, key: Key) -> int:
        """Slots taken in the workflow, counting this transaction's unsaved states."""
        running = await sql.running_count(self._conn, *key)
        mine = {i: s for i, s in self._unsaved.items() if (s.namespace, s.workflow) == key}
        if mine:
            stored = await sql.phases(self._conn, list(mine))
            for execution_id, state in mine.items():
                before = ExecutionPhase(stored.get(execution_id, ExecutionPhase.PENDING))
                running += rules.holds_slot(state.phase) - rules.holds_slot(before)
        return running

    def place(
        self, state: ExecutionState, definition: Definition, suspend: bool, cause: str = "start"
    ) -> Applied:
        """Start a new execution, or make it wait if its workflow has no slot for it."""
        lane = self._lanes.get((state.namespace, state.workflow))
        reason = None
        if lane is not None and lane.limit is not None:
            reason = rules.wait_reason(state.workflow, lane.limit, lane.running, queued=lane.queued)
        if lane is None or reason is None:
            decision = decide(state, definition, Start(suspend), self._now)
            if lane is not None:
                lane.running += rules.holds_slot(decision.state.phase)
            fact: Transition = Start(suspend)
        else:
            lane.queued = True
            self._queue.append((state.execution_id, state.namespace, state.workflow, suspend))
            decision, fact = rules.wait(state, reason), rules.Waited(reason)
        return Applied(state.execution_id, decision, fact=fact, cause=cause, initial=state)

    async def enqueue(self) -> None:
        """Queue the executions `place` made wait, in the order they were placed."""
        await sql.enqueue(self._conn, self._queue, self._now)
        self._queue.clear()

    async def _definition(self, state: ExecutionState) -> Definition:
        return await self._o.store.definition(
            self._conn, state.namespace, state.workflow, state.version
        )


async def admit_freed_slots(
    o: Orchestrator, tx: Any, applied: Sequence[Applied], now: datetime
) -> list[Applied]:
    """In the transaction of `applied`, before it is saved: executions of limited
    workflows that finish in it let the oldest waiting ones start. Their decisions are
    returned, to be saved and carried out (commands, children) with the others."""
    conn = tx.conn
    finished: dict[Key, int] = {}
    finals: dict[str, ExecutionState] = {}
    for item in applied:
        if not item.decision.applied:
            continue
        state = finals[item.execution_id] = item.decision.state
        key = (state.namespace, state.workflow)
        if not state.phase.is_terminal or key in finished:
            continue
        definition = await o.store.definition(conn, *key, state.version)  # cached
        if definition.max_executions is not None:
            finished[key] = definition.max_executions
    if not finished:
        return []
    gate = Gate(o, conn, now, finals)
    await gate.lock(
        {key: await _current_limit(o, conn, key, limit) for key, limit in finished.items()}
    )
    return await gate.admit_waiting(o.batch_size)


async def sweep(o: Orchestrator, keys: Collection[Key] | None = None) -> int:
    """Start the waiting executions there are slots for, in every queue (or those of
    `keys`), in one transaction; how many started."""
    now = o.clock()
    async with o._transaction("admission") as tx:
        conn = tx.conn
        queued = [k for k in await sql.queued_workflows(conn) if keys is None or k in keys]
        limits: dict[Key, int | None] = {}
        for key in queued:
            limits[key] = await _current_limit(o, conn, key, None, pinned_head=True)
        if not limits:
            return 0
        gate = Gate(o, conn, now)
        await gate.lock(limits)
        admitted = await gate.admit_waiting(o.batch_size)
        if admitted:
            await o._commit(tx, admitted, now)
    return len(admitted)


async def sweep_every(o: Orchestrator, stop: asyncio.Event, seconds: float = SWEEP_SECONDS) -> None:
    """`sweep` now and every `seconds` until `stop` is set; through outages, and past
    errors (logged), since it is a safety net beside the admissions at each finish."""
    while not stop.is_set():
        try:
            started = await sweep(o)
            if started:
                log.info("admission pass started %d waiting execution(s)", started)
        except Exception as exc:
            if not await o.outages.retry(exc):
                log.exception("admission pass failed; trying again in %gs", seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)


async def _current_limit(
    o: Orchestrator, conn: Any, key: Key, fallback: int | None, *, pinned_head: bool = False
) -> int | None:
    """The limit of the workflow's current version; of a deleted Workflow, `fallback`
    (or with `pinned_head`, that of the version the oldest waiting run is pinned to)."""
    version = await o.store.current_version(conn, *key)
    if version is None and pinned_head:
        version = await sql.head_version(conn, *key)
    if version is None:
        return fallback
    return (await o.store.definition(conn, *key, version)).max_executions
