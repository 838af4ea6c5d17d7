"""Label and field selectors of list and watch requests, for the in-memory API server.

Clients narrow lists with `?labelSelector=` and `?fieldSelector=`; kubectl depends on
the latter to show an object's Events (`kubectl describe` lists core/v1 Events with
`involvedObject.name=...,involvedObject.namespace=...,involvedObject.kind=...,
involvedObject.uid=...`). A server that ignored the selector would show every
object's events under every object.

As on a real API server, field selectors accept only the field labels a resource
supports (`metadata.name` and `metadata.namespace` everywhere, plus Event's own), and
an unsupported label is a 400 rather than an empty answer. Label selectors take
equality (`=`, `==`, `!=`), sets (`in`, `notin`) and existence (`key`, `!key`).

Pure: parsing raises `SelectorError`; the server turns it into a 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Body = Mapping[str, Any]
Predicate = Callable[[Body], bool]

# Field labels every resource supports; Events add their own (as kube-apiserver does).
_COMMON_FIELDS = ("metadata.name", "metadata.namespace")
_INVOLVED = ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")
_EVENT_FIELDS = {f"involvedObject.{part}": f"involvedObject.{part}" for part in _INVOLVED} | {
    "reason": "reason",
    "reportingComponent": "reportingComponent",
    "source": "source.component",
    "type": "type",
}


class SelectorError(ValueError):
    """A selector that cannot be parsed, or names a field the resource does not support."""


def _lookup(body: Body, dotted: str) -> str:
    """The value at a dotted path as a field selector compares it: text, "" when absent."""
    node: Any = body
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return str(node).lower()
    return str(node)


def _split_unescaped(text: str, separator: str) -> list[str]:
    # Field selector values escape `\`, `,` and `=` with a backslash (as kubectl writes them).
    parts, current, escaped = [], "", False
    for char in text:
        if escaped:
            current += "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current + ("\\" if escaped else ""))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


_FIELD_TERM = re.compile(r"^(?P<key>[^=!]+?)\s*(?P<op>==|!=|=)\s*(?P<value>.*)$")


def field_selector(selector: str, kind: str | None) -> Predicate:
    """A predicate for a `fieldSelector` on objects of `kind` (e.g. "Event")."""
    supported = {name: name for name in _COMMON_FIELDS}
    if kind == "Event":
        supported.update(_EVENT_FIELDS)
    terms: list[tuple[str, bool, str]] = []  # (path, equal?, value)
    for raw in _split_unescaped(selector, ","):
        if not raw.strip():
            continue
        match = _FIELD_TERM.match(raw.strip())
        if match is None:
            raise SelectorError(f"invalid field selector term: {raw!r}")
        label = match["key"].strip()
        if label not in supported:
            raise SelectorError(f'field label not supported: "{label}"')
        terms.append((supported[label], match["op"] != "!=", _unescape(match["value"])))

    def matches(body: Body) -> bool:
        return all((_lookup(body, path) == value) == equal for path, equal, value in terms)

    return matches


_LABEL_SET_TERM = re.compile(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s+\((?P<values>[^)]*)\)$")
_LABEL_EQ_TERM = re.compile(r"^(?P<key>[^=!\s]+)\s*(?P<op>==|!=|=)\s*(?P<value>\S*)$")
_LABEL_EXISTS_TERM = re.compile(r"^(?P<negated>!?)\s*(?P<key>[^=!\s(),]+)$")


def _label_term(term: str) -> Callable[[Mapping[str, str]], bool]:
    if match := _LABEL_SET_TERM.match(term):
        key, values = match["key"], {v.strip() for v in match["values"].split(",")}
        if match["op"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _LABEL_EQ_TERM.match(term):
        key, value = match["key"], match["value"]
        if match["op"] == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if match := _LABEL_EXISTS_TERM.match(term):
        key, negated = match["key"], bool(match["negated"])
        return lambda labels: (key in labels) != negated
    raise SelectorError(f"invalid label selector term: {term!r}")


def label_selector(selector: str) -> Predicate:
    """A predicate for a `labelSelector` (equality, set and existence terms, ANDed)."""
    # Commas separate terms except inside the parentheses of a set term.
    terms = [t.strip() for t in re.split(r",(?![^(]*\))", selector) if t.strip()]
    checks = [_label_term(term) for term in terms]

    def matches(body: Body) -> bool:
        labels = (body.get("metadata") or {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return matches


def selectors_of(params: Mapping[str, str], kind: str | None) -> Predicate:
    """One predicate for the `fieldSelector` and `labelSelector` of a request's query."""
    fields = field_selector(params.get("fieldSelector", ""), kind)
    labels = label_selector(params.get("labelSelector", ""))
    return lambda body: fields(body) and labels(body)


__all__ = ["SelectorError", "field_selector", "label_selector", "selectors_of"]
