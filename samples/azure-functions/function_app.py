"""An Azure Function that turns HTTP calls into Sagaflow runs (Python v2 model).

`POST /api/events` with a JSON body does one of two things, chosen by app settings:

- `SAGAFLOW_TRIGGER_QUEUE` set: the body goes, as it is, to that Service Bus queue
  (an output binding on the connection `SAGAFLOW_SERVICEBUS`), where a Sagaflow
  Trigger with `source.queue` of the same name turns it into a start or a signal;
- otherwise it starts a run through the Sagaflow API, `POST {SAGAFLOW_API_URL}/v1/
  namespaces/{SAGAFLOW_NAMESPACE}/workflows/{SAGAFLOW_WORKFLOW}/executions` with
  `{"input": <body>}`, the caller's `Idempotency-Key` (else the SHA-256 of the body,
  so a retried call starts nothing new) and `SAGAFLOW_API_TOKEN` as bearer token.
  The API's answer is passed back as it is.

Anything that is not JSON is refused here (400), before it reaches a queue or the API.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import azure.functions as func

API_TIMEOUT_SECONDS = 10.0


def build_app(settings: Mapping[str, str]) -> func.FunctionApp:
    """The function app for `settings` (the process environment when deployed)."""
    app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
    if settings.get("SAGAFLOW_TRIGGER_QUEUE"):

        @app.function_name("enqueue")
        @app.route(route="events", methods=["POST"])
        @app.service_bus_queue_output(
            arg_name="message",
            connection="SAGAFLOW_SERVICEBUS",
            queue_name="%SAGAFLOW_TRIGGER_QUEUE%",
        )
        def enqueue(req: func.HttpRequest, message: func.Out[str]) -> func.HttpResponse:
            body, problem = _json_body(req)
            if problem is not None:
                return problem
            message.set(body.decode("utf-8"))
            return _answer(202, {"queued": True})

    else:

        @app.function_name("forward")
        @app.route(route="events", methods=["POST"])
        def forward(req: func.HttpRequest) -> func.HttpResponse:
            return forward_to_api(req, settings)

    return app


def forward_to_api(req: func.HttpRequest, settings: Mapping[str, str]) -> func.HttpResponse:
    """Start a run of the configured workflow with the request's body as its input."""
    body, problem = _json_body(req)
    if problem is not None:
        return problem
    base, workflow = settings.get("SAGAFLOW_API_URL", ""), settings.get("SAGAFLOW_WORKFLOW", "")
    if not base.startswith(("http://", "https://")) or not workflow:
        logging.error("set SAGAFLOW_API_URL (http or https) and SAGAFLOW_WORKFLOW")
        return _answer(500, {"error": "the function is not configured"})
    namespace = settings.get("SAGAFLOW_NAMESPACE") or "default"
    url = (
        f"{base.rstrip('/')}/v1/namespaces/{urllib.parse.quote(namespace)}"
        f"/workflows/{urllib.parse.quote(workflow)}/executions"
    )
    key = req.headers.get("Idempotency-Key") or "sha256-" + hashlib.sha256(body).hexdigest()
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    token = settings.get("SAGAFLOW_API_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    payload = json.dumps({"input": json.loads(body)}).encode()
    # S310: the scheme is checked above, so only http(s) URLs are opened.
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=API_TIMEOUT_SECONDS) as response:  # noqa: S310
            return _passed_on(response.status, response.read())
    except urllib.error.HTTPError as exc:  # the API answered with an error: pass it on
        return _passed_on(exc.code, exc.read())
    except (urllib.error.URLError, TimeoutError) as exc:
        logging.warning("Sagaflow API at %s: %s", base, exc)
        return _answer(502, {"error": "the Sagaflow API could not be reached"})


def _json_body(req: func.HttpRequest) -> tuple[bytes, func.HttpResponse | None]:
    body = req.get_body()
    try:
        json.loads(body)
    except ValueError:
        return body, _answer(400, {"error": "the body must be JSON"})
    return body, None


def _passed_on(status: int, body: bytes) -> func.HttpResponse:
    return func.HttpResponse(body, status_code=status, mimetype="application/json")


def _answer(status: int, value: Any) -> func.HttpResponse:
    return _passed_on(status, json.dumps(value).encode())


app = build_app(os.environ)
