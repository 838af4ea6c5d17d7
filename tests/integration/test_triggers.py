"""Triggers on a real Postgres bus: queue messages start or signal runs, once each.

`QueueTriggers` is driven one receive at a time (`consume_once`, fake clock) with a
recording `Launcher`, so each test sees exactly what was started and how every
message was settled: completed only after its start, filtered out and counted,
malformed and dead-lettered with the reason, redelivered when the start could not
happen yet. Then `Webhooks.deliver` the same way, and the whole path once through the
real orchestrator (`DirectLauncher`): a run started, its duplicate, and a signal.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from test_orchestrator import Harness, completed, harness_on

from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.ports import OutgoingMessage
from sagaflow.core.trigger_specs import TriggerSpec
from sagaflow.core.webhooks import sign
from sagaflow.runtime.startpath import DirectLauncher, IdempotencyConflictError, Source, StartCall
from sagaflow.runtime.triggers import (
    FileSecrets,
    QueueTriggers,
    Triggers,
    WebhookPathInUseError,
    Webhooks,
)

pytestmark = pytest.mark.timeout(60)

NS = "shop"
QUEUE = "orders-in"
SECRET = "s3cret"  # noqa: S105 (a test secret)


@dataclass
class RecordingLauncher:
    """Starts nothing; remembers each call and answers as the start path would."""

    queued: Callable[[], Awaitable[int]]
    workflows: set[str] = field(default_factory=lambda: {"orders"})
    calls: list[StartCall] = field(default_factory=list)
    runs: dict[str, tuple[str, str]] = field(default_factory=dict)
    waiting_at_start: list[int] = field(default_factory=list)  # messages still in the queue
    fail: Exception | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, call: StartCall) -> tuple[str, bool]:
        self.waiting_at_start.append(await self.queued())
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail
        if call.workflow not in self.workflows:
            raise LookupError(f"workflow {call.namespace}/{call.workflow} does not exist")
        assert call.idempotency_key is not None
        held = self.runs.get(call.idempotency_key)
        if held is not None:
            if held[1] != call.request_hash():
                raise IdempotencyConflictError(call.namespace, call.idempotency_key, held[0])
            return held[0], False
        name = call.run_name()
        assert name is not None
        self.runs[call.idempotency_key] = (name, call.request_hash())
        self.started.set()
        return name, True

    async def active(self, namespace: str, source: Source) -> list[str]:
        return []

    async def cancel(self, namespace: str, name: str, reason: str) -> None:
        raise AssertionError("triggers never cancel")


@dataclass
class World:
    h: Harness
    launcher: RecordingLauncher
    triggers: Triggers
    queues: QueueTriggers

    async def send(self, *bodies: Any, ids: list[str] | None = None) -> None:
        messages = []
        for i, body in enumerate(bodies):
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            message_id = ids[i] if ids else f"m-{i}"
            messages.append(OutgoingMessage(QUEUE, message_id, message_id, raw))
        await self.h.bus.send(messages)

    async def once(self, name: str = "orders-in") -> dict[str, int]:
        return dict(await self.queues.consume_once(NS, name))

    async def waiting(self) -> int:
        return int(await self.h.scalar("SELECT count(*) FROM bus_messages WHERE queue = $1", QUEUE))

    async def status(self, name: str = "orders-in") -> dict[str, Any]:
        found = await self.triggers.status(NS, name)
        assert found is not None
        return found.model_dump(by_alias=True)


def spec(**fields: Any) -> TriggerSpec:
    return TriggerSpec.model_validate(
        {"workflowRef": {"name": "orders"}, "source": {"queue": QUEUE}, **fields}
    )


@pytest.fixture
async def world(pg_pool: asyncpg.Pool) -> AsyncIterator[World]:
    async with harness_on(pg_pool) as h:

        async def queued() -> int:
            return int(await h.scalar("SELECT count(*) FROM bus_messages WHERE queue = $1", QUEUE))

        launcher = RecordingLauncher(queued)
        triggers = Triggers(pg_pool, launcher, h.orchestrator, clock=h.clock)
        yield World(h, launcher, triggers, QueueTriggers(triggers, h.bus, idle_wait=0.05))


async def test_valid_messages_start_runs_and_are_settled_after_their_start(world: World) -> None:
    world.triggers.put(NS, "orders-in", "uid-1", spec(input={"order": "${{ body.id }}"}))
    await world.send({"id": "o-1"}, {"id": "o-2"})
    assert await world.once() == {"started": 2}
    assert [c.input for c in world.launcher.calls] == [{"order": "o-1"}, {"order": "o-2"}]
    first = world.launcher.calls[0]
    assert first.idempotency_key == "trigger/uid-1/m-0"
    assert first.source == Source("trigger", "orders-in", "uid-1")
    # Both were still in the queue when their starts ran; settled afterwards.
    assert world.launcher.waiting_at_start == [2, 2]
    assert await world.waiting() == 0
    status = await world.status()
    assert status["started"] == 2 and status["lastEventTime"] == world.h.clock.now.isoformat()


async def test_filtered_out_messages_are_settled_and_counted(world: World) -> None:
    world.triggers.put(NS, "orders-in", "uid-1", spec(filter="${{ body.type == 'paid' }}"))
    await world.send({"type": "created"}, {"type": "paid"}, {"type": "refunded"})
    assert await world.once() == {"filtered": 2, "started": 1}
    assert await world.waiting() == 0
    assert (await world.status())["filtered"] == 2


async def test_malformed_messages_are_dead_lettered_with_the_reason(world: World) -> None:
    world.triggers.put(NS, "orders-in", "uid-1", spec(idempotencyKey="${{ body.id }}"))
    await world.send(b"{not json", {"no": "id"}, {"id": "o-1"})
    assert await world.once() == {"malformed": 2, "started": 1}
    letters = {d.message_id: d for d in await world.h.bus.dead_letters(QUEUE)}
    assert set(letters) == {"m-0", "m-1"}
    assert letters["m-0"].reason == "MalformedMessage"
    assert letters["m-0"].description.startswith("body: is not JSON")
    assert letters["m-1"].description == "spec.idempotencyKey: renders null (null), not a string"
    assert letters["m-1"].body == b'{"no": "id"}'
    assert await world.waiting() == 0
    assert (await world.status())["deadLettered"] == 2
    assert len(world.launcher.calls) == 1


async def test_duplicated_messages_yield_one_start(world: World) -> None:
    world.triggers.put(NS, "orders-in", "uid-1", spec(idempotencyKey="${{ body.id }}"))
    await world.send({"id": "o-1"}, {"id": "o-1"}, ids=["a", "b"])
    assert await world.once() == {"started": 1, "duplicate": 1}
    # The same message delivered again (after a crash before it was settled).
    await world.send({"id": "o-1"}, ids=["a"])
    assert await world.once() == {"duplicate": 1}
    assert len(world.launcher.runs) == 1
    status = await world.status()
    assert (status["started"], status["duplicates"]) == (1, 2)
    # The same key with other content is refused, not silently taken as the same.
    await world.send({"id": "o-1", "extra": True}, ids=["c"])
    assert await world.once() == {"refused": 1}
    [letter] = await world.h.bus.dead_letters(QUEUE)
    assert letter.reason == "StartRefused" and "was used by a different request" in (
        letter.description
    )


async def test_an_unknown_workflow_redelivers_the_message_and_says_so_once(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.triggers.put(NS, "orders-in", "uid-1", spec(workflowRef={"name": "later"}))
    await world.send({"id": "o-1"})
    with caplog.at_level(logging.WARNING, logger="sagaflow.triggers"):
        for _ in range(3):
            assert await world.once() == {"retry": 1}
    said = [r for r in caplog.records if "does not exist" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is None
    assert "shop/later" in said[0].getMessage()
    assert await world.waiting() == 1 and not await world.h.bus.dead_letters(QUEUE)

    world.launcher.workflows.add("later")
    assert await world.once() == {"started": 1}
    assert await world.waiting() == 0
    status = await world.status()
    assert (status["started"], status["deadLettered"]) == (1, 0)


async def test_a_transient_failure_abandons_the_message_for_redelivery(world: World) -> None:
    world.triggers.put(NS, "orders-in", "uid-1", spec())
    await world.send({"id": "o-1"})
    world.launcher.fail = ConnectionError("database went away")
    assert await world.once() == {"retry": 1}
    assert await world.waiting() == 1
    world.launcher.fail = None
    assert await world.once() == {"started": 1}
    count = await world.h.scalar("SELECT started FROM sagaflow_trigger_counts")
    assert count == 1


async def test_status_objects_and_a_recreated_trigger_starting_from_zero(world: World) -> None:
    world.triggers.put(NS, "orders-in", "uid-1", spec())
    await world.send({"id": "o-1"})
    await world.once()
    [listed] = await world.triggers.list_objects(NS)
    assert listed["apiVersion"] == "sagaflow.io/v1alpha1" and listed["kind"] == "Trigger"
    assert listed["metadata"] == {"name": "orders-in", "namespace": NS, "uid": "uid-1"}
    assert listed["spec"]["source"] == {"queue": QUEUE}
    assert listed["status"]["started"] == 1 and listed["status"]["deadLettered"] == 0
    assert await world.triggers.list_objects("elsewhere") == []

    # Deleted and created again under the name: a new uid, a fresh status.
    world.triggers.put(NS, "orders-in", "uid-2", spec())
    assert (await world.status())["started"] == 0
    await world.send({"id": "o-2"}, ids=["m-9"])
    await world.once()
    assert (await world.status())["started"] == 1
    await world.triggers.remove(NS, "orders-in")
    assert await world.triggers.status(NS, "orders-in") is None
    assert await world.h.scalar("SELECT count(*) FROM sagaflow_trigger_counts") == 0


async def test_suspended_and_unknown_triggers_consume_nothing(world: World) -> None:
    world.triggers.put(NS, "orders-in", "uid-1", spec(suspend=True))
    await world.send({"id": "o-1"})
    assert await world.once() == {}
    assert await world.once("nope") == {}
    assert await world.waiting() == 1


async def test_run_follows_put_and_remove(world: World) -> None:
    world.triggers.put(NS, "orders-in", "uid-1", spec())
    stop = asyncio.Event()
    running = asyncio.create_task(world.queues.run(stop))
    try:
        await world.send({"id": "o-1"})
        await asyncio.wait_for(world.launcher.started.wait(), 10)
        assert world.queues.consuming() == {(NS, "orders-in"): QUEUE}
        # Removed in the middle of its pass: the pass still settles what it received.
        await world.triggers.remove(NS, "orders-in")
        assert world.queues.consuming() == {}
        world.triggers.put(NS, "orders-in", "uid-1", spec(suspend=True))
        assert world.queues.consuming() == {}
        world.triggers.put(NS, "orders-in", "uid-1", spec(source={"queue": "elsewhere"}))
        assert world.queues.consuming() == {(NS, "orders-in"): "elsewhere"}
        await world.send({"id": "o-2"}, ids=["m-2"])
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    assert world.queues.consuming() == {}
    assert len(world.launcher.runs) == 1
    assert await world.waiting() == 1  # o-2: nobody consumes orders-in any more


# -- webhooks ---------------------------------------------------------------------------

HOOK = {
    "workflowRef": {"name": "orders"},
    "source": {
        "http": {
            "path": "shopify",
            "auth": {"hmacSecretRef": {"name": "hooks", "key": "shopify"}},
        }
    },
    "filter": "${{ body.kind != 'ping' }}",
    "input": {"order": "${{ body.id }}"},
}
SECRETS = FileSecrets(
    [
        {"kind": "ConfigMap", "metadata": {"name": "ignored"}},
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "hooks", "namespace": NS},
            "stringData": {"shopify": SECRET},
        },
    ]
)


def signed(body: bytes, **headers: str) -> dict[str, str]:
    return {"X-Signature-256": sign(SECRET.encode(), body), **headers}


async def test_a_webhook_starts_once_per_request_and_answers_every_case(world: World) -> None:
    world.triggers.put(NS, "shopify", "uid-h", TriggerSpec.model_validate(HOOK))
    hooks = Webhooks(world.triggers, SECRETS)
    body = b'{"id": "o-5"}'

    status, answer = await hooks.deliver(NS, "shopify", signed(body), body)
    assert status == 202 and answer["created"] is True
    name = answer["execution"]["name"]
    assert answer["execution"] == {"name": name, "namespace": NS}
    # The same request again (a replay, or the sender's retry): the same run.
    assert await hooks.deliver(NS, "shopify", signed(body), body) == (
        202,
        {"execution": {"name": name, "namespace": NS}, "created": False},
    )
    assert len(world.launcher.runs) == 1
    # An Idempotency-Key header decides instead of the body.
    keyed = signed(body, **{"Idempotency-Key": "delivery-2"})
    status, again = await hooks.deliver(NS, "shopify", keyed, body)
    assert status == 202 and again["created"] and again["execution"]["name"] != name
    assert world.launcher.calls[-1].idempotency_key == "trigger/uid-h/delivery-2"

    ping = b'{"kind": "ping"}'
    assert await hooks.deliver(NS, "shopify", signed(ping), ping) == (200, {"filtered": True})
    status, bad = await hooks.deliver(NS, "shopify", signed(b"{oops"), b"{oops")
    assert status == 400 and bad["error"]["reason"] == "MalformedMessage"
    assert bad["error"]["message"].startswith("body: is not JSON")
    status, refused = await hooks.deliver(NS, "shopify", signed(body), body + b" ")
    assert status == 401 and refused["error"]["reason"] == "SignatureMismatch"
    assert SECRET not in json.dumps(refused) and sign(SECRET.encode(), body + b" ") not in (
        json.dumps(refused)
    )
    status, missing = await hooks.deliver(NS, "github", signed(body), body)
    assert status == 404 and missing["error"]["reason"] == "NotFound"
    assert (await hooks.deliver("other", "shopify", signed(body), body))[0] == 404

    status_row = await world.status("shopify")
    assert (status_row["started"], status_row["duplicates"], status_row["filtered"]) == (2, 1, 1)
    assert status_row["deadLettered"] == 0  # nothing of a webhook is dead-lettered


async def test_a_webhook_without_its_secret_or_suspended_is_unavailable(world: World) -> None:
    other = HOOK | {
        "source": {
            "http": {"path": "stripe", "auth": {"bearerSecretRef": {"name": "x", "key": "y"}}}
        }
    }
    world.triggers.put(NS, "stripe", "uid-s", TriggerSpec.model_validate(other))
    hooks = Webhooks(world.triggers, SECRETS)
    status, answer = await hooks.deliver(NS, "stripe", {"Authorization": "Bearer y"}, b"{}")
    assert status == 503 and answer["error"]["reason"] == "SecretUnavailable"
    assert "x" not in answer["error"]["message"].split()

    world.triggers.put(NS, "shopify", "uid-h", TriggerSpec.model_validate(HOOK | {"suspend": True}))
    body = b'{"id": "o-5"}'
    status, answer = await hooks.deliver(NS, "shopify", signed(body), body)
    assert status == 503 and answer["error"]["reason"] == "Suspended"
    assert not world.launcher.calls
    with pytest.raises(WebhookPathInUseError, match="served by Trigger shop/shopify"):
        world.triggers.put(NS, "copy", "uid-c", TriggerSpec.model_validate(HOOK))


# -- the real start path ----------------------------------------------------------------

WAITS = WorkflowSpec.model_validate(
    {
        "signals": [{"name": "paid"}],
        "steps": [
            {"name": "work", "type": "svc.work", "input": {"order": "${{ input.order }}"}},
            {
                "name": "wait",
                "type": "sagaflow.waitForSignal",
                "dependsOn": ["work"],
                "input": {"signal": "paid", "timeout": "1h"},
            },
            {"name": "ship", "type": "svc.ship", "dependsOn": ["wait"]},
        ],
    }
)


async def test_through_the_orchestrator_a_message_starts_one_run_and_another_signals_it(
    world: World,
) -> None:
    h = world.h
    await h.orchestrator.apply_workflow(NS, "orders", WAITS)
    triggers = Triggers(h.pool, DirectLauncher(h.orchestrator), h.orchestrator, clock=h.clock)
    queues = QueueTriggers(triggers, h.bus)
    start = spec(
        input={"order": "${{ body.id }}"},
        idempotencyKey="${{ body.id }}",
        correlationKey="${{ body.id }}",
    )
    triggers.put(NS, "orders-in", "uid-1", start)
    await world.send({"id": "o-1"}, {"id": "o-1"}, ids=["a", "b"])
    assert dict(await queues.consume_once(NS, "orders-in")) == {"started": 1, "duplicate": 1}
    [(msg, cmd)] = await h.commands("svc")
    assert cmd.input == {"order": "o-1"}
    state = await _by_id(h, cmd.execution_id)
    assert state.correlation_key == "o-1"
    await h.reply(msg, completed(cmd, {}))
    await h.orchestrator.consume_once(max_wait=0)

    paid = TriggerSpec.model_validate(
        {
            "workflowRef": {"name": "orders"},
            "source": {"queue": "payments"},
            "action": "signal",
            "signal": "paid",
            "correlationKey": "${{ body.order }}",
            "input": {"amount": "${{ body.amount }}"},
        }
    )
    triggers.put(NS, "payments", "uid-2", paid)
    payment = OutgoingMessage("payments", "p-1", "p-1", b'{"order": "o-1", "amount": 12}')
    await h.bus.send([payment])
    assert dict(await queues.consume_once(NS, "payments")) == {"signalled": 1}
    await h.bus.send([payment])  # delivered again: applied once
    assert dict(await queues.consume_once(NS, "payments")) == {"duplicate": 1}
    waited = await _by_id(h, cmd.execution_id)
    assert waited.steps["wait"].output == {"amount": 12}
    assert waited.phase.value == "Running" and len(waited.signals) == 1
    # A payment for no running order is refused with the reason, not retried.
    await h.bus.send([OutgoingMessage("payments", "p-2", "p-2", b'{"order": "o-9"}')])
    assert dict(await queues.consume_once(NS, "payments")) == {"refused": 1}
    [letter] = await h.bus.dead_letters("payments")
    assert letter.reason == "SignalRefused" and "'o-9'" in letter.description
    status = await triggers.status(NS, "payments")
    assert status is not None
    assert (status.signalled, status.duplicates, status.dead_lettered) == (1, 1, 1)


async def _by_id(h: Harness, execution_id: str) -> Any:
    async with h.pool.acquire() as conn:
        return await h.store.get_execution_by_id(conn, execution_id)
