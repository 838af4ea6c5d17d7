"""OpenAPI v3 documents of the CRD-defined resources, and strict field validation.

`kubectl apply` validates by default (`--validate=strict`). It first reads the server's
OpenAPI v3 document of the object's group-version: if the kind's PATCH declares the
`fieldValidation` query parameter, kubectl leaves validation to the server and sends
`fieldValidation=Strict`; otherwise it validates by itself from the OpenAPI v2
document, which is served as protobuf only. So the in-memory server publishes, per
CRD group-version, a document with each resource's operations and its CRD schema, and
keeps the promise that document makes: with `fieldValidation=Strict`, a write holding
a field the CRD's structural schema does not declare is refused with 400, as
kube-apiserver refuses it. That makes `kubectl apply` of a manifest with a misspelt
field fail here as it fails on a cluster.

Not emulated: the rest of schema validation (types, patterns, required fields),
`fieldValidation=Warn` (the default of a real server: warn and prune), pruning, and
checks of `metadata` (kube-apiserver checks ObjectMeta by its own rules).

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

Schema = Mapping[str, Any]

_PRESERVE = "x-kubernetes-preserve-unknown-fields"


def _gvk(group: str, version: str, kind: str) -> dict[str, str]:
    return {"group": group, "version": version, "kind": kind}


def _operation(action: str, gvk: Mapping[str, str], writes: bool) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    if writes:
        # The parameter kubectl looks for to decide who validates (see the docstring).
        parameters = [
            {"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
            for name in ("dryRun", "fieldManager", "fieldValidation")
        ]
    return {
        "operationId": f"{action}{gvk['kind']}",
        "parameters": parameters,
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": dict(gvk),
    }


def group_version_document(crds: Iterable[Mapping[str, Any]], group: str, version: str) -> Any:
    """The OpenAPI v3 document of `group`/`version` as the CRDs define it, or None."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for crd in crds:
        spec = crd["spec"]
        if spec["group"] != group:
            continue
        for served in spec["versions"]:
            if served["name"] != version:
                continue
            names = spec["names"]
            gvk = _gvk(group, version, names["kind"])
            scope = "namespaces/{namespace}/" if spec["scope"] == "Namespaced" else ""
            collection = f"/apis/{group}/{version}/{scope}{names['plural']}"
            paths[collection] = {
                "get": _operation("list", gvk, writes=False),
                "post": _operation("post", gvk, writes=True),
            }
            paths[collection + "/{name}"] = {
                "get": _operation("get", gvk, writes=False),
                "put": _operation("put", gvk, writes=True),
                "patch": _operation("patch", gvk, writes=True),
                "delete": _operation("delete", gvk, writes=False),
            }
            reversed_group = ".".join(reversed(group.split(".")))
            schemas[f"{reversed_group}.{version}.{names['kind']}"] = {
                **served["schema"]["openAPIV3Schema"],
                "x-kubernetes-group-version-kind": [gvk],
            }
    if not paths:
        return None
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (in-memory test server)", "version": "unversioned"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def document_index(crds: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """`/openapi/v3`: where each group-version's document is, with a content hash.

    kubectl caches a document under its hash, so the hash must change with the content.
    """
    crds = list(crds)
    index: dict[str, Any] = {}
    for crd in crds:
        spec = crd["spec"]
        for served in spec["versions"]:
            key = f"apis/{spec['group']}/{served['name']}"
            document = group_version_document(crds, spec["group"], served["name"])
            digest = hashlib.sha512(json.dumps(document, sort_keys=True).encode()).hexdigest()
            index[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={digest.upper()}"}
    return {"paths": index}


def unknown_fields(value: Any, schema: Schema, path: str = "") -> list[str]:
    """Paths in `value` (like `spec.steps[0].retries`) that `schema` does not declare.

    A structural schema declares an object's fields in `properties`, its map values in
    an `additionalProperties` schema, or lets anything through with
    `x-kubernetes-preserve-unknown-fields` (declared fields are still checked inside).
    """
    found: list[str] = []
    if isinstance(value, Mapping):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in properties:
                found += unknown_fields(item, properties[key], where)
            elif isinstance(extra, Mapping):
                found += unknown_fields(item, extra, where)
            elif not schema.get(_PRESERVE) and extra is not True:
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for position, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{position}]")
    return found


def strict_errors(body: Mapping[str, Any], schema: Schema) -> list[str]:
    """What `fieldValidation=Strict` refuses in `body`: its undeclared fields, outside
    `metadata` (see the module docstring)."""
    checked = {key: value for key, value in body.items() if key != "metadata"}
    return [f'unknown field "{path}"' for path in unknown_fields(checked, schema)]


__all__ = ["document_index", "group_version_document", "strict_errors", "unknown_fields"]
