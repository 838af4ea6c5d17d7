"""The saga rules of the engine: compensation order, in-doubt steps, pivot, retries and
failures of compensations, skipCompensation.

Each test drives one execution through `decide` with a fixed clock and asserts what
the engine decided: which compensations it dispatched and when, with what input,
and the phases and history it recorded.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.core.harness import Run, assert_ignored, kinds, task

from sagaflow.core.decisions import Decision
from sagaflow.core.facts import Cancel, Redrive, SkipCompensation, StepCompleted, StepFailed
from sagaflow.core.manifests import ExecutionPhase, StepPhase

E = ExecutionPhase
S = StepPhase

UNDO = "demo.undo"


def undoable(name: str, *depends_on: str, **fields: Any) -> dict[str, Any]:
    """A step whose compensation is `demo.undo`, reading the step's own input and output."""
    compensate = {
        "type": UNDO,
        "input": {
            "of": name,
            "gave": f'${{{{ steps."{name}".output }}}}',
            "got": f'${{{{ steps."{name}".input }}}}',
            "because": "${{ error.step }}",
        },
        **fields.pop("compensate", {}),
    }
    return task(name, *depends_on, compensate=compensate, **fields)


def undos(decision: Decision) -> list[tuple[str, int]]:
    return [(d.step, d.attempt) for d in decision.dispatches if d.compensation]


def undone(run: Run, step: str, attempt: int = 1, at: float = 0.0) -> Decision:
    return run(StepCompleted(step, attempt, {}, compensation=True), at)


def undo_failed(
    run: Run, step: str, attempt: int = 1, *, retryable: bool = True, at: float = 0.0
) -> Decision:
    return run(StepFailed(step, attempt, "Down", "undo failed", retryable, compensation=True), at)


def chain() -> Run:
    """a -> b -> c; c fails for good once a and b succeeded."""
    run = Run([undoable("a", input={"n": 1}), undoable("b", "a"), task("c", "b")])
    run.start()
    run.complete("a", 1, {"id": "A"})
    run.complete("b", 1, {"id": "B"})
    return run


# ------------------------------------------------------------------ order


def test_a_failed_chain_is_undone_in_reverse_order() -> None:
    run = chain()

    failing = run.fail("c", 1, retryable=False)

    assert undos(failing) == [("b", 1)]  # a waits for b
    assert run.state.phase is E.COMPENSATING
    assert run.state.error is not None
    assert run.state.error.step == "c"
    assert run.phases() == {"a": S.SUCCEEDED, "b": S.COMPENSATING, "c": S.FAILED}
    assert "ExecutionCompensating" in kinds(failing)
    first = undone(run, "b")
    assert undos(first) == [("a", 1)]
    last = undone(run, "a")
    assert run.state.phase is E.COMPENSATED
    assert run.phases() == {"a": S.COMPENSATED, "b": S.COMPENSATED, "c": S.FAILED}
    assert kinds(last)[-1] == "ExecutionCompensated"
    assert run.state.finished_at is not None


def test_a_compensation_reads_its_steps_input_output_and_the_error() -> None:
    run = chain()

    decision = run.fail("c", 1, retryable=False)

    (command,) = decision.dispatches
    assert command.compensation
    assert command.type == UNDO
    assert command.input == {"of": "b", "gave": {"id": "B"}, "got": {}, "because": "c"}
    undone(run, "b")
    assert run.step("a").input == {"n": 1}


def test_a_diamond_undoes_its_branches_in_parallel_and_the_root_last() -> None:
    run = Run(
        [undoable("a"), undoable("b", "a"), undoable("c", "a"), task("d", "b", "c")],
    )
    run.start()
    run.complete("a", 1)
    run.complete("b", 1)
    run.complete("c", 1)

    decision = run.fail("d", 1, retryable=False)

    assert sorted(undos(decision)) == [("b", 1), ("c", 1)]
    assert undos(undone(run, "c")) == []  # b still being undone
    assert undos(undone(run, "b")) == [("a", 1)]


def test_max_parallel_bounds_the_compensations_running_at_once() -> None:
    steps = [undoable("a"), undoable("b", "a"), undoable("c", "a"), task("d", "b", "c")]
    run = Run(steps, compensation={"maxParallel": 1})
    run.start()
    for name in ("a", "b", "c"):
        run.complete(name, 1)

    decision = run.fail("d", 1, retryable=False)

    assert len(undos(decision)) == 1
    ((first, _),) = undos(decision)
    other = "b" if first == "c" else "c"
    # A retrying compensation keeps its slot.
    assert undos(undo_failed(run, first)) == []
    assert undos(run.fire("compensation-retry", first, 2, at=5)) == [(first, 2)]
    assert undos(undone(run, first, 2)) == [(other, 1)]
    assert undos(undone(run, other)) == [("a", 1)]


def test_a_step_that_failed_or_has_no_compensate_is_not_undone() -> None:
    run = Run([task("plain"), undoable("a"), undoable("b", "a")])
    run.start()
    run.complete("plain", 1)
    run.complete("a", 1)

    decision = run.fail("b", 1, retryable=False)

    assert undos(decision) == [("a", 1)]
    undone(run, "a")
    assert run.phases() == {"plain": S.SUCCEEDED, "a": S.COMPENSATED, "b": S.FAILED}


def test_a_failure_with_nothing_to_undo_ends_failed() -> None:
    run = Run([undoable("a"), task("b")])
    run.start()

    decision = run.fail("a", 1, retryable=False)

    assert run.state.phase is E.FAILED
    assert decision.dispatches == ()
    assert kinds(decision)[-1] == "ExecutionFailed"


def test_retry_timers_of_other_steps_are_cancelled_when_compensation_starts() -> None:
    run = Run([undoable("a"), task("b", "a"), task("c", "a")])
    run.start()
    run.complete("a", 1)
    run.fail("b", 1)  # retrying

    decision = run.fail("c", 1, retryable=False)

    assert "retry:b:2" in decision.cancel_timers
    assert run.step("b").phase is S.FAILED
    assert undos(decision) == [("a", 1)]


def test_the_workflow_timeout_starts_compensation() -> None:
    run = Run([undoable("a"), task("b", "a")], timeout="1m")
    run.start()
    run.complete("a", 1)

    decision = run.fire("workflow-timeout", at=60)

    assert undos(decision) == [("a", 1)]
    assert run.state.error is not None
    assert run.state.error.type == "WorkflowTimeout"


# -------------------------------------------------------- retries, failures


def test_a_compensation_is_retried_on_its_own_policy_then_succeeds() -> None:
    retry = {"maxAttempts": 3, "initialInterval": "2s"}
    run = Run([undoable("a", compensate={"retry": retry}), task("b", "a")])
    run.start()
    run.complete("a", 1)
    run.fail("b", 1, retryable=False)

    retrying = undo_failed(run, "a", at=1)

    assert "StepCompensationRetrying" in kinds(retrying)
    assert [(t.kind, t.attempt, t.due_at.second) for t in retrying.timers] == [
        ("compensation-retry", 2, 3)
    ]
    assert undos(run.fire("compensation-retry", "a", 2, at=3)) == [("a", 2)]
    undone(run, "a", 2)
    assert run.state.phase is E.COMPENSATED
    assert run.step("a").undo is not None
    assert run.step("a").undo.attempt == 2


def test_a_compensation_that_times_out_is_retried() -> None:
    comp = {"timeout": "10s", "retry": {"maxAttempts": 2, "initialInterval": "0s"}}
    run = Run([undoable("a", compensate=comp), task("b", "a")])
    run.start()
    run.complete("a", 1)
    first = run.fail("b", 1, retryable=False)
    assert [t.kind for t in first.timers] == ["compensation-timeout"]

    decision = run.fire("compensation-timeout", "a", 1, at=10)

    assert "StepCompensationTimedOut" in kinds(decision)
    assert [t.kind for t in decision.timers] == ["compensation-retry"]


def test_an_exhausted_compensation_blocks_its_dependencies_and_not_the_others() -> None:
    once = {"retry": {"maxAttempts": 1}}
    run = Run(
        [
            undoable("root"),
            undoable("left", "root", compensate=once),
            undoable("right", "root"),
            undoable("alone"),
            task("end", "left", "right", "alone"),
        ]
    )
    run.start()
    for name in ("root", "left", "right", "alone"):
        run.complete(name, 1)
    run.fail("end", 1, retryable=False)

    undo_failed(run, "left")
    undone(run, "right")
    decision = undone(run, "alone")

    assert run.step("left").phase is S.COMPENSATION_FAILED
    assert run.step("root").phase is S.SUCCEEDED  # waits behind left
    assert run.state.phase is E.COMPENSATION_FAILED
    assert kinds(decision)[-1] == "ExecutionCompensationFailed"
    assert "left" in decision.records[-1].message
    assert run.state.finished_at is None  # settled, not terminal


def blocked_chain() -> Run:
    """a -> b -> c; c failed, and b's compensation failed for good: a waits behind it."""
    once = {"retry": {"maxAttempts": 1}}
    run = Run([undoable("a"), undoable("b", "a", compensate=once), task("c", "b")])
    run.start()
    run.complete("a", 1)
    run.complete("b", 1)
    run.fail("c", 1, retryable=False)
    undo_failed(run, "b")
    return run


def test_a_redrive_retries_failed_compensations_with_attempts_continuing() -> None:
    run = blocked_chain()
    assert run.state.phase is E.COMPENSATION_FAILED

    decision = run(Redrive(), at=30)

    assert undos(decision) == [("b", 2)]
    assert run.state.redrives == 1
    assert run.state.phase is E.COMPENSATING
    assert undos(undone(run, "b", 2)) == [("a", 1)]
    undone(run, "a")
    assert run.state.phase is E.COMPENSATED


def test_skipping_a_failed_compensation_lets_the_rest_go_on() -> None:
    run = blocked_chain()

    decision = run(SkipCompensation(("b",)))

    assert run.step("b").phase is S.COMPENSATION_SKIPPED
    assert undos(decision) == [("a", 1)]
    undone(run, "a")
    assert run.state.phase is E.COMPENSATED


def test_a_step_listed_before_the_failure_is_not_undone() -> None:
    run = Run([undoable("a"), undoable("b", "a"), task("c", "b")])
    run.start()
    run(SkipCompensation(("b",)))
    run.complete("a", 1)
    run.complete("b", 1)

    decision = run.fail("c", 1, retryable=False)

    assert undos(decision) == [("a", 1)]
    assert run.step("b").phase is S.COMPENSATION_SKIPPED


def test_a_compensation_whose_input_cannot_render_fails_for_good() -> None:
    comp = {"input": {"n": "${{ length(steps.a.output.count) }}"}}
    run = Run([undoable("a", compensate=comp), task("b", "a")])
    run.start()
    run.complete("a", 1, {"count": 3})

    run.fail("b", 1, retryable=False)

    assert run.step("a").phase is S.COMPENSATION_FAILED
    assert run.step("a").undo is not None
    assert run.step("a").undo.error is not None
    assert run.step("a").undo.error.type == "ExpressionError"
    assert run.state.phase is E.COMPENSATION_FAILED


def test_a_duplicated_or_stale_compensation_result_is_ignored() -> None:
    run = chain()
    run.fail("c", 1, retryable=False)
    undone(run, "b")
    before = run.state

    assert_ignored(undone(run, "b"), before, "already settled")
    assert_ignored(undone(run, "b", 7), before, "not current")
    assert_ignored(undone(run, "c"), before, "not being undone")


# ------------------------------------------------------------------ in doubt


def in_doubt(policy: str) -> tuple[Run, Decision]:
    """a; then b and c in parallel; b fails for good while c's attempt is in flight."""
    run = Run(
        [undoable("a"), task("b", "a"), undoable("c", "a")],
        compensation={"inDoubt": policy},
    )
    run.start()
    run.complete("a", 1)
    return run, run.fail("b", 1, retryable=False)


def test_in_doubt_await_waits_for_the_result_and_undoes_a_success() -> None:
    run, decision = in_doubt("await")

    assert undos(decision) == []  # a waits for c, c for its result
    assert run.state.phase is E.COMPENSATING
    assert "StepInDoubt" in kinds(decision)
    assert undos(run.complete("c", 1)) == [("c", 1)]
    assert undos(undone(run, "c")) == [("a", 1)]


def test_in_doubt_await_does_not_undo_a_failure() -> None:
    run, _ = in_doubt("await")

    decision = run.fail("c", 1)  # retryable, but nothing is retried now

    assert run.step("c").phase is S.FAILED
    assert undos(decision) == [("a", 1)]


def test_in_doubt_compensate_undoes_at_once_and_ignores_the_late_result() -> None:
    run, decision = in_doubt("compensate")

    assert undos(decision) == [("c", 1)]
    before = run.state
    assert_ignored(run.complete("c", 1), before, "already settled")


def test_in_doubt_skip_leaves_the_step() -> None:
    run, decision = in_doubt("skip")

    assert undos(decision) == [("a", 1)]
    undone(run, "a")
    run.complete("c", 1)
    assert run.step("c").phase is S.SUCCEEDED
    assert run.state.phase is E.COMPENSATED


# ------------------------------------------------------------------- pivot


def test_after_a_pivot_succeeded_a_failure_is_not_compensated() -> None:
    run = Run([undoable("a"), task("ship", "a", pivot=True), task("notify", "ship")])
    run.start()
    run.complete("a", 1)
    run.complete("ship", 1)

    decision = run.fail("notify", 1, retryable=False)

    assert decision.dispatches == ()
    assert run.state.phase is E.FAILED
    assert "pivot step ship succeeded" in decision.records[-1].message


def test_before_the_pivot_succeeded_a_failure_is_compensated() -> None:
    run = Run([undoable("a"), task("ship", "a", pivot=True)])
    run.start()
    run.complete("a", 1)

    decision = run.fail("ship", 1, retryable=False)

    assert undos(decision) == [("a", 1)]


@pytest.mark.parametrize("on_cancel", [True, False])
def test_a_cancel_undoes_what_was_done_unless_on_cancel_is_false(on_cancel: bool) -> None:
    run = Run([undoable("a"), task("b", "a")], compensation={"onCancel": on_cancel}, timeout="1h")
    run.start()
    run.complete("a", 1)

    decision = run(Cancel("no longer needed"))

    assert "workflow-timeout" in decision.cancel_timers
    assert run.step("b").phase is S.RUNNING  # in flight: its result is still recorded
    if on_cancel:
        assert undos(decision) == [("a", 1)]
        undone(run, "a")
        assert run.state.phase is E.COMPENSATED
    else:
        assert decision.dispatches == ()
        assert run.state.phase is E.CANCELLED
    assert run.state.error is not None
    assert run.state.error.type == "Cancelled"


def test_a_cancel_with_nothing_to_undo_ends_cancelled() -> None:
    run = Run([task("a"), undoable("b", "a")])
    run.start()

    run(Cancel())

    assert run.state.phase is E.CANCELLED


def test_a_cancel_after_the_pivot_undoes_nothing() -> None:
    run = Run([undoable("a"), task("ship", "a", pivot=True), task("notify", "ship")])
    run.start()
    run.complete("a", 1)
    run.complete("ship", 1)

    decision = run(Cancel("too late to undo"))

    assert decision.dispatches == ()
    assert run.state.phase is E.CANCELLED
    assert run.step("a").phase is S.SUCCEEDED
    assert "pivot step ship succeeded" in decision.records[-1].message
