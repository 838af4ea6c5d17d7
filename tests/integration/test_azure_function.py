"""The Azure Functions sample (`samples/azure-functions/function_app.py`) under the real
programming model: its functions are found through `FunctionApp.get_functions()`, fed
`func.HttpRequest` objects, and what they forward is recorded by a local aiohttp server
standing in for the Sagaflow API (or by a fake `func.Out` for the queue binding).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import azure.functions as func
import pytest
from aiohttp import web

pytestmark = pytest.mark.timeout(30)

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "azure-functions"


def load_sample() -> ModuleType:
    spec = importlib.util.spec_from_file_location("function_app", SAMPLE / "function_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def user_function(settings: dict[str, str]) -> tuple[Any, Callable[..., func.HttpResponse]]:
    [function] = load_sample().build_app(settings).get_functions()
    return function, function.get_user_function()


def post(body: bytes, **headers: str) -> func.HttpRequest:
    return func.HttpRequest("POST", "http://localhost/api/events", headers=headers, body=body)


class FakeOut:
    def __init__(self) -> None:
        self.value: str | None = None

    def set(self, value: str) -> None:
        self.value = value

    def get(self) -> str | None:
        return self.value


class RecordingApi:
    """A stand-in Sagaflow API: records each request, answers with what it is told."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 201
        self.answer: dict[str, Any] = {"execution": {"metadata": {"name": "orders-1"}}}

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            {
                "path": request.path,
                "headers": dict(request.headers),
                "body": await request.json(),
            }
        )
        return web.json_response(self.answer, status=self.status)


@pytest.fixture
async def api() -> AsyncIterator[tuple[RecordingApi, str]]:
    recording = RecordingApi()
    app = web.Application()
    app.router.add_post("/v1/namespaces/{ns}/workflows/{wf}/executions", recording.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield recording, f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


def settings(url: str, **more: str) -> dict[str, str]:
    return {
        "SAGAFLOW_API_URL": url,
        "SAGAFLOW_API_TOKEN": "t0ken",
        "SAGAFLOW_NAMESPACE": "shop",
        "SAGAFLOW_WORKFLOW": "orders",
        **more,
    }


async def test_the_function_starts_a_run_through_the_api_with_key_and_token(
    api: tuple[RecordingApi, str],
) -> None:
    recording, url = api
    function, forward = user_function(settings(url))
    assert function.get_function_name() == "forward"
    body = b'{"order": "o-1", "total": 12.5}'

    response = await asyncio.to_thread(forward, post(body, **{"Idempotency-Key": "evt-7"}))
    assert response.status_code == 201
    assert json.loads(response.get_body()) == recording.answer
    [sent] = recording.requests
    assert sent["path"] == "/v1/namespaces/shop/workflows/orders/executions"
    assert sent["body"] == {"input": {"order": "o-1", "total": 12.5}}
    assert sent["headers"]["Idempotency-Key"] == "evt-7"
    assert sent["headers"]["Authorization"] == "Bearer t0ken"

    # Without a key of the caller's, the body's hash: a retried call is the same start.
    for _ in range(2):
        await asyncio.to_thread(forward, post(body))
    keys = [r["headers"]["Idempotency-Key"] for r in recording.requests[1:]]
    assert keys == ["sha256-" + hashlib.sha256(body).hexdigest()] * 2


async def test_the_apis_refusals_are_passed_on_and_bad_bodies_never_leave(
    api: tuple[RecordingApi, str],
) -> None:
    recording, url = api
    _, forward = user_function(settings(url, SAGAFLOW_API_TOKEN=""))
    recording.status = 409
    recording.answer = {"error": {"code": 409, "reason": "Conflict", "message": "key used"}}
    response = await asyncio.to_thread(forward, post(b"{}"))
    assert response.status_code == 409
    assert json.loads(response.get_body())["error"]["reason"] == "Conflict"
    assert "Authorization" not in recording.requests[0]["headers"]

    refused = await asyncio.to_thread(forward, post(b"not json"))
    assert refused.status_code == 400 and len(recording.requests) == 1


async def test_an_unreachable_or_unset_api_is_an_error_of_the_function() -> None:
    with socket.socket() as bound:  # bound, not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        _, forward = user_function(settings(f"http://127.0.0.1:{bound.getsockname()[1]}/"))
        response = await asyncio.to_thread(forward, post(b"{}"))
    assert response.status_code == 502
    _, unset = user_function({})
    assert unset(post(b"{}")).status_code == 500
    _, not_http = user_function(settings("file:///etc/passwd"))
    assert not_http(post(b"{}")).status_code == 500


def test_with_a_trigger_queue_the_body_goes_to_the_queue_binding() -> None:
    function, enqueue = user_function({"SAGAFLOW_TRIGGER_QUEUE": "orders-in"})
    assert function.get_function_name() == "enqueue"
    [binding] = [
        b for b in json.loads(function.get_function_json())["bindings"] if b["type"] == "serviceBus"
    ]
    assert binding == {
        "direction": "OUT",
        "type": "serviceBus",
        "name": "message",
        "connection": "SAGAFLOW_SERVICEBUS",
        "queueName": "%SAGAFLOW_TRIGGER_QUEUE%",
    }
    out = FakeOut()
    body = '{"order": "o-1", "note": "ünïcode"}'
    response = enqueue(post(body.encode()), out)
    assert response.status_code == 202 and out.get() == body

    untouched = FakeOut()
    assert enqueue(post(b"{broken"), untouched).status_code == 400
    assert untouched.get() is None


def test_the_sample_declares_an_http_route_for_post() -> None:
    function, _ = user_function({})
    [trigger] = [
        b
        for b in json.loads(function.get_function_json())["bindings"]
        if b["type"] == "httpTrigger"
    ]
    assert (trigger["route"], trigger["methods"], trigger["authLevel"]) == (
        "events",
        ["POST"],
        "FUNCTION",
    )
    host = json.loads((SAMPLE / "host.json").read_text())
    assert host["version"] == "2.0" and "extensionBundle" in host
    local = json.loads((SAMPLE / "local.settings.sample.json").read_text())
    assert local["Values"]["FUNCTIONS_WORKER_RUNTIME"] == "python"
