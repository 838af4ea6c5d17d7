"""The saga engine: `(state, definition, fact, now) -> Decision`. Pure.

No I/O, no clock reads, no randomness: everything it needs comes in as
arguments and everything it wants done goes out in the `Decision` (steps to
dispatch, durable timers to set or cancel, history to record). The adapters
around it make those effects happen in one transaction.

Rules that keep late, duplicated and reordered messages harmless:
- a result counts only for the step's current attempt while that attempt is
  running; anything else is returned as `ignored` and changes nothing;
- a timer counts only if it still matches the state it was set for (a retry timer
  for the attempt that is due, a timeout for the attempt still running);
- once the execution is terminal nothing new is dispatched, but the result of an
  attempt that was already in flight is still recorded on its step, so the
  history says truthfully what the runners did.

Outputs stored by reference (claim check, `sagaflow.core.payload_refs`) are kept in
state as their small marker. Templates may pass such an output on whole; one that
looks inside it fails the step with ExpressionError instead of reading null.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sagaflow.core.decisions import Decision, Dispatch, Record, Timer
from sagaflow.core.definition import FAIL, PASS, WAIT, Definition, StepDef
from sagaflow.core.durations import parse_duration
from sagaflow.core.expressions import ExpressionError, render
from sagaflow.core.facts import (
    Cancel,
    Fact,
    Start,
    StepCompleted,
    StepFailed,
    StepHeartbeat,
    TimerFired,
    TimerKind,
)
from sagaflow.core.manifests import ExecutionPhase, StepPhase
from sagaflow.core.payload_refs import ReferenceAccessError, reveal, stand_in
from sagaflow.core.state import ExecutionState, Failure, StepState

WORKFLOW_TIMEOUT_KEY = "workflow-timeout"
__all__ = ["WORKFLOW_TIMEOUT_KEY", "Decision", "Dispatch", "Record", "Timer", "decide", "timer_key"]


def timer_key(kind: TimerKind, step: str, attempt: int) -> str:
    return f"{kind}:{step}:{attempt}"


@dataclass
class _Out:
    """Accumulates effects while one fact is applied; frozen into a Decision at the end."""

    state: ExecutionState
    now: datetime
    definition: Definition
    dispatches: list[Dispatch] = field(default_factory=list)
    # Net timer effects by key, in order: a timer set and then cancelled within one
    # decision ends as a cancel, so the adapter never has to order the two.
    timer_ops: dict[str, Timer | None] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)

    def set_timer(self, timer: Timer) -> None:
        self.timer_ops.pop(timer.key, None)
        self.timer_ops[timer.key] = timer

    def cancel_timers(self, *keys: str) -> None:
        for key in keys:
            self.timer_ops.pop(key, None)
            self.timer_ops[key] = None

    def record(self, kind: str, message: str, step: str | None = None, **kw: Any) -> None:
        attempt = kw.pop("attempt", None)
        self.records.append(Record(kind, message, step, attempt, kw or None))

    def set_step(self, step: StepState) -> None:
        self.state = self.state.with_step(step)

    def decision(self) -> Decision:
        state = replace(self.state, revision=self.state.revision + 1)
        return Decision(
            state=state,
            dispatches=tuple(self.dispatches),
            timers=tuple(t for t in self.timer_ops.values() if t is not None),
            cancel_timers=tuple(k for k, t in self.timer_ops.items() if t is None),
            records=tuple(self.records),
        )


def decide(state: ExecutionState, definition: Definition, fact: Fact, now: datetime) -> Decision:
    """Apply one fact. The only entry point of the engine."""
    out = _Out(state=state, now=now, definition=definition)
    if isinstance(fact, Start):
        reason = _start(out)
    elif isinstance(fact, StepCompleted):
        reason = _completed(out, fact)
    elif isinstance(fact, StepFailed):
        reason = _failed(
            out,
            fact.step,
            fact.attempt,
            Failure(fact.error_type, fact.message),
            retryable=fact.retryable,
        )
    elif isinstance(fact, StepHeartbeat):
        reason = _heartbeat(out, fact)
    elif isinstance(fact, TimerFired):
        reason = _timer(out, fact)
    elif isinstance(fact, Cancel):
        reason = _cancel(out, fact)
    else:  # pragma: no cover - Fact is a closed union
        raise TypeError(f"unknown fact {fact!r}")
    if reason is not None:
        return Decision(state=state, ignored=reason)
    return out.decision()


def _start(out: _Out) -> str | None:
    if out.state.phase is not ExecutionPhase.PENDING:
        return f"execution already {out.state.phase.value}"
    out.state = replace(out.state, phase=ExecutionPhase.RUNNING, started_at=out.now)
    out.record("ExecutionStarted", f"started on {out.state.workflow} v{out.state.version}")
    if out.definition.timeout is not None:
        due = out.now + timedelta(seconds=out.definition.timeout)
        out.set_timer(Timer(WORKFLOW_TIMEOUT_KEY, "workflow-timeout", "", 0, due))
    _advance(out)
    return None


def _current(out: _Out, step: str, attempt: int) -> StepState | str:
    """The step if `attempt` is its running attempt, else why the fact is stale."""
    current = out.state.steps.get(step)
    if current is None:
        return f"unknown step {step!r}"
    if current.attempt != attempt:
        return f"attempt {attempt} is not current (current is {current.attempt})"
    if current.phase is not StepPhase.RUNNING:
        return f"attempt {attempt} already settled ({current.phase.value})"
    return current


def _completed(out: _Out, fact: StepCompleted) -> str | None:
    current = _current(out, fact.step, fact.attempt)
    if isinstance(current, str):
        return current
    _succeed(out, current, fact.output)
    if out.state.phase is ExecutionPhase.RUNNING:
        _advance(out)
    return None


def _succeed(out: _Out, step: StepState, output: Any) -> None:
    out.set_step(
        replace(
            step,
            phase=StepPhase.SUCCEEDED,
            finished_at=out.now,
            output=output,
            error=None,
            next_retry_at=None,
        )
    )
    out.cancel_timers(*_attempt_timer_keys(step.name, step.attempt))
    out.record(
        "StepSucceeded",
        f"step {step.name} succeeded on attempt {step.attempt}",
        step.name,
        attempt=step.attempt,
    )


def _failed(out: _Out, name: str, attempt: int, error: Failure, *, retryable: bool) -> str | None:
    current = _current(out, name, attempt)
    if isinstance(current, str):
        return current
    spec = out.definition.step(name)
    out.cancel_timers(*_attempt_timer_keys(name, attempt))
    can_retry = (
        retryable
        and error.type not in spec.retry.non_retryable_errors
        and attempt < spec.retry.max_attempts
        and out.state.phase is ExecutionPhase.RUNNING
    )
    if not can_retry:
        out.set_step(replace(current, phase=StepPhase.FAILED, finished_at=out.now, error=error))
        out.record(
            "StepFailed",
            f"step {name} failed on attempt {attempt}: {error.type}: {error.message}",
            name,
            attempt=attempt,
            error=error.type,
        )
        if out.state.phase is ExecutionPhase.RUNNING:
            _finish(
                out,
                ExecutionPhase.FAILED,
                Failure(error.type, f"step {name} failed: {error.message}"),
            )
        return None
    delay = spec.retry.delay_after(attempt)
    due = out.now + timedelta(seconds=delay)
    out.set_step(replace(current, phase=StepPhase.RETRYING, error=error, next_retry_at=due))
    out.record(
        "StepRetrying",
        f"step {name} attempt {attempt} failed ({error.type}: "
        f"{error.message}); attempt {attempt + 1} in {delay:g}s",
        name,
        attempt=attempt,
        delaySeconds=delay,
        error=error.type,
    )
    if delay <= 0:
        _dispatch(out, out.state.steps[name], spec)
    else:
        out.set_timer(Timer(timer_key("retry", name, attempt + 1), "retry", name, attempt + 1, due))
    return None


def _heartbeat(out: _Out, fact: StepHeartbeat) -> str | None:
    current = _current(out, fact.step, fact.attempt)
    if isinstance(current, str):
        return current
    spec = out.definition.step(fact.step)
    if spec.heartbeat_timeout is None:
        return "step has no heartbeat timeout"
    due = out.now + timedelta(seconds=spec.heartbeat_timeout)
    key = timer_key("heartbeat-timeout", fact.step, fact.attempt)
    out.set_timer(Timer(key, "heartbeat-timeout", fact.step, fact.attempt, due))
    return None


def _timer(out: _Out, fact: TimerFired) -> str | None:
    if fact.kind == "workflow-timeout":
        if out.state.phase is not ExecutionPhase.RUNNING:
            return "execution no longer running"
        timeout = out.definition.timeout or 0.0
        out.record("ExecutionTimedOut", f"workflow timeout of {timeout:g}s reached")
        _finish(
            out,
            ExecutionPhase.FAILED,
            Failure("WorkflowTimeout", f"workflow did not finish within {timeout:g}s"),
        )
        return None
    if fact.kind == "retry":
        step = out.state.steps.get(fact.step)
        if step is None or step.phase is not StepPhase.RETRYING or step.attempt != fact.attempt - 1:
            return "retry no longer due"
        if out.state.phase is not ExecutionPhase.RUNNING:
            return "execution no longer running"
        _dispatch(out, step, out.definition.step(fact.step))
        return None
    if fact.kind == "wait":
        current = _current(out, fact.step, fact.attempt)
        if isinstance(current, str):
            return current
        if out.definition.step(fact.step).type != WAIT:
            return f"step {fact.step} is not a wait step"
        _succeed(out, current, current.output or {})
        if out.state.phase is ExecutionPhase.RUNNING:
            _advance(out)
        return None
    current = _current(out, fact.step, fact.attempt)
    if isinstance(current, str):
        return current
    spec = out.definition.step(fact.step)
    if fact.kind == "step-timeout":
        error = Failure("StepTimeout", f"no result within {spec.timeout or 0:g}s")
    else:
        error = Failure("HeartbeatTimeout", f"no heartbeat within {spec.heartbeat_timeout or 0:g}s")
    out.record(
        "StepTimedOut",
        f"step {fact.step} attempt {fact.attempt}: {error.message}",
        fact.step,
        attempt=fact.attempt,
    )
    return _failed(out, fact.step, fact.attempt, error, retryable=True)


def _cancel(out: _Out, fact: Cancel) -> str | None:
    if out.state.phase.is_terminal:
        return f"execution already {out.state.phase.value}"
    _finish(out, ExecutionPhase.CANCELLED, Failure("Cancelled", fact.reason))
    return None


def _advance(out: _Out) -> None:
    """Dispatch every step whose dependencies have all succeeded; finish when all did."""
    progressed = True
    while progressed and out.state.phase is ExecutionPhase.RUNNING:
        progressed = False
        steps = out.state.steps
        for spec in out.definition.steps:
            step = steps[spec.name]
            if step.phase is not StepPhase.PENDING:
                continue
            if all(steps[d].phase is StepPhase.SUCCEEDED for d in spec.depends_on):
                _dispatch(out, step, spec)
                progressed = True
                steps = out.state.steps
                if out.state.phase is not ExecutionPhase.RUNNING:
                    return
    steps = out.state.steps
    if out.state.phase is ExecutionPhase.RUNNING and all(
        s.phase is StepPhase.SUCCEEDED for s in steps.values()
    ):
        _complete(out)


def _context(state: ExecutionState) -> tuple[dict[str, Any], bool]:
    """The render context, and whether it holds stand-ins for outputs stored by reference."""
    outputs = {
        name: {"output": stand_in(name, s.output)}
        for name, s in state.steps.items()
        if s.phase is StepPhase.SUCCEEDED
    }
    guarded = any(o["output"] is not state.steps[n].output for n, o in outputs.items())
    return {"input": state.input, "steps": outputs}, guarded


def _render_over(state: ExecutionState, value: Any, path: str) -> Any:
    """Render `value`'s templates over the execution's input and step outputs.

    An output stored by reference passes through whole as its marker; looking inside
    it raises ExpressionError (never a silent null: the payload is not here).
    """
    context, guarded = _context(state)
    try:
        rendered = render(value, context, path=path)
    except ReferenceAccessError as exc:
        # Raised outside expression evaluation (text interpolation): no finer path.
        raise ExpressionError(path, str(exc)) from exc
    # The walk that swaps stand-ins back is skipped when there can be none.
    return reveal(rendered) if guarded else rendered


def _dispatch(out: _Out, step: StepState, spec: StepDef) -> None:
    attempt = step.attempt + 1
    now = out.now
    running = replace(
        step,
        phase=StepPhase.RUNNING,
        attempt=attempt,
        started_at=step.started_at or now,
        attempt_started_at=now,
        next_retry_at=None,
    )
    try:
        rendered = _render_over(out.state, spec.input, f"steps.{spec.name}.input")
    except ExpressionError as exc:
        out.set_step(running)
        _failed(out, spec.name, attempt, Failure("ExpressionError", str(exc)), retryable=False)
        return
    out.set_step(running)
    if spec.type == PASS:
        _succeed(out, out.state.steps[spec.name], rendered)
        return
    if spec.type == FAIL:
        error = Failure(str(rendered.get("type", "Failed")), str(rendered.get("message", "")))
        _failed(out, spec.name, attempt, error, retryable=False)
        return
    if spec.type == WAIT:
        _start_wait(out, out.state.steps[spec.name], rendered)
        return
    deadline = now + timedelta(seconds=spec.timeout) if spec.timeout is not None else None
    out.dispatches.append(
        Dispatch(spec.name, attempt, spec.type, rendered, deadline, spec.heartbeat_timeout)
    )
    if deadline is not None:
        out.set_timer(
            Timer(
                timer_key("step-timeout", spec.name, attempt),
                "step-timeout",
                spec.name,
                attempt,
                deadline,
            )
        )
    if spec.heartbeat_timeout is not None:
        due = now + timedelta(seconds=spec.heartbeat_timeout)
        out.set_timer(
            Timer(
                timer_key("heartbeat-timeout", spec.name, attempt),
                "heartbeat-timeout",
                spec.name,
                attempt,
                due,
            )
        )
    out.record(
        "StepDispatched",
        f"step {spec.name} attempt {attempt} dispatched ({spec.type})",
        spec.name,
        attempt=attempt,
    )


def _start_wait(out: _Out, step: StepState, rendered: dict[str, Any]) -> None:
    try:
        seconds = parse_duration(rendered.get("duration", ""))
        due = out.now + timedelta(seconds=seconds)
    except (ValueError, OverflowError) as exc:
        # The duration may come from execution input at run time, so it is checked here too.
        reason = str(exc) if isinstance(exc, ValueError) else "too long for the clock"
        error = Failure("InvalidInput", f"duration: {reason}")
        _failed(out, step.name, step.attempt, error, retryable=False)
        return
    out.set_step(replace(step, output=rendered))
    out.set_timer(
        Timer(timer_key("wait", step.name, step.attempt), "wait", step.name, step.attempt, due)
    )
    out.record(
        "StepWaiting", f"step {step.name} waits {seconds:g}s", step.name, attempt=step.attempt
    )


def _complete(out: _Out) -> None:
    try:
        if out.definition.output is not None:
            output = _render_over(out.state, out.definition.output, "spec.output")
        else:
            output = {name: out.state.steps[name].output for name in out.definition.sinks}
    except ExpressionError as exc:
        _finish(out, ExecutionPhase.FAILED, Failure("ExpressionError", str(exc)))
        return
    out.state = replace(out.state, output=output)
    _finish(out, ExecutionPhase.COMPLETED, None)


def _finish(out: _Out, phase: ExecutionPhase, error: Failure | None) -> None:
    """Make the execution terminal: no more dispatches; steps never started are skipped."""
    for step in out.state.steps.values():
        if step.phase is StepPhase.PENDING:
            out.set_step(replace(step, phase=StepPhase.SKIPPED))
        elif step.phase is StepPhase.RETRYING:
            out.set_step(
                replace(step, phase=StepPhase.FAILED, finished_at=out.now, next_retry_at=None)
            )
            out.cancel_timers(timer_key("retry", step.name, step.attempt + 1))
        elif step.phase is StepPhase.RUNNING and out.definition.step(step.name).type == WAIT:
            out.set_step(replace(step, phase=StepPhase.SKIPPED, finished_at=out.now))
            out.cancel_timers(timer_key("wait", step.name, step.attempt))
    if out.definition.timeout is not None:
        out.cancel_timers(WORKFLOW_TIMEOUT_KEY)
    out.state = replace(out.state, phase=phase, error=error, finished_at=out.now)
    kind = {
        ExecutionPhase.COMPLETED: "ExecutionCompleted",
        ExecutionPhase.FAILED: "ExecutionFailed",
    }.get(phase, "ExecutionCancelled")
    message = f"execution {phase.value.lower()}"
    if error is not None:
        message += f": {error.type}: {error.message}"
    out.record(kind, message)


def _attempt_timer_keys(step: str, attempt: int) -> tuple[str, ...]:
    return (
        timer_key("step-timeout", step, attempt),
        timer_key("heartbeat-timeout", step, attempt),
    )
