"""Bad saga input in manifests: every problem reported with its YAML field path."""

from __future__ import annotations

from typing import Any

import pytest

from sagaflow.core.manifests import Workflow
from sagaflow.core.validation import Document, validate_documents, validate_workflow

API = "sagaflow.io/v1alpha1"


def workflow(*steps: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "Workflow",
        "metadata": {"name": "order"},
        "spec": {"steps": list(steps), **spec},
    }


def step(name: str, *deps: str, of: str = "acme.work", **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": of, "dependsOn": list(deps), **fields}


UNDO = {"type": "acme.undo"}


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param(
            [step("a", compensate={"type": "acme.undo", "input": {"id": "${{ steps.a.output }}"}})],
            [],
            id="valid",
        ),
        pytest.param(
            [step("a", of="sagaflow.wait", input={"duration": "1s"}, compensate=UNDO)],
            [
                (
                    "spec.steps[0].compensate",
                    "a sagaflow.wait step only waits: there is nothing to undo",
                )
            ],
            id="compensate-on-a-built-in",
        ),
        pytest.param(
            [step("a", compensate={"type": "sagaflow.wait"})],
            [
                (
                    "spec.steps[0].compensate.type",
                    "sagaflow.wait cannot undo a step; use a runner's step type",
                )
            ],
            id="wait-as-compensation",
        ),
        pytest.param(
            [
                step("a"),
                step(
                    "b", compensate={"type": "acme.undo", "input": {"x": "${{ steps.a.output }}"}}
                ),
            ],
            [
                (
                    "spec.steps[1].compensate.input.x",
                    "step 'a' is not 'b' or upstream of it: a compensation reads the step it "
                    "undoes and what ran before it",
                )
            ],
            id="reads-a-step-not-upstream",
        ),
        pytest.param(
            [step("a", compensate={"type": "acme.undo", "input": {"x": "${{ steps.zz.output }}"}})],
            [("spec.steps[0].compensate.input.x", "unknown step 'zz'")],
            id="reads-an-unknown-step",
        ),
        pytest.param(
            [step("a", pivot=True), step("b", pivot=True)],
            [
                (
                    "spec.steps[1].pivot",
                    "pivot steps must be ordered by dependsOn: 'a' and 'b' "
                    "do not depend on each other",
                )
            ],
            id="unordered-pivots",
        ),
        pytest.param([step("a", pivot=True), step("b", "a", pivot=True)], [], id="ordered-pivots"),
        pytest.param(
            [step("a", pivot=True, compensate=UNDO)],
            [
                (
                    "spec.steps[0].compensate",
                    "a pivot step is the point of no return: it cannot have compensate",
                )
            ],
            id="pivot-with-compensate",
        ),
    ],
)
def test_saga_rules_of_a_workflow(steps: list[dict[str, Any]], expected: list[Any]) -> None:
    model = Workflow.model_validate(workflow(*steps))
    assert validate_workflow(model) == expected


def test_an_unknown_compensation_type_is_reported_through_the_registry() -> None:
    model = Workflow.model_validate(workflow(step("a", compensate={"type": "acme.nope"})))
    problems = validate_workflow(model, lambda kind: kind == "acme.work")
    assert problems == [
        (
            "spec.steps[0].compensate.type",
            "no runner registered for step type 'acme.nope' and it is not built in",
        )
    ]


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        (
            {"compensation": {"inDoubt": "maybe"}},
            "spec.compensation.inDoubt",
            "Input should be 'await', 'compensate' or 'skip'",
        ),
        (
            {"compensation": {"maxParallel": -1}},
            "spec.compensation.maxParallel",
            "greater than or equal to 0",
        ),
        ({"compensation": {"onCancle": True}}, "spec.compensation.onCancle", "unknown field"),
    ],
)
def test_a_bad_policy_names_its_field(spec: dict[str, Any], path: str, reason: str) -> None:
    body = workflow(step("a"), **spec)
    result = validate_documents([Document("w.yaml", 1, body)])
    assert [(e.path, reason in e.reason) for e in result.errors] == [(path, True)]


def execution(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "Execution",
        "metadata": {"name": "run-1"},
        "spec": {"workflowRef": {"name": "order"}, **spec},
    }


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"skipCompensation": ["a", "nope"]},
            [("spec.skipCompensation[1]", "unknown step 'nope' (the workflow's steps: a, b)")],
        ),
        ({"redrive": -1}, [("spec.redrive", "Input should be greater than or equal to 0, got -1")]),
        (
            {"suspend": "yes please"},
            [
                (
                    "spec.suspend",
                    "Input should be a valid boolean, unable to interpret input, got 'yes please'",
                )
            ],
        ),
        ({"skipCompensation": ["a"], "redrive": 1, "suspend": True, "cancel": False}, []),
    ],
)
def test_bad_control_fields_of_an_execution_name_their_field(
    spec: dict[str, Any], expected: list[Any]
) -> None:
    bodies = [workflow(step("a"), step("b", "a")), execution(**spec)]
    result = validate_documents([Document("m.yaml", i, b) for i, b in enumerate(bodies, 1)])
    assert [(e.path, e.reason) for e in result.errors] == expected
