"""Control requests through the engine: suspend, resume, cancel, redrive, skipCompensation.

Each request either takes effect, is a no-op (its effect already holds: `ignored`),
or is refused (recorded, with the reason in `state.request`). The clock is fixed.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.core.harness import Run, assert_ignored, dispatched, kinds, task

from sagaflow.core.definition import compile_definition
from sagaflow.core.facts import Cancel, Fact, Redrive, Resume, SkipCompensation, Start, Suspend
from sagaflow.core.manifests import ExecutionPhase, StepPhase, WorkflowSpec

E = ExecutionPhase
S = StepPhase


def refused(run: Run, fact: Fact, reason: str) -> None:
    before = run.state
    decision = run(fact)
    assert decision.applied
    assert kinds(decision) == ["RequestRefused"]
    assert decision.dispatches == ()
    assert run.state.request is not None
    assert not run.state.request.accepted
    assert reason in run.state.request.message
    assert run.state.phase is before.phase
    assert run.state.steps == before.steps


# ------------------------------------------------------------------ suspend


def test_nothing_is_dispatched_while_suspended_and_resume_dispatches_what_is_ready() -> None:
    run = Run([task("a"), task("b", "a")])
    run.start()

    suspended = run(Suspend())
    in_flight = run.complete("a", 1, at=2)

    assert kinds(suspended) == ["ExecutionSuspended"]
    assert run.state.phase is E.SUSPENDED
    assert in_flight.applied  # the attempt in flight is recorded
    assert run.step("a").phase is S.SUCCEEDED
    assert dispatched(in_flight) == []
    resumed = run(Resume(), at=3)
    assert dispatched(resumed) == [("b", 1)]
    assert run.state.phase is E.RUNNING
    assert run.state.request is not None
    assert run.state.request.accepted


def test_a_retry_that_comes_due_while_suspended_waits_for_the_resume() -> None:
    run = Run([task("a", retry={"initialInterval": "5s"})])
    run.start()
    run(Suspend())
    run.fail("a", 1, at=1)  # retrying at 6

    due = run.fire("retry", "a", 2, at=6)

    assert due.dispatches == ()
    assert dispatched(run(Resume(), at=8)) == [("a", 2)]


def test_a_retry_not_yet_due_at_resume_keeps_its_timer() -> None:
    run = Run([task("a", retry={"initialInterval": "5s"})])
    run.start()
    run(Suspend())
    run.fail("a", 1, at=1)

    resumed = run(Resume(), at=2)

    assert dispatched(resumed) == []
    assert dispatched(run.fire("retry", "a", 2, at=6)) == [("a", 2)]


def test_the_workflow_timeout_keeps_counting_while_suspended() -> None:
    comp = {"type": "demo.undo"}
    run = Run([task("a", compensate=comp), task("b", "a")], timeout="1m")
    run.start()
    run.complete("a", 1)
    run(Suspend())

    timed_out = run.fire("workflow-timeout", at=60)

    assert timed_out.dispatches == ()  # compensation waits for the resume too
    assert run.state.phase is E.SUSPENDED
    assert run.state.resume_phase is E.COMPENSATING
    resumed = run(Resume(), at=70)
    assert [(d.step, d.compensation) for d in resumed.dispatches] == [("a", True)]


def test_a_run_created_suspended_dispatches_nothing_until_resumed() -> None:
    run = Run([task("a")])

    started = run(Start(suspend=True))

    assert started.dispatches == ()
    assert run.state.phase is E.SUSPENDED
    assert dispatched(run(Resume())) == [("a", 1)]


def test_a_second_suspend_is_a_no_op_and_resume_of_a_running_run_is_refused() -> None:
    run = Run([task("a")])
    run.start()
    run(Suspend())
    before = run.state

    assert_ignored(run(Suspend()), before, "already suspended")
    run(Resume())
    refused(run, Resume(), "not suspended")


def test_suspending_a_finished_run_is_refused() -> None:
    run = Run([task("a")])
    run.start()
    run.complete("a", 1)

    refused(run, Suspend(), "Completed")


def test_a_cancel_lifts_the_suspension_and_undoes() -> None:
    run = Run([task("a", compensate={"type": "demo.undo"}), task("b", "a")])
    run.start()
    run.complete("a", 1)
    run(Suspend())

    decision = run(Cancel())

    assert [d.step for d in decision.dispatches if d.compensation] == ["a"]
    assert run.state.phase is E.COMPENSATING


def test_a_cancel_of_a_finished_or_undoing_run_changes_nothing() -> None:
    run = Run([task("a", compensate={"type": "demo.undo"}), task("b", "a")])
    run.start()
    run.complete("a", 1)
    run(Cancel())
    before = run.state

    assert_ignored(run(Cancel()), before, "already compensating")


# ------------------------------------------------------------------ redrive


def failed_run(**workflow: Any) -> Run:
    run = Run([task("a"), task("b", "a"), task("c", "b")], **workflow)
    run.start()
    run.complete("a", 1, {"id": "A"})
    run.fail("b", 1, retryable=False, at=1)
    return run


def test_a_redrive_reruns_what_did_not_succeed_and_keeps_the_rest() -> None:
    run = failed_run(timeout="1m")
    assert run.state.phase is E.FAILED

    decision = run(Redrive(1), at=100)

    assert dispatched(decision) == [("b", 2)]  # attempt numbers continue
    assert run.step("a").output == {"id": "A"}
    assert run.step("a").attempt == 1
    assert run.step("c").phase is S.PENDING
    assert run.state.phase is E.RUNNING
    assert run.state.error is None
    assert run.state.redrives == 1
    assert [(t.kind, t.due_at.minute) for t in decision.timers if t.kind == "workflow-timeout"] == [
        ("workflow-timeout", 2)  # the workflow timeout starts again at the redrive
    ]
    assert "ExecutionRedriven" in kinds(decision)
    run.complete("b", 2)
    run.complete("c", 1)
    assert run.state.phase is E.COMPLETED


def test_the_same_redrive_number_twice_is_a_no_op() -> None:
    run = failed_run()
    run(Redrive(1))
    run.fail("b", 2, retryable=False)
    before = run.state

    assert_ignored(run(Redrive(1)), before, "redrive 1 already handled")
    assert dispatched(run(Redrive(2))) == [("b", 3)]
    assert run.state.redrives == 2


@pytest.mark.parametrize(
    ("finish", "phase"),
    [
        pytest.param(lambda r: r.complete("a", 1), "Completed", id="completed"),
        pytest.param(lambda r: r(Cancel()), "Cancelled", id="cancelled"),
        pytest.param(lambda r: None, "Running", id="running"),
    ],
)
def test_a_redrive_of_a_run_that_did_not_fail_is_refused(finish: Any, phase: str) -> None:
    run = Run([task("a")])
    run.start()
    finish(run)

    refused(run, Redrive(), f"a {phase} execution cannot be redriven")
    assert run.state.redrive_requests == 1  # the request is handled, once


def test_a_redrive_to_the_latest_version_runs_the_fixed_steps() -> None:
    run = failed_run()
    fixed = WorkflowSpec.model_validate(
        {"steps": [task("a"), task("b", "a", kind="demo.fixed"), task("c", "b"), task("d", "c")]}
    )
    run.definition = compile_definition(fixed, name="orders", version=4)

    decision = run(Redrive(to_latest=True))

    assert [(d.step, d.type) for d in decision.dispatches] == [("b", "demo.fixed")]
    assert run.state.version == 4
    assert list(run.state.steps) == ["a", "b", "c", "d"]
    assert "onto v4" in decision.records[0].message


def test_a_redrive_to_a_version_without_a_kept_step_is_refused() -> None:
    run = failed_run()
    spec = WorkflowSpec.model_validate({"steps": [task("b"), task("c", "b")]})
    run.definition = compile_definition(spec, name="orders", version=4)

    refused(run, Redrive(to_latest=True), "lacks steps this run keeps: a")
    assert run.state.version == 3


# --------------------------------------------------------- skipCompensation


def test_skip_compensation_of_an_unknown_step_is_refused() -> None:
    run = Run([task("a")])
    run.start()

    refused(run, SkipCompensation(("nope",)), "unknown steps: nope")


def test_the_same_skip_list_twice_is_a_no_op() -> None:
    run = Run([task("a", compensate={"type": "demo.undo"})])
    run.start()
    run(SkipCompensation(("a",)))
    before = run.state

    assert_ignored(run(SkipCompensation(("a",))), before, "already listed")
