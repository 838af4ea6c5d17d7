"""The saga engine: `(state, definition, fact, now) -> Decision`. Pure.

No I/O, no clock reads, no randomness: everything it needs comes in as
arguments and everything it wants done goes out in the `Decision` (steps and
compensations to dispatch, durable timers to set or cancel, history to record).
The adapters around it make those effects happen in one transaction.

This module routes each fact to the rules of its concept, one module each:
`forward` (dispatch, results, retries, timeouts, completion), `compensation`
(undoing a failed or cancelled run in reverse dependency order) and `control`
(suspend, resume, cancel, redrive, skip a compensation). A fact that changes
nothing comes back as `Decision.ignored`, with the reason, and the state unchanged.

Outputs stored by reference (claim check, `sagaflow.core.payload_refs`) are kept in
state as their small marker. Templates may pass such an output on whole; one that
looks inside it fails the step with ExpressionError instead of reading null.
"""

from __future__ import annotations

from datetime import datetime

from sagaflow.core import (
    children,
    compensation,
    control,
    fanout,
    fanout_undo,
    finals,
    forward,
    signals,
)
from sagaflow.core.decisions import Decision, Dispatch, Record, Timer
from sagaflow.core.definition import Definition
from sagaflow.core.effects import WORKFLOW_TIMEOUT_KEY, Effects, split_item_key, timer_key
from sagaflow.core.facts import (
    Cancel,
    Compensate,
    Fact,
    Redrive,
    Resume,
    SignalReceived,
    SkipCompensation,
    Start,
    StepCompleted,
    StepFailed,
    StepHeartbeat,
    Suspend,
    TimerFired,
)
from sagaflow.core.state import ExecutionState

__all__ = ["WORKFLOW_TIMEOUT_KEY", "Decision", "Dispatch", "Record", "Timer", "decide", "timer_key"]


def decide(state: ExecutionState, definition: Definition, fact: Fact, now: datetime) -> Decision:
    """Apply one fact. The only entry point of the engine.

    `definition` is the version the execution runs on, except for a `Redrive` with
    `to_latest`, which carries the version to move it onto.
    """
    out = Effects(state=state, now=now, definition=definition)
    reason = _apply(out, fact)
    if reason is not None:
        return Decision(state=state, ignored=reason)
    finals.after(out)
    return out.decision()


def _apply(out: Effects, fact: Fact) -> str | None:
    if isinstance(fact, StepCompleted | StepFailed | StepHeartbeat | TimerFired):
        name, index = split_item_key(fact.step)
        if index is not None:
            return _apply_item(out, fact, name, index)
        spec = out.definition.by_name.get(fact.step)
        if spec is not None and spec.final:
            return finals.apply(out, fact)
    if isinstance(fact, StepCompleted):
        if fact.compensation:
            return compensation.completed(out, fact)
        return forward.completed(out, fact)
    if isinstance(fact, StepFailed):
        if fact.compensation:
            return compensation.failed(out, fact)
        return forward.failed(out, fact)
    if isinstance(fact, StepHeartbeat):
        if fact.compensation:
            return "compensations have no heartbeat timeout"
        return forward.heartbeat(out, fact)
    if isinstance(fact, TimerFired):
        if fact.kind in ("compensation-retry", "compensation-timeout"):
            return compensation.timer(out, fact)
        return forward.timer(out, fact)
    if isinstance(fact, Start):
        return forward.start(out, fact.suspend)
    if isinstance(fact, Cancel):
        return control.cancel(out, fact)
    if isinstance(fact, Suspend):
        return control.suspend(out)
    if isinstance(fact, Resume):
        return control.resume(out)
    if isinstance(fact, Redrive):
        return control.redrive(out, fact)
    if isinstance(fact, SkipCompensation):
        return control.skip_compensation(out, fact)
    if isinstance(fact, SignalReceived):
        return signals.received(out, fact)
    if isinstance(fact, Compensate):
        return children.undo_completed(out, fact)
    raise TypeError(f"unknown fact {fact!r}")  # pragma: no cover - Fact is a closed union


def _apply_item(
    out: Effects,
    fact: StepCompleted | StepFailed | StepHeartbeat | TimerFired,
    name: str,
    index: int,
) -> str | None:
    """A fact about one item of a forEach step (`<step>[<index>]`)."""
    undo = (
        fact.kind.startswith("compensation") if isinstance(fact, TimerFired) else fact.compensation
    )
    if undo:
        return fanout_undo.apply(out, fact, name, index)
    if isinstance(fact, StepCompleted):
        return fanout.completed(out, name, index, fact)
    if isinstance(fact, StepFailed):
        return fanout.failed(out, name, index, fact)
    if isinstance(fact, StepHeartbeat):
        return fanout.heartbeat(out, name, index, fact)
    return fanout.timer(out, name, index, fact)
