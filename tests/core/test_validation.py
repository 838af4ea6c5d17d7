"""Manifest loading and validation: every problem reported, with its field path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sagaflow.core.manifests import Workflow
from sagaflow.core.validation import (
    Document,
    ManifestError,
    parse_documents,
    validate_documents,
    validate_workflow,
)

API = "sagaflow.io/v1alpha1"
DNS_RULE = (
    "must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter"
    " or digit"
)
NOT_A_MAPPING = "a manifest must be a mapping with apiVersion, kind, metadata and spec, got"
DURATION_HELP = "use a number and a unit (ms, s, m, h, d), e.g. 500ms, 30s, 1h30m"
Problems = list[tuple[str, str]]


def step(name: str, *depends_on: str, of: str = "acme.work", **input: Any) -> dict[str, Any]:
    """A step manifest; `of` is its type, keyword arguments its input."""
    body: dict[str, Any] = {"name": name, "type": of}
    if depends_on:
        body["dependsOn"] = list(depends_on)
    if input:
        body["input"] = input
    return body


def workflow_body(
    *steps: dict[str, Any], name: str = "order", namespace: str | None = None, output: Any = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    spec: dict[str, Any] = {"steps": list(steps)}
    if output is not None:
        spec["output"] = output
    return {"apiVersion": API, "kind": "Workflow", "metadata": metadata, "spec": spec}


def execution_body(
    workflow: str = "order", name: str = "run-1", namespace: str | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    spec = {"workflowRef": {"name": workflow}, "input": {"id": 1}}
    return {"apiVersion": API, "kind": "Execution", "metadata": metadata, "spec": spec}


def docs(*bodies: dict[str, Any]) -> list[Document]:
    return [Document("m.yaml", i, body) for i, body in enumerate(bodies, start=1)]


def located(errors: list[ManifestError]) -> list[tuple[int, str, str]]:
    return [(error.document, error.path, error.reason) for error in errors]


# ------------------------------------------------------------------ parsing


def test_parse_documents_skips_empty_documents_and_keeps_file_positions() -> None:
    text = "a: 1\n---\n---\n# only a comment\n---\nb: 2\n---\n"
    documents, errors = parse_documents(text, "f.yaml")
    assert errors == []
    assert [(d.source, d.index, d.body) for d in documents] == [
        ("f.yaml", 1, {"a": 1}),
        ("f.yaml", 4, {"b": 2}),
    ]


@pytest.mark.parametrize(
    ("text", "kept", "expected"),
    [
        (
            "a: 1\n---\nb: [1, 2\nc: 3\n",
            1,
            (
                2,
                "invalid YAML at line 4, column 2: while parsing a flow sequence started at "
                "line 3, expected ',' or ']', but got ':'",
            ),
        ),
        (
            "a: 1\nb: : 2\n",
            0,
            (1, "invalid YAML at line 2, column 4: mapping values are not allowed here"),
        ),
        (
            'a: "x\n',
            0,
            (
                1,
                "invalid YAML at line 2, column 1: while scanning a quoted scalar started at "
                "line 1, found unexpected end of stream",
            ),
        ),
        (
            "- a\n- b\n",
            0,
            (
                1,
                f"{NOT_A_MAPPING} a list",
            ),
        ),
        (
            "a: 1\n---\nhello\n",
            1,
            (
                2,
                f"{NOT_A_MAPPING} a string",
            ),
        ),
        (
            "42\n",
            0,
            (
                1,
                f"{NOT_A_MAPPING} a number (42)",
            ),
        ),
        (
            "\x00",
            0,
            (
                1,
                "invalid YAML: unacceptable character #x0000: special characters are not allowed "
                'in "<unicode string>", position 0',
            ),
        ),
    ],
)
def test_parse_documents_reports_bad_documents(
    text: str, kept: int, expected: tuple[int, str]
) -> None:
    documents, errors = parse_documents(text, "f.yaml")
    assert len(documents) == kept
    assert [(e.source, e.document, e.kind, e.name, e.path, e.reason) for e in errors] == [
        ("f.yaml", expected[0], None, None, "", expected[1])
    ]


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (
            ManifestError(
                "samples/order.yaml",
                2,
                "Workflow",
                "order-fulfilment",
                "spec.steps[1].dependsOn[0]",
                "unknown step 'ship'",
            ),
            "samples/order.yaml: document 2 (Workflow order-fulfilment): "
            "spec.steps[1].dependsOn[0]: unknown step 'ship'",
        ),
        (
            ManifestError("a.yaml", 1, None, None, "", "invalid YAML"),
            "a.yaml: document 1: invalid YAML",
        ),
        (
            ManifestError("a.yaml", 3, "Execution", None, "spec", "bad"),
            "a.yaml: document 3 (Execution): spec: bad",
        ),
        (ManifestError("a.yaml", 1, None, "x", "kind", "bad"), "a.yaml: document 1 (x): kind: bad"),
    ],
)
def test_manifest_error_text(error: ManifestError, text: str) -> None:
    assert str(error) == text


# ---------------------------------------------------------- workflow rules


def always_unknown(step_type: str) -> bool:
    return False


WORKFLOW_CASES: list[tuple[str, dict[str, Any], Callable[[str], bool] | None, Problems]] = [
    (
        "valid chain with templates",
        workflow_body(
            step("reserve", order="${{ input.order }}"),
            step("charge", "reserve", amount="${{ steps.reserve.output.total }}"),
            step(
                "ship", "charge", note="${{ steps.reserve.output.id }} / ${{ steps.charge.output }}"
            ),
            output={"shipment": "${{ steps.ship.output }}", "first": "${{ steps.reserve.output }}"},
        ),
        None,
        [],
    ),
    (
        "duplicate step names",
        workflow_body(step("a"), step("b"), step("a"), step("a")),
        None,
        [
            ("spec.steps[2].name", "duplicate step name 'a' (first used by spec.steps[0])"),
            ("spec.steps[3].name", "duplicate step name 'a' (first used by spec.steps[0])"),
        ],
    ),
    (
        "unknown and self dependencies",
        workflow_body(step("a"), step("b", "a", "ship", "b")),
        None,
        [
            ("spec.steps[1].dependsOn[1]", "unknown step 'ship'"),
            ("spec.steps[1].dependsOn[2]", "step 'b' cannot depend on itself"),
        ],
    ),
    (
        "two-step cycle",
        workflow_body(step("a", "b"), step("b", "a")),
        None,
        [("spec.steps[1].dependsOn[0]", "dependency cycle: a -> b -> a")],
    ),
    (
        "three-step cycle beside a healthy branch",
        workflow_body(
            step("x"), step("a", "x", "c"), step("b", "a"), step("c", "b"), step("d", "c")
        ),
        None,
        [("spec.steps[2].dependsOn[0]", "dependency cycle: a -> c -> b -> a")],
    ),
    (
        "two separate cycles",
        workflow_body(step("a", "b"), step("b", "a"), step("c", "d"), step("d", "c")),
        None,
        [
            ("spec.steps[1].dependsOn[0]", "dependency cycle: a -> b -> a"),
            ("spec.steps[3].dependsOn[0]", "dependency cycle: c -> d -> c"),
        ],
    ),
    (
        "diamond is not a cycle",
        workflow_body(step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c")),
        None,
        [],
    ),
    (
        "template syntax errors in input and output",
        workflow_body(
            step("a", x={"y": ["${{ input.[ }}"]}, z="${{ }}"),
            output={"o": "${{ steps.a.output"},
        ),
        None,
        [
            (
                "spec.steps[0].input.x.y[0]",
                "invalid expression 'input.[': the expression is incomplete",
            ),
            ("spec.steps[0].input.z", "empty expression in '${{ }}'"),
            ("spec.output.o", "unclosed '${{' at character 1: expected '}}'"),
        ],
    ),
    (
        "reference to a step that is not upstream",
        workflow_body(step("a"), step("b", v="${{ steps.a.output }}")),
        None,
        [("spec.steps[1].input.v", "step 'a' is not upstream of 'b'; add it to dependsOn")],
    ),
    (
        "reference to a later step",
        workflow_body(step("a", v="${{ steps.b.output }}"), step("b", "a")),
        None,
        [("spec.steps[0].input.v", "step 'b' is not upstream of 'a'; add it to dependsOn")],
    ),
    (
        "transitive upstream is enough",
        workflow_body(step("a"), step("b", "a"), step("c", "b", v='${{ steps."a".output }}')),
        None,
        [],
    ),
    (
        "references to unknown steps and to itself",
        workflow_body(step("a", v=["${{ [steps.zz.output, steps.a.output] }}"])),
        None,
        [
            ("spec.steps[0].input.v[0]", "step 'a' cannot read its own output"),
            ("spec.steps[0].input.v[0]", "unknown step 'zz'"),
        ],
    ),
    (
        "output may read any existing step but not unknown ones",
        workflow_body(step("a"), step("b"), output="${{ [steps.a.output, steps.nope.output] }}"),
        None,
        [("spec.output", "unknown step 'nope'")],
    ),
    (
        "unknown step type",
        workflow_body(step("a", of="foo.bar")),
        always_unknown,
        [
            (
                "spec.steps[0].type",
                "no runner registered for step type 'foo.bar' and it is not built in",
            )
        ],
    ),
    (
        "known step type",
        workflow_body(step("a", of="foo.bar")),
        lambda t: t == "foo.bar",
        [],
    ),
    (
        "step types are not checked without a registry",
        workflow_body(step("a", of="foo.bar")),
        None,
        [],
    ),
    (
        "built-in types are always known",
        workflow_body(
            step("p", of="sagaflow.pass", anything=[1]),
            step("w", of="sagaflow.wait", duration="1h30m"),
            step("f", of="sagaflow.fail", **{"type": "x"}),
        ),
        always_unknown,
        [],
    ),
    (
        "wait without input",
        workflow_body(step("w", of="sagaflow.wait")),
        None,
        [("spec.steps[0].input.duration", "sagaflow.wait needs a duration, e.g. 30s")],
    ),
    (
        "wait without duration",
        workflow_body(step("w", of="sagaflow.wait", other=1)),
        None,
        [("spec.steps[0].input.duration", "sagaflow.wait needs a duration, e.g. 30s")],
    ),
    (
        "wait with a number",
        workflow_body(step("w", of="sagaflow.wait", duration=30)),
        None,
        [
            (
                "spec.steps[0].input.duration",
                "must be a duration string such as 30s, got a number (30)",
            )
        ],
    ),
    (
        "wait with a bad duration",
        workflow_body(step("w", of="sagaflow.wait", duration="10 minutes")),
        None,
        [
            (
                "spec.steps[0].input.duration",
                "invalid duration '10 minutes': use a number and a unit (ms, s, m, h, d), e.g. "
                "500ms, 30s, 1h30m",
            )
        ],
    ),
    (
        "wait with a template duration",
        workflow_body(step("w", of="sagaflow.wait", duration="${{ input.delay }}")),
        None,
        [],
    ),
    (
        "fail with non-string type and message",
        workflow_body(step("f", of="sagaflow.fail", message=None, **{"type": ["x"]})),
        None,
        [
            ("spec.steps[0].input.type", "must be a string, got a list"),
            ("spec.steps[0].input.message", "must be a string, got null"),
        ],
    ),
    (
        "fail with strings and templates",
        workflow_body(
            step("f", of="sagaflow.fail", message="${{ input.why }}", **{"type": "Refused"})
        ),
        None,
        [],
    ),
    (
        "every problem together",
        workflow_body(
            step("a", "a", of="foo.bar"),
            step("a", v="${{ steps.q.output }}"),
            output="${{ steps.r }}",
        ),
        always_unknown,
        [
            ("spec.steps[1].name", "duplicate step name 'a' (first used by spec.steps[0])"),
            ("spec.steps[0].dependsOn[0]", "step 'a' cannot depend on itself"),
            (
                "spec.steps[0].type",
                "no runner registered for step type 'foo.bar' and it is not built in",
            ),
            ("spec.steps[1].input.v", "unknown step 'q'"),
            (
                "spec.steps[1].type",
                "no runner registered for step type 'acme.work' and it is not built in",
            ),
            ("spec.output", "unknown step 'r'"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("body", "is_known_type", "expected"),
    [case[1:] for case in WORKFLOW_CASES],
    ids=[case[0] for case in WORKFLOW_CASES],
)
def test_validate_workflow(
    body: dict[str, Any], is_known_type: Callable[[str], bool] | None, expected: Problems
) -> None:
    workflow = Workflow.model_validate(body)
    assert validate_workflow(workflow, is_known_type) == expected


def test_long_dependency_chain_does_not_recurse_too_deep() -> None:
    steps = [step("s0", "s499")] + [step(f"s{i}", f"s{i - 1}") for i in range(1, 500)]
    problems = validate_workflow(Workflow.model_validate(workflow_body(*steps)))
    assert len(problems) == 1
    path, reason = problems[0]
    assert path == "spec.steps[1].dependsOn[0]"
    assert reason.startswith("dependency cycle: s0 -> s499 -> s498 -> ")
    assert reason.endswith(" -> s1 -> s0")


# ------------------------------------------------------------------ documents


def test_valid_documents_come_back_as_models() -> None:
    documents = docs(workflow_body(step("a")), execution_body(), execution_body(name="run-2"))
    result = validate_documents(documents)
    assert result.errors == []
    assert result.ok
    assert [(d.index, w.metadata.name) for d, w in result.workflows] == [(1, "order")]
    assert [(d.index, e.metadata.name) for d, e in result.executions] == [
        (2, "run-1"),
        (3, "run-2"),
    ]
    assert result.executions[0][1].metadata.namespace == "default"


def broken(body: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    change(body)
    return body


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda body: body.pop(key)


ENVELOPE_AND_FIELD_CASES: list[tuple[str, dict[str, Any], Problems]] = [
    (
        "wrong apiVersion",
        broken(workflow_body(step("a")), _set(["apiVersion"], "sagaflow.io/v2")),
        [("apiVersion", "unsupported apiVersion 'sagaflow.io/v2'; accepted: sagaflow.io/v1alpha1")],
    ),
    (
        "wrong apiVersion still reports field problems",
        broken(
            broken(workflow_body(step("a")), _drop("apiVersion")),
            _set(["spec", "steps", 0, "timeout"], "5x"),
        ),
        [
            ("apiVersion", "unsupported apiVersion None; accepted: sagaflow.io/v1alpha1"),
            (
                "spec.steps[0].timeout",
                f"invalid duration '5x': {DURATION_HELP}",
            ),
        ],
    ),
    (
        "unknown kind",
        broken(workflow_body(step("a")), _set(["kind"], "ConfigMap")),
        [
            (
                "kind",
                "unsupported kind 'ConfigMap'; accepted: Workflow, Execution, Schedule, Trigger",
            )
        ],
    ),
    (
        "missing kind and apiVersion",
        {"metadata": {"name": "x"}},
        [
            ("apiVersion", "unsupported apiVersion None; accepted: sagaflow.io/v1alpha1"),
            ("kind", "unsupported kind None; accepted: Workflow, Execution, Schedule, Trigger"),
        ],
    ),
    (
        "snake_case field is unknown",
        workflow_body(step("a"), {"name": "b", "type": "acme.work", "depends_on": ["a"]}),
        [("spec.steps[1].depends_on", "unknown field")],
    ),
    (
        "unknown top-level field",
        broken(workflow_body(step("a")), _set(["extra"], 1)),
        [("extra", "unknown field")],
    ),
    (
        "missing spec",
        broken(workflow_body(step("a")), _drop("spec")),
        [("spec", "required field is missing")],
    ),
    (
        "bad metadata name",
        workflow_body(step("a"), name="Bad_Name"),
        [("metadata.name", f"{DNS_RULE}, got 'Bad_Name'")],
    ),
    (
        "bad step name and type",
        workflow_body({"name": "1st", "type": "nodots"}),
        [
            (
                "spec.steps[0].name",
                "must start with a letter and hold only letters, digits, '_' and '-' "
                "(at most 63 characters), got '1st'",
            ),
            (
                "spec.steps[0].type",
                "must be a dotted name such as 'payments.charge' (segments of letters, digits, "
                "'_' and '-', each starting with a letter), got 'nodots'",
            ),
        ],
    ),
    (
        "number out of range",
        broken(workflow_body(step("a")), _set(["spec", "steps", 0, "retry"], {"maxAttempts": 0})),
        [("spec.steps[0].retry.maxAttempts", "Input should be greater than or equal to 1, got 0")],
    ),
    (
        "dependsOn is not a list",
        broken(workflow_body(step("a"), step("b")), _set(["spec", "steps", 1, "dependsOn"], "a")),
        [("spec.steps[1].dependsOn", "Input should be a list, got 'a'")],
    ),
    (
        "input is not a mapping",
        broken(workflow_body(step("a")), _set(["spec", "steps", 0, "input"], [1])),
        [("spec.steps[0].input", "Input should be a mapping")],
    ),
    (
        "empty steps",
        workflow_body(),
        [("spec.steps", "List should have at least 1 item, not 0")],
    ),
    (
        "execution without workflowRef",
        broken(execution_body(), _drop("spec")) | {"spec": {"input": {}}},
        [("spec.workflowRef", "required field is missing")],
    ),
    (
        "metadata is not a mapping",
        broken(workflow_body(step("a")), _set(["metadata"], "order")),
        [("metadata", "Input should be a mapping, got 'order'")],
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"),
    [case[1:] for case in ENVELOPE_AND_FIELD_CASES],
    ids=[case[0] for case in ENVELOPE_AND_FIELD_CASES],
)
def test_document_problems_have_yaml_field_paths(body: dict[str, Any], expected: Problems) -> None:
    result = validate_documents(docs(body))
    assert [(e.path, e.reason) for e in result.errors] == expected
    assert result.workflows == []
    assert result.executions == []


def test_errors_carry_kind_and_name_and_cross_field_problems_exclude_the_document() -> None:
    good = workflow_body(step("a"), name="good")
    bad = workflow_body(step("a"), step("b", "ship"), name="order-fulfilment")
    result = validate_documents(
        [Document("samples/order.yaml", 1, good), Document("samples/order.yaml", 2, bad)]
    )
    assert [str(e) for e in result.errors] == [
        "samples/order.yaml: document 2 (Workflow order-fulfilment): spec.steps[1].dependsOn[0]: "
        "unknown step 'ship'"
    ]
    assert [w.metadata.name for _, w in result.workflows] == ["good"]


def test_step_types_are_checked_through_the_registry() -> None:
    result = validate_documents(docs(workflow_body(step("a", of="foo.bar"))), always_unknown)
    assert located(result.errors) == [
        (
            1,
            "spec.steps[0].type",
            "no runner registered for step type 'foo.bar' and it is not built in",
        )
    ]


@pytest.mark.parametrize(
    ("bodies", "existing", "expected"),
    [
        (
            [workflow_body(step("a")), workflow_body(step("b")), workflow_body(step("c"))],
            (),
            [
                (
                    2,
                    "metadata.name",
                    "duplicate Workflow 'default/order'; first defined in m.yaml document 1",
                ),
                (
                    3,
                    "metadata.name",
                    "duplicate Workflow 'default/order'; first defined in m.yaml document 1",
                ),
            ],
        ),
        (
            [workflow_body(step("a")), workflow_body(step("a"), namespace="default")],
            (),
            [
                (
                    2,
                    "metadata.name",
                    "duplicate Workflow 'default/order'; first defined in m.yaml document 1",
                )
            ],
        ),
        (
            [
                workflow_body(step("a")),
                workflow_body(step("a"), namespace="shop"),
                execution_body(name="order"),
            ],
            (),
            [],
        ),
        (
            [execution_body(), execution_body(), workflow_body(step("a"))],
            (),
            [
                (
                    2,
                    "metadata.name",
                    "duplicate Execution 'default/run-1'; first defined in m.yaml document 1",
                )
            ],
        ),
        (
            [execution_body(workflow="missing")],
            (),
            [(1, "spec.workflowRef.name", "unknown Workflow 'missing' in namespace 'default'")],
        ),
        ([execution_body(workflow="stored")], [("default", "stored")], []),
        (
            [execution_body(workflow="stored", namespace="shop")],
            [("default", "stored")],
            [(1, "spec.workflowRef.name", "unknown Workflow 'stored' in namespace 'shop'")],
        ),
        (
            [workflow_body(step("a"), namespace="shop"), execution_body()],
            (),
            [(2, "spec.workflowRef.name", "unknown Workflow 'order' in namespace 'default'")],
        ),
        (
            # An invalid Workflow still defines its name: only its own problem is reported.
            [execution_body(), workflow_body(step("a", "nope"))],
            (),
            [(2, "spec.steps[0].dependsOn[0]", "unknown step 'nope'")],
        ),
    ],
)
def test_rules_across_documents(
    bodies: list[dict[str, Any]], existing: Any, expected: list[tuple[int, str, str]]
) -> None:
    result = validate_documents(docs(*bodies), existing_workflows=existing)
    assert located(result.errors) == expected
    failed = {error.document for error in result.errors}
    accepted = [d.index for d, _ in result.workflows] + [d.index for d, _ in result.executions]
    assert sorted(accepted) == [i for i in range(1, len(bodies) + 1) if i not in failed]


def test_errors_are_grouped_in_document_order() -> None:
    bodies = [
        workflow_body(step("a", "zz")),
        execution_body(workflow="none"),
        workflow_body(step("b")),
        {"kind": "Secret"},
    ]
    result = validate_documents(docs(*bodies))
    assert located(result.errors) == [
        (1, "spec.steps[0].dependsOn[0]", "unknown step 'zz'"),
        (2, "spec.workflowRef.name", "unknown Workflow 'none' in namespace 'default'"),
        (
            3,
            "metadata.name",
            "duplicate Workflow 'default/order'; first defined in m.yaml document 1",
        ),
        (4, "apiVersion", "unsupported apiVersion None; accepted: sagaflow.io/v1alpha1"),
        (4, "kind", "unsupported kind 'Secret'; accepted: Workflow, Execution, Schedule, Trigger"),
    ]
    assert [(e.kind, e.name) for e in result.errors] == [
        ("Workflow", "order"),
        ("Execution", "run-1"),
        ("Workflow", "order"),
        ("Secret", None),
        ("Secret", None),
    ]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"kind": "Workflow"},
        {"apiVersion": API, "kind": "Workflow", "metadata": "x", "spec": []},
        {"apiVersion": API, "kind": "Workflow", "metadata": {"name": 5}, "spec": {"steps": "x"}},
        {"apiVersion": API, "kind": "Execution", "metadata": None, "spec": {"workflowRef": 3}},
        {"apiVersion": API, "kind": ["Workflow"], "metadata": {"name": "a"}},
        {1: 2, None: [], "kind": {"a": 1}},
        {
            "apiVersion": API,
            "kind": "Workflow",
            "metadata": {"name": "w"},
            "spec": {"steps": [None, 1]},
        },
    ],
)
def test_garbage_is_reported_not_raised(body: dict[str, Any]) -> None:
    result = validate_documents(docs(body))
    assert result.errors
    assert not result.ok
    assert all(error.reason for error in result.errors)


def test_parse_and_validate_a_file_end_to_end() -> None:
    text = f"""
apiVersion: {API}
kind: Workflow
metadata:
  name: order-fulfilment
spec:
  steps:
    - name: reserve
      type: shop.reserve
      input:
        items: ${{{{ input.items }}}}
    - name: charge
      type: shop.charge
      dependsOn: [reserve, ship]
      input:
        amount: "${{{{ steps.reserve.output.total }}}}"
---
apiVersion: {API}
kind: Execution
metadata:
  name: run-1
spec:
  workflowRef:
    name: order-fulfilment
"""
    documents, parse_errors = parse_documents(text, "samples/order.yaml")
    assert parse_errors == []
    result = validate_documents(documents)
    assert [str(e) for e in result.errors] == [
        "samples/order.yaml: document 1 (Workflow order-fulfilment): "
        "spec.steps[1].dependsOn[1]: unknown step 'ship'"
    ]
    assert [d.index for d, _ in result.executions] == [2]
