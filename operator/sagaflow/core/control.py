"""Control requests: suspend, resume, cancel, redrive, skip a compensation.

Each is a fact: it commits with its effect in one transaction. A request whose
effect already holds (suspend a suspended run, cancel one already undoing, the
same redrive number twice) is a no-op, returned as the reason it changed nothing.
A request that does not apply (resume a running run, redrive a completed one) is
refused: the refusal is recorded (a `RequestRefused` line of history, a Warning
Event in a cluster) and shown in the `Request` condition, and nothing else moves.

Suspension holds dispatches only: attempts in flight finish and are recorded,
retries that come due wait for the resume, and the workflow timeout keeps
counting. A cancel lifts a suspension, since undoing what was done is its point.
"""

from __future__ import annotations

from dataclasses import replace

from sagaflow.core import children, compensation, finals, forward
from sagaflow.core.effects import Effects
from sagaflow.core.facts import Cancel, Redrive, SkipCompensation
from sagaflow.core.manifests import ExecutionPhase, StepPhase
from sagaflow.core.state import StepState

_RERUN = (StepPhase.FAILED, StepPhase.SKIPPED, StepPhase.PENDING)


def suspend(out: Effects) -> str | None:
    phase = out.state.phase
    if phase is ExecutionPhase.SUSPENDED:
        return "already suspended"
    if phase not in (ExecutionPhase.RUNNING, ExecutionPhase.COMPENSATING):
        reason = f"the execution is {phase.value}; only a Running or Compensating one can be"
        out.answer("Suspend", False, reason + " suspended")
        return None
    out.state = replace(out.state, phase=ExecutionPhase.SUSPENDED, resume_phase=phase)
    out.answer("Suspend", True, f"suspended while {phase.value}")
    children.control(out, "Suspend")
    out.record(
        "ExecutionSuspended",
        f"suspended while {phase.value}: nothing new is dispatched; attempts in flight finish",
    )
    return None


def resume(out: Effects) -> str | None:
    state = out.state
    if state.phase is not ExecutionPhase.SUSPENDED:
        out.answer("Resume", False, f"the execution is not suspended (it is {state.phase.value})")
        return None
    back = state.resume_phase or ExecutionPhase.RUNNING
    out.state = replace(state, phase=back, resume_phase=None)
    out.answer("Resume", True, f"resumed to {back.value}")
    children.control(out, "Resume")
    out.record("ExecutionResumed", f"resumed; the execution is {back.value}")
    if back is ExecutionPhase.RUNNING:
        forward.resume(out)
    elif back is ExecutionPhase.COMPENSATING:
        compensation.resume(out)
    return None


def cancel(out: Effects, fact: Cancel) -> str | None:
    state = out.state
    underlying = state.underlying_phase
    if state.phase.is_terminal:
        return f"execution already {state.phase.value}"
    if underlying is ExecutionPhase.COMPENSATING:
        return "already compensating"
    if underlying not in (ExecutionPhase.RUNNING, ExecutionPhase.PENDING):
        reason = (
            f"the execution is {underlying.value}: redrive it to retry the failed "
            "compensations, or list them in spec.skipCompensation"
        )
        out.answer("Cancel", False, reason)
        return None
    if state.phase is ExecutionPhase.SUSPENDED:
        out.state = replace(state, phase=underlying, resume_phase=None)
        out.record("ExecutionResumed", "resumed by a cancel, to undo what it did")
    out.answer("Cancel", True, fact.reason)
    compensation.cancel(out, fact.reason)
    return None


def redrive(out: Effects, fact: Redrive) -> str | None:
    """Retry from failure, keeping successes; onto `out.definition` when `to_latest`."""
    state = out.state
    number = fact.number if fact.number is not None else state.redrive_requests + 1
    if number <= state.redrive_requests:
        return f"redrive {number} already handled"
    out.state = replace(state, redrive_requests=number)
    phase = state.phase
    if phase not in (ExecutionPhase.FAILED, ExecutionPhase.COMPENSATION_FAILED):
        reason = f"a {phase.value} execution cannot be redriven; only Failed and "
        out.answer("Redrive", False, reason + "CompensationFailed ones can")
        return None
    moved = ""
    if fact.to_latest and out.definition.version != state.version:
        refused = _move(out)
        if refused:
            out.answer("Redrive", False, refused)
            return None
        moved = f" onto v{out.definition.version}"
    redrives = state.redrives + 1
    if phase is ExecutionPhase.FAILED:
        finals.reset(out)
        rerun = _reset_forward(out)
        out.state = replace(
            out.state,
            phase=ExecutionPhase.RUNNING,
            error=None,
            output=None,
            finished_at=None,
            cancelled=False,
            redrives=redrives,
            outcome=None,
        )
        kept = [n for n, s in out.state.steps.items() if s.phase is StepPhase.SUCCEEDED]
        message = f"redrive {redrives}{moved}: running {', '.join(rerun) or 'nothing'} again"
        out.record("ExecutionRedriven", message + f"; keeping {', '.join(kept) or 'nothing'}")
        out.answer("Redrive", True, message)
        forward.set_workflow_timeout(out)
        forward.advance(out)
        return None
    names = compensation.retry_failed(out)
    out.state = replace(out.state, redrives=redrives, outcome=None)
    message = f"redrive {redrives}{moved}: retrying the compensation of {', '.join(names)}"
    out.record("ExecutionRedriven", message)
    out.answer("Redrive", True, message)
    compensation.advance(out)
    return None


def _move(out: Effects) -> str:
    """Put the run on `out.definition`; why not, if it lacks a step the run keeps."""
    state = out.state
    kept = [n for n, s in state.steps.items() if s.phase not in _RERUN]
    missing = [n for n in kept if n not in out.definition.by_name]
    if missing:
        return (
            f"version {out.definition.version} of workflow {state.workflow} lacks "
            f"steps this run keeps: {', '.join(missing)}"
        )
    steps = {
        s.name: state.steps.get(s.name) or StepState(name=s.name) for s in out.definition.steps
    }
    out.state = replace(state, steps=steps, version=out.definition.version)
    return ""


def _reset_forward(out: Effects) -> list[str]:
    rerun = []
    for spec in out.definition.steps:
        step = out.step(spec.name)
        if step.phase in _RERUN:
            out.set_step(
                replace(
                    step,
                    phase=StepPhase.PENDING,
                    finished_at=None,
                    next_retry_at=None,
                    error=None,
                    output=None,
                )
            )
            rerun.append(spec.name)
    return rerun


def skip_compensation(out: Effects, fact: SkipCompensation) -> str | None:
    state = out.state
    unknown = [n for n in fact.steps if n not in state.steps]
    if unknown:
        out.answer("SkipCompensation", False, f"unknown steps: {', '.join(unknown)}")
        return None
    if state.phase in (
        ExecutionPhase.COMPLETED,
        ExecutionPhase.COMPENSATED,
        ExecutionPhase.CANCELLED,
    ):
        reason = f"nothing is left to undo in a {state.phase.value} execution"
        out.answer("SkipCompensation", False, reason)
        return None
    new = sorted(set(fact.steps) - state.skip_compensation)
    if not new:
        return "already listed in skipCompensation"
    out.state = replace(state, skip_compensation=state.skip_compensation | set(new))
    out.answer("SkipCompensation", True, f"not undoing {', '.join(new)}")
    changed = compensation.skip(out, tuple(new))
    later = [n for n in new if n not in changed]
    if later:
        out.record("CompensationSkipListed", f"will not undo {', '.join(later)}")
    return None
