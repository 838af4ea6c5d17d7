"""Project an execution's state into the `Execution.status` users read.

Pure and shared: local mode prints it, the operator mirrors it into the custom
resource. Status is a view of Postgres, bounded in size: history stays in the
database. Conditions follow Kubernetes API conventions (`Succeeded`). A step output
stored by reference shows as `outputRef` (uri, size, sha256), never its payload.
"""

from __future__ import annotations

from typing import Any

from sagaflow.core.manifests import API_VERSION, ExecutionPhase, StepPhase
from sagaflow.core.payload_refs import is_ref, ref_of
from sagaflow.core.state import ExecutionState, StepState

_SUCCEEDED = {
    ExecutionPhase.COMPLETED: ("True", "Completed"),
    ExecutionPhase.FAILED: ("False", "Failed"),
    ExecutionPhase.CANCELLED: ("False", "Cancelled"),
}


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
    if step.phase is StepPhase.SUCCEEDED and step.output is not None:
        if is_ref(step.output):
            out["outputRef"] = ref_of(step.output).to_json()
        else:
            out["output"] = step.output
    if step.error is not None:
        out["error"] = step.error.to_json()
    return out


def current_steps(state: ExecutionState) -> list[str]:
    return [
        s.name for s in state.steps.values() if s.phase in (StepPhase.RUNNING, StepPhase.RETRYING)
    ]


def execution_status(state: ExecutionState) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": state.phase.value, "workflowVersion": state.version}
    if state.started_at:
        status["startedAt"] = _ts(state.started_at)
    if state.finished_at:
        status["finishedAt"] = _ts(state.finished_at)
    current = current_steps(state)
    if current:
        status["currentSteps"] = current
    status["steps"] = [step_status(s) for s in state.steps.values()]
    if state.output is not None:
        status["output"] = state.output
    if state.error is not None:
        status["error"] = state.error.to_json()
    verdict, reason = _SUCCEEDED.get(state.phase, ("Unknown", state.phase.value))
    message = state.error.message if state.error else f"execution {state.phase.value.lower()}"
    status["conditions"] = [
        {
            "type": "Succeeded",
            "status": verdict,
            "reason": reason,
            "message": message,
            "lastTransitionTime": _ts(state.finished_at or state.started_at),
        }
    ]
    status["revision"] = state.revision
    return status


def execution_object(state: ExecutionState) -> dict[str, Any]:
    """A Kubernetes-style Execution object with status, as `-o json` prints it."""
    return {
        "apiVersion": API_VERSION,
        "kind": "Execution",
        "metadata": {"name": state.name, "namespace": state.namespace, "uid": state.execution_id},
        "spec": {"workflowRef": {"name": state.workflow}, "input": state.input},
        "status": execution_status(state),
    }
