"""The one client interface: what the HTTP API serves and what the CLI calls.

`Sagaflow` is implemented twice: `service.DirectService` over an orchestrator (the
state of `--state-dir` or SAGAFLOW_DATABASE_URL, and what the API server calls), and
`client.HttpClient` over the API (`--server URL`). The CLI does not know which one
it has. Every value is plain JSON in the API's own shapes, so both implementations
return the very same documents.

Errors are `ApiError`: an HTTP status, a reason word, a message, and the request
field at fault where there is one. The API answers every error with `to_json()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sagaflow.runtime.startpath import StartCall

CONTROL_VERBS = ("suspend", "resume", "cancel", "redrive")


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str, field: str | None = None) -> None:
        self.status, self.reason, self.message, self.field = status, reason, message, field
        super().__init__(message)

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.status, "reason": self.reason}
        error["message"] = self.message
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}

    @classmethod
    def from_json(cls, status: int, body: Any) -> ApiError:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls(status, "Unknown", f"HTTP {status}: {str(body)[:200]}")
        return cls(
            int(error.get("code", status)),
            str(error.get("reason", "Unknown")),
            str(error.get("message", "")),
            error.get("field"),
        )


def bad_request(message: str, field: str | None = None) -> ApiError:
    return ApiError(400, "BadRequest", message, field)


def not_found(message: str) -> ApiError:
    return ApiError(404, "NotFound", message)


def conflict(message: str, field: str | None = None) -> ApiError:
    return ApiError(409, "Conflict", message, field)


@dataclass(frozen=True, slots=True)
class Started:
    execution: dict[str, Any]  # an Execution object (`core.status.execution_object`)
    created: bool  # false: a repeat of an earlier start returned its run


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    continue_token: str | None  # pass back as `continue` for the next page; None: last


@dataclass(frozen=True, slots=True)
class Outcome:
    """A signal's or a control request's answer: `accepted`, `noop` (its effect already
    held, or a duplicate signal) or `refused` (with the reason), and the run now."""

    result: str
    message: str
    execution: dict[str, Any]


class Sagaflow(Protocol):
    async def start(self, call: StartCall) -> Started:
        """404 unknown workflow, 409 a different request under a used key or a held
        correlation key, 400 a bad name or input."""
        ...

    async def get_execution(self, namespace: str, name: str) -> dict[str, Any]: ...

    async def history(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Every history row, oldest first: {at, kind, step, attempt, message, data}. A
        `Transition` row says what the transition after it applied (data: fact, version,
        cause) and is not a line for people (`local/timeline.py`)."""
        ...

    async def state_at(self, namespace: str, name: str, at: datetime) -> dict[str, Any]:
        """The run's state at instant `at`, rebuilt from its history: {at, asOf, phase,
        steps [{name, phase, attempt}], timers [{key, kind, step, attempt, dueAt}],
        state}. 404 unknown run, 400 (field `at`) an instant before it started."""
        ...

    async def list_executions(
        self,
        namespace: str,
        *,
        workflow: str | None = None,
        phase: str | None = None,
        limit: int = 100,
        continue_token: str | None = None,
    ) -> Page: ...

    async def list_workflows(self, namespace: str) -> list[dict[str, Any]]:
        """Workflow objects: metadata, spec, status {version, executions by phase}."""
        ...

    async def get_workflow_version(self, namespace: str, name: str, version: int) -> dict[str, Any]:
        """A Workflow object of one stored version (the one a run pins): 404 if none."""
        ...

    async def list_schedules(self, namespace: str) -> list[dict[str, Any]]:
        """Schedule objects with their status (ScheduleStatus's fields)."""
        ...

    async def signal(
        self,
        namespace: str,
        name: str,
        signal: str,
        data: Any,
        signal_id: str | None = None,
    ) -> Outcome: ...

    async def control(
        self,
        namespace: str,
        name: str,
        verb: str,
        *,
        latest: bool = False,
        steps: Sequence[str] = (),
    ) -> Outcome:
        """`verb` is one of CONTROL_VERBS or `skip-compensation` (with `steps`)."""
        ...

    async def close(self) -> None: ...
