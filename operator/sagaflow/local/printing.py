"""How the CLI verbs print what the client interface returns, kubectl's way.

Everything here reads the API's JSON documents (Execution, Workflow and Schedule
objects, history rows), never engine state, so `sagaflow get` prints the same
thing whether it asked a server (`--server`) or read a state directly. Tables have
upper-case headers and aligned columns; `-o json` and `-o yaml` print a `List`
as `kubectl get -o json` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import yaml

from sagaflow.core.manifests import ExecutionPhase
from sagaflow.core.replay import TRANSITION


def as_list(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": list(items)}


def dump(value: Any, fmt: str) -> str:
    if fmt == "yaml":
        return yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip("\n")
    return json.dumps(value, indent=2, default=str)


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """kubectl's age: 45s, 12m, 3h, 5d."""
    if not timestamp:
        return "-"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = [
        "   ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)


def at_rest(execution: dict[str, Any]) -> bool:
    """Nothing more happens until someone acts (as `sagaflow run` waits for)."""
    status = execution.get("status") or {}
    phase = ExecutionPhase(status.get("phase", "Pending"))
    if not phase.at_rest or status.get("finally") == "Running":
        return False
    steps = status.get("steps") or []
    return phase is not ExecutionPhase.SUSPENDED or not any(
        s.get("phase") == "Running" for s in steps
    )


def _current(status: dict[str, Any]) -> str:
    return ",".join(status.get("currentSteps") or []) or "-"


def executions_table(items: Sequence[dict[str, Any]]) -> str:
    rows = [
        [
            e["metadata"]["name"],
            e["spec"]["workflowRef"]["name"],
            (e.get("status") or {}).get("phase", "Pending"),
            _current(e.get("status") or {}),
            age((e.get("status") or {}).get("startedAt")),
        ]
        for e in items
    ]
    return table(["NAME", "WORKFLOW", "PHASE", "CURRENT", "AGE"], rows)


def workflows_table(items: Sequence[dict[str, Any]]) -> str:
    rows = []
    for w in items:
        counts = w["status"].get("executions") or {}
        running = sum(n for p, n in counts.items() if not ExecutionPhase(p).at_rest)
        rows.append(
            [
                w["metadata"]["name"],
                str(w["status"]["version"]),
                str(len(w["spec"].get("steps", []))),
                str(running),
                str(counts.get("Completed", 0)),
                str(sum(counts.values()) - running - counts.get("Completed", 0)),
            ]
        )
    return table(["NAME", "VERSION", "STEPS", "RUNNING", "COMPLETED", "OTHER"], rows)


def schedules_table(items: Sequence[dict[str, Any]]) -> str:
    rows = []
    for s in items:
        spec, status = s["spec"], s.get("status") or {}
        rows.append(
            [
                s["metadata"]["name"],
                spec["workflowRef"]["name"],
                spec.get("cron") or f"every {spec.get('interval')}",
                spec.get("timezone", "UTC"),
                str(spec.get("suspend", False)).lower(),
                age(status.get("lastScheduleTime")),
                status.get("nextScheduleTime") or "-",
                str(len(status.get("active") or [])),
            ]
        )
    headers = ["NAME", "WORKFLOW", "SCHEDULE", "TIMEZONE", "SUSPEND", "LAST", "NEXT", "ACTIVE"]
    return table(headers, rows)


def history_table(rows: Sequence[dict[str, Any]]) -> str:
    return table(
        ["AT", "KIND", "STEP", "ATTEMPT", "MESSAGE"],
        [
            [
                r["at"],
                r["kind"],
                r.get("step") or "-",
                "-" if r.get("attempt") is None else str(r["attempt"]),
                r["message"],
            ]
            for r in rows
        ],
    )


def describe_execution(execution: dict[str, Any], history: Sequence[dict[str, Any]]) -> str:
    """`kubectl describe`'s layout: fields, the steps, conditions, the latest events."""
    meta, spec, status = execution["metadata"], execution["spec"], execution.get("status") or {}
    lines = [
        f"Name:         {meta['name']}",
        f"Namespace:    {meta['namespace']}",
        f"UID:          {meta.get('uid', '-')}",
        f"Workflow:     {spec['workflowRef']['name']} (v{status.get('workflowVersion', '?')})",
        f"Phase:        {status.get('phase', 'Pending')}",
        f"Started:      {status.get('startedAt', '-')}",
        f"Finished:     {status.get('finishedAt', '-')}",
        f"Input:        {json.dumps(spec.get('input', {}))}",
    ]
    if "error" in status:
        lines.append(f"Error:        {status['error'].get('message', status['error'])}")
    steps = status.get("steps") or []
    if steps:
        lines.append("Steps:")
        rows = [
            [
                s["name"],
                s["phase"],
                str(s.get("attempts", 0)),
                (s.get("compensation") or {}).get("phase", "-"),
                (s.get("error") or {}).get("message", s.get("reason", "")) or "",
            ]
            for s in steps
        ]
        body = table(["NAME", "PHASE", "ATTEMPTS", "COMPENSATION", "DETAIL"], rows)
        lines += ["  " + line for line in body.splitlines()]
    conditions = status.get("conditions") or []
    if conditions:
        lines.append("Conditions:")
        rows = [
            [c["type"], c["status"], c.get("reason", ""), c.get("message", "")] for c in conditions
        ]
        lines += [
            "  " + line
            for line in table(["TYPE", "STATUS", "REASON", "MESSAGE"], rows).splitlines()
        ]
    lines.append("Events:")
    # Transition rows are replay records, not lines (`local/timeline.py`).
    recent = [r for r in history if r["kind"] != TRANSITION][-10:]
    if not recent:
        lines.append("  <none>")
    else:
        lines += ["  " + line for line in history_table(recent).splitlines()]
    return "\n".join(lines)
