"""JSON merge patch (RFC 7386) and JSON patch (RFC 6902), as the in-memory API server
applies them.

kopf writes with both: merge patches for status and metadata, JSON patches whose first
operation is a `test` of `/metadata/resourceVersion` (its optimistic lock). A failed
`test` raises `JsonPatchTestFailed`, which the server answers with 422 as
kube-apiserver does. Strategic merge is not implemented: the server treats it as a
merge patch, which is the same for custom resources.

Pure: no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, `None` removes a key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class JsonPatchTestFailed(Exception):
    """A `test` operation of a JSON patch did not hold."""


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"Bad JSON pointer: {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def json_patch(doc: Any, ops: list[Mapping[str, Any]]) -> Any:
    """RFC 6902 JSON patch with the operations clients send: test/add/remove/replace."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        kind = op["op"]
        if kind == "test":
            try:
                actual = _walk(doc, parts)
            except (KeyError, IndexError, ValueError) as e:
                raise JsonPatchTestFailed(op["path"]) from e
            if actual != op["value"]:
                raise JsonPatchTestFailed(op["path"])
            continue
        if not parts:
            if kind in ("add", "replace"):
                doc = copy.deepcopy(op["value"])
                continue
            raise ValueError(f"Cannot {kind} the whole document")
        parent = _walk(doc, parts[:-1])
        last = parts[-1]
        if kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind == "replace":
            index: Any = int(last) if isinstance(parent, list) else last
            if not isinstance(parent, list) and last not in parent:
                raise KeyError(last)
            parent[index] = copy.deepcopy(op["value"])
        else:
            raise ValueError(f"Unsupported JSON patch operation: {kind!r}")
    return doc


__all__ = ["JsonPatchTestFailed", "json_patch", "merge_patch"]
