"""Values Postgres cannot store as jsonb are found, by path, before they reach state;
result events carrying them fail their own step instead of poisoning a batch."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from sagaflow.core.jsonsafe import scrub_text, unstorable
from sagaflow.core.messages import (
    MalformedMessageError,
    StepResult,
    decode_result,
    output_problem,
)
from sagaflow.core.validation import parse_documents, validate_documents

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": [1, {"b": float("nan")}]}, "output.a[1].b: NaN is not a JSON number"),
        ({"x": float("-inf")}, "output.x: -Infinity is not a JSON number"),
        ({"name": "ab\x00c"}, "output.name: the text holds the NUL character"),
        ({"k\x00": 1}, 'output["k\\u0000"]: its key holds the NUL character'),
        ({"s": "\ud800"}, "output.s: the text holds a lone surrogate (\\ud800)"),
        ({"when": datetime.date(2026, 1, 2)}, "output.when: 2026-01-02 is a date"),
        ({"tags": {1, 2}}, "output.tags: a value of type set is not JSON"),
        ({"first": float("nan"), "second": "\x00"}, "output.first: NaN"),  # document order
    ],
)
def test_the_first_unstorable_value_is_named_by_its_path(value: Any, expected: str) -> None:
    problem = unstorable(value, "output")
    assert problem is not None and problem.startswith(expected), problem


def test_storable_values_pass_whatever_their_depth() -> None:
    deep: Any = "leaf"
    for _ in range(5000):  # deeper than the interpreter's recursion limit
        deep = [deep]
    assert unstorable({"deep": deep, "n": 1.5, "ok": None, "t": True, 3: "int key"}, "o") is None


def test_scrub_text_replaces_what_postgres_refuses() -> None:
    assert scrub_text("a\x00b\ud800c") == "a\ufffdb\ufffdc"
    assert scrub_text("plain") == "plain"


def _event(output_json: str) -> bytes:
    return (
        '{"kind":"StepCompleted","executionId":"e1","step":"s","attempt":1,"output":'
        + output_json
        + "}"
    ).encode()


@pytest.mark.parametrize(
    ("output_json", "path"),
    [
        ('{"total": NaN}', "output.total: NaN"),
        ('{"items": [1, Infinity]}', "output.items[1]: Infinity"),
        ('{"note": "a\\u0000b"}', "output.note: the text holds the NUL"),
        ('{"s": "\\ud83d"}', "output.s: the text holds a lone surrogate"),
    ],
)
def test_a_result_whose_output_cannot_be_stored_fails_its_step(output_json: str, path: str) -> None:
    result = decode_result(_event(output_json))
    assert (result.kind, result.error_type, result.retryable) == (
        "StepFailed",
        "InvalidOutput",
        False,
    )
    assert path in (result.error_message or ""), result.error_message
    assert (result.execution_id, result.step, result.attempt) == ("e1", "s", 1)


def test_storable_look_alikes_are_not_refused() -> None:
    # "NaN" as text and a surrogate *pair* (an emoji escaped) are fine.
    result = decode_result(_event('{"v": "NaN", "e": "\\ud83d\\ude00", "p": "\\\\u0000"}'))
    assert result.kind == "StepCompleted"
    assert result.output == {"v": "NaN", "e": "\U0001f600", "p": "\\u0000"}


def test_an_unknown_kind_is_named_before_anything_else() -> None:
    with pytest.raises(MalformedMessageError, match=r"kind: expected StepCompleted.*got 'Bogus'"):
        decode_result(b'{"kind": "Bogus"}')


def test_identifiers_postgres_cannot_store_are_malformed() -> None:
    body = b'{"kind":"StepHeartbeat","executionId":"e\\u0000","step":"s","attempt":1,"sequence":1}'
    with pytest.raises(MalformedMessageError, match="executionId: the text holds the NUL"):
        decode_result(body)


def test_a_failure_text_postgres_cannot_store_is_scrubbed() -> None:
    body = {
        "kind": "StepFailed",
        "executionId": "e1",
        "step": "s",
        "attempt": 2,
        "error": {"type": "Bad\u0000Type", "message": "no\u0000pe", "retryable": True},
    }
    result = decode_result(json.dumps(body).encode())
    assert (result.error_type, result.error_message) == ("Bad\ufffdType", "no\ufffdpe")


def test_encoding_refuses_nan_and_output_problem_names_the_path() -> None:
    result = StepResult("StepCompleted", "e1", "s", 1, output={"x": float("nan")})
    with pytest.raises(ValueError, match="Out of range float"):
        result.encode()
    fine = StepResult("StepCompleted", "e1", "s", 1, output={"x": "a\x00"})
    assert "output.x" in (output_problem(fine.output, fine.encode()) or "")


@pytest.mark.parametrize(
    ("yaml_input", "path"),
    [
        ("{total: .nan}", "spec.input.total"),
        ('{name: "a\\0b"}', "spec.input.name"),
        ("{due: 2026-01-02}", "spec.input.due"),
    ],
)
def test_manifest_inputs_postgres_cannot_store_are_refused(yaml_input: str, path: str) -> None:
    text = (
        "apiVersion: sagaflow.io/v1alpha1\nkind: Execution\nmetadata: {name: e}\n"
        f"spec: {{workflowRef: {{name: w}}, input: {yaml_input}}}\n"
    )
    docs, errors = parse_documents(text, "f.yaml")
    assert not errors
    result = validate_documents(docs, existing_workflows=[("default", "w")])
    assert [e.path for e in result.errors] == [path], result.errors
