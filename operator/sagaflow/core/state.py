"""What the engine persists about one execution (the saga aggregate).

Frozen values: a transition returns a new state and never mutates the old one,
so a rolled-back transaction leaves nothing half-changed in memory. The JSON form
(`to_json` / `from_json`) is what Postgres stores; it is versioned by `revision`,
which increases with every applied fact and lets mirrors drop stale writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sagaflow.core.manifests import ExecutionPhase, StepPhase


@dataclass(frozen=True, slots=True)
class Failure:
    type: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Failure | None:
        return None if data is None else cls(type=data["type"], message=data["message"])


@dataclass(frozen=True, slots=True)
class StepState:
    name: str
    phase: StepPhase = StepPhase.PENDING
    attempt: int = 0  # the current (or last) attempt; 0 until first dispatched
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempt_started_at: datetime | None = None
    next_retry_at: datetime | None = None
    output: Any = None
    error: Failure | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "phase": self.phase.value,
            "attempt": self.attempt,
            "startedAt": _ts(self.started_at),
            "finishedAt": _ts(self.finished_at),
            "attemptStartedAt": _ts(self.attempt_started_at),
            "nextRetryAt": _ts(self.next_retry_at),
            "output": self.output,
            "error": self.error.to_json() if self.error else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepState:
        return cls(
            name=data["name"],
            phase=StepPhase(data["phase"]),
            attempt=data["attempt"],
            started_at=_dt(data.get("startedAt")),
            finished_at=_dt(data.get("finishedAt")),
            attempt_started_at=_dt(data.get("attemptStartedAt")),
            next_retry_at=_dt(data.get("nextRetryAt")),
            output=data.get("output"),
            error=Failure.from_json(data.get("error")),
        )


@dataclass(frozen=True, slots=True)
class ExecutionState:
    execution_id: str
    namespace: str
    name: str
    workflow: str
    version: int
    input: dict[str, Any]
    steps: dict[str, StepState]
    phase: ExecutionPhase = ExecutionPhase.PENDING
    output: Any = None
    error: Failure | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    revision: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def with_step(self, step: StepState) -> ExecutionState:
        steps = dict(self.steps)
        steps[step.name] = step
        return replace(self, steps=steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "executionId": self.execution_id,
            "namespace": self.namespace,
            "name": self.name,
            "workflow": self.workflow,
            "version": self.version,
            "input": self.input,
            "phase": self.phase.value,
            "output": self.output,
            "error": self.error.to_json() if self.error else None,
            "startedAt": _ts(self.started_at),
            "finishedAt": _ts(self.finished_at),
            "revision": self.revision,
            "steps": [s.to_json() for s in self.steps.values()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExecutionState:
        steps = [StepState.from_json(s) for s in data["steps"]]
        return cls(
            execution_id=data["executionId"],
            namespace=data["namespace"],
            name=data["name"],
            workflow=data["workflow"],
            version=data["version"],
            input=data["input"],
            steps={s.name: s for s in steps},
            phase=ExecutionPhase(data["phase"]),
            output=data.get("output"),
            error=Failure.from_json(data.get("error")),
            started_at=_dt(data.get("startedAt")),
            finished_at=_dt(data.get("finishedAt")),
            revision=data.get("revision", 0),
        )


def new_execution(
    *,
    execution_id: str,
    namespace: str,
    name: str,
    workflow: str,
    version: int,
    input: dict[str, Any],
    step_names: tuple[str, ...],
) -> ExecutionState:
    return ExecutionState(
        execution_id=execution_id,
        namespace=namespace,
        name=name,
        workflow=workflow,
        version=version,
        input=input,
        steps={n: StepState(name=n) for n in step_names},
    )


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
