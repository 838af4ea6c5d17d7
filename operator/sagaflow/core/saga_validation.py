"""The saga rules of a Workflow manifest: `compensate`, `pivot` and the policy.

Kept beside `sagaflow.core.validation`, which calls it with the step graph it has
already worked out; same conventions: every problem, each with its field path as
written in YAML, never an exception for bad input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sagaflow.core import expressions
from sagaflow.core.definition import FAIL, PASS, WAIT, WAIT_SIGNAL
from sagaflow.core.manifests import StepSpec

# Built-in steps do nothing outside Sagaflow, so there is nothing to undo.
_NOTHING_TO_UNDO = {
    PASS: "a sagaflow.pass step only passes data on: there is nothing to undo",
    WAIT: "a sagaflow.wait step only waits: there is nothing to undo",
    FAIL: "a sagaflow.fail step never succeeds: there is nothing to undo",
    WAIT_SIGNAL: "a sagaflow.waitForSignal step only waits for a signal: there is nothing to undo",
}
# A compensation may be a runner's type, or pass/fail (an ordering point, a drill).
_COMPENSATION_BUILTINS = (PASS, FAIL)


def saga_problems(
    steps: Sequence[StepSpec],
    first_index: dict[str, int],
    upstream: dict[str, set[str]],
    is_known_type: Callable[[str], bool] | None,
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for i, step in enumerate(steps):
        base = f"spec.steps[{i}]"
        if step.compensate is None:
            continue
        at = f"{base}.compensate"
        if step.type in _NOTHING_TO_UNDO:
            problems.append((at, _NOTHING_TO_UNDO[step.type]))
        if step.pivot:
            reason = "a pivot step is the point of no return: it cannot have compensate"
            problems.append((at, reason))
        problems += _compensation_type(step.compensate.type, f"{at}.type", is_known_type)
        value = step.compensate.input
        path = f"{at}.input"
        problems += [(e.path, e.reason) for e in expressions.check_templates(value, path)]
        readable = upstream.get(step.name, set()) | {step.name}
        for where, names in expressions.template_references(value, path):
            for name in sorted(names):
                if name not in first_index:
                    problems.append((where, f"unknown step '{name}'"))
                elif name not in readable:
                    reason = (
                        f"step '{name}' is not '{step.name}' or upstream of it: a compensation "
                        "reads the step it undoes and what ran before it"
                    )
                    problems.append((where, reason))
    problems += _pivot_problems(steps, upstream)
    return problems


def _compensation_type(
    kind: str, at: str, is_known_type: Callable[[str], bool] | None
) -> list[tuple[str, str]]:
    if kind in (WAIT, WAIT_SIGNAL):
        return [(at, f"{kind} cannot undo a step; use a runner's step type")]
    if kind in _COMPENSATION_BUILTINS or is_known_type is None or is_known_type(kind):
        return []
    return [(at, f"no runner registered for step type '{kind}' and it is not built in")]


def _pivot_problems(
    steps: Sequence[StepSpec], upstream: dict[str, set[str]]
) -> list[tuple[str, str]]:
    """Pivots must lie on one dependency chain: 'the point of no return' is one point."""
    pivots = [(i, s.name) for i, s in enumerate(steps) if s.pivot]
    problems = []
    for k, (i, name) in enumerate(pivots):
        for _, other in pivots[:k]:
            if other not in upstream.get(name, set()) and name not in upstream.get(other, set()):
                reason = (
                    f"pivot steps must be ordered by dependsOn: '{other}' and '{name}' "
                    "do not depend on each other"
                )
                problems.append((f"spec.steps[{i}].pivot", reason))
    return problems


def skip_compensation_problems(names: Sequence[str], steps: Sequence[str]) -> list[tuple[str, str]]:
    """spec.skipCompensation of an Execution must name steps of its Workflow."""
    known = set(steps)
    return [
        (
            f"spec.skipCompensation[{i}]",
            f"unknown step '{name}' (the workflow's steps: {', '.join(steps)})",
        )
        for i, name in enumerate(names)
        if name not in known
    ]
