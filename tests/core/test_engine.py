"""Behaviour of the pure saga engine: `decide(state, definition, fact, now) -> Decision`.

Every test builds a definition from a camelCase manifest dict, starts from a fresh
state and feeds facts one at a time at fixed offsets from `T0`; the real clock is
never read. Assertions are on what the engine decides: dispatches, timers, timer
cancellations, history records, phases, `ignored` reasons and revisions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.core.harness import (
    T0,
    TASK,
    E,
    Run,
    S,
    assert_ignored,
    build,
    dispatched,
    kinds,
    t,
    task,
)

from sagaflow.core.definition import FAIL, PASS, WAIT
from sagaflow.core.engine import (
    WORKFLOW_TIMEOUT_KEY,
    Dispatch,
    Timer,
    decide,
    timer_key,
)
from sagaflow.core.facts import (
    Cancel,
    Fact,
    Start,
    StepCompleted,
    StepFailed,
    StepHeartbeat,
    TimerFired,
    TimerKind,
)
from sagaflow.core.state import ExecutionState, Failure, StepState

# ---------------------------------------------------------------------- start


def test_start_dispatches_every_root_at_once_in_manifest_order() -> None:
    run = Run(
        [
            task("reserve", input={"sku": "${{ input.sku }}"}),
            task("charge", kind="payments.charge"),
            task("ship", "reserve", "charge"),
        ],
        {"sku": "X1"},
    )

    decision = run.start(at=0)

    assert decision.applied
    assert decision.dispatches == (
        Dispatch("reserve", 1, TASK, {"sku": "X1"}, None, None),
        Dispatch("charge", 1, "payments.charge", {}, None, None),
    )
    assert kinds(decision) == ["ExecutionStarted", "StepDispatched", "StepDispatched"]
    assert [(r.step, r.attempt) for r in decision.records] == [
        (None, None),
        ("reserve", 1),
        ("charge", 1),
    ]
    assert "orders v3" in decision.records[0].message
    assert decision.timers == ()
    assert decision.cancel_timers == ()
    state = decision.state
    assert state.phase is E.RUNNING
    assert state.started_at == T0
    assert state.finished_at is None
    assert state.revision == 1
    assert run.phases() == {"reserve": S.RUNNING, "charge": S.RUNNING, "ship": S.PENDING}
    assert state.steps["reserve"] == StepState(
        "reserve", S.RUNNING, attempt=1, started_at=T0, attempt_started_at=T0
    )
    assert state.steps["ship"] == StepState("ship")


@pytest.mark.parametrize(
    ("timeout", "seconds"),
    [("90s", 90), ("10m", 600), ("1h30m", 5400), ("250ms", 0.25)],
)
def test_start_sets_the_workflow_timeout_timer(timeout: str, seconds: float) -> None:
    run = Run([task("a")], timeout=timeout)

    decision = run.start(at=12)

    assert decision.timers == (
        Timer(WORKFLOW_TIMEOUT_KEY, "workflow-timeout", "", 0, t(12 + seconds)),
    )
    assert dispatched(decision) == [("a", 1)]


def test_start_without_workflow_timeout_sets_no_timer() -> None:
    decision = Run([task("a")]).start()
    assert decision.timers == ()


@pytest.mark.parametrize(
    ("prepare", "phase"),
    [
        pytest.param(lambda r: r.start(), "Running", id="running"),
        pytest.param(lambda r: (r.start(), r.complete("a", 1)), "Completed", id="completed"),
        pytest.param(lambda r: (r.start(), r.fail("a", 1, retryable=False)), "Failed", id="failed"),
        pytest.param(lambda r: r(Cancel()), "Cancelled", id="cancelled-before-start"),
    ],
)
def test_a_second_start_is_ignored(prepare: Callable[[Run], Any], phase: str) -> None:
    run = Run([task("a")], timeout="1h")
    prepare(run)
    before = run.state

    decision = run.start(at=5)

    assert_ignored(decision, before, f"execution already {phase}")
    assert decision.ignored == f"execution already {phase}"
    assert run.state.revision == before.revision


# ------------------------------------------------------------------------ DAG


DAG_CASES = [
    pytest.param(
        [task("a"), task("b", "a"), task("c", "b")],
        ["a"],
        [("a", ["b"]), ("b", ["c"]), ("c", [])],
        id="chain",
    ),
    pytest.param(
        [task("a"), task("b", "a"), task("c", "a"), task("d", "b", "c")],
        ["a"],
        [("a", ["b", "c"]), ("c", []), ("b", ["d"]), ("d", [])],
        id="diamond",
    ),
    pytest.param(
        [task("a"), task("b", "a"), task("c", "a"), task("d", "b", "c")],
        ["a"],
        [("a", ["b", "c"]), ("b", []), ("c", ["d"]), ("d", [])],
        id="diamond-other-order",
    ),
    pytest.param(
        [task("x"), task("y"), task("z"), task("join", "x", "y", "z")],
        ["x", "y", "z"],
        [("z", []), ("x", []), ("y", ["join"]), ("join", [])],
        id="fan-in",
    ),
    pytest.param(
        [task("zeta"), task("alpha"), task("mid", "zeta"), task("beta", "zeta")],
        ["zeta", "alpha"],
        [("zeta", ["mid", "beta"]), ("beta", []), ("alpha", []), ("mid", [])],
        id="manifest-order-not-alphabetical",
    ),
    pytest.param(
        [task("late", "early"), task("early")],
        ["early"],
        [("early", ["late"]), ("late", [])],
        id="dependent-listed-first",
    ),
    pytest.param(
        [task("a1"), task("b1"), task("a2", "a1"), task("b2", "b1")],
        ["a1", "b1"],
        [("b1", ["b2"]), ("b2", []), ("a1", ["a2"]), ("a2", [])],
        id="independent-chains",
    ),
]


@pytest.mark.parametrize(("steps", "at_start", "completions"), DAG_CASES)
def test_steps_dispatch_only_when_all_dependencies_succeeded(
    steps: list[dict[str, Any]],
    at_start: list[str],
    completions: list[tuple[str, list[str]]],
) -> None:
    run = Run(steps)

    assert [d.step for d in run.start().dispatches] == at_start

    for index, (name, expected) in enumerate(completions, start=1):
        decision = run.complete(name, 1, {"from": name}, at=index)
        assert [d.step for d in decision.dispatches] == expected, name
        assert all(d.attempt == 1 for d in decision.dispatches)
        assert run.step(name).phase is S.SUCCEEDED
        assert run.step(name).output == {"from": name}
        assert run.step(name).finished_at == t(index)
        for d in decision.dispatches:
            assert run.step(d.step).phase is S.RUNNING
            assert run.step(d.step).attempt_started_at == t(index)
        last = index == len(completions)
        assert run.state.phase is (E.COMPLETED if last else E.RUNNING)
        assert ("ExecutionCompleted" in kinds(decision)) is last

    assert run.state.finished_at == t(len(completions))
    assert all(p is S.SUCCEEDED for p in run.phases().values())


def test_a_join_waits_while_one_dependency_is_retrying() -> None:
    run = Run(
        [
            task("a"),
            task("b", "a"),
            task("c", "a", retry={"initialInterval": "5s"}),
            task("d", "b", "c"),
        ]
    )
    run.start()
    run.complete("a", 1, at=1)
    run.fail("c", 1, "Flaky", at=2)

    decision = run.complete("b", 1, at=3)
    assert decision.dispatches == ()
    assert run.phases() == {"a": S.SUCCEEDED, "b": S.SUCCEEDED, "c": S.RETRYING, "d": S.PENDING}

    assert dispatched(run.fire("retry", "c", 2, at=7)) == [("c", 2)]
    assert dispatched(run.complete("c", 2, at=8)) == [("d", 1)]


def test_decide_is_deterministic_and_leaves_its_input_untouched() -> None:
    definition, state = build(
        [task("a", input={"v": "${{ input.v }}"}), task("b"), task("c", "a", "b")],
        {"v": [1, 2]},
        timeout="1m",
    )
    snapshot = state.to_json()

    first = decide(state, definition, Start(), T0)
    second = decide(state, definition, Start(), T0)

    assert first == second
    assert state.to_json() == snapshot
    assert state.phase is E.PENDING
    assert state.revision == 0


def test_revision_grows_by_one_per_applied_fact_and_not_for_ignored_ones() -> None:
    run = Run([task("a"), task("b", "a")])
    revisions = []
    for fact in [
        Start(),
        Start(),  # ignored
        StepCompleted("a", 1, {}),
        StepCompleted("a", 1, {}),  # ignored
        StepFailed("b", 1, "Flaky", "again"),
        TimerFired("retry", "b", 2),
        StepCompleted("b", 2, {}),
    ]:
        revisions.append(run(fact).state.revision)
    assert revisions == [1, 1, 2, 2, 3, 4, 5]


# --------------------------------------------------------------- data passing


@pytest.mark.parametrize(
    ("template", "execution_input", "expected"),
    [
        pytest.param("${{ input.n }}", {"n": 5}, 5, id="int"),
        pytest.param("${{ input.n }}", {"n": 2.5}, 2.5, id="float"),
        pytest.param("${{ input.flag }}", {"flag": False}, False, id="bool"),
        pytest.param("${{ input.id }}", {"id": "42"}, "42", id="string"),
        pytest.param(
            "${{ input.items }}", {"items": [1, "two", None]}, [1, "two", None], id="list"
        ),
        pytest.param(
            "${{ input.customer }}",
            {"customer": {"id": 7, "tags": ["vip"]}},
            {"id": 7, "tags": ["vip"]},
            id="object",
        ),
        pytest.param("${{ input.missing }}", {}, None, id="missing-key"),
        pytest.param("${{ input.customer.address.city }}", {"customer": {}}, None, id="deep-miss"),
        pytest.param("${{ input }}", {"a": 1}, {"a": 1}, id="whole-input"),
        pytest.param("${{ length(input.items) }}", {"items": [1, 2, 3]}, 3, id="function"),
        pytest.param(
            "${{ input.lines[?qty > `1`].sku }}",
            {"lines": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}]},
            ["b"],
            id="filter",
        ),
        pytest.param("order-${{ input.id }}", {"id": 42}, "order-42", id="interp-int"),
        pytest.param("Hi ${{ input.name }}!", {"name": "Ann"}, "Hi Ann!", id="interp-str"),
        pytest.param("${{ input.a }}/${{ input.b }}", {"a": "x", "b": 2}, "x/2", id="two"),
        pytest.param("ids=${{ input.ids }}", {"ids": [1, 2]}, "ids=[1,2]", id="interp-list"),
        pytest.param("o=${{ input.o }}", {"o": {"k": "v"}}, 'o={"k":"v"}', id="interp-obj"),
        pytest.param("flag=${{ input.f }}", {"f": True}, "flag=true", id="interp-bool"),
        pytest.param("m=${{ input.nope }}", {}, "m=null", id="interp-missing"),
        pytest.param("${{ input.n }} ", {"n": 1}, "1 ", id="trailing-space-is-text"),
        pytest.param("no template", {"n": 1}, "no template", id="literal"),
    ],
)
def test_step_input_is_rendered_from_the_execution_input(
    template: str, execution_input: dict[str, Any], expected: Any
) -> None:
    run = Run([task("a", input={"value": template, "fixed": 3})], execution_input)

    (dispatch,) = run.start().dispatches

    assert dispatch.input == {"value": expected, "fixed": 3}
    assert type(dispatch.input["value"]) is type(expected)


def test_templates_nested_in_lists_and_objects_are_rendered() -> None:
    run = Run(
        [
            task(
                "a",
                input={
                    "lines": [{"sku": "${{ input.sku }}", "qty": 2}, "${{ input.qty }}"],
                    "meta": {"ref": "order-${{ input.id }}", "tags": ["x", "${{ input.tag }}"]},
                },
            )
        ],
        {"sku": "S1", "qty": 4, "id": 9, "tag": "rush"},
    )

    (dispatch,) = run.start().dispatches

    assert dispatch.input == {
        "lines": [{"sku": "S1", "qty": 2}, 4],
        "meta": {"ref": "order-9", "tags": ["x", "rush"]},
    }


@pytest.mark.parametrize(
    ("template", "upstream_output", "expected"),
    [
        pytest.param("${{ steps.a.output.v }}", {"v": [1, 2]}, [1, 2], id="field"),
        pytest.param("${{ steps.a.output }}", "plain", "plain", id="whole-output"),
        pytest.param("${{ steps.a.output.missing }}", {}, None, id="missing-key"),
        pytest.param("${{ steps.a.output.n }}", {"n": 0}, 0, id="falsy-int"),
        pytest.param("id-${{ steps.a.output.id }}", {"id": "c9"}, "id-c9", id="interpolated"),
        pytest.param(
            "${{ [input.x, steps.a.output.y] }}", {"y": "b"}, ["in", "b"], id="mixed-sources"
        ),
    ],
)
def test_step_input_reads_upstream_outputs(
    template: str, upstream_output: Any, expected: Any
) -> None:
    run = Run([task("a"), task("b", "a", input={"value": template})], {"x": "in"})
    run.start()

    (dispatch,) = run.complete("a", 1, upstream_output, at=4).dispatches

    assert dispatch.step == "b"
    assert dispatch.input == {"value": expected}


def test_upstream_output_of_a_hyphenated_step_is_read_with_a_quoted_name() -> None:
    run = Run(
        [
            task("charge-card"),
            task("ship", "charge-card", input={"txn": '${{ steps."charge-card".output.txn }}'}),
        ]
    )
    run.start()

    (dispatch,) = run.complete("charge-card", 1, {"txn": "T-1"}).dispatches

    assert dispatch.input == {"txn": "T-1"}


def test_a_retried_step_reads_the_same_upstream_outputs() -> None:
    run = Run(
        [task("a"), task("b", "a", input={"v": "${{ steps.a.output.v }}"})],
    )
    run.start()
    first = run.complete("a", 1, {"v": 7}).dispatches[0]
    run.fail("b", 1, at=1)
    second = run.fire("retry", "b", 2, at=2).dispatches[0]

    assert first.input == second.input == {"v": 7}
    assert (first.attempt, second.attempt) == (1, 2)


def test_workflow_output_template_is_rendered_on_completion() -> None:
    run = Run(
        [task("charge"), task("ship", "charge")],
        {"id": 42},
        output={
            "orderId": "${{ input.id }}",
            "txn": "${{ steps.charge.output.txn }}",
            "summary": "order ${{ input.id }} charged ${{ steps.charge.output.amount }}",
            "tracking": "${{ steps.ship.output }}",
            "absent": "${{ steps.ship.output.nothing }}",
        },
    )
    run.start()
    run.complete("charge", 1, {"txn": "T-9", "amount": 12.5}, at=1)

    decision = run.complete("ship", 1, ["TRK", 1], at=2)

    assert run.state.phase is E.COMPLETED
    assert run.state.error is None
    assert run.state.output == {
        "orderId": 42,
        "txn": "T-9",
        "summary": "order 42 charged 12.5",
        "tracking": ["TRK", 1],
        "absent": None,
    }
    assert kinds(decision) == ["StepSucceeded", "ExecutionCompleted"]


def test_a_whole_value_workflow_output_keeps_its_type() -> None:
    run = Run([task("a")], output="${{ steps.a.output.n }}")
    run.start()
    run.complete("a", 1, {"n": 3})
    assert run.state.output == 3


@pytest.mark.parametrize(
    ("steps", "sinks"),
    [
        pytest.param([task("a")], ["a"], id="single"),
        pytest.param([task("a"), task("b", "a"), task("c", "b")], ["c"], id="chain"),
        pytest.param(
            [task("a"), task("b", "a"), task("c", "a"), task("d", "b", "c")], ["d"], id="diamond"
        ),
        pytest.param([task("a"), task("b", "a"), task("c", "a")], ["b", "c"], id="two-sinks"),
        pytest.param([task("x"), task("y")], ["x", "y"], id="two-roots"),
    ],
)
def test_default_workflow_output_is_the_outputs_of_sink_steps(
    steps: list[dict[str, Any]], sinks: list[str]
) -> None:
    run = Run(steps)
    run.start()
    for index, spec in enumerate(run.definition.steps, start=1):
        run.complete(spec.name, 1, {"out": spec.name.upper()}, at=index)

    assert run.state.phase is E.COMPLETED
    assert run.state.output == {name: {"out": name.upper()} for name in sinks}


def test_an_error_in_the_workflow_output_template_fails_the_execution() -> None:
    run = Run([task("a")], output={"n": "${{ length(steps.a.output.n) }}"})
    run.start()

    decision = run.complete("a", 1, {"n": 3}, at=9)

    assert run.step("a").phase is S.SUCCEEDED
    assert run.state.phase is E.FAILED
    assert run.state.error is not None
    assert run.state.error.type == "ExpressionError"
    assert run.state.error.message.startswith("spec.output.n: ")
    assert run.state.output is None
    assert run.state.finished_at == t(9)
    assert kinds(decision) == ["StepSucceeded", "ExecutionFailed"]


# -------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    ("policy", "delays"),
    [
        pytest.param(
            {
                "maxAttempts": 6,
                "initialInterval": "1s",
                "backoffCoefficient": 2,
                "maxInterval": "10s",
            },
            [1, 2, 4, 8, 10],
            id="doubling-capped",
        ),
        pytest.param(
            {
                "maxAttempts": 5,
                "initialInterval": "500ms",
                "backoffCoefficient": 3,
                "maxInterval": "1m",
            },
            [0.5, 1.5, 4.5, 13.5],
            id="tripling",
        ),
        pytest.param(
            {
                "maxAttempts": 4,
                "initialInterval": "2s",
                "backoffCoefficient": 1,
                "maxInterval": "1m",
            },
            [2, 2, 2],
            id="constant",
        ),
        pytest.param(
            {
                "maxAttempts": 5,
                "initialInterval": "10s",
                "backoffCoefficient": 2,
                "maxInterval": "15s",
            },
            [10, 15, 15, 15],
            id="capped-from-the-second",
        ),
        pytest.param(
            {
                "maxAttempts": 3,
                "initialInterval": "1m",
                "backoffCoefficient": 1.5,
                "maxInterval": "1h",
            },
            [60, 90],
            id="fractional-coefficient",
        ),
        pytest.param(
            {"maxAttempts": 2, "initialInterval": "1h", "maxInterval": "30m"},
            [1800],
            id="initial-above-cap",
        ),
    ],
)
def test_retry_backoff_is_exponential_and_capped(
    policy: dict[str, Any], delays: list[float]
) -> None:
    run = Run([task("a", timeout="1m", retry=policy), task("b", "a")])
    run.start()
    clock = 0.0

    for attempt, delay in enumerate(delays, start=1):
        clock += 3  # each attempt runs for 3s before failing
        decision = run.fail("a", attempt, "Flaky", f"try {attempt}", at=clock)

        due = t(clock + delay)
        assert decision.timers == (Timer(f"retry:a:{attempt + 1}", "retry", "a", attempt + 1, due),)
        assert decision.dispatches == ()
        assert set(decision.cancel_timers) >= {f"step-timeout:a:{attempt}"}
        assert kinds(decision) == ["StepRetrying"]
        assert decision.records[0].attempt == attempt
        assert decision.records[0].data == {"delaySeconds": delay, "error": "Flaky"}
        step = run.step("a")
        assert step.phase is S.RETRYING
        assert step.attempt == attempt
        assert step.next_retry_at == due
        assert step.error == Failure("Flaky", f"try {attempt}")
        assert run.state.phase is E.RUNNING

        clock += delay
        decision = run.fire("retry", "a", attempt + 1, at=clock)

        assert decision.dispatches == (Dispatch("a", attempt + 1, TASK, {}, t(clock + 60), None),)
        assert decision.timers == (
            Timer(f"step-timeout:a:{attempt + 1}", "step-timeout", "a", attempt + 1, t(clock + 60)),
        )
        assert kinds(decision) == ["StepDispatched"]
        step = run.step("a")
        assert step.phase is S.RUNNING
        assert step.attempt == attempt + 1
        assert step.attempt_started_at == t(clock)
        assert step.started_at == T0
        assert step.next_retry_at is None

    last = len(delays) + 1
    decision = run.fail("a", last, "Flaky", "for good", at=clock + 1)
    assert run.step("a").phase is S.FAILED
    assert run.step("a").attempt == last
    assert run.state.phase is E.FAILED
    assert decision.timers == ()
    assert kinds(decision) == ["StepFailed", "ExecutionFailed"]


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
def test_exhausting_max_attempts_fails_the_step_and_the_execution(max_attempts: int) -> None:
    run = Run(
        [
            task("pay", timeout="30s", retry={"maxAttempts": max_attempts}),
            task("ship", "pay"),
            task("audit"),
        ],
        timeout="1h",
    )
    run.start()
    for attempt in range(1, max_attempts):
        run.fail("pay", attempt, at=attempt * 10)
        run.fire("retry", "pay", attempt + 1, at=attempt * 10 + 5)

    decision = run.fail("pay", max_attempts, "Declined", "card declined", at=100)

    pay = run.step("pay")
    assert pay.phase is S.FAILED
    assert pay.attempt == max_attempts
    assert pay.finished_at == t(100)
    assert pay.error == Failure("Declined", "card declined")
    assert run.state.phase is E.FAILED
    assert run.state.error == Failure("Declined", "step pay failed: card declined", step="pay")
    assert run.state.finished_at == t(100)
    assert run.phases() == {"pay": S.FAILED, "ship": S.SKIPPED, "audit": S.RUNNING}
    assert decision.dispatches == ()
    assert decision.timers == ()
    assert set(decision.cancel_timers) == {
        f"step-timeout:pay:{max_attempts}",
        f"heartbeat-timeout:pay:{max_attempts}",
        WORKFLOW_TIMEOUT_KEY,
    }
    assert kinds(decision) == ["StepFailed", "ExecutionFailed"]
    assert decision.records[0].data == {"error": "Declined"}
    assert "pay" in decision.records[1].message


@pytest.mark.parametrize(
    ("policy", "error_type", "retryable", "retries"),
    [
        pytest.param({"maxAttempts": 5}, "Flaky", True, True, id="retryable"),
        pytest.param(
            {"maxAttempts": 5, "nonRetryableErrors": ["CardDeclined"]},
            "CardDeclined",
            True,
            False,
            id="non-retryable-error",
        ),
        pytest.param(
            {"maxAttempts": 5, "nonRetryableErrors": ["CardDeclined"]},
            "Flaky",
            True,
            True,
            id="other-error-still-retried",
        ),
        pytest.param({"maxAttempts": 5}, "Flaky", False, False, id="permanent"),
        pytest.param({"maxAttempts": 1}, "Flaky", True, False, id="single-attempt"),
    ],
)
def test_which_failures_are_retried(
    policy: dict[str, Any], error_type: str, retryable: bool, retries: bool
) -> None:
    run = Run([task("a", retry=policy), task("b", "a")])
    run.start()

    decision = run.fail("a", 1, error_type, "oops", retryable=retryable, at=2)

    if retries:
        assert run.step("a").phase is S.RETRYING
        assert run.state.phase is E.RUNNING
        assert [tm.key for tm in decision.timers] == ["retry:a:2"]
        assert kinds(decision) == ["StepRetrying"]
    else:
        assert run.step("a").phase is S.FAILED
        assert run.step("a").attempt == 1
        assert run.state.phase is E.FAILED
        assert run.state.error == Failure(error_type, "step a failed: oops", step="a")
        assert decision.timers == ()
        assert kinds(decision) == ["StepFailed", "ExecutionFailed"]
    assert decision.dispatches == ()


def test_a_zero_initial_interval_dispatches_the_next_attempt_at_once() -> None:
    run = Run(
        [task("a", timeout="30s", retry={"maxAttempts": 3, "initialInterval": "0s"})],
    )
    run.start()

    for attempt in (1, 2):
        clock = attempt * 10
        decision = run.fail("a", attempt, "Flaky", at=clock)

        assert decision.dispatches == (Dispatch("a", attempt + 1, TASK, {}, t(clock + 30), None),)
        assert decision.timers == (
            Timer(f"step-timeout:a:{attempt + 1}", "step-timeout", "a", attempt + 1, t(clock + 30)),
        )
        assert f"step-timeout:a:{attempt}" in decision.cancel_timers
        assert kinds(decision) == ["StepRetrying", "StepDispatched"]
        assert decision.records[0].data == {"delaySeconds": 0, "error": "Flaky"}
        step = run.step("a")
        assert (step.phase, step.attempt, step.next_retry_at) == (S.RUNNING, attempt + 1, None)
        assert step.attempt_started_at == t(clock)

    run.fail("a", 3, at=40)
    assert run.state.phase is E.FAILED


def test_the_default_retry_policy_is_three_attempts_doubling_from_one_second() -> None:
    run = Run([task("a")])
    run.start()

    first = run.fail("a", 1, at=0)
    run.fire("retry", "a", 2, at=1)
    second = run.fail("a", 2, at=1)
    run.fire("retry", "a", 3, at=3)
    third = run.fail("a", 3, at=3)

    assert [tm.due_at for tm in first.timers + second.timers] == [t(1), t(3)]
    assert third.timers == ()
    assert run.state.phase is E.FAILED


@pytest.mark.parametrize(
    ("workflow_retry", "step_retry", "delay"),
    [
        pytest.param(None, None, 1, id="built-in-default"),
        pytest.param({"maxAttempts": 1}, None, None, id="workflow-default-no-retries"),
        pytest.param({"maxAttempts": 4, "initialInterval": "7s"}, None, 7, id="workflow-default"),
        pytest.param(
            {"maxAttempts": 1},
            {"maxAttempts": 2, "initialInterval": "3s"},
            3,
            id="step-overrides-to-retry",
        ),
        pytest.param(
            {"maxAttempts": 5, "initialInterval": "7s"},
            {"maxAttempts": 1},
            None,
            id="step-overrides-to-fail",
        ),
        pytest.param(
            {"maxAttempts": 5, "nonRetryableErrors": ["Boom"]},
            {"maxAttempts": 2},
            1,
            id="step-policy-replaces-the-whole-default",
        ),
    ],
)
def test_workflow_retry_is_the_default_and_a_step_retry_overrides_it(
    workflow_retry: dict[str, Any] | None,
    step_retry: dict[str, Any] | None,
    delay: float | None,
) -> None:
    step = task("a") if step_retry is None else task("a", retry=step_retry)
    workflow = {} if workflow_retry is None else {"retry": workflow_retry}
    run = Run([step, task("plain")], **workflow)
    run.start()

    decision = run.fail("a", 1, "Boom", at=10)

    if delay is None:
        assert run.step("a").phase is S.FAILED
        assert decision.timers == ()
    else:
        assert run.step("a").phase is S.RETRYING
        assert decision.timers == (Timer("retry:a:2", "retry", "a", 2, t(10 + delay)),)


def test_steps_without_retry_use_the_workflow_policy_next_to_steps_that_override_it() -> None:
    run = Run(
        [task("plain"), task("custom", retry={"maxAttempts": 2, "initialInterval": "30s"})],
        retry={"maxAttempts": 3, "initialInterval": "4s"},
    )
    run.start()

    assert run.fail("plain", 1, at=1).timers[0].due_at == t(5)
    assert run.fail("custom", 1, at=1).timers[0].due_at == t(31)


def test_backoff_of_late_attempts_is_capped_without_overflowing() -> None:
    run = Run(
        [
            task(
                "a",
                retry={
                    "maxAttempts": 200,
                    "initialInterval": "1s",
                    "backoffCoefficient": 100,
                    "maxInterval": "1m",
                },
            )
        ]
    )
    run.start()
    clock = 0.0
    for attempt in range(1, 200):
        decision = run.fail("a", attempt, "Flaky", at=clock)
        delay = 1.0 if attempt == 1 else 60.0
        assert decision.timers[0].due_at == t(clock + delay)
        clock += delay
        run.fire("retry", "a", attempt + 1, at=clock)

    run.fail("a", 200, "Flaky", at=clock)
    assert run.state.phase is E.FAILED


# ------------------------------------------------------------------- timeouts


@pytest.mark.parametrize(
    ("timeout", "heartbeat", "deadline", "heartbeat_seconds"),
    [
        pytest.param(None, None, None, None, id="none"),
        pytest.param("30s", None, 30, None, id="step-timeout"),
        pytest.param(None, "10s", None, 10, id="heartbeat"),
        pytest.param("2m", "15s", 120, 15, id="both"),
    ],
)
def test_dispatch_carries_the_deadline_and_sets_timeout_timers(
    timeout: str | None,
    heartbeat: str | None,
    deadline: float | None,
    heartbeat_seconds: float | None,
) -> None:
    fields: dict[str, Any] = {}
    if timeout:
        fields["timeout"] = timeout
    if heartbeat:
        fields["heartbeatTimeout"] = heartbeat
    run = Run([task("a", **fields)])

    decision = run.start(at=5)

    (dispatch,) = decision.dispatches
    assert dispatch.deadline == (None if deadline is None else t(5 + deadline))
    assert dispatch.heartbeat_timeout == heartbeat_seconds
    expected = []
    if deadline is not None:
        expected.append(Timer("step-timeout:a:1", "step-timeout", "a", 1, t(5 + deadline)))
    if heartbeat_seconds is not None:
        expected.append(
            Timer("heartbeat-timeout:a:1", "heartbeat-timeout", "a", 1, t(5 + heartbeat_seconds))
        )
    assert list(decision.timers) == expected


def test_timer_keys_name_the_kind_step_and_attempt() -> None:
    assert timer_key("retry", "charge", 2) == "retry:charge:2"
    assert timer_key("step-timeout", "a", 1) == "step-timeout:a:1"


@pytest.mark.parametrize(
    ("kind", "fields", "error"),
    [
        pytest.param(
            "step-timeout",
            {"timeout": "30s"},
            Failure("StepTimeout", "no result within 30s"),
            id="step-timeout",
        ),
        pytest.param(
            "heartbeat-timeout",
            {"heartbeatTimeout": "10s"},
            Failure("HeartbeatTimeout", "no heartbeat within 10s"),
            id="heartbeat-timeout",
        ),
    ],
)
def test_a_timeout_while_the_attempt_runs_fails_it_and_it_is_retried(
    kind: TimerKind, fields: dict[str, Any], error: Failure
) -> None:
    run = Run([task("a", retry={"initialInterval": "5s"}, **fields)])
    run.start()

    decision = run.fire(kind, "a", 1, at=30)

    assert kinds(decision) == ["StepTimedOut", "StepRetrying"]
    assert (decision.records[0].step, decision.records[0].attempt) == ("a", 1)
    assert decision.records[1].data == {"delaySeconds": 5, "error": error.type}
    assert set(decision.cancel_timers) == {"step-timeout:a:1", "heartbeat-timeout:a:1"}
    assert decision.timers == (Timer("retry:a:2", "retry", "a", 2, t(35)),)
    assert run.step("a").phase is S.RETRYING
    assert run.step("a").error == error

    decision = run.fire("retry", "a", 2, at=35)

    assert dispatched(decision) == [("a", 2)]
    assert [(tm.key, tm.due_at) for tm in decision.timers] == [
        (timer_key(kind, "a", 2), t(65) if kind == "step-timeout" else t(45))
    ]


def test_a_timeout_on_the_last_attempt_fails_the_execution() -> None:
    run = Run([task("a", timeout="30s", retry={"maxAttempts": 1})])
    run.start()

    decision = run.fire("step-timeout", "a", 1, at=30)

    assert kinds(decision) == ["StepTimedOut", "StepFailed", "ExecutionFailed"]
    assert run.state.error == Failure(
        "StepTimeout", "step a failed: no result within 30s", step="a"
    )


def test_a_timeout_listed_as_non_retryable_fails_at_once() -> None:
    run = Run([task("a", timeout="30s", retry={"nonRetryableErrors": ["StepTimeout"]})])
    run.start()
    run.fire("step-timeout", "a", 1, at=30)
    assert run.step("a").phase is S.FAILED
    assert run.state.phase is E.FAILED


@pytest.mark.parametrize("kind", ["step-timeout", "heartbeat-timeout"])
def test_a_timeout_after_the_attempt_completed_is_ignored(kind: TimerKind) -> None:
    run = Run([task("a", timeout="30s", heartbeatTimeout="10s"), task("b")])
    run.start()
    completed = run.complete("a", 1, at=5)
    assert set(completed.cancel_timers) >= {"step-timeout:a:1", "heartbeat-timeout:a:1"}
    before = run.state

    decision = run.fire(kind, "a", 1, at=30)

    assert_ignored(decision, before, "attempt 1 already settled (Succeeded)")


@pytest.mark.parametrize("kind", ["step-timeout", "heartbeat-timeout"])
def test_a_timeout_of_a_previous_attempt_is_ignored(kind: TimerKind) -> None:
    run = Run([task("a", timeout="30s", heartbeatTimeout="10s")])
    run.start()
    run.fail("a", 1, at=1)
    run.fire("retry", "a", 2, at=2)
    before = run.state

    decision = run.fire(kind, "a", 1, at=30)

    assert_ignored(decision, before, "attempt 1 is not current (current is 2)")


def test_a_heartbeat_pushes_the_heartbeat_timer_back() -> None:
    run = Run([task("a", heartbeatTimeout="10s")])
    run.start()

    for at in (7, 15, 16.5):
        before = run.state
        decision = run(StepHeartbeat("a", 1), at)

        assert decision.applied
        assert decision.timers == (
            Timer("heartbeat-timeout:a:1", "heartbeat-timeout", "a", 1, t(at + 10)),
        )
        assert decision.dispatches == ()
        assert decision.cancel_timers == ()
        assert decision.records == ()
        assert decision.state == replace(before, revision=before.revision + 1)


def test_a_heartbeat_timeout_fails_the_attempt_with_heartbeat_timeout() -> None:
    run = Run([task("a", heartbeatTimeout="10s", retry={"maxAttempts": 1})])
    run.start()
    run(StepHeartbeat("a", 1), 4)

    decision = run.fire("heartbeat-timeout", "a", 1, at=14)

    assert run.step("a").error == Failure("HeartbeatTimeout", "no heartbeat within 10s")
    assert run.state.error is not None
    assert run.state.error.type == "HeartbeatTimeout"
    assert kinds(decision) == ["StepTimedOut", "StepFailed", "ExecutionFailed"]


@pytest.mark.parametrize(
    ("heartbeat", "reason"),
    [
        pytest.param(StepHeartbeat("plain", 1), "step has no heartbeat timeout", id="no-timeout"),
        pytest.param(StepHeartbeat("beat", 2), "attempt 2 is not current", id="wrong-attempt"),
        pytest.param(StepHeartbeat("ghost", 1), "unknown step 'ghost'", id="unknown-step"),
        pytest.param(
            StepHeartbeat("done", 1), "attempt 1 already settled (Succeeded)", id="settled"
        ),
    ],
)
def test_heartbeats_that_change_nothing_are_ignored(heartbeat: StepHeartbeat, reason: str) -> None:
    run = Run(
        [task("plain"), task("beat", heartbeatTimeout="10s"), task("done", heartbeatTimeout="5s")]
    )
    run.start()
    run.complete("done", 1, at=1)
    before = run.state

    assert_ignored(run(heartbeat, 3), before, reason)


def test_the_workflow_timeout_fails_the_execution_and_skips_pending_steps() -> None:
    run = Run(
        [
            task("slow"),
            task("flaky", retry={"initialInterval": "1m"}),
            task("after", "slow"),
            task("nap", "flaky", kind=WAIT, input={"duration": "1s"}),
        ],
        timeout="10m",
    )
    run.start()
    run.fail("flaky", 1, at=550)

    decision = run.fire("workflow-timeout", at=600)

    assert run.state.phase is E.FAILED
    assert run.state.error == Failure("WorkflowTimeout", "workflow did not finish within 600s")
    assert run.state.finished_at == t(600)
    assert run.phases() == {
        "slow": S.RUNNING,  # in flight: its result is still awaited and recorded
        "flaky": S.FAILED,
        "after": S.SKIPPED,
        "nap": S.SKIPPED,
    }
    assert run.step("flaky").next_retry_at is None
    assert kinds(decision) == ["ExecutionTimedOut", "ExecutionFailed"]
    assert decision.dispatches == ()
    assert set(decision.cancel_timers) == {"retry:flaky:2", WORKFLOW_TIMEOUT_KEY}

    before = run.state
    assert_ignored(run.fire("retry", "flaky", 2, at=610), before, "retry no longer due")
    assert_ignored(run.fire("workflow-timeout", at=620), before, "execution no longer running")

    late = run.complete("slow", 1, {"late": True}, at=630)
    assert late.dispatches == ()
    assert kinds(late) == ["StepSucceeded"]
    assert run.step("slow").phase is S.SUCCEEDED
    assert run.step("after").phase is S.SKIPPED
    assert run.state.phase is E.FAILED
    assert run.state.error == before.error


def test_completing_the_execution_cancels_the_workflow_timeout() -> None:
    run = Run([task("a")], timeout="1h")
    run.start()

    decision = run.complete("a", 1, at=10)

    assert WORKFLOW_TIMEOUT_KEY in decision.cancel_timers
    assert run.state.phase is E.COMPLETED
    before = run.state
    assert_ignored(run.fire("workflow-timeout", at=3600), before, "execution no longer running")


# ---------------------------------------------------------------- stale facts


def _stale_setup() -> Run:
    """`a` on attempt 2 (running), `b` succeeded, `c` pending, `w` waiting."""
    run = Run(
        [
            task("a", timeout="30s", heartbeatTimeout="10s", retry={"maxAttempts": 5}),
            task("b"),
            task("c", "a", "b"),
            task("w", kind=WAIT, input={"duration": "1h"}),
        ]
    )
    run.start()
    run.complete("b", 1, {"b": 1}, at=1)
    run.fail("a", 1, at=2)
    run.fire("retry", "a", 2, at=3)
    return run


@pytest.mark.parametrize(
    ("fact", "reason"),
    [
        pytest.param(
            StepCompleted("a", 1, {}),
            "attempt 1 is not current (current is 2)",
            id="completed-old-attempt",
        ),
        pytest.param(
            StepCompleted("a", 3, {}),
            "attempt 3 is not current (current is 2)",
            id="completed-future-attempt",
        ),
        pytest.param(
            StepFailed("a", 1, "X", "y"), "attempt 1 is not current", id="failed-old-attempt"
        ),
        pytest.param(StepHeartbeat("a", 1), "attempt 1 is not current", id="heartbeat-old"),
        pytest.param(
            StepCompleted("b", 1, {"again": True}),
            "attempt 1 already settled (Succeeded)",
            id="duplicate-completion",
        ),
        pytest.param(
            StepFailed("b", 1, "X", "y"),
            "attempt 1 already settled (Succeeded)",
            id="failure-after-success",
        ),
        pytest.param(
            StepCompleted("c", 1, {}),
            "attempt 1 is not current (current is 0)",
            id="completed-never-dispatched",
        ),
        pytest.param(
            StepCompleted("c", 0, {}),
            "attempt 0 already settled (Pending)",
            id="completed-attempt-zero",
        ),
        pytest.param(StepCompleted("ghost", 1, {}), "unknown step 'ghost'", id="unknown-completed"),
        pytest.param(StepFailed("ghost", 1, "X", "y"), "unknown step 'ghost'", id="unknown-failed"),
        pytest.param(StepHeartbeat("ghost", 1), "unknown step 'ghost'", id="unknown-heartbeat"),
        pytest.param(
            TimerFired("step-timeout", "ghost", 1),
            "unknown step 'ghost'",
            id="unknown-step-timeout",
        ),
        pytest.param(
            TimerFired("heartbeat-timeout", "ghost", 1),
            "unknown step 'ghost'",
            id="unknown-heartbeat-timeout",
        ),
        pytest.param(TimerFired("wait", "ghost", 1), "unknown step 'ghost'", id="unknown-wait"),
        pytest.param(TimerFired("retry", "ghost", 2), "retry no longer due", id="unknown-retry"),
        pytest.param(TimerFired("retry", "a", 2), "retry no longer due", id="retry-duplicate"),
        pytest.param(TimerFired("retry", "a", 3), "retry no longer due", id="retry-not-due"),
        pytest.param(TimerFired("retry", "b", 2), "retry no longer due", id="retry-succeeded"),
        pytest.param(TimerFired("retry", "c", 1), "retry no longer due", id="retry-pending"),
        pytest.param(
            TimerFired("step-timeout", "a", 1), "attempt 1 is not current", id="step-timeout-old"
        ),
        pytest.param(
            TimerFired("heartbeat-timeout", "a", 1),
            "attempt 1 is not current",
            id="heartbeat-timeout-old",
        ),
        pytest.param(
            TimerFired("step-timeout", "b", 1),
            "attempt 1 already settled",
            id="step-timeout-settled",
        ),
        pytest.param(TimerFired("wait", "w", 2), "attempt 2 is not current", id="wait-wrong"),
    ],
)
def test_stale_and_unknown_facts_are_ignored(fact: Fact, reason: str) -> None:
    run = _stale_setup()
    before = run.state
    snapshot = before.to_json()

    decision = run(fact, 20)

    assert_ignored(decision, before, reason)
    assert before.to_json() == snapshot
    assert decision.state.revision == before.revision


def test_a_duplicate_result_changes_nothing() -> None:
    run = Run([task("a"), task("b", "a")])
    run.start()
    first = run.complete("a", 1, {"v": 1}, at=1)
    after_first = run.state

    second = run.complete("a", 1, {"v": 2}, at=2)

    assert first.applied
    assert dispatched(first) == [("b", 1)]
    assert_ignored(second, after_first, "already settled")
    assert run.state == after_first
    assert run.state.revision == after_first.revision
    assert run.step("a").output == {"v": 1}


def test_a_result_for_a_retrying_step_is_ignored() -> None:
    run = Run([task("a", retry={"initialInterval": "5s"})])
    run.start()
    run.fail("a", 1, at=1)
    before = run.state

    assert_ignored(run.complete("a", 1, at=2), before, "already settled (Retrying)")
    assert_ignored(run.complete("a", 2, at=2), before, "attempt 2 is not current")


# ------------------------------------------------------------ terminal states


def _failed_with_slow_in_flight() -> Run:
    run = Run([task("slow"), task("bad"), task("after", "slow")], timeout="1h")
    run.start()
    run.fail("bad", 1, "Fatal", "broken", retryable=False, at=5)
    return run


def test_after_failure_an_in_flight_result_is_still_recorded_but_nothing_is_dispatched() -> None:
    run = _failed_with_slow_in_flight()
    assert run.state.phase is E.FAILED
    assert run.phases() == {"slow": S.RUNNING, "bad": S.FAILED, "after": S.SKIPPED}
    before = run.state

    decision = run.complete("slow", 1, {"done": True}, at=9)

    assert decision.applied
    assert decision.dispatches == ()
    assert decision.timers == ()
    assert kinds(decision) == ["StepSucceeded"]
    assert run.step("slow").phase is S.SUCCEEDED
    assert run.step("slow").output == {"done": True}
    assert run.step("slow").finished_at == t(9)
    assert run.step("after").phase is S.SKIPPED
    assert run.state.phase is E.FAILED
    assert run.state.error == Failure("Fatal", "step bad failed: broken", step="bad")
    assert run.state.finished_at == t(5)
    assert run.state.output is None
    assert run.state.revision == before.revision + 1


def test_after_failure_an_in_flight_failure_is_recorded_and_not_retried() -> None:
    run = _failed_with_slow_in_flight()

    decision = run.fail("slow", 1, "Flaky", "later", at=9)

    assert decision.applied
    assert decision.dispatches == ()
    assert decision.timers == ()
    assert kinds(decision) == ["StepFailed"]
    assert run.step("slow").phase is S.FAILED
    assert run.step("slow").error == Failure("Flaky", "later")
    assert run.state.error == Failure("Fatal", "step bad failed: broken", step="bad")


def test_cancel_stops_the_execution_and_skips_what_has_not_run() -> None:
    run = Run(
        [
            task("running"),
            task("flaky", retry={"initialInterval": "1m"}),
            task("pending", "running"),
            task("nap", kind=WAIT, input={"duration": "1h"}),
        ],
        timeout="2h",
    )
    run.start()
    run.fail("flaky", 1, at=10)

    decision = run(Cancel("user asked"), 50)

    assert run.state.phase is E.CANCELLED
    assert run.state.error == Failure("Cancelled", "user asked")
    assert run.state.finished_at == t(50)
    assert run.phases() == {
        "running": S.RUNNING,
        "flaky": S.FAILED,
        "pending": S.SKIPPED,
        "nap": S.SKIPPED,
    }
    assert decision.dispatches == ()
    assert decision.timers == ()
    assert set(decision.cancel_timers) == {"retry:flaky:2", "wait:nap:1", WORKFLOW_TIMEOUT_KEY}
    assert kinds(decision) == ["ExecutionCancelled"]
    assert "user asked" in decision.records[0].message

    before = run.state
    assert_ignored(run.fire("retry", "flaky", 2, at=70), before, "retry no longer due")
    assert_ignored(run.fire("wait", "nap", 1, at=3650), before, "already settled (Skipped)")
    late = run.complete("running", 1, at=80)
    assert late.dispatches == ()
    assert run.step("running").phase is S.SUCCEEDED
    assert run.step("pending").phase is S.SKIPPED
    assert run.state.phase is E.CANCELLED


def test_cancel_has_a_default_reason() -> None:
    run = Run([task("a")])
    run.start()
    run(Cancel())
    assert run.state.error == Failure("Cancelled", "cancelled by request")


def test_cancel_before_start_skips_every_step() -> None:
    run = Run([task("a"), task("b", "a")])

    decision = run(Cancel("never mind"))

    assert run.state.phase is E.CANCELLED
    assert run.phases() == {"a": S.SKIPPED, "b": S.SKIPPED}
    assert kinds(decision) == ["ExecutionCancelled"]
    assert decision.dispatches == ()


@pytest.mark.parametrize(
    ("prepare", "phase"),
    [
        pytest.param(lambda r: (r.start(), r.complete("a", 1)), "Completed", id="completed"),
        pytest.param(lambda r: (r.start(), r.fail("a", 1, retryable=False)), "Failed", id="failed"),
        pytest.param(lambda r: (r.start(), r(Cancel())), "Cancelled", id="cancelled"),
    ],
)
def test_cancel_on_a_terminal_execution_is_ignored(
    prepare: Callable[[Run], Any], phase: str
) -> None:
    run = Run([task("a")])
    prepare(run)
    before = run.state

    assert_ignored(run(Cancel("too late"), 99), before, f"execution already {phase}")


# ------------------------------------------------------------------ built-ins


def test_a_pass_step_succeeds_with_its_rendered_input_and_unblocks_downstream() -> None:
    run = Run(
        [
            task("p", kind=PASS, input={"sku": "${{ input.sku }}", "qty": 2}),
            task("b", "p", input={"item": "${{ steps.p.output }}"}),
        ],
        {"sku": "X"},
    )

    decision = run.start(at=3)

    assert decision.dispatches == (
        Dispatch("b", 1, TASK, {"item": {"sku": "X", "qty": 2}}, None, None),
    )
    assert kinds(decision) == ["ExecutionStarted", "StepSucceeded", "StepDispatched"]
    assert decision.records[1].step == "p"
    p = run.step("p")
    assert (p.phase, p.attempt, p.output, p.finished_at) == (
        S.SUCCEEDED,
        1,
        {"sku": "X", "qty": 2},
        t(3),
    )


def test_a_pass_step_without_input_outputs_an_empty_object() -> None:
    run = Run([task("p", kind=PASS)])
    run.start()
    assert run.step("p").output == {}
    assert run.state.output == {"p": {}}


def test_a_chain_of_pass_steps_completes_the_execution_in_the_start_decision() -> None:
    run = Run(
        [
            task("p1", kind=PASS, input={"n": "${{ input.n }}"}),
            task("p2", "p1", kind=PASS, input={"pair": "${{ [steps.p1.output.n, input.n] }}"}),
            task(
                "p3",
                "p1",
                "p2",
                kind=PASS,
                input={"msg": "n=${{ steps.p1.output.n }} pair=${{ steps.p2.output.pair }}"},
            ),
        ],
        {"n": 4},
        timeout="1h",
        output={"final": "${{ steps.p3.output.msg }}"},
    )

    decision = run.start(at=1)

    assert run.state.phase is E.COMPLETED
    assert run.state.revision == 1
    assert run.state.output == {"final": "n=4 pair=[4,4]"}
    assert all(p is S.SUCCEEDED for p in run.phases().values())
    assert decision.dispatches == ()
    assert kinds(decision) == [
        "ExecutionStarted",
        "StepSucceeded",
        "StepSucceeded",
        "StepSucceeded",
        "ExecutionCompleted",
    ]
    assert [r.step for r in decision.records[1:4]] == ["p1", "p2", "p3"]
    # The workflow timeout set and cancelled in the same decision nets to a cancel,
    # and a firing that got through anyway is ignored.
    assert decision.timers == ()
    assert WORKFLOW_TIMEOUT_KEY in decision.cancel_timers
    before = run.state
    assert_ignored(run.fire("workflow-timeout", at=3601), before, "no longer running")


@pytest.mark.parametrize(
    ("fail_input", "error"),
    [
        pytest.param(
            {"type": "OutOfStock", "message": "no ${{ input.sku }}"},
            Failure("OutOfStock", "no X1"),
            id="type-and-message",
        ),
        pytest.param(
            {"type": "${{ input.code }}", "message": "code ${{ input.code }}"},
            Failure("E42", "code E42"),
            id="templated-type",
        ),
        pytest.param({"message": "just because"}, Failure("Failed", "just because"), id="no-type"),
        pytest.param(None, Failure("Failed", ""), id="no-input"),
    ],
)
def test_a_fail_step_fails_permanently_with_type_and_message_from_its_input(
    fail_input: dict[str, Any] | None, error: Failure
) -> None:
    fields = {} if fail_input is None else {"input": fail_input}
    run = Run(
        [
            task("a"),
            task("f", "a", kind=FAIL, retry={"maxAttempts": 5}, **fields),
            task("after", "f"),
        ],
        {"sku": "X1", "code": "E42"},
    )
    run.start()

    decision = run.complete("a", 1, at=2)

    f = run.step("f")
    assert (f.phase, f.attempt, f.error, f.finished_at) == (S.FAILED, 1, error, t(2))
    assert run.step("after").phase is S.SKIPPED
    assert run.state.phase is E.FAILED
    assert run.state.error == Failure(error.type, f"step f failed: {error.message}", step="f")
    assert decision.dispatches == ()
    assert decision.timers == ()
    assert kinds(decision) == ["StepSucceeded", "StepFailed", "ExecutionFailed"]


@pytest.mark.parametrize(
    ("duration", "execution_input", "seconds"),
    [
        pytest.param("30s", {}, 30, id="seconds"),
        pytest.param("1m30s", {}, 90, id="compound"),
        pytest.param("500ms", {}, 0.5, id="millis"),
        pytest.param("1d", {}, 86400, id="day"),
        pytest.param("${{ input.delay }}", {"delay": "2h"}, 7200, id="templated"),
    ],
)
def test_a_wait_step_sets_a_wait_timer_and_completes_when_it_fires(
    duration: str, execution_input: dict[str, Any], seconds: float
) -> None:
    run = Run(
        [
            task("a"),
            task("w", "a", kind=WAIT, input={"duration": duration, "note": "hold"}),
            task("b", "w", input={"waited": "${{ steps.w.output.duration }}"}),
        ],
        execution_input,
    )
    run.start()

    decision = run.complete("a", 1, at=10)

    assert decision.dispatches == ()
    assert decision.timers == (Timer("wait:w:1", "wait", "w", 1, t(10 + seconds)),)
    assert kinds(decision) == ["StepSucceeded", "StepWaiting"]
    rendered = {"duration": execution_input.get("delay", duration), "note": "hold"}
    w = run.step("w")
    assert (w.phase, w.attempt, w.attempt_started_at) == (S.RUNNING, 1, t(10))
    assert w.output == rendered

    decision = run.fire("wait", "w", 1, at=10 + seconds)

    assert run.step("w").phase is S.SUCCEEDED
    assert run.step("w").output == rendered
    assert run.step("w").finished_at == t(10 + seconds)
    assert decision.dispatches == (
        Dispatch("b", 1, TASK, {"waited": rendered["duration"]}, None, None),
    )
    assert kinds(decision) == ["StepSucceeded", "StepDispatched"]

    before = run.state
    assert_ignored(run.fire("wait", "w", 1, at=20 + seconds), before, "already settled")


def test_a_wait_step_as_the_last_step_completes_the_execution() -> None:
    run = Run([task("w", kind=WAIT, input={"duration": "5s"})])
    run.start()
    decision = run.fire("wait", "w", 1, at=5)
    assert run.state.phase is E.COMPLETED
    assert run.state.output == {"w": {"duration": "5s"}}
    assert kinds(decision) == ["StepSucceeded", "ExecutionCompleted"]


@pytest.mark.parametrize(
    ("wait_input", "execution_input"),
    [
        pytest.param({"duration": "soon"}, {}, id="literal-word"),
        pytest.param({"duration": "${{ input.d }}"}, {"d": "soon"}, id="templated-word"),
        pytest.param({"duration": "${{ input.d }}"}, {"d": 5}, id="number"),
        pytest.param({"duration": "${{ input.d }}"}, {}, id="missing-value"),
        pytest.param({"duration": "${{ input.d }}"}, {"d": "10 s"}, id="space"),
        pytest.param({}, {}, id="no-duration"),
    ],
)
def test_a_wait_step_with_an_invalid_duration_fails_with_invalid_input(
    wait_input: dict[str, Any], execution_input: dict[str, Any]
) -> None:
    run = Run([task("w", kind=WAIT, input=wait_input, retry={"maxAttempts": 5})], execution_input)

    decision = run.start()

    w = run.step("w")
    assert w.phase is S.FAILED
    assert w.error is not None
    assert w.error.type == "InvalidInput"
    assert w.error.message.startswith("duration: invalid duration")
    assert run.state.phase is E.FAILED
    assert run.state.error is not None
    assert run.state.error.type == "InvalidInput"
    assert decision.timers == ()
    assert decision.dispatches == ()
    assert kinds(decision) == ["ExecutionStarted", "StepFailed", "ExecutionFailed"]


@pytest.mark.parametrize("huge", ["9999999999d", "3000000d"])
def test_a_wait_duration_too_large_for_the_clock_fails_with_invalid_input(huge: str) -> None:
    run = Run([task("w", kind=WAIT, input={"duration": "${{ input.d }}"})], {"d": huge})

    run.start()

    assert run.step("w").phase is S.FAILED
    assert run.step("w").error is not None
    assert run.step("w").error.type == "InvalidInput"
    assert run.state.phase is E.FAILED


# ------------------------------------------------------------ expression errors


@pytest.mark.parametrize(
    ("step_input", "execution_input", "path"),
    [
        pytest.param(
            {"count": "${{ length(input.n) }}"},
            {"n": 5},
            "steps.a.input.count",
            id="length-of-number",
        ),
        pytest.param(
            {"items": ["ok", "${{ abs(input.s) }}"]},
            {"s": "x"},
            "steps.a.input.items[1]",
            id="abs-of-string",
        ),
        pytest.param(
            {"label": "n=${{ length(input.n) }}"},
            {"n": 5},
            "steps.a.input.label",
            id="interpolated",
        ),
        pytest.param(
            {"deep": {"x": "${{ sum(input.xs) }}"}},
            {"xs": ["a"]},
            "steps.a.input.deep.x",
            id="nested",
        ),
        pytest.param(
            {"odd key": "${{ length(input.n) }}"},
            {"n": 5},
            'steps.a.input["odd key"]',
            id="quoted-key",
        ),
    ],
)
def test_an_expression_error_at_dispatch_fails_the_step_and_the_execution(
    step_input: dict[str, Any], execution_input: dict[str, Any], path: str
) -> None:
    run = Run(
        [task("ok"), task("a", input=step_input, retry={"maxAttempts": 5}), task("b", "a")],
        execution_input,
    )

    decision = run.start(at=1)

    a = run.step("a")
    assert (a.phase, a.attempt, a.finished_at) == (S.FAILED, 1, t(1))
    assert a.error is not None
    assert a.error.type == "ExpressionError"
    assert a.error.message.startswith(f"{path}: evaluating ")
    assert run.state.phase is E.FAILED
    assert run.state.error == Failure(
        "ExpressionError", f"step a failed: {a.error.message}", step="a"
    )
    assert dispatched(decision) == [("ok", 1)]  # dispatched before `a` was reached
    assert decision.timers == ()
    assert run.phases() == {"ok": S.RUNNING, "a": S.FAILED, "b": S.SKIPPED}
    assert kinds(decision) == [
        "ExecutionStarted",
        "StepDispatched",
        "StepFailed",
        "ExecutionFailed",
    ]


def test_an_expression_error_on_upstream_output_fails_the_downstream_step() -> None:
    run = Run([task("a"), task("b", "a", input={"n": "${{ length(steps.a.output.n) }}"})])
    run.start()

    decision = run.complete("a", 1, {"n": 5}, at=2)

    assert run.step("a").phase is S.SUCCEEDED
    assert run.step("b").phase is S.FAILED
    assert run.step("b").error is not None
    assert run.step("b").error.type == "ExpressionError"
    assert run.state.phase is E.FAILED
    assert decision.dispatches == ()
    assert kinds(decision) == ["StepSucceeded", "StepFailed", "ExecutionFailed"]


# ------------------------------------------------------------ JSON round trip


def _scenario_retries_and_timeouts(run_steps: Callable[..., Run]) -> Run:
    run = run_steps(
        [
            task("a", timeout="30s", heartbeatTimeout="10s", input={"id": "${{ input.id }}"}),
            task("w", "a", kind=WAIT, input={"duration": "1m"}),
            task("b", "w", input={"from": "${{ steps.a.output }}"}),
        ],
        {"id": 7, "nested": {"list": [1, None, "x"]}},
        timeout="1h",
        output={"b": "${{ steps.b.output }}"},
    )
    run.start(at=0)
    run(StepHeartbeat("a", 1), 5)
    run.fire("heartbeat-timeout", "a", 1, at=15)
    run.fire("retry", "a", 2, at=16)
    run.complete("a", 2, {"ok": [1, 2], "n": None}, at=20)
    run.fire("wait", "w", 1, at=80)
    run.fail("b", 1, "Flaky", "once", at=81)
    run.fire("retry", "b", 2, at=82)
    run.complete("b", 2, "done", at=83)
    return run


def _scenario_failure_and_late_result(run_steps: Callable[..., Run]) -> Run:
    run = run_steps([task("slow"), task("bad"), task("after", "slow")])
    run.start(at=0)
    run.fail("bad", 1, "Fatal", "broken", retryable=False, at=1)
    run.complete("slow", 1, {"late": True}, at=2)
    return run


def _scenario_cancel(run_steps: Callable[..., Run]) -> Run:
    run = run_steps(
        [task("a"), task("flaky"), task("nap", kind=WAIT, input={"duration": "1h"})],
        timeout="2h",
    )
    run.start(at=0)
    run.fail("flaky", 1, at=1)
    run(Cancel("stop"), 2)
    return run


def _scenario_expression_error(run_steps: Callable[..., Run]) -> Run:
    run = run_steps([task("a", input={"n": "${{ length(input.n) }}"})], {"n": 1})
    run.start(at=0)
    return run


@pytest.mark.parametrize(
    "scenario",
    [
        _scenario_retries_and_timeouts,
        _scenario_failure_and_late_result,
        _scenario_cancel,
        _scenario_expression_error,
    ],
)
def test_every_state_survives_a_json_round_trip(scenario: Callable[..., Run]) -> None:
    run = scenario(Run)
    assert len(run.states) >= 2
    for state in run.states:
        assert ExecutionState.from_json(state.to_json()) == state
        text = json.dumps(state.to_json())
        assert ExecutionState.from_json(json.loads(text)) == state


def test_the_round_trip_scenario_ends_where_expected() -> None:
    run = _scenario_retries_and_timeouts(Run)
    assert run.state.phase is E.COMPLETED
    assert run.state.output == {"b": "done"}
    assert run.step("a").attempt == 2
    assert run.step("b").attempt == 2
    assert run.state.revision == len(run.states) - 1


# ---------------------------------------------------------- property: any order


_STEP_NAMES = st.sampled_from(["a", "b", "c", "w", "ghost"])
_ATTEMPTS = st.integers(min_value=0, max_value=4)
_FACTS = st.one_of(
    st.just(Start()),
    st.builds(StepCompleted, step=_STEP_NAMES, attempt=_ATTEMPTS, output=st.just({"ok": 1})),
    st.builds(
        StepFailed,
        step=_STEP_NAMES,
        attempt=_ATTEMPTS,
        error_type=st.sampled_from(["Flaky", "Fatal"]),
        message=st.just("m"),
        retryable=st.booleans(),
    ),
    st.builds(StepHeartbeat, step=_STEP_NAMES, attempt=_ATTEMPTS),
    st.builds(
        TimerFired,
        kind=st.sampled_from(["retry", "step-timeout", "heartbeat-timeout", "wait"]),
        step=_STEP_NAMES,
        attempt=_ATTEMPTS,
    ),
    st.just(TimerFired("workflow-timeout")),
    st.builds(Cancel),
)
_PROPERTY_STEPS = [
    task(
        "a",
        timeout="30s",
        heartbeatTimeout="10s",
        retry={"maxAttempts": 3, "nonRetryableErrors": ["Fatal"]},
    ),
    task("b", retry={"maxAttempts": 2, "initialInterval": "0s"}),
    task("c", "a", "b", input={"x": "${{ steps.a.output.ok }}"}),
    task("w", "b", kind=WAIT, input={"duration": "5s"}),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    facts=st.lists(
        st.tuples(_FACTS, st.integers(min_value=0, max_value=120)), min_size=1, max_size=25
    )
)
def test_any_sequence_of_facts_keeps_the_invariants(facts: list[tuple[Fact, int]]) -> None:
    run = Run(_PROPERTY_STEPS, {"k": "v"}, timeout="10m")
    definition = run.definition
    clock = 0
    for fact, gap in [(Start(), 0), *facts]:
        clock += gap
        before = run.state
        decision = run(fact, clock)
        state = decision.state

        if not decision.applied:
            assert state is before
            assert decision.dispatches == ()
            assert decision.timers == ()
            assert decision.cancel_timers == ()
            assert decision.records == ()
            continue
        assert state.revision == before.revision + 1
        if before.phase.is_terminal:
            assert decision.dispatches == ()
            assert (state.phase, state.error, state.output, state.finished_at) == (
                before.phase,
                before.error,
                before.output,
                before.finished_at,
            )
        for d in decision.dispatches:
            step = state.steps[d.step]
            assert step.phase is S.RUNNING
            assert step.attempt == d.attempt
        for name, step in state.steps.items():
            assert step.attempt <= definition.step(name).retry.max_attempts
            assert (step.phase is S.RETRYING) == (step.next_retry_at is not None)
            if state.phase.is_terminal:
                assert step.phase not in (S.PENDING, S.RETRYING)
        if state.phase is E.COMPLETED:
            assert all(s.phase is S.SUCCEEDED for s in state.steps.values())
        assert ExecutionState.from_json(state.to_json()) == state
