"""`sagaflow operator` end to end: the real command against the in-memory API server.

The operator runs as a subprocess (as in a pod) with a kubeconfig pointing at the
API server of `tests/support/kube.py`, its state in a fresh Postgres database; a
`sagaflow runner` subprocess serves the sample's step types. The tests act as a
user would, by writing objects, and read what the operator wrote back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import kmock
import pytest
import yaml
from operator_proc import ROOT, Process, base_env, free_port, running
from tests.support.kube import (
    EVENTS,
    EXECUTIONS,
    WORKFLOWS,
    ApiServer,
    KubeClient,
    is_watch_of,
    running_api_server,
    write_kubeconfig,
)
from tests.support.kubectl import Kubectl

from sagaflow.kube.events import COMPONENT

NS = "team-a"
VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}
SAMPLE = ROOT / "samples" / "order-fulfilment.yaml"
Body = dict[str, Any]


class Cluster:
    """The API server, a client, the database and the operator/runner processes."""

    def __init__(self, api: ApiServer, client: KubeClient, dsn: str, tmp: Path) -> None:
        self.api = api
        self.client = client
        self.dsn = dsn
        self.health_port = free_port()
        kubeconfig = write_kubeconfig(tmp, api.url, NS)
        env = base_env(
            dsn,
            tmp,
            KUBECONFIG=str(kubeconfig),
            SAGAFLOW_WATCH_NAMESPACES=NS,
            SAGAFLOW_HEALTH_PORT=str(self.health_port),
            SAGAFLOW_MIRROR_POLL_SECONDS="0.2",
            SAGAFLOW_WORKFLOW_WAIT_SECONDS="0.3",
        )
        self.operator = Process("operator", ["operator"], env, tmp / "operator.log")
        runner_args = ["runner", "--module", str(ROOT / "samples" / "order_runners.py")]
        self.runner = Process("runner", runner_args, env, tmp / "runner.log")

    async def operator_watching(self) -> None:
        """Start the operator and wait until kopf watches Executions."""
        before = len(self.api._requests)  # only watches opened by this start count
        await self.operator.start()
        await self.api.wait_until(
            lambda: any(is_watch_of(EXECUTIONS)(r) for r in list(self.api._requests)[before:]),
            within=30,
        )

    async def apply(self, resource: Any, body: Body) -> Body:
        return await self.client.create(resource, NS, body)

    async def wait_status(
        self, resource: Any, name: str, predicate: Any, within: float = 30
    ) -> Body:
        body = await self.api.wait_for(
            resource,
            NS,
            name,
            lambda b: b is not None and predicate(b.get("status") or {}),
            within=within,
        )
        assert body is not None
        return body

    def history_events(self) -> list[Body]:
        """The Events the mirror posted from history (kopf's warnings are not among them)."""
        return [
            e for e in self.api.bodies(EVENTS) if e.get("source", {}).get("component") == COMPONENT
        ]

    def events_of(self, name: str) -> list[Body]:
        """An Execution's history Events in history order (their names end in the row's
        seq; the mirror posts them side by side, so creation order is not history order)."""
        mine = [e for e in self.history_events() if e["involvedObject"]["name"] == name]
        return sorted(mine, key=lambda e: int(e["metadata"]["name"].rsplit(".", 1)[-1]))


@pytest.fixture
async def cluster(pg_database: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_api_server() as api, KubeClient(api.url) as client:
        c = Cluster(api, client, pg_database, tmp_path)
        async with running(c.operator, c.runner):
            await api.wait_for_request(is_watch_of(EXECUTIONS), within=30)
            yield c


def sample_documents() -> list[Body]:
    return [d for d in yaml.safe_load_all(SAMPLE.read_text()) if d]


def workflow(name: str, steps: list[Body], **spec: Any) -> Body:
    return {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": {"steps": steps, **spec},
    }


def execution(name: str, workflow: str, **spec: Any) -> Body:
    return {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": "Execution",
        "metadata": {"name": name},
        "spec": {"workflowRef": {"name": workflow}, **spec},
    }


def condition(status: Body, kind: str) -> Body:
    found = [c for c in status.get("conditions", ()) if c.get("type") == kind]
    assert found, f"no {kind} condition in {status}"
    return found[0]


def phase_is(*phases: str) -> Any:
    return lambda status: status.get("phase") in phases


async def test_the_sample_runs_to_completed_with_its_status_mirrored(cluster: Cluster) -> None:
    for doc in sample_documents():
        kind = WORKFLOWS if doc["kind"] == "Workflow" else EXECUTIONS
        await cluster.apply(kind, doc)

    wf = await cluster.wait_status(WORKFLOWS, "order-fulfilment", lambda s: "version" in s)
    assert wf["status"]["version"] == 1
    assert wf["status"]["observedGeneration"] == wf["metadata"]["generation"]
    ready = condition(wf["status"], "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Accepted")

    done = await cluster.wait_status(EXECUTIONS, "order-1001", phase_is("Completed", "Failed"))
    status = done["status"]
    assert status["phase"] == "Completed", status
    assert status["workflowVersion"] == 1
    assert status["observedGeneration"] == done["metadata"]["generation"]
    assert condition(status, "Succeeded")["status"] == "True"
    assert condition(status, "Ready")["status"] == "True"
    steps = {s["name"]: s for s in status["steps"]}
    assert set(steps) == {"validate", "reserve-inventory", "charge-payment", "ship", "confirm"}
    assert all(s["phase"] == "Succeeded" for s in steps.values())
    assert steps["charge-payment"]["attempts"] == 2  # the sample's flaky gateway
    assert status["output"]["tracking"] == steps["confirm"]["output"]["trackingNumber"]
    assert "currentSteps" not in status  # removed once nothing runs

    reasons = [e["reason"] for e in cluster.events_of("order-1001")]
    for reason in ("ExecutionStarted", "StepDispatched", "StepSucceeded", "StepRetrying"):
        assert reason in reasons
    assert reasons[-1] == "ExecutionCompleted"
    retry = next(e for e in cluster.events_of("order-1001") if e["reason"] == "StepRetrying")
    assert retry["type"] == "Warning"
    assert "charge-payment" in retry["message"] and "attempt 2" in retry["message"]
    assert all(
        e["involvedObject"]["uid"] == done["metadata"]["uid"]
        for e in cluster.events_of("order-1001")
    )

    other = await cluster.wait_status(EXECUTIONS, "order-1002", phase_is("Completed", "Failed"))
    assert other["status"]["phase"] == "Completed"

    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(f"http://127.0.0.1:{cluster.health_port}{path}") as r:
                assert r.status == 200, (path, await r.text())


async def test_an_invalid_workflow_is_not_ready_and_names_the_field(cluster: Cluster) -> None:
    steps = [
        {"name": "a", "type": "sagaflow.pass"},
        {"name": "b", "type": "sagaflow.pass", "dependsOn": ["nope"]},
    ]
    await cluster.apply(WORKFLOWS, workflow("broken", steps))
    wf = await cluster.wait_status(WORKFLOWS, "broken", lambda s: "conditions" in s)
    ready = condition(wf["status"], "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.steps[1].dependsOn[0]" in ready["message"] and "nope" in ready["message"]
    assert "version" not in wf["status"]

    # An Execution of it waits, saying why, and starts once the Workflow is fixed.
    await cluster.apply(EXECUTIONS, execution("early", "broken"))
    waiting = await cluster.wait_status(
        EXECUTIONS, "early", lambda s: "WorkflowNotReady" in str(s.get("conditions"))
    )
    assert waiting["status"]["phase"] == "Pending"

    fixed = [steps[0], {**steps[1], "dependsOn": ["a"]}]
    await cluster.client.patch(WORKFLOWS, NS, "broken", {"spec": {"steps": fixed}})
    wf = await cluster.wait_status(WORKFLOWS, "broken", lambda s: s.get("version") == 1)
    assert condition(wf["status"], "Ready")["status"] == "True"
    done = await cluster.wait_status(EXECUTIONS, "early", phase_is("Completed"))
    assert done["status"]["workflowVersion"] == 1

    # A bad edit leaves version 1 serving: a new Execution still runs on it.
    await cluster.client.patch(
        WORKFLOWS, NS, "broken", {"spec": {"steps": [{**steps[0], "dependsOn": ["a"]}]}}
    )
    wf = await cluster.wait_status(
        WORKFLOWS, "broken", lambda s: condition(s, "Ready")["status"] == "False"
    )
    assert wf["status"]["version"] == 1
    assert wf["status"]["observedGeneration"] == wf["metadata"]["generation"]
    assert "spec.steps[0].dependsOn[0]" in condition(wf["status"], "Ready")["message"]
    await cluster.apply(EXECUTIONS, execution("late", "broken"))
    late = await cluster.wait_status(EXECUTIONS, "late", phase_is("Completed"))
    assert late["status"]["workflowVersion"] == 1
    warnings = [
        e
        for e in cluster.api.bodies(EVENTS)
        if e.get("involvedObject", {}).get("kind") == "Workflow" and e.get("type") == "Warning"
    ]
    assert any("spec.steps[1].dependsOn[0]" in e["message"] for e in warnings)
    assert cluster.operator.running


async def test_a_failing_execution_shows_the_error_and_events(cluster: Cluster) -> None:
    # The sample's gateway times out once, then declines amounts over its limit.
    steps = [
        {"name": "prepare", "type": "sagaflow.pass"},
        {
            "name": "charge",
            "type": "payments.charge",
            "dependsOn": ["prepare"],
            "input": {"customer": "ada", "amount": 20000},
            "retry": {"maxAttempts": 3, "initialInterval": "100ms"},
        },
    ]
    await cluster.apply(WORKFLOWS, workflow("doomed", steps))
    await cluster.apply(EXECUTIONS, execution("doomed-1", "doomed"))
    body = await cluster.wait_status(EXECUTIONS, "doomed-1", phase_is("Failed"))
    status = body["status"]
    assert status["error"]["type"] == "CardDeclined"
    assert "amount over card limit" in status["error"]["message"]
    succeeded = condition(status, "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("False", "Failed")
    assert condition(status, "Ready")["status"] == "False"
    charge = next(s for s in status["steps"] if s["name"] == "charge")
    assert (charge["phase"], charge["attempts"]) == ("Failed", 2)

    events = cluster.events_of("doomed-1")
    by_reason = {e["reason"]: e for e in events}
    assert by_reason["StepRetrying"]["type"] == "Warning"
    assert by_reason["StepFailed"]["type"] == "Warning"
    assert "CardDeclined" in by_reason["StepFailed"]["message"]
    assert by_reason["ExecutionFailed"]["type"] == "Warning"
    assert events[-1]["reason"] == "ExecutionFailed"


async def test_deleting_an_execution_cancels_it_and_keeps_its_history(cluster: Cluster) -> None:
    steps = [
        {"name": "hold", "type": "sagaflow.wait", "input": {"duration": "1h"}},
        {"name": "after", "type": "sagaflow.pass", "dependsOn": ["hold"]},
    ]
    await cluster.apply(WORKFLOWS, workflow("slow", steps))
    await cluster.apply(EXECUTIONS, execution("slow-1", "slow"))
    body = await cluster.wait_status(
        EXECUTIONS, "slow-1", lambda s: s.get("currentSteps") == ["hold"]
    )
    uid = body["metadata"]["uid"]
    await cluster.client.delete(EXECUTIONS, NS, "slow-1")
    await cluster.api.wait_for(EXECUTIONS, NS, "slow-1", lambda b: b is None, within=30)

    conn = await asyncpg.connect(cluster.dsn)
    try:
        row = await conn.fetchrow(
            "SELECT phase, released_at FROM sagaflow_executions WHERE execution_id=$1", uid
        )
        history = await conn.fetch(
            # Transition rows record each fact and its cause for `history --at`.
            "SELECT kind, step FROM sagaflow_history WHERE execution_id=$1 "
            "AND kind <> 'Transition' ORDER BY seq",
            uid,
        )
        timers = await conn.fetchval(
            "SELECT count(*) FROM sagaflow_timers WHERE execution_id=$1", uid
        )
    finally:
        await conn.close()
    assert row["phase"] == "Cancelled" and row["released_at"] is not None
    kinds = [r["kind"] for r in history]
    assert kinds[0] == "ExecutionStarted" and kinds[-1] == "ExecutionCancelled"
    assert "after" not in {r["step"] for r in history}
    assert timers == 0  # the wait's timer is gone: nothing will dispatch `after`

    # The name is free again: a new object of that name is a new run.
    await cluster.apply(EXECUTIONS, execution("slow-1", "slow"))
    again = await cluster.wait_status(EXECUTIONS, "slow-1", lambda s: "currentSteps" in s)
    assert again["metadata"]["uid"] != uid


async def test_finished_executions_are_deleted_after_their_ttl(cluster: Cluster) -> None:
    steps = [{"name": "only", "type": "sagaflow.pass"}]
    await cluster.apply(WORKFLOWS, workflow("quick", steps, ttlSecondsAfterFinished=0))
    await cluster.apply(EXECUTIONS, execution("gone", "quick"))
    await cluster.apply(EXECUTIONS, execution("kept", "quick", ttlSecondsAfterFinished=3600))
    await cluster.api.wait_for(EXECUTIONS, NS, "gone", lambda b: b is None, within=30)
    kept = await cluster.wait_status(EXECUTIONS, "kept", phase_is("Completed"))
    assert kept["metadata"].get("deletionTimestamp") is None
    conn = await asyncpg.connect(cluster.dsn)
    try:
        phase = await conn.fetchval(
            "SELECT phase FROM sagaflow_executions WHERE name='gone' AND released_at IS NOT NULL"
        )
    finally:
        await conn.close()
    assert phase == "Completed"  # the history outlives the object


async def test_an_operator_restart_mid_execution_resumes_it(cluster: Cluster) -> None:
    steps = [
        {"name": "first", "type": "sagaflow.pass"},
        {
            "name": "pause",
            "type": "sagaflow.wait",
            "dependsOn": ["first"],
            "input": {"duration": "1s"},
        },
        {"name": "last", "type": "sagaflow.pass", "dependsOn": ["pause"]},
    ]
    await cluster.apply(WORKFLOWS, workflow("paused", steps))
    await cluster.apply(EXECUTIONS, execution("paused-1", "paused"))
    await cluster.wait_status(EXECUTIONS, "paused-1", lambda s: s.get("currentSteps") == ["pause"])
    await cluster.operator.kill()
    # Created while no operator runs: found when it comes back.
    await cluster.apply(EXECUTIONS, execution("paused-2", "paused"))
    await cluster.operator_watching()
    for name in ("paused-1", "paused-2"):
        body = await cluster.wait_status(EXECUTIONS, name, phase_is("Completed", "Failed"))
        assert body["status"]["phase"] == "Completed"
        assert [s["phase"] for s in body["status"]["steps"]] == ["Succeeded"] * 3
    reasons = [e["reason"] for e in cluster.events_of("paused-1")]
    assert reasons.count("ExecutionStarted") == 1 and reasons[-1] == "ExecutionCompleted"


async def many_runs(cluster: Cluster, count: int) -> list[Body]:
    for doc in sample_documents():
        if doc["kind"] == "Workflow":
            await cluster.apply(WORKFLOWS, doc)
    template = next(d for d in sample_documents() if d["kind"] == "Execution")
    names = [f"order-{i}" for i in range(count)]
    for name in names:
        await cluster.apply(EXECUTIONS, {**template, "metadata": {"name": name}})
    return [
        await cluster.wait_status(EXECUTIONS, name, phase_is("Completed", "Failed"), within=60)
        for name in names
    ]


def second_operator(cluster: Cluster, tmp: Path, **env: str) -> Process:
    extra = {**cluster.operator.env, "SAGAFLOW_HEALTH_PORT": str(free_port()), **env}
    return Process("operator-2", ["operator"], extra, tmp / "operator-2.log")


async def test_two_operator_replicas_run_each_execution_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with running(second_operator(cluster, tmp_path)):
        done = await many_runs(cluster, 6)
    assert all(b["status"]["phase"] == "Completed" for b in done)
    conn = await asyncpg.connect(cluster.dsn)
    try:
        runs = await conn.fetchval("SELECT count(*) FROM sagaflow_executions")
        posted = await conn.fetchval(
            # Transition rows (a fact and its cause) are not posted as Events.
            "SELECT count(*) FROM sagaflow_history "
            "WHERE kind NOT IN ('MessageIgnored', 'Transition')"
        )
    finally:
        await conn.close()
    assert runs == 6  # both replicas saw every object; each started once
    events = cluster.history_events()
    assert len(events) == posted  # every transition posted once, none twice


PEERINGS = kmock.resource("kopf.dev", "v1", "kopfpeerings")


async def test_with_a_peering_object_one_replica_runs_the_handlers(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.api.resources[PEERINGS] = kmock.ResourceInfo(
        namespaced=True, kind="KopfPeering", singular="kopfpeering", verbs=VERBS
    )
    await cluster.apply(
        PEERINGS,
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "sagaflow"}},
    )
    await cluster.operator.stop()
    # Each replica serves /metrics (on the API port), its `sagaflow_leader` sampled often.
    high_port, low_port = free_port(), free_port()
    peered = {"SAGAFLOW_PEERING_NAME": "sagaflow", "SAGAFLOW_METRICS_INTERVAL": "0.2"}
    cluster.operator.env.update(
        peered, SAGAFLOW_PEERING_PRIORITY="100", SAGAFLOW_API_PORT=str(high_port)
    )
    low = second_operator(
        cluster, tmp_path, SAGAFLOW_PEERING_PRIORITY="50", SAGAFLOW_API_PORT=str(low_port), **peered
    )
    await cluster.operator_watching()
    async with running(low):
        # kopf starts a peered operator paused until it has read the peering object:
        # the lower priority never runs a handler while the higher one lives.
        peering = await cluster.api.wait_for(
            PEERINGS,
            NS,
            "sagaflow",
            lambda b: b is not None and len(b.get("status") or {}) == 2,
            within=30,
        )
        assert sorted(p["priority"] for p in peering["status"].values()) == [50, 100]
        done = await many_runs(cluster, 3)
        assert all(b["status"]["phase"] == "Completed" for b in done)
        assert "Handler" not in low.output()  # paused: the higher priority ran them all
        assert await leader_gauge(high_port, 1.0) and await leader_gauge(low_port, 0.0)
        await cluster.operator.stop()  # the leader goes: the other takes over
        order = next(d for d in sample_documents() if d["kind"] == "Execution")["spec"]["input"]
        await cluster.apply(EXECUTIONS, execution("after", "order-fulfilment", input=order))
        body = await cluster.wait_status(EXECUTIONS, "after", phase_is("Completed", "Failed"))
        assert body["status"]["phase"] == "Completed"
        assert "Resuming operations" in low.output()
        assert await leader_gauge(low_port, 1.0)


async def leader_gauge(port: int, expected: float, within: float = 30) -> bool:
    """Whether the replica on `port` comes to report `sagaflow_leader` as `expected`."""
    line = f"sagaflow_leader {expected}"
    async with aiohttp.ClientSession() as http, asyncio.timeout(within):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    if line in (await r.text()).splitlines():
                        return True
            await asyncio.sleep(0.1)  # polling a process's endpoint: no event to wait on


async def test_kubectl_shows_where_an_execution_is_and_why(
    cluster: Cluster, tmp_path: Path
) -> None:
    kubectl = Kubectl(cluster.api.url, tmp_path / "kubectl", namespace=NS)
    await kubectl.run("apply", "-f", str(ROOT / "samples"))
    await kubectl.run(
        "wait",
        "--for=jsonpath={.status.phase}=Completed",
        "execution/order-1001",
        "--timeout=60s",
    )
    # A charge the gateway times out on, retried only after an hour: it waits, visibly.
    steps = [
        {
            "name": "charge",
            "type": "payments.charge",
            "input": {"customer": "ada", "amount": 5},
            "retry": {"maxAttempts": 3, "initialInterval": "1h"},
        }
    ]
    await cluster.apply(WORKFLOWS, workflow("patient", steps))
    await cluster.apply(EXECUTIONS, execution("patient-1", "patient"))
    await cluster.wait_status(EXECUTIONS, "patient-1", lambda s: "nextRetryAt" in s)

    table = (await kubectl.run("get", "executions")).stdout
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert rows["order-1001"][1:4] == ["order-fulfilment", "1", "Completed"]
    assert rows["patient-1"][1:5] == ["patient", "1", "Running", "charge"]

    described = (await kubectl.run("describe", "execution", "patient-1")).stdout
    for expected in (
        "Phase:",
        "Running",
        "Current Steps:",
        "charge",
        "Next Retry At:",
        "GatewayTimeout",  # the last error, on the step and in the Ready condition
        "StepRetrying",  # the Ready condition's reason and the Event's
        "attempt 2 in 300s",  # the Event says when (capped by the default maxInterval)
    ):
        assert expected in described, (expected, described)


async def test_a_deleted_workflow_starts_nothing_new_and_its_runs_finish(
    cluster: Cluster,
) -> None:
    steps = [
        {"name": "pause", "type": "sagaflow.wait", "input": {"duration": "1s"}},
        {"name": "done", "type": "sagaflow.pass", "dependsOn": ["pause"]},
    ]
    await cluster.apply(WORKFLOWS, workflow("retiring", steps))
    await cluster.apply(EXECUTIONS, execution("before", "retiring"))
    await cluster.wait_status(EXECUTIONS, "before", lambda s: s.get("currentSteps") == ["pause"])
    await cluster.client.delete(WORKFLOWS, NS, "retiring")
    await cluster.api.wait_for(WORKFLOWS, NS, "retiring", lambda b: b is None)
    await cluster.apply(EXECUTIONS, execution("after", "retiring"))
    waiting = await cluster.wait_status(
        EXECUTIONS, "after", lambda s: "WorkflowNotReady" in str(s.get("conditions"))
    )
    assert waiting["status"]["phase"] == "Pending"
    done = await cluster.wait_status(EXECUTIONS, "before", phase_is("Completed", "Failed"))
    assert done["status"]["phase"] == "Completed"  # on the version it pinned
    # The Workflow back: the waiting Execution starts, on the same (identical) version.
    await cluster.apply(WORKFLOWS, workflow("retiring", steps))
    started = await cluster.wait_status(EXECUTIONS, "after", phase_is("Running", "Completed"))
    assert started["status"]["workflowVersion"] == 1
