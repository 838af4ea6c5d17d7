"""What the engine decides: steps to dispatch, timers to set, history to record.

The output side of `sagaflow.core.engine.decide`, kept apart from the rules that
produce it so adapters can depend on these shapes without the engine's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sagaflow.core.facts import TimerKind
from sagaflow.core.state import ExecutionState


@dataclass(frozen=True, slots=True)
class Dispatch:
    step: str
    attempt: int
    type: str
    input: dict[str, Any]
    deadline: datetime | None
    heartbeat_timeout: float | None
    compensation: bool = False  # undoes `step` (attempt numbers are the undo's own)
    workflow: str | None = None  # a child workflow step: the attempt is a child execution


@dataclass(frozen=True, slots=True)
class Timer:
    key: str
    kind: TimerKind
    step: str
    attempt: int
    due_at: datetime


@dataclass(frozen=True, slots=True)
class Record:
    """One line of an execution's history, and in a cluster one Kubernetes Event."""

    kind: str
    message: str
    step: str | None = None
    attempt: int | None = None
    data: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ChildControl:
    """A control request for the child execution of `step`'s attempt `attempt`."""

    step: str
    attempt: int
    kind: str  # Cancel, Suspend, Resume


@dataclass(frozen=True, slots=True)
class Decision:
    state: ExecutionState
    dispatches: tuple[Dispatch, ...] = ()
    timers: tuple[Timer, ...] = ()
    cancel_timers: tuple[str, ...] = ()
    records: tuple[Record, ...] = ()
    child_controls: tuple[ChildControl, ...] = ()
    ignored: str | None = None  # why the fact changed nothing, if it did not
    # Why a signal was refused (undeclared, bad data, finished run): the sender is told.
    refused: str | None = None

    @property
    def applied(self) -> bool:
        return self.ignored is None
