"""The step graphs and the data-flow rules of a Workflow manifest.

This module owns the rules about how steps connect and what their templates may
read, for both step lists, `spec.steps` and `spec.finally`:

- the graph: step names unique across both lists, known dependencies, no cycles,
  templates that read only upstream outputs (a `finally` step may also read any
  forward step: they are all done before it runs);
- what a step runs: exactly one of `type` and `workflowRef`;
- `when` and `forEach`: one template each, reading known, upstream steps;
  `maxParallel` and `toleratedFailures` only with `forEach`, and only steps the
  engine can run as items fan out;
- the names the engine adds to a template's context only in some places: `item`
  and `index` (a forEach step's input and compensation), `execution` (a `finally`
  step's input). Read anywhere else they would silently give null;
- `finally` steps: they run after the end, so nothing undoes, pivots or fans out;
- `spec.signals`: unique names, valid JSON Schemas;
- across documents: child workflows (`workflowRef`) that exist and never call
  themselves, directly or through others.

The engine behaviour these rules mirror lives in `conditions`, `fanout`,
`fanout_undo`, `finals` and `signals`. `sagaflow.core.validation` calls this module
with the parsed models; the conventions are its own: pure, every problem reported,
each with its field path as written in YAML, never an exception for bad input.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sagaflow.core import expressions
from sagaflow.core.definition import WAIT, WAIT_SIGNAL
from sagaflow.core.manifests import SignalSpec, StepSpec, Workflow
from sagaflow.core.signals import schema_error

Problems = list[tuple[str, str]]
STEPS = "spec.steps"
FINALLY = "spec.finally"

# The names `render_over` adds to the context (`extra`) and where it adds them.
_ITEM = frozenset({"item", "index"})
_EXECUTION = frozenset({"execution"})
_ONLY_SET = {
    "item": "`item` is only set in a forEach step's input and compensate.input",
    "index": "`index` is only set in a forEach step's input and compensate.input",
    "execution": "`execution` is only set in a finally step's input and when",
}
# Steps the engine cannot run as items (`fanout` dispatches, passes or fails each one).
_NO_FAN_OUT = {
    WAIT: "a sagaflow.wait step cannot fan out: only a runner's step type, sagaflow.pass "
    "or sagaflow.fail can (one wait serves every item)",
    WAIT_SIGNAL: "a sagaflow.waitForSignal step cannot fan out: a signal is delivered to "
    "one waiting step, not to items",
}
_ONE_WHEN = (
    "must be one template, e.g. ${{ input.express }}, with no text around it: "
    "text is a string, which is true unless empty"
)
_ONE_FOR_EACH = (
    "must be one template giving a list, e.g. ${{ input.orders }}, with no text around it"
)
# -------------------------------------------------------------------- graphs


@dataclass(frozen=True)
class StepGraph:
    """One step list as dependsOn and templates see it.

    `index` maps each name to its first step (a duplicate is reported, and the first
    stands for the name); `outside` holds the other list's names with their index.
    """

    base: str
    steps: Sequence[StepSpec]
    index: dict[str, int]
    upstream: dict[str, set[str]]
    outside: Mapping[str, int]
    final: bool


def first_indexes(steps: Sequence[StepSpec]) -> dict[str, int]:
    first: dict[str, int] = {}
    for i, step in enumerate(steps):
        first.setdefault(step.name, i)
    return first


def step_graph(
    steps: Sequence[StepSpec], problems: Problems, *, outside: Mapping[str, int], final: bool
) -> StepGraph:
    """Check names, dependencies and cycles of one list into `problems`; return its graph.

    A `finally` list reports its names taken by forward steps (`outside`) too.
    """
    base = FINALLY if final else STEPS
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.name in index:
            first = f"{base}[{index[step.name]}]"
        elif final and step.name in outside:
            index[step.name] = i
            first = f"{STEPS}[{outside[step.name]}]"
        else:
            index[step.name] = i
            continue
        reason = f"duplicate step name '{step.name}' (first used by {first})"
        problems.append((f"{base}[{i}].name", reason))
    graph = StepGraph(base, steps, index, {}, outside, final)
    problems += _dependency_problems(graph)
    problems += _cycle_problems(graph)
    return replace(graph, upstream=_upstream(graph))


def _dependency_problems(graph: StepGraph) -> Problems:
    problems = []
    for i, step in enumerate(graph.steps):
        for j, dependency in enumerate(step.depends_on):
            at = f"{graph.base}[{i}].dependsOn[{j}]"
            if dependency == step.name:
                problems.append((at, f"step '{step.name}' cannot depend on itself"))
            elif dependency in graph.index:
                continue
            elif dependency in graph.outside and graph.final:
                reason = (
                    f"a finally step may only depend on finally steps: '{dependency}' is in "
                    f"{STEPS}, which are all done before finally steps start"
                )
                problems.append((at, reason))
            elif dependency in graph.outside:
                reason = f"step '{dependency}' is a finally step: it runs after the execution ended"
                problems.append((at, reason))
            else:
                problems.append((at, f"unknown step '{dependency}'"))
    return problems


def _edges(graph: StepGraph) -> dict[str, list[str]]:
    """Step -> known dependencies; the first step of a duplicated name stands for it."""
    return {
        name: [d for d in graph.steps[i].depends_on if d in graph.index and d != name]
        for name, i in graph.index.items()
    }


def _cycle_problems(graph: StepGraph) -> Problems:
    """Report each dependsOn entry that closes a cycle, naming the steps around it.

    Iterative depth-first search: workflows may hold 500 steps, deeper than is
    comfortable for Python recursion.
    """
    steps, first_index = graph.steps, graph.index
    edges = _edges(graph)
    done: set[str] = set()
    problems = []
    for root in edges:
        stack = [] if root in done else [(root, enumerate(steps[first_index[root]].depends_on))]
        while stack:
            node, pending = stack[-1]
            j, dependency = next(pending, (-1, ""))
            if j < 0:
                done.add(node)
                stack.pop()
            elif dependency in edges[node] and dependency not in done:
                path = [name for name, _ in stack]
                if dependency in path:
                    cycle = " -> ".join([*path[path.index(dependency) :], dependency])
                    at = f"{graph.base}[{first_index[node]}].dependsOn[{j}]"
                    problems.append((at, f"dependency cycle: {cycle}"))
                else:
                    deps = steps[first_index[dependency]].depends_on
                    stack.append((dependency, enumerate(deps)))
    return problems


def _upstream(graph: StepGraph) -> dict[str, set[str]]:
    """Every step's transitive dependencies; the seen set makes cycles harmless."""
    edges = _edges(graph)
    result: dict[str, set[str]] = {}
    for name in edges:
        seen: set[str] = set()
        frontier = list(edges[name])
        while frontier:
            current = frontier.pop()
            if current not in seen:
                seen.add(current)
                frontier += edges[current]
        result[name] = seen
    return result


def reference_problems(value: Any, path: str, name: str, graph: StepGraph) -> Problems:
    """Steps the templates in `value` (of step `name`) read must be known and upstream."""
    problems = []
    upstream = graph.upstream.get(name, set())
    for at, names in expressions.template_references(value, path):
        for read in sorted(names):
            if read == name:
                problems.append((at, f"step '{read}' cannot read its own output"))
            elif read in graph.index:
                if read not in upstream:
                    reason = f"step '{read}' is not upstream of '{name}'; add it to dependsOn"
                    problems.append((at, reason))
            elif read in graph.outside:
                if not graph.final:  # a finally step reads any forward step
                    reason = f"step '{read}' is a finally step: it runs after the execution ended"
                    problems.append((at, reason))
            else:
                problems.append((at, f"unknown step '{read}'"))
    return problems


# --------------------------------------------------------------------- steps


def step_problems(step: StepSpec, base: str, graph: StepGraph) -> Problems:
    """The data-flow rules of one step (its input's references are checked apart)."""
    problems = _runs_problems(step, base, graph.final)
    problems += _when_problems(step, base, graph)
    if graph.final:
        problems += _final_problems(step, base)
    else:
        problems += _fan_out_problems(step, base, graph)
    if step.for_each is None:
        problems += [
            (f"{base}.{key}", f"only a forEach step has {key}")
            for key, value in (
                ("maxParallel", step.max_parallel),
                ("toleratedFailures", step.tolerated_failures),
            )
            if value
        ]
    set_here = _EXECUTION if graph.final else _ITEM if step.for_each is not None else frozenset()
    problems += variable_problems(step.input, f"{base}.input", set_here)
    # A finally step's condition may read how the run ended; `item` is not set yet.
    problems += variable_problems(step.when, f"{base}.when", _EXECUTION if graph.final else ())
    problems += variable_problems(step.for_each, f"{base}.forEach", ())
    if step.compensate is not None and not graph.final:
        problems += variable_problems(step.compensate.input, f"{base}.compensate.input", set_here)
    return problems


def _runs_problems(step: StepSpec, base: str, final: bool) -> Problems:
    if step.type is None and step.workflow_ref is None:
        return [(f"{base}.type", "a step needs a type or a workflowRef")]
    if step.type is not None and step.workflow_ref is not None:
        return [(f"{base}.workflowRef", "give a type or a workflowRef, not both")]
    if step.workflow_ref is not None and final:
        reason = "a finally step cannot run a child workflow: child workflows run only while "
        return [(f"{base}.workflowRef", reason + "the execution runs")]
    return []


def _when_problems(step: StepSpec, base: str, graph: StepGraph) -> Problems:
    if step.when is None:
        return []
    at = f"{base}.when"
    problems = _template_problems(step.when, at)
    if not problems and not _one_template(step.when):
        problems.append((at, _ONE_WHEN))
    return problems + reference_problems(step.when, at, step.name, graph)


def _fan_out_problems(step: StepSpec, base: str, graph: StepGraph) -> Problems:
    if step.for_each is None:
        return []
    at = f"{base}.forEach"
    if step.workflow_ref is not None:
        return [(at, "child workflows cannot fan out yet: a workflowRef step cannot have forEach")]
    problems = [(at, _NO_FAN_OUT[step.type])] if step.type in _NO_FAN_OUT else []
    errors = _template_problems(step.for_each, at)
    if not errors and not _one_template(step.for_each):
        problems.append((at, _ONE_FOR_EACH))
    return problems + errors + reference_problems(step.for_each, at, step.name, graph)


def _final_problems(step: StepSpec, base: str) -> Problems:
    """A `finally` step runs once the outcome is decided: nothing is undone after it."""
    problems = []
    if step.for_each is not None:
        reason = "a finally step cannot have forEach: items run only while the execution runs"
        problems.append((f"{base}.forEach", reason))
    if step.compensate is not None:
        reason = (
            "a finally step cannot have compensate: nothing is undone after the execution ended"
        )
        problems.append((f"{base}.compensate", reason))
    if step.pivot:
        reason = "a finally step cannot be a pivot: the execution already ended, past any point "
        problems.append((f"{base}.pivot", reason + "of no return"))
    return problems


def _template_problems(value: Any, path: str) -> Problems:
    return [(error.path, error.reason) for error in expressions.check_templates(value, path)]


# ----------------------------------------------------------------- templates


def variable_problems(value: Any, path: str, set_here: Collection[str]) -> Problems:
    """Reads of `item`, `index` or `execution` where the engine does not set them."""
    return [
        (at, _ONLY_SET[name])
        for at, roots, _ in expressions.template_roots(value, path)
        for name in sorted(roots)
        if name in _ONLY_SET and name not in set_here
    ]


def _one_template(text: str) -> bool:
    found = expressions.template_roots(text, "")
    return len(found) == 1 and found[0][2]


# ------------------------------------------------------------------- signals


def signal_problems(signals: Sequence[SignalSpec]) -> Problems:
    problems = []
    first: dict[str, int] = {}
    for i, signal in enumerate(signals):
        if signal.name in first:
            where = f"spec.signals[{first[signal.name]}]"
            reason = f"duplicate signal name '{signal.name}' (first used by {where})"
            problems.append((f"spec.signals[{i}].name", reason))
        else:
            first[signal.name] = i
        if signal.json_schema is not None:
            error = schema_error(signal.json_schema)
            if error is not None:
                problems.append((f"spec.signals[{i}].schema", f"not a valid JSON Schema: {error}"))
    return problems


# ------------------------------------------------------------- across documents


def child_workflow_problems(
    workflows: Sequence[Workflow], known: Collection[tuple[str, str]] | None
) -> list[Problems]:
    """Problems of each Workflow's `workflowRef` steps, in the order given.

    A child workflow is looked up in its parent's namespace. With `known` (the
    (namespace, name) of every Workflow the caller knows of), a child outside it is
    unknown; None skips that check. A cycle among `workflows` is reported at every
    workflowRef on it, with the chain from that workflow back to itself.
    """
    calls: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for workflow in workflows:
        key = (workflow.metadata.namespace, workflow.metadata.name)
        calls.setdefault(key, [target for _, target in _children(workflow)])
    trees: dict[tuple[str, str], dict[tuple[str, str], tuple[str, str] | None]] = {}
    result = []
    for workflow in workflows:
        key = (workflow.metadata.namespace, workflow.metadata.name)
        problems = []
        for i, target in _children(workflow):
            at = f"{STEPS}[{i}].workflowRef.name"
            if known is not None and target not in known:
                problems.append((at, f"unknown workflow '{target[1]}'"))
            tree = trees.get(target)
            if tree is None:
                tree = trees[target] = _reachable(calls, target)
            if key in tree:
                problems.append((at, f"workflow cycle: {' -> '.join(_cycle(key, target, tree))}"))
        result.append(problems)
    return result


def _children(workflow: Workflow) -> list[tuple[int, tuple[str, str]]]:
    namespace = workflow.metadata.namespace
    return [
        (i, (namespace, step.workflow_ref.name))
        for i, step in enumerate(workflow.spec.steps)
        if step.workflow_ref is not None
    ]


def _reachable(
    calls: Mapping[tuple[str, str], list[tuple[str, str]]], start: tuple[str, str]
) -> dict[tuple[str, str], tuple[str, str] | None]:
    """Breadth-first from `start`: every workflow it reaches -> the one that calls it."""
    parents: dict[tuple[str, str], tuple[str, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in calls.get(node, ()):
            if child not in parents:
                parents[child] = node
                queue.append(child)
    return parents


def _cycle(
    key: tuple[str, str],
    target: tuple[str, str],
    tree: Mapping[tuple[str, str], tuple[str, str] | None],
) -> list[str]:
    """`key -> target -> ... -> key`: the shortest way back, from `target`'s tree."""
    back = [key[1]]
    node = tree[key]
    while node is not None:
        back.append(node[1])
        node = tree[node]
    return [key[1], *reversed(back)]
