"""How Schedules and Triggers start runs in a cluster: by creating Execution objects.

In a cluster a run exists as an Execution object first; the operator's Execution
handler then starts it in Postgres (`sagaflow.runtime.startpath`), with the key read
back from the object by `start_key_of`. So `KubeLauncher` never touches Postgres: it
writes the object a person could have written, marked with where it came from:

- the label `sagaflow.io/schedule` or `sagaflow.io/trigger` (the source's name), which
  `active` lists by, and an ownerReference to the source (`controller`, not blocking
  deletion), so deleting a Schedule deletes its runs' objects;
- the annotations `sagaflow.io/idempotency-key`, `sagaflow.io/request-hash` and, when
  the start has a trace, `sagaflow.io/traceparent` (the handler starts the run in it), and
  the label `sagaflow.io/idempotency-hash` (a digest of the key, as label values are
  short and restricted), through which a key reused under another name is found.

Start once per key, as the start path promises: the object's name comes from the key
unless one is asked for, so a repeat is answered "already exists" and compared with
what is there (same request: the run that exists; a different one: refused). Two
calls with one key and two different names at the same moment can both create an
object; the start path in Postgres refuses the second run then, under the same key.

`LauncherApi` is the `KubeApi` with the two calls a launcher needs besides (a list by
label, a merge patch of the main object); `ClientKubeApi` serves both. Posting Events
about a Schedule or Trigger and writing their status are here too, so the operator's
wiring needs one module.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sagaflow.core.manifests import API_GROUP, API_VERSION, ExecutionPhase
from sagaflow.core.status import clip
from sagaflow.core.trigger_specs import ScheduleStatus, TriggerStatus
from sagaflow.kube.api import (
    EXECUTIONS,
    WORKFLOWS,
    Body,
    ConflictError,
    KubeApi,
)
from sagaflow.kube.events import COMPONENT
from sagaflow.runtime.startpath import IdempotencyConflictError, Source, StartCall
from sagaflow.runtime.starts import NameInUseError, StartKey
from sagaflow.telemetry import tracing

SCHEDULES = "schedules"
TRIGGERS = "triggers"
SCHEDULE_LABEL = f"{API_GROUP}/schedule"
TRIGGER_LABEL = f"{API_GROUP}/trigger"
IDEMPOTENCY_HASH_LABEL = f"{API_GROUP}/idempotency-hash"
IDEMPOTENCY_KEY = f"{API_GROUP}/idempotency-key"
REQUEST_HASH = f"{API_GROUP}/request-hash"
# The W3C traceparent of the start: the run's trace continues its caller's (an HTTP
# start, a trigger's message). A person or a pipeline may set it on an object too.
TRACEPARENT = f"{API_GROUP}/traceparent"
CANCEL_REASON = f"{API_GROUP}/cancel-reason"

_LABEL_MAX = 63
# Creating under a name whose object is deleted as it is read: try again this often.
_CREATE_TRIES = 3
# A run of a source is over once nothing more happens by itself; the same phases as
# `DirectLauncher` counts (a CompensationFailed run waits for a person, not a tick).
_FINISHED = frozenset(
    p.value for p in ExecutionPhase if p.at_rest and p is not ExecutionPhase.SUSPENDED
)


@dataclass(frozen=True, slots=True)
class SourceKind:
    """The Kubernetes side of a `Source.kind` that owns runs: kind, plural, label."""

    kind: str
    plural: str
    label: str


SOURCE_KINDS = {
    "schedule": SourceKind("Schedule", SCHEDULES, SCHEDULE_LABEL),
    "trigger": SourceKind("Trigger", TRIGGERS, TRIGGER_LABEL),
}


def source_kind(source: Source) -> SourceKind:
    """The kind of a schedule's or trigger's source; ValueError for any other."""
    try:
        return SOURCE_KINDS[source.kind]
    except KeyError:
        raise ValueError(f"source kind {source.kind!r} is neither schedule nor trigger") from None


class LauncherApi(KubeApi, Protocol):
    async def list(self, plural: str, namespace: str, *, label_selector: str) -> list[Body]:
        """The objects of `plural` in `namespace` whose labels match the selector."""

    async def patch(self, plural: str, namespace: str, name: str, patch: Body) -> bool:
        """Merge-patch the object (not its status); False when it does not exist."""


def label_value(name: str) -> str:
    """`name` as a label value: itself when short enough, else a prefix and a digest,
    the same every time (object names run to 253 characters, label values to 63)."""
    if len(name) <= _LABEL_MAX:
        return name
    return f"{name[:52]}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def idempotency_hash(key: str) -> str:
    """The label value that finds the objects started under `key` in a namespace."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def execution_body(call: StartCall, name: str) -> Body:
    """The Execution object `call` starts as, named `name`."""
    spec: Body = {"workflowRef": {"name": call.workflow}, "input": dict(call.input)}
    if call.correlation_key is not None:
        spec["correlationKey"] = call.correlation_key
    if call.suspend:
        spec["suspend"] = True
    labels: dict[str, str] = {}
    annotations = {REQUEST_HASH: call.request_hash()}
    if call.idempotency_key is not None:
        labels[IDEMPOTENCY_HASH_LABEL] = idempotency_hash(call.idempotency_key)
        annotations[IDEMPOTENCY_KEY] = call.idempotency_key
    traceparent = tracing.inject().get(tracing.TRACEPARENT)
    if traceparent is not None:
        annotations[TRACEPARENT] = traceparent
    meta: Body = {"name": name, "namespace": call.namespace}
    owner = SOURCE_KINDS.get(call.source.kind)
    if owner is not None and call.source.name:
        labels[owner.label] = label_value(call.source.name)
        if call.source.uid:
            meta["ownerReferences"] = [
                {
                    "apiVersion": API_VERSION,
                    "kind": owner.kind,
                    "name": call.source.name,
                    "uid": call.source.uid,
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ]
    meta["labels"] = labels
    meta["annotations"] = annotations
    return {"apiVersion": API_VERSION, "kind": "Execution", "metadata": meta, "spec": spec}


def start_key_of(body: Mapping[str, Any]) -> StartKey | None:
    """The idempotency key an Execution object was created with (by `KubeLauncher`),
    for the operator to start its run under; None when it has none."""
    meta = body.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    key = annotations.get(IDEMPOTENCY_KEY)
    if key is None:
        return None
    request_hash = str(annotations.get(REQUEST_HASH, ""))
    owners = {
        (o.get("kind"), str(o.get("name", "")), str(o.get("uid", "")))
        for o in meta.get("ownerReferences") or []
        if o.get("apiVersion") == API_VERSION
    }
    labels = meta.get("labels") or {}
    for source, known in SOURCE_KINDS.items():
        for kind, name, uid in owners:
            if kind == known.kind:
                return StartKey(str(key), request_hash, source, name, uid)
        if known.label in labels:
            return StartKey(str(key), request_hash, source, str(labels[known.label]))
    return StartKey(str(key), request_hash, "api")


def _fresh_name(call: StartCall) -> str:
    return f"{call.workflow[:52]}-{uuid.uuid4().hex[:10]}"


def _created_at(body: Body) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    return str(meta.get("creationTimestamp") or ""), str(meta.get("name") or "")


class KubeLauncher:
    """The `Launcher` of the operator: runs start as Execution objects."""

    def __init__(
        self, api: LauncherApi, *, new_name: Callable[[StartCall], str] = _fresh_name
    ) -> None:
        self._api = api
        self._new_name = new_name

    async def start(self, call: StartCall) -> tuple[str, bool]:
        if call.idempotency_key is not None:
            holder = await self._key_holder(call.namespace, call.idempotency_key)
            if holder is not None:
                return self._repeat(call, holder)
        if await self._api.get(WORKFLOWS, call.namespace, call.workflow) is None:
            raise LookupError(f"workflow {call.namespace}/{call.workflow} does not exist")
        name = call.run_name() or self._new_name(call)
        body = execution_body(call, name)
        for _ in range(_CREATE_TRIES):
            if await self._api.create(EXECUTIONS, call.namespace, body):
                return name, True
            existing = await self._api.get(EXECUTIONS, call.namespace, name)
            if existing is not None:
                return self._repeat(call, existing)
        raise ConflictError(f"execution {call.namespace}/{name} kept changing; try again")

    async def _key_holder(self, namespace: str, key: str) -> Body | None:
        """The oldest object started under `key`, whatever its name."""
        selector = f"{IDEMPOTENCY_HASH_LABEL}={idempotency_hash(key)}"
        found = [
            item
            for item in await self._api.list(EXECUTIONS, namespace, label_selector=selector)
            # A digest can collide; the annotation holds the key itself.
            if ((item.get("metadata") or {}).get("annotations") or {}).get(IDEMPOTENCY_KEY) == key
        ]
        return min(found, key=_created_at) if found else None

    def _repeat(self, call: StartCall, existing: Body) -> tuple[str, bool]:
        """What a start answers when `existing` holds its name or its key."""
        meta = existing.get("metadata") or {}
        name = str(meta.get("name"))
        annotations = meta.get("annotations") or {}
        key = annotations.get(IDEMPOTENCY_KEY)
        if key == call.idempotency_key and annotations.get(REQUEST_HASH) == call.request_hash():
            return name, False
        if call.idempotency_key is not None and key == call.idempotency_key:
            raise IdempotencyConflictError(call.namespace, call.idempotency_key, name)
        raise NameInUseError(f"execution {call.namespace}/{name} exists, for another request")

    async def active(self, namespace: str, source: Source) -> list[str]:
        kind = source_kind(source)
        selector = f"{kind.label}={label_value(source.name)}"
        items = await self._api.list(EXECUTIONS, namespace, label_selector=selector)
        running = []
        for item in items:
            meta = item.get("metadata") or {}
            owners = {str(o.get("uid")) for o in meta.get("ownerReferences") or []}
            if source.uid and source.uid not in owners:
                continue  # an earlier source of the same name started it
            if (item.get("status") or {}).get("phase") not in _FINISHED:
                running.append(item)
        return [_created_at(item)[1] for item in sorted(running, key=_created_at)]

    async def cancel(self, namespace: str, name: str, reason: str) -> None:
        patch = {
            "metadata": {"annotations": {CANCEL_REASON: clip(reason)}},
            "spec": {"cancel": True},
        }
        await self._api.patch(EXECUTIONS, namespace, name, patch)


def _event_name(source: Source, reason: str, key: str | None) -> str:
    seed = f"{source.uid or source.name}/{reason}/{key}" if key is not None else uuid.uuid4().hex
    # Each dot-separated part of an object name must end in a letter or digit.
    prefix = source.name[:200].rstrip("-")
    return f"{prefix}.{hashlib.sha256(seed.encode()).hexdigest()[:16]}"


def _ts(value: datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def source_event(
    namespace: str,
    source: Source,
    *,
    reason: str,
    message: str,
    at: datetime,
    instance: str,
    warning: bool = False,
    key: str | None = None,
) -> Body:
    """A core/v1 Event about a Schedule or Trigger (a tick skipped, a message filtered).

    With `key` (e.g. the tick's time) its name is derived from the source, the reason
    and the key, so posting it again after a crash is answered "already exists"."""
    kind = source_kind(source)
    at_text = _ts(at)
    involved: Body = {
        "apiVersion": API_VERSION,
        "kind": kind.kind,
        "name": source.name,
        "namespace": namespace,
    }
    if source.uid:
        involved["uid"] = source.uid
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": _event_name(source, reason, key), "namespace": namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": clip(message),
        "type": "Warning" if warning else "Normal",
        "count": 1,
        "firstTimestamp": at_text,
        "lastTimestamp": at_text,
        "source": {"component": COMPONENT},
        "reportingComponent": f"{API_GROUP}/{COMPONENT}",
        "reportingInstance": instance,
    }


async def post_source_event(
    api: KubeApi,
    namespace: str,
    source: Source,
    *,
    reason: str,
    message: str,
    at: datetime,
    instance: str,
    warning: bool = False,
    key: str | None = None,
) -> bool:
    """Post `source_event(...)`; False when an Event of its name exists already."""
    event = source_event(
        namespace,
        source,
        reason=reason,
        message=message,
        at=at,
        instance=instance,
        warning=warning,
        key=key,
    )
    return await api.create_event(namespace, event)


async def patch_source_status(
    api: KubeApi,
    namespace: str,
    source: Source,
    status: ScheduleStatus | TriggerStatus | Mapping[str, Any],
) -> None:
    """Merge-patch a Schedule's or Trigger's status. A model is written whole (an empty
    `active` clears the list, an unset time removes it); a mapping only its keys."""
    if isinstance(status, ScheduleStatus | TriggerStatus):
        body = status.model_dump(mode="json", by_alias=True)
    else:
        body = dict(status)
    await api.patch_status(source_kind(source).plural, namespace, source.name, {"status": body})
