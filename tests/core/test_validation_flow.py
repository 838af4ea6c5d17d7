"""Data-flow manifests (workflowRef, when, forEach, finally, signals): every problem
reported with its YAML field path, and a manifest using all of them accepted."""

from __future__ import annotations

from typing import Any

import pytest

from sagaflow.core.manifests import Workflow
from sagaflow.core.validation import (
    Document,
    parse_documents,
    validate_documents,
    validate_workflow,
)

pytestmark = pytest.mark.timeout(30)

API = "sagaflow.io/v1alpha1"
Problems = list[tuple[str, str]]

ONE_WHEN = (
    "must be one template, e.g. ${{ input.express }}, with no text around it: "
    "text is a string, which is true unless empty"
)
ONE_FOR_EACH = (
    "must be one template giving a list, e.g. ${{ input.orders }}, with no text around it"
)
ITEM_ONLY = "`item` is only set in a forEach step's input and compensate.input"
INDEX_ONLY = "`index` is only set in a forEach step's input and compensate.input"
EXECUTION_ONLY = "`execution` is only set in a finally step's input and when"
IS_FINAL = "step 'f' is a finally step: it runs after the execution ended"
SIGNAL = {"name": "approval", "schema": {"type": "object"}}


def step(name: str, *deps: str, of: str | None = "acme.work", **fields: Any) -> dict[str, Any]:
    """A step manifest; `of` is its type (None: no type), keywords its other fields."""
    body: dict[str, Any] = {"name": name}
    if of is not None:
        body["type"] = of
    if deps:
        body["dependsOn"] = list(deps)
    return {**body, **fields}


def child(name: str, *deps: str, workflow: str = "child", **fields: Any) -> dict[str, Any]:
    return step(name, *deps, of=None, workflowRef={"name": workflow}, **fields)


def workflow(*steps: dict[str, Any], name: str = "order", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": {"steps": list(steps), **spec},
    }


def execution(ref: str = "order") -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "Execution",
        "metadata": {"name": "run-1"},
        "spec": {"workflowRef": {"name": ref}},
    }


def problems_of(body: dict[str, Any]) -> Problems:
    return validate_workflow(Workflow.model_validate(body))


def docs(*bodies: dict[str, Any]) -> list[Document]:
    return [Document("m.yaml", i, body) for i, body in enumerate(bodies, start=1)]


def located(documents: list[Document], **options: Any) -> list[tuple[int, str, str]]:
    result = validate_documents(documents, **options)
    return [(e.document, e.path, e.reason) for e in result.errors]


# ------------------------------------------------------------ type or workflowRef

RUNS_CASES = [
    pytest.param(
        [step("a", of=None)],
        [("spec.steps[0].type", "a step needs a type or a workflowRef")],
        id="neither",
    ),
    pytest.param(
        [step("a", workflowRef={"name": "child"})],
        [("spec.steps[0].workflowRef", "give a type or a workflowRef, not both")],
        id="both",
    ),
    pytest.param(
        [
            child(
                "a",
                input={"id": "${{ input.id }}"},
                timeout="1h",
                heartbeatTimeout="5m",
                retry={"maxAttempts": 2},
                compensate={"type": "acme.undo"},
                pivot=False,
            )
        ],
        [],
        id="child-with-compensate-and-timeouts",
    ),
    pytest.param(
        [child("a", forEach="${{ input.ids }}")],
        [
            (
                "spec.steps[0].forEach",
                "child workflows cannot fan out yet: a workflowRef step cannot have forEach",
            )
        ],
        id="child-fan-out",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), RUNS_CASES)
def test_a_step_runs_a_type_or_a_child_workflow(
    steps: list[dict[str, Any]], expected: Problems
) -> None:
    assert problems_of(workflow(*steps)) == expected


# --------------------------------------------------------------- when, forEach

WHEN_FOR_EACH_CASES = [
    pytest.param(
        [step("a"), step("b", "a", when="${{ steps.a.output.ok }}")],
        [],
        id="when-reads-upstream",
    ),
    pytest.param(
        [step("a", when="${{ input. }}")],
        [
            (
                "spec.steps[0].when",
                "invalid expression 'input.': Expecting: ['quoted_identifier', "
                "'unquoted_identifier', 'lbracket', 'lbrace'], got: eof at column 7",
            )
        ],
        id="when-bad-syntax",
    ),
    pytest.param(
        [step("a"), step("b", when="${{ steps.a.output }}"), step("c", when="${{ steps.z }}")],
        [
            ("spec.steps[1].when", "step 'a' is not upstream of 'b'; add it to dependsOn"),
            ("spec.steps[2].when", "unknown step 'z'"),
        ],
        id="when-reads-unknown-and-not-upstream",
    ),
    pytest.param(
        [step("a", when="${{ steps.a.output }}")],
        [("spec.steps[0].when", "step 'a' cannot read its own output")],
        id="when-reads-itself",
    ),
    pytest.param(
        [step("a", when="${{ input.x }} > 3"), step("b", when="false")],
        [("spec.steps[0].when", ONE_WHEN), ("spec.steps[1].when", ONE_WHEN)],
        id="when-is-text",
    ),
    pytest.param(
        [step("a", forEach="${{ input.ids }}", maxParallel=2, toleratedFailures=1)],
        [],
        id="for-each-with-limits",
    ),
    pytest.param(
        [step("a", forEach="ids: ${{ input.ids }}"), step("b", forEach="a, b")],
        [("spec.steps[0].forEach", ONE_FOR_EACH), ("spec.steps[1].forEach", ONE_FOR_EACH)],
        id="for-each-is-text",
    ),
    pytest.param(
        [step("a", forEach="${{ nope(1) }}")],
        [("spec.steps[0].forEach", "invalid expression 'nope(1)': invalid token at column 6")],
        id="for-each-bad-syntax",
    ),
    pytest.param(
        [step("a"), step("b", forEach="${{ steps.a.output }}")],
        [("spec.steps[1].forEach", "step 'a' is not upstream of 'b'; add it to dependsOn")],
        id="for-each-reads-not-upstream",
    ),
    pytest.param(
        [step("a", maxParallel=3), step("b", toleratedFailures=1)],
        [
            ("spec.steps[0].maxParallel", "only a forEach step has maxParallel"),
            ("spec.steps[1].toleratedFailures", "only a forEach step has toleratedFailures"),
        ],
        id="limits-without-for-each",
    ),
    pytest.param(
        [
            step("p", of="sagaflow.pass", forEach="${{ input.ids }}"),
            step("f", of="sagaflow.fail", forEach="${{ input.ids }}"),
        ],
        [],
        id="pass-and-fail-fan-out",
    ),
    pytest.param(
        [
            step("w", of="sagaflow.wait", input={"duration": "1s"}, forEach="${{ input.ids }}"),
            step(
                "s",
                of="sagaflow.waitForSignal",
                input={"signal": "approval"},
                forEach="${{ input.ids }}",
            ),
        ],
        [
            (
                "spec.steps[0].forEach",
                "a sagaflow.wait step cannot fan out: only a runner's step type, sagaflow.pass "
                "or sagaflow.fail can (one wait serves every item)",
            ),
            (
                "spec.steps[1].forEach",
                "a sagaflow.waitForSignal step cannot fan out: a signal is delivered to one "
                "waiting step, not to items",
            ),
        ],
        id="waits-cannot-fan-out",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), WHEN_FOR_EACH_CASES)
def test_when_and_for_each(steps: list[dict[str, Any]], expected: Problems) -> None:
    assert problems_of(workflow(*steps, signals=[SIGNAL])) == expected


# ------------------------------------------------------ item, index, execution

VARIABLE_CASES = [
    pytest.param(
        [
            step(
                "a",
                forEach="${{ input.ids }}",
                input={"id": "${{ item.id }}", "at": "${{ index }}", "n": "#${{ index }}"},
                compensate={
                    "type": "acme.undo",
                    "input": {"id": "${{ item }}", "i": "${{ index }}"},
                },
            )
        ],
        [],
        id="for-each-input-and-compensation",
    ),
    pytest.param(
        [step("a", input={"id": "${{ item }}", "at": "${{ [index, `1`] }}"})],
        [("spec.steps[0].input.id", ITEM_ONLY), ("spec.steps[0].input.at", INDEX_ONLY)],
        id="not-a-for-each-step",
    ),
    pytest.param(
        [step("a", compensate={"type": "acme.undo", "input": {"id": "${{ length(item) }}"}})],
        [("spec.steps[0].compensate.input.id", ITEM_ONLY)],
        id="compensation-of-a-plain-step",
    ),
    pytest.param(
        [step("a", forEach="${{ item }}", when="${{ @.index }}")],
        [("spec.steps[0].when", INDEX_ONLY), ("spec.steps[0].forEach", ITEM_ONLY)],
        id="for-each-when-and-list",
    ),
    pytest.param(
        [step("a", input={"phase": "${{ execution.phase }}"})],
        [("spec.steps[0].input.phase", EXECUTION_ONLY)],
        id="execution-in-a-forward-step",
    ),
    pytest.param(
        [
            step(
                "a",
                input={
                    "own": "${{ input.item }}",
                    "filter": "${{ input.xs[?item == `1`] }}",
                    "projection": "${{ input.xs[*].index }}",
                    "sorted": "${{ sort_by(input.xs, &execution) }}",
                    "piped": "${{ input.x | item }}",
                },
            )
        ],
        [],
        id="fields-of-elements-are-not-variables",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), VARIABLE_CASES)
def test_item_index_and_execution_are_read_only_where_set(
    steps: list[dict[str, Any]], expected: Problems
) -> None:
    assert problems_of(workflow(*steps)) == expected


def test_output_cannot_read_the_variables_a_finally_condition_reads_execution() -> None:
    body = workflow(
        step("a"),
        output={"x": "${{ item }}", "y": "${{ execution.phase }}"},
        **{
            "finally": [
                step("f", input={"p": "${{ execution.phase }}"}, when="${{ execution.error }}")
            ]
        },
    )
    assert problems_of(body) == [
        ("spec.output.x", ITEM_ONLY),
        ("spec.output.y", EXECUTION_ONLY),
    ]


# ------------------------------------------------------------------- finally

FINALLY_CASES = [
    pytest.param(
        [step("a"), step("b", "a")],
        [
            step("f", input={"a": "${{ steps.a.output }}", "b": "${{ steps.b.output }}"}),
            step("g", "f", input={"f": "${{ steps.f.output }}", "e": "${{ execution }}"}),
        ],
        [],
        id="reads-any-step-and-upstream-finally-steps",
    ),
    pytest.param(
        [step("a")],
        [step("a"), step("f"), step("f")],
        [
            ("spec.finally[0].name", "duplicate step name 'a' (first used by spec.steps[0])"),
            ("spec.finally[2].name", "duplicate step name 'f' (first used by spec.finally[1])"),
        ],
        id="names-unique-across-both-lists",
    ),
    pytest.param(
        [step("a")],
        [step("f", "a", "f", "zz")],
        [
            (
                "spec.finally[0].dependsOn[0]",
                "a finally step may only depend on finally steps: 'a' is in spec.steps, which "
                "are all done before finally steps start",
            ),
            ("spec.finally[0].dependsOn[1]", "step 'f' cannot depend on itself"),
            ("spec.finally[0].dependsOn[2]", "unknown step 'zz'"),
        ],
        id="depends-only-on-finally-steps",
    ),
    pytest.param(
        [step("a")],
        [step("f", "g"), step("g", "f")],
        [("spec.finally[1].dependsOn[0]", "dependency cycle: f -> g -> f")],
        id="cycle",
    ),
    pytest.param(
        [step("a")],
        [step("f", input={"g": "${{ steps.g.output }}"}), step("g")],
        [("spec.finally[0].input.g", "step 'g' is not upstream of 'f'; add it to dependsOn")],
        id="reads-a-finally-step-not-upstream",
    ),
    pytest.param(
        [step("a", "f", input={"f": "${{ steps.f.output }}"}, when="${{ steps.f.output }}")],
        [step("f")],
        [
            ("spec.steps[0].dependsOn[0]", IS_FINAL),
            ("spec.steps[0].input.f", IS_FINAL),
            ("spec.steps[0].when", IS_FINAL),
        ],
        id="forward-steps-cannot-use-finally-steps",
    ),
    pytest.param(
        [step("a")],
        [
            step("f", compensate={"type": "acme.undo"}, pivot=True),
            step("g", forEach="${{ input.ids }}", input={"i": "${{ item }}"}),
            child("h"),
        ],
        [
            (
                "spec.finally[0].compensate",
                "a finally step cannot have compensate: nothing is undone after the execution "
                "ended",
            ),
            (
                "spec.finally[0].pivot",
                "a finally step cannot be a pivot: the execution already ended, past any point "
                "of no return",
            ),
            (
                "spec.finally[1].forEach",
                "a finally step cannot have forEach: items run only while the execution runs",
            ),
            ("spec.finally[1].input.i", ITEM_ONLY),
            (
                "spec.finally[2].workflowRef",
                "a finally step cannot run a child workflow: child workflows run only while the "
                "execution runs",
            ),
        ],
        id="nothing-undoes-fans-out-or-calls-a-child",
    ),
    pytest.param(
        [step("a")],
        [step("w", of="sagaflow.wait"), step("n", of=None, maxParallel=2)],
        [
            ("spec.finally[0].input.duration", "sagaflow.wait needs a duration, e.g. 30s"),
            ("spec.finally[1].type", "a step needs a type or a workflowRef"),
            ("spec.finally[1].maxParallel", "only a forEach step has maxParallel"),
        ],
        id="step-rules-apply",
    ),
]


@pytest.mark.parametrize(("steps", "finals", "expected"), FINALLY_CASES)
def test_finally_steps(
    steps: list[dict[str, Any]], finals: list[dict[str, Any]], expected: Problems
) -> None:
    assert problems_of(workflow(*steps, **{"finally": finals})) == expected


# ------------------------------------------------------------------- signals


def wait_for(**input: Any) -> dict[str, Any]:
    return step("w", of="sagaflow.waitForSignal", input=input)


SIGNAL_CASES = [
    pytest.param(
        [SIGNAL],
        [wait_for(signal="approval", timeout="24h"), step("t", of="sagaflow.waitForSignal")],
        [
            (
                "spec.steps[1].input.signal",
                "sagaflow.waitForSignal needs the signal to wait for (declared: approval)",
            )
        ],
        id="declared-and-missing",
    ),
    pytest.param(
        [SIGNAL, {"name": "cancel"}],
        [wait_for(signal="aproval"), step("x", of="sagaflow.waitForSignal", input={"signal": 3})],
        [
            ("spec.steps[0].input.signal", "unknown signal 'aproval' (declared: approval, cancel)"),
            ("spec.steps[1].input.signal", "must be a signal name, got a number (3)"),
        ],
        id="unknown-and-not-a-name",
    ),
    pytest.param(
        [],
        [wait_for(signal="${{ input.signal }}")],
        [("spec.steps[0].input.signal", "spec.signals declares no signal to wait for")],
        id="none-declared",
    ),
    pytest.param(
        [SIGNAL],
        [wait_for(signal="${{ input.signal }}", timeout="${{ input.patience }}")],
        [],
        id="templates-are-checked-at-run-time",
    ),
    pytest.param(
        [SIGNAL],
        [wait_for(signal="approval", timeout="a day"), step("v", "w", of="acme.work")],
        [
            (
                "spec.steps[0].input.timeout",
                "invalid duration 'a day': use a number and a unit (ms, s, m, h, d), "
                "e.g. 500ms, 30s, 1h30m",
            )
        ],
        id="bad-timeout",
    ),
    pytest.param(
        [SIGNAL],
        [wait_for(signal="approval", timeout=30)],
        [
            (
                "spec.steps[0].input.timeout",
                "must be a duration string such as 30s, got a number (30)",
            )
        ],
        id="timeout-not-a-string",
    ),
    pytest.param(
        [SIGNAL, {"name": "approval"}, {"name": "bad", "schema": {"type": "objec"}}],
        [step("a")],
        [
            (
                "spec.signals[1].name",
                "duplicate signal name 'approval' (first used by spec.signals[0])",
            ),
            (
                "spec.signals[2].schema",
                "not a valid JSON Schema: 'objec' is not valid under any of the given schemas",
            ),
        ],
        id="unique-names-and-valid-schemas",
    ),
    pytest.param(
        [SIGNAL],
        [
            wait_for(signal="approval") | {"compensate": {"type": "acme.undo"}},
            step("a", compensate={"type": "sagaflow.waitForSignal"}),
        ],
        [
            (
                "spec.steps[0].compensate",
                "a sagaflow.waitForSignal step only waits for a signal: there is nothing to undo",
            ),
            (
                "spec.steps[1].compensate.type",
                "sagaflow.waitForSignal cannot undo a step; use a runner's step type",
            ),
        ],
        id="nothing-to-undo",
    ),
]


@pytest.mark.parametrize(("signals", "steps", "expected"), SIGNAL_CASES)
def test_signals(
    signals: list[dict[str, Any]], steps: list[dict[str, Any]], expected: Problems
) -> None:
    assert problems_of(workflow(*steps, signals=signals)) == expected


def test_a_finally_step_may_wait_for_a_signal() -> None:
    finals = [step("w", of="sagaflow.waitForSignal", input={"signal": "nope"})]
    body = workflow(step("a"), signals=[SIGNAL], **{"finally": finals})
    assert problems_of(body) == [
        ("spec.finally[0].input.signal", "unknown signal 'nope' (declared: approval)")
    ]


# ------------------------------------------------------------ child workflows

UNKNOWN = (1, "spec.steps[0].workflowRef.name", "unknown workflow 'child'")

CHILD_CASES = [
    pytest.param(
        [workflow(child("a")), execution()],
        {},
        [UNKNOWN],
        id="unknown-when-the-files-hold-an-execution",
    ),
    pytest.param(
        [workflow(child("a"))],
        {},
        [],
        id="a-workflow-alone-may-call-a-stored-one",
    ),
    pytest.param(
        [workflow(child("a"))],
        {"existing_workflows": {("default", "child")}},
        [],
        id="known-as-existing",
    ),
    pytest.param(
        [workflow(child("a"))],
        {"existing_workflows": {("shop", "child"), ("default", "other")}},
        [UNKNOWN],
        id="existing-elsewhere",
    ),
    pytest.param(
        [workflow(child("a")), workflow(step("x"), name="child"), execution()],
        {},
        [],
        id="in-the-same-files",
    ),
    pytest.param(
        [workflow(child("a", workflow="order")), execution()],
        {},
        [(1, "spec.steps[0].workflowRef.name", "workflow cycle: order -> order")],
        id="calls-itself",
    ),
    pytest.param(
        [
            workflow(step("x"), child("a", "x", workflow="b")),
            workflow(child("c", workflow="c"), name="b"),
            workflow(
                step("y"), child("d", workflow="order"), child("e", workflow="leaf"), name="c"
            ),
            workflow(step("z"), name="leaf"),
        ],
        {},
        [
            (1, "spec.steps[1].workflowRef.name", "workflow cycle: order -> b -> c -> order"),
            (2, "spec.steps[0].workflowRef.name", "workflow cycle: b -> c -> order -> b"),
            (3, "spec.steps[1].workflowRef.name", "workflow cycle: c -> order -> b -> c"),
        ],
        id="cycle-through-others",
    ),
]


@pytest.mark.parametrize(("bodies", "options", "expected"), CHILD_CASES)
def test_child_workflows_across_documents(
    bodies: list[dict[str, Any]], options: dict[str, Any], expected: list[tuple[int, str, str]]
) -> None:
    assert located(docs(*bodies), **options) == expected


def test_a_child_is_looked_up_in_its_parents_namespace() -> None:
    parent = workflow(child("a"))
    parent["metadata"]["namespace"] = "shop"
    elsewhere = workflow(step("x"), name="child")
    assert located(docs(parent, elsewhere, execution())) == [
        (1, "spec.steps[0].workflowRef.name", "unknown workflow 'child'"),
        (3, "spec.workflowRef.name", "unknown Workflow 'order' in namespace 'default'"),
    ]


# ------------------------------------------------------------- all together

VALID = """
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: order}
spec:
  concurrency: {maxExecutions: 3}
  signals:
    - name: approval
      schema:
        type: object
        properties: {approved: {type: boolean}}
        required: [approved]
    - name: nudge
  steps:
    - name: reserve
      type: stock.reserve
      forEach: ${{ input.lines }}
      maxParallel: 4
      toleratedFailures: 1
      input: {sku: "${{ item.sku }}", line: "${{ index }}"}
      compensate:
        type: stock.release
        input: {sku: "${{ item.sku }}", id: "${{ steps.reserve.output.id }}"}
    - name: approve
      type: sagaflow.waitForSignal
      dependsOn: [reserve]
      when: ${{ input.total > `100` }}
      input: {signal: approval, timeout: 24h}
    - name: ship
      workflowRef: {name: shipping}
      dependsOn: [approve]
      timeout: 2h
      input: {lines: "${{ steps.reserve.output }}", ok: "${{ steps.approve.output }}"}
      compensate: {type: shipping.cancel}
  finally:
    - name: audit
      type: audit.record
      input:
        phase: ${{ execution.phase }}
        error: ${{ execution.error }}
        shipped: ${{ steps.ship.output }}
    - name: notify
      type: sagaflow.pass
      dependsOn: [audit]
      when: ${{ steps.audit.output.notify }}
      input: {audit: "${{ steps.audit.output }}"}
  output: {shipment: "${{ steps.ship.output }}"}
---
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: shipping}
spec:
  steps:
    - {name: book, type: shipping.book, input: {lines: "${{ input.lines }}"}}
---
apiVersion: sagaflow.io/v1alpha1
kind: Execution
metadata: {name: order-1}
spec:
  workflowRef: {name: order}
  correlationKey: order-1
  input: {total: 250, lines: [{sku: a}, {sku: b}]}
"""


def test_a_manifest_using_every_new_field_is_valid() -> None:
    documents, errors = parse_documents(VALID, "order.yaml")
    assert errors == []
    result = validate_documents(documents, lambda kind: not kind.startswith("sagaflow."))
    assert result.errors == []
    assert [w.metadata.name for _, w in result.workflows] == ["order", "shipping"]
    assert [e.metadata.name for _, e in result.executions] == ["order-1"]
