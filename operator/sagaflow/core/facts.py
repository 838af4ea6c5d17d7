"""Facts: what just happened to an execution, as the engine receives it.

Kept apart from the persisted state (`sagaflow.core.state`): a fact is an input
to one transition and is never stored as part of the aggregate. Results and timers
say whether they belong to a step's compensation (`compensation=True`): a step's
forward attempts and its compensation attempts are numbered apart.

Control requests (`Suspend`, `Resume`, `Cancel`, `Redrive`, `SkipCompensation`) are
facts too: each commits with its effect in one transaction, a repeated one is a
no-op and one that does not apply is refused with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

TimerKind = Literal[
    "retry",
    "step-timeout",
    "heartbeat-timeout",
    "workflow-timeout",
    "wait",
    "compensation-retry",
    "compensation-timeout",
    "signal-timeout",
]


@dataclass(frozen=True, slots=True)
class Start:
    suspend: bool = False  # created suspended: nothing is dispatched until resumed


@dataclass(frozen=True, slots=True)
class StepCompleted:
    step: str
    attempt: int
    output: Any
    compensation: bool = False


@dataclass(frozen=True, slots=True)
class StepFailed:
    step: str
    attempt: int
    error_type: str
    message: str
    retryable: bool = True
    compensation: bool = False


@dataclass(frozen=True, slots=True)
class StepHeartbeat:
    step: str
    attempt: int
    compensation: bool = False


@dataclass(frozen=True, slots=True)
class TimerFired:
    kind: TimerKind
    step: str = ""
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class Cancel:
    reason: str = "cancelled by request"


@dataclass(frozen=True, slots=True)
class Suspend:
    pass


@dataclass(frozen=True, slots=True)
class Resume:
    pass


@dataclass(frozen=True, slots=True)
class Redrive:
    """Retry from failure. `number` is spec.redrive (None: one more than asked so far);
    `to_latest` moves the run onto the definition passed with the fact."""

    number: int | None = None
    to_latest: bool = False


@dataclass(frozen=True, slots=True)
class SkipCompensation:
    """These steps were undone by hand: compensation passes over them."""

    steps: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SignalReceived:
    """A signal from a person or an outside system; `signal_id` makes it once-only."""

    name: str
    signal_id: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class Compensate:
    """The parent undoes the step this (child) execution ran for: undo its completed
    steps; `undo_attempt` is the parent's compensation attempt it answers."""

    undo_attempt: int


Control = Cancel | Suspend | Resume | Redrive | SkipCompensation
Fact = (
    Start
    | StepCompleted
    | StepFailed
    | StepHeartbeat
    | TimerFired
    | SignalReceived
    | Compensate
    | Control
)
