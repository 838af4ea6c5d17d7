"""Child workflows: a step (`workflowRef`) whose attempt is an execution of its own.

The engine only decides; the runtime (`runtime/children.py`) carries it out in the
same transaction:

- dispatching the step emits a `Dispatch` with `workflow` set; the runtime starts
  the child execution (its id derives from the attempt id, so it starts once) on
  the child Workflow's current version, with the rendered input and a `Parent`
  reference;
- the child's end is the attempt's result: Completed gives StepCompleted with the
  child's output, any other end StepFailed (`ChildFailed`, naming how it ended);
- cancelling or suspending the parent, or resuming it, does the same to children
  in flight (`Decision.child_controls`); so does a step timeout (a cancel);
- compensating the step compensates the child's completed steps: the step's undo
  is a child "compensation" dispatch, which the runtime turns into `Compensate` on
  the child (`undo_completed` here); the child's Compensated end answers it.

Depth is bounded (`MAX_DEPTH`): a workflow that calls itself without end fails the
step that would go one level deeper, with `ChildDepthExceeded`.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from sagaflow.core.decisions import ChildControl, Dispatch
from sagaflow.core.definition import CHILD, StepDef
from sagaflow.core.effects import Effects, set_phase
from sagaflow.core.facts import Compensate
from sagaflow.core.manifests import ExecutionPhase, StepPhase
from sagaflow.core.state import Failure, StepState

MAX_DEPTH = 8
CHILD_ATTEMPT = "childAttempt"  # in a child undo's Dispatch input: whose child to undo


def dispatch(out: Effects, step: StepState, spec: StepDef, rendered: dict[str, Any]) -> None:
    """Start the child of this attempt (the runtime does, on this Dispatch)."""
    depth = out.state.parent.depth if out.state.parent is not None else 0
    if depth >= MAX_DEPTH:
        from sagaflow.core import forward  # forward dispatches through here

        error = Failure(
            "ChildDepthExceeded",
            f"child workflow {spec.workflow} would run {depth + 1} levels deep "
            f"(at most {MAX_DEPTH}): does a workflow call itself?",
        )
        forward.fail_attempt(out, spec.name, step.attempt, error, retryable=False)
        return
    deadline = out.now + timedelta(seconds=spec.timeout) if spec.timeout is not None else None
    out.dispatches.append(
        Dispatch(spec.name, step.attempt, CHILD, rendered, deadline, None, workflow=spec.workflow)
    )
    if deadline is not None:
        out.timer("step-timeout", spec.name, step.attempt, deadline)
    out.record(
        "StepDispatched",
        f"step {spec.name} attempt {step.attempt} starts child workflow {spec.workflow}",
        spec.name,
        attempt=step.attempt,
        workflow=spec.workflow,
    )


def undo_dispatch(out: Effects, spec: StepDef, attempt: int) -> None:
    """Undo the step: compensate its child's completed steps."""
    step = out.step(spec.name)
    # The forward attempt names the child; `attempt` numbers this undo.
    undo = {CHILD_ATTEMPT: step.attempt}
    out.dispatches.append(
        Dispatch(spec.name, attempt, CHILD, undo, None, None, True, spec.workflow)
    )
    out.record(
        "StepCompensating",
        f"step {spec.name} compensation attempt {attempt}: compensating its child execution",
        spec.name,
        attempt=attempt,
    )


def control(out: Effects, kind: str) -> None:
    """Pass a control request on to every child in flight."""
    for spec in out.definition.steps:
        step = out.step(spec.name)
        if spec.type == CHILD and step.phase is StepPhase.RUNNING:
            out.child_controls.append(ChildControl(spec.name, step.attempt, kind))


def cancel_one(out: Effects, step: str, attempt: int) -> None:
    out.child_controls.append(ChildControl(step, attempt, "Cancel"))


def undo_completed(out: Effects, fact: Compensate) -> str | None:
    """This child's parent undoes its step: undo what the child completed."""
    from sagaflow.core import compensation

    parent = out.state.parent
    if parent is None:
        return "not a child execution"
    if parent.undo_attempt >= fact.undo_attempt:
        return f"compensation attempt {fact.undo_attempt} already asked for"
    out.state = replace(out.state, parent=replace(parent, undo_attempt=fact.undo_attempt))
    if out.state.phase is not ExecutionPhase.COMPLETED:
        return None  # it undid itself, or had nothing: the runtime answers at once
    out.state = replace(out.state, finished_at=None, outcome=None)
    set_phase(out, ExecutionPhase.COMPENSATING)
    cause = Failure("ParentCompensating", f"parent step {parent.step} is being undone")
    compensation.undo_completed(out, cause)
    return None
