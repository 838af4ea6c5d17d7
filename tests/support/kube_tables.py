"""Server-side Tables, the columns of `kubectl get`, for the in-memory API server.

kubectl asks for lists and objects as `application/json;as=Table;v=v1;g=meta.k8s.io`
and prints the columns the server answers with. For a custom resource the API server
takes them from the CRD version's `additionalPrinterColumns` and evaluates each
column's `jsonPath` on the object. The server builds `PrinterColumns` from the CRDs of
`sagaflow.core.crds.custom_resource_definitions()`, so a test of `kubectl get` checks
the columns the chart installs, never a copy of them.

Rules kept from kube-apiserver: the first column is the object's name; a cell holds the
first match of its column's JSONPath, or null (kubectl prints it blank) when nothing
matches or the value does not fit an `integer`, `number` or `boolean` column; a `string`
cell prints other JSON values as text; a `date` cell holds the age ("45s", "3m12s",
"2d4h"), which the server computes, not kubectl. Each row carries the object's metadata
(`includeObject=Metadata`, the default), the whole object (`Object`) or nothing (`None`).
A CRD version without printer columns gets Name and Age.

JSONPath is jsonpath-ng's extended parser, which reads the filters CRDs use
(`[?(@.type=="Ready")]`), with kubectl's implicit root `$` put in front.

Pure: no I/O; the clock is passed in.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from jsonpath_ng import JSONPath
from jsonpath_ng.ext.parser import parse as parse_jsonpath

Body = Mapping[str, Any]

META_GROUP = "meta.k8s.io"
TABLE_VERSIONS = ("v1", "v1beta1")

_NAME_COLUMN = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "description": "The object's metadata.name, unique within its namespace.",
    "priority": 0,
}


def requested_table_version(accept: str) -> str | None:
    """The Table version an `Accept` header asks for first, or None for plain objects.

    Media types are tried in the client's order, as kube-apiserver negotiates:
    `application/json;as=Table;v=v1;g=meta.k8s.io,...,application/json` gets a v1 Table.
    """
    for media_type in accept.split(","):
        essence, *raw_params = (part.strip() for part in media_type.split(";"))
        params = dict(p.partition("=")[::2] for p in raw_params)
        if params.get("as") == "Table":
            if params.get("g") == META_GROUP and params.get("v") in TABLE_VERSIONS:
                return params["v"]
            continue  # a Table version we cannot render: try the client's next choice
        if essence in ("application/json", "*/*", "application/*") and "as" not in params:
            return None
    return None


@functools.lru_cache(maxsize=256)
def _compiled(path: str) -> JSONPath:
    # kubectl's JSONPath starts at the object (`.status.phase`); jsonpath-ng wants `$`.
    return parse_jsonpath("$" + path if path.startswith((".", "[")) else path)


def first_match(path: str, body: Body) -> Any:
    """The first value kubectl-style JSONPath `path` finds in `body`, or None."""
    matches = _compiled(path).find(body)
    return matches[0].value if matches else None


def human_duration(seconds: float) -> str:
    """An age as kubectl prints it: coarser as it grows ("59s", "5m3s", "3h", "2d4h")."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"  # a clock skew beyond a second, as kube-apiserver reports it
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes, hours, days = whole // 60, whole // 3600, whole // 86400
    # (limit, coarse unit, its value, finer unit, the finer remainder); a zero remainder
    # is left out, and below `limit` the finer unit is shown too.
    steps = (
        (10 * 60, "m", minutes, "s", whole % 60),
        (3 * 3600, "m", minutes, "", 0),
        (8 * 3600, "h", hours, "m", minutes % 60),
        (48 * 3600, "h", hours, "", 0),
        (8 * 86400, "d", days, "h", hours % 24),
        (2 * 365 * 86400, "d", days, "", 0),
        (8 * 365 * 86400, "y", days // 365, "d", days % 365),
    )
    for limit, unit, value, finer, rest in steps:
        if whole < limit:
            return f"{value}{unit}" + (f"{rest}{finer}" if rest else "")
    return f"{days // 365}y"


def _as_text(value: Any) -> str:
    # How kube-apiserver prints a non-string JSON value into a `string` column.
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)  # as Go writes a map


def _age(value: Any, now: datetime.datetime) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        return "<invalid>"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return human_duration((now - moment).total_seconds())


def cell(kind: str, value: Any, now: datetime.datetime) -> Any:
    """The cell of a column of type `kind` for a JSONPath result `value` (None: empty)."""
    if value is None:
        return None
    if kind == "string":
        return _as_text(value)
    if kind == "date":
        return _age(value, now)
    if kind == "boolean":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # numeric columns take numbers only (JSON has no bool/int distinction)
    if kind == "integer":
        return int(value) if float(value).is_integer() else None
    if kind == "number":
        return value
    return None


@attrs.frozen
class PrinterColumns:
    """The printer columns of one served version of a CRD, and the Tables they render."""

    columns: tuple[Mapping[str, Any], ...]

    @classmethod
    def of_crd_version(cls, version: Mapping[str, Any]) -> PrinterColumns:
        """From one entry of a CRD's `spec.versions`; with no columns, Name and Age."""
        declared = version.get("additionalPrinterColumns")
        if declared is None:
            declared = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        return cls(columns=tuple(declared))

    def definitions(self) -> list[dict[str, Any]]:
        return [_NAME_COLUMN] + [
            {
                "name": column["name"],
                "type": column["type"],
                "format": column.get("format", ""),
                "description": column.get("description", ""),
                "priority": column.get("priority", 0),
            }
            for column in self.columns
        ]

    def row(self, body: Body, include: str, table_version: str, now: datetime.datetime) -> Any:
        cells = [body.get("metadata", {}).get("name")] + [
            cell(column["type"], first_match(column["jsonPath"], body), now)
            for column in self.columns
        ]
        row: dict[str, Any] = {"cells": cells}
        if include == "Object":
            row["object"] = dict(body)
        elif include != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": f"{META_GROUP}/{table_version}",
                "metadata": body.get("metadata", {}),
            }
        return row

    def table(
        self,
        bodies: Iterable[Body],
        *,
        resource_version: str,
        table_version: str = "v1",
        include: str = "Metadata",
        now: datetime.datetime | None = None,
    ) -> dict[str, Any]:
        """A `meta.k8s.io` Table of `bodies` (`include` is the `includeObject` parameter)."""
        moment = now or datetime.datetime.now(tz=datetime.UTC)
        return {
            "kind": "Table",
            "apiVersion": f"{META_GROUP}/{table_version}",
            "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": self.definitions(),
            "rows": [self.row(body, include, table_version, moment) for body in bodies],
        }


__all__ = [
    "PrinterColumns",
    "cell",
    "first_match",
    "human_duration",
    "requested_table_version",
]
