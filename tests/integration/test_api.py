"""The HTTP API over `DirectService` on a real Postgres, served by `server.serve`.

Every route and every error answer, as a caller sees them over HTTP (status and
body), the OpenAPI document checked against the app's router, 50 concurrent
identical starts making one run, and `HttpClient` giving back what the service
gives. Auth is `test_api_auth.py`'s; here the API runs without (`LoopbackOnly`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import asyncpg
import pytest
from test_orchestrator import Harness, harness_on

from sagaflow.api.app import make_app
from sagaflow.api.auth import LoopbackOnly
from sagaflow.api.client import HttpClient
from sagaflow.api.contract import ApiError
from sagaflow.api.openapi import document
from sagaflow.api.server import serve
from sagaflow.api.service import DirectService
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.runtime.startpath import StartCall

pytestmark = pytest.mark.timeout(120)

NS = "team-a"
LIMIT = 8 * 1024
ORDERS = WorkflowSpec.model_validate({"steps": [{"name": "work", "type": "svc.work"}]})
APPROVAL = WorkflowSpec.model_validate(
    {
        "signals": [{"name": "go"}],
        "steps": [{"name": "wait", "type": "sagaflow.waitForSignal", "input": {"signal": "go"}}],
    }
)
SCHEDULES = [{"metadata": {"name": "nightly", "namespace": NS}, "status": {"runs": 3}}]


class Webhooks:
    """A webhook receiver that records each delivery and answers 202."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, str], bytes]] = []

    async def deliver(
        self, namespace: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        self.calls.append((namespace, path, dict(headers), body))
        return 202, {"result": "started"}


class Api:
    def __init__(self, h: Harness, url: str, http: aiohttp.ClientSession, hooks: Webhooks):
        self.h, self.url, self.http, self.hooks = h, url, http, hooks

    async def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        """(status, JSON body); `body` is sent as JSON, `data` raw."""
        if body is not None:
            kwargs["json"] = body
        async with self.http.request(method, self.url + path, **kwargs) as r:
            return r.status, await r.json(content_type=None)

    async def start(self, body: Any = None, key: str | None = None, wf: str = "orders") -> Any:
        headers = {"Idempotency-Key": key} if key else {}
        path = f"/v1/namespaces/{NS}/workflows/{wf}/executions"
        return await self.call(
            "POST", path, {"input": {}} if body is None else body, headers=headers
        )

    async def runs(self) -> int:
        return int(await self.h.scalar("SELECT count(*) FROM sagaflow_executions"))


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[Api]:
    async with harness_on(pg_pool) as h:
        for name, spec in (("orders", ORDERS), ("approval", APPROVAL)):
            await h.orchestrator.apply_workflow(NS, name, spec)

        async def schedules(namespace: str) -> list[dict[str, Any]]:
            return SCHEDULES if namespace == NS else []

        service = DirectService(h.orchestrator, schedules=schedules)
        hooks = Webhooks()
        app = make_app(service, LoopbackOnly(), webhooks=hooks, max_body_bytes=LIMIT)
        async with serve(app, "127.0.0.1", 0) as served, aiohttp.ClientSession() as http:
            yield Api(h, served.url, http, hooks)


def err(answer: tuple[int, Any]) -> tuple[int, str, str | None]:
    """(status, reason, field) of an error answer, once it is seen to have the one shape."""
    status, body = answer
    e = body["error"]
    assert set(body) == {"error"} and e["code"] == status and e["message"]
    assert set(e) - {"field"} == {"code", "reason", "message"}
    return status, e["reason"], e.get("field")


async def test_a_start_is_201_its_repeat_200_and_another_request_under_its_key_409(
    api: Api,
) -> None:
    status, body = await api.start({"input": {"n": 1}, "correlationKey": "c-1"}, key="k-1")
    assert status == 201 and body["execution"]["spec"]["input"] == {"n": 1}
    name = body["execution"]["metadata"]["name"]
    again = await api.start({"input": {"n": 1}, "correlationKey": "c-1"}, key="k-1")
    assert again[0] == 200 and again[1]["execution"]["metadata"]["name"] == name
    assert err(await api.start({"input": {"n": 2}}, key="k-1")) == (
        409,
        "Conflict",
        "Idempotency-Key",
    )
    held = await api.start({"input": {}, "correlationKey": "c-1"}, key="k-2")
    assert err(held) == (409, "Conflict", "correlationKey")
    named = await api.start({"input": {}, "name": "order-7"})
    assert named[0] == 201 and named[1]["execution"]["metadata"]["name"] == "order-7"
    assert err(await api.start(wf="nope")) == (404, "NotFound", None)
    assert await api.runs() == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": {}, "inputs": {}}, "inputs"),
        ({"input": []}, "input"),
        ({"input": None}, "input"),
        ({}, "input"),
        ({"input": {}, "name": 7}, "name"),
        ({"input": {}, "name": "Not_A_Name"}, "name"),
        ({"input": {}, "correlationKey": ["a"]}, "correlationKey"),
        ([{"input": {}}], None),
    ],
)
async def test_a_start_body_of_the_wrong_shape_is_a_400_naming_the_field(
    api: Api, body: Any, field: str | None
) -> None:
    assert err(await api.start(body)) == (400, "BadRequest", field)
    assert await api.runs() == 0


@pytest.mark.parametrize(
    ("data", "content_type", "status", "reason"),
    [
        (b'{"input": {', "application/json", 400, "BadRequest"),
        (b'{"input": {"x": NaN}}', "application/json", 400, "BadRequest"),
        (b"", "application/json", 400, "BadRequest"),
        (b'{"input": {}}', "text/plain", 415, "UnsupportedMediaType"),
        (b'{"input": {}}', "application/x-www-form-urlencoded", 415, "UnsupportedMediaType"),
        (
            b'{"input": {"pad": "' + b"x" * LIMIT + b'"}}',
            "application/json",
            413,
            "PayloadTooLarge",
        ),
    ],
)
async def test_malformed_unsupported_and_oversized_bodies_get_their_error(
    api: Api, data: bytes, content_type: str, status: int, reason: str
) -> None:
    path = f"/v1/namespaces/{NS}/workflows/orders/executions"
    headers = {"Content-Type": content_type}
    assert err(await api.call("POST", path, data=data, headers=headers)) == (status, reason, None)
    assert await api.runs() == 0


async def test_a_streamed_body_over_the_limit_is_a_413_too(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"input": {"pad": "'
        for _ in range(4):
            yield b"x" * (LIMIT // 2)  # no Content-Length: the limit holds while reading
        yield b'"}}'

    path = f"/v1/namespaces/{NS}/workflows/orders/executions"
    got = await api.call("POST", path, data=chunks(), headers={"Content-Type": "application/json"})
    assert err(got) == (413, "PayloadTooLarge", None)


async def test_fifty_concurrent_identical_posts_make_one_execution(api: Api) -> None:
    body = {"input": {"order": 42}, "correlationKey": "order-42"}
    answers = await asyncio.gather(*(api.start(body, key="order-42") for _ in range(50)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 49 + [201]
    assert len({b["execution"]["metadata"]["uid"] for _, b in answers}) == 1
    assert await api.runs() == 1


async def test_reads_answer_executions_history_pages_workflows_and_schedules(api: Api) -> None:
    names = [(await api.start({"input": {"i": i}, "name": f"run-{i}"}))[1] for i in range(3)]
    assert len(names) == 3
    await api.start({"input": {}, "name": "wait-1"}, wf="approval")
    base = f"/v1/namespaces/{NS}"
    status, run = await api.call("GET", f"{base}/executions/run-1")
    assert status == 200 and run["kind"] == "Execution" and run["spec"]["input"] == {"i": 1}
    status, history = await api.call("GET", f"{base}/executions/run-1/history")
    assert status == 200 and history["items"] and {"at", "kind"} <= set(history["items"][0])

    status, page = await api.call("GET", f"{base}/executions", params={"limit": "3"})
    assert status == 200 and len(page["items"]) == 3 and page["continue"]
    params = {"limit": "3", "continue": page["continue"]}
    status, rest = await api.call("GET", f"{base}/executions", params=params)
    assert status == 200 and len(rest["items"]) == 1 and rest["continue"] is None
    seen = [e["metadata"]["name"] for e in page["items"] + rest["items"]]
    assert sorted(seen) == ["run-0", "run-1", "run-2", "wait-1"]
    status, only = await api.call("GET", f"{base}/executions", params={"workflow": "approval"})
    assert [e["metadata"]["name"] for e in only["items"]] == ["wait-1"]
    status, running = await api.call("GET", f"{base}/executions", params={"phase": "Completed"})
    assert status == 200 and running["items"] == []

    status, workflows = await api.call("GET", f"{base}/workflows")
    assert status == 200 and {w["metadata"]["name"] for w in workflows["items"]} == {
        "orders",
        "approval",
    }
    assert await api.call("GET", f"{base}/schedules") == (200, {"items": SCHEDULES})
    assert await api.call("GET", "/v1/namespaces/other/schedules") == (200, {"items": []})
    assert err(await api.call("GET", f"{base}/executions/nope")) == (404, "NotFound", None)
    assert err(await api.call("GET", f"{base}/executions/nope/history")) == (404, "NotFound", None)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"phase": "Sleeping"}, "phase"),
        ({"continue": "not-a-token"}, "continue"),
        ({"owner": "me"}, "owner"),
        ([("workflow", "a"), ("workflow", "b")], "workflow"),
    ],
)
async def test_bad_list_parameters_are_a_400_naming_the_parameter(
    api: Api, params: Any, field: str
) -> None:
    got = await api.call("GET", f"/v1/namespaces/{NS}/executions", params=params)
    assert err(got) == (400, "BadRequest", field)


async def test_signals_take_any_json_as_data_and_their_key_as_their_id(api: Api) -> None:
    await api.start({"input": {}, "name": "wait-1"}, wf="approval")
    path = f"/v1/namespaces/{NS}/executions/wait-1/signals/go"
    headers = {"Idempotency-Key": "sig-1"}
    status, outcome = await api.call("POST", path, {"data": [1, "two"]}, headers=headers)
    assert status == 200 and outcome["result"] == "accepted"
    assert outcome["execution"]["metadata"]["name"] == "wait-1"
    status, again = await api.call("POST", path, {"data": [1, "two"]}, headers=headers)
    assert status == 200 and again["result"] == "noop"
    assert err(await api.call("POST", path, {"payload": 1})) == (400, "BadRequest", "payload")
    missing = f"/v1/namespaces/{NS}/executions/nope/signals/go"
    assert err(await api.call("POST", missing, {})) == (404, "NotFound", None)


async def test_control_actions_answer_their_outcome_and_a_refusal_is_a_409(api: Api) -> None:
    await api.start({"input": {}, "name": "run-1"})
    path = f"/v1/namespaces/{NS}/executions/run-1"
    status, suspended = await api.call("POST", f"{path}:suspend")  # no body at all
    assert status == 200 and suspended["result"] == "accepted"
    assert suspended["execution"]["status"]["phase"] == "Suspended"
    status, again = await api.call("POST", f"{path}:suspend", {})
    assert status == 200 and again["result"] == "noop"
    status, resumed = await api.call("POST", f"{path}:resume", {})
    assert status == 200 and resumed["result"] == "accepted"
    status, refused = await api.call("POST", f"{path}:redrive", {"latest": True})
    assert (status, refused["error"]["reason"]) == (409, "Refused")
    assert refused["execution"]["metadata"]["name"] == "run-1"
    status, cancelled = await api.call("POST", f"{path}:cancel")
    assert status == 200 and cancelled["result"] == "accepted"

    assert err(await api.call("POST", f"{path}:redrive", {"latest": "yes"})) == (
        400,
        "BadRequest",
        "latest",
    )
    assert err(await api.call("POST", f"{path}:cancel", {"force": True})) == (
        400,
        "BadRequest",
        "force",
    )
    skip = f"{path}:skip-compensation"
    assert err(await api.call("POST", skip)) == (400, "BadRequest", None)
    assert err(await api.call("POST", skip, {"steps": []})) == (400, "BadRequest", "steps")
    assert err(await api.call("POST", skip, {"steps": ["nope"]})) == (400, "BadRequest", "steps")
    status, body = await api.call("POST", skip, {"steps": ["work"]})
    assert (status, body["error"]["reason"]) == (409, "Refused")
    missing = f"/v1/namespaces/{NS}/executions/nope:suspend"
    assert err(await api.call("POST", missing)) == (404, "NotFound", None)


async def test_unknown_routes_methods_and_namespaces_answer_in_the_error_shape(api: Api) -> None:
    assert err(await api.call("GET", "/v2/nothing")) == (404, "NotFound", None)
    path = f"/v1/namespaces/{NS}/executions/run-1"
    async with api.http.delete(api.url + path) as r:
        assert r.status == 405 and r.headers["Allow"] == "GET,HEAD"
        assert err((r.status, await r.json())) == (405, "MethodNotAllowed", None)
    assert err(await api.call("POST", f"{path}:explode")) == (405, "MethodNotAllowed", None)
    bad = "/v1/namespaces/Team_A/executions"
    assert err(await api.call("GET", bad)) == (400, "BadRequest", "namespace")
    key = {"Idempotency-Key": "x" * 300}
    path = f"/v1/namespaces/{NS}/workflows/orders/executions"
    got = await api.call("POST", path, {"input": {}}, headers=key)
    assert err(got) == (400, "BadRequest", "Idempotency-Key")


async def test_a_bug_is_a_500_without_its_details_logged_once(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(DirectService):
        async def get_execution(self, namespace: str, name: str) -> dict[str, Any]:
            raise RuntimeError("secret detail of the bug")

    app = make_app(Broken(api.h.orchestrator), LoopbackOnly())
    with caplog.at_level(logging.ERROR, logger="sagaflow.api"):
        async with (
            serve(app, "127.0.0.1", 0) as served,
            api.http.get(f"{served.url}/v1/namespaces/{NS}/executions/x") as r,
        ):
            text = await r.text()
    assert err((r.status, json.loads(text))) == (500, "InternalError", None)
    assert "secret detail" not in text and "Traceback" not in text
    [record] = [r for r in caplog.records if r.name == "sagaflow.api"]
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])


async def test_webhooks_go_to_their_receiver_raw_without_the_api_auth(api: Api) -> None:
    path = f"/v1/namespaces/{NS}/webhooks/github"
    headers = {"X-Signature-256": "sha256=abc", "Content-Type": "text/plain"}
    got = await api.call("POST", path, data=b"not json", headers=headers)
    assert got == (202, {"result": "started"})
    [(namespace, hook, seen, body)] = api.hooks.calls
    assert (namespace, hook, body, seen["X-Signature-256"]) == (
        NS,
        "github",
        b"not json",
        "sha256=abc",
    )
    too_big = await api.call("POST", path, data=b"x" * (LIMIT + 1))
    assert err(too_big) == (413, "PayloadTooLarge", None) and len(api.hooks.calls) == 1

    bare = make_app(DirectService(api.h.orchestrator), LoopbackOnly())
    async with serve(bare, "127.0.0.1", 0) as served, api.http.post(served.url + path) as r:
        assert err((r.status, await r.json())) == (404, "NotFound", None)


async def test_healthz_and_an_openapi_document_naming_every_route(api: Api) -> None:
    assert await api.call("GET", "/healthz") == (200, {"status": "ok"})
    status, served = await api.call("GET", "/openapi.json")
    assert status == 200 and served == json.loads(json.dumps(document()))
    assert served["openapi"] == "3.1.0"

    routed = {
        (resource.canonical, route.method.lower())
        for resource in make_app(
            DirectService(api.h.orchestrator), LoopbackOnly()
        ).router.resources()
        for route in resource
        if route.method != "HEAD"
    }
    documented = {(path, method) for path, ops in served["paths"].items() for method in ops}
    assert routed == documented
    for path, ops in served["paths"].items():
        params = {p["name"] for op in ops.values() for p in op.get("parameters", [])}
        assert {seg.strip("{}").split("}")[0] for seg in path.split("/") if "{" in seg} <= params
        for op in ops.values():
            if path.startswith("/v1/") and "webhooks" not in path:
                assert op["x-sagaflow-verb"] in ("create", "get", "patch")
                assert {"400", "401", "403", "500"} <= set(op["responses"])
    error_schema = served["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error_schema["properties"]) == set(ApiError(400, "X", "m", "f").to_json()["error"])


async def test_a_workflow_version_is_read_by_number(api: Api) -> None:
    changed = ORDERS.model_copy(update={"timeout": "1h"})
    await api.h.orchestrator.apply_workflow(NS, "orders", changed)
    base = f"/v1/namespaces/{NS}/workflows/orders/versions"
    first, second = await api.call("GET", f"{base}/1"), await api.call("GET", f"{base}/2")
    assert first[0] == second[0] == 200
    assert "timeout" not in first[1]["spec"] and second[1]["spec"]["timeout"] == "1h"
    assert (first[1]["kind"], first[1]["status"]["version"]) == ("Workflow", 1)
    assert err(await api.call("GET", f"{base}/3")) == (404, "NotFound", None)
    assert err(await api.call("GET", f"{base}/one")) == (400, "BadRequest", "version")
    assert err(await api.call("GET", f"{base}/0")) == (400, "BadRequest", "version")


async def test_the_http_client_gives_back_what_the_service_gives(api: Api) -> None:
    client = HttpClient(api.url)
    service = DirectService(api.h.orchestrator)
    try:
        call = StartCall(NS, "orders", {"n": 1}, "key-1", correlation_key="c")
        started = await client.start(call)
        assert started.created and not (await client.start(call)).created
        name = started.execution["metadata"]["name"]
        assert await client.get_execution(NS, name) == await service.get_execution(NS, name)
        assert await client.history(NS, name) == await service.history(NS, name)
        await client.start(StartCall(NS, "approval", {}, name="wait-1"))
        page = await client.list_executions(NS, limit=1)
        assert len(page.items) == 1 and page.continue_token
        rest = await client.list_executions(NS, continue_token=page.continue_token)
        assert len(rest.items) == 1 and rest.continue_token is None
        names = {e["metadata"]["name"] for e in page.items + rest.items}
        assert names == {name, "wait-1"}
        expected = await service.list_executions(NS, workflow="approval")
        assert await client.list_executions(NS, workflow="approval") == expected
        assert await client.list_workflows(NS) == await service.list_workflows(NS)
        pinned = await client.get_workflow_version(NS, "orders", 1)
        assert pinned == await service.get_workflow_version(NS, "orders", 1)
        assert pinned["spec"]["steps"][0]["name"] == "work" and pinned["status"]["version"] == 1
        assert await client.list_schedules(NS) == SCHEDULES

        outcome = await client.signal(NS, "wait-1", "go", {"ok": True}, signal_id="s-1")
        assert outcome.result == "accepted"
        assert (await client.signal(NS, "wait-1", "go", {"ok": True}, "s-1")).result == "noop"
        assert (await client.control(NS, name, "suspend")).result == "accepted"
        refused = await client.control(NS, name, "redrive", latest=True)
        assert refused.result == "refused" and refused.execution["metadata"]["name"] == name
        skipped = await client.control(NS, name, "skip-compensation", steps=["work"])
        assert skipped.execution["metadata"]["name"] == name
        cancelled = await client.control(NS, name, "cancel")
        assert cancelled.result == "accepted"
        assert (await client.control(NS, name, "skip-compensation", steps=["work"])).result == (
            "refused"
        )

        with pytest.raises(ApiError) as conflict:
            await client.start(StartCall(NS, "orders", {"n": 2}, "key-1"))
        assert (conflict.value.status, conflict.value.reason) == (409, "Conflict")
        assert conflict.value.field == "Idempotency-Key"
        with pytest.raises(ApiError) as bad:
            await client.list_executions(NS, phase="Sleeping")
        assert (bad.value.status, bad.value.field) == (400, "phase")
        with pytest.raises(ApiError) as missing:
            await client.get_execution(NS, "nope")
        assert missing.value.status == 404
        with pytest.raises(ApiError) as unknown:
            await client.control(NS, name, "explode")
        assert (unknown.value.status, unknown.value.field) == (400, "verb")
    finally:
        await client.close()


async def test_the_http_client_names_a_server_it_cannot_reach() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed at once: nothing listens there
    url = f"http://127.0.0.1:{port}"
    client = HttpClient(url, token="t")  # noqa: S106 - a test token
    try:
        with pytest.raises(ApiError) as unreachable:
            await client.get_execution(NS, "run-1")
    finally:
        await client.close()
    assert (unreachable.value.status, unreachable.value.reason) == (503, "Unavailable")
    assert unreachable.value.message.startswith(f"cannot reach the Sagaflow server at {url}: ")
