"""`finally`: steps that run after the execution ends, whatever the outcome.

Once the run reaches Completed, Failed, Compensated or Cancelled (after its
compensation), its `finally` steps run, in their own dependency order, with
`execution.phase` and `execution.error` in their templates. The outcome phase is
already decided and stays as it is: a failed `finally` step is recorded (history,
its step status, the `Finally` line of `kubectl describe`) and the run's phase does
not change. While they run `state.finalizing` is "running" and the run is not at
rest; then "done". A `finally` step's dependents are Skipped when it fails.

They are ordinary steps otherwise (retries, timeouts, runner types), so the forward
rules serve them: `forward` asks `dispatching` and `live` instead of "is the run
Running" for a `finally` step.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sagaflow.core.effects import Effects
from sagaflow.core.facts import StepCompleted, StepFailed, StepHeartbeat, TimerFired
from sagaflow.core.manifests import StepPhase

RUNNING = "running"
DONE = "done"
FAILED = "failed"
_SETTLED = (StepPhase.SUCCEEDED, StepPhase.SKIPPED, StepPhase.FAILED)


def after(out: Effects) -> None:
    """Start the `finally` steps if this transition ended the run."""
    state = out.state
    if not out.definition.finally_steps or state.finalizing is not None:
        return
    if not state.phase.is_terminal:
        return
    out.state = replace(state, finalizing=RUNNING)
    names = ", ".join(s.name for s in out.definition.finally_steps)
    out.record("ExecutionFinalizing", f"running finally steps after {state.phase.value}: {names}")
    advance(out)


def context(out: Effects) -> dict[str, Any]:
    """What `finally` templates see besides the input and step outputs."""
    error = out.state.error
    return {
        "execution": {
            "phase": out.state.phase.value,
            "error": None if error is None else error.to_json(),
        }
    }


def dispatching(out: Effects) -> bool:
    return out.state.finalizing == RUNNING


def apply(
    out: Effects, fact: StepCompleted | StepFailed | StepHeartbeat | TimerFired
) -> str | None:
    """A result or timer of a `finally` step."""
    from sagaflow.core import forward  # forward serves finally steps too

    if not dispatching(out):
        return "finally steps are not running"
    if isinstance(fact, StepCompleted):
        found = forward.current(out, fact.step, fact.attempt)
        if isinstance(found, str):
            return found
        forward.succeed(out, found, fact.output)
        advance(out)
        return None
    if isinstance(fact, StepFailed):
        return forward.failed(out, fact)
    if isinstance(fact, StepHeartbeat):
        return forward.heartbeat(out, fact)
    return forward.timer(out, fact)


def advance(out: Effects) -> None:
    """Start every `finally` step whose dependencies settled; end when all did."""
    from sagaflow.core import forward

    if not dispatching(out):
        return
    progressed = True
    while progressed:
        progressed = False
        for spec in out.definition.finally_steps:
            step = out.step(spec.name)
            if step.phase is not StepPhase.PENDING:
                continue
            deps = [out.step(d) for d in spec.depends_on]
            if not all(d.phase in _SETTLED for d in deps):
                continue
            failed = [d.name for d in deps if d.phase is StepPhase.FAILED]
            if failed:
                reason = f"finally step {failed[0]} failed"
                out.set_step(replace(step, phase=StepPhase.SKIPPED, reason=reason))
                out.record("StepSkipped", f"step {spec.name} skipped: {reason}", spec.name)
            else:
                forward.begin(out, step, spec)
            progressed = True
    _maybe_done(out)


def _maybe_done(out: Effects) -> None:
    finals = [out.step(s.name) for s in out.definition.finally_steps]
    if not all(s.phase in _SETTLED for s in finals):
        return
    failed = [s for s in finals if s.phase is StepPhase.FAILED]
    out.state = replace(out.state, finalizing=FAILED if failed else DONE)
    phase = out.state.phase.value
    if failed:
        error = failed[0].error
        what = f"{error.type}: {error.message}" if error else "failed"
        message = f"finally step {failed[0].name} failed ({what}); the execution stays {phase}"
        out.record("FinallyFailed", message, failed[0].name)
    else:
        out.record("FinallyCompleted", f"finally steps done; the execution stays {phase}")


def reset(out: Effects) -> None:
    """A redrive: the `finally` steps run again after the new end."""
    if out.state.finalizing is None:
        return
    for spec in out.definition.finally_steps:
        # Attempt numbers go on, so the new attempts have ids of their own.
        step = out.step(spec.name)
        out.set_step(replace(step, phase=StepPhase.PENDING, error=None, output=None, reason=None))
    out.state = replace(out.state, finalizing=None)
