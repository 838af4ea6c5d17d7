"""Property tests of the coordination rules: when, forEach, signals, child workflows.

Each property drives the pure engine through `coordination_world.Bus` (the
adversarial `harness.World`: every dispatch is answered by a scripted result,
every timer becomes a deliverable fact, hypothesis picks the delivery order and
re-delivers old facts). Properties:

1. Skips: over a random DAG whose steps have `when` conditions on random execution
   input and on whether a dependency ran, every step whose condition is falsy is
   Skipped and never dispatched, every other one is dispatched once per attempt,
   and the run Completes (its `finally` step obeys its own condition).
2. Items: a forEach step of 0..60 items with random maxParallel, toleratedFailures
   and per-item outcomes, results in random order with duplicates, suspended and
   resumed at random: never more than maxParallel item attempts (or item undos) in
   flight, attempt ids unique, Succeeded iff the failed items are tolerated (with
   the outputs in item order), no item started once too many failed, and with
   `compensate` and a later failure each item that succeeded is undone once. The
   same again with items whose input does not render (they fail undispatched).
3. Signals: any interleaving of Start, the wait being reached, signals (duplicate
   ids, undeclared names, data failing the schema) and its timeout agrees with a
   small reference model, fact by fact.
4. Child results in any order: two child workflow steps and a dependent; with
   duplicated and stale results the dependent runs once after both, and a failure
   undoes each child that succeeded exactly once.
5. Every state reached in all of these survives its JSON round trip (checked by
   `Bus` on every decision: items, signals, finalizing and parent included).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as label
from hypothesis import strategies as st
from tests.core.coordination_world import Bus, execution

from sagaflow.core.decisions import Decision
from sagaflow.core.definition import CHILD, Definition, compile_definition
from sagaflow.core.effects import split_item_key
from sagaflow.core.facts import (
    Compensate,
    Control,
    Fact,
    Resume,
    SignalReceived,
    Start,
    StepCompleted,
    StepFailed,
    Suspend,
    TimerFired,
)
from sagaflow.core.links import Parent
from sagaflow.core.manifests import ExecutionPhase, StepPhase, WorkflowSpec
from sagaflow.core.state import ExecutionState, StepState

pytestmark = pytest.mark.timeout(120)

E = ExecutionPhase
S = StepPhase


def examples(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def compile_spec(manifest: dict[str, Any]) -> Definition:
    return compile_definition(WorkflowSpec.model_validate(manifest), name="w", version=1)


def template(expression: str) -> str:
    return "${{ " + expression + " }}"


def random_order(data: st.DataObject) -> Callable[[int], int]:
    """Which pending fact goes next (shrinks to first-in, first-out)."""
    return lambda n: data.draw(st.integers(0, n - 1))


def redeliveries(bus: Bus, data: st.DataObject, budget: int = 40) -> Callable[[], Fact | None]:
    """Now and then (at most `budget` times) a copy of an already delivered fact."""
    left = [budget]

    def noise() -> Fact | None:
        if not left[0] or not bus.delivered or data.draw(st.integers(0, 4)) != 4:
            return None
        left[0] -= 1
        fact = bus.delivered[data.draw(st.integers(0, len(bus.delivered) - 1))]
        # Control requests are deduplicated by their request id before the engine.
        return None if isinstance(fact, Control) else fact

    return noise


def with_suspensions(
    bus: Bus, data: st.DataObject, noise: Callable[[], Fact | None], toggles: int = 4
) -> Callable[[], Fact | None]:
    """`noise`, and now and then (at most `toggles` times) a suspend or a resume."""
    left = [toggles]

    def more() -> Fact | None:
        state = bus.state
        suspended = state.phase is E.SUSPENDED
        if left[0] and not state.at_rest and data.draw(st.integers(0, 9)) == 9:
            left[0] -= 1
            return Resume() if suspended else Suspend()
        return noise()

    return more


def run_to_rest(bus: Bus, data: st.DataObject, noise: Callable[[], Fact | None]) -> None:
    """Deliver until nothing is pending, resuming a run left suspended."""
    bus.run(random_order(data), noise)
    while bus.state.phase is E.SUSPENDED:
        bus.send(Resume())
        bus.run(random_order(data), noise)
    state = bus.state
    assert state.at_rest, (
        f"nothing in flight and no timer set, yet the run is {state.phase.value}: "
        + "; ".join(f"{n} {describe(s)}" for n, s in state.steps.items())
    )


def describe(step: StepState) -> str:
    if step.items is None:
        return step.phase.value
    phases = ", ".join(f"{p.value} {n}" for p, n in step.items.counts.items() if n)
    return f"{step.phase.value} (items: {phases}; cursor {step.items.cursor})"


# ------------------------------------------------------------ 1. when: skips

# Values of the execution input a condition reads, with their truth (JMESPath's:
# false, null, "", [] and {} are false; numbers, even 0, are true).
TRUTH: list[tuple[Any, bool]] = [
    (True, True),
    (False, False),
    (None, False),
    ("", False),
    ([], False),
    ({}, False),
    (0, True),
    ("no", True),
    ([0], True),
    ({"a": None}, True),
]


@dataclass
class Dag:
    definition: Definition
    script: dict[str, Any]
    inputs: dict[str, Any]
    skipped: dict[str, bool]  # the model: which steps (and the finally step) are Skipped
    attempts: dict[str, int]  # attempts a dispatched step takes to succeed
    builtin: set[str]  # sagaflow.pass steps: never dispatched
    feeds: dict[str, str]  # step -> the dependency its input reads


@st.composite
def conditional_dags(draw: st.DrawFn) -> Dag:
    n = draw(st.integers(1, 6))
    steps: list[dict[str, Any]] = []
    script: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    skipped: dict[str, bool] = {}
    attempts: dict[str, int] = {}
    builtin: set[str] = set()
    feeds: dict[str, str] = {}
    for i in range(n):
        name = f"s{i}"
        earlier = [f"s{j}" for j in range(i)]
        deps = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)) if i else []
        value, truth = draw(st.sampled_from(TRUTH))
        inputs[f"c{i}"] = value
        kinds = ["always", "input"] + (["ran", "not-ran", "input-and-ran"] if deps else [])
        kind = draw(st.sampled_from(kinds))
        dep = draw(st.sampled_from(deps)) if deps else ""
        ran = bool(dep) and not skipped[dep]
        when, runs = {
            "always": (None, True),
            "input": (template(f"input.c{i}"), truth),
            "ran": (template(f"steps.{dep}.output.v"), ran),
            "not-ran": (template(f"!(steps.{dep}.output.v)"), not ran),
            "input-and-ran": (template(f"input.c{i} && steps.{dep}.output.v"), truth and ran),
        }[kind]
        skipped[name] = not runs
        step: dict[str, Any] = {"name": name, "dependsOn": deps, "input": {"v": name}}
        if deps:
            feeds[name] = deps[0]
            step["input"]["from"] = template(f"steps.{deps[0]}.output.v")
        if when is not None:
            step["when"] = when
        if draw(st.integers(0, 3)) == 3:
            step["type"] = "sagaflow.pass"
            builtin.add(name)
        else:
            tries = draw(st.integers(1, 3))
            step["type"] = "x.work"
            step["retry"] = {
                "maxAttempts": tries,
                "initialInterval": draw(st.sampled_from(["0s", "1s"])),
            }
            fails = draw(st.integers(0, tries - 1))
            script[name] = ["retry"] * fails + ["ok"]
            attempts[name] = fails + 1
        steps.append(step)
    value, truth = draw(st.sampled_from(TRUTH))
    inputs["report"] = value
    report: dict[str, Any] = {"name": "report", "type": "x.audit", "input": {}}
    if draw(st.booleans()):
        report["when"] = template("input.report")
        skipped["report"] = not truth
    else:
        report["input"] = {"phase": template("execution.phase")}
        skipped["report"] = False
    script["report"] = ["ok"]
    definition = compile_spec({"steps": steps, "finally": [report]})
    return Dag(definition, script, inputs, skipped, attempts, builtin, feeds)


def output_v(dag: Dag, name: str) -> Any:
    """What `steps.<name>.output.v` reads once `name` is done."""
    if dag.skipped[name]:
        return None
    if name in dag.builtin:
        return name  # a pass step's output is its input
    return f"{name}#{dag.attempts[name]}"


@examples(200)
@given(dag=conditional_dags(), data=st.data())
def test_falsy_conditions_skip_and_every_other_step_runs_once_per_attempt(
    dag: Dag, data: st.DataObject
) -> None:
    bus = Bus(dag.definition, dag.script, execution(dag.definition, dag.inputs))
    bus.start()
    bus.run(random_order(data), redeliveries(bus, data))
    state = bus.state
    assert state.phase is E.COMPLETED
    assert max(bus.applied_results.values(), default=1) == 1
    for spec in (*dag.definition.steps, *dag.definition.finally_steps):
        name = spec.name
        step = state.steps[name]
        sent = sorted(a for (s, a, _), n in bus.dispatched.items() for _ in range(n) if s == name)
        if dag.skipped[name]:
            assert step.phase is S.SKIPPED, name
            assert sent == [], name
            assert step.reason is not None
            assert spec.when is not None
            assert spec.when in step.reason
        elif name in dag.builtin:
            assert step.phase is S.SUCCEEDED, name
            assert sent == [], name
        else:
            assert step.phase is S.SUCCEEDED, name
            tries = dag.attempts.get(name, 1)
            assert sent == list(range(1, tries + 1)), name
    for dispatch, _ in bus.dispatches():
        if dispatch.step in dag.feeds:
            assert dispatch.input["from"] == output_v(dag, dag.feeds[dispatch.step])
    assert state.finalizing == "done"
    label(f"skipped {sum(dag.skipped.values())} of {len(dag.skipped)}")


# -------------------------------------------------------------- 2. forEach items

PLANS = {"ok": ["ok"], "retry-ok": ["retry", "ok"], "perm": ["perm"], "exhaust": ["retry", "retry"]}
# "bad-input": the item's input does not render (ExpressionError), so it fails undispatched.
FAILING = frozenset({"perm", "exhaust", "bad-input"})


@dataclass
class Fan:
    definition: Definition
    script: dict[str, Any]
    values: list[Any]
    plans: list[str]
    max_parallel: int
    tolerated: int
    compensate: bool


@st.composite
def fan_outs(draw: st.DrawFn, *, bad_inputs: bool = False, most: int = 60) -> Fan:
    kinds = [*PLANS, "bad-input"] if bad_inputs else list(PLANS)
    at_least = draw(st.integers(0, most))  # lengths spread over 0..most, and still shrinking
    plans = draw(st.lists(st.sampled_from(kinds), min_size=at_least, max_size=most))
    n = len(plans)
    max_parallel = draw(st.integers(0, 8))
    tolerated = draw(st.integers(0, n))
    compensate = draw(st.booleans())
    interval = draw(st.sampled_from(["0s", "1s"]))
    retry = {"maxAttempts": 2, "initialInterval": interval}
    charge: dict[str, Any] = {
        "name": "charge",
        "type": "x.charge",
        "forEach": template("input.orders"),
        "input": {
            "order": template("item.order"),
            "n": template("index"),
            "size": template("length(item.name)"),  # a number has no length
        },
        "maxParallel": max_parallel,
        "toleratedFailures": tolerated,
        "retry": retry,
    }
    script: dict[str, Any] = {}
    if compensate:
        charge["compensate"] = {
            "type": "x.refund",
            "input": {"of": template("steps.charge.output.v"), "order": template("item.order")},
            "retry": retry,
        }
        undo = draw(st.lists(st.sampled_from(["ok", "retry-ok"]), min_size=n, max_size=n))
        script.update({f"charge[{i}]/undo": PLANS[u] for i, u in enumerate(undo)})
    script.update({f"charge[{i}]": PLANS[p] for i, p in enumerate(plans) if p in PLANS})
    # With `compensate` the later step fails, so what charge did is undone.
    script["after"] = ["perm"] if compensate else ["ok"]
    after = {"name": "after", "type": "x.ship", "dependsOn": ["charge"], "retry": retry}
    definition = compile_spec({"steps": [charge, after]})
    values = [
        {"order": 100 + i, "name": 7 if p == "bad-input" else f"o{i}"} for i, p in enumerate(plans)
    ]
    return Fan(definition, script, values, plans, max_parallel, tolerated, compensate)


@dataclass
class FanWatch:
    """Checks every decision of a forEach run; remembers what the end is checked against."""

    fan: Fan
    in_flight: set[tuple[str, int]] = field(default_factory=set)
    undos_in_flight: set[tuple[str, int]] = field(default_factory=set)
    succeeded_items: set[int] = field(default_factory=set)
    undone: Counter[int] = field(default_factory=Counter)
    output: list[Any] | None = None  # charge's output when it succeeded
    compensated_by: Fact | None = None  # the fact the run became Compensated on

    def __call__(self, fact: Fact, decision: Decision, before: ExecutionState) -> None:
        fan = self.fan
        if decision.applied and isinstance(fact, StepCompleted | StepFailed):
            _, index = split_item_key(fact.step)
            if index is not None:
                flight = self.undos_in_flight if fact.compensation else self.in_flight
                flight.discard((fact.step, fact.attempt))
                if isinstance(fact, StepCompleted):
                    if fact.compensation:
                        self.undone[index] += 1
                    else:
                        self.succeeded_items.add(index)
        for d in decision.dispatches:
            name, index = split_item_key(d.step)
            if index is None:
                continue
            assert name == "charge"
            if d.compensation:
                self.undos_in_flight.add((d.step, d.attempt))
                assert index in self.succeeded_items, f"undo of {d.step}, which did not succeed"
                plan = fan.plans[index]
                order = fan.values[index]["order"]
                assert d.input == {"of": f"{d.step}#{len(PLANS[plan])}", "order": order}
            else:
                self.in_flight.add((d.step, d.attempt))
                value = fan.values[index]
                expected = {"order": value["order"], "n": index, "size": len(value["name"])}
                assert d.input == expected
        if fan.max_parallel:
            assert len(self.in_flight) <= fan.max_parallel, sorted(self.in_flight)
            assert len(self.undos_in_flight) <= fan.max_parallel, sorted(self.undos_in_flight)
        charge = decision.state.steps["charge"]
        if charge.items is not None:
            self.check_starts(decision, before)
        if charge.phase is S.SUCCEEDED and before.steps["charge"].phase is not S.SUCCEEDED:
            self.output = charge.output
        if decision.state.phase is E.COMPENSATED and before.phase is not E.COMPENSATED:
            self.compensated_by = fact

    def check_starts(self, decision: Decision, before: ExecutionState) -> None:
        """No item starts once more items failed than are tolerated. Within one decision
        items start (or fail to render, undispatched) in index order, after the result
        the decision applies: walk them in that order."""
        items = decision.state.steps["charge"].items
        assert items is not None
        was = before.steps["charge"].items
        entries = was.entries if was is not None else (None,) * len(items)
        unrendered = [
            i
            for i, (old, new) in enumerate(zip(entries, items.entries, strict=True))
            if new.phase is S.FAILED and (old is None or old.phase is S.PENDING)
        ]
        failed = items.count(S.FAILED) - len(unrendered)
        started = [
            index
            for index in (
                split_item_key(d.step)[1]
                for d in decision.dispatches
                if d.attempt == 1 and not d.compensation
            )
            if index is not None
        ]
        moments = sorted([(i, "fails") for i in unrendered] + [(i, "starts") for i in started])
        for index, what in moments:
            if what == "fails":
                failed += 1
            else:
                assert failed <= self.fan.tolerated, f"item {index} started, {failed} failed"


@examples(80)
@given(fan=fan_outs(), data=st.data())
def test_for_each_keeps_its_limits_and_ends_by_its_tolerance(fan: Fan, data: st.DataObject) -> None:
    check_fan_out(fan, data)


@examples(40)
@given(fan=fan_outs(bad_inputs=True, most=20), data=st.data())
def test_for_each_items_whose_input_does_not_render_fail_like_any_other(
    fan: Fan, data: st.DataObject
) -> None:
    """The same, with items whose input fails to render: they fail without a dispatch."""
    check_fan_out(fan, data)


def check_fan_out(fan: Fan, data: st.DataObject) -> None:
    bus = Bus(fan.definition, fan.script, execution(fan.definition, {"orders": fan.values}))
    watch = FanWatch(fan)
    bus.checks.append(watch)
    bus.start()
    run_to_rest(bus, data, with_suspensions(bus, data, redeliveries(bus, data)))
    state = bus.state
    assert max(bus.dispatched.values(), default=1) == 1  # every attempt id is unique
    assert max(bus.applied_results.values(), default=1) == 1
    failing = sum(p in FAILING for p in fan.plans)
    should_succeed = failing <= fan.tolerated
    expected = [
        None if p in FAILING else {"v": f"charge[{i}]#{len(PLANS[p])}"}
        for i, p in enumerate(fan.plans)
    ]
    if should_succeed:
        assert watch.output == expected
        assert watch.succeeded_items == {i for i, p in enumerate(fan.plans) if p not in FAILING}
    else:
        assert watch.output is None
        charge = state.steps["charge"]
        assert charge.error is not None
        assert charge.error.type == "ItemsFailed"
        assert watch.succeeded_items <= {i for i, p in enumerate(fan.plans) if p not in FAILING}
    label("charge succeeds" if should_succeed else "charge fails")
    label(f"compensate={fan.compensate}, {len(watch.succeeded_items)} items succeeded")
    after_sent = [a for (s, a, _) in bus.dispatched if s == "after"]
    assert after_sent == ([1] if should_succeed else [])
    if not fan.compensate:
        assert state.phase is (E.COMPLETED if should_succeed else E.FAILED)
        assert not any(c for (_, _, c) in bus.dispatched)
        return
    assert watch.undone == Counter(dict.fromkeys(watch.succeeded_items, 1))
    assert watch.undos_in_flight == set()
    items = state.steps["charge"].items
    assert items is not None
    for i in watch.succeeded_items:
        assert items.entries[i].phase is S.COMPENSATED
    if should_succeed or watch.succeeded_items:
        assert state.phase is E.COMPENSATED
        if watch.succeeded_items:  # once the last undo is answered
            assert isinstance(watch.compensated_by, StepCompleted)
            assert watch.compensated_by.compensation
    else:
        assert state.phase is E.FAILED


# ------------------------------------------------------------------- 3. signals

APPROVAL_SCHEMA = {
    "type": "object",
    "required": ["approved"],
    "properties": {"approved": {"type": "boolean"}},
}
# Signal data, and whether it satisfies the approval schema; `note` takes anything.
DATA: list[tuple[Any, bool]] = [
    ({"approved": True}, True),
    ({"approved": False}, True),
    ({}, False),
    ({"approved": "yes"}, False),
    (7, False),
]
DECLARED = ("approval", "note")


@dataclass
class SignalModel:
    """What the run should look like after each fact: the rules of `signals` in small."""

    phase: E = E.PENDING
    first: S = S.PENDING
    wait: S = S.PENDING
    wait_output: Any = None
    ship: S = S.PENDING
    accepted: list[list[Any]] = field(default_factory=list)  # [id, name, data, taken by]

    def apply(self, fact: Fact) -> str:
        """Apply `fact`; "ignored", "refused" or "applied"."""
        if isinstance(fact, SignalReceived):
            return self._signal(fact)
        if isinstance(fact, TimerFired):
            if self.wait is not S.RUNNING:
                return "ignored"
            self.wait = S.FAILED
            self.ship = S.SKIPPED
            self.phase = E.FAILED
            return "applied"
        if isinstance(fact, StepCompleted):
            if fact.step == "first":
                if self.first is not S.RUNNING:
                    return "ignored"
                self.first = S.SUCCEEDED
                self._wait_starts()
                return "applied"
            if self.ship is not S.RUNNING:
                return "ignored"
            self.ship = S.SUCCEEDED
            self.phase = E.COMPLETED
            return "applied"
        if self.phase is not E.PENDING:  # Start
            return "ignored"
        self.phase = E.RUNNING
        self.first = S.RUNNING
        return "applied"

    def _signal(self, fact: SignalReceived) -> str:
        if any(a[0] == fact.signal_id for a in self.accepted):
            return "ignored"
        if self.phase in (E.COMPLETED, E.FAILED):
            return "refused"
        if fact.name not in DECLARED:
            return "refused"
        if fact.name == "approval" and not valid(fact.data):
            return "refused"
        self.accepted.append([fact.signal_id, fact.name, fact.data, None])
        if fact.name == "approval" and self.wait is S.RUNNING:
            self._take(len(self.accepted) - 1)
        return "applied"

    def _wait_starts(self) -> None:
        kept = next(
            (i for i, a in enumerate(self.accepted) if a[1] == "approval" and a[3] is None), None
        )
        self.wait = S.RUNNING
        if kept is not None:
            self._take(kept)

    def _take(self, index: int) -> None:
        self.accepted[index][3] = "wait"
        self.wait = S.SUCCEEDED
        self.wait_output = self.accepted[index][2]
        self.ship = S.RUNNING


def valid(data: Any) -> bool:
    """Whether approval data satisfies the schema (by the table, not by jsonschema)."""
    return next(ok for d, ok in DATA if d == data and type(d) is type(data))


@st.composite
def signal_runs(draw: st.DrawFn) -> tuple[bool, list[Any]]:
    """Whether the wait has a timeout, and the events in the order they happen."""
    timeout = draw(st.booleans())
    signals = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["approval", "approval", "note", "nope"]),
                st.integers(0, len(DATA) - 1),
                st.sampled_from(["s1", "s2", "s3", "s4"]),
            ),
            max_size=8,
        )
    )
    events: list[Any] = [("signal", *s) for s in signals]
    events += [("ship",)] * draw(st.integers(1, 2)) + [("first",)] * draw(st.integers(0, 1))
    if timeout:
        events += [("timeout",)] * draw(st.integers(0, 2))  # a timer may never fire
    events = draw(st.permutations(events))
    # Start and the wait being reached (the result of `first`) go anywhere among them;
    # the delivery loop holds back a result until its dispatch, and sends a timeout that
    # comes up before its wait started to the end.
    events.insert(draw(st.integers(0, len(events))), ("first",))
    events.insert(draw(st.integers(0, len(events))), ("start",))
    return timeout, events


def signal_flow(timeout: bool) -> Definition:
    wait_input: dict[str, Any] = {"signal": "approval"}
    if timeout:
        wait_input["timeout"] = "1h"
    return compile_spec(
        {
            "signals": [{"name": "approval", "schema": APPROVAL_SCHEMA}, {"name": "note"}],
            "steps": [
                {"name": "first", "type": "x.work"},
                {
                    "name": "wait",
                    "type": "sagaflow.waitForSignal",
                    "dependsOn": ["first"],
                    "input": wait_input,
                },
                {
                    "name": "ship",
                    "type": "x.work",
                    "dependsOn": ["wait"],
                    "input": {"ok": template("steps.wait.output.approved")},
                },
            ],
        }
    )


def event_fact(event: Any) -> Fact:
    kind = event[0]
    if kind == "signal":
        _, name, data, signal_id = event
        return SignalReceived(name, signal_id, DATA[data][0])
    if kind == "timeout":
        return TimerFired("signal-timeout", "wait", 1)
    if kind == "start":
        return Start()
    return StepCompleted(kind, 1, {kind: 1})


def caused(event: Any, state: ExecutionState) -> bool:
    """Whether what `event` answers exists yet: a result needs its dispatch, a timeout
    the wait it is set for. Until then the event waits (a bus cannot deliver it)."""
    kind = event[0]
    if kind in ("first", "ship"):
        return state.steps[kind].attempt >= 1
    if kind == "timeout":
        return state.steps["wait"].attempt >= 1
    return True


@examples(300)
@given(run=signal_runs())
def test_a_wait_takes_the_first_valid_signal_whenever_it_comes(run: Any) -> None:
    timeout, events = run
    definition = signal_flow(timeout)
    bus = Bus(definition, {"first": ["ok"], "ship": ["ok"]}, execution(definition, {}))
    model = SignalModel()
    waiting: list[Any] = []

    def deliver(event: Any) -> None:
        fact = event_fact(event)
        before = bus.state
        expected = model.apply(fact)
        decision = bus.send(fact)
        after = decision.state
        got = "ignored" if decision.ignored else "refused" if decision.refused else "applied"
        assert got == expected, (fact, decision.ignored, decision.refused)
        if isinstance(fact, SignalReceived | TimerFired):
            label(f"{type(fact).__name__} {got} while the run is {before.phase.value}")
        if before.steps["wait"].phase is not S.SUCCEEDED is after.steps["wait"].phase:
            label(f"wait took a signal on {type(fact).__name__}")
        if expected == "refused":
            assert after.steps == before.steps
            assert after.signals == before.signals
            assert after.phase is before.phase
            assert decision.dispatches == ()
        phases = {n: s.phase for n, s in after.steps.items()}
        assert phases == {"first": model.first, "wait": model.wait, "ship": model.ship}, fact
        assert after.phase is model.phase, fact
        if model.wait is S.SUCCEEDED:
            assert after.steps["wait"].output == model.wait_output
            assert "signal-timeout:wait:1" not in bus.timers  # cancelled once taken
        elif model.wait is S.RUNNING:
            assert ("signal-timeout:wait:1" in bus.timers) is timeout
        kept = [[s.id, s.name, s.data, s.step] for s in after.signals]
        assert kept == model.accepted, fact

    for event in events:
        if event == ("timeout",) and not caused(event, bus.state):
            events.append(("timeout", "late"))  # not set yet: it fires later, if at all
            continue
        waiting.append(event)
        progressed = True
        while progressed:
            progressed = False
            for ready in waiting:
                if caused(ready, bus.state):
                    waiting.remove(ready)
                    deliver(ready)
                    progressed = True
                    break
    for stale in waiting:  # answers to what never happened: the engine ignores them
        deliver(stale)
    ship = [d for d, _ in bus.dispatches() if d.step == "ship"]
    label(f"run {model.phase.value}, wait {model.wait.value}")
    if model.wait is S.SUCCEEDED:
        assert [d.input for d in ship] == [{"ok": model.wait_output["approved"]}]
    else:
        assert ship == []


# ------------------------------------------------------- 4. child workflow results

PARENT = Parent("parent-exec", "default", "parent-run", "order", 1)


@st.composite
def child_flows(draw: st.DrawFn) -> tuple[Definition, dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    script: dict[str, Any] = {}
    for name in ("a", "b"):
        tries = draw(st.integers(1, 2))
        steps.append(
            {
                "name": name,
                "workflowRef": {"name": f"child-{name}"},
                "input": {"n": name},
                "retry": {
                    "maxAttempts": tries,
                    "initialInterval": draw(st.sampled_from(["0s", "1s"])),
                },
            }
        )
        script[name] = draw(
            st.lists(st.sampled_from(["ok", "ok", "retry", "perm"]), min_size=tries, max_size=tries)
        )
        script[f"{name}/undo"] = ["ok"]
    steps.append(
        {
            "name": "c",
            "type": "x.work",
            "dependsOn": ["a", "b"],
            "input": {"a": template("steps.a.output.v"), "b": template("steps.b.output.v")},
        }
    )
    script["c"] = draw(st.sampled_from([["ok"], ["perm"]]))
    return compile_spec({"steps": steps}), script


def child_noise(bus: Bus, data: st.DataObject, budget: int = 30) -> Callable[[], Fact | None]:
    """Now and then a duplicated result, or a late one from an older attempt (a child
    that ended after it was given up on), or one for no attempt at all (attempt 0)."""
    left = [budget]

    def noise() -> Fact | None:
        if not left[0] or data.draw(st.integers(0, 3)) != 3:
            return None
        left[0] -= 1
        results = [f for f in bus.delivered if isinstance(f, StepCompleted | StepFailed)]
        kind = data.draw(st.sampled_from(["copy", "stale", "stale-undo"]))
        if kind == "copy" and results:
            return results[data.draw(st.integers(0, len(results) - 1))]
        step = data.draw(st.sampled_from(["a", "b"]))
        current = bus.state.steps[step]
        if kind == "stale-undo":
            undo = current.undo.attempt if current.undo is not None else 0
            attempt = max(undo - 1, 0)
            compensation = True
        else:
            attempt = data.draw(st.integers(0, max(current.attempt - 1, 0)))
            compensation = False
        if data.draw(st.booleans()):
            return StepCompleted(step, attempt, {"v": "stale"}, compensation)
        return StepFailed(step, attempt, "ChildFailed", "stale", True, compensation)

    return noise


@dataclass
class ChildWatch:
    succeeded: dict[str, int] = field(default_factory=dict)  # child -> its attempt that did
    compensated_by: Fact | None = None

    def __call__(self, fact: Fact, decision: Decision, before: ExecutionState) -> None:
        if (
            decision.applied
            and isinstance(fact, StepCompleted)
            and not fact.compensation
            and fact.step in ("a", "b")
        ):
            self.succeeded[fact.step] = fact.attempt
        after = decision.state
        for d in decision.dispatches:
            if d.step in ("a", "b"):
                assert d.type == CHILD
                assert d.workflow == f"child-{d.step}"
                if d.compensation:
                    assert d.input == {"childAttempt": self.succeeded[d.step]}
                else:
                    assert d.input == {"n": d.step}
            else:
                assert d.step == "c"
                assert not d.compensation
                assert after.steps["a"].phase is S.SUCCEEDED
                assert after.steps["b"].phase is S.SUCCEEDED
                a, b = self.succeeded["a"], self.succeeded["b"]
                assert d.input == {"a": f"a#{a}", "b": f"b#{b}"}
        if after.phase is E.COMPENSATED and before.phase is not E.COMPENSATED:
            self.compensated_by = fact


@examples(300)
@given(flow=child_flows(), data=st.data())
def test_child_results_in_any_order(flow: Any, data: st.DataObject) -> None:
    definition, script = flow
    bus = Bus(definition, script, replace(execution(definition, {}), parent=PARENT))
    watch = ChildWatch()
    bus.checks.append(watch)
    bus.start()
    bus.run(random_order(data), child_noise(bus, data))
    state = bus.state
    assert max(bus.dispatched.values(), default=1) == 1
    assert max(bus.applied_results.values(), default=1) == 1
    undos = Counter(s for (s, _, c), n in bus.dispatched.items() for _ in range(n) if c)
    both = set(watch.succeeded) == {"a", "b"}
    assert [a for (s, a, _) in bus.dispatched if s == "c"] == ([1] if both else [])
    if both and script["c"] == ["ok"]:
        assert state.phase is E.COMPLETED
        assert undos == Counter()
        # The parent undoes this run's step: its completed children are undone, once.
        bus.send(Compensate(1))
        bus.run(random_order(data), child_noise(bus, data))
        assert bus.send(Compensate(1)).ignored is not None
        state = bus.state
        assert state.parent is not None
        assert state.parent.undo_attempt == 1
        undos = Counter(s for (s, _, c), n in bus.dispatched.items() for _ in range(n) if c)
    label(f"{''.join(sorted(watch.succeeded)) or 'none'} succeeded, c {script['c'][0]}")
    label(f"ends {state.phase.value}")
    assert undos == Counter(dict.fromkeys(watch.succeeded, 1))
    if watch.succeeded:
        assert state.phase is E.COMPENSATED
        assert isinstance(watch.compensated_by, StepCompleted)
        assert watch.compensated_by.compensation
        for name in watch.succeeded:
            assert state.steps[name].phase is S.COMPENSATED
    else:
        assert state.phase is E.FAILED
