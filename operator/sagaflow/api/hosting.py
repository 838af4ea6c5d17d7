"""What `sagaflow server` and `sagaflow operator` both serve beside the orchestrator.

The HTTP API (over `DirectService`), the schedule runner, the queue triggers and the
webhooks, started together and stopped in reverse. The two commands differ only in
what they hand in: where runs start (`DirectLauncher`, or Execution objects through
`kube.launcher` in a cluster), who may call the API (a tokens file or loopback only,
or TokenReview and SubjectAccessReview), and where webhook secrets come from (the
server's files, or Kubernetes Secrets). The schedules and triggers are fed by
`put`/`remove` on `Serving` (the server from its files, the operator from its
custom resources).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sagaflow.api.auth import LoopbackOnly, file_or_loopback
from sagaflow.api.contract import Started
from sagaflow.api.server import serve_api
from sagaflow.api.service import DirectService
from sagaflow.core.trigger_specs import (
    Schedule,
    ScheduleSpec,
    ScheduleStatus,
    Trigger,
    TriggerSpec,
)
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.runtime.schedules import ScheduleRunner
from sagaflow.runtime.startpath import Launcher, Source, StartCall
from sagaflow.runtime.triggers import FileSecrets, QueueTriggers, SecretResolver, Triggers, Webhooks
from sagaflow.settings import Settings

log = logging.getLogger("sagaflow.api")

# A Schedule or Trigger event worth telling people: (namespace, name, kind, reason, message).
Report = Callable[[str, str, str, str, str], Awaitable[None] | None]


FILE_UID = "file-"


def file_uid(kind: str, namespace: str, name: str) -> str:
    """A stable uid for a Schedule or Trigger read from a file: its keys (and so which
    ticks and messages have started runs) survive a restart of the server."""
    digest = hashlib.sha256(f"{kind}/{namespace}/{name}".encode()).hexdigest()
    return f"{FILE_UID}{digest[:24]}"


@dataclass
class Hosted:
    """The Schedules, Triggers and Secrets of a server's files."""

    schedules: Sequence[Schedule] = ()
    triggers: Sequence[Trigger] = ()
    secrets: Sequence[dict[str, Any]] = ()
    from_files: bool = False  # the server's: schedules of earlier files not given are dropped


@dataclass
class Serving:
    service: DirectService
    schedules: ScheduleRunner
    triggers: Triggers
    api_url: str | None = None
    auth_note: str = ""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def put_schedule(self, namespace: str, name: str, uid: str, spec: ScheduleSpec) -> None:
        await self.schedules.put(namespace, name, uid, spec)

    async def remove_schedule(self, namespace: str, name: str) -> None:
        await self.schedules.remove(namespace, name)

    async def statuses(self) -> list[tuple[str, Source, Any]]:
        """(namespace, source, status) of every Schedule and Trigger served."""
        found: list[tuple[str, Source, Any]] = []
        for obj in await self.schedules.list_objects(None):
            meta = obj["metadata"]
            status = ScheduleStatus.model_validate(obj.get("status") or {})
            found.append((meta["namespace"], Source("schedule", meta["name"], meta["uid"]), status))
        for entry in self.triggers.all():
            ref = entry.ref
            counts = await self.triggers.status(ref.namespace, ref.name)
            if counts is not None:
                found.append((ref.namespace, Source("trigger", ref.name, ref.uid), counts))
        return found

    def put_trigger(self, namespace: str, name: str, uid: str, spec: TriggerSpec) -> None:
        self.triggers.put(namespace, name, uid, spec)

    async def remove_trigger(self, namespace: str, name: str) -> None:
        await self.triggers.remove(namespace, name)

    async def stop(self) -> None:
        """Stop the schedules and triggers now (the operator's cleanup: kopf waits for
        the tasks its handlers started); the context's end does it otherwise."""
        self.stopping.set()
        for task in self.tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task

    def describe(self) -> str:
        api = f"API on {self.api_url}" if self.api_url else "no API (SAGAFLOW_API_PORT=0)"
        if self.auth_note:
            api += f" ({self.auth_note})"
        return f"{api}; {len(self.triggers.all())} trigger(s)"


@asynccontextmanager
async def host(
    o: Orchestrator,
    launcher: Launcher,
    hosted: Hosted,
    settings: Settings,
    *,
    authorizer: Any = None,
    secrets: SecretResolver | None = None,
    starter: Callable[[StartCall], Awaitable[Started]] | None = None,
    report: Report | None = None,
) -> AsyncIterator[Serving]:
    """Serve until the context ends; what runs is described by `Serving.describe()`.
    ServeError (api.server) when the API cannot listen, TokensFileError for a bad file."""
    triggers = Triggers(o.pool, launcher, o)
    schedules = ScheduleRunner(o.pool, launcher, report=_schedule_report(report))
    for t in hosted.triggers:
        meta = t.metadata
        triggers.put(
            meta.namespace, meta.name, file_uid("Trigger", meta.namespace, meta.name), t.spec
        )
    kept = set()
    for sch in hosted.schedules:
        meta = sch.metadata
        uid = file_uid("Schedule", meta.namespace, meta.name)
        await schedules.put(meta.namespace, meta.name, uid, sch.spec)
        kept.add((meta.namespace, meta.name))
    if hosted.from_files:  # a Schedule taken out of the files no longer fires
        for obj in await schedules.list_objects(None):
            meta = obj["metadata"]
            if meta["uid"].startswith(FILE_UID) and (meta["namespace"], meta["name"]) not in kept:
                await schedules.remove(meta["namespace"], meta["name"])
    service = DirectService(o, schedules=schedules.list_objects, starter=starter)
    if authorizer is None:
        authorizer = file_or_loopback(settings.api_tokens_file)
    webhooks = Webhooks(triggers, secrets or FileSecrets(hosted.secrets))
    serving = Serving(service, schedules, triggers)
    stop = serving.stopping
    serving.tasks = [
        asyncio.create_task(schedules.run(stop), name="schedules"),
        asyncio.create_task(QueueTriggers(triggers, o.bus).run(stop), name="triggers"),
    ]
    try:
        async with serve_api(service, authorizer, settings, webhooks=webhooks) as served:
            if served is not None:
                serving.api_url = served.url
                if isinstance(authorizer, LoopbackOnly):
                    serving.auth_note = "no SAGAFLOW_API_TOKENS_FILE: loopback only, no auth"
            yield serving
    finally:
        await serving.stop()


def _schedule_report(report: Report | None) -> Any:
    """The schedule runner's report, told on to `report`, else logged."""

    async def told(namespace: str, name: str, kind: str, message: str) -> None:
        if report is None:
            level = logging.WARNING if kind in ("Missed", "Failed") else logging.INFO
            log.log(level, "schedule %s/%s: %s: %s", namespace, name, kind, message)
            return
        result = report(namespace, name, "Schedule", kind, message)
        if result is not None:
            await result

    return told


__all__ = ["Hosted", "Serving", "file_uid", "host"]
