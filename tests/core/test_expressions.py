"""Templates (`${{ EXPR }}`) over JMESPath: rendering, checking and step references."""

from __future__ import annotations

import copy
import datetime
import pickle
from typing import Any

import pytest

from sagaflow.core.expressions import (
    ExpressionError,
    check_templates,
    child_path,
    render,
    step_references,
    template_references,
)

CONTEXT: dict[str, Any] = {
    "input": {
        "order": {"id": 42, "items": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 1}]},
        "customer": "Ada",
        "flag": True,
        "nothing": None,
        "when": datetime.date(2024, 1, 2),
        "word": "ünïcode",
    },
    "steps": {
        "charge": {"output": {"id": "ch_1", "amount": 9.5}},
        "charge-card": {"output": "dashed"},
        "a b": {"output": 3},
    },
}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${{ input.order.id }}", 42),
        ("${{input.order.id}}", 42),
        ("${{    input.customer   }}", "Ada"),
        ("${{ input.flag }}", True),
        ("${{ input.order.items[1] }}", {"sku": "b", "qty": 1}),
        ("${{ input.order.items[*].sku }}", ["a", "b"]),
        ("${{ steps.charge.output }}", {"id": "ch_1", "amount": 9.5}),
        ('${{ steps."charge-card".output }}', "dashed"),
        ('${{ steps."a b".output }}', 3),
        ("${{ input.missing }}", None),
        ("${{ input.missing.deeper[0] }}", None),
        ("${{ steps.notrun.output }}", None),
        ("${{ length(input.order.items) }}", 2),
        (
            "${{ {id: input.order.id, nested: {who: input.customer}} }}",
            {"id": 42, "nested": {"who": "Ada"}},
        ),
        ('${{ `{"literal": [1, 2]}` }}', {"literal": [1, 2]}),
    ],
)
def test_whole_value_template_becomes_the_json_value(template: str, expected: Any) -> None:
    assert render(template, CONTEXT) == expected


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("order ${{ input.order.id }}", "order 42"),
        ("hi ${{ input.customer }}!", "hi Ada!"),
        (" ${{ input.customer }}", " Ada"),
        ("${{ input.customer }} ", "Ada "),
        ("${{ input.customer }}${{ input.order.id }}", "Ada42"),
        ("${{ input.flag }}/${{ input.nothing }}/${{ input.missing }}", "true/null/null"),
        ("items=${{ input.order.items[0] }}", 'items={"sku":"a","qty":2}'),
        ("amount ${{ steps.charge.output.amount }}", "amount 9.5"),
        ("on ${{ input.when }}", "on 2024-01-02"),
        ("dates ${{ [input.when] }}", 'dates ["2024-01-02"]'),
        ("w=${{ input.word }}", "w=ünïcode"),
        ("list ${{ input.order.items[*].qty }}", "list [2,1]"),
        ("hash ${{ {a: {b: input.order.id}} }} end", 'hash {"a":{"b":42}} end'),
    ],
)
def test_template_inside_a_longer_string_interpolates_text(template: str, expected: str) -> None:
    assert render(template, CONTEXT) == expected


def test_templates_are_rendered_anywhere_in_nested_structures() -> None:
    value = {
        "id": "${{ input.order.id }}",
        "lines": [{"sku": "${{ input.order.items[0].sku }}", "fixed": 1}, "${{ input.flag }}"],
        "deep": {"deeper": {"label": "order-${{ input.order.id }}"}},
        "pair": ("${{ input.customer }}", 2),
        "${{ input.customer }}": "keys are not templates",
    }
    assert render(value, CONTEXT) == {
        "id": 42,
        "lines": [{"sku": "a", "fixed": 1}, True],
        "deep": {"deeper": {"label": "order-42"}},
        "pair": ("Ada", 2),
        "${{ input.customer }}": "keys are not templates",
    }


def test_render_leaves_its_argument_untouched() -> None:
    value = {"a": ["${{ input.customer }}", {"b": "${{ input.order.id }}"}], "c": "plain"}
    before = copy.deepcopy(value)
    render(value, CONTEXT)
    assert value == before


@pytest.mark.parametrize(
    "value",
    [
        "plain text",
        "a single { brace } and $ sign",
        {"a": [1, "two", {"three": 3.0}], "b": None},
        [1, [2, [3]]],
        ("x", "y"),
        12,
        None,
    ],
)
def test_values_without_templates_are_returned_as_they_are(value: Any) -> None:
    assert render(value, CONTEXT) is value


def test_untouched_branches_are_shared_and_changed_ones_copied() -> None:
    untouched = {"keep": [1, 2]}
    value = {"untouched": untouched, "changed": {"x": "${{ input.customer }}"}}
    rendered = render(value, CONTEXT)
    assert rendered is not value
    assert rendered["untouched"] is untouched
    assert rendered["changed"] == {"x": "Ada"}


@pytest.mark.parametrize(
    ("value", "path", "expected_path", "reason_part"),
    [
        (
            {"a": [1, {"b": "${{ length(input.order.id) }}"}]},
            "input",
            "input.a[1].b",
            "evaluating 'length(input.order.id)' failed: In function length()",
        ),
        (
            "x ${{ abs(input.customer) }}",
            "steps.ship.input",
            "steps.ship.input",
            "In function abs()",
        ),
        (
            {"odd key": ["${{ to_number(`[1]`) + }}"]},
            "input",
            'input["odd key"][0]',
            "invalid expression",
        ),
        ({"f": "${{ nope(input) }}"}, "input", "input.f", "unknown function 'nope()'"),
    ],
)
def test_render_failure_names_the_field_path(
    value: Any, path: str, expected_path: str, reason_part: str
) -> None:
    with pytest.raises(ExpressionError) as caught:
        render(value, CONTEXT, path=path)
    assert caught.value.path == expected_path
    assert reason_part in caught.value.reason
    assert str(caught.value) == f"{expected_path}: {caught.value.reason}"


def test_expression_error_is_a_picklable_value_error() -> None:
    error = ExpressionError("input.a", "broken")
    assert isinstance(error, ValueError)
    assert str(error) == "input.a: broken"
    copied = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own object
    assert (copied.path, copied.reason) == ("input.a", "broken")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("no templates here", []),
        ({"a": "${{ input.a }}", "b": ["x ${{ steps.s.output }} y"]}, []),
        ("${{ {a: {b: c}} }}", []),
        ("${{ }}", [("spec.output", "empty expression in '${{ }}'")]),
        ("${{}}", [("spec.output", "empty expression in '${{ }}'")]),
        (
            "abc ${{ input.a",
            [("spec.output", "unclosed '${{' at character 5: expected '}}'")],
        ),
        (
            "${{ input.a.[ }}",
            [("spec.output", "invalid expression 'input.a.[': the expression is incomplete")],
        ),
        (
            "${{ a b }}",
            [("spec.output", "invalid expression 'a b': Unexpected token: b at column 3")],
        ),
        (
            "${{ steps.charge-card.output }}",
            [
                (
                    "spec.output",
                    "invalid expression 'steps.charge-card.output': Unknown token '-' at column 13;"
                    " quote step names that contain '-', e.g. steps.\"charge-card\".output",
                )
            ],
        ),
        ("${{ nope(a) }}", [("spec.output", "unknown function 'nope()'")]),
        ("${{ join(',') }}", [("spec.output", "function 'join()' takes 2 arguments, got 1")]),
        (
            "${{ merge() }}",
            [("spec.output", "function 'merge()' takes at least 1 arguments, got 0")],
        ),
        (
            {"list": ["ok", "${{ }} and ${{ a.[ }}"], "odd key": {"k": "${{ x"}},
            [
                ("spec.output.list[1]", "empty expression in '${{ }}'"),
                ("spec.output.list[1]", "invalid expression 'a.[': the expression is incomplete"),
                ('spec.output["odd key"].k', "unclosed '${{' at character 1: expected '}}'"),
            ],
        ),
    ],
)
def test_check_templates_reports_every_problem_with_its_path(
    value: Any, expected: list[tuple[str, str]]
) -> None:
    errors = check_templates(value, "spec.output")
    assert [(error.path, error.reason) for error in errors] == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", set()),
        ("${{ input.steps.a }}", set()),
        ("${{ steps.a.output }}", {"a"}),
        ("${{ steps.a }}", {"a"}),
        ("${{ steps.a[0] }}", {"a"}),
        ('${{ steps."charge-card".output.id }}', {"charge-card"}),
        ("x ${{ steps.a.output }} y ${{ steps.b.output.id }}", {"a", "b"}),
        ({"k": ["${{ steps.a.output }}"], "j": "${{ steps.b.output }}"}, {"a", "b"}),
        ("${{ length(steps.a.output) }}", {"a"}),
        ("${{ [steps.a.output, steps.b.output] }}", {"a", "b"}),
        ("${{ {x: steps.a.output} }}", {"a"}),
        ("${{ steps.a.output || steps.b.output }}", {"a", "b"}),
        ("${{ steps.a.output == steps.b.output }}", {"a", "b"}),
        ("${{ @.steps.a.output }}", {"a"}),
        ("${{ steps.a.output[*].b }}", {"a"}),
        ("${{ steps.a.output[] }}", {"a"}),
        ("${{ steps.a.output[?x > `1`] }}", {"a"}),
        # Inside projections, filters, pipes and &expr, `steps` is a field of the element.
        ("${{ input.items[*].steps.x }}", set()),
        ("${{ input.items[?steps.x] }}", set()),
        ("${{ steps.a.output | steps.b }}", {"a"}),
        ("${{ sort_by(steps.a.output, &steps.c) }}", {"a"}),
        ("${{ steps.a.output.{v: steps.b} }}", {"a"}),
        # The whole `steps` object names no particular step.
        ("${{ steps }}", set()),
        ("${{ steps.* }}", set()),
        # Broken templates contribute nothing (check_templates reports them).
        ("${{ steps.a.[ }}", set()),
    ],
)
def test_step_references_reads_the_expression_tree(value: Any, expected: set[str]) -> None:
    assert step_references(value) == expected


def test_template_references_groups_names_by_field_path() -> None:
    value = {"a": "${{ steps.x.output }}", "b": ["plain", "${{ [steps.y, steps.z] }}"], "c": 1}
    assert template_references(value, "spec.steps[2].input") == [
        ("spec.steps[2].input.a", frozenset({"x"})),
        ("spec.steps[2].input.b[1]", frozenset({"y", "z"})),
    ]


@pytest.mark.parametrize(
    ("path", "key", "expected"),
    [
        ("", "spec", "spec"),
        ("spec", "steps", "spec.steps"),
        ("spec.steps", 3, "spec.steps[3]"),
        ("input", "a b", 'input["a b"]'),
        ("input", "dependsOn", "input.dependsOn"),
        ("", 0, "[0]"),
    ],
)
def test_child_path(path: str, key: str | int, expected: str) -> None:
    assert child_path(path, key) == expected
