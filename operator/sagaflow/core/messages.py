"""Wire contracts between the orchestrator and step runners.

Commands go to a queue per step-type prefix (`steps.inventory` for
`inventory.reserve`); result events come back on one events queue. The session is
the execution id, so one execution's messages are handled in order. Every message
id derives from the attempt id (`<execution>/<step>/<attempt>`, and for a step's
compensation `<execution>/<step>/compensate/<attempt>`), so a redelivered command
or a duplicated result is recognised at every hop. A compensation's command and
results carry `"compensation": true`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from sagaflow.core.jsonsafe import scrub_text, unstorable

EVENTS_QUEUE = "sagaflow.events"
COMMANDS_QUEUE_PREFIX = "steps."


def commands_queue(step_type: str) -> str:
    """`inventory.reserve` -> `steps.inventory`: one queue per runner service prefix."""
    return COMMANDS_QUEUE_PREFIX + step_type.split(".", 1)[0]


COMPENSATE = "compensate"


def attempt_id(execution_id: str, step: str, attempt: int, compensation: bool = False) -> str:
    if compensation:
        return f"{execution_id}/{step}/{COMPENSATE}/{attempt}"
    return f"{execution_id}/{step}/{attempt}"


@dataclass(frozen=True, slots=True)
class AttemptId:
    execution_id: str
    step: str
    attempt: int
    compensation: bool


def parse_attempt_id(text: str) -> AttemptId | None:
    """The parts of an attempt id (message ids start with one); None if it is not one.

    Step names hold no '/', so the step is the second part; execution ids are uuids."""
    parts = text.split("/")
    if len(parts) < 3 or not parts[0] or not parts[1]:
        return None
    compensation = parts[2] == COMPENSATE
    number = parts[3] if compensation and len(parts) > 3 else parts[2]
    if not number.isdigit():
        return None
    return AttemptId(parts[0], parts[1], int(number), compensation)


class MalformedMessageError(ValueError):
    """A message body that does not follow the contract; it is dead-lettered."""


@dataclass(frozen=True, slots=True)
class ExecuteStep:
    execution_id: str
    execution: str  # namespace/name, for people and logs
    step: str
    attempt: int
    type: str
    input: dict[str, Any]
    deadline: str | None  # ISO-8601, when the attempt times out
    heartbeat_timeout: float | None  # seconds
    compensation: bool = False  # undoes `step`; `attempt` numbers the undo's attempts

    @property
    def attempt_id(self) -> str:
        return attempt_id(self.execution_id, self.step, self.attempt, self.compensation)

    def encode(self) -> bytes:
        body = {
            "kind": "ExecuteStep",
            "executionId": self.execution_id,
            "execution": self.execution,
            "step": self.step,
            "attempt": self.attempt,
            "type": self.type,
            "input": self.input,
            "deadline": self.deadline,
            "heartbeatTimeout": self.heartbeat_timeout,
        }
        if self.compensation:
            body["compensation"] = True
        return _dumps(body)


@dataclass(frozen=True, slots=True)
class StepResult:
    """StepCompleted, StepFailed or StepHeartbeat, as sent by a runner."""

    kind: Literal["StepCompleted", "StepFailed", "StepHeartbeat"]
    execution_id: str
    step: str
    attempt: int
    output: dict[str, Any] | None = None
    error_type: str | None = None
    error_message: str | None = None
    retryable: bool = True
    sequence: int = 0  # heartbeats count up so each has its own message id
    compensation: bool = False

    @property
    def message_id(self) -> str:
        base = attempt_id(self.execution_id, self.step, self.attempt, self.compensation)
        if self.kind == "StepHeartbeat":
            return f"{base}/heartbeat/{self.sequence}"
        return f"{base}/result"

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "kind": self.kind,
            "executionId": self.execution_id,
            "step": self.step,
            "attempt": self.attempt,
        }
        if self.compensation:
            body["compensation"] = True
        if self.kind == "StepCompleted":
            body["output"] = self.output if self.output is not None else {}
        elif self.kind == "StepFailed":
            body["error"] = {
                "type": self.error_type or "Error",
                "message": self.error_message or "",
                "retryable": self.retryable,
            }
        else:
            body["sequence"] = self.sequence
        return _dumps(body)


def decode_command(body: bytes) -> ExecuteStep:
    data = _loads(body)
    if data.get("kind") != "ExecuteStep":
        raise MalformedMessageError(f"kind: expected ExecuteStep, got {data.get('kind')!r}")
    try:
        cmd = ExecuteStep(
            execution_id=_str(data, "executionId"),
            execution=_str(data, "execution"),
            step=_str(data, "step"),
            attempt=_int(data, "attempt"),
            type=_str(data, "type"),
            input=_obj(data, "input"),
            deadline=data.get("deadline"),
            heartbeat_timeout=data.get("heartbeatTimeout"),
            compensation=_flag(data, "compensation"),
        )
    except (KeyError, TypeError) as exc:
        raise MalformedMessageError(str(exc)) from exc
    return cmd


RESULT_KINDS = ("StepCompleted", "StepFailed", "StepHeartbeat")
SIGNAL_KIND = "Signal"


@dataclass(frozen=True, slots=True)
class SignalMessage:
    """A signal for a running execution, from any outside system, on the events queue.

    The target is the execution's name, or the workflow and the correlation key of
    one of its unfinished executions. `id` makes it once-only; a message without one
    uses its message id. The body (JSON)::

        {"kind": "Signal", "namespace": "shop", "execution": "order-42",
         "signal": "approval", "id": "approval-42", "data": {"approved": true}}

    or `"workflow": "orders", "correlationKey": "order-42"` instead of `execution`.
    """

    namespace: str
    signal: str
    data: Any
    id: str | None = None
    execution: str | None = None
    workflow: str | None = None
    correlation_key: str | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "kind": SIGNAL_KIND,
            "namespace": self.namespace,
            "signal": self.signal,
            "data": self.data,
        }
        for key, value in (
            ("id", self.id),
            ("execution", self.execution),
            ("workflow", self.workflow),
            ("correlationKey", self.correlation_key),
        ):
            if value is not None:
                body[key] = value
        return _dumps(body)


def decode_signal(data: dict[str, Any], body: bytes) -> SignalMessage:
    """The Signal in `data` (a decoded events-queue body); MalformedMessageError naming
    the field when it breaks the format above."""
    execution = data.get("execution")
    if execution is None:
        if data.get("workflow") is None or data.get("correlationKey") is None:
            raise MalformedMessageError(
                "a Signal names its execution, or its workflow and correlationKey"
            )
        workflow, key = _str(data, "workflow"), _str(data, "correlationKey")
    else:
        execution, workflow, key = _str(data, "execution"), None, None
    problem = output_problem(data.get("data"), body)
    if problem is not None:
        raise MalformedMessageError(problem.replace("the step's output", "data"))
    signal_id = data.get("id")
    return SignalMessage(
        namespace=_str(data, "namespace") if "namespace" in data else "default",
        signal=_str(data, "signal"),
        data=data.get("data"),
        id=None if signal_id is None else _str(data, "id"),
        execution=execution,
        workflow=workflow,
        correlation_key=key,
    )


def decode_event(body: bytes) -> StepResult | SignalMessage:
    """What arrived on the events queue: a runner's result or a Signal."""
    data = _loads(body)
    if data.get("kind") == SIGNAL_KIND:
        return decode_signal(data, body)
    return _result(data, body)


def decode_result(body: bytes) -> StepResult:
    """The result in `body`; MalformedMessageError when it breaks the contract.

    A StepCompleted whose output Postgres could not store (NaN, NUL, ...) decodes as
    that attempt's permanent StepFailed `InvalidOutput` naming the value's path: the
    message is well formed and names its attempt, so it fails that step alone rather
    than being dead-lettered or poisoning the batch it arrives in.
    """
    return _result(_loads(body), body)


def _result(data: dict[str, Any], body: bytes) -> StepResult:
    kind = data.get("kind")
    if kind not in RESULT_KINDS:
        raise MalformedMessageError(f"kind: expected {', '.join(RESULT_KINDS)}, got {kind!r}")
    execution_id, step, attempt = (
        _str(data, "executionId"),
        _str(data, "step"),
        _int(data, "attempt"),
    )
    compensation = _flag(data, "compensation")
    if kind == "StepCompleted":
        output = _obj(data, "output")
        problem = output_problem(output, body)
        if problem is not None:
            return StepResult(
                "StepFailed",
                execution_id,
                step,
                attempt,
                error_type="InvalidOutput",
                error_message=problem,
                retryable=False,
                compensation=compensation,
            )
        return StepResult(
            "StepCompleted", execution_id, step, attempt, output=output, compensation=compensation
        )
    if kind == "StepFailed":
        error = _obj(data, "error")
        return StepResult(
            "StepFailed",
            execution_id,
            step,
            attempt,
            error_type=scrub_text(_str(error, "type", clean=False)),
            error_message=scrub_text(str(error.get("message", ""))),
            retryable=bool(error.get("retryable", True)),
            compensation=compensation,
        )
    sequence = _int(data, "sequence")
    return StepResult(
        "StepHeartbeat", execution_id, step, attempt, sequence=sequence, compensation=compensation
    )


# What may hide a value Postgres cannot store, in encoded JSON: the constants Python
# writes for non-finite floats, and escapes of NUL or of a UTF-16 surrogate. A match
# only means "look closer" (a string may say "NaN"); the walk decides.
_SUSPECT = re.compile(rb"NaN|Infinity|\\u(?:0000|[dD][89a-fA-F])")


def output_problem(output: Any, body: bytes) -> str | None:
    """Why `output`, whose encoding `body` contains, cannot be stored; None if it can.

    The regular expression over the bytes is the fast path; only a match walks the value.
    """
    if _SUSPECT.search(body) is None:
        return None
    problem = unstorable(output, "output")
    return None if problem is None else f"the step's output cannot be stored: {problem}"


def _dumps(value: Any) -> bytes:
    # allow_nan=False: Python would write NaN and Infinity, which are not JSON.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _loads(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessageError(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MalformedMessageError("body: expected a JSON object")
    return data


def _str(data: dict[str, Any], key: str, *, clean: bool = True) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedMessageError(f"{key}: expected a non-empty string")
    # Identifiers become keys in Postgres, which refuses NUL and lone surrogates in text.
    if clean and (problem := unstorable(value, key)) is not None:
        raise MalformedMessageError(problem)
    return value


def _int(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedMessageError(f"{key}: expected a non-negative integer")
    return value


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise MalformedMessageError(f"{key}: expected true or false")
    return value


def _obj(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise MalformedMessageError(f"{key}: expected a JSON object")
    return value
