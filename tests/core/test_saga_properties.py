"""Property tests of compensation and control under an adversarial delivery layer.

Random DAGs whose steps may have a compensation, with scripted outcomes for every
forward and compensation attempt, random in-doubt policies, `maxParallel` and
pivots. Hypothesis picks which pending fact is delivered next, suspends and
resumes the run at random points, and re-delivers old facts late. Properties:

1. When every forward step but a final one succeeds and that one fails, any
   interleaving of results, compensation results and suspend/resume requests gives
   the state in-order delivery gives (the compensations' own scripts may retry,
   fail for good, or succeed).
2. For any run, with cancels, redrives and skipCompensation requests made at random
   points too, duplicated and late copies of delivered results and timers change
   nothing. (Control requests are deduplicated before the engine, by their request
   id in the inbox; the engine's part is that they may arrive anywhere.)

And in every run: each result is applied at most once, each step is compensated at
most once, a compensation never starts while a step that depends on it is still
to be undone, and the run comes to rest (terminal or CompensationFailed).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.core.harness import NOW, World, fresh, replay

from sagaflow.core.definition import Definition, compile_definition
from sagaflow.core.engine import decide
from sagaflow.core.facts import (
    Cancel,
    Control,
    Fact,
    Redrive,
    Resume,
    SkipCompensation,
    Start,
    Suspend,
)
from sagaflow.core.manifests import ExecutionPhase, InDoubt, StepPhase, WorkflowSpec
from sagaflow.core.state import ExecutionState

UNFINISHED_UNDO = (StepPhase.COMPENSATING, StepPhase.COMPENSATION_FAILED)


@st.composite
def sagas(draw: st.DrawFn, *, fail_last: bool) -> tuple[Definition, dict[str, Any]]:
    n = draw(st.integers(1, 6))
    steps: list[dict[str, Any]] = []
    script: dict[str, Any] = {}
    for i in range(n):
        name = f"s{i}"
        earlier = [f"s{j}" for j in range(i)]
        deps = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)) if i else []
        attempts = draw(st.integers(1, 3))
        step: dict[str, Any] = {
            "name": name,
            "type": "x.work",
            "dependsOn": deps,
            "retry": {"maxAttempts": attempts, "initialInterval": "0s"},
        }
        if draw(st.booleans()):
            undo_attempts = draw(st.integers(1, 3))
            step["compensate"] = {
                "type": "x.undo",
                "input": {"of": f"${{{{ steps.{name}.output.v }}}}"},
                "retry": {
                    "maxAttempts": undo_attempts,
                    "initialInterval": draw(st.sampled_from(["0s", "1s"])),
                },
            }
            script[f"{name}/undo"] = draw(
                st.lists(
                    st.sampled_from(["ok", "retry", "perm"]),
                    min_size=undo_attempts,
                    max_size=undo_attempts,
                )
            )
        if not fail_last and draw(st.booleans()):
            step["timeout"] = "10s"
        steps.append(step)
        if fail_last:
            script[name] = ["retry"] * draw(st.integers(0, attempts - 1)) + ["ok"]
        else:
            script[name] = draw(
                st.lists(
                    st.sampled_from(["ok", "retry", "perm"]), min_size=attempts, max_size=attempts
                )
            )
    if fail_last:
        sinks = [s["name"] for s in steps if not any(s["name"] in o["dependsOn"] for o in steps)]
        steps.append({"name": "last", "type": "x.work", "dependsOn": sinks})
        script["last"] = ["perm"]
    else:
        pivot = draw(st.sampled_from([None, *[s["name"] for s in steps]]))
        for s in steps:
            if s["name"] == pivot:
                s.pop("compensate", None)
                s["pivot"] = True
    policy = {
        "inDoubt": draw(st.sampled_from([p.value for p in InDoubt])),
        "maxParallel": draw(st.integers(0, 2)),
    }
    spec = WorkflowSpec.model_validate({"steps": steps, "compensation": policy})
    return compile_definition(spec, name="w", version=1), script


class SagaWorld(World):
    """World, plus the saga invariants checked on every decision."""

    def __init__(self, definition: Definition, script: dict[str, Any]) -> None:
        super().__init__(definition, script)
        self.compensated: Counter[str] = Counter()

    def deliver(self, state: ExecutionState, fact: Fact) -> ExecutionState:
        decision = decide(state, self.definition, fact, NOW)
        after = decision.state
        for d in decision.dispatches:
            if d.compensation:
                for name in self.definition.step(d.step).descendants:
                    assert still_to_undo(self.definition, after, name) is False, (d.step, name)
        for record in decision.records:
            if record.kind == "StepCompensated":
                self.compensated[record.step or ""] += 1
        return super().deliver(state, fact)


def still_to_undo(definition: Definition, state: ExecutionState, name: str) -> bool:
    step = state.steps[name]
    if definition.step(name).compensate is None:
        return False
    if step.phase in UNFINISHED_UNDO:
        return True
    if step.undo is not None and step.undo.status == "waiting":
        return True
    awaited = definition.compensation.in_doubt is InDoubt.AWAIT
    return step.phase is StepPhase.RUNNING and awaited and name not in state.skip_compensation


def drive(
    definition: Definition,
    script: dict[str, Any],
    choose: Any,
    toggle: Any,
    request: Any = lambda: None,
) -> SagaWorld:
    """Deliver pending facts in the order `choose` picks; suspend or resume when `toggle`
    says so (at most 4 times), make the control request `request` returns (at most 3),
    and resume at the end if still suspended."""
    world = SagaWorld(definition, script)
    decision = decide(fresh(definition), definition, Start(), NOW)
    world.absorb(decision)
    state = decision.state
    toggles = requests = 0
    for _ in range(1000):
        suspended = state.phase is ExecutionPhase.SUSPENDED
        if toggles < 4 and toggle() and (suspended or not state.phase.at_rest):
            state = world.deliver(state, Resume() if suspended else Suspend())
            toggles += 1
            continue
        asked = request() if requests < 3 else None
        if asked is not None:
            state = world.deliver(state, asked)
            requests += 1
            continue
        if not world.pending:
            if not suspended:
                break
            state = world.deliver(state, Resume())
            continue
        state = world.deliver(state, world.pending.pop(choose(len(world.pending))))
    world.final = state  # type: ignore[attr-defined]
    return world


def outcome_of(state: ExecutionState) -> ExecutionState:
    """The state without what says how it got there (the last request, the revision)."""
    return replace(state, request=None, revision=0)


def check_invariants(world: SagaWorld) -> None:
    final: ExecutionState = world.final  # type: ignore[attr-defined]
    assert final.phase.at_rest
    assert final.phase is not ExecutionPhase.SUSPENDED
    assert max(world.applied_results.values(), default=1) == 1
    assert max(world.compensated.values(), default=1) == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(saga=sagas(fail_last=True), data=st.data())
def test_any_interleaving_of_results_undos_and_suspensions_equals_in_order(
    saga: Any, data: st.DataObject
) -> None:
    definition, script = saga
    in_order = drive(definition, script, lambda n: 0, lambda: False)
    shuffled = drive(
        definition,
        script,
        lambda n: data.draw(st.integers(0, n - 1)),
        lambda: data.draw(st.integers(0, 4)) == 0,
    )
    check_invariants(in_order)
    check_invariants(shuffled)
    assert outcome_of(shuffled.final) == outcome_of(in_order.final)  # type: ignore[attr-defined]
    assert in_order.final.phase in (  # type: ignore[attr-defined]
        ExecutionPhase.COMPENSATED,
        ExecutionPhase.COMPENSATION_FAILED,
        ExecutionPhase.FAILED,
    )


def requests(definition: Definition, data: st.DataObject) -> Any:
    """Now and then a cancel, a redrive or a skipCompensation of a random step."""
    names = [s.name for s in definition.steps]
    choices = st.one_of(
        st.none(),
        st.none(),
        st.none(),
        st.just(Cancel("property")),
        st.just(Redrive()),
        st.builds(lambda n: SkipCompensation((n,)), st.sampled_from(names)),
    )
    return lambda: data.draw(choices)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(saga=sagas(fail_last=False), data=st.data())
def test_duplicated_and_late_results_change_nothing_in_a_saga(
    saga: Any, data: st.DataObject
) -> None:
    definition, script = saga
    world = drive(
        definition,
        script,
        lambda n: data.draw(st.integers(0, n - 1)),
        lambda: data.draw(st.integers(0, 4)) == 0,
        requests(definition, data),
    )
    check_invariants(world)
    clean = world.delivered
    noisy: list[Fact] = []
    for i, fact in enumerate(clean):
        noisy.append(fact)
        for _ in range(data.draw(st.integers(0, 2))):
            late = clean[data.draw(st.integers(0, i))]
            if not isinstance(late, Control):
                noisy.append(late)
    assert replay(definition, noisy) == replay(definition, clean)
    assert replay(definition, clean) == world.final  # type: ignore[attr-defined]
