"""What the engine's decisions say, counted: the orchestrator's side of the metrics.

Every transition the orchestrator commits passes through `transitions` once, after
its transaction commits, so a rolled-back batch counts nothing and a batch applied
again after an outage counts once. The counts come from the history records a
decision carries, the same lines `sagaflow history` prints, so the metrics and the
history cannot disagree.

Each step attempt is counted once, by how it settled: `succeeded`, `failed` (no retry
left), `retried` (failed, another attempt follows), `timed_out` (no result or
heartbeat in time, whether retried or not) or `ignored_stale` (a result for an
attempt that no longer counts: a duplicate, a late result after a timeout, a result
for an attempt already superseded). Items of a forEach step count under the step's
name: an index per label would grow without bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sagaflow.core.decisions import Decision
from sagaflow.core.effects import split_item_key
from sagaflow.core.manifests import ExecutionPhase
from sagaflow.core.messages import parse_attempt_id
from sagaflow.core.state import ExecutionState
from sagaflow.telemetry import metrics

_ATTEMPTS = {
    "StepSucceeded": "succeeded",
    "ItemSucceeded": "succeeded",
    "StepFailed": "failed",
    "ItemFailed": "failed",
    "StepRetrying": "retried",
    "ItemRetrying": "retried",
    "StepTimedOut": "timed_out",
    "ItemTimedOut": "timed_out",
}
_COMPENSATIONS = {
    "StepCompensated": "succeeded",
    "ItemCompensated": "succeeded",
    "StepCompensationFailed": "failed",
    "ItemCompensationFailed": "failed",
    "StepCompensationRetrying": "retried",
    "ItemCompensationRetrying": "retried",
    "StepCompensationSkipped": "skipped",
}
# The phases an execution ends in, for the finished counter and the duration: the
# terminal ones, and CompensationFailed, where it rests until someone acts.
END_PHASES = frozenset(
    {
        ExecutionPhase.COMPLETED,
        ExecutionPhase.FAILED,
        ExecutionPhase.COMPENSATED,
        ExecutionPhase.COMPENSATION_FAILED,
        ExecutionPhase.CANCELLED,
    }
)


def transitions(items: Iterable[tuple[Decision, str | None]]) -> None:
    """Count committed decisions, each with the id of the message it consumed (if any)."""
    for decision, message_id in items:
        state = decision.state
        if not decision.applied:
            _ignored(state, message_id)
            continue
        _records(decision)
        ended = f"Execution{state.phase.value}"
        if state.phase in END_PHASES and any(r.kind == ended for r in decision.records):
            finished(state)


def finished(state: ExecutionState) -> None:
    labels = (state.namespace, state.workflow, state.phase.value)
    metrics.EXECUTIONS_FINISHED.labels(*labels).inc()
    if state.started_at is not None and state.finished_at is not None:
        seconds = (state.finished_at - state.started_at).total_seconds()
        metrics.EXECUTION_DURATION.labels(*labels).observe(max(seconds, 0.0))


def _records(decision: Decision) -> None:
    state = decision.state
    ns, wf = state.namespace, state.workflow
    timed_out: set[tuple[str, int | None]] = set()
    for r in decision.records:
        if r.kind == "ExecutionStarted":
            metrics.EXECUTIONS_STARTED.labels(ns, wf).inc()
            continue
        step = split_item_key(r.step)[0] if r.step else ""
        outcome = _ATTEMPTS.get(r.kind)
        if outcome is not None:
            # A timeout is followed by the retry or failure it causes: one attempt, one count.
            if outcome == "timed_out":
                timed_out.add((r.step or "", r.attempt))
            elif (r.step or "", r.attempt) in timed_out:
                continue
            metrics.STEP_ATTEMPTS.labels(ns, wf, step, outcome).inc()
            continue
        outcome = _COMPENSATIONS.get(r.kind)
        if outcome is not None:
            metrics.COMPENSATIONS.labels(ns, wf, step, outcome).inc()


def _ignored(state: ExecutionState, message_id: str | None) -> None:
    """A result message the engine ignored is a stale attempt; other ignored facts
    (a control request with nothing to do, a repeated timer) are not attempts."""
    if message_id is None:
        return
    attempt = parse_attempt_id(message_id)
    if attempt is None or attempt.compensation:
        return
    step = split_item_key(attempt.step)[0]
    metrics.STEP_ATTEMPTS.labels(state.namespace, state.workflow, step, "ignored_stale").inc()


def signal(state: ExecutionState, name: str, accepted: bool) -> None:
    # A refused signal may carry any name a caller sent: it is not a label of its own.
    label = name if accepted else "*"
    outcome = "accepted" if accepted else "refused"
    metrics.SIGNALS.labels(state.namespace, state.workflow, label, outcome).inc()


def seconds_since(then: datetime, now: datetime) -> float:
    return max((now - then).total_seconds(), 0.0)
