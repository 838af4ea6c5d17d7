"""The pure side of concurrency limits (`sagaflow.core.admission`): which phases hold a
slot, how many are free, start or wait and why, and the wait and admit transitions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sagaflow.core import admission
from sagaflow.core.definition import Definition, compile_definition
from sagaflow.core.manifests import ExecutionPhase, WorkflowSpec
from sagaflow.core.state import ExecutionState, new_execution

pytestmark = pytest.mark.timeout(30)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _definition(steps: list[dict[str, object]], limit: int | None = 2) -> Definition:
    body: dict[str, object] = {"steps": steps}
    if limit is not None:
        body["concurrency"] = {"maxExecutions": limit}
    return compile_definition(WorkflowSpec.model_validate(body), name="wf", version=3)


def _state(definition: Definition) -> ExecutionState:
    return new_execution(
        execution_id="e-1",
        namespace="default",
        name="run-1",
        workflow="wf",
        version=3,
        input={},
        step_names=definition.step_names,
    )


@pytest.mark.parametrize(
    ("phase", "holds"),
    [
        (ExecutionPhase.PENDING, False),
        (ExecutionPhase.RUNNING, True),
        (ExecutionPhase.SUSPENDED, True),
        (ExecutionPhase.COMPENSATING, True),
        (ExecutionPhase.COMPENSATION_FAILED, True),  # settled, not finished: may go on
        (ExecutionPhase.COMPLETED, False),
        (ExecutionPhase.FAILED, False),
        (ExecutionPhase.COMPENSATED, False),
        (ExecutionPhase.CANCELLED, False),
    ],
)
def test_a_slot_is_held_from_the_start_until_the_run_is_terminal(
    phase: ExecutionPhase, holds: bool
) -> None:
    assert admission.holds_slot(phase) is holds


@pytest.mark.parametrize(
    ("limit", "running", "free"),
    [(None, 0, None), (None, 99, None), (2, 0, 2), (2, 1, 1), (2, 2, 0), (2, 5, 0)],
)
def test_room_is_what_the_limit_leaves(limit: int | None, running: int, free: int | None) -> None:
    assert admission.room(limit, running) == free


@pytest.mark.parametrize(
    ("running", "queued", "starts"),
    [(0, False, True), (1, False, True), (2, False, False), (3, False, False), (1, True, False)],
)
def test_a_new_execution_starts_only_with_a_slot_and_nobody_before_it(
    running: int, queued: bool, starts: bool
) -> None:
    reason = admission.wait_reason("orders", 2, running, queued=queued)
    assert (reason is None) is starts


def test_the_reason_names_the_count_the_limit_the_workflow_and_the_field() -> None:
    reason = admission.wait_reason("orders", 2, 2, queued=False)
    assert reason == (
        "waiting for a slot: 2 of 2 executions of workflow orders are running "
        "(concurrency.maxExecutions)"
    )
    behind = admission.wait_reason("orders", 2, 1, queued=True)
    assert behind is not None and "earlier executions of workflow orders wait first" in behind


def test_wait_keeps_the_run_pending_with_the_reason_in_state_and_history() -> None:
    definition = _definition([{"name": "a", "type": "svc.a"}])
    state = _state(definition)
    decision = admission.wait(state, "waiting for a slot: 2 of 2")
    assert decision.applied and not decision.dispatches
    assert decision.state.phase is ExecutionPhase.PENDING
    assert decision.state.waiting == "waiting for a slot: 2 of 2"
    assert decision.state.revision == state.revision + 1
    assert [(r.kind, r.message) for r in decision.records] == [
        ("ExecutionWaiting", "waiting for a slot: 2 of 2")
    ]
    assert decision.state.to_json()["waiting"] == "waiting for a slot: 2 of 2"


def test_admit_clears_the_reason_and_starts_the_run() -> None:
    definition = _definition([{"name": "a", "type": "svc.a"}])
    waiting = admission.wait(_state(definition), "full").state
    decision = admission.admit(waiting, definition, False, T0, limit=2, running=1)
    assert decision.state.phase is ExecutionPhase.RUNNING and decision.state.waiting is None
    assert [d.step for d in decision.dispatches] == ["a"]
    kinds = [r.kind for r in decision.records]
    assert kinds[:2] == ["ExecutionAdmitted", "ExecutionStarted"]
    assert "2 of 2 running" in decision.records[0].message


def test_admit_honours_spec_suspend_and_a_removed_limit() -> None:
    definition = _definition([{"name": "a", "type": "svc.a"}], limit=None)
    waiting = admission.wait(_state(definition), "full").state
    decision = admission.admit(waiting, definition, True, T0, limit=None, running=4)
    assert decision.state.phase is ExecutionPhase.SUSPENDED and not decision.dispatches
    assert "no limit now" in decision.records[0].message


def test_a_run_admitted_with_nothing_to_do_completes_and_frees_its_slot_at_once() -> None:
    definition = _definition([{"name": "a", "type": "sagaflow.pass"}])
    waiting = admission.wait(_state(definition), "full").state
    decision = admission.admit(waiting, definition, False, T0, limit=2, running=1)
    assert decision.state.phase is ExecutionPhase.COMPLETED
    assert not admission.holds_slot(decision.state.phase)


def test_admitting_a_run_that_is_no_longer_pending_changes_nothing() -> None:
    definition = _definition([{"name": "a", "type": "svc.a"}])
    started = admission.admit(_state(definition), definition, False, T0, limit=2, running=0)
    again = admission.admit(started.state, definition, False, T0, limit=2, running=1)
    assert not again.applied and "already Running" in (again.ignored or "")
