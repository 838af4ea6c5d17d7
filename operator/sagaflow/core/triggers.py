"""What one incoming event does under a Trigger: nothing, a start, or a signal.

A Trigger (`trigger_specs.TriggerSpec`) turns a message from a queue or a webhook into
a run. This module is the whole decision, pure: the message's bytes, headers and id
in, one verdict out. The runtime (`sagaflow.runtime.triggers`) receives, acts on the
verdict and settles; so every rule about *what* an event means sits here, where it
is tested without a bus or a database.

Templates render over::

    {"body": <the JSON body>, "headers": {<lower-case name>: <value>}, "messageId": ...}

Verdicts, checked in this order:
- `Malformed` (the body is not JSON, a template fails, a key renders empty or not a
  string, the input cannot be stored): the message's own fault, never retried;
- `Filtered` (`spec.filter` gave false, null or empty by JMESPath's truth);
- `StartOrder`: a start request with idempotency key
  `trigger/<uid>/<rendered idempotencyKey, else the message id>`, so a redelivered or
  replayed event yields the run it started the first time. With no `spec.input`,
  the body (a JSON object) is the input;
- `SignalOrder`: the signal for the unfinished run of the workflow holding the
  rendered correlation key, its data the rendered input (or the body), its id the
  same key, so a redelivery is applied once.

`StartOrder` carries the fields of `runtime.startpath.StartCall` rather than the call
itself: the core imports nothing above it. `Outcome` is what acting on a verdict did
(the runtime fills it in); `tally` says what it adds to the Trigger's status, and
`core.webhooks.answer` what a webhook answers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sagaflow.core.conditions import truthy
from sagaflow.core.expressions import ExpressionError, render
from sagaflow.core.jsonsafe import unstorable
from sagaflow.core.manifests import API_VERSION
from sagaflow.core.messages import SignalMessage
from sagaflow.core.trigger_specs import TriggerAction, TriggerSpec, TriggerStatus

# Keys longer than this are replaced by their SHA-256: they are identities, and stored
# in primary keys and message ids, which should stay short.
MAX_KEY_LENGTH = 200
SOURCE_KIND = "trigger"


@dataclass(frozen=True, slots=True)
class TriggerRef:
    """Which Trigger: its namespace, name and uid (the uid scopes its keys)."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class Incoming:
    """One event as it arrived: raw body, headers (any case) and its id."""

    body: bytes
    message_id: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Malformed:
    field: str  # the spec field (or `body`) at fault
    reason: str

    def describe(self) -> str:
        return f"{self.field}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Filtered:
    reason: str  # what the filter gave, for logs


@dataclass(frozen=True, slots=True)
class StartOrder:
    namespace: str
    workflow: str
    input: dict[str, Any]
    idempotency_key: str
    correlation_key: str | None
    source_name: str
    source_uid: str
    source_kind: str = SOURCE_KIND


@dataclass(frozen=True, slots=True)
class SignalOrder:
    message: SignalMessage

    @property
    def signal_id(self) -> str:
        assert self.message.id is not None  # `decide` always sets it
        return self.message.id


Verdict = Malformed | Filtered | StartOrder | SignalOrder


@dataclass(frozen=True, slots=True)
class Outcome:
    """What acting on one event did. `kind`: started, duplicate, signalled, filtered
    (all settled), malformed, refused (dead-lettered / 4xx) or retry (redelivered)."""

    kind: str
    message: str = ""
    execution: str | None = None
    reason: str = ""  # the dead-letter reason or HTTP reason word
    status: int = 202  # the HTTP status a webhook answers with
    signal: bool = False  # the event was a signal (else a start)

    @property
    def settled(self) -> bool:
        """Whether the event is done with (completed on a queue, answered 2xx)."""
        return self.kind in _COUNTED


# The count (a TriggerStatus field) each outcome adds to; malformed and refused ones
# are dead letters on a queue, and only answered on a webhook.
_COUNTED = {k: k for k in ("started", "signalled", "filtered")} | {"duplicate": "duplicates"}


def tally(outcomes: Mapping[str, int], *, queue: bool) -> dict[str, int]:
    """TriggerStatus counts to add for `outcomes` (kind -> how many)."""
    counts: dict[str, int] = {}
    for kind, n in outcomes.items():
        column = _COUNTED.get(kind)
        if column is None and queue and kind in ("malformed", "refused"):
            column = "dead_lettered"
        if column is not None and n:
            counts[column] = counts.get(column, 0) + n
    return counts


class _Refused(Exception):
    def __init__(self, at: str, reason: str) -> None:
        self.verdict = Malformed(at, reason)


def decide(spec: TriggerSpec, trigger: TriggerRef, incoming: Incoming) -> Verdict:
    """The verdict on `incoming` under `spec` (pure: no clock, no I/O)."""
    try:
        context = _context(incoming)
        if spec.filter is not None:
            value = _render(spec.filter, context, "spec.filter")
            if not truthy(value):
                return Filtered(f"filter {spec.filter} gave {_show(value)}")
        key = event_key(trigger, _key(spec, context, incoming.message_id))
        correlation = None
        if spec.correlation_key is not None:
            correlation = _text(spec.correlation_key, context, "spec.correlationKey")
        data = _data(spec, context)
    except _Refused as refused:
        return refused.verdict
    workflow = spec.workflow_ref.name
    if spec.action is TriggerAction.SIGNAL:
        assert spec.signal is not None  # the model checks both
        assert correlation is not None
        message = SignalMessage(
            namespace=trigger.namespace,
            signal=spec.signal,
            data=data,
            id=key,
            workflow=workflow,
            correlation_key=correlation,
        )
        return SignalOrder(message)
    if not isinstance(data, dict):
        return Malformed("body", f"is {_kind(data)}, and with no spec.input it is the input")
    return StartOrder(
        trigger.namespace, workflow, data, key, correlation, trigger.name, trigger.uid
    )


def trigger_object(ref: TriggerRef, spec: TriggerSpec, status: TriggerStatus) -> dict[str, Any]:
    """A Trigger as the API and `sagaflow server` show it: the object with its status."""
    return {
        "apiVersion": API_VERSION,
        "kind": "Trigger",
        "metadata": {"name": ref.name, "namespace": ref.namespace, "uid": ref.uid},
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "status": status.model_dump(mode="json", by_alias=True),
    }


def _context(incoming: Incoming) -> dict[str, Any]:
    try:
        body = json.loads(incoming.body, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Refused("body", f"is not JSON: {_first_line(exc)}") from None
    headers = {name.lower(): value for name, value in incoming.headers.items()}
    return {"body": body, "headers": headers, "messageId": incoming.message_id}


def event_key(trigger: TriggerRef, key: str) -> str:
    """The start path's idempotency key (and signal id) of the event keyed `key`."""
    if len(key) > MAX_KEY_LENGTH:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return f"trigger/{trigger.uid}/{key}"


def _key(spec: TriggerSpec, context: Mapping[str, Any], message_id: str) -> str:
    if spec.idempotency_key is None:
        if not message_id:
            raise _Refused("messageId", "is empty, and spec.idempotencyKey is not set")
        return message_id
    return _text(spec.idempotency_key, context, "spec.idempotencyKey")


def _data(spec: TriggerSpec, context: Mapping[str, Any]) -> Any:
    data = _render(spec.input, context, "spec.input") if spec.input else context["body"]
    problem = unstorable(data, "spec.input" if spec.input else "body")
    if problem is not None:
        at, _, reason = problem.partition(": ")
        raise _Refused(at, f"cannot be stored: {reason}")
    return data


def _text(template: str, context: Mapping[str, Any], at: str) -> str:
    value = _render(template, context, at)
    if not isinstance(value, str):
        hint = ": wrap it in to_string(...)" if isinstance(value, int | float) else ""
        raise _Refused(at, f"renders {_show(value)} ({_kind(value)}), not a string{hint}")
    if not value.strip():
        raise _Refused(at, "renders an empty string")
    problem = unstorable(value, at)
    if problem is not None:
        raise _Refused(at, problem.partition(": ")[2])
    return value


def _render(value: Any, context: Mapping[str, Any], at: str) -> Any:
    try:
        return render(value, context, at)
    except ExpressionError as exc:
        raise _Refused(exc.path, exc.reason) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _show(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]
