"""What one transition accumulates, and the helpers every rule module shares.

`Effects` collects the new state, dispatches, timer changes and history of one
fact while it is applied; `decision()` freezes them. The engine's rules live in
one module per concept (`forward`, `compensation`, `control`) and all write
through this one, so the net effect of a transition is the same whichever rules
it passed through.

Phases go through `set_phase`: while a run is Suspended a non-terminal phase change
is remembered as the phase to resume to, so a suspension is never lost by a
failure or a compensation that happens under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sagaflow.core.decisions import ChildControl, Decision, Dispatch, Record, Timer
from sagaflow.core.definition import WAIT, WAIT_SIGNAL, Definition
from sagaflow.core.expressions import ExpressionError, render
from sagaflow.core.facts import TimerKind
from sagaflow.core.manifests import ExecutionPhase, StepPhase
from sagaflow.core.payload_refs import ReferenceAccessError, reveal, stand_in
from sagaflow.core.state import ExecutionState, Failure, Request, StepState

WORKFLOW_TIMEOUT_KEY = "workflow-timeout"

# The record each terminal or settled phase is announced with.
_END_RECORDS = {
    ExecutionPhase.COMPLETED: "ExecutionCompleted",
    ExecutionPhase.FAILED: "ExecutionFailed",
    ExecutionPhase.CANCELLED: "ExecutionCancelled",
    ExecutionPhase.COMPENSATED: "ExecutionCompensated",
    ExecutionPhase.COMPENSATION_FAILED: "ExecutionCompensationFailed",
}


def timer_key(kind: TimerKind, step: str, attempt: int) -> str:
    return f"{kind}:{step}:{attempt}"


def item_key(step: str, index: int) -> str:
    """What stands for a forEach item where a step name goes (ids, timers, messages):
    `charge[3]`, so its attempt ids are `<execution>/charge[3]/<attempt>`."""
    return f"{step}[{index}]"


def split_item_key(key: str) -> tuple[str, int | None]:
    """`charge[3]` -> ("charge", 3); a plain step name -> (name, None). Step names hold
    no '[', so the two never mix."""
    if not key.endswith("]") or "[" not in key:
        return key, None
    name, _, number = key[:-1].partition("[")
    return (name, int(number)) if number.isdigit() else (key, None)


@dataclass
class Effects:
    """Accumulates effects while one fact is applied; frozen into a Decision at the end."""

    state: ExecutionState
    now: datetime
    definition: Definition
    dispatches: list[Dispatch] = field(default_factory=list)
    # Net timer effects by key, in order: a timer set and then cancelled within one
    # decision ends as a cancel, so the adapter never has to order the two.
    timer_ops: dict[str, Timer | None] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    refused: str | None = None
    child_controls: list[ChildControl] = field(default_factory=list)

    def refuse(self, kind: str, reason: str) -> None:
        """Refuse what was sent (a signal): history says why, and so does the decision."""
        self.refused = reason
        self.record(kind, reason)

    def set_timer(self, timer: Timer) -> None:
        self.timer_ops.pop(timer.key, None)
        self.timer_ops[timer.key] = timer

    def timer(self, kind: TimerKind, step: str, attempt: int, due: datetime) -> None:
        self.set_timer(Timer(timer_key(kind, step, attempt), kind, step, attempt, due))

    def cancel_timers(self, *keys: str) -> None:
        for key in keys:
            self.timer_ops.pop(key, None)
            self.timer_ops[key] = None

    def record(self, kind: str, message: str, step: str | None = None, **kw: Any) -> None:
        attempt = kw.pop("attempt", None)
        self.records.append(Record(kind, message, step, attempt, kw or None))

    def set_step(self, step: StepState) -> None:
        self.state = self.state.with_step(step)

    def step(self, name: str) -> StepState:
        return self.state.steps[name]

    def answer(self, kind: str, accepted: bool, message: str) -> None:
        """Say what became of a control request (the `Request` condition); a refusal is
        also a line of history. An accepted request's effects record themselves."""
        self.state = replace(self.state, request=Request(kind, accepted, message, self.now))
        if not accepted:
            self.record("RequestRefused", f"{kind} refused: {message}", request=kind)

    def decision(self) -> Decision:
        state = replace(self.state, revision=self.state.revision + 1)
        return Decision(
            state=state,
            dispatches=tuple(self.dispatches),
            timers=tuple(t for t in self.timer_ops.values() if t is not None),
            cancel_timers=tuple(k for k, t in self.timer_ops.items() if t is None),
            records=tuple(self.records),
            refused=self.refused,
            child_controls=tuple(self.child_controls),
        )


def set_phase(out: Effects, phase: ExecutionPhase) -> None:
    """Move the run to `phase`; under a suspension only the phase to resume to moves,
    unless the run is over (a terminal phase ends the suspension)."""
    state = out.state
    if state.phase is ExecutionPhase.SUSPENDED and not phase.is_terminal:
        out.state = replace(state, resume_phase=phase)
    else:
        out.state = replace(state, phase=phase, resume_phase=None)


def stop_forward(out: Effects) -> None:
    """No more forward work: steps never started are Skipped, retries are Failed (their
    timers cancelled), waits end, the workflow timeout is cancelled. Attempts in flight
    are left alone: their results are still recorded when they come. `finally` steps
    are not forward work: they run after the end."""
    for spec in out.definition.steps:
        step = out.step(spec.name)
        if step.phase is StepPhase.PENDING:
            out.set_step(replace(step, phase=StepPhase.SKIPPED, reason="the run stopped first"))
        elif step.phase is StepPhase.RETRYING:
            out.set_step(
                replace(step, phase=StepPhase.FAILED, finished_at=out.now, next_retry_at=None)
            )
            out.cancel_timers(timer_key("retry", step.name, step.attempt + 1))
        elif step.phase is StepPhase.RUNNING and spec.type in (WAIT, WAIT_SIGNAL):
            out.set_step(replace(step, phase=StepPhase.SKIPPED, finished_at=out.now))
            kind: TimerKind = "wait" if spec.type == WAIT else "signal-timeout"
            out.cancel_timers(timer_key(kind, step.name, step.attempt))
        elif step.phase is StepPhase.RUNNING and step.items is not None:
            stop_items(out, step)
    if out.definition.timeout is not None:
        out.cancel_timers(WORKFLOW_TIMEOUT_KEY)


def stop_items(out: Effects, step: StepState) -> None:
    """A forEach step stops: items not started stay Pending, retrying ones fail."""
    items = step.items
    assert items is not None
    if items.count(StepPhase.RETRYING):
        for index, item in enumerate(items.entries):
            if item.phase is StepPhase.RETRYING:
                items = items.put(index, replace(item, phase=StepPhase.FAILED, ready=False))
                key = item_key(step.name, index)
                out.cancel_timers(timer_key("retry", key, item.attempt + 1))
    out.set_step(replace(step, items=items))


def end(out: Effects, phase: ExecutionPhase, detail: str = "") -> None:
    """Announce a terminal or settled phase; `state.error` keeps the original cause."""
    set_phase(out, phase)
    out.state = replace(out.state, outcome=detail or None)
    if phase.is_terminal:
        out.state = replace(out.state, finished_at=out.now)
    message = f"execution {phase.value.lower()}"
    error = out.state.error
    if detail:
        message += f": {detail}"
    elif error is not None:
        message += f": {error.type}: {error.message}"
    out.record(_END_RECORDS[phase], message)


def context(state: ExecutionState, *, undo: bool = False) -> tuple[dict[str, Any], bool]:
    """The render context, and whether it holds stand-ins for outputs stored by reference.

    Forward steps see `{input, steps: {NAME: {output}}}` over the steps that succeeded.
    A compensation (`undo`) also sees what each step received (`steps.NAME.input`) and
    the run's error (`error: {step, type, message}`).
    """
    steps: dict[str, dict[str, Any]] = {}
    guarded = False
    for name, s in state.steps.items():
        has_output = s.output is not None and s.phase is not StepPhase.RUNNING
        if not undo and s.phase is not StepPhase.SUCCEEDED:
            continue
        if undo and not has_output and s.input is None:
            continue
        entry: dict[str, Any] = {"output": stand_in(name, s.output) if has_output else None}
        guarded = guarded or entry["output"] is not s.output
        if undo:
            entry["input"] = s.input
        steps[name] = entry
    out: dict[str, Any] = {"input": state.input, "steps": steps}
    if undo:
        error = state.error or Failure("", "")
        out["error"] = {"step": error.step, "type": error.type, "message": error.message}
    return out, guarded


def render_over(
    state: ExecutionState,
    value: Any,
    path: str,
    *,
    undo: bool = False,
    extra: dict[str, Any] | None = None,
) -> Any:
    """Render `value`'s templates over the execution's input and step outputs.

    `extra` adds names to the context: `item` and `index` for a forEach item,
    `execution` for a `finally` step.

    An output stored by reference passes through whole as its marker; looking inside
    it raises ExpressionError (never a silent null: the payload is not here).
    """
    ctx, guarded = context(state, undo=undo)
    if extra:
        ctx.update(extra)
    try:
        rendered = render(value, ctx, path=path)
    except ReferenceAccessError as exc:
        # Raised outside expression evaluation (text interpolation): no finer path.
        raise ExpressionError(path, str(exc)) from exc
    # The walk that swaps stand-ins back is skipped when there can be none.
    return reveal(rendered) if guarded else rendered
