"""Pydantic models of the resources that start runs: `Schedule` and `Trigger`.

Kept apart from `manifests.py` (workflows and executions) because they describe
*when* a run starts, not what it does; both kinds are read from files by
`sagaflow server` and from custom resources by the operator, with the same models.
Every trigger ends in the same start request (`sagaflow.runtime.startpath`); these
models only say how to build one.

Cross-field rules that need more than one field (a cron expression that parses, a
time zone that exists, templates that parse) are checked by the validators here,
so a bad manifest is refused with the field's path, before anything runs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from sagaflow.core.durations import parse_duration
from sagaflow.core.expressions import check_templates
from sagaflow.core.manifests import NAME_PATTERN, ObjectMeta, WorkflowRef, _Model

# A queue name as Service Bus accepts it (letters, digits, `.`, `-`, `_`, `/`).
QUEUE_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,258}[A-Za-z0-9])?$"
# A webhook path segment: `POST /v1/namespaces/{ns}/webhooks/{path}`.
WEBHOOK_PATH_PATTERN = r"^[a-z0-9]([-a-z0-9._]{0,61}[a-z0-9])?$"
HEADER_PATTERN = r"^[A-Za-z0-9-]{1,128}$"


def _templates_ok(value: Any, path: str) -> Any:
    problems = check_templates(value, path)
    if problems:
        raise ValueError("; ".join(str(p) for p in problems))
    return value


class Overlap(StrEnum):
    """What a tick does while an earlier run of the same schedule has not finished."""

    SKIP = "Skip"  # the tick is skipped (counted, an Event)
    ALLOW = "Allow"  # the tick starts a run beside it
    BUFFER_ONE = "BufferOne"  # one tick waits and starts when the active run finishes
    CANCEL_PREVIOUS = "CancelPrevious"  # the active run is cancelled, the tick starts


class ScheduleSpec(_Model):
    workflow_ref: WorkflowRef
    # Exactly one of the two: a five-field cron expression, or a fixed interval.
    cron: str | None = None
    interval: str | None = None
    timezone: str = "UTC"  # IANA name; cron fields are read as wall time there
    # Templates over {"schedule": {"time", "name", "namespace"}}: the tick's nominal time.
    input: dict[str, Any] = Field(default_factory=dict)
    overlap: Overlap = Overlap.SKIP
    # Ticks missed by less than this (an outage) still fire; older ones are counted missed.
    catchup_window: str = "1h"
    suspend: bool = False

    @field_validator("interval", "catchup_window")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            seconds = parse_duration(value)
            if seconds < 1:
                raise ValueError(f"{value!r} is shorter than the smallest interval, 1s")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name such as Europe/Amsterdam"
            ) from exc
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from croniter import croniter  # a pure parser; imported where it is needed

        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(
                f"invalid cron expression {value!r}: use five fields "
                "(minute hour day-of-month month day-of-week), e.g. '0 2 * * *'"
            )
        return value

    @field_validator("input")
    @classmethod
    def _input_templates(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _templates_ok(value, "spec.input")  # type: ignore[no-any-return]

    @model_validator(mode="after")
    def _one_of_cron_interval(self) -> ScheduleSpec:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("set exactly one of spec.cron and spec.interval")
        return self


class ScheduleStatus(_Model):
    last_schedule_time: str | None = None
    next_schedule_time: str | None = None
    active: tuple[str, ...] = ()  # names of the runs it started that have not finished
    started: int = 0
    skipped: int = 0
    missed: int = 0


class Schedule(_Model):
    api_version: Literal["sagaflow.io/v1alpha1"]
    kind: Literal["Schedule"]
    metadata: ObjectMeta
    spec: ScheduleSpec
    status: dict[str, Any] | None = None


class SecretKeyRef(_Model):
    """A key of a Secret: in a cluster the Secret object; in files, a `kind: Secret`."""

    name: str = Field(pattern=NAME_PATTERN)
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


class WebhookAuth(_Model):
    # Exactly one: HMAC-SHA256 over the raw body (GitHub-style `sha256=<hex>` header), or
    # a shared bearer secret (`Authorization: Bearer <secret>`).
    hmac_secret_ref: SecretKeyRef | None = None
    header: str = Field(default="X-Signature-256", pattern=HEADER_PATTERN)
    # When the sender signs `<timestamp>.<body>`: the header carrying the Unix time, and
    # how far it may be from the server's clock. Unset: the signature covers the body.
    timestamp_header: str | None = Field(default=None, pattern=HEADER_PATTERN)
    max_skew: str = "5m"
    bearer_secret_ref: SecretKeyRef | None = None

    @field_validator("max_skew")
    @classmethod
    def _skew(cls, value: str) -> str:
        parse_duration(value)
        return value

    @model_validator(mode="after")
    def _one_of(self) -> WebhookAuth:
        if (self.hmac_secret_ref is None) == (self.bearer_secret_ref is None):
            raise ValueError("set exactly one of auth.hmacSecretRef and auth.bearerSecretRef")
        return self


class HttpSource(_Model):
    path: str = Field(pattern=WEBHOOK_PATH_PATTERN)
    auth: WebhookAuth


class TriggerSource(_Model):
    # Exactly one: a bus queue (Service Bus or the Postgres bus), or an HTTP webhook.
    queue: str | None = Field(default=None, pattern=QUEUE_PATTERN)
    http: HttpSource | None = None

    @model_validator(mode="after")
    def _one_of(self) -> TriggerSource:
        if (self.queue is None) == (self.http is None):
            raise ValueError("set exactly one of source.queue and source.http")
        return self


class TriggerAction(StrEnum):
    START = "start"
    SIGNAL = "signal"


class TriggerSpec(_Model):
    workflow_ref: WorkflowRef
    source: TriggerSource
    # Templates over {"body": <the message's JSON>, "headers": {...}, "messageId": ...}.
    filter: str | None = None  # false, null or empty: the message is settled and counted
    input: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = None  # default: the message id
    action: TriggerAction = TriggerAction.START
    signal: str | None = Field(default=None, pattern=r"^[a-zA-Z][a-zA-Z0-9_.-]{0,62}$")
    correlation_key: str | None = None  # start: the run's key; signal: finds the run
    suspend: bool = False

    @field_validator("filter", "idempotency_key", "correlation_key")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return _templates_ok(value, "spec") if value is not None else None

    @field_validator("input")
    @classmethod
    def _input_templates(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _templates_ok(value, "spec.input")  # type: ignore[no-any-return]

    @model_validator(mode="after")
    def _signal_needs(self) -> TriggerSpec:
        if self.action is TriggerAction.SIGNAL and (
            self.signal is None or self.correlation_key is None
        ):
            raise ValueError("action: signal needs spec.signal and spec.correlationKey")
        if self.action is TriggerAction.START and self.signal is not None:
            raise ValueError("spec.signal is only for action: signal")
        return self


class TriggerStatus(_Model):
    started: int = 0
    signalled: int = 0
    filtered: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    last_event_time: str | None = None


class Trigger(_Model):
    api_version: Literal["sagaflow.io/v1alpha1"]
    kind: Literal["Trigger"]
    metadata: ObjectMeta
    spec: TriggerSpec
    status: dict[str, Any] | None = None
