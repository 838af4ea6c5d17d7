"""The in-memory API server (`tests/support/kube.py`) behaves like a Kubernetes API
server where kopf depends on it: object metadata, optimistic concurrency, the /status
split, finalizers, and a tiny kopf operator (defined here, not sagaflow's) running
against it end to end; and the Table rules `kubectl get` relies on (kubectl itself runs
against the server in `test_kubectl.py`)."""

from __future__ import annotations

import asyncio
import datetime
import threading
from pathlib import Path
from typing import Any

import kopf
import pytest
from tests.support.kube import (
    EVENTS,
    EXECUTIONS,
    GROUP,
    VERSION,
    ApiError,
    ApiServer,
    KubeClient,
    Recorder,
    operator_in_thread,
    running_api_server,
    write_kubeconfig,
)
from tests.support.kube_tables import cell, first_match, human_duration

NS = "testns"


def execution(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Execution",
        "metadata": {"name": name},
        "spec": {"workflow": "wf", **spec},
    }


@pytest.fixture
async def api() -> Any:
    threads_before = set(threading.enumerate())
    async with running_api_server() as server:
        yield server
    # Nothing outlives a test: kopf's thread is joined on exit (its handler executor's
    # idle workers are the only threads allowed to linger, named ThreadPoolExecutor-*).
    leftover = [
        t
        for t in set(threading.enumerate()) - threads_before
        if t.is_alive() and not t.name.startswith(("ThreadPoolExecutor", "asyncio_"))
    ]
    assert not leftover, leftover


@pytest.fixture
async def client(api: ApiServer) -> Any:
    async with KubeClient(api.url) as kube:
        yield kube


# -- the server on its own -------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_create_fills_metadata_and_rejects_duplicates(client: KubeClient) -> None:
    created = await client.create(EXECUTIONS, NS, {**execution("e1"), "status": {"phase": "X"}})
    meta = created["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    assert meta["generation"] == 1 and meta["namespace"] == NS
    assert "status" not in created  # a status subresource is written only via /status
    assert await client.get(EXECUTIONS, NS, "e1") == created

    with pytest.raises(ApiError) as exc_info:
        await client.create(EXECUTIONS, NS, execution("e1"))
    assert exc_info.value.status == 409 and exc_info.value.reason == "AlreadyExists"

    other = await client.create(EXECUTIONS, NS, execution("e2"))
    assert other["metadata"]["uid"] != meta["uid"]
    assert int(other["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])


@pytest.mark.timeout(60)
async def test_generation_follows_spec_not_status(client: KubeClient) -> None:
    created = await client.create(EXECUTIONS, NS, execution("e1"))
    rv0 = created["metadata"]["resourceVersion"]

    status = await client.patch(
        EXECUTIONS, NS, "e1", {"status": {"phase": "Running"}}, subresource="status"
    )
    assert status["status"] == {"phase": "Running"}
    assert status["metadata"]["generation"] == 1
    rv1 = status["metadata"]["resourceVersion"]
    assert rv1 != rv0

    # A main-object write ignores the status but bumps generation for a spec change.
    spec = await client.patch(
        EXECUTIONS, NS, "e1", {"spec": {"workflow": "wf2"}, "status": {"phase": "Ignored"}}
    )
    assert spec["spec"]["workflow"] == "wf2" and spec["status"] == {"phase": "Running"}
    assert spec["metadata"]["generation"] == 2
    rv2 = spec["metadata"]["resourceVersion"]
    assert rv2 != rv1

    # Metadata-only changes bump resourceVersion, not generation; no-op writes bump neither.
    labelled = await client.patch(EXECUTIONS, NS, "e1", {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 2
    assert labelled["metadata"]["resourceVersion"] != rv2
    same = await client.patch(EXECUTIONS, NS, "e1", {"metadata": {"labels": {"a": "b"}}})
    assert same == labelled

    # A /status write cannot touch the spec.
    await client.patch(EXECUTIONS, NS, "e1", {"spec": {"workflow": "no"}}, subresource="status")
    assert (await client.get(EXECUTIONS, NS, "e1"))["spec"]["workflow"] == "wf2"


@pytest.mark.timeout(60)
async def test_stale_resource_version_is_rejected(client: KubeClient) -> None:
    created = await client.create(EXECUTIONS, NS, execution("e1"))
    stale = created["metadata"]["resourceVersion"]
    await client.patch(EXECUTIONS, NS, "e1", {"spec": {"workflow": "wf2"}})

    stale_patch = {"metadata": {"resourceVersion": stale}, "spec": {"x": 1}}
    with pytest.raises(ApiError) as exc_info:
        await client.patch(EXECUTIONS, NS, "e1", stale_patch)
    assert exc_info.value.status == 409 and exc_info.value.reason == "Conflict"

    with pytest.raises(ApiError) as exc_info:
        await client.replace(EXECUTIONS, NS, "e1", created)
    assert exc_info.value.status == 409

    # kopf's JSON patches start with a `test` of the resourceVersion: 422 when stale.
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": stale},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
    ]
    with pytest.raises(ApiError) as exc_info:
        await client.patch(EXECUTIONS, NS, "e1", ops, json_patch=True)
    assert exc_info.value.status == 422

    current = await client.get(EXECUTIONS, NS, "e1")
    assert current["spec"] == {"workflow": "wf2"} and "finalizers" not in current["metadata"]
    ops[0]["value"] = current["metadata"]["resourceVersion"]
    patched = await client.patch(EXECUTIONS, NS, "e1", ops, json_patch=True)
    assert patched["metadata"]["finalizers"] == ["x"]


@pytest.mark.timeout(60)
async def test_deletion_waits_for_finalizers(api: ApiServer, client: KubeClient) -> None:
    body = execution("e1")
    body["metadata"]["finalizers"] = ["test/hold"]
    await client.create(EXECUTIONS, NS, body)

    marked = await client.delete(EXECUTIONS, NS, "e1")
    assert marked["metadata"]["deletionTimestamp"]
    assert (await client.get(EXECUTIONS, NS, "e1"))["metadata"]["deletionTimestamp"]

    await client.patch(EXECUTIONS, NS, "e1", {"metadata": {"finalizers": None}})
    with pytest.raises(ApiError) as exc_info:
        await client.get(EXECUTIONS, NS, "e1")
    assert exc_info.value.status == 404
    assert api.peek(EXECUTIONS, NS, "e1") is None

    # A deleted name can be created again, as a new object.
    again = await client.create(EXECUTIONS, NS, execution("e1"))
    assert again["metadata"]["uid"] != marked["metadata"]["uid"]


# -- a tiny kopf operator against the server -------------------------------------------


def build_operator(calls: Recorder, release_delete: threading.Event) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.create(GROUP, VERSION, "executions", registry=registry)
    def on_create(name: str, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        calls.add("create", name)
        kopf.info(body, reason="Started", message="Execution started")
        patch.status["phase"] = "Running"

    @kopf.on.update(GROUP, VERSION, "executions", field="spec", registry=registry)
    def on_update(name: str, old: Any, new: Any, patch: kopf.Patch, **_: Any) -> None:
        calls.add("update", name, dict(old or {}), dict(new or {}))
        patch.status["observedWorkflow"] = new["workflow"]

    @kopf.on.delete(GROUP, VERSION, "executions", registry=registry)
    def on_delete(name: str, **_: Any) -> None:
        calls.add("delete", name)
        release_delete.wait(timeout=30)

    return registry


@pytest.mark.timeout(60)
async def test_kopf_operator_round_trip(api: ApiServer, client: KubeClient) -> None:
    calls = Recorder()
    release_delete = threading.Event()
    registry = build_operator(calls, release_delete)
    async with operator_in_thread(registry, api, NS, watch=EXECUTIONS):
        try:
            created = await client.create(EXECUTIONS, NS, execution("e1"))
            uid = created["metadata"]["uid"]

            def phase_is(value: str) -> Any:
                return lambda b: b is not None and b.get("status", {}).get("phase") == value

            running = await api.wait_for(EXECUTIONS, NS, "e1", phase_is("Running"))
            assert running is not None
            assert running["metadata"]["uid"] == uid
            assert running["metadata"]["generation"] == 1  # status patches keep generation
            assert running["metadata"]["finalizers"]  # kopf's, for the delete handler

            # A spec change: generation bumps, the update handler sees old and new.
            await client.patch(EXECUTIONS, NS, "e1", {"spec": {"workflow": "wf2"}})
            updated = await api.wait_for(
                EXECUTIONS,
                NS,
                "e1",
                lambda b: b is not None and b.get("status", {}).get("observedWorkflow") == "wf2",
            )
            assert updated is not None
            assert updated["metadata"]["generation"] == 2
            assert updated["status"]["phase"] == "Running"

            # Deletion is held by kopf's finalizer while the delete handler runs.
            await client.delete(EXECUTIONS, NS, "e1")
            await api.wait_until(lambda: calls.count("delete") == 1)
            held = api.peek(EXECUTIONS, NS, "e1")
            assert held is not None and held["metadata"]["deletionTimestamp"]
            release_delete.set()
            await api.wait_for(EXECUTIONS, NS, "e1", lambda b: b is None)

            # The create handler's k8s Event was posted (kopf uses generateName).
            def started_event() -> bool:
                return any(
                    e.get("involvedObject", {}).get("uid") == uid and e.get("reason") == "Started"
                    for e in api.bodies(EVENTS)
                )

            await api.wait_until(started_event)

        finally:
            release_delete.set()

    assert calls.count("create") == 1
    assert calls.count("delete") == 1
    updates = [c for c in calls.items if c[0] == "update"]
    assert len(updates) == 1
    assert updates[0][2] == {"workflow": "wf"} and updates[0][3] == {"workflow": "wf2"}


@pytest.mark.timeout(60)
async def test_kopf_sees_objects_created_before_it_started(
    api: ApiServer, client: KubeClient
) -> None:
    await client.create(EXECUTIONS, NS, execution("early"))
    calls = Recorder()
    release = threading.Event()
    release.set()
    async with operator_in_thread(build_operator(calls, release), api, NS, watch=EXECUTIONS):
        body = await api.wait_for(
            EXECUTIONS,
            NS,
            "early",
            lambda b: b is not None and b.get("status", {}).get("phase") == "Running",
        )
        assert body is not None
    assert calls.items == [("create", "early")]


@pytest.mark.timeout(60)
async def test_kubeconfig_serves_the_kubernetes_client(api: ApiServer, tmp_path: Path) -> None:
    kubernetes = pytest.importorskip("kubernetes")
    kubeconfig = write_kubeconfig(tmp_path, api.url, namespace=NS)

    def use_the_client() -> tuple[dict[str, Any], dict[str, Any]]:
        client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        try:
            crs = kubernetes.client.CustomObjectsApi(client)
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "Workflow",
                "metadata": {"name": "wf"},
                "spec": {"steps": []},
            }
            created = crs.create_namespaced_custom_object(GROUP, VERSION, NS, "workflows", body)
            listed = crs.list_namespaced_custom_object(GROUP, VERSION, NS, "workflows")
            return created, listed
        finally:
            client.close()

    created, listed = await asyncio.to_thread(use_the_client)
    assert created["metadata"]["uid"] and created["metadata"]["generation"] == 1
    assert [item["metadata"]["name"] for item in listed["items"]] == ["wf"]
    assert listed["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


# -- Tables: the rules kubectl cannot show in a quick test -----------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("seconds", "printed"),
    [
        (-5, "<invalid>"),
        (-1, "0s"),
        (119, "119s"),
        (120, "2m"),
        (5 * 60 + 3, "5m3s"),
        (10 * 60 + 3, "10m"),
        (3 * 3600 + 5 * 60, "3h5m"),
        (8 * 3600 + 5 * 60, "8h"),
        (2 * 86400 + 4 * 3600, "2d4h"),
        (8 * 86400 + 4 * 3600, "8d"),
        (3 * 365 * 86400 + 86400, "3y1d"),
        (9 * 365 * 86400, "9y"),
    ],
)
def test_table_ages_read_as_kubectl_prints_them(seconds: int, printed: str) -> None:
    assert human_duration(seconds) == printed


@pytest.mark.timeout(30)
def test_table_cells_take_the_first_match_and_only_values_of_their_type() -> None:
    steps = [
        {"name": "a", "phase": "Succeeded", "attempts": 1},
        {"name": "b", "phase": "Running", "attempts": 3},
        {"name": "c", "phase": "Running", "attempts": 1},
    ]
    body = {"metadata": {"name": "x"}, "status": {"steps": steps}}
    now = datetime.datetime.now(tz=datetime.UTC)
    running = [step["attempts"] for step in steps if step["phase"] == "Running"]
    assert first_match('.status.steps[?(@.phase=="Running")].attempts', body) == running[0]
    assert first_match(".status.steps[*].name", body) == steps[0]["name"]
    assert first_match(".status.missing[0]", body) is None
    assert cell("integer", "3", now) is None and cell("integer", True, now) is None
    printed = cell("string", {"z": 1, "a": [True]}, now)  # a map: compact JSON, keys sorted
    assert printed == '{"a":[true],"z":1}'
    assert cell("string", False, now) == "false" and cell("boolean", False, now) is False
    assert cell("date", "not a time", now) == "<invalid>"
