"""What an event does under a Trigger: malformed, filtered out, a start or a signal."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sagaflow.core.trigger_specs import TriggerSpec
from sagaflow.core.triggers import (
    Filtered,
    Incoming,
    Malformed,
    Outcome,
    SignalOrder,
    StartOrder,
    TriggerRef,
    Verdict,
    decide,
    tally,
)

REF = TriggerRef("shop", "orders-in", "uid-1")


def spec(**fields: Any) -> TriggerSpec:
    return TriggerSpec.model_validate(
        {"workflowRef": {"name": "orders"}, "source": {"queue": "orders-in"}, **fields}
    )


def event(body: Any, message_id: str = "m-1", **headers: str) -> Incoming:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Incoming(raw, message_id, headers)


ORDER = {"type": "order.created", "order": {"id": "o-7", "total": 12.5, "n": 7}}


def test_a_start_renders_input_key_and_correlation_key_over_body_headers_and_id() -> None:
    trigger = spec(
        input={
            "order": "${{ body.order.id }}",
            "tenant": '${{ headers."x-tenant" }}',
            "via": "${{ messageId }}",
        },
        idempotencyKey="order-${{ body.order.id }}",
        correlationKey="${{ body.order.id }}",
    )
    verdict = decide(trigger, REF, event(ORDER, **{"X-Tenant": "acme"}))
    assert verdict == StartOrder(
        namespace="shop",
        workflow="orders",
        input={"order": "o-7", "tenant": "acme", "via": "m-1"},
        idempotency_key="trigger/uid-1/order-o-7",
        correlation_key="o-7",
        source_name="orders-in",
        source_uid="uid-1",
        source_kind="trigger",
    )


def test_the_key_defaults_to_the_message_id_and_the_input_to_the_body() -> None:
    verdict = decide(spec(), REF, event(ORDER, "m-42"))
    assert isinstance(verdict, StartOrder)
    assert verdict.idempotency_key == "trigger/uid-1/m-42"
    assert verdict.input == ORDER
    assert verdict.correlation_key is None


def test_the_same_event_redelivered_gives_the_same_start_and_another_one_does_not() -> None:
    trigger = spec(idempotencyKey="${{ body.order.id }}")
    first = decide(trigger, REF, event(ORDER, "m-1"))
    again = decide(trigger, REF, event(ORDER, "m-2"))  # a new message id, the same order
    other = decide(trigger, REF, event({"order": {"id": "o-8"}}, "m-3"))
    assert first == again
    assert isinstance(other, StartOrder) and isinstance(first, StartOrder)
    assert other.idempotency_key != first.idempotency_key


def test_a_long_key_is_replaced_by_its_digest() -> None:
    verdict = decide(spec(idempotencyKey="${{ body.k }}"), REF, event({"k": "x" * 500}))
    assert isinstance(verdict, StartOrder)
    assert verdict.idempotency_key.startswith("trigger/uid-1/sha256:")
    assert len(verdict.idempotency_key) < 100


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (True, True),
        (1, True),
        ("yes", True),
        ([0], True),
        (False, False),
        (None, False),
        ("", False),
        ([], False),
        ({}, False),
    ],
)
def test_the_filter_uses_jmespath_truth(value: Any, kept: bool) -> None:
    verdict = decide(spec(filter="${{ body.keep }}"), REF, event({"keep": value}))
    assert isinstance(verdict, StartOrder) is kept
    assert isinstance(verdict, Filtered) is not kept


def test_a_filtered_event_says_what_the_filter_gave_and_needs_no_key() -> None:
    trigger = spec(filter="${{ body.type == 'order.paid' }}", idempotencyKey="${{ body.id }}")
    verdict = decide(trigger, REF, event(ORDER))  # no body.id: would be malformed if kept
    assert verdict == Filtered("filter ${{ body.type == 'order.paid' }} gave false")


@pytest.mark.parametrize(
    ("trigger", "body", "field", "says"),
    [
        (spec(), b"{not json", "body", "is not JSON"),
        (spec(), b"", "body", "is not JSON"),
        (spec(), b"\xff\xfe", "body", "is not JSON"),
        (spec(), b'{"a": NaN}', "body", "NaN is not a JSON number"),
        (spec(), b"[1, 2]", "body", "is a list, and with no spec.input it is the input"),
        (spec(filter="${{ length(body.n) }}"), ORDER, "spec.filter", "evaluating"),
        (
            spec(input={"total": "${{ abs(body.order.id) }}"}),
            ORDER,
            "spec.input.total",
            "evaluating",
        ),
        (spec(idempotencyKey="${{ body.missing }}"), ORDER, "spec.idempotencyKey", "null"),
        (spec(idempotencyKey="${{ body.order.n }}"), ORDER, "spec.idempotencyKey", "to_string"),
        (spec(idempotencyKey="${{ body.blank }}"), {"blank": " "}, "spec.idempotencyKey", "empty"),
        (spec(correlationKey="${{ body.order }}"), ORDER, "spec.correlationKey", "an object"),
        (spec(correlationKey="${{ body.k }}"), {"k": "a\u0000b"}, "spec.correlationKey", "NUL"),
        (spec(input={"t": "${{ body.t }}"}), {"t": "a\u0000"}, "spec.input.t", "stored"),
    ],
)
def test_malformed_events_name_the_field(
    trigger: TriggerSpec, body: Any, field: str, says: str
) -> None:
    verdict = decide(trigger, REF, event(body))
    assert isinstance(verdict, Malformed), verdict
    assert verdict.field == field
    assert says in verdict.reason
    assert verdict.describe().startswith(f"{field}: ")


def test_an_event_without_a_message_id_needs_a_key() -> None:
    verdict = decide(spec(), REF, event(ORDER, ""))
    assert verdict == Malformed("messageId", "is empty, and spec.idempotencyKey is not set")


def signal_spec(**fields: Any) -> TriggerSpec:
    fields.setdefault("correlationKey", "${{ body.order.id }}")
    return spec(action="signal", signal="paid", **fields)


def test_a_signal_finds_the_run_by_correlation_key_and_carries_the_body() -> None:
    verdict = decide(signal_spec(), REF, event(ORDER, "m-9"))
    assert isinstance(verdict, SignalOrder)
    m = verdict.message
    assert (m.namespace, m.workflow, m.correlation_key, m.signal) == (
        "shop",
        "orders",
        "o-7",
        "paid",
    )
    assert m.execution is None and m.data == ORDER
    assert verdict.signal_id == "trigger/uid-1/m-9"


def test_a_signal_carries_the_rendered_input_and_a_key_made_id() -> None:
    trigger = signal_spec(input={"amount": "${{ body.order.total }}"}, idempotencyKey="p-1")
    verdict = decide(trigger, REF, event(ORDER))
    assert isinstance(verdict, SignalOrder)
    assert verdict.message.data == {"amount": 12.5}
    assert verdict.signal_id == "trigger/uid-1/p-1"


def test_a_signal_may_carry_any_json_body() -> None:
    verdict: Verdict = decide(signal_spec(correlationKey="k"), REF, event([1, 2]))
    assert isinstance(verdict, SignalOrder) and verdict.message.data == [1, 2]


def test_tally_counts_settled_outcomes_and_dead_letters_on_queues_only() -> None:
    kinds = {"started": 2, "duplicate": 1, "filtered": 3, "malformed": 1, "refused": 1}
    kinds |= {"retry": 4, "signalled": 0}
    assert tally(kinds, queue=True) == {
        "started": 2,
        "duplicates": 1,
        "filtered": 3,
        "dead_lettered": 2,
    }
    assert tally(kinds, queue=False) == {"started": 2, "duplicates": 1, "filtered": 3}
    assert Outcome("filtered").settled and not Outcome("retry").settled
