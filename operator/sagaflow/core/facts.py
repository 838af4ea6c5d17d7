"""Facts: what just happened to an execution, as the engine receives it.

Kept apart from the persisted state (`sagaflow.core.state`): a fact is an input
to one transition and is never stored as part of the aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

TimerKind = Literal["retry", "step-timeout", "heartbeat-timeout", "workflow-timeout", "wait"]


@dataclass(frozen=True, slots=True)
class Start:
    pass


@dataclass(frozen=True, slots=True)
class StepCompleted:
    step: str
    attempt: int
    output: Any


@dataclass(frozen=True, slots=True)
class StepFailed:
    step: str
    attempt: int
    error_type: str
    message: str
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class StepHeartbeat:
    step: str
    attempt: int


@dataclass(frozen=True, slots=True)
class TimerFired:
    kind: TimerKind
    step: str = ""
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class Cancel:
    reason: str = "cancelled by request"


Fact = Start | StepCompleted | StepFailed | StepHeartbeat | TimerFired | Cancel
