"""How local mode shows executions: live progress while they run, and the final listing.

Progress stays cheap however many executions a run has: it is drawn from counts by
phase and a handful of rows (all of them for a small run, else the oldest still
going), never from every execution on every pass. Running steps show their attempt
and how long they have run, so a step without a timeout that hangs is plain to see.
On a terminal the table is redrawn in place; otherwise each execution is printed
once when it finishes, and every `waiting_every` seconds a line says what is still
running.

The final listing is written page by page: `-o json` / `-o yaml` print a
Kubernetes-style `List` of Execution objects with status (the shape `kubectl get
executions -o json` gives on a cluster), the table lines up across all pages.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import yaml

from sagaflow.adapters.postgres.reads import Finished
from sagaflow.core.manifests import ExecutionPhase, StepPhase
from sagaflow.core.state import ExecutionState
from sagaflow.core.status import execution_object, undo_failure

# A run this small is shown whole; a larger one as counts and its oldest running rows.
SMALL_RUN = 20
SHOWN_RUNNING = 15


def as_list(states: Sequence[ExecutionState]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": [execution_object(s) for s in states]}


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _duration(state: ExecutionState, now: datetime) -> str:
    if state.started_at is None:
        return "-"
    end = state.finished_at or now  # still running: time so far
    return f"{(end - state.started_at).total_seconds():.2f}s"


def current_detail(state: ExecutionState, now: datetime) -> str:
    """Where a running execution is: each running step with its attempt and how long it
    has run, each retrying one with when it tries again; the same for compensations."""
    parts = []
    for s in state.steps.values():
        undo = s.undo
        if s.phase is StepPhase.RUNNING:
            since = s.attempt_started_at or s.started_at or now
            parts.append(
                f"{s.name} (attempt {s.attempt}, {_seconds((now - since).total_seconds())})"
            )
        elif s.phase is StepPhase.RETRYING and s.next_retry_at is not None:
            wait = max(0.0, (s.next_retry_at - now).total_seconds())
            parts.append(f"{s.name} (attempt {s.attempt + 1} in {_seconds(wait)})")
        elif undo is not None and undo.status == "running":
            since = undo.attempt_started_at or now
            took = _seconds((now - since).total_seconds())
            parts.append(f"undoing {s.name} (attempt {undo.attempt}, {took})")
        elif undo is not None and undo.status == "retrying" and undo.next_retry_at is not None:
            wait = max(0.0, (undo.next_retry_at - now).total_seconds())
            parts.append(f"undoing {s.name} (attempt {undo.attempt + 1} in {_seconds(wait)})")
    return "at " + ", ".join(parts) if parts else ""


def _detail(state: ExecutionState, now: datetime) -> str:
    """What a person needs to know: what to act on, why it failed, or where it is."""
    if state.phase is ExecutionPhase.COMPENSATION_FAILED:
        return undo_failure(state)[0]
    parts = []
    if state.phase is ExecutionPhase.SUSPENDED:
        parts.append("suspended; resume it with `sagaflow resume`")
    if state.error is not None:
        parts.append(f"{state.error.type}: {state.error.message}")
    if not state.at_rest or state.phase is ExecutionPhase.SUSPENDED:
        parts.append(current_detail(state, now))
    return "; ".join(p for p in parts if p)


def _row(state: ExecutionState, now: datetime) -> list[str]:
    done = sum(1 for s in state.steps.values() if s.phase is StepPhase.SUCCEEDED)
    attempts = sum(s.attempt + (s.undo.attempt if s.undo else 0) for s in state.steps.values())
    detail = _detail(state, now)
    return [
        state.namespace,
        state.name,
        f"{state.workflow}:v{state.version}",
        state.phase.value,
        f"{done}/{len(state.steps)}",
        str(attempts),
        _duration(state, now),
        detail,
    ]


HEADER = ["NAMESPACE", "NAME", "WORKFLOW", "PHASE", "STEPS", "ATTEMPTS", "DURATION", "DETAIL"]


def _widths(rows: Sequence[Sequence[str]], widths: list[int] | None = None) -> list[int]:
    widths = widths or [len(h) for h in HEADER[:-1]]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=False)]
    return widths


def _lines(rows: Sequence[Sequence[str]], widths: list[int]) -> list[str]:
    return [
        ("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "   " + r[-1]).rstrip()
        for r in rows
    ]


def table(states: Sequence[ExecutionState], now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    rows = [HEADER, *(_row(s, now) for s in states)]
    return "\n".join(_lines(rows, _widths(rows)))


def render(states: Sequence[ExecutionState], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(as_list(states), indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(as_list(states), sort_keys=False)
    return table(states)


Pages = Callable[[], AsyncIterator[list[ExecutionState]]]


async def write_listing(out: TextIO, fmt: str, pages: Pages) -> dict[str, int]:
    """Write the final listing from `pages` (called twice for a table, which lines up
    across pages); return the count of executions by phase."""
    counts: dict[str, int] = {}
    now = datetime.now(UTC)
    if fmt == "table":
        widths = _widths([HEADER])
        async for page in pages():
            widths = _widths([_row(s, now) for s in page], widths)
        out.write(_lines([HEADER], widths)[0] + "\n")
    elif fmt == "json":
        out.write('{\n  "apiVersion": "v1",\n  "kind": "List",\n  "items": [')
    else:
        out.write("apiVersion: v1\nkind: List\nitems:")
    first = True
    async for page in pages():
        for state in page:
            counts[state.phase.value] = counts.get(state.phase.value, 0) + 1
            if fmt == "table":
                out.write(_lines([_row(state, now)], widths)[0] + "\n")
            elif fmt == "json":
                item = json.dumps(execution_object(state), indent=2).replace("\n", "\n    ")
                out.write(("\n    " if first else ",\n    ") + item)
            else:
                out.write(
                    "\n" + yaml.safe_dump([execution_object(state)], sort_keys=False).rstrip()
                )
            first = False
    if fmt == "json":
        out.write("\n  ]\n}\n" if not first else "]\n}\n")
    elif fmt == "yaml":
        out.write(" []\n" if first else "\n")
    out.flush()
    return counts


@dataclass
class Snapshot:
    """What progress shows after one look at the database."""

    requested: int
    started: int
    counts: dict[str, int]
    rows: list[ExecutionState]  # every execution of a small run, else the oldest going
    # Executions at rest (terminal, CompensationFailed, suspended and idle).
    done: int = 0
    finished: list[Finished] = field(default_factory=list)  # newly at rest, for logs


class Progress:
    """Redraws a table in place on a terminal; prints finished executions otherwise."""

    def __init__(
        self,
        stream: TextIO,
        *,
        waiting_every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self._lines = 0
        self._reported: set[str] = set()
        self._waiting_every = waiting_every
        self._clock = clock
        self._said_waiting = clock()

    def update(self, snapshot: Snapshot) -> None:
        now = datetime.now(UTC)
        if self.live:
            text = table(snapshot.rows, now)
            if snapshot.requested > SMALL_RUN or snapshot.started < snapshot.requested:
                text += "\n" + _summary(snapshot)
            if self._lines:
                self.stream.write(f"\x1b[{self._lines}F\x1b[J")
            self.stream.write(text + "\n")
            self._lines = text.count("\n") + 1
        else:
            finished = snapshot.finished or [
                Finished(s.execution_id, s.key, s.phase.value) for s in snapshot.rows if s.at_rest
            ]
            for f in finished:
                if f.execution_id not in self._reported:
                    self._reported.add(f.execution_id)
                    self.stream.write(f"{f.key}: {f.phase}\n")
            going = [s for s in snapshot.rows if not s.at_rest]
            if going and self._clock() - self._said_waiting >= self._waiting_every:
                self._said_waiting = self._clock()
                shown = "; ".join(f"{s.key} {current_detail(s, now)}" for s in going[:5])
                more = (
                    f" (and {snapshot.started - snapshot.done - 5} more)" if len(going) > 5 else ""
                )
                self.stream.write(f"{_summary(snapshot)}; waiting on {shown}{more}\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.live and self._lines:
            self.stream.write(f"\x1b[{self._lines}F\x1b[J")
            self.stream.flush()
            self._lines = 0


def _summary(s: Snapshot) -> str:
    phases = ", ".join(f"{n} {phase}" for phase, n in sorted(s.counts.items()) if n)
    started = f"{s.started} of {s.requested} started" if s.started < s.requested else ""
    return f"{s.requested} executions: " + ", ".join(p for p in (phases, started) if p)
