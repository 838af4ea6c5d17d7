"""Pydantic models of the `sagaflow.io/v1alpha1` resources, shared by every mode.

Local mode reads them from YAML files and the operator from custom resources; both
validate with these models, so a manifest means the same thing everywhere. Field
names follow Kubernetes conventions (camelCase on the wire, snake_case in Python).
Cross-field rules (unique step names, known dependencies, no cycles, valid
expressions) live in `sagaflow.core.validation`, which reports every problem with
its field path.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from sagaflow.core.durations import parse_duration

API_GROUP = "sagaflow.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
STEP_NAME_PATTERN = r"^[a-zA-Z][a-zA-Z0-9_-]{0,62}$"
STEP_TYPE_PATTERN = r"^[a-zA-Z][a-zA-Z0-9_-]*(\.[a-zA-Z][a-zA-Z0-9_-]*)+$"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


def _check_duration(value: str | None) -> str | None:
    if value is not None:
        parse_duration(value)
    return value


class RetryPolicy(_Model):
    max_attempts: int = Field(default=3, ge=1, le=1000)
    initial_interval: str = "1s"
    backoff_coefficient: float = Field(default=2.0, ge=1.0, le=100.0)
    max_interval: str = "5m"
    non_retryable_errors: tuple[str, ...] = ()

    _durations = field_validator("initial_interval", "max_interval")(_check_duration)


class CompensateSpec(_Model):
    """How to undo a step that succeeded: a step command of its own."""

    type: str = Field(pattern=STEP_TYPE_PATTERN)
    input: dict[str, Any] | None = None
    # Unset: the workflow's retry policy (as for a step).
    retry: RetryPolicy | None = None
    timeout: str | None = None

    _durations = field_validator("timeout")(_check_duration)


class WorkflowRef(_Model):
    name: str = Field(pattern=NAME_PATTERN)


class StepSpec(_Model):
    name: str = Field(pattern=STEP_NAME_PATTERN)
    # Exactly one of the two: a step type runners (or Sagaflow) serve, or a child workflow.
    type: str | None = Field(default=None, pattern=STEP_TYPE_PATTERN)
    workflow_ref: WorkflowRef | None = None
    input: dict[str, Any] | None = None
    depends_on: tuple[str, ...] = ()
    # A template; false, null or empty when the dependencies are done: the step is Skipped.
    when: str | None = None
    # A template giving a list: one item run per element (`item`, `index` in templates).
    for_each: str | None = None
    max_parallel: int = Field(default=0, ge=0, le=10_000)  # item runs at once; 0: no limit
    tolerated_failures: int = Field(default=0, ge=0)  # failed items allowed
    retry: RetryPolicy | None = None
    timeout: str | None = None
    heartbeat_timeout: str | None = None
    compensate: CompensateSpec | None = None
    # The point of no return: once it succeeded, a failure is not compensated.
    pivot: bool = False

    _durations = field_validator("timeout", "heartbeat_timeout")(_check_duration)


class InDoubt(StrEnum):
    """What compensation does with a step whose attempt is running when it starts."""

    AWAIT = "await"  # wait for the attempt's result; undo it if it succeeded
    COMPENSATE = "compensate"  # undo it at once
    SKIP = "skip"  # leave it


class CompensationPolicy(_Model):
    on_cancel: bool = True
    in_doubt: InDoubt = InDoubt.AWAIT
    max_parallel: int = Field(default=0, ge=0, le=10_000)  # 0: no limit


class ConcurrencyPolicy(_Model):
    # Running executions of this workflow at once, per namespace; the rest wait in Pending.
    max_executions: int = Field(ge=1, le=1_000_000)


class SignalSpec(_Model):
    """A signal the workflow accepts; its data must satisfy `schema` (JSON Schema)."""

    name: str = Field(pattern=STEP_NAME_PATTERN)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")


class WorkflowSpec(_Model):
    steps: tuple[StepSpec, ...] = Field(min_length=1, max_length=500)
    # Run after the execution ends, whatever the outcome (they read execution.phase).
    finally_steps: tuple[StepSpec, ...] = Field(default=(), alias="finally", max_length=100)
    concurrency: ConcurrencyPolicy | None = None
    signals: tuple[SignalSpec, ...] = ()
    timeout: str | None = None
    retry: RetryPolicy | None = None
    compensation: CompensationPolicy | None = None
    output: Any = None
    # Default for this workflow's Executions; an Execution's own setting wins.
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)

    _durations = field_validator("timeout")(_check_duration)


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata Sagaflow reads; the rest passes through."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=NAME_PATTERN, max_length=253)
    namespace: str = Field(default="default", pattern=NAME_PATTERN, max_length=63)
    uid: str | None = None
    generation: int | None = None


class Workflow(_Model):
    api_version: Literal["sagaflow.io/v1alpha1"]
    kind: Literal["Workflow"]
    metadata: ObjectMeta
    spec: WorkflowSpec


class ExecutionSpec(_Model):
    workflow_ref: WorkflowRef
    input: dict[str, Any] = Field(default_factory=dict)
    # Unique among the workflow's unfinished executions in the namespace: an outside
    # event (a signal) finds its run by it.
    correlation_key: str | None = Field(default=None, min_length=1, max_length=253)
    # The operator deletes the object this long after the run finished (history stays
    # in Postgres). Unset: the workflow's default; neither: the object is kept.
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    # Control (desired state; each change becomes a control request):
    suspend: bool = False
    cancel: bool = False
    # Raised by one to ask for one more redrive; status.redrives counts those done. The
    # API server refuses a lower value (a transition rule); the operator says so too.
    redrive: int = Field(
        default=0,
        ge=0,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self >= oldSelf",
                    "message": "must not decrease: raise it by one for one more redrive",
                }
            ]
        },
    )
    redrive_to_latest: bool = False
    # Steps whose undo was done by hand: compensation passes over them.
    skip_compensation: tuple[str, ...] = ()


class Execution(_Model):
    api_version: Literal["sagaflow.io/v1alpha1"]
    kind: Literal["Execution"]
    metadata: ObjectMeta
    spec: ExecutionSpec
    status: dict[str, Any] | None = None


class ExecutionPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    COMPENSATING = "Compensating"
    COMPLETED = "Completed"
    FAILED = "Failed"
    COMPENSATED = "Compensated"
    COMPENSATION_FAILED = "CompensationFailed"
    CANCELLED = "Cancelled"

    @property
    def is_terminal(self) -> bool:
        """Nothing more happens (a Failed run may still be redriven)."""
        return self in _TERMINAL_EXECUTION

    @property
    def is_settled(self) -> bool:
        """Nothing happens until someone acts (resume, redrive, skip a compensation)."""
        return self in _SETTLED_EXECUTION

    @property
    def at_rest(self) -> bool:
        return self.is_terminal or self.is_settled


_TERMINAL_EXECUTION = frozenset(
    {
        ExecutionPhase.COMPLETED,
        ExecutionPhase.FAILED,
        ExecutionPhase.COMPENSATED,
        ExecutionPhase.CANCELLED,
    }
)
_SETTLED_EXECUTION = frozenset({ExecutionPhase.SUSPENDED, ExecutionPhase.COMPENSATION_FAILED})


class StepPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    RETRYING = "Retrying"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"
    COMPENSATING = "Compensating"
    COMPENSATED = "Compensated"
    COMPENSATION_FAILED = "CompensationFailed"
    COMPENSATION_SKIPPED = "CompensationSkipped"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL_STEP


_TERMINAL_STEP = frozenset(
    {
        StepPhase.SUCCEEDED,
        StepPhase.FAILED,
        StepPhase.SKIPPED,
        StepPhase.COMPENSATED,
        StepPhase.COMPENSATION_FAILED,
        StepPhase.COMPENSATION_SKIPPED,
    }
)


class StepError(_Model):
    type: str
    message: str
    step: str | None = None  # on an execution's error: the step whose failure it was


class OutputRef(_Model):
    """Where a large output is stored (claim check): read it from there, not the status."""

    uri: str
    size: int
    sha256: str


class CompensationStatus(_Model):
    """The undo of one step: its own attempts, times and last error."""

    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    next_retry_at: str | None = None
    error: StepError | None = None


class StepStatus(_Model):
    name: str
    phase: StepPhase
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    next_retry_at: str | None = None
    output: Any = None
    output_ref: OutputRef | None = None
    # The output was too large for the status; the whole of it is in Postgres.
    output_truncated: bool | None = None
    error: StepError | None = None
    compensation: CompensationStatus | None = None
    reason: str | None = None  # why the step was Skipped
    # A forEach step: how many items are in each phase, and `total`.
    items: dict[str, int] | None = None


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str


class ExecutionStatus(_Model):
    phase: ExecutionPhase
    workflow_version: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    # Steps running or waiting to retry: what `kubectl get` shows as the current step.
    current_steps: tuple[str, ...] = ()
    steps: tuple[StepStatus, ...] = ()
    # The earliest time a retrying step runs again.
    next_retry_at: str | None = None
    output: Any = None
    output_ref: OutputRef | None = None
    output_truncated: bool | None = None
    error: StepError | None = None
    # Redrives carried out (spec.redrive asks for them).
    redrives: int = 0
    # The `finally` steps: Running, Succeeded or Failed (the phase stays as it ended).
    finally_: str | None = Field(default=None, alias="finally")
    # While Pending: why the run has not started (a concurrency limit).
    waiting: str | None = None
    conditions: tuple[Condition, ...] = ()
    # The Postgres revision mirrored here: a status write with a lower one is stale.
    revision: int | None = None
    observed_generation: int | None = None


class WorkflowStatus(_Model):
    """What the operator reports on a Workflow object."""

    # The metadata.generation last reconciled, valid or not.
    observed_generation: int | None = None
    # The stored definition version new Executions start on (the last valid spec).
    version: int | None = None
    conditions: tuple[Condition, ...] = ()
