"""The status projection: conditions, next retry, size bounds, and Events from history."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.core.harness import Run, task

from sagaflow.adapters.postgres.mirror_rows import HistoryRow
from sagaflow.core.definition import compile_definition
from sagaflow.core.engine import decide
from sagaflow.core.facts import Resume, Start, StepCompleted, StepFailed
from sagaflow.core.manifests import ExecutionStatus, WorkflowSpec
from sagaflow.core.state import ExecutionState, new_execution
from sagaflow.core.status import (
    MAX_STATUS_BYTES,
    bounded_status,
    execution_status,
    keep_transition_times,
)
from sagaflow.kube.events import event_for, event_name

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def run(steps: list[dict[str, Any]]) -> tuple[ExecutionState, Any]:
    spec = WorkflowSpec.model_validate({"steps": steps})
    definition = compile_definition(spec, name="wf", version=3)
    state = new_execution(
        execution_id="e1",
        namespace="ns",
        name="run",
        workflow="wf",
        version=3,
        input={},
        step_names=tuple(s["name"] for s in steps),
    )
    return decide(state, definition, Start(), T0).state, definition


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_a_retrying_step_makes_ready_false_with_the_retry_time() -> None:
    state, definition = run(
        [{"name": "a", "type": "svc.a", "retry": {"maxAttempts": 3, "initialInterval": "10s"}}]
    )
    state = decide(state, definition, StepFailed("a", 1, "Timeout", "slow"), T0).state
    status = execution_status(state)
    assert status["nextRetryAt"] == "2026-01-01T00:00:10Z"
    ready = conditions(status)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "StepRetrying")
    assert "Timeout: slow" in ready["message"] and "2026-01-01T00:00:10Z" in ready["message"]
    assert conditions(status)["Succeeded"]["status"] == "Unknown"
    ExecutionStatus.model_validate(status)  # fits the CRD's schema model


def test_a_completed_run_is_ready_and_succeeded_without_current_steps() -> None:
    state, definition = run([{"name": "a", "type": "svc.a"}])
    state = decide(state, definition, StepCompleted("a", 1, {"v": 1}), T0).state
    status = execution_status(state)
    assert "currentSteps" not in status and "nextRetryAt" not in status
    assert {c["status"] for c in status["conditions"]} == {"True"}


def test_unchanged_conditions_keep_their_transition_time() -> None:
    old = [
        {"type": "Ready", "status": "True", "lastTransitionTime": "early"},
        {"type": "Succeeded", "status": "Unknown", "lastTransitionTime": "early"},
    ]
    new = [
        {"type": "Ready", "status": "True", "lastTransitionTime": "late"},
        {"type": "Succeeded", "status": "True", "lastTransitionTime": "late"},
    ]
    kept = keep_transition_times(new, old)
    assert [c["lastTransitionTime"] for c in kept] == ["early", "late"]
    assert keep_transition_times(new, None) == new


def test_a_huge_status_is_bounded_and_keeps_what_matters() -> None:
    steps = [{"name": f"s{i}", "type": "svc.a"} for i in range(500)]
    state, definition = run(steps)
    big = {"blob": "x" * 3000}  # under the inline cap each, 1.5 MB together
    for i in range(499):
        state = decide(state, definition, StepCompleted(f"s{i}", 1, big), T0).state
    huge_error = "e" * 100_000
    state = decide(state, definition, StepFailed("s499", 1, "Boom", huge_error, False), T0).state
    raw = execution_status(state)
    assert len(json.dumps(raw)) > 1_000_000
    status = bounded_status(raw)
    size = len(json.dumps(status, separators=(",", ":")))
    assert size <= MAX_STATUS_BYTES
    assert status["phase"] == "Failed" and status["error"]["type"] == "Boom"
    assert len(status["error"]["message"]) <= 1024
    assert len(status["steps"]) == 500  # the outputs went, not the steps
    assert not any("output" in s for s in status["steps"])
    assert status["steps"][-1]["error"]["type"] == "Boom"
    ExecutionStatus.model_validate(status)


def test_hundreds_of_retrying_steps_with_long_errors_still_fit() -> None:
    steps = [{"name": f"s{i}", "type": "svc.a"} for i in range(500)]
    state, definition = run(steps)
    for i in range(500):
        state = decide(state, definition, StepFailed(f"s{i}", 1, "Boom", "e" * 5000), T0).state
    status = bounded_status(execution_status(state))
    assert len(json.dumps(status, separators=(",", ":"))) <= MAX_STATUS_BYTES
    assert len(status["currentSteps"]) == 500 and len(status["steps"]) == 500
    assert conditions(status)["Ready"]["reason"] == "StepRetrying"
    ExecutionStatus.model_validate(status)


def test_a_large_output_is_replaced_by_a_marker() -> None:
    state, definition = run([{"name": "a", "type": "svc.a"}])
    state = decide(state, definition, StepCompleted("a", 1, {"blob": "x" * 10_000}), T0).state
    status = bounded_status(execution_status(state))
    [step] = status["steps"]
    assert "output" not in step and step["outputTruncated"] is True
    ExecutionStatus.model_validate(status)


def test_history_rows_become_events_named_after_the_row() -> None:
    at = T0 + timedelta(seconds=5)
    row = HistoryRow(42, at, "StepRetrying", "a", 1, "step a attempt 1 failed")
    event = event_for(row, namespace="ns", name="run", execution_id="abcdef123456", instance="i")
    assert event is not None
    assert event["metadata"] == {"name": event_name("run", "abcdef123456", 42), "namespace": "ns"}
    assert event["type"] == "Warning" and event["reason"] == "StepRetrying"
    assert event["involvedObject"]["uid"] == "abcdef123456"
    assert event["lastTimestamp"] == "2026-01-01T00:00:05Z"
    quiet = HistoryRow(43, at, "MessageIgnored", None, None, "late")
    assert event_for(quiet, namespace="ns", name="run", execution_id="e", instance="i") is None
    done = HistoryRow(44, at, "ExecutionCompleted", None, None, "done")
    normal = event_for(done, namespace="ns", name="run", execution_id="e", instance="i")
    assert normal is not None and normal["type"] == "Normal"


# ------------------------------------------------------------------ sagas


def _saga_run() -> Run:
    once = {"type": "demo.undo", "retry": {"maxAttempts": 1}}
    run = Run([task("a", compensate=once), task("b", "a")])
    run.start()
    run.complete("a", 1, {"id": "A"}, at=1)
    run.fail("b", 1, "Declined", "card declined", retryable=False, at=2)
    return run


def test_the_status_of_a_failed_compensation_names_the_step_and_what_to_do() -> None:
    run = _saga_run()
    run(StepFailed("a", 1, "Down", "warehouse offline", False, compensation=True), at=3)

    status = execution_status(run.state)

    assert status["phase"] == "CompensationFailed"
    assert status["error"] == {
        "type": "Declined",
        "message": "step b failed: card declined",
        "step": "b",
    }
    a = next(s for s in status["steps"] if s["name"] == "a")
    assert a["phase"] == "CompensationFailed"
    assert a["compensation"]["attempts"] == 1
    assert a["compensation"]["error"] == {"type": "Down", "message": "warehouse offline"}
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "CompensationFailed"
    assert "step a failed: Down: warehouse offline; redrive" in ready["message"]
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("False", "CompensationFailed")
    assert "finishedAt" not in status  # settled, not finished


def test_a_compensating_step_is_current_and_a_refused_request_is_a_condition() -> None:
    run = _saga_run()
    run(Resume(), at=4)

    status = execution_status(run.state)

    assert status["phase"] == "Compensating"
    assert status["currentSteps"] == ["a"]
    request = next(c for c in status["conditions"] if c["type"] == "Request")
    assert request["status"] == "False"
    assert request["reason"] == "ResumeRefused"
    assert "not suspended" in request["message"]
