"""The status mirror against real Postgres and a scripted API: what reaches the object.

`ScriptedApi` holds objects in memory the way the API server does (resourceVersion
bumped on every write, 409 on a stale one) and can be told to interfere: another
writer in between, a newer status already in place, the object replaced.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
from pg import FakeClock

from sagaflow.adapters.postgres import mirror_rows
from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.kube.api import ConflictError
from sagaflow.kube.mirror import StatusMirror
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.runtime.starts import NameInUseError

NS = "default"
SPEC = WorkflowSpec.model_validate(
    {
        "steps": [
            {"name": "a", "type": "svc.a"},
            {
                "name": "hold",
                "type": "sagaflow.wait",
                "dependsOn": ["a"],
                "input": {"duration": "1h"},
            },
        ]
    }
)
Body = dict[str, Any]


class ScriptedApi:
    def __init__(self) -> None:
        self.objects: dict[str, Body] = {}
        self.events: dict[str, Body] = {}
        self.event_posts = 0
        self.deleted: list[tuple[str, str]] = []
        self.rv = 0
        self.interfere = 0  # writes by "someone else" right after the next reads
        self.events_at_status_write: list[int] = []

    def add(self, name: str, uid: str) -> None:
        self.rv += 1
        self.objects[name] = {
            "metadata": {"name": name, "uid": uid, "resourceVersion": str(self.rv), "generation": 1}
        }

    async def get(self, plural: str, namespace: str, name: str) -> Body | None:
        obj = self.objects.get(name)
        body = json.loads(json.dumps(obj)) if obj else None
        if self.interfere and obj is not None:
            self.interfere -= 1
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
        return body

    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> None:
        obj = self.objects.get(name)
        if obj is None:
            return
        if patch["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise ConflictError(name)
        status = dict(obj.get("status") or {})
        for key, value in patch["status"].items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = value
        self.rv += 1
        self.events_at_status_write.append(len(self.events))
        obj["status"] = status
        obj["metadata"]["resourceVersion"] = str(self.rv)

    async def create_event(self, namespace: str, event: Body) -> bool:
        self.event_posts += 1
        name = event["metadata"]["name"]
        if name in self.events:
            return False
        self.events[name] = event
        return True

    async def delete(self, plural: str, namespace: str, name: str, *, uid: str) -> None:
        self.deleted.append((name, uid))


@pytest.fixture
async def env(pg_pool: asyncpg.Pool) -> Any:
    clock = FakeClock()
    bus = PostgresBus(pg_pool, clock=clock, lock_duration=30)
    orchestrator = Orchestrator(PostgresStore(pg_pool), bus, clock=clock)
    await orchestrator.apply_workflow(NS, "flow", SPEC)
    api = ScriptedApi()
    mirror = StatusMirror(pg_pool, api, clock=clock, instance="test")
    yield orchestrator, api, mirror, clock
    await bus.close()


async def started(orchestrator: Orchestrator, api: ScriptedApi, name: str, uid: str) -> None:
    await orchestrator.start(NS, name, "flow", {}, execution_id=uid)
    async with orchestrator.pool.acquire() as conn:
        await mirror_rows.track(conn, uid, NS, name, None)
    api.add(name, uid)


async def test_status_and_events_reach_the_object_once(env: Any) -> None:
    orchestrator, api, mirror, _ = env
    await started(orchestrator, api, "run-1", "uid-1")
    assert await mirror.mirror_once() == 1
    status = api.objects["run-1"]["status"]
    assert status["phase"] == "Running" and status["currentSteps"] == ["a"]
    assert status["observedGeneration"] == 1
    reasons = sorted(e["reason"] for e in api.events.values())
    assert reasons == ["ExecutionStarted", "StepDispatched"]
    assert api.events_at_status_write == [2]  # written after both Events
    event = next(iter(api.events.values()))
    assert event["involvedObject"]["uid"] == "uid-1"
    # Nothing changed since: a second pass writes nothing and posts nothing.
    posts = api.event_posts
    assert await mirror.mirror_once() == 0
    assert api.event_posts == posts


async def test_the_status_waits_for_the_events_that_led_to_it(env: Any) -> None:
    orchestrator, api, _, clock = env
    mirror = StatusMirror(orchestrator.pool, api, clock=clock, instance="test", events_per_pass=1)
    await started(orchestrator, api, "run-1", "uid-1")  # two history rows
    # One Event per pass: the first pass posts one and leaves the status alone.
    assert await mirror.mirror_once() == 0
    assert len(api.events) == 1 and "status" not in api.objects["run-1"]
    # The second posts the last one, and only then writes the status.
    assert await mirror.mirror_once() == 1
    assert api.events_at_status_write == [2]
    assert api.objects["run-1"]["status"]["currentSteps"] == ["a"]
    assert await mirror.mirror_once() == 0


async def test_a_concurrent_writer_makes_the_write_retry_not_clobber(env: Any) -> None:
    orchestrator, api, mirror, _ = env
    await started(orchestrator, api, "run-1", "uid-1")
    api.interfere = 2  # the first two reads are followed by someone else's write
    assert await mirror.mirror_once() == 1
    assert api.objects["run-1"]["status"]["phase"] == "Running"
    api.interfere = 10  # more conflicts than one pass tries: the row stays behind
    await orchestrator.cancel(NS, "run-1", "stop", execution_id="uid-1")
    assert await mirror.mirror_once() == 0
    assert api.objects["run-1"]["status"]["phase"] == "Running"
    api.interfere = 0
    assert await mirror.mirror_once() == 1  # retried on the next pass
    assert api.objects["run-1"]["status"]["phase"] == "Cancelled"


async def test_a_stale_state_never_overwrites_a_newer_status(env: Any) -> None:
    orchestrator, api, mirror, _ = env
    await started(orchestrator, api, "run-1", "uid-1")
    newer = {"phase": "Completed", "revision": 10_000}
    api.objects["run-1"]["status"] = dict(newer)
    assert await mirror.mirror_once() == 1
    assert api.objects["run-1"]["status"] == newer


async def test_an_object_that_took_the_name_over_is_left_alone(env: Any) -> None:
    orchestrator, api, mirror, _ = env
    await started(orchestrator, api, "run-1", "uid-1")
    api.objects["run-1"]["metadata"]["uid"] = "uid-2"  # deleted and created again
    assert await mirror.mirror_once() == 1
    assert "status" not in api.objects["run-1"]


async def test_keys_the_state_no_longer_has_are_removed(env: Any) -> None:
    orchestrator, api, mirror, _ = env
    await started(orchestrator, api, "run-1", "uid-1")
    await mirror.mirror_once()
    assert "currentSteps" in api.objects["run-1"]["status"]
    await orchestrator.cancel(NS, "run-1", "stop", execution_id="uid-1")
    await mirror.mirror_once()
    status = api.objects["run-1"]["status"]
    assert status["phase"] == "Cancelled" and "currentSteps" not in status
    assert status["error"]["type"] == "Cancelled"


async def test_ttl_deletes_by_uid_only_after_the_ttl(env: Any) -> None:
    orchestrator, api, mirror, clock = env
    await started(orchestrator, api, "run-1", "uid-1")
    async with orchestrator.pool.acquire() as conn:
        await mirror_rows.track(conn, "uid-1", NS, "run-1", 60)
    assert await mirror.collect_once() == 0  # still running
    await orchestrator.cancel(NS, "run-1", "stop", execution_id="uid-1")
    clock.advance(59)
    assert await mirror.collect_once() == 0
    clock.advance(2)
    assert await mirror.collect_once() == 1
    assert api.deleted == [("run-1", "uid-1")]
    async with orchestrator.pool.acquire() as conn:
        await mirror_rows.release(conn, "uid-1", clock())
    assert await mirror.collect_once() == 0


async def test_start_is_keyed_by_uid_and_a_released_name_starts_afresh(env: Any) -> None:
    orchestrator, _, _, clock = env
    _, created = await orchestrator.start(NS, "run-1", "flow", {}, execution_id="uid-1")
    again, created_again = await orchestrator.start(NS, "run-1", "flow", {}, execution_id="uid-1")
    assert created and not created_again and again.execution_id == "uid-1"
    with pytest.raises(NameInUseError):
        await orchestrator.start(NS, "run-1", "flow", {}, execution_id="uid-2")
    async with orchestrator.pool.acquire() as conn:
        await mirror_rows.release(conn, "uid-1", clock())
    second, created = await orchestrator.start(NS, "run-1", "flow", {}, execution_id="uid-2")
    assert created and second.execution_id == "uid-2"
    async with orchestrator.pool.acquire() as conn:
        assert (await orchestrator.store.get_execution(conn, NS, "run-1")).execution_id == "uid-2"
        kept = await orchestrator.store.get_execution_by_id(conn, "uid-1")
    assert kept is not None  # the released run and its history stay
