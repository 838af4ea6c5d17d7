"""What an execution's state keeps about others: the parent it runs for, the signals
it received.

Kept apart from `sagaflow.core.state` (the aggregate itself) because these are the
ties of coordination between executions and the world outside: a child execution
answers its parent's step attempt (`Parent`), and a signal from a person or another
system is kept until a wait takes it (`Signal`). Frozen values, with their JSON form
as `state` stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Signal:
    id: str
    name: str
    data: Any
    at: datetime
    step: str | None = None  # the wait that took it

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "data": self.data,
            "at": _ts(self.at),
            "step": self.step,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Signal:
        at = _dt(data["at"])
        assert at is not None
        return cls(data["id"], data["name"], data.get("data"), at, data.get("step"))


@dataclass(frozen=True, slots=True)
class Parent:
    """The step attempt a child execution runs for: its end is that attempt's result."""

    execution_id: str
    namespace: str
    name: str
    step: str
    attempt: int
    depth: int = 1  # 1 for a child, 2 for a grandchild, ...
    # Set when the parent undoes the step: its compensation attempt, which the
    # child's Compensated (or CompensationFailed) end answers.
    undo_attempt: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "executionId": self.execution_id,
            "namespace": self.namespace,
            "name": self.name,
            "step": self.step,
            "attempt": self.attempt,
            "depth": self.depth,
            "undoAttempt": self.undo_attempt,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Parent | None:
        if data is None:
            return None
        return cls(
            data["executionId"],
            data["namespace"],
            data["name"],
            data["step"],
            data["attempt"],
            data.get("depth", 1),
            data.get("undoAttempt", 0),
        )


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
