"""Delivering signals to stored executions: from the CLI and from the events queue.

A signal names its execution, or the workflow and correlation key of one of its
unfinished executions (`spec.correlationKey`). It is applied like a control request
(`control.apply_one`): one transaction with its effect, recorded in the inbox under
`signal/<execution id>/<signal id>`, so the same signal delivered twice is applied
once; the engine also drops a repeated id (`core/signals.py`).

Outcomes: `applied`, `noop` (seen before), `refused` (the engine's reason: undeclared,
bad data, finished run; also recorded in the run's history) and `unknown` (no such
execution). On the bus, a refused or unknown signal is dead-lettered with the reason
(`SignalRefused`); the orchestrator's dead-letter pass logs it with its body.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sagaflow.core.facts import SignalReceived
from sagaflow.core.messages import SignalMessage
from sagaflow.core.ports import ReceivedMessage
from sagaflow.core.state import ExecutionState
from sagaflow.runtime.control import apply_one
from sagaflow.runtime.faults import SIGNAL_REFUSED
from sagaflow.telemetry import observe

if TYPE_CHECKING:
    from sagaflow.runtime.orchestrator import Orchestrator

log = logging.getLogger("sagaflow.orchestrator")

Result = Literal["applied", "noop", "refused", "unknown"]


@dataclass(frozen=True, slots=True)
class SignalOutcome:
    result: Result
    message: str
    state: ExecutionState | None = None


def new_signal_id() -> str:
    return f"signal-{uuid.uuid4()}"


async def deliver(
    o: Orchestrator,
    signal: SignalMessage,
    signal_id: str,
    settle: Sequence[ReceivedMessage] = (),
) -> SignalOutcome:
    """Apply one signal to the execution it names (settling `settle` with it)."""
    target = await _find(o, signal)
    if target is None:
        return SignalOutcome("unknown", _unknown(signal))
    fact = SignalReceived(signal.signal, signal_id, signal.data)
    inbox_id = f"signal/{target.execution_id}/{signal_id}"
    decision, fresh = await apply_one(o, target.execution_id, fact, inbox_id, settle)
    if decision is None:
        return SignalOutcome("unknown", _unknown(signal))
    if not fresh:
        return SignalOutcome("noop", f"signal {signal_id} was delivered before", decision.state)
    if decision.refused is not None:
        observe.signal(decision.state, signal.signal, accepted=False)
        return SignalOutcome("refused", decision.refused, decision.state)
    if not decision.applied:
        return SignalOutcome("noop", decision.ignored or "", decision.state)
    observe.signal(decision.state, signal.signal, accepted=True)
    taken = next((s.step for s in decision.state.signals if s.id == signal_id), None)
    said = f"taken by step {taken}" if taken else "kept until a step waits for it"
    return SignalOutcome("applied", f"signal {signal.signal} accepted: {said}", decision.state)


async def consume(o: Orchestrator, message: ReceivedMessage, signal: SignalMessage) -> None:
    """A Signal from the events queue: applied and settled, or dead-lettered with why.

    Settled after its transaction rather than in it: whether it is refused is known
    only then. A crash in between redelivers it, and the inbox makes that a no-op."""
    outcome = await deliver(o, signal, signal.id or message.message_id)
    if outcome.result in ("applied", "noop"):
        await o.bus.complete([message])
        return
    log.warning("signal message %s refused: %s", message.message_id, outcome.message)
    await o.bus.dead_letter(message, reason=SIGNAL_REFUSED, description=outcome.message)


async def _find(o: Orchestrator, signal: SignalMessage) -> ExecutionState | None:
    async with o.pool.acquire() as conn:
        if signal.execution is not None:
            return await o.store.get_execution(conn, signal.namespace, signal.execution)
        assert signal.workflow is not None
        assert signal.correlation_key is not None
        found: ExecutionState | None = await o.store.execution_by_correlation_key(
            conn, signal.namespace, signal.workflow, signal.correlation_key
        )
        return found


def _unknown(signal: SignalMessage) -> str:
    if signal.execution is not None:
        return f"no execution {signal.namespace}/{signal.execution}"
    return (
        f"no unfinished execution of workflow {signal.namespace}/{signal.workflow} "
        f"with correlation key {signal.correlation_key!r}"
    )


def describe_target(signal: SignalMessage) -> str:
    if signal.execution is not None:
        return f"{signal.namespace}/{signal.execution}"
    return f"{signal.namespace}/{signal.workflow} (correlation key {signal.correlation_key})"
