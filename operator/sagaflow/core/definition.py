"""Compiled workflow definitions: what the engine reads on every transition.

A `WorkflowSpec` (manifest) is compiled once per stored version into frozen
dataclasses with durations in seconds, dependents precomputed and steps in
topological order, so the hot path never parses strings or walks the manifest.
Compilation assumes the spec passed `sagaflow.core.validation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sagaflow.core.durations import parse_duration
from sagaflow.core.manifests import (
    CompensationPolicy,
    InDoubt,
    RetryPolicy,
    StepSpec,
    WorkflowSpec,
)

PASS = "sagaflow.pass"  # noqa: S105 - a step type, not a secret
WAIT = "sagaflow.wait"
FAIL = "sagaflow.fail"
WAIT_SIGNAL = "sagaflow.waitForSignal"
# The type a `workflowRef` step has: its attempt is a child execution, not a command.
CHILD = "sagaflow.workflow"
BUILTIN_TYPES = frozenset({PASS, WAIT, FAIL, WAIT_SIGNAL})


@dataclass(frozen=True, slots=True)
class Retry:
    max_attempts: int
    initial_interval: float
    backoff_coefficient: float
    max_interval: float
    non_retryable_errors: frozenset[str]

    @classmethod
    def from_policy(cls, policy: RetryPolicy) -> Retry:
        return cls(
            max_attempts=policy.max_attempts,
            initial_interval=parse_duration(policy.initial_interval),
            backoff_coefficient=policy.backoff_coefficient,
            max_interval=parse_duration(policy.max_interval),
            non_retryable_errors=frozenset(policy.non_retryable_errors),
        )

    def delay_after(self, attempt: int) -> float:
        """Backoff before the attempt that follows failed attempt `attempt` (1-based)."""
        try:
            raw = self.initial_interval * self.backoff_coefficient ** (attempt - 1)
        except OverflowError:  # far past the cap; floats raise here instead of giving inf
            return self.max_interval
        return min(raw, self.max_interval)


@dataclass(frozen=True, slots=True)
class CompensateDef:
    type: str
    input: Any
    retry: Retry
    timeout: float | None


@dataclass(frozen=True, slots=True)
class StepDef:
    name: str
    type: str
    input: Any
    depends_on: tuple[str, ...]
    dependents: tuple[str, ...]
    retry: Retry
    timeout: float | None
    heartbeat_timeout: float | None
    compensate: CompensateDef | None = None
    pivot: bool = False
    # Every step that depends on this one, directly or not: their undo comes first.
    descendants: frozenset[str] = frozenset()
    when: str | None = None  # a template; falsy: the step is Skipped
    for_each: str | None = None  # a template giving the list of items
    max_parallel: int = 0  # item runs at once; 0: no limit
    tolerated_failures: int = 0
    workflow: str | None = None  # the child workflow of a CHILD step
    final: bool = False  # a `finally` step

    @property
    def fan_out(self) -> bool:
        return self.for_each is not None


@dataclass(frozen=True, slots=True)
class Compensation:
    on_cancel: bool = True
    in_doubt: InDoubt = InDoubt.AWAIT
    max_parallel: int = 0  # 0: no limit

    @classmethod
    def from_policy(cls, policy: CompensationPolicy | None) -> Compensation:
        if policy is None:
            return cls()
        return cls(policy.on_cancel, policy.in_doubt, policy.max_parallel)


@dataclass(frozen=True, slots=True)
class Definition:
    name: str
    version: int
    steps: tuple[StepDef, ...]  # topological order
    timeout: float | None
    output: Any
    by_name: dict[str, StepDef] = field(compare=False, repr=False)
    compensation: Compensation = Compensation()
    finally_steps: tuple[StepDef, ...] = ()  # topological order, run after the end
    # Signal name -> the JSON Schema its data must satisfy (None: any JSON).
    signals: dict[str, dict[str, Any] | None] = field(default_factory=dict, compare=False)
    max_executions: int | None = None

    def step(self, name: str) -> StepDef:
        return self.by_name[name]

    @property
    def step_names(self) -> tuple[str, ...]:
        """Every step an execution keeps state for: forward steps, then `finally` ones."""
        return tuple(s.name for s in (*self.steps, *self.finally_steps))

    @property
    def sinks(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps if not s.dependents)


def compile_definition(spec: WorkflowSpec, *, name: str, version: int) -> Definition:
    default_retry = spec.retry or RetryPolicy()
    ordered = _compile_steps(spec.steps, default_retry, final=False)
    finals = _compile_steps(spec.finally_steps, default_retry, final=True)
    return Definition(
        name=name,
        version=version,
        steps=ordered,
        timeout=parse_duration(spec.timeout) if spec.timeout else None,
        output=spec.output,
        by_name={s.name: s for s in (*ordered, *finals)},
        compensation=Compensation.from_policy(spec.compensation),
        finally_steps=finals,
        signals={s.name: s.json_schema for s in spec.signals},
        max_executions=spec.concurrency.max_executions if spec.concurrency else None,
    )


def _compile_steps(
    specs: tuple[StepSpec, ...], default_retry: RetryPolicy, *, final: bool
) -> tuple[StepDef, ...]:
    dependents: dict[str, list[str]] = {s.name: [] for s in specs}
    for s in specs:
        for dep in s.depends_on:
            dependents[dep].append(s.name)
    order = _topological({s.name: s.depends_on for s in specs})
    descendants = _descendants(order, dependents)
    steps = {
        s.name: StepDef(
            name=s.name,
            type=s.type if s.type is not None else CHILD,
            input=s.input if s.input is not None else {},
            depends_on=tuple(s.depends_on),
            dependents=tuple(dependents[s.name]),
            retry=Retry.from_policy(s.retry or default_retry),
            timeout=parse_duration(s.timeout) if s.timeout else None,
            heartbeat_timeout=parse_duration(s.heartbeat_timeout) if s.heartbeat_timeout else None,
            compensate=_child_undo(s, default_retry)
            if s.compensate is None
            else CompensateDef(
                type=s.compensate.type,
                input=s.compensate.input if s.compensate.input is not None else {},
                retry=Retry.from_policy(s.compensate.retry or default_retry),
                timeout=parse_duration(s.compensate.timeout) if s.compensate.timeout else None,
            ),
            pivot=s.pivot,
            descendants=descendants[s.name],
            when=s.when,
            for_each=s.for_each,
            max_parallel=s.max_parallel,
            tolerated_failures=s.tolerated_failures,
            workflow=s.workflow_ref.name if s.workflow_ref is not None else None,
            final=final,
        )
        for s in specs
    }
    return tuple(steps[n] for n in order)


def _child_undo(spec: StepSpec, default_retry: RetryPolicy) -> CompensateDef | None:
    """A child workflow step is undone by compensating the child's completed steps."""
    if spec.workflow_ref is None:
        return None
    return CompensateDef(CHILD, {}, Retry.from_policy(spec.retry or default_retry), None)


def _topological(depends_on: dict[str, tuple[str, ...]]) -> list[str]:
    """Kahn's order, ties kept in manifest order so dispatch order is stable."""
    remaining = {name: set(deps) for name, deps in depends_on.items()}
    ordered: list[str] = []
    while remaining:
        ready = [n for n, deps in remaining.items() if not deps]
        if not ready:
            raise ValueError(f"cycle among steps {sorted(remaining)}")
        for n in ready:
            ordered.append(n)
            del remaining[n]
        for deps in remaining.values():
            deps.difference_update(ready)
    return ordered


def _descendants(order: list[str], dependents: dict[str, list[str]]) -> dict[str, frozenset[str]]:
    """Each step's transitive dependents, built from the last step in `order` back."""
    result: dict[str, frozenset[str]] = {}
    for name in reversed(order):
        result[name] = frozenset(dependents[name]).union(*(result[d] for d in dependents[name]))
    return result
