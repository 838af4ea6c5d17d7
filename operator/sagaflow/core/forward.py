"""The forward path: dispatch what is ready, record results, retry, time out, complete.

Rules that keep late, duplicated and reordered messages harmless:
- a result counts only for the step's current attempt while that attempt is
  running; anything else is returned as the reason it was ignored;
- a timer counts only if it still matches the state it was set for (a retry timer
  for the attempt that is due, a timeout for the attempt still running);
- nothing is dispatched unless the run is Running (not Suspended, not undoing),
  but the result of an attempt already in flight is still recorded on its step.

A run that fails goes to `compensation.fail`, which decides between undoing what
it did and ending Failed. While Suspended, results are recorded, a failed attempt
still schedules its retry, and a retry that comes due waits for the resume.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from sagaflow.core import children, compensation, conditions, fanout, finals, signals
from sagaflow.core.decisions import Dispatch, Timer
from sagaflow.core.definition import CHILD, FAIL, PASS, WAIT, WAIT_SIGNAL, StepDef
from sagaflow.core.durations import parse_duration
from sagaflow.core.effects import WORKFLOW_TIMEOUT_KEY, Effects, end, render_over, timer_key
from sagaflow.core.expressions import ExpressionError
from sagaflow.core.facts import StepCompleted, StepFailed, StepHeartbeat, TimerFired
from sagaflow.core.manifests import ExecutionPhase, StepPhase
from sagaflow.core.state import Failure, StepState

RUNNING = ExecutionPhase.RUNNING


def start(out: Effects, suspend: bool) -> str | None:
    if out.state.phase is not ExecutionPhase.PENDING:
        return f"execution already {out.state.phase.value}"
    out.state = replace(out.state, phase=RUNNING, started_at=out.now)
    out.record("ExecutionStarted", f"started on {out.state.workflow} v{out.state.version}")
    if out.definition.timeout is not None:
        set_workflow_timeout(out)
    if suspend:
        out.state = replace(out.state, phase=ExecutionPhase.SUSPENDED, resume_phase=RUNNING)
        out.record("ExecutionSuspended", "created suspended: nothing runs until it is resumed")
    advance(out)
    return None


def set_workflow_timeout(out: Effects) -> None:
    if out.definition.timeout is not None:
        due = out.now + timedelta(seconds=out.definition.timeout)
        out.set_timer(Timer(WORKFLOW_TIMEOUT_KEY, "workflow-timeout", "", 0, due))


def current(out: Effects, step: str, attempt: int) -> StepState | str:
    """The step if `attempt` is its running forward attempt, else why the fact is stale."""
    found = out.state.steps.get(step)
    if found is None:
        return f"unknown step {step!r}"
    if found.attempt != attempt:
        return f"attempt {attempt} is not current (current is {found.attempt})"
    if found.phase is not StepPhase.RUNNING:
        return f"attempt {attempt} already settled ({found.phase.value})"
    return found


def completed(out: Effects, fact: StepCompleted) -> str | None:
    found = current(out, fact.step, fact.attempt)
    if isinstance(found, str):
        return found
    succeed(out, found, fact.output)
    after_result(out, fact.step, succeeded=True)
    return None


def after_result(out: Effects, step: str, *, succeeded: bool) -> None:
    """Carry on after a forward attempt settled: the next steps, or the undo it joins."""
    phase = out.state.underlying_phase
    if phase is RUNNING:
        advance(out)
    elif phase is ExecutionPhase.COMPENSATING:
        compensation.in_doubt_settled(out, step, succeeded=succeeded)


def succeed(out: Effects, step: StepState, output: Any) -> None:
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
    out.cancel_timers(*attempt_timer_keys(step.name, step.attempt))
    out.record(
        "StepSucceeded",
        f"step {step.name} succeeded on attempt {step.attempt}",
        step.name,
        attempt=step.attempt,
    )


def failed(out: Effects, fact: StepFailed) -> str | None:
    error = Failure(fact.error_type, fact.message)
    return fail_attempt(out, fact.step, fact.attempt, error, retryable=fact.retryable)


def fail_attempt(
    out: Effects, name: str, attempt: int, error: Failure, *, retryable: bool
) -> str | None:
    found = current(out, name, attempt)
    if isinstance(found, str):
        return found
    spec = out.definition.step(name)
    out.cancel_timers(*attempt_timer_keys(name, attempt))
    live = finals.dispatching(out) if spec.final else out.state.underlying_phase is RUNNING
    can_retry = (
        retryable
        and error.type not in spec.retry.non_retryable_errors
        and attempt < spec.retry.max_attempts
        and live
    )
    if not can_retry:
        out.set_step(replace(found, phase=StepPhase.FAILED, finished_at=out.now, error=error))
        out.record(
            "StepFailed",
            f"step {name} failed on attempt {attempt}: {error.type}: {error.message}",
            name,
            attempt=attempt,
            error=error.type,
        )
        if spec.final:
            finals.advance(out)
        elif out.state.underlying_phase is RUNNING:
            cause = Failure(error.type, f"step {name} failed: {error.message}", step=name)
            compensation.fail(out, cause)
        else:
            after_result(out, name, succeeded=False)
        return None
    delay = spec.retry.delay_after(attempt)
    due = out.now + timedelta(seconds=delay)
    out.set_step(replace(found, phase=StepPhase.RETRYING, error=error, next_retry_at=due))
    out.record(
        "StepRetrying",
        f"step {name} attempt {attempt} failed ({error.type}: "
        f"{error.message}); attempt {attempt + 1} in {delay:g}s",
        name,
        attempt=attempt,
        delaySeconds=delay,
        error=error.type,
    )
    if delay <= 0 and _dispatching(out, spec):
        dispatch(out, out.step(name), spec)
    else:
        out.timer("retry", name, attempt + 1, due)
    return None


def heartbeat(out: Effects, fact: StepHeartbeat) -> str | None:
    found = current(out, fact.step, fact.attempt)
    if isinstance(found, str):
        return found
    spec = out.definition.step(fact.step)
    if spec.heartbeat_timeout is None:
        return "step has no heartbeat timeout"
    due = out.now + timedelta(seconds=spec.heartbeat_timeout)
    out.timer("heartbeat-timeout", fact.step, fact.attempt, due)
    return None


def timer(out: Effects, fact: TimerFired) -> str | None:
    if fact.kind == "workflow-timeout":
        if out.state.underlying_phase is not RUNNING:
            return "execution no longer running"
        timeout = out.definition.timeout or 0.0
        out.record("ExecutionTimedOut", f"workflow timeout of {timeout:g}s reached")
        cause = Failure("WorkflowTimeout", f"workflow did not finish within {timeout:g}s")
        compensation.fail(out, cause)
        return None
    if fact.kind == "retry":
        step = out.state.steps.get(fact.step)
        if step is None or step.phase is not StepPhase.RETRYING or step.attempt != fact.attempt - 1:
            return "retry no longer due"
        spec = out.definition.step(fact.step)
        if out.state.phase is ExecutionPhase.SUSPENDED:
            if step.next_retry_at is not None and step.next_retry_at <= out.now:
                return "suspended: the retry is dispatched on resume"
            # Due now: the resume dispatches it, whatever the clock says by then.
            out.set_step(replace(step, next_retry_at=out.now))
            return None
        if not _dispatching(out, spec):
            return "execution no longer running"
        dispatch(out, step, spec)
        return None
    if fact.kind == "signal-timeout":
        found = current(out, fact.step, fact.attempt)
        if isinstance(found, str):
            return found
        signals.timed_out(out, found)
        return None
    if fact.kind == "wait":
        found = current(out, fact.step, fact.attempt)
        if isinstance(found, str):
            return found
        if out.definition.step(fact.step).type != WAIT:
            return f"step {fact.step} is not a wait step"
        succeed(out, found, found.output or {})
        after_result(out, fact.step, succeeded=True)
        return None
    found = current(out, fact.step, fact.attempt)
    if isinstance(found, str):
        return found
    spec = out.definition.step(fact.step)
    if fact.kind == "step-timeout":
        error = Failure("StepTimeout", f"no result within {spec.timeout or 0:g}s")
        if spec.type == CHILD:
            children.cancel_one(out, fact.step, fact.attempt)
    else:
        error = Failure("HeartbeatTimeout", f"no heartbeat within {spec.heartbeat_timeout or 0:g}s")
    out.record(
        "StepTimedOut",
        f"step {fact.step} attempt {fact.attempt}: {error.message}",
        fact.step,
        attempt=fact.attempt,
    )
    return fail_attempt(out, fact.step, fact.attempt, error, retryable=True)


def advance(out: Effects) -> None:
    """Start every step whose dependencies are done (Succeeded or Skipped); complete
    when every step is."""
    progressed = True
    while progressed and out.state.phase is RUNNING:
        progressed = False
        steps = out.state.steps
        for spec in out.definition.steps:
            step = steps[spec.name]
            if step.phase is not StepPhase.PENDING:
                continue
            if all(steps[d].phase in _DONE for d in spec.depends_on):
                begin(out, step, spec)
                progressed = True
                steps = out.state.steps
                if out.state.phase is not RUNNING:
                    return
    # A run whose last step succeeds while it is suspended completes: nothing is left.
    if out.state.underlying_phase is RUNNING and all(
        out.step(s.name).phase in _DONE for s in out.definition.steps
    ):
        _complete(out)


_DONE = (StepPhase.SUCCEEDED, StepPhase.SKIPPED)


def begin(out: Effects, step: StepState, spec: StepDef) -> None:
    """A step's turn has come: skip it (`when`), fan it out (`forEach`), or dispatch it."""
    if spec.when is not None:
        skip = conditions.skip_reason(out, spec)
        if isinstance(skip, Failure):
            out.set_step(replace(step, phase=StepPhase.RUNNING, attempt=1, started_at=out.now))
            fail_attempt(out, spec.name, 1, skip, retryable=False)
            return
        if skip is not None:
            out.set_step(replace(step, phase=StepPhase.SKIPPED, reason=skip, finished_at=out.now))
            out.record("StepSkipped", f"step {spec.name} skipped: {skip}", spec.name)
            return
    if spec.fan_out:
        failure = fanout.begin(out, step, spec)
        if failure is not None:
            out.set_step(replace(step, phase=StepPhase.RUNNING, attempt=1, started_at=out.now))
            fail_attempt(out, spec.name, 1, failure, retryable=False)
        return
    dispatch(out, step, spec)


def resume(out: Effects) -> None:
    """After a resume: retries that came due meanwhile go out, then what became ready."""
    for spec in out.definition.steps:
        step = out.step(spec.name)
        if (
            step.phase is StepPhase.RETRYING
            and step.next_retry_at is not None
            and step.next_retry_at <= out.now
        ):
            out.cancel_timers(timer_key("retry", step.name, step.attempt + 1))
            dispatch(out, step, spec)
            if out.state.phase is not RUNNING:
                return
        elif step.items is not None:
            fanout.resume(out, spec)
            if out.state.phase is not RUNNING:
                return
    advance(out)


def dispatch(out: Effects, step: StepState, spec: StepDef) -> None:
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
    extra = finals.context(out) if spec.final else None
    try:
        rendered = render_over(out.state, spec.input, f"steps.{spec.name}.input", extra=extra)
    except ExpressionError as exc:
        out.set_step(running)
        error = Failure("ExpressionError", str(exc))
        fail_attempt(out, spec.name, attempt, error, retryable=False)
        return
    if spec.compensate is not None:
        running = replace(running, input=rendered)  # the compensation may read it
    out.set_step(running)
    if spec.type == PASS:
        succeed(out, out.step(spec.name), rendered)
        return
    if spec.type == FAIL:
        error = Failure(str(rendered.get("type", "Failed")), str(rendered.get("message", "")))
        fail_attempt(out, spec.name, attempt, error, retryable=False)
        return
    if spec.type == WAIT:
        _start_wait(out, out.step(spec.name), rendered)
        return
    if spec.type == WAIT_SIGNAL:
        signals.begin_wait(out, out.step(spec.name), rendered)
        return
    if spec.type == CHILD:
        children.dispatch(out, out.step(spec.name), spec, rendered)
        return
    deadline = now + timedelta(seconds=spec.timeout) if spec.timeout is not None else None
    out.dispatches.append(
        Dispatch(spec.name, attempt, spec.type, rendered, deadline, spec.heartbeat_timeout)
    )
    if deadline is not None:
        out.timer("step-timeout", spec.name, attempt, deadline)
    if spec.heartbeat_timeout is not None:
        due = now + timedelta(seconds=spec.heartbeat_timeout)
        out.timer("heartbeat-timeout", spec.name, attempt, due)
    out.record(
        "StepDispatched",
        f"step {spec.name} attempt {attempt} dispatched ({spec.type})",
        spec.name,
        attempt=attempt,
    )


def _start_wait(out: Effects, step: StepState, rendered: dict[str, Any]) -> None:
    try:
        seconds = parse_duration(rendered.get("duration", ""))
        due = out.now + timedelta(seconds=seconds)
    except (ValueError, OverflowError) as exc:
        # The duration may come from execution input at run time, so it is checked here too.
        reason = str(exc) if isinstance(exc, ValueError) else "too long for the clock"
        error = Failure("InvalidInput", f"duration: {reason}")
        fail_attempt(out, step.name, step.attempt, error, retryable=False)
        return
    out.set_step(replace(step, output=rendered))
    out.timer("wait", step.name, step.attempt, due)
    out.record(
        "StepWaiting", f"step {step.name} waits {seconds:g}s", step.name, attempt=step.attempt
    )


def _complete(out: Effects) -> None:
    try:
        if out.definition.output is not None:
            output = render_over(out.state, out.definition.output, "spec.output")
        else:
            output = {name: out.step(name).output for name in out.definition.sinks}
    except ExpressionError as exc:
        compensation.fail(out, Failure("ExpressionError", str(exc)))
        return
    if out.definition.timeout is not None:
        out.cancel_timers(WORKFLOW_TIMEOUT_KEY)
    out.state = replace(out.state, output=output, error=None)
    end(out, ExecutionPhase.COMPLETED)


def _dispatching(out: Effects, spec: StepDef) -> bool:
    """Whether `spec` may be dispatched now: forward steps while the run is Running,
    `finally` steps while they run (and the run is not suspended)."""
    if spec.final:
        return finals.dispatching(out)
    return out.state.phase is RUNNING


def attempt_timer_keys(step: str, attempt: int) -> tuple[str, ...]:
    return (
        timer_key("step-timeout", step, attempt),
        timer_key("heartbeat-timeout", step, attempt),
    )
