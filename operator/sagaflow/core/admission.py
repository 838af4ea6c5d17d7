"""Admission under a workflow's concurrency limit (`spec.concurrency.maxExecutions`). Pure.

A limited workflow lets at most `maxExecutions` of its executions per namespace hold
a slot at once. A slot is held from the start until the run is terminal: every phase
but Pending and the terminal ones (a Suspended or CompensationFailed run still holds
its slot, since it may go on). An execution that finds no slot stays Pending with
`waiting` saying why, and starts, in creation order, as slots come free.

This module decides (given the limit and the slots taken: start or wait, and why) and
builds the two transitions admission adds around the engine: *wait* (a Pending run
told why, with an `ExecutionWaiting` line of history) and *admit* (the reason cleared
and the engine's `Start` applied). Counting slots, the queue and the lock that makes
two replicas agree are the runtime's (`sagaflow.runtime.admission`); they are facts
about many executions, which the engine, one execution at a time, never sees.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from sagaflow.core.decisions import Decision, Record
from sagaflow.core.definition import Definition
from sagaflow.core.engine import decide
from sagaflow.core.facts import Start
from sagaflow.core.manifests import ExecutionPhase
from sagaflow.core.state import ExecutionState

WAITING = "ExecutionWaiting"
ADMITTED = "ExecutionAdmitted"

# The phases that hold no slot: not started yet, or finished.
FREE_PHASES = (ExecutionPhase.PENDING, *(p for p in ExecutionPhase if p.is_terminal))


def holds_slot(phase: ExecutionPhase) -> bool:
    """Whether a run in `phase` counts against its workflow's limit."""
    return phase not in FREE_PHASES


def room(limit: int | None, running: int) -> int | None:
    """Slots free under `limit` with `running` taken; None when there is no limit."""
    if limit is None:
        return None
    return max(0, limit - running)


def wait_reason(workflow: str, limit: int, running: int, *, queued: bool) -> str | None:
    """Why a new execution must wait, or None when it may start now.

    `queued`: earlier executions of the workflow are still waiting; they go first even
    when a slot is free (creation order).
    """
    if running >= limit:
        return (
            f"waiting for a slot: {running} of {limit} executions of workflow {workflow} "
            "are running (concurrency.maxExecutions)"
        )
    if queued:
        return (
            f"waiting for a slot: earlier executions of workflow {workflow} wait first "
            f"(concurrency.maxExecutions: {limit})"
        )
    return None


@dataclass(frozen=True, slots=True)
class Waited:
    """The *wait* transition as a value: what history records so a replay (`replay.py`)
    can apply it again through `wait`."""

    reason: str


@dataclass(frozen=True, slots=True)
class Admitted:
    """The *admit* transition as a value, with what `admit` was given."""

    suspend: bool
    limit: int | None
    running: int


def wait(state: ExecutionState, reason: str) -> Decision:
    """A new execution that stays Pending: the reason in its state and its history."""
    waiting = replace(state, waiting=reason, revision=state.revision + 1)
    return Decision(state=waiting, records=(Record(WAITING, reason),))


def admit(
    state: ExecutionState,
    definition: Definition,
    suspend: bool,
    now: datetime,
    *,
    limit: int | None,
    running: int,
) -> Decision:
    """Start a waiting execution: `running` slots were taken before it, under `limit`."""
    decision = decide(replace(state, waiting=None), definition, Start(suspend), now)
    if not decision.applied:
        return decision
    taken = f"{running + 1} of {limit}" if limit is not None else f"{running + 1}, no limit now"
    record = Record(ADMITTED, f"a slot came free: starting ({taken} running)")
    return replace(decision, records=(record, *decision.records))
