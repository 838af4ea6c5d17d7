"""Property tests of the engine under an adversarial delivery layer.

A small simulated world answers every dispatched attempt with a scripted
outcome and turns every timer into a deliverable fact. Hypothesis then chooses
which pending fact is delivered next, duplicates facts and re-delivers old ones
late. Two properties:

1. When every step eventually succeeds, any interleaving gives exactly the state
   that in-order (FIFO) delivery gives.
2. For any run (failures, timeouts, permanent errors included), adding
   duplicated and late copies of already delivered facts changes nothing.

And in every run each attempt's result is applied at most once.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.core.harness import NOW, World, fresh, replay

from sagaflow.core.definition import Definition, compile_definition
from sagaflow.core.engine import decide
from sagaflow.core.facts import Fact, Start
from sagaflow.core.manifests import WorkflowSpec


@st.composite
def workflows(draw: st.DrawFn, *, with_failures: bool) -> tuple[Definition, dict[str, Any]]:
    """A random DAG plus a script: how each step's attempts end."""
    n = draw(st.integers(1, 6))
    steps = []
    script: dict[str, Any] = {}
    for i in range(n):
        name = f"s{i}"
        deps = (
            draw(
                st.lists(
                    st.sampled_from([f"s{j}" for j in range(i)]), unique=True, max_size=min(i, 3)
                )
            )
            if i
            else []
        )
        builtin = draw(st.booleans()) and draw(st.booleans())
        attempts = draw(st.integers(1, 3))
        step: dict[str, Any] = {
            "name": name,
            "type": "sagaflow.pass" if builtin else "x.work",
            "dependsOn": deps,
            "input": {"from": f"${{{{ steps.{deps[0]}.output.v }}}}"} if deps else {"v": i},
            "retry": {
                "maxAttempts": attempts,
                "initialInterval": draw(st.sampled_from(["0s", "1s"])),
            },
        }
        if with_failures and draw(st.booleans()):
            step["timeout"] = "10s"
        steps.append(step)
        if with_failures:
            script[name] = draw(
                st.lists(
                    st.sampled_from(["ok", "retry", "perm"]), min_size=attempts, max_size=attempts
                )
            )
        else:
            fails = draw(st.integers(0, attempts - 1))
            script[name] = ["retry"] * fails + ["ok"]
    spec = WorkflowSpec.model_validate({"steps": steps})
    return compile_definition(spec, name="w", version=1), script


def run(definition: Definition, script: dict[str, Any], choose: Any) -> World:
    world = World(definition, script)
    decision = decide(fresh(definition), definition, Start(), NOW)
    world.absorb(decision)
    state = decision.state
    for _ in range(500):
        if not world.pending:
            break
        fact = world.pending.pop(choose(len(world.pending)))
        state = world.deliver(state, fact)
    world.final = state  # type: ignore[attr-defined]
    return world


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wf=workflows(with_failures=False), data=st.data())
def test_any_interleaving_equals_in_order_delivery(wf: Any, data: st.DataObject) -> None:
    definition, script = wf
    in_order = run(definition, script, lambda n: 0)
    shuffled = run(definition, script, lambda n: data.draw(st.integers(0, n - 1)))
    assert shuffled.final == in_order.final  # type: ignore[attr-defined]
    assert in_order.final.phase.value == "Completed"  # type: ignore[attr-defined]
    assert max(shuffled.applied_results.values(), default=1) == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wf=workflows(with_failures=True), data=st.data())
def test_duplicated_and_late_copies_change_nothing(wf: Any, data: st.DataObject) -> None:
    definition, script = wf
    world = run(definition, script, lambda n: data.draw(st.integers(0, n - 1)))
    clean = world.delivered
    noisy: list[Fact] = []
    for i, fact in enumerate(clean):
        noisy.append(fact)
        # Re-deliver copies of anything already delivered: duplicates and late arrivals.
        for _ in range(data.draw(st.integers(0, 2))):
            noisy.append(clean[data.draw(st.integers(0, i))])
    assert replay(definition, noisy) == replay(definition, clean)
    assert replay(definition, clean) == world.final  # type: ignore[attr-defined]
    assert max(world.applied_results.values(), default=1) == 1
    assert world.final.phase.is_terminal  # type: ignore[attr-defined]
