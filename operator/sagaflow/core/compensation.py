"""Compensation: a failed or cancelled run undoes what it did, in reverse dependency order.

When the run fails (a step failed for good, the workflow timed out) or is cancelled
with `onCancel`, forward work stops and every step that Succeeded and has
`compensate` is marked for undo (`StepState.undo`). Steps still running are in
doubt: `await` waits for their result and undoes them if they succeeded,
`compensate` undoes them at once, `skip` leaves them.

Order: a step's compensation starts only once the compensations of every step
that depends on it, directly or not, are done (`StepDef.descendants`); branches
that do not depend on each other are undone in parallel, at most `maxParallel`
at once (a compensation holds its slot from its first attempt until it ends,
retries included). A compensation is an ordinary step command with its own
attempt numbers, retry policy, timeout and timers.

A compensation that fails for good marks its step CompensationFailed and blocks the
steps it depends on; the others go on. When nothing more can proceed the run is
CompensationFailed (settled): a redrive retries the failed compensations,
`skipCompensation` passes over them. Once a `pivot` step has succeeded nothing is
undone: the run ends Failed and waits for a redrive.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Literal

from sagaflow.core import children, fanout, fanout_undo
from sagaflow.core.decisions import Dispatch
from sagaflow.core.definition import CHILD, FAIL, PASS, StepDef
from sagaflow.core.effects import Effects, end, render_over, set_phase, stop_forward, timer_key
from sagaflow.core.expressions import ExpressionError
from sagaflow.core.facts import StepCompleted, StepFailed, TimerFired
from sagaflow.core.manifests import ExecutionPhase, InDoubt, StepPhase
from sagaflow.core.state import Failure, StepState, Undo

COMPENSATING = ExecutionPhase.COMPENSATING
Status = Literal["awaiting", "waiting", "active", "blocked", "done"]


def fail(out: Effects, cause: Failure) -> None:
    """The run failed: undo what it did, or end Failed when nothing is to be undone."""
    _begin(out, cause, cancelled=False)


def cancel(out: Effects, reason: str) -> None:
    """The run was cancelled: undo what it did per `onCancel`, or end Cancelled."""
    _begin(out, Failure("Cancelled", reason), cancelled=True)


def _begin(out: Effects, cause: Failure, *, cancelled: bool) -> None:
    if cancelled:
        children.control(out, "Cancel")
    stop_forward(out)
    out.state = replace(out.state, error=cause, cancelled=cancelled)
    policy = out.definition.compensation
    outcome = ExecutionPhase.CANCELLED if cancelled else ExecutionPhase.FAILED
    if cancelled and not policy.on_cancel:
        end(out, outcome, f"{cause.message}; onCancel is false, so nothing is undone")
        return
    pivot = next(
        (
            s.name
            for s in out.definition.steps
            if s.pivot and out.step(s.name).phase is StepPhase.SUCCEEDED
        ),
        None,
    )
    if pivot is not None:
        then = "" if cancelled else "; redrive to recover forward"
        detail = f"{cause.message}; pivot step {pivot} succeeded, nothing is undone"
        end(out, outcome, detail + then)
        return
    marked = _mark(out)
    if not marked and not any(_status(out, s) == "awaiting" for s in _undoable(out)):
        end(out, outcome)
        return
    set_phase(out, COMPENSATING)
    what = ", ".join(marked) if marked else "nothing yet"
    out.record(
        "ExecutionCompensating",
        f"compensating after {cause.type}: {cause.message}; to undo: {what}",
        steps=marked,
    )
    advance(out)


def undo_completed(out: Effects, cause: Failure) -> None:
    """A Completed child whose parent undoes its step: undo every step it completed."""
    out.state = replace(out.state, error=cause)
    marked = _mark(out)
    if not marked:
        end(out, ExecutionPhase.COMPENSATED, "nothing to undo")
        return
    out.record(
        "ExecutionCompensating",
        f"compensating: {cause.message}; to undo: {', '.join(marked)}",
        steps=marked,
    )
    advance(out)


def _undoable(out: Effects) -> list[StepDef]:
    return [s for s in out.definition.steps if s.compensate is not None]


def _mark(out: Effects) -> list[str]:
    """Mark the steps to undo; the names marked, in dependency order."""
    in_doubt = out.definition.compensation.in_doubt
    skipped = out.state.skip_compensation
    marked = []
    for spec in _undoable(out):
        step = out.step(spec.name)
        if step.undo is not None:
            continue
        if step.phase is StepPhase.SUCCEEDED or (
            step.phase is StepPhase.FAILED and fanout.has_successes(step)
        ):
            marked.append(spec.name)
            if spec.name in skipped:
                _skip(out, step, "listed in skipCompensation")
            else:
                out.set_step(replace(step, undo=Undo()))
        elif step.phase is StepPhase.RUNNING and spec.fan_out and spec.name not in skipped:
            # Items in flight are always awaited: undoing one still running is no undo.
            message = f"step {spec.name}: items in flight; those that succeed are undone"
            out.record("StepInDoubt", message, spec.name)
        elif step.phase is StepPhase.RUNNING and spec.name not in skipped:
            attempt = f"attempt {step.attempt} is in flight"
            if in_doubt is InDoubt.COMPENSATE:
                marked.append(spec.name)
                out.set_step(replace(step, undo=Undo()))
                out.record("StepInDoubt", f"step {spec.name}: {attempt}; undone at once", spec.name)
            elif in_doubt is InDoubt.AWAIT:
                message = f"step {spec.name}: {attempt}; undone if it succeeds"
                out.record("StepInDoubt", message, spec.name)
            else:
                out.record("StepInDoubt", f"step {spec.name}: {attempt}; left as is", spec.name)
    return marked


def _status(out: Effects, spec: StepDef) -> Status:
    step = out.step(spec.name)
    undo = step.undo
    if undo is None:
        awaited = (
            step.phase is StepPhase.RUNNING
            and (spec.fan_out or out.definition.compensation.in_doubt is InDoubt.AWAIT)
            and spec.name not in out.state.skip_compensation
        )
        return "awaiting" if awaited else "done"
    if undo.status == "waiting":
        return "waiting"
    if undo.status in ("running", "retrying"):
        return "active"
    return "blocked" if step.phase is StepPhase.COMPENSATION_FAILED else "done"


def advance(out: Effects) -> None:
    """Start every compensation whose turn has come; settle the run when none can go on."""
    if out.state.underlying_phase is not COMPENSATING:
        return
    undoable = _undoable(out)
    statuses = {s.name: _status(out, s) for s in undoable}
    limit = out.definition.compensation.max_parallel
    active = sum(1 for v in statuses.values() if v == "active")
    startable: list[str] = []
    # Reverse topological order: a step's dependents come before it, so a
    # compensation that settles at once (sagaflow.pass) frees its dependencies here.
    for spec in reversed(undoable):
        if statuses[spec.name] != "waiting":
            continue
        if any(statuses.get(d, "done") != "done" for d in spec.descendants):
            continue
        if out.state.phase is not COMPENSATING or (limit and active >= limit):
            startable.append(spec.name)
            continue
        _dispatch(out, spec)
        statuses[spec.name] = _status(out, spec)
        active += statuses[spec.name] == "active"
    if startable or any(v in ("active", "awaiting") for v in statuses.values()):
        return
    blocked = [n for n, v in statuses.items() if v == "blocked"]
    if blocked:
        first = out.step(blocked[0])
        error = first.undo.error if first.undo and first.undo.error else Failure("Error", "")
        waiting = [n for n, v in statuses.items() if v == "waiting"]
        detail = f"compensation of step {first.name} failed: {error.type}: {error.message}"
        if waiting:
            detail += f"; waiting behind it: {', '.join(waiting)}"
        end(out, ExecutionPhase.COMPENSATION_FAILED, detail + _HELP)
        return
    # In the order they were undone (one transition: reverse dependency order).
    order = {s.name: i for i, s in enumerate(reversed(undoable))}
    finished = [out.step(s.name) for s in undoable if out.step(s.name).undo is not None]
    finished.sort(key=lambda st: ((st.undo and st.undo.finished_at) or out.now, order[st.name]))
    undone = [st.name for st in finished]
    if undone:
        end(out, ExecutionPhase.COMPENSATED, f"undid {', '.join(undone)}")
    else:
        end(out, ExecutionPhase.CANCELLED if out.state.cancelled else ExecutionPhase.FAILED)


_HELP = "; redrive to retry it, or list it in spec.skipCompensation once undone by hand"


def _dispatch(out: Effects, spec: StepDef) -> None:
    if spec.fan_out:
        fanout_undo.begin(out, spec)
        return
    step = out.step(spec.name)
    comp = spec.compensate
    assert comp is not None
    assert step.undo is not None
    attempt = step.undo.attempt + 1
    undo = replace(
        step.undo,
        status="running",
        attempt=attempt,
        started_at=step.undo.started_at or out.now,
        attempt_started_at=out.now,
        next_retry_at=None,
    )
    out.set_step(replace(step, phase=StepPhase.COMPENSATING, undo=undo))
    try:
        path = f"steps.{spec.name}.compensate.input"
        rendered = render_over(out.state, comp.input, path, undo=True)
    except ExpressionError as exc:
        _failed(out, out.step(spec.name), Failure("ExpressionError", str(exc)), retryable=False)
        return
    if comp.type == PASS:
        _undone(out, out.step(spec.name))
        return
    if comp.type == FAIL:
        error = Failure(str(rendered.get("type", "Failed")), str(rendered.get("message", "")))
        _failed(out, out.step(spec.name), error, retryable=False)
        return
    if comp.type == CHILD:
        children.undo_dispatch(out, spec, attempt)
        return
    deadline = out.now + timedelta(seconds=comp.timeout) if comp.timeout is not None else None
    out.dispatches.append(
        Dispatch(spec.name, attempt, comp.type, rendered, deadline, None, compensation=True)
    )
    if deadline is not None:
        out.timer("compensation-timeout", spec.name, attempt, deadline)
    out.record(
        "StepCompensating",
        f"step {spec.name} compensation attempt {attempt} dispatched ({comp.type})",
        spec.name,
        attempt=attempt,
    )


def _current(out: Effects, name: str, attempt: int) -> StepState | str:
    """The step if `attempt` is its running compensation attempt, else why it is stale."""
    step = out.state.steps.get(name)
    if step is None:
        return f"unknown step {name!r}"
    undo = step.undo
    if undo is None:
        return f"step {name} is not being undone"
    if undo.attempt != attempt:
        return f"compensation attempt {attempt} is not current (current is {undo.attempt})"
    if undo.status != "running":
        return f"compensation attempt {attempt} already settled ({step.phase.value})"
    return step


def completed(out: Effects, fact: StepCompleted) -> str | None:
    step = _current(out, fact.step, fact.attempt)
    if isinstance(step, str):
        return step
    _undone(out, step)
    advance(out)
    return None


def failed(out: Effects, fact: StepFailed) -> str | None:
    step = _current(out, fact.step, fact.attempt)
    if isinstance(step, str):
        return step
    _failed(out, step, Failure(fact.error_type, fact.message), retryable=fact.retryable)
    advance(out)
    return None


def _undone(out: Effects, step: StepState) -> None:
    assert step.undo is not None
    attempt = step.undo.attempt
    undo = replace(step.undo, status="done", finished_at=out.now, error=None, next_retry_at=None)
    out.set_step(replace(step, phase=StepPhase.COMPENSATED, undo=undo))
    out.cancel_timers(timer_key("compensation-timeout", step.name, attempt))
    out.record(
        "StepCompensated",
        f"step {step.name} compensated on attempt {attempt}",
        step.name,
        attempt=attempt,
    )


def _failed(out: Effects, step: StepState, error: Failure, *, retryable: bool) -> None:
    undo = step.undo
    comp = out.definition.step(step.name).compensate
    assert undo is not None
    assert comp is not None
    attempt = undo.attempt
    out.cancel_timers(timer_key("compensation-timeout", step.name, attempt))
    retry = comp.retry
    if retryable and error.type not in retry.non_retryable_errors and attempt < retry.max_attempts:
        delay = retry.delay_after(attempt)
        due = out.now + timedelta(seconds=delay)
        undo = replace(undo, status="retrying", error=error, next_retry_at=due)
        out.set_step(replace(step, undo=undo))
        out.record(
            "StepCompensationRetrying",
            f"step {step.name} compensation attempt {attempt} failed ({error.type}: "
            f"{error.message}); attempt {attempt + 1} in {delay:g}s",
            step.name,
            attempt=attempt,
            delaySeconds=delay,
            error=error.type,
        )
        out.timer("compensation-retry", step.name, attempt + 1, due)
        return
    undo = replace(undo, status="done", error=error, finished_at=out.now, next_retry_at=None)
    out.set_step(replace(step, phase=StepPhase.COMPENSATION_FAILED, undo=undo))
    out.record(
        "StepCompensationFailed",
        f"step {step.name} compensation failed on attempt {attempt}: {error.type}: {error.message}",
        step.name,
        attempt=attempt,
        error=error.type,
    )


def timer(out: Effects, fact: TimerFired) -> str | None:
    if fact.kind == "compensation-retry":
        step = out.state.steps.get(fact.step)
        undo = step.undo if step is not None else None
        if undo is None or undo.status != "retrying" or undo.attempt != fact.attempt - 1:
            return "compensation retry no longer due"
        if out.state.phase is ExecutionPhase.SUSPENDED:
            if undo.next_retry_at is not None and undo.next_retry_at <= out.now:
                return "suspended: the compensation retry is dispatched on resume"
            # Due now: the resume dispatches it, whatever the clock says by then.
            assert step is not None
            out.set_step(replace(step, undo=replace(undo, next_retry_at=out.now)))
            return None
        if out.state.phase is not COMPENSATING:
            return "execution no longer compensating"
        _dispatch(out, out.definition.step(fact.step))
        advance(out)
        return None
    found = _current(out, fact.step, fact.attempt)
    if isinstance(found, str):
        return found
    comp = out.definition.step(fact.step).compensate
    seconds = comp.timeout if comp is not None and comp.timeout is not None else 0.0
    error = Failure("CompensationTimeout", f"no result within {seconds:g}s")
    out.record(
        "StepCompensationTimedOut",
        f"step {fact.step} compensation attempt {fact.attempt}: {error.message}",
        fact.step,
        attempt=fact.attempt,
    )
    _failed(out, found, error, retryable=True)
    advance(out)
    return None


def in_doubt_settled(out: Effects, name: str, *, succeeded: bool) -> None:
    """A forward attempt in flight when compensation began has its result."""
    spec = out.definition.step(name)
    step = out.step(name)
    if (
        succeeded
        and spec.compensate is not None
        and step.undo is None
        and (spec.fan_out or out.definition.compensation.in_doubt is InDoubt.AWAIT)
        and name not in out.state.skip_compensation
    ):
        out.set_step(replace(step, undo=Undo()))
        out.record("StepInDoubt", f"step {name} succeeded while in doubt; it is undone", name)
    advance(out)


def resume(out: Effects) -> None:
    """After a resume: compensation retries that came due go out, then whoever's turn it is."""
    for spec in _undoable(out):
        undo = out.step(spec.name).undo
        if spec.fan_out:
            fanout_undo.resume(out, spec)
        elif (
            undo is not None
            and undo.status == "retrying"
            and undo.next_retry_at is not None
            and undo.next_retry_at <= out.now
        ):
            out.cancel_timers(timer_key("compensation-retry", spec.name, undo.attempt + 1))
            _dispatch(out, spec)
    advance(out)


def retry_failed(out: Effects) -> list[str]:
    """Redrive of a CompensationFailed run: its failed compensations wait for their turn
    again (attempt numbers continue). The names retried."""
    names = []
    for spec in _undoable(out):
        step = out.step(spec.name)
        if step.phase is StepPhase.COMPENSATION_FAILED and step.undo is not None:
            undo = replace(step.undo, status="waiting", error=None, finished_at=None)
            out.set_step(replace(step, phase=StepPhase.COMPENSATING, undo=undo))
            names.append(spec.name)
    set_phase(out, COMPENSATING)
    return names


def skip(out: Effects, names: tuple[str, ...]) -> list[str]:
    """Pass over these steps' undo (done by hand); the names whose undo this changed."""
    changed = []
    compensating = out.state.underlying_phase in (COMPENSATING, ExecutionPhase.COMPENSATION_FAILED)
    for name in names:
        step = out.step(name)
        undo = step.undo
        pending = undo is not None and (
            undo.status != "done" or step.phase is StepPhase.COMPENSATION_FAILED
        )
        awaited = undo is None and compensating and step.phase is StepPhase.RUNNING
        if pending or awaited:
            _skip(out, step, "skipped by request")
            changed.append(name)
    if changed and out.state.underlying_phase is ExecutionPhase.COMPENSATION_FAILED:
        set_phase(out, COMPENSATING)
    advance(out)
    return changed


def _skip(out: Effects, step: StepState, why: str) -> None:
    undo = step.undo or Undo()
    out.cancel_timers(
        timer_key("compensation-timeout", step.name, undo.attempt),
        timer_key("compensation-retry", step.name, undo.attempt + 1),
    )
    undo = replace(undo, status="done", finished_at=out.now, next_retry_at=None)
    out.set_step(replace(step, phase=StepPhase.COMPENSATION_SKIPPED, undo=undo))
    out.record("StepCompensationSkipped", f"step {step.name} not undone: {why}", step.name)
