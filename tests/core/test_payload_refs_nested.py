"""Fields of a step output stored by reference, in the pure core: the nested guards.

A runner whose output is too large stores its large fields by reference one by one and
keeps the small ones inline (`ClaimCheck.offload`), so the engine sees an output such
as `{"data": <marker>, "sha": "..."}`. Small fields read as usual; a marker passed on
as a value (`${{ steps.make.output.data }}`) goes to the next runner, which resolves
it; an expression that looks inside a marker fails the step with ExpressionError,
naming the step and the field, never reading null: the payload is not here. An output
without a marker is handed to the templates as the very same object.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from sagaflow.core.definition import compile_definition
from sagaflow.core.engine import Decision, decide
from sagaflow.core.facts import Start, StepCompleted
from sagaflow.core.manifests import ExecutionPhase, StepPhase, WorkflowSpec
from sagaflow.core.payload_refs import ReferenceAccessError, ref_object, reveal, stand_in
from sagaflow.core.ports import PayloadRef
from sagaflow.core.state import ExecutionState, new_execution
from sagaflow.core.status import execution_status

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
BASE = "https://acct.blob.core.windows.net/p/e1/make/1/output"
DATA = ref_object(PayloadRef(f"{BASE}.data", 5_242_880, "ab" * 32))
BLOB = ref_object(PayloadRef(f"{BASE}.meta.blob", 90_000, "cd" * 32))
ROW = ref_object(PayloadRef("file:///p/e0/other/1/output", 70_000, "ef" * 32))
# What a runner sends for {data: <5 MB>, sha, meta: {blob: <90 KB>, n}, rows: [...]}.
OUTPUT: dict[str, Any] = {
    "data": DATA,
    "sha": "5e3a",
    "meta": {"blob": BLOB, "n": 3},
    "rows": [ROW, 1],
}


def refusal(field: str, size: int) -> str:
    return f"{field} of step 'make' is stored by reference ({size} bytes); pass it whole"


def run_to_second_step(
    second_input: dict[str, Any], output: Any = OUTPUT, **workflow: Any
) -> tuple[ExecutionState, Decision]:
    """`make` completes with `output`; return the state and decision that follow."""
    steps = [
        {"name": "make", "type": "bulk.make"},
        {"name": "use", "type": "bulk.use", "dependsOn": ["make"], "input": second_input},
    ]
    spec = WorkflowSpec.model_validate({"steps": steps, **workflow})
    definition = compile_definition(spec, name="bulk", version=1)
    state = new_execution(
        execution_id="e1",
        namespace="default",
        name="run-1",
        workflow="bulk",
        version=1,
        input={"tag": "t"},
        step_names=("make", "use"),
    )
    state = decide(state, definition, Start(), T0).state
    done = decide(state, definition, StepCompleted("make", 1, output), T0)
    return done.state, done


# ---------------------------------------------------------------- stand_in itself


@pytest.mark.parametrize(
    "output",
    [
        {"id": 7, "status": "ok"},
        {"rows": [{"id": 1, "tags": ["a"]}, [1, 2.5, None, True]], "nested": {"x": {}}},
        {"look": {"$sagaflowRef": "not a marker"}, "alike": [{"$sagaflowRef": {"uri": 1}}]},
        {},
        None,
    ],
)
def test_an_output_without_a_marker_is_handed_over_as_the_same_object(output: Any) -> None:
    # effects.context compares identity to skip the reveal walk: no copy, ever.
    assert stand_in("make", output) is output


def test_stand_ins_copy_only_on_the_way_to_a_marker_and_never_mutate() -> None:
    untouched = {"x": [1, 2], "y": {"z": "w"}}
    output = {"data": DATA, "plain": untouched, "meta": {"blob": BLOB, "n": 3}}
    guarded = stand_in("make", output)
    assert guarded is not output and output["data"] is DATA and output["meta"]["blob"] is BLOB
    assert guarded["plain"] is untouched  # no marker inside: shared, not copied
    assert guarded["meta"]["n"] == 3 and guarded["meta"] is not output["meta"]
    assert reveal(guarded) == output


def test_a_field_stand_in_refuses_every_look_and_names_step_and_field() -> None:
    guarded = stand_in("make", OUTPUT)
    field = guarded["meta"]["blob"]
    expected = refusal("output.meta.blob", 90_000)
    assert repr(field) == f"<{expected}>"
    for look in (
        lambda: field.get("x"),
        lambda: field[0],
        lambda: list(field),
        lambda: len(field),
        lambda: field == {},
        lambda: bool(field),
        lambda: str(field),
        lambda: isinstance(field, list),  # JMESPath decides types with isinstance
        lambda: isinstance(field, dict | str | int),
    ):
        with pytest.raises(ReferenceAccessError) as caught:
            look()
        assert str(caught.value) == expected
    assert refusal("output.rows[0]", 70_000) in repr(guarded["rows"][0])


# ---------------------------------------------------------------- through the engine

PASSED_ON = {
    "a field whole": ("${{ steps.make.output.data }}", DATA),
    "the whole output": ("${{ steps.make.output }}", OUTPUT),
    "a nested object holding one": ("${{ steps.make.output.meta }}", OUTPUT["meta"]),
    "a list holding one": ("${{ steps.make.output.rows }}", [ROW, 1]),
    "an item of a list": ("${{ steps.make.output.rows[0] }}", ROW),
    "a hash around it": (
        "${{ {data: steps.make.output.data, sha: steps.make.output.sha} }}",
        {"data": DATA, "sha": "5e3a"},
    ),
    "a list around it": ("${{ [steps.make.output.data, input.tag] }}", [DATA, "t"]),
    "not_null": ("${{ not_null(steps.make.output.data) }}", DATA),
    "through a pipe": ("${{ steps.make.output.data | @ }}", DATA),
    "values()": ("${{ values(steps.make.output.meta) }}", [BLOB, 3]),
    "merge()": ('${{ merge(steps.make.output.meta, `{"k": 1}`) }}', {"blob": BLOB, "n": 3, "k": 1}),
}


@pytest.mark.parametrize("case", PASSED_ON)
def test_a_marker_inside_an_output_is_passed_on_whole(case: str) -> None:
    template, expected = PASSED_ON[case]
    state, decision = run_to_second_step({"v": template})
    assert state.steps["make"].output == OUTPUT  # state holds the markers, not payloads
    (dispatch,) = decision.dispatches
    assert dispatch.step == "use" and dispatch.input == {"v": expected}


READ_INLINE = {
    "${{ steps.make.output.sha }}": "5e3a",
    "sha=${{ steps.make.output.sha }}": "sha=5e3a",
    "${{ steps.make.output.meta.n }}": 3,
    "${{ steps.make.output.rows[1] }}": 1,
    "${{ length(steps.make.output.rows) }}": 2,
    "${{ keys(steps.make.output) }}": ["data", "sha", "meta", "rows"],
    "${{ steps.make.output.missing }}": None,  # absent inline, as on any output
}


@pytest.mark.parametrize("template", READ_INLINE)
def test_fields_kept_inline_read_as_usual(template: str) -> None:
    _, decision = run_to_second_step({"v": template})
    assert decision.dispatches[0].input == {"v": READ_INLINE[template]}


LOOKING_INSIDE = [
    ("${{ steps.make.output.data.x }}", "output.data"),
    ("${{ steps.make.output.data[0] }}", "output.data"),
    ("${{ steps.make.output.data[*] }}", "output.data"),
    ("${{ steps.make.output.data[] }}", "output.data"),
    ("${{ steps.make.output.data[1:] }}", "output.data"),
    ("${{ steps.make.output.data.* }}", "output.data"),
    ("${{ steps.make.output.data.x || `1` }}", "output.data"),
    ("${{ steps.make.output.data || `1` }}", "output.data"),
    ("${{ !(steps.make.output.data) }}", "output.data"),
    ("${{ steps.make.output.data == `1` }}", "output.data"),
    ("${{ steps.make.output.data < `1` }}", "output.data"),
    ("${{ length(steps.make.output.data) }}", "output.data"),
    ("${{ type(steps.make.output.data) }}", "output.data"),
    ("${{ to_array(steps.make.output.data) }}", "output.data"),
    ("${{ to_number(steps.make.output.data) }}", "output.data"),
    ("${{ to_string(steps.make.output) }}", "output.data"),
    ("${{ starts_with(steps.make.output.data, 'x') }}", "output.data"),
    ("data: ${{ steps.make.output.data }}", "output.data"),
    ("whole: ${{ steps.make.output }}", "output.data"),
    ("${{ steps.make.output.meta.blob.x }}", "output.meta.blob"),
    ("${{ steps.make.output.rows[0].id }}", "output.rows[0]"),
    ("${{ steps.make.output.rows[*].id }}", "output.rows[0]"),
    ("${{ steps.make.output.rows[?id == `1`] }}", "output.rows[0]"),
    ("${{ max(steps.make.output.rows) }}", "output.rows[0]"),
    ("${{ sort_by(steps.make.output.rows, &id) }}", "output.rows[0]"),
]


@pytest.mark.parametrize(("template", "field"), LOOKING_INSIDE)
def test_looking_inside_a_field_stored_by_reference_fails_the_step(
    template: str, field: str
) -> None:
    state, decision = run_to_second_step({"v": template})
    assert decision.dispatches == ()
    step = state.steps["use"]
    assert step.phase is StepPhase.FAILED and step.error is not None
    assert step.error.type == "ExpressionError"
    assert step.error.message.startswith("steps.use.input")
    size = {"output.data": 5_242_880, "output.meta.blob": 90_000}.get(field, 70_000)
    assert refusal(field, size) in step.error.message
    assert state.phase is ExecutionPhase.FAILED  # not retried: the template cannot change


def test_the_execution_output_reads_inline_fields_and_refuses_to_look_inside() -> None:
    whole = finish_one_step(
        {"sha": "${{ steps.make.output.sha }}", "data": "${{ steps.make.output.data }}"}
    )
    assert whole.phase is ExecutionPhase.COMPLETED
    assert whole.output == {"sha": "5e3a", "data": DATA}
    inside = finish_one_step({"n": "${{ steps.make.output.data.n }}"})
    assert inside.phase is ExecutionPhase.FAILED and inside.error is not None
    assert inside.error.type == "ExpressionError"
    assert inside.error.message.startswith("spec.output")
    assert refusal("output.data", 5_242_880) in inside.error.message


def finish_one_step(spec_output: dict[str, Any]) -> ExecutionState:
    spec = WorkflowSpec.model_validate(
        {"steps": [{"name": "make", "type": "bulk.make"}], "output": spec_output}
    )
    definition = compile_definition(spec, name="bulk", version=1)
    state = new_execution(
        execution_id="e1",
        namespace="default",
        name="run-1",
        workflow="bulk",
        version=1,
        input={},
        step_names=("make",),
    )
    state = decide(state, definition, Start(), T0).state
    return decide(state, definition, StepCompleted("make", 1, OUTPUT), T0).state


def test_status_shows_the_inline_fields_and_the_markers_and_state_keeps_them() -> None:
    state, _ = run_to_second_step({"v": "${{ steps.make.output.sha }}"})
    steps = {s["name"]: s for s in execution_status(state)["steps"]}
    assert steps["make"]["output"] == OUTPUT and "outputRef" not in steps["make"]
    assert ExecutionState.from_json(state.to_json()).steps["make"].output == OUTPUT
