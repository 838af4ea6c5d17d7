"""How local mode shows executions: live progress on a terminal, and the final listing.

`-o json` / `-o yaml` print a Kubernetes-style `List` of Execution objects with
status, the same shape `kubectl get executions -o json` gives on a cluster.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import yaml

from sagaflow.core.manifests import StepPhase
from sagaflow.core.state import ExecutionState
from sagaflow.core.status import current_steps, execution_object


def as_list(states: Sequence[ExecutionState]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": [execution_object(s) for s in states]}


def _duration(state: ExecutionState) -> str:
    if state.started_at is None:
        return "-"
    end = state.finished_at or datetime.now(UTC)  # still running: time so far
    return f"{(end - state.started_at).total_seconds():.2f}s"


def _row(state: ExecutionState) -> list[str]:
    done = sum(1 for s in state.steps.values() if s.phase is StepPhase.SUCCEEDED)
    attempts = sum(s.attempt for s in state.steps.values())
    detail = ""
    if state.error is not None:
        detail = f"{state.error.type}: {state.error.message}"
    elif current := current_steps(state):
        detail = "at " + ", ".join(current)
    return [
        state.namespace,
        state.name,
        f"{state.workflow}:v{state.version}",
        state.phase.value,
        f"{done}/{len(state.steps)}",
        str(attempts),
        _duration(state),
        detail,
    ]


HEADER = ["NAMESPACE", "NAME", "WORKFLOW", "PHASE", "STEPS", "ATTEMPTS", "DURATION", "DETAIL"]


def table(states: Sequence[ExecutionState]) -> str:
    rows = [HEADER, *(_row(s) for s in states)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "   " + r[-1]
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def render(states: Sequence[ExecutionState], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(as_list(states), indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(as_list(states), sort_keys=False)
    return table(states)


class Progress:
    """Redraws the table in place on a terminal; prints finished executions otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self._lines = 0
        self._reported: set[str] = set()

    def update(self, states: Sequence[ExecutionState]) -> None:
        if self.live:
            text = table(states)
            if self._lines:
                self.stream.write(f"\x1b[{self._lines}F\x1b[J")
            self.stream.write(text + "\n")
            self._lines = text.count("\n") + 1
        else:
            for s in states:
                if s.phase.is_terminal and s.execution_id not in self._reported:
                    self._reported.add(s.execution_id)
                    self.stream.write(f"{s.key}: {s.phase.value}\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.live and self._lines:
            self.stream.write(f"\x1b[{self._lines}F\x1b[J")
            self.stream.flush()
            self._lines = 0
