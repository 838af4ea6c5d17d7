"""Every fact (and admission's transitions) survives the trip through JSON unchanged."""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagaflow.core.admission import Admitted, Waited
from sagaflow.core.fact_codec import FactCodecError, Transition, decode_fact, encode_fact
from sagaflow.core.facts import (
    Cancel,
    Compensate,
    Redrive,
    Resume,
    SignalReceived,
    SkipCompensation,
    Start,
    StepCompleted,
    StepFailed,
    StepHeartbeat,
    Suspend,
    TimerFired,
    TimerKind,
)

_text = st.text(max_size=12)
_json: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_attempt = st.integers(0, 1000)
_kinds = st.sampled_from(get_args(TimerKind))

facts: st.SearchStrategy[Transition] = st.one_of(
    st.builds(Start, st.booleans()),
    st.builds(StepCompleted, _text, _attempt, _json, st.booleans()),
    st.builds(StepFailed, _text, _attempt, _text, _text, st.booleans(), st.booleans()),
    st.builds(StepHeartbeat, _text, _attempt, st.booleans()),
    st.builds(TimerFired, _kinds, _text, _attempt),
    st.builds(SignalReceived, _text, _text, _json),
    st.builds(Compensate, _attempt),
    st.builds(Cancel, _text),
    st.just(Suspend()),
    st.just(Resume()),
    st.builds(Redrive, st.none() | _attempt, st.booleans()),
    st.builds(SkipCompensation, st.lists(_text, max_size=4).map(tuple)),
    st.builds(Waited, _text),
    st.builds(Admitted, st.booleans(), st.none() | st.integers(1, 50), st.integers(0, 50)),
)


@given(facts)
def test_every_fact_round_trips_through_json_text(fact: Transition) -> None:
    encoded = json.loads(json.dumps(encode_fact(fact)))  # as the history column holds it
    assert encoded["type"] == type(fact).__name__
    assert decode_fact(encoded) == fact


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ({"type": "Nope"}, "unknown fact type 'Nope'"),
        ([1], "a fact is a JSON object, got list"),
        ({"type": "Cancel", "why": "x"}, "Cancel: unknown field(s) why"),
        ({"type": "Compensate"}, "Compensate: "),
    ],
)
def test_a_damaged_record_is_refused_saying_what_is_wrong(data: Any, said: str) -> None:
    with pytest.raises(FactCodecError, match="^" + said.replace("(", r"\(").replace(")", r"\)")):
        decode_fact(data)
