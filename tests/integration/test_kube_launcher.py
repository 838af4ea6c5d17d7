"""`KubeLauncher` against the in-memory API server, through the real `kubernetes` client.

What a schedule or trigger start leaves in the cluster (the Execution object, its
labels, annotations and owner), once per key however often it is asked, refused when
the key or the name is taken by a different request; which runs are still active;
a cancel as a spec change; Events and status of the Schedule and Trigger objects, and
the status as `kubectl get` prints it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kmock
import kubernetes
import pytest
import tests.support.kube as kube_support
from tests.support.kube import (
    EVENTS,
    EXECUTIONS,
    WORKFLOWS,
    ApiServer,
    KubeClient,
    running_api_server,
    write_kubeconfig,
)
from tests.support.kubectl import Kubectl

from sagaflow.core.trigger_specs import ScheduleStatus, TriggerStatus
from sagaflow.kube.api import ClientKubeApi
from sagaflow.kube.launcher import (
    CANCEL_REASON,
    IDEMPOTENCY_HASH_LABEL,
    IDEMPOTENCY_KEY,
    REQUEST_HASH,
    SCHEDULE_LABEL,
    TRACEPARENT,
    TRIGGER_LABEL,
    KubeLauncher,
    execution_body,
    idempotency_hash,
    label_value,
    patch_source_status,
    post_source_event,
    start_key_of,
)
from sagaflow.runtime.startpath import IdempotencyConflictError, Source, StartCall
from sagaflow.runtime.starts import NameInUseError, StartKey
from sagaflow.telemetry import tracing

pytestmark = pytest.mark.timeout(60)

NS = "team-a"
SCHEDULES = kmock.resource("sagaflow.io", "v1alpha1", "schedules")
TRIGGERS = kmock.resource("sagaflow.io", "v1alpha1", "triggers")
NIGHTLY = Source("schedule", "nightly", "uid-nightly")
ORDERS = Source("trigger", "orders-queue", "uid-orders")
Body = dict[str, Any]


@dataclass
class Cluster:
    api: ApiServer
    client: KubeClient
    kube: ClientKubeApi
    launcher: KubeLauncher

    def execution(self, name: str) -> Body:
        body = self.api.peek(EXECUTIONS, NS, name)
        assert body is not None, f"no Execution {name}"
        return body

    def executions(self) -> list[Body]:
        return self.api.bodies(EXECUTIONS)

    async def set_phase(self, name: str, phase: str) -> None:
        await self.client.patch(
            EXECUTIONS, NS, name, {"status": {"phase": phase}}, subresource="status"
        )


class Clock:
    """The API server's clock for creation times: one second apart in creation order
    (its own clock has second resolution, so runs started in one test would tie), or
    the seconds a test scripts for the next objects."""

    def __init__(self) -> None:
        self._ticks = itertools.count(100)
        self._scripted: list[int] = []

    def script(self, *seconds: int) -> None:
        self._scripted.extend(seconds)

    def __call__(self) -> str:
        second = self._scripted.pop(0) if self._scripted else next(self._ticks)
        return f"2026-01-01T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}Z"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(kube_support, "_now", clock)
    return clock


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_api_server() as api, KubeClient(api.url) as client:
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(write_kubeconfig(tmp_path, api.url, NS)),
            client_configuration=config,
        )
        kube = ClientKubeApi(kubernetes.client.ApiClient(configuration=config))
        for name in ("nightly-report", "order"):
            await client.create(WORKFLOWS, NS, workflow(name))
        yield Cluster(api, client, kube, KubeLauncher(kube))


def workflow(name: str) -> Body:
    return {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": {"steps": [{"name": "a", "type": "svc.a"}]},
    }


def tick(key: str = "2026-01-01T02:00:00Z", **extra: Any) -> StartCall:
    fields: dict[str, Any] = {
        "namespace": NS,
        "workflow": "nightly-report",
        "input": {"day": key[:10]},
        "idempotency_key": f"nightly/{key}",
        "source": NIGHTLY,
        **extra,
    }
    return StartCall(**fields)


# --- start: the object it creates -------------------------------------------------------


def test_a_start_in_a_trace_writes_its_traceparent_on_the_object() -> None:
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracing.incoming({"traceparent": caller}):
        traced = execution_body(tick(), "nightly-1")
    plain = execution_body(tick(), "nightly-1")
    annotations = traced["metadata"]["annotations"]
    assert annotations[TRACEPARENT] == caller
    assert TRACEPARENT not in plain["metadata"]["annotations"]
    # The trace is not part of the request: a repeat from another trace is the same start.
    assert annotations[REQUEST_HASH] == plain["metadata"]["annotations"][REQUEST_HASH]


async def test_a_start_creates_the_execution_object_marked_with_its_source(
    cluster: Cluster,
) -> None:
    call = tick(correlation_key="day-2026-01-01", suspend=True)
    name, created = await cluster.launcher.start(call)
    assert (name, created) == (call.run_name(), True)
    body = cluster.execution(name)
    assert body["apiVersion"] == "sagaflow.io/v1alpha1" and body["kind"] == "Execution"
    assert body["spec"] == {
        "workflowRef": {"name": "nightly-report"},
        "input": {"day": "2026-01-01"},
        "correlationKey": "day-2026-01-01",
        "suspend": True,
    }
    meta = body["metadata"]
    assert meta["labels"] == {
        SCHEDULE_LABEL: "nightly",
        IDEMPOTENCY_HASH_LABEL: idempotency_hash("nightly/2026-01-01T02:00:00Z"),
    }
    assert meta["annotations"] == {
        IDEMPOTENCY_KEY: "nightly/2026-01-01T02:00:00Z",
        REQUEST_HASH: call.request_hash(),
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "sagaflow.io/v1alpha1",
            "kind": "Schedule",
            "name": "nightly",
            "uid": "uid-nightly",
            "controller": True,
            "blockOwnerDeletion": False,
        }
    ]
    assert start_key_of(body) == StartKey(
        "nightly/2026-01-01T02:00:00Z", call.request_hash(), "schedule", "nightly", "uid-nightly"
    )


async def test_a_trigger_start_is_labelled_and_owned_by_the_trigger(cluster: Cluster) -> None:
    call = StartCall(NS, "order", {"id": 7}, idempotency_key="msg-7", source=ORDERS)
    name, _ = await cluster.launcher.start(call)
    meta = cluster.execution(name)["metadata"]
    assert meta["labels"][TRIGGER_LABEL] == "orders-queue"
    assert SCHEDULE_LABEL not in meta["labels"]
    assert [(o["kind"], o["uid"]) for o in meta["ownerReferences"]] == [("Trigger", "uid-orders")]
    assert cluster.execution(name)["spec"] == {"workflowRef": {"name": "order"}, "input": {"id": 7}}


async def test_an_api_start_without_key_or_name_gets_a_fresh_name_each_time(
    cluster: Cluster,
) -> None:
    call = StartCall(NS, "order", {"id": 1})
    first, created_first = await cluster.launcher.start(call)
    second, created_second = await cluster.launcher.start(call)
    assert created_first and created_second and first != second
    assert first.startswith("order-") and second.startswith("order-")
    body = cluster.execution(first)
    assert "ownerReferences" not in body["metadata"]
    assert body["metadata"]["labels"] == {}
    assert start_key_of(body) is None


async def test_an_unknown_workflow_is_a_lookup_error_and_creates_nothing(
    cluster: Cluster,
) -> None:
    with pytest.raises(LookupError, match="team-a/missing"):
        await cluster.launcher.start(tick(workflow="missing"))
    assert cluster.executions() == []


# --- start: once per key ------------------------------------------------------------------


async def test_a_repeat_returns_the_run_that_exists(cluster: Cluster) -> None:
    name, created = await cluster.launcher.start(tick())
    again = await cluster.launcher.start(tick())
    assert created and again == (name, False)
    assert [e["metadata"]["name"] for e in cluster.executions()] == [name]


async def test_a_repeat_of_a_named_run_is_answered_from_the_existing_object(
    cluster: Cluster,
) -> None:
    # The same name and key, the object already there: the 409 path, then compared.
    call = tick(name="report-jan-1")
    assert await cluster.launcher.start(call) == ("report-jan-1", True)
    assert await cluster.launcher.start(call) == ("report-jan-1", False)
    assert len(cluster.executions()) == 1


async def test_a_different_request_under_a_used_key_is_refused(cluster: Cluster) -> None:
    name, _ = await cluster.launcher.start(tick())
    changed = tick(input={"day": "another"})
    with pytest.raises(IdempotencyConflictError) as info:
        await cluster.launcher.start(changed)
    assert (info.value.namespace, info.value.holder) == (NS, name)
    assert len(cluster.executions()) == 1


async def test_a_key_reused_under_another_name_is_found_by_its_label(cluster: Cluster) -> None:
    await cluster.launcher.start(tick(name="report-a"))
    for other in (tick(name="report-b"), tick()):  # another name, or the key's own name
        with pytest.raises(IdempotencyConflictError) as info:
            await cluster.launcher.start(other)
        assert info.value.holder == "report-a"
    assert [e["metadata"]["name"] for e in cluster.executions()] == ["report-a"]


async def test_a_name_held_by_an_object_of_another_request_is_refused(cluster: Cluster) -> None:
    # Written by a person: no key, no request hash.
    await cluster.client.create(
        EXECUTIONS,
        NS,
        {
            "apiVersion": "sagaflow.io/v1alpha1",
            "kind": "Execution",
            "metadata": {"name": "report-a"},
            "spec": {"workflowRef": {"name": "nightly-report"}},
        },
    )
    for call in (tick(name="report-a"), StartCall(NS, "nightly-report", name="report-a")):
        with pytest.raises(NameInUseError, match="team-a/report-a"):
            await cluster.launcher.start(call)


async def test_a_keyless_named_repeat_of_the_same_request_is_not_started_twice(
    cluster: Cluster,
) -> None:
    call = StartCall(NS, "order", {"id": 1}, name="order-1")
    assert await cluster.launcher.start(call) == ("order-1", True)
    assert await cluster.launcher.start(call) == ("order-1", False)
    with pytest.raises(NameInUseError):
        await cluster.launcher.start(StartCall(NS, "order", {"id": 2}, name="order-1"))


async def test_a_long_source_name_still_makes_a_valid_label(cluster: Cluster) -> None:
    long = Source("schedule", "n" * 40 + "-" + "x" * 100, "uid-long")
    value = label_value(long.name)
    assert len(value) <= 63 and value[0].isalnum() and value[-1].isalnum()
    assert label_value(long.name) == value and label_value("short") == "short"
    name, _ = await cluster.launcher.start(tick(source=long))
    assert cluster.execution(name)["metadata"]["labels"][SCHEDULE_LABEL] == value
    assert await cluster.launcher.active(NS, long) == [name]


# --- active and cancel --------------------------------------------------------------------


@pytest.mark.usefixtures("clock")
async def test_active_lists_the_sources_unfinished_runs_oldest_first(cluster: Cluster) -> None:
    names = [
        (await cluster.launcher.start(tick(f"2026-01-0{day}T02:00:00Z")))[0] for day in range(1, 8)
    ]
    hourly = Source("schedule", "hourly", "uid-h")
    other, _ = await cluster.launcher.start(tick(idempotency_key="hourly/1", source=hourly))
    phases = {
        names[1]: "Completed",
        names[2]: "Failed",
        names[3]: "Compensated",
        names[4]: "Cancelled",
        names[5]: "CompensationFailed",
        names[6]: "Suspended",
    }
    for name, phase in phases.items():
        await cluster.set_phase(name, phase)
    # names[0] has no status yet (the operator has not started it): it is active.
    assert await cluster.launcher.active(NS, NIGHTLY) == [names[0], names[6]]
    await cluster.set_phase(names[0], "Running")
    assert await cluster.launcher.active(NS, NIGHTLY) == [names[0], names[6]]
    assert await cluster.launcher.active(NS, hourly) == [other]
    assert await cluster.launcher.active(NS, Source("trigger", "nightly")) == []
    assert await cluster.launcher.active("elsewhere", NIGHTLY) == []


async def test_active_is_oldest_first_whatever_the_names_or_the_list_order(
    cluster: Cluster, clock: Clock
) -> None:
    # Created (and listed) c, a, b; created at 2, 3, 1 seconds: oldest first is b, c, a.
    clock.script(2, 3, 1)
    for name in ("run-c", "run-a", "run-b"):
        await cluster.launcher.start(tick(name=name, idempotency_key=name))
    listed = await cluster.kube.list("executions", NS, label_selector=f"{SCHEDULE_LABEL}=nightly")
    assert [e["metadata"]["name"] for e in listed] == ["run-c", "run-a", "run-b"]
    assert await cluster.launcher.active(NS, NIGHTLY) == ["run-b", "run-c", "run-a"]


async def test_of_two_objects_under_one_key_the_oldest_holds_it(
    cluster: Cluster, clock: Clock
) -> None:
    # Two calls at one moment under one key and two names can both create an object.
    clock.script(5, 4)
    for name in ("report-late", "report-early"):
        body = execution_body(tick(name=name), name)
        await cluster.client.create(EXECUTIONS, NS, body)
    with pytest.raises(IdempotencyConflictError) as info:
        await cluster.launcher.start(tick(name="report-third"))
    assert info.value.holder == "report-early"
    assert await cluster.launcher.start(tick(name="report-early")) == ("report-early", False)


async def test_active_leaves_out_runs_of_an_earlier_source_of_the_same_name(
    cluster: Cluster,
) -> None:
    old, _ = await cluster.launcher.start(tick(source=Source("schedule", "nightly", "uid-old")))
    new, _ = await cluster.launcher.start(tick("2026-02-01T02:00:00Z"))
    assert await cluster.launcher.active(NS, NIGHTLY) == [new]
    assert sorted(await cluster.launcher.active(NS, Source("schedule", "nightly"))) == sorted(
        [old, new]
    )


async def test_active_refuses_a_source_that_starts_no_runs(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="'api'"):
        await cluster.launcher.active(NS, Source("api"))


async def test_cancel_sets_spec_cancel_and_says_why(cluster: Cluster) -> None:
    name, _ = await cluster.launcher.start(tick())
    await cluster.launcher.cancel(NS, name, "overlap: CancelPrevious for the 03:00 tick")
    body = cluster.execution(name)
    assert body["spec"]["cancel"] is True
    assert body["spec"]["input"] == {"day": "2026-01-01"}  # the rest of the spec kept
    assert body["metadata"]["annotations"][CANCEL_REASON].startswith("overlap: CancelPrevious")
    await cluster.launcher.cancel(NS, "gone", "nothing to cancel")  # quietly: it is gone
    assert cluster.api.peek(EXECUTIONS, NS, "gone") is None


# --- Events and status of Schedules and Triggers -------------------------------------------


def schedule(name: str) -> Body:
    return {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": "Schedule",
        "metadata": {"name": name},
        "spec": {"workflowRef": {"name": "nightly-report"}, "cron": "0 2 * * *"},
    }


def trigger(name: str) -> Body:
    return {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": "Trigger",
        "metadata": {"name": name},
        "spec": {"workflowRef": {"name": "order"}, "source": {"queue": "orders"}},
    }


async def test_events_about_a_source_are_posted_once_per_key(cluster: Cluster) -> None:
    at = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
    posted = [
        await post_source_event(
            cluster.kube,
            NS,
            NIGHTLY,
            reason="TickSkipped",
            message="a run of the previous tick is still active",
            at=at,
            instance="operator-0",
            warning=True,
            key="2026-01-01T03:00:00Z",
        )
        for _ in range(2)
    ]
    assert posted == [True, False]
    await post_source_event(
        cluster.kube, NS, ORDERS, reason="MessageFiltered", message="filtered", at=at, instance="i"
    )
    events = {e["reason"]: e for e in cluster.api.bodies(EVENTS)}
    assert set(events) == {"TickSkipped", "MessageFiltered"}
    skipped = events["TickSkipped"]
    assert skipped["involvedObject"] == {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": "Schedule",
        "name": "nightly",
        "namespace": NS,
        "uid": "uid-nightly",
    }
    assert skipped["type"] == "Warning"
    # The client reads the Event into its model and writes the time back in its own form.
    assert datetime.fromisoformat(skipped["firstTimestamp"].replace("Z", "+00:00")) == at
    assert skipped["metadata"]["name"].startswith("nightly.")
    assert events["MessageFiltered"]["involvedObject"]["kind"] == "Trigger"
    assert events["MessageFiltered"]["type"] == "Normal"


async def test_source_status_is_written_whole_from_a_model_and_merged_from_a_mapping(
    cluster: Cluster,
) -> None:
    await cluster.client.create(SCHEDULES, NS, schedule("nightly"))
    status = ScheduleStatus(
        last_schedule_time="2026-01-01T02:00:00Z",
        next_schedule_time="2026-01-02T02:00:00Z",
        active=("nightly-report-1",),
        started=1,
    )
    await patch_source_status(cluster.kube, NS, NIGHTLY, status)
    stored = cluster.api.peek(SCHEDULES, NS, "nightly")
    assert stored is not None
    assert ScheduleStatus.model_validate(stored["status"]) == status
    # A model is written whole: the finished run leaves `active`, the unset time goes.
    await patch_source_status(cluster.kube, NS, NIGHTLY, ScheduleStatus(started=1, skipped=2))
    stored = cluster.api.peek(SCHEDULES, NS, "nightly")
    assert stored is not None and stored["status"]["active"] == []
    assert "lastScheduleTime" not in stored["status"]
    await patch_source_status(cluster.kube, NS, NIGHTLY, {"missed": 3})
    stored = cluster.api.peek(SCHEDULES, NS, "nightly")
    assert stored is not None and stored["status"]["skipped"] == 2
    assert stored["status"]["missed"] == 3
    # A trigger's status goes to the trigger; a source that is gone is no error.
    await patch_source_status(cluster.kube, NS, ORDERS, TriggerStatus(started=4))
    await cluster.client.create(TRIGGERS, NS, trigger("orders-queue"))
    await patch_source_status(cluster.kube, NS, ORDERS, TriggerStatus(started=5, filtered=1))
    stored = cluster.api.peek(TRIGGERS, NS, "orders-queue")
    assert stored is not None
    assert TriggerStatus.model_validate(stored["status"]) == TriggerStatus(started=5, filtered=1)
    assert "status" not in (cluster.api.peek(SCHEDULES, NS, "orders-queue") or {})


def table(stdout: str) -> list[list[str]]:
    """kubectl's default output as rows of cells (columns split on two or more spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]


async def test_kubectl_shows_what_the_operator_writes_of_schedules_and_triggers(
    cluster: Cluster, tmp_path: Path
) -> None:
    nightly_schedule = schedule("nightly")
    nightly_schedule["spec"].update(timezone="Europe/Amsterdam", suspend=True)
    await cluster.client.create(SCHEDULES, NS, nightly_schedule)
    every = schedule("every-15m")
    del every["spec"]["cron"]
    every["spec"]["interval"] = "15m"
    await cluster.client.create(SCHEDULES, NS, every)
    await cluster.client.create(TRIGGERS, NS, trigger("orders-queue"))
    status = ScheduleStatus(next_schedule_time="2026-01-02T02:00:00Z", active=("nightly-1",))
    await patch_source_status(cluster.kube, NS, NIGHTLY, status)
    await patch_source_status(cluster.kube, NS, ORDERS, TriggerStatus(started=3, filtered=1))
    kubectl = Kubectl(cluster.api.url, tmp_path / "kubectl", namespace=NS)

    rows = table((await kubectl.run("get", "sfs")).stdout)
    assert rows[0] == [
        "NAME", "WORKFLOW", "SCHEDULE", "TIMEZONE", "SUSPEND", "LAST SCHEDULE", "NEXT",
        "ACTIVE", "AGE",
    ]  # fmt: skip
    by_name = {row[0]: row for row in rows[1:]}
    nightly = ["nightly", "nightly-report", "0 2 * * *", "Europe/Amsterdam", "true"]
    # No last schedule yet: that blank cell vanishes, the next tick and the run follow.
    assert by_name["nightly"][:7] == [*nightly, "2026-01-02T02:00:00Z", '["nightly-1"]']
    assert by_name["every-15m"][:3] == ["every-15m", "nightly-report", "15m"]

    rows = table((await kubectl.run("get", "sft")).stdout)
    columns = ["NAME", "WORKFLOW", "QUEUE", "WEBHOOK", "ACTION", "STARTED", "FILTERED", "AGE"]
    assert rows[0] == columns
    # Blank cells (no webhook, the default action) vanish when split on spaces.
    assert rows[1][:5] == ["orders-queue", "order", "orders", "3", "1"]
