"""Carrying out child workflows in the transaction that decided them (`core/children.py`).

In the parent's transaction, for each applied decision:
- a child dispatch starts the child execution: its id derives from the parent's
  attempt id (uuid5), so the same attempt never starts two children; it runs on the
  child Workflow's current version, named `<parent>-<step>-<attempt>`, and waits for
  a slot under that workflow's concurrency limit like any other execution of it (a
  workflow whose runs call it again under a limit of its own can wait on itself);
- a child undo applies `Compensate` to the child; a child that is not Completed
  (it undid itself, or never finished) is answered at once;
- a child control (Cancel, Suspend, Resume) is applied to the child.
Children are locked after their parent, never the other way round: a child's end
reaches its parent as a result event on the events queue (message id
`<parent attempt id>/result`, like a runner's), through the outbox, so the two
transactions never wait on each other. Those events are returned with the
children's decisions, which the caller saves with its own.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sagaflow.adapters.postgres.store import Applied
from sagaflow.core.children import CHILD_ATTEMPT
from sagaflow.core.decisions import ChildControl, Decision, Dispatch
from sagaflow.core.definition import CHILD, Definition
from sagaflow.core.engine import decide
from sagaflow.core.facts import Cancel, Compensate, Control, Resume, Start, Suspend
from sagaflow.core.links import Parent
from sagaflow.core.manifests import ExecutionPhase
from sagaflow.core.messages import EVENTS_QUEUE, StepResult, attempt_id
from sagaflow.core.ports import OutgoingMessage
from sagaflow.core.state import ExecutionState, new_execution
from sagaflow.runtime.admission import Gate
from sagaflow.telemetry import tracing

if TYPE_CHECKING:
    import asyncpg

    from sagaflow.runtime.orchestrator import Orchestrator

_NAMESPACE = uuid.UUID("6d0f2f4e-39a4-4b8e-9a55-0c1a9e1b7c21")  # child ids: uuid5 under this
# History kinds after which a child is at rest for good: its parent hears of it.
_ENDINGS = frozenset(
    {
        "ExecutionCompleted",
        "ExecutionFailed",
        "ExecutionCancelled",
        "ExecutionCompensated",
        "ExecutionCompensationFailed",
        "FinallyCompleted",
        "FinallyFailed",
    }
)
_CONTROLS: dict[str, Control] = {
    "Cancel": Cancel("the parent execution was cancelled"),
    "Suspend": Suspend(),
    "Resume": Resume(),
}


def child_id(parent_id: str, step: str, attempt: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, attempt_id(parent_id, step, attempt)))


def child_name(parent: str, step: str, attempt: int) -> str:
    """A DNS label-ish name: `<parent>-<step>-<attempt>`, shortened with a hash if long."""
    slug = re.sub(r"[^a-z0-9-]+", "-", step.lower()).strip("-") or "step"
    name = f"{parent}-{slug}-{attempt}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[:242]}-{digest}"


async def carry_out(
    o: Orchestrator, conn: asyncpg.Connection, applied: Sequence[Applied], now: datetime
) -> tuple[list[Applied], list[OutgoingMessage]]:
    """The children's decisions these decisions cause, and events for parents."""
    more: list[Applied] = []
    events: list[OutgoingMessage] = []
    starts: list[tuple[ExecutionState, Dispatch]] = []
    for item in applied:
        decision = item.decision
        if not decision.applied:
            continue
        state = decision.state
        for d in decision.dispatches:
            if d.type != CHILD:
                continue
            if d.compensation:
                more += await _undo(o, conn, state, d, now, events)
            else:
                starts.append((state, d))
        for c in decision.child_controls:
            more += await _control(o, conn, state, c, now)
        ended = _parent_event(state, decision)
        if ended is not None:
            events.append(ended)
    if starts:
        unsaved = {a.execution_id: a.decision.state for a in applied}
        more += await _start(o, conn, starts, unsaved, now, events)
    return more, events


async def _start(
    o: Orchestrator,
    conn: asyncpg.Connection,
    starts: Sequence[tuple[ExecutionState, Dispatch]],
    unsaved: dict[str, ExecutionState],
    now: datetime,
    events: list[OutgoingMessage],
) -> list[Applied]:
    """Start the children of these dispatches; the ones whose workflow has a
    concurrency limit wait for a slot like any execution of it (`admission.py`),
    counted together, so two children started at once do not share one slot."""
    new: list[tuple[ExecutionState, Definition]] = []
    for parent, d in starts:
        assert d.workflow is not None
        version = await o.store.current_version(conn, parent.namespace, d.workflow)
        if version is None:
            # Retryable: under GitOps the child Workflow may land a moment after the parent.
            message = f"workflow {parent.namespace}/{d.workflow} does not exist (yet)"
            events.append(
                _result(
                    parent.execution_id,
                    d.step,
                    d.attempt,
                    False,
                    failed=message,
                    kind="UnknownWorkflow",
                )
            )
            continue
        definition = await o.store.definition(conn, parent.namespace, d.workflow, version)
        new.append((_child_state(parent, d, version, definition), definition))
    gate = Gate(o, conn, now, unsaved)
    limits = {
        (s.namespace, s.workflow): d.max_executions for s, d in new if d.max_executions is not None
    }
    if limits:
        await gate.lock(limits)  # before the rows are inserted, as every start does
    inserted = await o.store.insert_executions(conn, [s for s, _ in new], now)
    fresh = [(s, d) for s, d in new if s.execution_id in inserted]  # else: started before
    await conn.executemany(
        "INSERT INTO sagaflow_children (execution_id, parent_id, created_at) VALUES ($1, $2, $3)",
        [(s.execution_id, s.parent.execution_id if s.parent else "", now) for s, _ in fresh],
    )
    out = await gate.admit_waiting(o.batch_size) if limits else []
    for state, definition in fresh:
        if definition.max_executions is None:
            start = Start()
            decision = decide(state, definition, start, now)
            cause = _cause(state)
            out.append(
                Applied(state.execution_id, decision, fact=start, cause=cause, initial=state)
            )
        else:
            out.append(gate.place(state, definition, False, _cause(state)))
    if limits:
        await gate.enqueue()
    return out


def _child_state(
    parent: ExecutionState, d: Dispatch, version: int, definition: Definition
) -> ExecutionState:
    assert d.workflow is not None
    depth = parent.parent.depth + 1 if parent.parent is not None else 1
    state = new_execution(
        execution_id=child_id(parent.execution_id, d.step, d.attempt),
        namespace=parent.namespace,
        name=child_name(parent.name, d.step, d.attempt),
        workflow=d.workflow,
        version=version,
        input=d.input,
        step_names=definition.step_names,
    )
    link = Parent(parent.execution_id, parent.namespace, parent.name, d.step, d.attempt, depth)
    # The child's trace is its parent's: one tree for the whole family.
    trace = tracing.start_execution(state, parent=parent.traceparent)
    return replace(state, parent=link, traceparent=trace)


async def _undo(
    o: Orchestrator,
    conn: asyncpg.Connection,
    parent: ExecutionState,
    d: Dispatch,
    now: datetime,
    events: list[OutgoingMessage],
) -> list[Applied]:
    forward_attempt = int(d.input.get(CHILD_ATTEMPT, 0))
    cid = child_id(parent.execution_id, d.step, forward_attempt)
    child = (await o.store.lock_executions(conn, [cid])).get(cid)
    if child is None or child.phase is not ExecutionPhase.COMPLETED:
        how = "never ran" if child is None else f"ended {child.phase.value}"
        output = {"child": None if child is None else child.key, "undone": f"nothing: it {how}"}
        events.append(_result(parent.execution_id, d.step, d.attempt, True, output=output))
        return []
    definition = await o.store.definition(conn, child.namespace, child.workflow, child.version)
    fact = Compensate(d.attempt)
    return [Applied(cid, decide(child, definition, fact, now), fact=fact, cause=_cause(child))]


async def _control(
    o: Orchestrator,
    conn: asyncpg.Connection,
    parent: ExecutionState,
    c: ChildControl,
    now: datetime,
) -> list[Applied]:
    cid = child_id(parent.execution_id, c.step, c.attempt)
    child = (await o.store.lock_executions(conn, [cid])).get(cid)
    if child is None:
        return []
    definition = await o.store.definition(conn, child.namespace, child.workflow, child.version)
    fact = _CONTROLS[c.kind]
    return [Applied(cid, decide(child, definition, fact, now), fact=fact, cause=_cause(child))]


def _cause(child: ExecutionState) -> str:
    """A child's transitions are caused by its parent's step attempt."""
    p = child.parent
    return "parent" if p is None else f"parent:{p.namespace}/{p.name}/{p.step}/{p.attempt}"


def _parent_event(state: ExecutionState, decision: Decision) -> OutgoingMessage | None:
    """The result a child's end gives its parent's attempt (or its parent's undo)."""
    parent = state.parent
    if parent is None or not state.at_rest or state.phase is ExecutionPhase.SUSPENDED:
        return None
    if not any(r.kind in _ENDINGS for r in decision.records):
        return None
    phase = state.phase
    if parent.undo_attempt:
        if phase is ExecutionPhase.COMPENSATED:
            output = {"child": state.key, "undone": state.outcome or "compensated"}
            return _result(
                parent.execution_id, parent.step, parent.undo_attempt, True, output=output
            )
        if phase is ExecutionPhase.COMPENSATION_FAILED:
            message = f"child execution {state.key} ended CompensationFailed: {state.outcome}"
            return _result(
                parent.execution_id, parent.step, parent.undo_attempt, True, failed=message
            )
        return None
    if phase is ExecutionPhase.COMPLETED:
        out = state.output if isinstance(state.output, dict) else {"output": state.output}
        return _result(parent.execution_id, parent.step, parent.attempt, False, output=out)
    error = state.error
    why = f": {error.type}: {error.message}" if error is not None else ""
    message = f"child execution {state.key} ended {phase.value}{why}"
    return _result(parent.execution_id, parent.step, parent.attempt, False, failed=message)


def _result(
    execution_id: str,
    step: str,
    attempt: int,
    compensation: bool,
    *,
    output: dict[str, Any] | None = None,
    failed: str | None = None,
    kind: str = "ChildFailed",
) -> OutgoingMessage:
    if failed is None:
        result = StepResult(
            "StepCompleted", execution_id, step, attempt, output=output, compensation=compensation
        )
    else:
        result = StepResult(
            "StepFailed",
            execution_id,
            step,
            attempt,
            error_type=kind,
            error_message=failed,
            retryable=kind != "ChildFailed",
            compensation=compensation,
        )
    return OutgoingMessage(
        EVENTS_QUEUE, result.message_id, f"{execution_id}/{step}", result.encode()
    )
