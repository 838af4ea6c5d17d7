"""The engine's data flow and coordination rules: when, forEach, finally, signals.

Table-driven where a rule has cases; every test feeds facts at fixed times through
the pure engine and asserts what it decided (dispatches, phases, records).
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.core.harness import E, S, t

from sagaflow.core.decisions import Decision
from sagaflow.core.definition import compile_definition
from sagaflow.core.engine import decide
from sagaflow.core.facts import (
    Cancel,
    Fact,
    Redrive,
    SignalReceived,
    Start,
    StepCompleted,
    StepFailed,
    TimerFired,
)
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.state import ExecutionState, new_execution
from sagaflow.core.status import execution_status

pytestmark = pytest.mark.timeout(30)


class Flow:
    """A run of one workflow manifest (camelCase dict) through the engine."""

    def __init__(self, spec: dict[str, Any], execution_input: dict[str, Any] | None = None):
        self.definition = compile_definition(
            WorkflowSpec.model_validate(spec), name="orders", version=1
        )
        self.state: ExecutionState = new_execution(
            execution_id="e1",
            namespace="shop",
            name="order-1",
            workflow="orders",
            version=1,
            input=execution_input or {},
            step_names=self.definition.step_names,
        )
        self.decisions: list[Decision] = []

    def __call__(self, fact: Fact, at: float = 0.0) -> Decision:
        decision = decide(self.state, self.definition, fact, t(at))
        self.state = decision.state
        self.decisions.append(decision)
        return decision

    def ok(self, step: str, attempt: int = 1, output: Any = None, **kw: Any) -> Decision:
        return self(StepCompleted(step, attempt, {} if output is None else output, **kw))

    def fail(self, step: str, attempt: int = 1, *, retryable: bool = False, **kw: Any) -> Decision:
        return self(StepFailed(step, attempt, "Boom", "kaput", retryable, **kw))

    def phase(self, step: str) -> S:
        return self.state.steps[step].phase

    def records(self) -> list[str]:
        return [r.kind for d in self.decisions for r in d.records]


def steps_of(decision: Decision) -> list[str]:
    return [d.step for d in decision.dispatches]


def task(name: str, *deps: str, **fields: Any) -> dict[str, Any]:
    step = {"name": name, "type": fields.pop("type", "demo.task"), **fields}
    if deps:
        step["dependsOn"] = list(deps)
    return step


# ---------------------------------------------------------------------- when


@pytest.mark.parametrize(
    ("value", "runs"),
    [
        (True, True),
        (False, False),
        (None, False),
        ("", False),
        ([], False),
        ({}, False),
        (0, True),
        ("no", True),
        ([1], True),
    ],
)
def test_when_skips_on_false_null_and_empty(value: Any, runs: bool) -> None:
    flow = Flow(
        {
            "steps": [
                task("notify", when="${{ input.notify }}", input={"to": "${{ input.to }}"}),
                task("after", "notify", input={"n": "${{ steps.notify.output.id }}"}),
            ]
        },
        {"notify": value, "to": "x"},
    )
    decision = flow(Start())
    if runs:
        assert steps_of(decision) == ["notify"]
        assert decision.dispatches[0].input == {"to": "x"}
        return
    assert flow.phase("notify") is S.SKIPPED
    reason = flow.state.steps["notify"].reason
    assert reason is not None
    assert "input.notify" in reason
    skipped = [r for r in decision.records if r.kind == "StepSkipped"]
    assert skipped[0].step == "notify"
    # The dependent runs, and reads null from the skipped step's output.
    assert steps_of(decision) == ["after"]
    assert decision.dispatches[0].input == {"n": None}


def test_a_run_of_skipped_steps_completes() -> None:
    flow = Flow({"steps": [task("a", when="${{ input.go }}")]}, {"go": False})
    flow(Start())
    assert flow.state.phase is E.COMPLETED


def test_a_bad_when_fails_the_step() -> None:
    flow = Flow({"steps": [task("a", when="${{ length(input.go) }}")]}, {"go": 5})
    flow(Start())
    assert flow.phase("a") is S.FAILED
    error = flow.state.steps["a"].error
    assert error is not None
    assert error.type == "ExpressionError"


# -------------------------------------------------------------------- forEach


def fan(n: int, **fields: Any) -> Flow:
    step = task(
        "charge",
        forEach="${{ input.orders }}",
        input={"order": "${{ item }}", "n": "${{ index }}"},
        **fields,
    )
    return Flow({"steps": [step, task("after", "charge")]}, {"orders": list(range(10, 10 + n))})


def test_for_each_runs_items_with_their_own_ids_at_most_max_parallel() -> None:
    flow = fan(5, maxParallel=2)
    first = flow(Start())
    assert steps_of(first) == ["charge[0]", "charge[1]"]
    assert first.dispatches[1].input == {"order": 11, "n": 1}
    assert steps_of(flow.ok("charge[1]", output={"id": "b"})) == ["charge[2]"]
    assert steps_of(flow.ok("charge[0]", output={"id": "a"})) == ["charge[3]"]
    flow.ok("charge[2]", output={"id": "c"})
    flow.ok("charge[3]", output={"id": "d"})
    last = flow.ok("charge[4]", output={"id": "e"})
    assert flow.phase("charge") is S.SUCCEEDED
    assert flow.state.steps["charge"].output == [{"id": x} for x in "abcde"]
    assert steps_of(last) == ["after"]


def test_items_retry_on_their_own() -> None:
    flow = fan(2, retry={"maxAttempts": 2, "initialInterval": "1s"})
    flow(Start())
    decision = flow.fail("charge[1]", retryable=True)
    assert [t.key for t in decision.timers] == ["retry:charge[1]:2"]
    assert steps_of(flow(TimerFired("retry", "charge[1]", 2), at=1)) == ["charge[1]"]
    flow.ok("charge[0]")
    flow.ok("charge[1]", attempt=2)
    assert flow.phase("charge") is S.SUCCEEDED


def test_a_stale_item_result_is_ignored() -> None:
    flow = fan(1)
    flow(Start())
    flow.ok("charge[0]")
    assert flow.ok("charge[0]").ignored is not None
    assert flow.ok("charge[7]").ignored == "unknown item charge[7]"


@pytest.mark.parametrize(("tolerated", "phase"), [(1, S.SUCCEEDED), (0, S.FAILED)])
def test_tolerated_failures(tolerated: int, phase: S) -> None:
    flow = fan(3, toleratedFailures=tolerated)
    flow(Start())
    flow.ok("charge[0]", output={"id": "a"})
    flow.fail("charge[1]")
    flow.ok("charge[2]", output={"id": "c"})
    assert flow.phase("charge") is phase
    if phase is S.SUCCEEDED:
        assert flow.state.steps["charge"].output == [{"id": "a"}, None, {"id": "c"}]
    else:
        error = flow.state.steps["charge"].error
        assert error is not None
        assert error.type == "ItemsFailed"
        assert "item 1: Boom: kaput" in error.message
        assert flow.state.phase is E.FAILED


def test_items_beyond_the_tolerated_failures_are_not_started() -> None:
    flow = fan(6, maxParallel=2)
    flow(Start())
    assert steps_of(flow.fail("charge[0]")) == []  # no new item once it must fail
    flow.ok("charge[1]")
    assert flow.phase("charge") is S.FAILED
    items = flow.state.steps["charge"].items
    assert items is not None
    assert items.count(S.PENDING) == 4


def test_a_list_that_is_not_a_list_fails_the_step() -> None:
    flow = Flow({"steps": [task("c", forEach="${{ input.orders }}")]}, {"orders": {"a": 1}})
    flow(Start())
    error = flow.state.steps["c"].error
    assert error is not None
    assert error.type == "InvalidForEach"
    assert "got dict" in error.message


def test_an_empty_list_succeeds_at_once_with_no_items() -> None:
    flow = fan(0)
    decision = flow(Start())
    assert flow.state.steps["charge"].output == []
    assert steps_of(decision) == ["after"]


def test_status_of_a_large_fan_out_holds_counts_not_items() -> None:
    flow = fan(10_000, maxParallel=50)
    flow(Start())
    for i in range(30):
        flow.ok(f"charge[{i}]")
    status = execution_status(flow.state)
    charge = next(s for s in status["steps"] if s["name"] == "charge")
    assert charge["items"] == {"total": 10_000, "Succeeded": 30, "Running": 50, "Pending": 9920}
    assert len(str(status)) < 5_000


def compensated_fan(n: int) -> Flow:
    step = task(
        "charge",
        forEach="${{ input.orders }}",
        input={"order": "${{ item }}"},
        compensate={"type": "demo.refund", "input": {"id": "${{ steps.charge.output.id }}"}},
    )
    return Flow(
        {"steps": [step, task("ship", "charge")]},
        {"orders": list(range(n))},
    )


def test_compensation_undoes_each_succeeded_item_on_its_own() -> None:
    flow = compensated_fan(3)
    flow(Start())
    for i in range(3):
        flow.ok(f"charge[{i}]", output={"id": f"c{i}"})
    decision = flow.fail("ship")
    undos = [(d.step, d.input, d.compensation) for d in decision.dispatches]
    assert undos == [(f"charge[{i}]", {"id": f"c{i}"}, True) for i in range(3)]
    for i in range(3):
        flow.ok(f"charge[{i}]", compensation=True)
    assert flow.phase("charge") is S.COMPENSATED
    assert flow.state.phase is E.COMPENSATED


def test_a_failed_fan_out_undoes_the_items_that_succeeded() -> None:
    flow = compensated_fan(3)
    flow(Start())
    flow.ok("charge[0]", output={"id": "c0"})
    flow.fail("charge[1]")
    decision = flow.ok("charge[2]", output={"id": "c2"})
    assert [d.step for d in decision.dispatches] == ["charge[0]", "charge[2]"]
    flow.ok("charge[0]", compensation=True)
    flow.fail("charge[2]", compensation=True)
    assert flow.phase("charge") is S.COMPENSATION_FAILED
    assert flow.state.phase is E.COMPENSATION_FAILED
    redo = flow(Redrive())
    assert [d.step for d in redo.dispatches] == ["charge[2]"]
    assert redo.dispatches[0].attempt == 2
    flow.ok("charge[2]", attempt=2, compensation=True)
    assert flow.state.phase is E.COMPENSATED


def test_redrive_keeps_items_that_succeeded() -> None:
    flow = fan(3)
    flow(Start())
    flow.ok("charge[0]", output={"id": "a"})
    flow.fail("charge[1]")
    flow.ok("charge[2]", output={"id": "c"})
    assert flow.state.phase is E.FAILED
    decision = flow(Redrive())
    assert [(d.step, d.attempt) for d in decision.dispatches] == [("charge[1]", 2)]
    flow.ok("charge[1]", attempt=2, output={"id": "b"})
    assert flow.state.steps["charge"].output == [{"id": x} for x in "abc"]


# -------------------------------------------------------------------- finally


def with_finally(*steps: dict[str, Any], **spec: Any) -> Flow:
    report = task("report", type="audit.record", input={"phase": "${{ execution.phase }}"})
    return Flow({"steps": list(steps), "finally": [report], **spec})


def test_finally_runs_after_success_and_reads_the_phase() -> None:
    flow = with_finally(task("a"))
    flow(Start())
    decision = flow.ok("a")
    assert flow.state.phase is E.COMPLETED
    assert [(d.step, d.input) for d in decision.dispatches] == [("report", {"phase": "Completed"})]
    assert not flow.state.at_rest
    flow.ok("report")
    assert flow.state.at_rest
    assert flow.state.finalizing == "done"
    assert "FinallyCompleted" in flow.records()


def test_finally_runs_after_compensation() -> None:
    undo = {"type": "demo.undo"}
    flow = with_finally(task("a", compensate=undo), task("b", "a"))
    flow(Start())
    flow.ok("a")
    assert steps_of(flow.fail("b")) == ["a"]
    decision = flow.ok("a", compensation=True)
    assert flow.state.phase is E.COMPENSATED
    assert [(d.step, d.input) for d in decision.dispatches] == [
        ("report", {"phase": "Compensated"})
    ]


def test_a_failed_finally_step_does_not_change_the_outcome() -> None:
    flow = with_finally(task("a"))
    flow(Start())
    flow.ok("a")
    flow.fail("report")
    assert flow.state.phase is E.COMPLETED
    assert flow.state.at_rest
    assert "FinallyFailed" in flow.records()


def test_finally_after_a_cancel() -> None:
    flow = with_finally(task("a"))
    flow(Start())
    decision = flow(Cancel())
    assert flow.state.phase is E.CANCELLED
    # Nothing to undo (a has no compensate), so the run ends and finally runs at once.
    assert [(d.step, d.input) for d in decision.dispatches] == [("report", {"phase": "Cancelled"})]
    flow.ok("a")  # the attempt in flight is still recorded; the outcome stays
    assert flow.state.phase is E.CANCELLED


# -------------------------------------------------------------------- signals

APPROVAL = {
    "name": "approval",
    "schema": {
        "type": "object",
        "required": ["approved"],
        "properties": {"approved": {"type": "boolean"}},
    },
}


def approval(**wait: Any) -> Flow:
    return Flow(
        {
            "signals": [APPROVAL],
            "steps": [
                task("wait", type="sagaflow.waitForSignal", input={"signal": "approval", **wait}),
                task("ship", "wait", input={"ok": "${{ steps.wait.output.approved }}"}),
            ],
        }
    )


def test_a_signal_completes_the_wait_with_its_data() -> None:
    flow = approval(timeout="1h")
    start = flow(Start())
    assert [t.key for t in start.timers] == ["signal-timeout:wait:1"]
    decision = flow(SignalReceived("approval", "s1", {"approved": True}))
    assert flow.phase("wait") is S.SUCCEEDED
    assert [(d.step, d.input) for d in decision.dispatches] == [("ship", {"ok": True})]
    assert "signal-timeout:wait:1" in decision.cancel_timers


def test_a_signal_before_the_wait_is_kept_for_it() -> None:
    flow = Flow(
        {
            "signals": [APPROVAL],
            "steps": [
                task("first"),
                task("wait", "first", type="sagaflow.waitForSignal", input={"signal": "approval"}),
            ],
        }
    )
    flow(Start())
    early = flow(SignalReceived("approval", "s1", {"approved": False}))
    assert early.applied
    assert flow.phase("wait") is S.PENDING
    flow.ok("first")
    assert flow.phase("wait") is S.SUCCEEDED
    assert flow.state.steps["wait"].output == {"approved": False}
    assert flow.state.phase is E.COMPLETED


def test_a_repeated_signal_id_is_a_no_op() -> None:
    flow = approval()
    flow(Start())
    flow(SignalReceived("approval", "s1", {"approved": True}))
    again = flow(SignalReceived("approval", "s1", {"approved": False}))
    assert again.ignored == "signal s1 already received"


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("other", {}, "does not declare it (declared: approval)"),
        ("approval", {}, "data: 'approved' is a required property"),
        ("approval", {"approved": "yes"}, "data.approved: 'yes' is not of type 'boolean'"),
    ],
)
def test_bad_signals_are_refused_with_a_reason(name: str, data: Any, reason: str) -> None:
    flow = approval()
    flow(Start())
    decision = flow(SignalReceived(name, "s1", data))
    assert decision.refused is not None
    assert reason in decision.refused
    assert flow.phase("wait") is S.RUNNING
    assert flow.state.signals == ()


def test_a_signal_to_a_finished_run_is_refused() -> None:
    flow = approval()
    flow(Start())
    flow(SignalReceived("approval", "s1", {"approved": True}))
    flow.ok("ship")
    decision = flow(SignalReceived("approval", "s2", {"approved": True}))
    assert decision.refused is not None
    assert "the execution is Completed" in decision.refused


def test_a_wait_times_out_with_signal_timeout() -> None:
    flow = approval(timeout="30m")
    flow(Start())
    flow(TimerFired("signal-timeout", "wait", 1), at=1800)
    error = flow.state.steps["wait"].error
    assert error is not None
    assert error.type == "SignalTimeout"
    assert flow.state.phase is E.FAILED
    late = flow(SignalReceived("approval", "s1", {"approved": True}))
    assert late.refused is not None


def test_a_finally_condition_reads_how_the_run_ended() -> None:
    alert = task("alert", type="ops.page", when="${{ execution.phase == 'Failed' }}")
    flow = Flow({"steps": [task("a")], "finally": [alert]})
    flow(Start())
    flow.ok("a")
    assert flow.phase("alert") is S.SKIPPED
    failing = Flow({"steps": [task("a")], "finally": [alert]})
    failing(Start())
    assert steps_of(failing.fail("a")) == ["alert"]


def test_a_negation_of_a_path_without_parentheses_is_refused_when_validated() -> None:
    from sagaflow.core.expressions import check_templates

    (error,) = check_templates("${{ !steps.a.output.ok }}", "spec.steps[1].when")
    assert error.path == "spec.steps[1].when"
    assert "write !(a.b)" in error.reason
    assert check_templates("${{ !(steps.a.output.ok) }}", "when") == []
    assert check_templates("${{ !input.tags[0] }}", "when") != []


def test_a_child_one_level_too_deep_fails_its_step() -> None:
    from dataclasses import replace as with_

    from sagaflow.core.children import MAX_DEPTH
    from sagaflow.core.links import Parent

    flow = Flow({"steps": [{"name": "kid", "workflowRef": {"name": "orders"}}]})
    flow.state = with_(flow.state, parent=Parent("p", "shop", "p", "kid", 1, MAX_DEPTH))
    decision = flow(Start())
    assert decision.dispatches == ()
    error = flow.state.steps["kid"].error
    assert error is not None
    assert error.type == "ChildDepthExceeded"
    assert flow.state.phase is E.FAILED


def test_an_item_whose_input_fails_to_render_frees_its_slot() -> None:
    step = task(
        "charge",
        forEach="${{ input.orders }}",
        maxParallel=1,
        toleratedFailures=1,
        input={"size": "${{ length(item.name) }}"},
    )
    flow = Flow({"steps": [step]}, {"orders": [{"name": 7}, {"name": "ok"}]})
    decision = flow(Start())
    assert [(d.step, d.input) for d in decision.dispatches] == [("charge[1]", {"size": 2})]
    items = flow.state.steps["charge"].items
    assert items is not None
    assert items.entries[0].error is not None
    assert items.entries[0].error.type == "ExpressionError"
    flow.ok("charge[1]")
    assert flow.state.phase is E.COMPLETED


def test_items_waiting_to_retry_fail_once_the_step_must_fail() -> None:
    flow = fan(3, retry={"maxAttempts": 3, "initialInterval": "10s"})
    flow(Start())
    retry = flow.fail("charge[1]", retryable=True)
    assert [t.key for t in retry.timers] == ["retry:charge[1]:2"]
    doomed = flow.fail("charge[0]")
    assert "retry:charge[1]:2" in doomed.cancel_timers
    assert flow.phase("charge") is S.RUNNING  # charge[2] is still in flight
    flow.ok("charge[2]")
    assert flow.phase("charge") is S.FAILED
    assert flow(TimerFired("retry", "charge[1]", 2), at=10).dispatches == ()
