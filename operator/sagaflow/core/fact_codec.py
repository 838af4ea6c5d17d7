"""Facts as JSON, for the `Transition` rows of an execution's history. Pure.

Every transition the runtime applies is recorded with the fact it applied (or, for
the two transitions admission adds around the engine, its `Waited`/`Admitted`
marker), so `sagaflow.core.replay` can rebuild an execution's state at any instant
by applying them again. The encoding is `{"type": <class name>, <field>: <value>...}`
with the dataclass's own field names: the facts are flat, so the codec is generic
over their fields, and a fact type added later needs only an entry in `_TYPES`.
Tuple fields (`SkipCompensation.steps`) travel as JSON arrays and come back as
tuples, so a decoded fact equals the one encoded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sagaflow.core.admission import Admitted, Waited
from sagaflow.core.facts import (
    Cancel,
    Compensate,
    Fact,
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
)

# What a Transition row applies: an engine fact, or one of admission's transitions.
Transition = Fact | Waited | Admitted

_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        Start,
        StepCompleted,
        StepFailed,
        StepHeartbeat,
        TimerFired,
        SignalReceived,
        Compensate,
        Cancel,
        Suspend,
        Resume,
        Redrive,
        SkipCompensation,
        Waited,
        Admitted,
    )
}


class FactCodecError(ValueError):
    """A recorded fact that cannot be decoded (an unknown type or wrong fields)."""


def encode_fact(fact: Transition) -> dict[str, Any]:
    """The JSON form of a fact (its values must be JSON already, as message data is)."""
    out: dict[str, Any] = {"type": type(fact).__name__}
    for f in dataclasses.fields(fact):
        value = getattr(fact, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def decode_fact(data: Any) -> Transition:
    """The fact `encode_fact` gave `data` for; FactCodecError saying what is wrong."""
    if not isinstance(data, dict):
        raise FactCodecError(f"a fact is a JSON object, got {type(data).__name__}")
    name = data.get("type")
    cls = _TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise FactCodecError(f"unknown fact type {name!r}")
    # Annotations are strings here (`from __future__ import annotations`).
    tuples = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("tuple")}
    known = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - known - {"type"}
    if extra:
        raise FactCodecError(f"{name}: unknown field(s) {', '.join(sorted(extra))}")
    values = {
        k: tuple(v) if k in tuples and isinstance(v, list) else v
        for k, v in data.items()
        if k != "type"
    }
    try:
        fact: Transition = cls(**values)
    except TypeError as exc:
        raise FactCodecError(f"{name}: {exc}") from None
    return fact


__all__ = ["FactCodecError", "Transition", "decode_fact", "encode_fact"]
