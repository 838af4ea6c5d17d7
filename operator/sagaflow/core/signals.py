"""Signals: a run waits for a person or an outside system (`sagaflow.waitForSignal`).

A `sagaflow.waitForSignal` step (`input: {signal: NAME, timeout: 24h}`) succeeds with
the signal's data as its output, or fails with `SignalTimeout` once its timeout
passes. A signal that arrives before the run reaches the wait is kept in state and
taken by the first wait for it, so the order of the two never matters.

Every signal carries an id: one already received is a no-op. A signal is refused,
with the reason in history and in the decision (`Decision.refused`, so the sender
hears it and a bus message is dead-lettered with it), when the workflow does not
declare it (`spec.signals`), its data fails the declared JSON Schema, or the run is
finished. Schema checks are pure (`jsonschema`); a validator is built once per schema.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from sagaflow.core.definition import WAIT_SIGNAL
from sagaflow.core.durations import parse_duration
from sagaflow.core.effects import Effects
from sagaflow.core.facts import SignalReceived
from sagaflow.core.links import Signal
from sagaflow.core.manifests import StepPhase
from sagaflow.core.state import Failure, StepState


def received(out: Effects, fact: SignalReceived) -> str | None:
    state = out.state
    if any(s.id == fact.signal_id for s in state.signals):
        return f"signal {fact.signal_id} already received"
    if state.phase.is_terminal:
        out.refuse(
            "SignalRefused", f"signal {fact.name} refused: the execution is {state.phase.value}"
        )
        return None
    declared = out.definition.signals
    if fact.name not in declared:
        known = ", ".join(sorted(declared)) or "none"
        reason = (
            f"signal {fact.name} refused: workflow {state.workflow} does not declare it "
            f"(declared: {known})"
        )
        out.refuse("SignalRefused", reason)
        return None
    problem = schema_problem(declared[fact.name], fact.data)
    if problem is not None:
        out.refuse("SignalRefused", f"signal {fact.name} refused: {problem}")
        return None
    signal = Signal(fact.signal_id, fact.name, fact.data, out.now)
    out.state = replace(state, signals=(*state.signals, signal))
    waiting = _waiting_step(out, fact.name)
    out.record(
        "SignalReceived",
        f"signal {fact.name} ({fact.signal_id}) received",
        signal=fact.name,
        id=fact.signal_id,
    )
    if waiting is not None:
        _deliver(out, waiting, len(out.state.signals) - 1)
    return None


def schema_problem(schema: dict[str, Any] | None, data: Any) -> str | None:
    """Why `data` does not satisfy `schema`, naming the field; None if it does."""
    if schema is None:
        return None
    error = next(iter(_validator(json.dumps(schema, sort_keys=True)).iter_errors(data)), None)
    if error is None:
        return None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"data{where}: {error.message}"


def schema_error(schema: dict[str, Any]) -> str | None:
    """Why `schema` is not a valid JSON Schema (for manifest validation)."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return exc.message
    return None


@functools.lru_cache(maxsize=256)
def _validator(schema: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema))


def begin_wait(out: Effects, step: StepState, rendered: dict[str, Any]) -> None:
    """A wait starts: take a signal kept for it, or wait (with its timeout timer)."""
    name = rendered.get("signal")
    if not isinstance(name, str) or name not in out.definition.signals:
        from sagaflow.core import forward

        error = Failure("InvalidInput", f"signal: {name!r} is not a signal the workflow declares")
        forward.fail_attempt(out, step.name, step.attempt, error, retryable=False)
        return
    out.set_step(replace(step, input=rendered))
    kept = next(
        (i for i, s in enumerate(out.state.signals) if s.name == name and s.step is None), None
    )
    if kept is not None:
        _deliver(out, out.step(step.name), kept)
        return
    timeout = rendered.get("timeout")
    if timeout is not None:
        try:
            seconds = parse_duration(str(timeout))
            due = out.now + timedelta(seconds=seconds)
        except (ValueError, OverflowError) as exc:
            from sagaflow.core import forward

            reason = str(exc) if isinstance(exc, ValueError) else "too long for the clock"
            error = Failure("InvalidInput", f"timeout: {reason}")
            forward.fail_attempt(out, step.name, step.attempt, error, retryable=False)
            return
        out.timer("signal-timeout", step.name, step.attempt, due)
    until = f" (for at most {timeout})" if timeout is not None else ""
    out.record(
        "StepWaitingForSignal",
        f"step {step.name} waits for signal {name}{until}",
        step.name,
        attempt=step.attempt,
    )


def timed_out(out: Effects, step: StepState) -> None:
    from sagaflow.core import forward

    rendered = step.input if isinstance(step.input, dict) else {}
    error = Failure(
        "SignalTimeout",
        f"no signal {rendered.get('signal')} within {rendered.get('timeout')}",
    )
    forward.fail_attempt(out, step.name, step.attempt, error, retryable=False)


def _waiting_step(out: Effects, name: str) -> StepState | None:
    for spec in (*out.definition.steps, *out.definition.finally_steps):
        if spec.type != WAIT_SIGNAL:
            continue
        step = out.step(spec.name)
        if (
            step.phase is StepPhase.RUNNING
            and isinstance(step.input, dict)
            and step.input.get("signal") == name
        ):
            return step
    return None


def _deliver(out: Effects, step: StepState, index: int) -> None:
    from sagaflow.core import forward

    signal = out.state.signals[index]
    taken = (
        *out.state.signals[:index],
        replace(signal, step=step.name),
        *out.state.signals[index + 1 :],
    )
    out.state = replace(out.state, signals=taken)
    out.cancel_timers(f"signal-timeout:{step.name}:{step.attempt}")
    forward.succeed(out, step, signal.data)
    if out.definition.step(step.name).final:
        from sagaflow.core import finals

        finals.advance(out)
    else:
        forward.after_result(out, step.name, succeeded=True)
