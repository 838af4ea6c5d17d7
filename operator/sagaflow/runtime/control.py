"""Control requests against stored executions: suspend, resume, cancel, redrive, skip.

A request is applied like an event: in one transaction with its effect (the new
state, history, timers and the commands it causes), recorded in the inbox under
its request id, so the same request delivered twice is applied once. The cluster
names a request after the spec change that caused it (uid and generation); the CLI
gives each invocation its own id.

`apply_one` is the single-fact transaction the fault handling uses too.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sagaflow.adapters.postgres.store import Applied
from sagaflow.core.decisions import Decision
from sagaflow.core.engine import decide
from sagaflow.core.facts import Control, Fact, Redrive, SignalReceived
from sagaflow.core.ports import ReceivedMessage
from sagaflow.core.state import ExecutionState
from sagaflow.telemetry import metrics, tracing

if TYPE_CHECKING:
    from sagaflow.runtime.orchestrator import Orchestrator


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a request: `applied` (took effect), `noop` (its effect already
    held, or the request was seen before) or `refused`; `message` says why."""

    state: ExecutionState
    result: str
    message: str


def request_id() -> str:
    """A fresh id for a request from a person (each CLI invocation is one request)."""
    return f"request/{uuid.uuid4()}"


async def request(
    o: Orchestrator,
    namespace: str,
    name: str,
    fact: Control,
    request_id: str,
    *,
    execution_id: str | None = None,
) -> Outcome | None:
    """Apply a control request to the execution named (or with this id); None if unknown."""
    async with o.pool.acquire() as conn:
        if execution_id is not None:
            found = await o.store.get_execution_by_id(conn, execution_id)
        else:
            found = await o.store.get_execution(conn, namespace, name)
    if found is None:
        return None
    decision, fresh = await apply_one(o, found.execution_id, fact, request_id)
    if decision is None:
        return None
    if not fresh:
        return Outcome(decision.state, "noop", "this request was applied before")
    if not decision.applied:
        return Outcome(decision.state, "noop", decision.ignored or "")
    answer = decision.state.request
    message = answer.message if answer is not None else ""
    if any(r.kind == "RequestRefused" for r in decision.records):
        return Outcome(decision.state, "refused", message)
    return Outcome(decision.state, "applied", message)


async def apply_one(
    o: Orchestrator,
    execution_id: str,
    fact: Fact,
    inbox_id: str,
    settle: Sequence[ReceivedMessage] = (),
) -> tuple[Decision | None, bool]:
    """Apply `fact` to its execution in a transaction of its own, recorded in the inbox
    under `inbox_id` and settling `settle`: (the decision, None for an unknown
    execution; whether the id was new). A redrive with `to_latest` is decided over
    the workflow's current version."""
    now = o.clock()
    decision: Decision | None = None
    async with o._transaction("control") as tx:
        conn = tx.conn
        fresh = await o.store.claim_inbox(conn, [(inbox_id, execution_id)], now)
        states = await o.store.lock_executions(conn, [execution_id])
        state = states.get(execution_id)
        if fresh and state is None:
            await o.store.record_outcomes(conn, [(inbox_id, "ignored: unknown execution")])
        elif state is not None:
            version = state.version
            if isinstance(fact, Redrive) and fact.to_latest:
                current = await o.store.current_version(conn, state.namespace, state.workflow)
                version = state.version if current is None else current
            definition = await o.store.definition(conn, state.namespace, state.workflow, version)
            if fresh:
                named = {"signal": fact.name} if isinstance(fact, SignalReceived) else {}
                with tracing.requested(state, type(fact).__name__, inbox_id, **named):
                    decision = decide(state, definition, fact, now)
                cause = (
                    f"signal:{fact.signal_id}"
                    if isinstance(fact, SignalReceived)
                    else f"request:{inbox_id}"
                )
                applied = Applied(execution_id, decision, inbox_id, fact=fact, cause=cause)
                await o._commit(tx, [applied], now)
            else:
                decision = Decision(state=state, ignored="seen before")
        if o.transactional:
            await o.bus.complete_in(conn, settle)  # type: ignore[attr-defined]
    if not o.transactional and settle:
        await o.bus.complete(settle)
    if not fresh:
        source = "signals" if inbox_id.startswith("signal/") else "control"
        metrics.INBOX_DUPLICATES.labels(source).inc()
    return decision, bool(fresh)
