"""A harness for the engine's tests: build a definition from a manifest dict, feed
facts one at a time at fixed offsets from `T0`, keep the latest state. The real
clock is never read."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from sagaflow.core.definition import Definition, compile_definition
from sagaflow.core.engine import Decision, decide
from sagaflow.core.facts import Fact, Start, StepCompleted, StepFailed, TimerFired, TimerKind
from sagaflow.core.manifests import ExecutionPhase, StepPhase, WorkflowSpec
from sagaflow.core.state import ExecutionState, StepState, new_execution

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
TASK = "demo.task"

E = ExecutionPhase
S = StepPhase


def t(seconds: float) -> datetime:
    """The fixed clock: `seconds` after T0."""
    return T0 + timedelta(seconds=seconds)


def task(name: str, *depends_on: str, kind: str = TASK, **fields: Any) -> dict[str, Any]:
    """One step of a manifest; `fields` are camelCase manifest keys (input, retry, ...)."""
    step: dict[str, Any] = {"name": name, "type": kind}
    if depends_on:
        step["dependsOn"] = list(depends_on)
    step.update(fields)
    return step


def build(
    steps: list[dict[str, Any]],
    execution_input: dict[str, Any] | None = None,
    **workflow: Any,
) -> tuple[Definition, ExecutionState]:
    spec = WorkflowSpec.model_validate({"steps": steps, **workflow})
    definition = compile_definition(spec, name="orders", version=3)
    state = new_execution(
        execution_id="exec-1",
        namespace="shop",
        name="order-42",
        workflow="orders",
        version=3,
        input=execution_input or {},
        step_names=tuple(s["name"] for s in steps),
    )
    return definition, state


class Run:
    """Feeds facts to the engine one by one and keeps the latest state."""

    def __init__(
        self,
        steps: list[dict[str, Any]],
        execution_input: dict[str, Any] | None = None,
        **workflow: Any,
    ) -> None:
        self.definition, self.state = build(steps, execution_input, **workflow)
        self.states: list[ExecutionState] = [self.state]

    def __call__(self, fact: Fact, at: float = 0.0) -> Decision:
        decision = decide(self.state, self.definition, fact, t(at))
        self.state = decision.state
        self.states.append(decision.state)
        return decision

    def start(self, at: float = 0.0) -> Decision:
        return self(Start(), at)

    def complete(self, step: str, attempt: int, output: Any = None, at: float = 0.0) -> Decision:
        return self(StepCompleted(step, attempt, {} if output is None else output), at)

    def fail(
        self,
        step: str,
        attempt: int,
        error_type: str = "Boom",
        message: str = "kaput",
        *,
        retryable: bool = True,
        at: float = 0.0,
    ) -> Decision:
        return self(StepFailed(step, attempt, error_type, message, retryable), at)

    def fire(self, kind: TimerKind, step: str = "", attempt: int = 0, at: float = 0.0) -> Decision:
        return self(TimerFired(kind, step, attempt), at)

    def step(self, name: str) -> StepState:
        return self.state.steps[name]

    def phases(self) -> dict[str, StepPhase]:
        return {name: s.phase for name, s in self.state.steps.items()}


def dispatched(decision: Decision) -> list[tuple[str, int]]:
    return [(d.step, d.attempt) for d in decision.dispatches]


def kinds(decision: Decision) -> list[str]:
    return [r.kind for r in decision.records]


def assert_ignored(decision: Decision, before: ExecutionState, reason: str) -> None:
    assert not decision.applied
    assert decision.ignored is not None
    assert reason in decision.ignored
    assert decision.state is before
    assert decision.dispatches == ()
    assert decision.timers == ()
    assert decision.cancel_timers == ()
    assert decision.records == ()


# ------------------------------------------------ an adversarial delivery layer

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def fresh(definition: Definition) -> ExecutionState:
    return new_execution(
        execution_id="e1",
        namespace="default",
        name="run",
        workflow="w",
        version=1,
        input={"seed": 1},
        step_names=tuple(s.name for s in definition.steps),
    )


def outcome(script: dict[str, Any], step: str, attempt: int, compensation: bool = False) -> Fact:
    """The scripted result of an attempt; a compensation's script is `<step>/undo`."""
    plan = script[f"{step}/undo" if compensation else step]
    kind = plan[min(attempt, len(plan)) - 1]
    if kind == "ok":
        return StepCompleted(step, attempt, {"v": f"{step}#{attempt}"}, compensation)
    return StepFailed(step, attempt, "Boom", "scripted", kind == "retry", compensation)


class World:
    """Pending deliverable facts, produced by decisions as a real bus and timer table would."""

    def __init__(self, definition: Definition, script: dict[str, Any]) -> None:
        self.definition = definition
        self.script = script
        self.pending: list[Fact] = []
        self.timers: dict[str, Fact] = {}
        self.delivered: list[Fact] = []
        self.applied_results: Counter[tuple[str, int, bool]] = Counter()

    def absorb(self, decision: Decision) -> None:
        for key in decision.cancel_timers:
            fact = self.timers.pop(key, None)
            if fact in self.pending:
                self.pending.remove(fact)
        for timer in decision.timers:
            old = self.timers.pop(timer.key, None)
            if old in self.pending:
                self.pending.remove(old)
            fact = TimerFired(timer.kind, timer.step, timer.attempt)
            self.timers[timer.key] = fact
            self.pending.append(fact)
        for d in decision.dispatches:
            self.pending.append(outcome(self.script, d.step, d.attempt, d.compensation))

    def deliver(self, state: ExecutionState, fact: Fact) -> ExecutionState:
        self.delivered.append(fact)
        decision = decide(state, self.definition, fact, NOW)
        if decision.applied and isinstance(fact, StepCompleted | StepFailed):
            self.applied_results[(fact.step, fact.attempt, fact.compensation)] += 1
        self.absorb(decision)
        return decision.state


def replay(definition: Definition, facts: list[Fact]) -> ExecutionState:
    state = decide(fresh(definition), definition, Start(), NOW).state
    for fact in facts:
        state = decide(state, definition, fact, NOW).state
    return state
