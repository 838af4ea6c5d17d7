"""kopf handlers for the resources that start runs: `Schedule` and `Trigger`.

Each object, when created, changed or found at start-up, is validated with the same
models as a file (`core.trigger_specs`) and handed to what the operator serves
(`api.hosting.Serving`): the schedule runner fires its ticks, the queue triggers
consume its queue, the API answers its webhook. A deletion takes it out again. An
invalid spec is not served: a Warning Event and a `Ready=False` condition say why,
and the next change is checked again.

The delete handlers are optional (no finalizer). A Trigger deleted while the operator
is down is not served when it next starts (only objects that exist are handed in);
a Schedule's row is in Postgres, so the status pass (`sync_statuses`) removes the row
of a Schedule whose object is gone or was re-created. The runs either started are
owner-referenced to it, and the garbage collector removes them with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any, Protocol

import kopf
from pydantic import ValidationError

from sagaflow.core.manifests import API_GROUP
from sagaflow.core.status import clip
from sagaflow.core.trigger_specs import ScheduleSpec, TriggerSpec
from sagaflow.kube.api import VERSION, KubeApi
from sagaflow.kube.launcher import patch_source_status, post_source_event
from sagaflow.runtime.outages import describe
from sagaflow.runtime.startpath import Source

SCHEDULES, TRIGGERS = "schedules", "triggers"
log = logging.getLogger("sagaflow.operator")
# Warning Events: a tick that was missed or could not start.
_WARNINGS = {"Missed", "Failed"}


class Sources(Protocol):
    """What the handlers feed (`api.hosting.Serving`), and whose status they show."""

    async def statuses(self) -> list[tuple[str, Source, Any]]:
        """(namespace, source, status model) of every Schedule and Trigger served."""
        ...

    async def put_schedule(
        self, namespace: str, name: str, uid: str, spec: ScheduleSpec
    ) -> Any: ...

    async def remove_schedule(self, namespace: str, name: str) -> Any: ...

    def put_trigger(self, namespace: str, name: str, uid: str, spec: TriggerSpec) -> None: ...

    async def remove_trigger(self, namespace: str, name: str) -> None: ...


def _problems(error: ValidationError) -> str:
    return "; ".join(
        f"spec.{'.'.join(str(p) for p in e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}"
        if e["loc"]
        else str(e["msg"]).removeprefix("Value error, ")
        for e in error.errors()
    )


def _spec(body: kopf.Body) -> dict[str, Any]:
    return dict(body.get("spec") or {})


def _ready(status: str, reason: str, message: str) -> list[dict[str, Any]]:
    return [{"type": "Ready", "status": status, "reason": reason, "message": clip(message)}]


def register_sources(registry: kopf.OperatorRegistry, sources: Sources) -> None:
    """Add the Schedule and Trigger handlers to `registry`."""

    @kopf.on.resume(API_GROUP, VERSION, SCHEDULES, registry=registry)
    @kopf.on.create(API_GROUP, VERSION, SCHEDULES, registry=registry)
    @kopf.on.update(API_GROUP, VERSION, SCHEDULES, registry=registry, field="spec")
    async def schedule(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
        meta = body["metadata"]
        try:
            spec = ScheduleSpec.model_validate(
                dict(body.get("spec") or {}), by_alias=True, by_name=False
            )
        except ValidationError as exc:
            problems = _problems(exc)
            logger.warning(f"invalid spec, not scheduled: {problems}")
            kopf.warn(body, reason="InvalidSpec", message=clip(f"not scheduled: {problems}"))
            patch.status["conditions"] = _ready("False", "InvalidSpec", problems)
            await sources.remove_schedule(meta["namespace"], meta["name"])
            return
        await sources.put_schedule(meta["namespace"], meta["name"], meta["uid"], spec)
        patch.status["conditions"] = _ready("True", "Scheduled", "ticks are served")

    @kopf.on.delete(API_GROUP, VERSION, SCHEDULES, registry=registry, optional=True)
    async def schedule_gone(body: kopf.Body, **_: Any) -> None:
        await sources.remove_schedule(body["metadata"]["namespace"], body["metadata"]["name"])

    @kopf.on.resume(API_GROUP, VERSION, TRIGGERS, registry=registry)
    @kopf.on.create(API_GROUP, VERSION, TRIGGERS, registry=registry)
    @kopf.on.update(API_GROUP, VERSION, TRIGGERS, registry=registry, field="spec")
    async def trigger(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
        meta = body["metadata"]
        try:
            spec = TriggerSpec.model_validate(
                dict(body.get("spec") or {}), by_alias=True, by_name=False
            )
            sources.put_trigger(meta["namespace"], meta["name"], meta["uid"], spec)
        except (ValidationError, ValueError) as exc:
            problems = _problems(exc) if isinstance(exc, ValidationError) else str(exc)
            logger.warning(f"invalid spec, not served: {problems}")
            kopf.warn(body, reason="InvalidSpec", message=clip(f"not served: {problems}"))
            patch.status["conditions"] = _ready("False", "InvalidSpec", problems)
            await sources.remove_trigger(meta["namespace"], meta["name"])
            return
        patch.status["conditions"] = _ready("True", "Serving", "events are served")

    @kopf.on.delete(API_GROUP, VERSION, TRIGGERS, registry=registry, optional=True)
    async def trigger_gone(body: kopf.Body, **_: Any) -> None:
        await sources.remove_trigger(body["metadata"]["namespace"], body["metadata"]["name"])


async def report_event(
    kube: KubeApi, namespace: str, name: str, kind: str, reason: str, message: str
) -> None:
    """An Event on the Schedule or Trigger for a start, skip, miss or failure."""
    plural = SCHEDULES if kind == "Schedule" else TRIGGERS
    try:
        body = await kube.get(plural, namespace, name)
        uid = "" if body is None else body["metadata"].get("uid", "")
        await post_source_event(
            kube,
            namespace,
            Source(kind.lower(), name, uid),
            reason=reason,
            message=clip(message),
            at=datetime.now(UTC),
            instance=name,
            warning=reason in _WARNINGS,
        )
    except Exception as exc:  # an Event is a courtesy: the tick's effect stands
        log.warning("event for %s %s/%s: %s", kind, namespace, name, describe(exc))


async def sync_statuses(
    kube: KubeApi, sources: Sources, stop: asyncio.Event, every: float = 5.0
) -> None:
    """Write each Schedule's and Trigger's status (times, active runs, counts) to its
    object every `every` seconds, and only when it changed."""
    written: dict[tuple[str, str, str, str], Any] = {}
    while not stop.is_set():
        try:
            for namespace, source, status in await sources.statuses():
                if source.kind == "schedule" and not await _exists(kube, namespace, source):
                    # Deleted while no operator watched: its row outlived it.
                    await sources.remove_schedule(namespace, source.name)
                    continue
                key = (source.kind, namespace, source.name, source.uid)
                body = status.model_dump(mode="json", by_alias=True)
                if written.get(key) != body:
                    await patch_source_status(kube, namespace, source, status)
                    written[key] = body
        except Exception as exc:
            log.warning("writing Schedule and Trigger statuses: %s", describe(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def _exists(kube: KubeApi, namespace: str, source: Source) -> bool:
    body = await kube.get(SCHEDULES, namespace, source.name)
    return body is not None and body["metadata"].get("uid") == source.uid
