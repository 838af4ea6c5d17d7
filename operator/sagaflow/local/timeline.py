"""`sagaflow history`: an execution's history as a timeline, and its state at an instant.

The history rows come from the API as they are stored. A `Transition` row records
what the transition after it applied and why (`core/replay.py`); the timeline does
not show it as a line of its own but gives its cause (`message:<id>`, `timer:<key>`,
`request:<id>`, `signal:<id>`, `start`, `admission`, `parent:<run>/<step>/<attempt>`)
to the lines that transition wrote. Each line also gets its offset from the first
line, and a line that settles an attempt (a result, a retry, a timeout) or ends a
wait gets the time since the line that began it (dispatch, or the wait's timer set).
Rows written before Transition rows existed have no cause; everything else works.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sagaflow.core.replay import TRANSITION
from sagaflow.local.printing import table

# Lines that begin what a later line of the same step, attempt and side settles.
_OPENERS = frozenset(
    {
        "StepDispatched",
        "ItemDispatched",
        "StepCompensating",
        "ItemCompensating",
        "StepWaiting",
        "StepWaitingForSignal",
    }
)
_SETTLING = ("Succeeded", "Failed", "Retrying", "TimedOut", "Compensated", "InDoubt")


def _side(kind: str) -> bool:
    return "Compensat" in kind


def timeline(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history's lines without Transition rows, each with `cause`,
    `offsetSeconds` (from the first line) and `durationSeconds` (or None)."""
    out: list[dict[str, Any]] = []
    cause: str | None = None
    began: datetime | None = None
    open_: dict[tuple[str, int, bool], datetime] = {}
    for row in rows:
        at = datetime.fromisoformat(row["at"])
        began = began or at
        if row["kind"] == TRANSITION:
            data = row.get("data") or {}
            cause = data.get("cause") if isinstance(data, dict) else None
            continue
        kind, step, attempt = row["kind"], row.get("step"), row.get("attempt")
        duration = None
        if step is not None and attempt is not None:
            key = (step, attempt, _side(kind))
            if kind in _OPENERS:
                open_[key] = at
            elif kind.endswith(_SETTLING) and key in open_:
                duration = (at - open_.pop(key)).total_seconds()
        line = {k: v for k, v in row.items() if k != "data"}
        line["data"] = row.get("data")
        line["cause"] = cause
        line["offsetSeconds"] = (at - began).total_seconds()
        line["durationSeconds"] = duration
        out.append(line)
    return out


def seconds(value: float | None) -> str:
    """1.5 -> "1.500s", 125 -> "2m05.000s"; None -> "-"."""
    if value is None:
        return "-"
    minutes, rest = divmod(value, 60)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours}h{minutes:02d}m{rest:06.3f}s"
    if minutes:
        return f"{minutes}m{rest:06.3f}s"
    return f"{rest:.3f}s"


def timeline_table(lines: Sequence[dict[str, Any]]) -> str:
    return table(
        ["AT", "OFFSET", "KIND", "STEP", "ATTEMPT", "CAUSE", "DURATION", "MESSAGE"],
        [
            [
                line["at"],
                "+" + seconds(line["offsetSeconds"]),
                line["kind"],
                line.get("step") or "-",
                "-" if line.get("attempt") is None else str(line["attempt"]),
                line.get("cause") or "-",
                seconds(line.get("durationSeconds")),
                line["message"],
            ]
            for line in lines
        ],
    )


def state_text(doc: dict[str, Any]) -> str:
    """`sagaflow history NAME --at TIME`: the phase, the steps, the pending timers."""
    lines = [
        f"At:      {doc['at']}",
        f"As of:   {doc['asOf']} (the last transition at or before it)",
        f"Phase:   {doc['phase']}",
        "Steps:",
    ]
    steps = [[s["name"], s["phase"], str(s["attempt"])] for s in doc["steps"]]
    lines += ["  " + x for x in table(["NAME", "PHASE", "ATTEMPT"], steps).splitlines()]
    lines.append("Timers:")
    if not doc["timers"]:
        lines.append("  <none>")
    else:
        rows = [
            [t["key"], t["kind"], t["step"] or "-", str(t["attempt"]), t["dueAt"]]
            for t in doc["timers"]
        ]
        header = ["KEY", "KIND", "STEP", "ATTEMPT", "DUE"]
        lines += ["  " + x for x in table(header, rows).splitlines()]
    return "\n".join(lines)
