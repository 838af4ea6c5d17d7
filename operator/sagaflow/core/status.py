"""Project an execution's state into the `Execution.status` users read.

Pure and shared: local mode prints it, the operator mirrors it into the custom
resource. Status is a view of Postgres; history stays in the database. Conditions
follow Kubernetes API conventions: `Succeeded` (Unknown while running, then True or
False), `Ready` (False while a step or a compensation waits to retry, while the run
is suspended, while it waits for a slot under its workflow's concurrency limit, and
once it has failed: the reason says which) and, once a control
request was made, `Request` (whether the last one was accepted, and why not). A
step being undone shows its compensation's attempts and error under `compensation`.
An output stored by reference shows as `outputRef` (uri, size, sha256), never its
payload.

`bounded_status` keeps what the operator writes to the object under a size budget
whatever the step count and output sizes: Kubernetes objects must stay under 1 MB.
"""

from __future__ import annotations

import json
from typing import Any

from sagaflow.core import fanout
from sagaflow.core.manifests import API_VERSION, ExecutionPhase, StepPhase
from sagaflow.core.payload_refs import is_ref, ref_of
from sagaflow.core.state import ExecutionState, StepState

_SUCCEEDED = {
    ExecutionPhase.COMPLETED: ("True", "Completed"),
    ExecutionPhase.FAILED: ("False", "Failed"),
    ExecutionPhase.CANCELLED: ("False", "Cancelled"),
    ExecutionPhase.COMPENSATED: ("False", "Compensated"),
    ExecutionPhase.COMPENSATION_FAILED: ("False", "CompensationFailed"),
}
_CURRENT = (StepPhase.RUNNING, StepPhase.RETRYING, StepPhase.COMPENSATING)
# A step undone (or being undone) keeps the output it had.
_HAS_OUTPUT = (
    StepPhase.SUCCEEDED,
    StepPhase.COMPENSATING,
    StepPhase.COMPENSATED,
    StepPhase.COMPENSATION_FAILED,
    StepPhase.COMPENSATION_SKIPPED,
)


def _ts(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def step_status(step: StepState) -> dict[str, Any]:
    out: dict[str, Any] = {"name": step.name, "phase": step.phase.value, "attempts": step.attempt}
    if step.started_at:
        out["startedAt"] = _ts(step.started_at)
    if step.finished_at:
        out["finishedAt"] = _ts(step.finished_at)
    if step.next_retry_at and step.phase is StepPhase.RETRYING:
        out["nextRetryAt"] = _ts(step.next_retry_at)
    if step.phase in _HAS_OUTPUT and step.output is not None:
        out.update(_output(step.output))
    if step.error is not None:
        out["error"] = step.error.to_json()
    if step.undo is not None and step.undo.attempt:
        out["compensation"] = _undo_status(step)
    if step.reason is not None:
        out["reason"] = step.reason
    if step.items is not None:
        out["items"] = fanout.summary(step)
    return out


def _undo_status(step: StepState) -> dict[str, Any]:
    undo = step.undo
    assert undo is not None
    out: dict[str, Any] = {"attempts": undo.attempt}
    if undo.started_at:
        out["startedAt"] = _ts(undo.started_at)
    if undo.finished_at:
        out["finishedAt"] = _ts(undo.finished_at)
    if undo.next_retry_at and undo.status == "retrying":
        out["nextRetryAt"] = _ts(undo.next_retry_at)
    if undo.error is not None:
        out["error"] = undo.error.to_json()
    return out


def _output(value: Any) -> dict[str, Any]:
    if is_ref(value):
        return {"outputRef": ref_of(value).to_json()}
    return {"output": value}


def current_steps(state: ExecutionState) -> list[str]:
    """Steps running, waiting to retry, or being undone."""
    return [s.name for s in state.steps.values() if s.phase in _CURRENT]


def _retries(state: ExecutionState) -> list[Any]:
    at = []
    for s in state.steps.values():
        if s.phase is StepPhase.RETRYING and s.next_retry_at is not None:
            at.append(s.next_retry_at)
        undo = s.undo
        if undo is not None and undo.status == "retrying" and undo.next_retry_at is not None:
            at.append(undo.next_retry_at)
    return at


def execution_status(state: ExecutionState) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": state.phase.value, "workflowVersion": state.version}
    if state.started_at:
        status["startedAt"] = _ts(state.started_at)
    if state.finished_at:
        status["finishedAt"] = _ts(state.finished_at)
    # A finished run has no current step, though an attempt may still be out there.
    current = [] if state.phase.is_terminal else current_steps(state)
    if current:
        status["currentSteps"] = current
    status["steps"] = [step_status(s) for s in state.steps.values()]
    retries = _retries(state)
    if retries and not state.phase.is_terminal:
        status["nextRetryAt"] = _ts(min(retries))
    if state.output is not None:
        status.update(_output(state.output))
    if state.error is not None:
        status["error"] = state.error.to_json()
    if state.redrives:
        status["redrives"] = state.redrives
    if state.finalizing is not None:
        status["finally"] = _finally(state)
    status["conditions"] = [_succeeded(state), _ready(state)]
    if state.request is not None:
        r = state.request
        reason = f"{r.kind}{'Accepted' if r.accepted else 'Refused'}"
        verdict = "True" if r.accepted else "False"
        status["conditions"].append(condition("Request", verdict, reason, r.message, r.at))
    status["revision"] = state.revision
    return status


_FINALLY = {"running": "Running", "done": "Succeeded", "failed": "Failed"}


def _finally(state: ExecutionState) -> str:
    """How the `finally` steps went: Running, Succeeded or Failed."""
    return _FINALLY.get(state.finalizing or "", "Unknown")


def _succeeded(state: ExecutionState) -> dict[str, Any]:
    verdict, reason = _SUCCEEDED.get(state.phase, ("Unknown", state.phase.value))
    message = state.error.message if state.error else f"execution {state.phase.value.lower()}"
    return condition("Succeeded", verdict, reason, message, state.finished_at or state.started_at)


def _ready(state: ExecutionState) -> dict[str, Any]:
    """True while the run progresses (or has completed); False when it needs attention."""
    if state.phase.is_terminal:
        ok = state.phase is ExecutionPhase.COMPLETED
        return condition(
            "Ready", "True" if ok else "False", state.phase.value, _ended(state), state.finished_at
        )
    if state.phase is ExecutionPhase.SUSPENDED:
        under = (state.resume_phase or ExecutionPhase.RUNNING).value
        message = f"suspended while {under}: nothing new is dispatched until it is resumed"
        return condition("Ready", "False", "Suspended", message, _since(state))
    if state.phase is ExecutionPhase.COMPENSATION_FAILED:
        return condition("Ready", "False", "CompensationFailed", *undo_failure(state))
    retrying = [s for s in state.steps.values() if s.phase is StepPhase.RETRYING]
    if retrying:
        step = min(retrying, key=lambda s: (s.next_retry_at is None, s.next_retry_at, s.name))
        error = f": {step.error.type}: {step.error.message}" if step.error else ""
        message = f"step {step.name} attempt {step.attempt} failed{error}"
        if step.next_retry_at is not None:
            message += f"; retry at {_ts(step.next_retry_at)}"
        at = step.finished_at or step.attempt_started_at or state.started_at
        return condition("Ready", "False", "StepRetrying", message, at)
    undoing = [s for s in state.steps.values() if s.undo and s.undo.status == "retrying"]
    if undoing:
        step = undoing[0]
        assert step.undo is not None
        undo_error = step.undo.error
        message = f"compensation of step {step.name} attempt {step.undo.attempt} failed"
        if undo_error is not None:
            message += f": {undo_error.type}: {undo_error.message}"
        if step.undo.next_retry_at is not None:
            message += f"; retry at {_ts(step.undo.next_retry_at)}"
        return condition("Ready", "False", "CompensationRetrying", message, _since(state))
    if state.phase is ExecutionPhase.PENDING and state.waiting:  # concurrency.maxExecutions
        return condition("Ready", "False", "Waiting", state.waiting, _since(state))
    # Since the last request (a resume, a redrive), else since the start.
    message = f"execution {state.phase.value.lower()}"
    return condition("Ready", "True", state.phase.value, message, _since(state))


def _ended(state: ExecutionState) -> str:
    """The cause, and what came of it (what was undone, or why nothing was)."""
    parts = [state.error.message] if state.error else []
    if state.outcome:
        if parts and parts[0] in state.outcome:
            return state.outcome
        parts.append(state.outcome)
    return "; ".join(parts) or f"execution {state.phase.value.lower()}"


def _since(state: ExecutionState) -> Any:
    return state.request.at if state.request is not None else state.started_at


def undo_failure(state: ExecutionState) -> tuple[str, Any]:
    """Which compensation failed, and how (what a person must act on), and when."""
    for step in state.steps.values():
        if step.phase is StepPhase.COMPENSATION_FAILED and step.undo is not None:
            error = step.undo.error
            told = f": {error.type}: {error.message}" if error is not None else ""
            message = (
                f"compensation of step {step.name} failed{told}; redrive to retry it, "
                "or list it in spec.skipCompensation once undone by hand"
            )
            return message, step.undo.finished_at
    return "compensation failed", _since(state)


def condition(kind: str, status: str, reason: str, message: str, at: Any) -> dict[str, Any]:
    """A condition as Kubernetes API conventions shape it; the message clipped."""
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": clip(message),
        "lastTransitionTime": _ts(at),
    }


def keep_transition_times(
    new: list[dict[str, Any]], old: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Conditions whose status did not change keep their old `lastTransitionTime`.

    Kubernetes conventions: the time says when the status last flipped, not when the
    condition was last written.
    """
    before = {c.get("type"): c for c in old or () if isinstance(c, dict)}
    kept = []
    for condition in new:
        prior = before.get(condition["type"])
        if prior and prior.get("status") == condition["status"] and prior.get("lastTransitionTime"):
            condition = {**condition, "lastTransitionTime": prior["lastTransitionTime"]}
        kept.append(condition)
    return kept


# Budgets of `bounded_status`: generous for people, small against etcd's 1.5 MB limit.
MAX_STATUS_BYTES = 256 * 1024
MAX_INLINE_OUTPUT_BYTES = 4 * 1024
MAX_MESSAGE_CHARS = 1024


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str))


def clip(text: str) -> str:
    """`text`, cut to `MAX_MESSAGE_CHARS` with a marker when longer."""
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    suffix = "... (truncated)"
    return text[: MAX_MESSAGE_CHARS - len(suffix)] + suffix


def _clip_error(holder: dict[str, Any]) -> None:
    error = holder.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        holder["error"] = {**error, "message": clip(error["message"])}


def bounded_status(status: dict[str, Any], budget: int = MAX_STATUS_BYTES) -> dict[str, Any]:
    """`status` made to fit `budget` bytes of JSON; what is left out stays in Postgres.

    In order, until it fits: messages are clipped and outputs above
    `MAX_INLINE_OUTPUT_BYTES` replaced by `outputTruncated: true` (always); then
    every step output is dropped; then the steps that are neither current nor failed
    are dropped from the list; then those steps' errors (`currentSteps`, the
    execution's error and the conditions remain).
    """
    out = dict(status)
    steps = [dict(s) for s in out.get("steps", ())]
    for holder in (out, *steps):
        _clip_error(holder)
        if "output" in holder and _size(holder["output"]) > MAX_INLINE_OUTPUT_BYTES:
            del holder["output"]
            holder["outputTruncated"] = True
    out["conditions"] = [
        {**c, "message": clip(c.get("message", ""))} for c in out.get("conditions", ())
    ]
    out["steps"] = steps
    if _size(out) <= budget:
        return out
    for step in steps:
        if "output" in step:
            del step["output"]
            step["outputTruncated"] = True
    if _size(out) <= budget:
        return out
    keep = {p.value for p in (*_CURRENT, StepPhase.FAILED, StepPhase.COMPENSATION_FAILED)}
    out["steps"] = [s for s in steps if s.get("phase") in keep]
    if _size(out) <= budget:
        return out
    # Hundreds of failing steps, each with a long message: their errors go too.
    out["steps"] = [{k: v for k, v in s.items() if k != "error"} for s in out["steps"]]
    return out


def execution_object(state: ExecutionState) -> dict[str, Any]:
    """A Kubernetes-style Execution object with status, as `-o json` prints it."""
    return {
        "apiVersion": API_VERSION,
        "kind": "Execution",
        "metadata": {"name": state.name, "namespace": state.namespace, "uid": state.execution_id},
        "spec": {"workflowRef": {"name": state.workflow}, "input": state.input},
        "status": execution_status(state),
    }
