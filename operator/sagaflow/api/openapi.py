"""The OpenAPI 3.1 document of the HTTP API, served at `GET /openapi.json`.

Written by hand, beside the routes of `app.py`, because the API is small and its
shapes (the Execution object, the error) are already defined elsewhere: the
document names them rather than deriving them from code. A test walks the app's
router and fails when a route or method is missing here, so the two cannot drift.
The Execution object itself is described only by its outline (`apiVersion`, `kind`,
`metadata`, `spec`, `status`); its full schema is the CRD's (`crds/`).
"""

from __future__ import annotations

from typing import Any

from sagaflow.api.contract import CONTROL_VERBS

Doc = dict[str, Any]

NS = "/v1/namespaces/{ns}"
CONTROL_ACTIONS = (*CONTROL_VERBS, "skip-compensation")


def _ref(kind: str, name: str) -> Doc:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> Doc:
    return _ref("schemas", name)


def _json(schema: Doc) -> Doc:
    return {"application/json": {"schema": schema}}


def _ok(description: str, schema: Doc) -> Doc:
    return {"description": description, "content": _json(schema)}


def _path_param(name: str, description: str) -> Doc:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _errors(*codes: int) -> Doc:
    """The error answers of an operation: every one has the error body."""
    names = {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        409: "Conflict",
        413: "PayloadTooLarge",
        415: "UnsupportedMediaType",
    }
    answers = {str(code): _ref("responses", names[code]) for code in codes}
    answers["500"] = _ref("responses", "InternalError")
    return answers


_READ = (400, 401, 403)
_WRITE = (400, 401, 403, 404, 413, 415)
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 256},
}


def _operation(op_id: str, summary: str, verb: str, params: list[Doc], **rest: Any) -> Doc:
    """An API operation, with the Kubernetes verb its caller needs on executions."""
    operation: Doc = {"operationId": op_id, "summary": summary, "parameters": params}
    operation["x-sagaflow-verb"] = verb
    operation.update(rest)
    return operation


def _read(op_id: str, summary: str, params: list[Doc], schema: str, *codes: int) -> Doc:
    """A GET of the API: the caller needs `get`; its answer has `schema`."""
    answer = {"200": _ok("Found.", _schema(schema)), **_errors(*_READ, *codes)}
    return {"get": _operation(op_id, summary, "get", params, responses=answer)}


def _public(op_id: str, summary: str) -> Doc:
    answer = {"200": _ok(summary, {"type": "object"})}
    return {"get": {"operationId": op_id, "summary": summary, "security": [], "responses": answer}}


def _page(op_id: str, summary: str, params: list[Doc], media: str = "text/html") -> Doc:
    """A page or file of the web view: open, since it holds no data (api/web.py)."""
    answer = {"200": {"description": summary, "content": {media: {}}}, **_errors(404)}
    operation = {"operationId": op_id, "summary": summary, "security": [], "parameters": params}
    return {"get": {**operation, "responses": answer}}


def _paths() -> Doc:
    ns = _path_param("ns", "The namespace.")
    name = _path_param("name", "The execution's name.")
    paths: Doc = {
        "/healthz": _public("health", "Liveness: 200 while the server answers."),
        "/openapi.json": _public("openapi", "This document."),
        "/metrics": _page(
            "metrics",
            "Prometheus metrics in the text format (no auth, like /healthz).",
            [],
            "text/plain",
        ),
        "/ui": _page("webList", "The web view's list of executions.", []),
        "/ui/namespaces/{ns}/executions/{name}": _page(
            "webExecution", "The web view of one execution.", [ns, name]
        ),
        "/ui/static/{file}": _page(
            "webStatic",
            "A script or style of the web view.",
            [_path_param("file", "The file's name.")],
            "*/*",
        ),
        f"{NS}/workflows": _read(
            "listWorkflows",
            "The namespace's workflows, with their version and runs by phase.",
            [ns],
            "ItemList",
        ),
        f"{NS}/workflows/{{wf}}/versions/{{version}}": _read(
            "getWorkflowVersion",
            "One stored version of a workflow (the one a run pins: its status's "
            "workflowVersion). 400 (field `version`) for a version that is not a number.",
            [
                ns,
                _path_param("wf", "The workflow's name."),
                _path_param("version", "The version, from 1."),
            ],
            "Object",
            404,
        ),
        f"{NS}/workflows/{{wf}}/executions": {
            "post": _operation(
                "startExecution",
                "Start a run of the workflow. With an Idempotency-Key, a repeat of the same "
                "request returns the run it started (200); a different request under the "
                "key is a 409.",
                "create",
                [ns, _path_param("wf", "The workflow's name."), _IDEMPOTENCY_KEY],
                requestBody={"required": True, "content": _json(_schema("StartRequest"))},
                responses={
                    "201": _ok("Started.", _schema("Started")),
                    "200": _ok("A repeat: the run the key started.", _schema("Started")),
                    **_errors(*_WRITE, 409),
                },
            )
        },
        f"{NS}/executions": _read(
            "listExecutions",
            "A page of the namespace's executions, oldest first.",
            [ns, *_list_params()],
            "ExecutionPage",
        ),
        f"{NS}/executions/{{name}}": _read(
            "getExecution", "One execution.", [ns, name], "Execution", 404
        ),
        f"{NS}/executions/{{name}}/history": _read(
            "getHistory",
            "Every history row of an execution, oldest first.",
            [ns, name],
            "History",
            404,
        ),
        f"{NS}/executions/{{name}}/state": _read(
            "getStateAt",
            "The execution's state at an instant, rebuilt from its history by the engine: "
            "phase, each step's phase and attempt, the timers pending then. 400 (field "
            "`at`) for a bad time or one before the run's first transition.",
            [ns, name, _at_param()],
            "StateAt",
            404,
        ),
        f"{NS}/executions/{{name}}/signals/{{signal}}": {
            "post": _operation(
                "signalExecution",
                "Send a signal. The Idempotency-Key is the signal's id: the same id twice "
                "counts once (`noop`).",
                "patch",
                [ns, name, _path_param("signal", "The signal's name."), _IDEMPOTENCY_KEY],
                requestBody={"required": False, "content": _json(_schema("SignalRequest"))},
                responses=_outcome_responses(),
            )
        },
        f"{NS}/schedules": _read(
            "listSchedules", "The namespace's schedules, with their status.", [ns], "ItemList"
        ),
        f"{NS}/webhooks/{{path}}": {
            "post": {
                "operationId": "deliverWebhook",
                "summary": "A webhook Trigger's delivery. Authenticated by the Trigger's own "
                "HMAC signature or bearer secret, not by the API's tokens; the body is "
                "passed on as it is.",
                "security": [],
                "parameters": [ns, _path_param("path", "The Trigger's webhook path.")],
                "requestBody": {"required": False, "content": {"*/*": {}}},
                "responses": {
                    "200": _ok("What the Trigger did.", {"type": "object"}),
                    "202": _ok("What the Trigger did.", {"type": "object"}),
                    **_errors(401, 404, 413),
                },
            }
        },
    }
    bodies = {
        "redrive": "RedriveRequest",
        "skip-compensation": "SkipCompensationRequest",
    }
    for action in CONTROL_ACTIONS:
        body = bodies.get(action, "EmptyRequest")
        paths[f"{NS}/executions/{{name}}:{action}"] = {
            "post": _operation(
                f"{action.replace('-', '_')}Execution",
                f"Ask for `{action}` on an execution.",
                "patch",
                [ns, name],
                requestBody={
                    "required": action == "skip-compensation",
                    "content": _json(_schema(body)),
                },
                responses=_outcome_responses(),
            )
        }
    return paths


def _at_param() -> Doc:
    return {
        "name": "at",
        "in": "query",
        "required": True,
        "schema": {"type": "string", "format": "date-time"},
        "description": "The instant, RFC 3339 with an offset (2024-05-01T12:00:00Z).",
    }


def _list_params() -> list[Doc]:
    def query(name: str, schema: Doc, description: str) -> Doc:
        return {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schema,
            "description": description,
        }

    return [
        query("workflow", {"type": "string"}, "Only runs of this workflow."),
        query("phase", {"type": "string"}, "Only runs in this phase (e.g. Running)."),
        query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            "At most this many items.",
        ),
        query("continue", {"type": "string"}, "The `continue` of the previous page."),
    ]


def _outcome_responses() -> Doc:
    return {
        "200": _ok("Accepted, or a no-op (its effect already held).", _schema("Outcome")),
        "409": {
            "description": "Refused (reason `Refused`, with the run as it is), or a conflict.",
            "content": _json(_schema("Refused")),
        },
        **_errors(*_WRITE),
    }


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "reason", "message"],
            "properties": {
                "code": {"type": "integer", "description": "The HTTP status."},
                "reason": {"type": "string", "description": "A word: BadRequest, NotFound..."},
                "message": {"type": "string", "description": "What was wrong, for people."},
                "field": {"type": "string", "description": "The request field at fault."},
            },
        }
    },
}
_EXECUTION = {
    "type": "object",
    "description": "An Execution object as the CRD defines it (apiVersion sagaflow.io/v1alpha1).",
    "required": ["apiVersion", "kind", "metadata", "spec", "status"],
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"const": "Execution"},
        "metadata": {"type": "object"},
        "spec": {"type": "object"},
        "status": {"type": "object"},
    },
}


def _request(properties: Doc, required: tuple[str, ...] = ()) -> Doc:
    """A request body: unknown fields are refused (400 naming the field)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(required),
        "properties": properties,
    }


SCHEMAS: Doc = {
    "Error": _ERROR,
    "Execution": _EXECUTION,
    "Started": {
        "type": "object",
        "required": ["execution"],
        "properties": {"execution": _schema("Execution")},
    },
    "ExecutionPage": {
        "type": "object",
        "required": ["items", "continue"],
        "properties": {
            "items": {"type": "array", "items": _schema("Execution")},
            "continue": {"type": ["string", "null"], "description": "null: the last page."},
        },
    },
    "Object": {"type": "object"},
    "ItemList": {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": {"type": "object"}}},
    },
    "History": {
        "type": "object",
        "required": ["items"],
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        k: {} for k in ("at", "kind", "step", "attempt", "message", "data")
                    },
                },
            }
        },
    },
    "StateAt": {
        "type": "object",
        "required": ["at", "asOf", "phase", "steps", "timers", "state"],
        "properties": {
            "at": {"type": "string", "format": "date-time"},
            "asOf": {
                "type": "string",
                "format": "date-time",
                "description": "The last transition applied: the state held from then to `at`.",
            },
            "phase": {"type": "string"},
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {k: {} for k in ("name", "phase", "attempt")},
                },
            },
            "timers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {k: {} for k in ("key", "kind", "step", "attempt", "dueAt")},
                },
            },
            "state": {"type": "object", "description": "The engine's whole state then."},
        },
    },
    "Outcome": {
        "type": "object",
        "required": ["result", "message", "execution"],
        "properties": {
            "result": {"enum": ["accepted", "noop"]},
            "message": {"type": "string"},
            "execution": _schema("Execution"),
        },
    },
    "Refused": {
        "allOf": [_schema("Error")],
        "properties": {"execution": _schema("Execution")},
    },
    "StartRequest": _request(
        {
            "input": {"type": "object", "description": "The run's input."},
            "name": {"type": "string", "description": "The run's name; else one is made."},
            "correlationKey": {
                "type": "string",
                "description": "At most one unfinished run "
                "of the workflow in the namespace holds it.",
            },
        },
        ("input",),
    ),
    "SignalRequest": _request(
        {"data": {"description": "The signal's data: any JSON the workflow's schema allows."}}
    ),
    "EmptyRequest": _request({}),
    "RedriveRequest": _request(
        {
            "latest": {
                "type": "boolean",
                "default": False,
                "description": "Run the rest on the workflow's latest version.",
            }
        }
    ),
    "SkipCompensationRequest": _request(
        {"steps": {"type": "array", "items": {"type": "string"}, "minItems": 1}}, ("steps",)
    ),
}


def _error_response(description: str) -> Doc:
    return {"description": description, "content": _json(_schema("Error"))}


RESPONSES: Doc = {
    "BadRequest": _error_response("A bad body, parameter or header; `field` names it."),
    "Unauthorized": _error_response("No bearer token, or one that is not known."),
    "Forbidden": _error_response("The caller may not do this in this namespace."),
    "NotFound": _error_response("No such workflow, execution or route."),
    "Conflict": _error_response("A different request under a used key, or a held key."),
    "PayloadTooLarge": _error_response("The body is over the server's limit."),
    "UnsupportedMediaType": _error_response("The body is not application/json."),
    "InternalError": _error_response("The server failed; its log says why."),
}


def document() -> Doc:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sagaflow API",
            "version": "v1",
            "description": "Start, read, signal and control Sagaflow executions. Every error "
            "answer has the `Error` body; 405 answers name the allowed methods in `Allow`.",
        },
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "responses": RESPONSES,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


__all__ = ["CONTROL_ACTIONS", "document"]
