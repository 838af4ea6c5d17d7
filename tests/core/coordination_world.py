"""A delivery layer for the coordination property tests (when, forEach, signals,
child workflows): `harness.World` plus a record of every decision, and the JSON
round trip of every state it reaches checked on the way."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.core.harness import NOW, World

from sagaflow.core.decisions import Decision, Dispatch
from sagaflow.core.definition import Definition
from sagaflow.core.engine import decide
from sagaflow.core.facts import Fact, Start, StepCompleted, StepFailed
from sagaflow.core.state import ExecutionState, new_execution


def check_round_trip(state: ExecutionState) -> None:
    """The stored form of `state` reads back as `state`: the same JSON form (through JSON
    text, as Postgres keeps it), and the same value (so nothing is left out of it)."""
    text = json.dumps(state.to_json())
    back = ExecutionState.from_json(json.loads(text))
    assert json.dumps(back.to_json()) == text, "the JSON form changes on a round trip"
    assert back == state, "the state read back differs from the state stored"
    if back.steps != state.steps:  # pragma: no cover - a finer message for the above
        raise AssertionError([n for n in state.steps if back.steps[n] != state.steps[n]])


def execution(definition: Definition, execution_input: dict[str, Any]) -> ExecutionState:
    """A new execution of `definition`, its `finally` steps included."""
    return new_execution(
        execution_id="e1",
        namespace="default",
        name="run",
        workflow="w",
        version=1,
        input=execution_input,
        step_names=definition.step_names,
    )


class Bus(World):
    """`World`, plus the latest state, every (fact, decision) pair and every dispatch."""

    def __init__(
        self, definition: Definition, script: dict[str, Any], state: ExecutionState
    ) -> None:
        super().__init__(definition, script)
        self.state = state
        self.log: list[tuple[Fact, Decision, ExecutionState]] = []  # fact, decision, before
        self.dispatched: Counter[tuple[str, int, bool]] = Counter()
        self.checks: list[Callable[[Fact, Decision, ExecutionState], None]] = []
        check_round_trip(state)

    def send(self, fact: Fact) -> Decision:
        before = self.state
        decision = decide(before, self.definition, fact, NOW)
        self.delivered.append(fact)
        if decision.applied and isinstance(fact, StepCompleted | StepFailed):
            self.applied_results[(fact.step, fact.attempt, fact.compensation)] += 1
        if decision.ignored is not None:
            assert decision.state is before, (fact, decision.ignored)
            assert not decision.dispatches and not decision.timers and not decision.records
        self.absorb(decision)
        for d in decision.dispatches:
            self.dispatched[(d.step, d.attempt, d.compensation)] += 1
        check_round_trip(decision.state)
        self.log.append((fact, decision, before))
        self.state = decision.state
        for check in self.checks:
            check(fact, decision, before)
        return decision

    def start(self) -> Decision:
        return self.send(Start())

    def run(
        self,
        pick: Callable[[int], int],
        noise: Callable[[], Fact | None] = lambda: None,
        limit: int = 3000,
    ) -> None:
        """Deliver pending facts in the order `pick(len(pending))` chooses; before each,
        `noise()` may give a fact to deliver first (a duplicate, a stale result)."""
        for _ in range(limit):
            extra = noise()
            if extra is not None:
                self.send(extra)
                continue
            if not self.pending:
                return
            self.send(self.pending.pop(pick(len(self.pending))))
        raise AssertionError(f"no rest after {limit} deliveries")

    def dispatches(self) -> list[tuple[Dispatch, Decision]]:
        return [(d, decision) for _, decision, _ in self.log for d in decision.dispatches]

    def applied(self, step: str, compensation: bool = False) -> int:
        """How many results of `step` (any attempt) were applied."""
        return sum(
            n for (s, _, c), n in self.applied_results.items() if s == step and c == compensation
        )
