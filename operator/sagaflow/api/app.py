"""The HTTP API's routes: JSON in, the `Sagaflow` interface called, JSON out.

Thin on purpose: a handler authorizes the caller (`auth.py`), checks the request's
shape (unknown fields, wrong types, bad parameters: a 400 naming the field), makes
one call on the service, and writes its answer. What a start or a signal means is
the service's business (`service.DirectService`), so the API and the CLI answer
alike.

Every error answer, whatever raised it (the service, aiohttp's router, the body
limit, a bug), has the one shape of `ApiError.to_json()`; a bug is logged once with
its traceback and answered 500 without it. A refused control request or signal is
a 409 with reason `Refused` and, beside the error, the run as it is (`execution`),
so the client can hand back the same `Outcome` the service gave.

Bodies: a request with a body must send it as JSON (else 415); an empty body reads
as `{}` where the body is optional. A signal's body is `{"data": ...}` (absent:
null), so a signal's data may be any JSON, an object included, with no guessing.
Webhook deliveries are passed on raw to their receiver, which checks the Trigger's
own secret; the API's bearer auth does not apply to them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web

from sagaflow.api import openapi
from sagaflow.api import web as web_view
from sagaflow.api.auth import Authorizer, Principal, Verb, bearer_token
from sagaflow.api.contract import ApiError, Outcome, Sagaflow, bad_request
from sagaflow.core import replay
from sagaflow.runtime.startpath import Source, StartCall
from sagaflow.telemetry import metrics, tracing

log = logging.getLogger("sagaflow.api")

MIB = 1024 * 1024
MAX_LIMIT = 1000
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_JSON_TYPES = re.compile(r"^application/([a-z0-9.+-]+\+)?json$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebhookReceiver(Protocol):
    async def deliver(
        self, namespace: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """The HTTP status and JSON body answering one webhook request."""
        ...


def error_response(error: ApiError, **extra: Any) -> web.Response:
    return web.json_response({**error.to_json(), **extra}, status=error.status)


def _reason_word(text: str) -> str:
    return "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", text) if w)


def _errors_middleware(max_body: int) -> Any:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            response = error_response(exc)
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            return response
        except web.HTTPRequestEntityTooLarge:
            message = f"the request body is over this server's limit of {max_body} bytes"
            return error_response(ApiError(413, "PayloadTooLarge", message))
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            message = f"{request.method} is not served at {request.path}; it serves {allowed}"
            response = error_response(ApiError(405, "MethodNotAllowed", message))
            response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
            return response
        except web.HTTPNotFound:
            return error_response(ApiError(404, "NotFound", f"no route {request.path}"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            word = _reason_word(exc.reason) or "Error"
            return error_response(ApiError(exc.status, word, exc.text or exc.reason))
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            message = "the server failed to answer this request; its log says why"
            return error_response(ApiError(500, "InternalError", message))

    return errors


class _Routes:
    """The handlers, sharing the service, the authorizer and the webhook receiver."""

    def __init__(
        self, service: Sagaflow, authorizer: Authorizer, webhooks: WebhookReceiver | None
    ) -> None:
        self.service, self.authorizer, self.webhooks = service, authorizer, webhooks

    async def _caller(self, request: web.Request, verb: Verb) -> tuple[str, Principal]:
        namespace = request.match_info["ns"]
        token = bearer_token(request.headers.get("Authorization"))
        principal = await self.authorizer.authorize(token, verb, namespace)
        if not _NAMESPACE.match(namespace):
            raise bad_request(f"namespace {namespace!r} is not a namespace name", "namespace")
        return namespace, principal

    async def start(self, request: web.Request) -> web.Response:
        namespace, principal = await self._caller(request, "create")
        _query(request, ())
        body = await _body(request, required=True)
        _only(body, ("input", "name", "correlationKey"))
        if "input" not in body:
            raise bad_request("the body needs 'input': the run's input, an object", "input")
        call = StartCall(
            namespace,
            request.match_info["wf"],
            _typed(body, "input", dict, "an object"),
            _idempotency_key(request),
            _typed(body, "name", str, "a string"),
            _typed(body, "correlationKey", str, "a string"),
            source=Source("api", principal.name),
        )
        with tracing.incoming(request.headers):  # a `traceparent` header: the run's parent
            started = await self.service.start(call)
        return web.json_response(
            {"execution": started.execution}, status=201 if started.created else 200
        )

    async def get_execution(self, request: web.Request) -> web.Response:
        namespace, _ = await self._caller(request, "get")
        _query(request, ())
        name = request.match_info["name"]
        return web.json_response(await self.service.get_execution(namespace, name))

    async def history(self, request: web.Request) -> web.Response:
        namespace, _ = await self._caller(request, "get")
        _query(request, ())
        rows = await self.service.history(namespace, request.match_info["name"])
        return web.json_response({"items": rows})

    async def state_at(self, request: web.Request) -> web.Response:
        namespace, _ = await self._caller(request, "get")
        query = _query(request, ("at",))
        if "at" not in query:
            raise bad_request("query parameter 'at' is required: an RFC 3339 time", "at")
        try:
            at = replay.parse_instant(query["at"])
        except ValueError as exc:
            raise bad_request(f"at: {exc}", "at") from None
        name = request.match_info["name"]
        return web.json_response(await self.service.state_at(namespace, name, at))

    async def list_executions(self, request: web.Request) -> web.Response:
        namespace, _ = await self._caller(request, "get")
        query = _query(request, ("workflow", "phase", "limit", "continue"))
        page = await self.service.list_executions(
            namespace,
            workflow=query.get("workflow"),
            phase=query.get("phase"),
            limit=_limit(query.get("limit")),
            continue_token=query.get("continue"),
        )
        return web.json_response({"items": page.items, "continue": page.continue_token})

    async def list_workflows(self, request: web.Request) -> web.Response:
        namespace, _ = await self._caller(request, "get")
        _query(request, ())
        return web.json_response({"items": await self.service.list_workflows(namespace)})

    async def workflow_version(self, request: web.Request) -> web.Response:
        namespace, _ = await self._caller(request, "get")
        _query(request, ())
        text = request.match_info["version"]
        if not text.isdigit() or int(text) < 1:
            raise bad_request(f"version: expected a number from 1, got {text!r}", "version")
        found = await self.service.get_workflow_version(
            namespace, request.match_info["wf"], int(text)
        )
        return web.json_response(found)

    async def list_schedules(self, request: web.Request) -> web.Response:
        namespace, _ = await self._caller(request, "get")
        _query(request, ())
        return web.json_response({"items": await self.service.list_schedules(namespace)})

    async def signal(self, request: web.Request) -> web.Response:
        namespace, _ = await self._caller(request, "patch")
        _query(request, ())
        body = await _body(request, required=False)
        _only(body, ("data",))
        with tracing.incoming(request.headers):  # a caller's trace: linked to the run's
            outcome = await self.service.signal(
                namespace,
                request.match_info["name"],
                request.match_info["signal"],
                body.get("data"),
                _idempotency_key(request),
            )
        return _outcome(outcome)

    def control(self, action: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            namespace, _ = await self._caller(request, "patch")
            _query(request, ())
            body = await _body(request, required=action == "skip-compensation")
            name = request.match_info["name"]
            with tracing.incoming(request.headers):  # a caller's trace: linked to the run's
                return _outcome(await self._control(namespace, name, action, body))

        return handle

    async def _control(
        self, namespace: str, name: str, action: str, body: dict[str, Any]
    ) -> Outcome:
        """The control request `action` with what its body may say."""
        if action == "redrive":
            _only(body, ("latest",))
            latest = _typed(body, "latest", bool, "true or false") or False
            return await self.service.control(namespace, name, action, latest=latest)
        if action == "skip-compensation":
            _only(body, ("steps",))
            steps = _typed(body, "steps", list, "a list of step names")
            if not steps or not all(isinstance(s, str) for s in steps):
                raise bad_request("'steps' must list at least one step name", "steps")
            return await self.service.control(namespace, name, action, steps=steps)
        _only(body, ())
        return await self.service.control(namespace, name, action)

    async def webhook(self, request: web.Request) -> web.Response:
        namespace, path = request.match_info["ns"], request.match_info["path"]
        if self.webhooks is None:
            raise ApiError(404, "NotFound", "this server has no webhook Triggers")
        body = await request.read()
        status, answer = await self.webhooks.deliver(namespace, path, request.headers, body)
        return web.json_response(answer, status=status)


def _outcome(outcome: Outcome) -> web.Response:
    if outcome.result == "refused":
        refused = ApiError(409, "Refused", outcome.message)
        return error_response(refused, execution=outcome.execution)
    answer = {"result": outcome.result, "message": outcome.message}
    return web.json_response({**answer, "execution": outcome.execution})


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _body(request: web.Request, *, required: bool) -> dict[str, Any]:
    """The JSON object body (aiohttp refuses one over the limit while reading it)."""
    raw = await request.read()
    if not raw:
        if required:
            raise bad_request("the request needs a JSON object body")
        return {}
    if not _JSON_TYPES.match(request.content_type):
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"send the body as application/json, not {request.content_type!r}",
        )
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise bad_request(f"the body must be a JSON object, not {type(value).__name__}")
    return value


def _only(body: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in body:
        if key not in allowed:
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
            raise bad_request(f"unknown field {key!r}: {takes}", key)


def _typed(body: Mapping[str, Any], field: str, kind: type, what: str) -> Any:
    """The field's value if it is of `kind` (None when absent); else a 400 naming it."""
    value = body.get(field)
    if value is None and field != "input":
        return None
    if not isinstance(value, kind):
        raise bad_request(f"{field!r} must be {what}", field)
    return value


def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key in request.query:
        if key not in allowed:
            takes = f"this route takes {', '.join(allowed)}" if allowed else "it takes none"
            raise bad_request(f"unknown query parameter {key!r}: {takes}", key)
        values = request.query.getall(key)
        if len(values) > 1:
            raise bad_request(f"query parameter {key!r} is given {len(values)} times", key)
        found[key] = values[0]
    return found


def _limit(value: str | None) -> int:
    if value is None:
        return 100
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise bad_request(f"limit {value!r}: a whole number from 1 to {MAX_LIMIT}", "limit")
    return int(value)


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 256 or not key.isprintable():
        raise bad_request("Idempotency-Key: 1 to 256 printable characters", "Idempotency-Key")
    return key


def make_app(
    service: Sagaflow,
    authorizer: Authorizer,
    *,
    webhooks: WebhookReceiver | None = None,
    max_body_bytes: int = MIB,
) -> web.Application:
    """The API as an aiohttp application (serve it with `server.serve`)."""
    routes = _Routes(service, authorizer, webhooks)
    app = web.Application(
        client_max_size=max_body_bytes, middlewares=[_errors_middleware(max_body_bytes)]
    )
    document = openapi.document()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def openapi_json(_: web.Request) -> web.Response:
        return web.json_response(document)

    async def metrics_text(_: web.Request) -> web.Response:
        # Open like /healthz: Prometheus scrapes without a token, and the series name
        # namespaces and workflows, never a run or its data.
        body = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE_LATEST})

    ns = openapi.NS
    add = app.router
    add.add_get("/healthz", healthz)
    add.add_get("/openapi.json", openapi_json)
    add.add_get("/metrics", metrics_text)
    add.add_get(f"{ns}/workflows", routes.list_workflows)
    add.add_get(f"{ns}/workflows/{{wf}}/versions/{{version}}", routes.workflow_version)
    add.add_post(f"{ns}/workflows/{{wf}}/executions", routes.start)
    add.add_get(f"{ns}/executions", routes.list_executions)
    # The control actions before the plain name: `{name}` alone would match `x:cancel`.
    for action in openapi.CONTROL_ACTIONS:
        add.add_post(f"{ns}/executions/{{name}}:{action}", routes.control(action))
    add.add_get(f"{ns}/executions/{{name}}", routes.get_execution)
    add.add_get(f"{ns}/executions/{{name}}/history", routes.history)
    add.add_get(f"{ns}/executions/{{name}}/state", routes.state_at)
    add.add_post(f"{ns}/executions/{{name}}/signals/{{signal}}", routes.signal)
    add.add_get(f"{ns}/schedules", routes.list_schedules)
    add.add_post(f"{ns}/webhooks/{{path}}", routes.webhook)
    web_view.add_routes(app)  # the pages read the routes above, with the same auth
    return app


__all__ = ["MIB", "WebhookReceiver", "error_response", "make_app"]
