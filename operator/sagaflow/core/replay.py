"""An execution's state at an instant, rebuilt from its history by the engine. Pure.

Every transition the runtime commits writes one `Transition` history row before the
lines it produced: the fact applied (`fact_codec`), the definition version it was
decided on, its cause, and on an execution's first transition the state before it
(`initial`). Replaying is applying those facts again, in order, through the very
functions that decided them (`engine.decide`, and admission's `wait`/`admit`) with
the instant each was committed at as `now`: the engine is pure, so the states come
out as they were. Durable timers are followed as the store keeps them: a fired
timer is gone (its row carries the key as its cause, `timer:<key>`), then the
decision's cancels, then its new timers.

Rows are taken in history order up to the first one later than `at`, so the state
is always one the execution really had (two transactions on one run may commit
out of clock order; a prefix of the history never mixes them). A transition the
engine ignored is marked `ignored` and changes nothing but the fired timer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sagaflow.core import admission
from sagaflow.core.decisions import Decision, Timer
from sagaflow.core.definition import Definition
from sagaflow.core.engine import decide
from sagaflow.core.fact_codec import Transition, decode_fact, encode_fact
from sagaflow.core.facts import TimerFired
from sagaflow.core.state import ExecutionState

TRANSITION = "Transition"  # the history kind of a transition's own row
TIMER_CAUSE = "timer:"


class ReplayError(ValueError):
    """History that cannot be replayed (it predates Transition rows, or is damaged)."""


class BeforeStartError(ReplayError):
    """The instant asked for is before the execution's first transition."""


@dataclass(frozen=True, slots=True)
class Replayed:
    state: ExecutionState
    timers: tuple[Timer, ...]  # pending at `as_of`, by due time then key
    as_of: datetime  # when the last transition applied was committed
    transitions: int  # how many were applied


def transition_data(
    fact: Transition,
    *,
    version: int,
    cause: str,
    initial: ExecutionState | None = None,
    ignored: str | None = None,
) -> dict[str, Any]:
    """The `data` of a Transition row (what `replay` reads back)."""
    data: dict[str, Any] = {"fact": encode_fact(fact), "version": version, "cause": cause}
    if initial is not None:
        data["initial"] = initial.to_json()
    if ignored is not None:
        data["ignored"] = ignored
    return data


def apply_transition(
    state: ExecutionState, definition: Definition, fact: Transition, now: datetime
) -> Decision:
    """Apply one recorded transition through the function that first decided it."""
    if isinstance(fact, admission.Waited):
        return admission.wait(state, fact.reason)
    if isinstance(fact, admission.Admitted):
        return admission.admit(
            state, definition, fact.suspend, now, limit=fact.limit, running=fact.running
        )
    return decide(state, definition, fact, now)


def replay(
    rows: Iterable[Mapping[str, Any]],
    definitions: Callable[[int], Definition],
    at: datetime | None = None,
) -> Replayed:
    """The state after the Transition rows committed at or before `at` (None: all).

    `rows` are history rows oldest first (`at`, `kind`, `data` as a dict or JSON
    text); `definitions` gives the workflow's definition of a version.
    """
    state: ExecutionState | None = None
    timers: dict[str, Timer] = {}
    as_of: datetime | None = None
    first: datetime | None = None
    count = 0
    for row in rows:
        if row["kind"] != TRANSITION:
            continue
        when: datetime = row["at"]
        first = first or when
        if at is not None and when > at:
            break
        data = _data(row)
        if state is None:
            if "initial" not in data:
                raise ReplayError("the history's first transition has no initial state")
            state = ExecutionState.from_json(data["initial"])
        fact = decode_fact(data.get("fact"))
        cause = str(data.get("cause") or "")
        if isinstance(fact, TimerFired) and cause.startswith(TIMER_CAUSE):
            timers.pop(cause[len(TIMER_CAUSE) :], None)
        if data.get("ignored") is None:
            decision = apply_transition(state, definitions(int(data["version"])), fact, when)
            for key in decision.cancel_timers:
                timers.pop(key, None)
            for timer in decision.timers:
                timers[timer.key] = timer
            state = decision.state
        as_of, count = when, count + 1
    if state is None or as_of is None:
        if first is None:
            raise ReplayError("the history has no Transition rows (it predates them)")
        raise BeforeStartError(
            f"{_ts(at)} is before the execution's first transition ({_ts(first)})"
        )
    pending = tuple(sorted(timers.values(), key=lambda t: (t.due_at, t.key)))
    return Replayed(state, pending, as_of, count)


def versions(rows: Iterable[Mapping[str, Any]]) -> set[int]:
    """The definition versions the Transition rows were decided on."""
    return {
        int(_data(r)["version"]) for r in rows if r["kind"] == TRANSITION and "version" in _data(r)
    }


def state_at_json(replayed: Replayed, at: datetime) -> dict[str, Any]:
    """The API's document for an execution's state at `at`."""
    state = replayed.state
    return {
        "at": at.isoformat(),
        "asOf": replayed.as_of.isoformat(),
        "phase": state.phase.value,
        "steps": [
            {"name": s.name, "phase": s.phase.value, "attempt": s.attempt}
            for s in state.steps.values()
        ],
        "timers": [
            {
                "key": t.key,
                "kind": t.kind,
                "step": t.step,
                "attempt": t.attempt,
                "dueAt": t.due_at.isoformat(),
            }
            for t in replayed.timers
        ],
        "state": state.to_json(),
    }


def parse_instant(text: str, now: datetime | None = None) -> datetime:
    """An RFC 3339 instant (`2024-05-01T12:00:00Z`), or `now` when `now` is given;
    ValueError saying what is wrong."""
    if now is not None and text.strip().lower() == "now":
        return now
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time (e.g. 2024-05-01T12:00:00Z)") from None
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset (add Z or +HH:MM)")
    return value


def _data(row: Mapping[str, Any]) -> dict[str, Any]:
    raw = row.get("data")
    data = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(data, dict):
        raise ReplayError(f"a Transition row without data (at {row.get('at')})")
    return data


def _ts(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat()


__all__ = [
    "TRANSITION",
    "BeforeStartError",
    "ReplayError",
    "Replayed",
    "apply_transition",
    "parse_instant",
    "replay",
    "state_at_json",
    "transition_data",
    "versions",
]
