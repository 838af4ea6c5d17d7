"""Step outputs stored by reference, in the pure core: markers, engine rendering, status.

A runner that offloads a large output sends the marker `{"$sagaflowRef": {...}}`
as the output. The engine keeps it in state, passes it on whole where a template
is exactly `${{ steps.X.output }}` (or builds a value around it), and fails the step
with ExpressionError where an expression looks inside it: the payload is not in
the orchestrator, and reading `null` from the marker would run the next step on
wrong data. Status shows `outputRef` instead of `output`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from sagaflow.core.definition import Definition, compile_definition
from sagaflow.core.engine import Decision, decide
from sagaflow.core.facts import Start, StepCompleted
from sagaflow.core.manifests import ExecutionPhase, StepPhase, WorkflowSpec
from sagaflow.core.payload_refs import (
    REF_KEY,
    find_refs,
    is_ref,
    ref_object,
    ref_of,
    replace_refs,
    reveal,
    stand_in,
)
from sagaflow.core.ports import PayloadRef
from sagaflow.core.state import ExecutionState, new_execution
from sagaflow.core.status import execution_status

T0 = datetime(2030, 1, 1, tzinfo=UTC)
REF = PayloadRef("https://acct.blob.core.windows.net/p/e/make/1/output", 5_242_880, "ab" * 32)
MARKER = ref_object(REF)
REFUSAL = "output of step 'make' is stored by reference (5242880 bytes); pass it whole"


def started(steps: list[dict[str, Any]], **workflow: Any) -> tuple[Definition, ExecutionState]:
    spec = WorkflowSpec.model_validate({"steps": steps, **workflow})
    definition = compile_definition(spec, name="bulk", version=1)
    state = new_execution(
        execution_id="e1",
        namespace="default",
        name="run-1",
        workflow="bulk",
        version=1,
        input={"tag": "t"},
        step_names=tuple(s["name"] for s in steps),
    )
    return definition, decide(state, definition, Start(), T0).state


def run_to_second_step(
    second_input: dict[str, Any], *, output: Any = None
) -> tuple[ExecutionState, Decision]:
    """`make` completes with the marker (or `output`); return the decision that follows."""
    definition, state = started(
        [
            {"name": "make", "type": "bulk.make"},
            {"name": "use", "type": "bulk.use", "dependsOn": ["make"], "input": second_input},
        ]
    )
    made = MARKER if output is None else output
    done = decide(state, definition, StepCompleted("make", 1, made), T0)
    return done.state, done


def finished_with_output(output: dict[str, Any] | None) -> ExecutionState:
    """A one-step workflow whose step completes with the marker, and `output` if given."""
    workflow = {} if output is None else {"output": output}
    definition, state = started([{"name": "make", "type": "bulk.make"}], **workflow)
    return decide(state, definition, StepCompleted("make", 1, MARKER), T0).state


# ---------------------------------------------------------------- markers


def test_a_marker_round_trips_and_only_markers_are_markers() -> None:
    assert ref_of(MARKER) == REF and is_ref(MARKER)
    assert {REF_KEY: {"uri": REF.uri, "size": REF.size, "sha256": REF.sha256}} == MARKER
    for lookalike in (
        {REF_KEY: {"uri": "u", "size": -1, "sha256": "s"}},
        {REF_KEY: {"uri": "u", "size": True, "sha256": "s"}},
        {REF_KEY: {"uri": "u", "size": 1}},
        {**MARKER, "extra": 1},
        [MARKER],
        "text",
        None,
    ):
        assert not is_ref(lookalike)
    with pytest.raises(ValueError, match="not a payload reference"):
        ref_of({"a": 1})


def test_references_are_found_and_replaced_at_any_depth() -> None:
    other = PayloadRef("file:///p/x", 3, "cd" * 32)
    value = {"a": [MARKER, {"b": ref_object(other)}], "c": (MARKER,), "d": 1}
    assert find_refs(value) == [REF, other, REF]
    replaced = replace_refs(value, {REF: {"big": True}})
    assert replaced == {
        "a": [{"big": True}, {"b": ref_object(other)}],
        "c": ({"big": True},),
        "d": 1,
    }
    assert value["a"][0] is MARKER  # copied on change, never mutated
    untouched = {"x": [1, 2]}
    assert replace_refs(untouched, {REF: 0}) is untouched


def test_a_stand_in_passes_through_containers_and_reveals_as_its_marker() -> None:
    guarded = stand_in("make", MARKER)
    assert stand_in("make", {"small": 1}) == {"small": 1}
    assert reveal({"x": [guarded], "y": (guarded,)}) == {"x": [MARKER], "y": (MARKER,)}
    assert str(guarded) == f"<{REFUSAL}>"
    with pytest.raises(TypeError, match="pass it whole"):
        guarded.get("items")


# ---------------------------------------------------------------- the engine

PASSED_WHOLE = {
    "the output": ("${{ steps.make.output }}", MARKER),
    "the step": ("${{ steps.make }}", {"output": MARKER}),
    "a hash around it": (
        "${{ {data: steps.make.output, tag: input.tag} }}",
        {"data": MARKER, "tag": "t"},
    ),
    "a list around it": ("${{ [steps.make.output] }}", [MARKER]),
    "through a pipe": ("${{ steps.make.output | @ }}", MARKER),
    "not_null": ("${{ not_null(steps.make.output) }}", MARKER),
}


@pytest.mark.parametrize("case", PASSED_WHOLE)
def test_an_output_stored_by_reference_is_passed_on_whole(case: str) -> None:
    template, expected = PASSED_WHOLE[case]
    state, decision = run_to_second_step({"data": template})
    assert state.steps["make"].output == MARKER  # state holds the marker, not the payload
    (dispatch,) = decision.dispatches
    assert dispatch.step == "use" and dispatch.input == {"data": expected}


REACHING_IN = [
    "${{ steps.make.output.items }}",
    "${{ steps.make.output.items[0] }}",
    "${{ steps.make.output.* }}",
    "${{ length(steps.make.output) }}",
    "${{ keys(steps.make.output) }}",
    "${{ to_string(steps.make.output) }}",
    "${{ steps.make.output == `{}` }}",
    "${{ steps.make.output || `{}` }}",
    "${{ !(steps.make.output) }}",
    "${{ values(steps)[?output.n == `1`] }}",
    "${{ map(&output.n, values(steps)) }}",
    "count: ${{ steps.make.output }}",
    "whole step as text: ${{ steps.make }}",
]


@pytest.mark.parametrize("template", REACHING_IN)
def test_looking_inside_an_output_stored_by_reference_fails_the_step(template: str) -> None:
    state, decision = run_to_second_step({"n": template})
    assert decision.dispatches == ()
    step = state.steps["use"]
    assert step.phase is StepPhase.FAILED and step.error is not None
    assert step.error.type == "ExpressionError"
    assert step.error.message.startswith("steps.use.input")
    assert REFUSAL in step.error.message
    assert state.phase is ExecutionPhase.FAILED  # not retried: the template cannot change


def test_list_operations_read_null_as_they_would_on_the_inline_object() -> None:
    # Step outputs are JSON objects, and indexing an object is null in JMESPath
    # whether it is stored inline or by reference: the same answer, not a silent one.
    _, by_ref = run_to_second_step({"n": "${{ steps.make.output[0] }}"})
    _, inline = run_to_second_step({"n": "${{ steps.make.output[0] }}"}, output={"a": 1})
    assert by_ref.dispatches[0].input == inline.dispatches[0].input == {"n": None}


def test_inline_outputs_are_unaffected() -> None:
    _, decision = run_to_second_step(
        {"n": "${{ length(steps.make.output.items) }}", "t": "x${{ steps.make.output.items[0] }}"},
        output={"items": [7, 8]},
    )
    assert decision.dispatches[0].input == {"n": 2, "t": "x7"}


def test_the_execution_output_passes_a_reference_on_but_never_reads_into_it() -> None:
    sinks = finished_with_output(None)
    assert sinks.phase is ExecutionPhase.COMPLETED and sinks.output == {"make": MARKER}
    whole = finished_with_output({"made": "${{ steps.make.output }}"})
    assert whole.phase is ExecutionPhase.COMPLETED and whole.output == {"made": MARKER}
    inside = finished_with_output({"n": "${{ steps.make.output.items }}"})
    assert inside.phase is ExecutionPhase.FAILED and inside.error is not None
    assert inside.error.type == "ExpressionError" and REFUSAL in inside.error.message
    assert inside.error.message.startswith("spec.output")


# ---------------------------------------------------------------- status and state


def test_status_shows_output_ref_instead_of_output() -> None:
    state, _ = run_to_second_step({"data": "${{ steps.make.output }}"})
    steps = {s["name"]: s for s in execution_status(state)["steps"]}
    assert steps["make"]["outputRef"] == {"uri": REF.uri, "size": REF.size, "sha256": REF.sha256}
    assert "output" not in steps["make"]


def test_state_keeps_the_marker_through_its_json_form() -> None:
    state, _ = run_to_second_step({"data": "${{ steps.make.output }}"})
    assert ExecutionState.from_json(state.to_json()).steps["make"].output == MARKER
