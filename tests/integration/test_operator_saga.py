"""Sagas through `sagaflow operator`: control requests made by editing the Execution's
spec with kubectl, as a person would, against the in-memory API server.

The cluster is `test_operator`'s (operator and runner subprocesses, a fresh database)
with the saga handlers of `saga_runners.py`, which log the start and end of every
forward and compensation call: what ran, and what was undone, is read from that log,
not inferred from timing. A gate file holds a call while the test acts.

The last tests need no cluster: how a spec change becomes requests (their order,
what is refused before asking), and that the status mirror keeps the handlers'
`SpecAccepted` condition whichever writes last.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from operator_proc import Process, running
from test_operator import NS, Body, Cluster, condition, execution, phase_is, workflow
from tests.support.kube import (
    EVENTS,
    EXECUTIONS,
    WORKFLOWS,
    KubeClient,
    is_watch_of,
    running_api_server,
)
from tests.support.kubectl import Kubectl, parse_table, rows_by_name

from sagaflow.adapters.postgres.mirror_rows import Pending
from sagaflow.core.facts import Cancel, Redrive, Resume, SkipCompensation, Suspend
from sagaflow.core.state import new_execution
from sagaflow.kube.control import parse_spec, plan_change
from sagaflow.kube.mirror import status_patch

pytestmark = pytest.mark.timeout(60)

RUNNERS = Path(__file__).with_name("saga_runners.py")


class Saga:
    """The cluster, kubectl, the folder of gate and marker files, the handlers' log."""

    def __init__(self, cluster: Cluster, kubectl: Kubectl, files: Path) -> None:
        self.cluster = cluster
        self.api = cluster.api
        self.kubectl = kubectl
        self.files = files
        self.log = files / "calls.log"

    async def start(self, name: str, steps: list[Body], *executions: Body, **spec: Any) -> None:
        await self.cluster.apply(WORKFLOWS, workflow(name, steps, **spec))
        for body in executions:
            await self.cluster.apply(EXECUTIONS, body)

    async def patch(self, name: str, spec: Body) -> None:
        """`kubectl patch --type merge` of the Execution's spec."""
        body = json.dumps({"spec": spec})
        await self.kubectl.run("patch", "execution", name, "--type", "merge", "-p", body)

    async def status(self, name: str, predicate: Callable[[Body], bool]) -> Body:
        body = await self.cluster.wait_status(EXECUTIONS, name, predicate, within=30)
        return dict(body["status"])

    def calls(self, name: str, *, undo: bool | None = None) -> list[tuple[str, bool]]:
        """(step, undo) of each call of the execution's handlers, in start order."""
        if not self.log.exists():
            return []
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [
            (c["step"], c["undo"])
            for c in lines
            if c["ex"] == f"{NS}/{name}"
            and c["event"] == "start"
            and (undo is None or c["undo"] == undo)
        ]

    async def warning(self, name: str, reason: str, text: str) -> Body:
        """The first Warning Event on the Execution with this reason and text, once posted."""

        def probe() -> Body | None:
            return next(
                (
                    e
                    for e in self.api.bodies(EVENTS)
                    if e["involvedObject"].get("name") == name
                    and e.get("type") == "Warning"
                    and e.get("reason") == reason
                    and text in e.get("message", "")
                ),
                None,
            )

        return await self.api.wait_until(probe, within=20)

    def events(self, name: str, reason: str) -> list[Body]:
        """Every Event on the Execution with this reason, whoever posted it."""
        return [
            e
            for e in self.api.bodies(EVENTS)
            if e["involvedObject"].get("name") == name and e.get("reason") == reason
        ]

    async def history(self, name: str) -> list[tuple[str, str | None]]:
        """(kind, step) of the run's history rows, in order."""
        conn = await asyncpg.connect(self.cluster.dsn)
        try:
            rows = await conn.fetch(
                "SELECT h.kind, h.step FROM sagaflow_history h "
                "JOIN sagaflow_executions e USING (execution_id) "
                "WHERE e.namespace=$1 AND e.name=$2 ORDER BY h.seq",
                NS,
                name,
            )
        finally:
            await conn.close()
        return [(r["kind"], r["step"]) for r in rows]


@pytest.fixture
async def saga(pg_database: str, tmp_path: Path) -> AsyncIterator[Saga]:
    async with running_api_server() as api, KubeClient(api.url) as client:
        cluster = Cluster(api, client, pg_database, tmp_path)
        files = tmp_path / "files"
        files.mkdir()
        env = {**cluster.runner.env, "SAGA_LOG": str(files / "calls.log"), "SAGA_DIR": str(files)}
        args = ["runner", "--module", str(RUNNERS)]
        cluster.runner = Process("runner", args, env, tmp_path / "runner.log")
        async with running(cluster.operator, cluster.runner):
            await api.wait_for_request(is_watch_of(EXECUTIONS), within=30)
            yield Saga(cluster, Kubectl(api.url, tmp_path / "kubectl", namespace=NS), files)


def undone_by(**spec: Any) -> Body:
    return {"compensate": {"type": "saga.undo", **spec}}


def steps_of(status: Body) -> dict[str, str]:
    return {s["name"]: s["phase"] for s in status.get("steps", ())}


async def test_a_cancel_in_the_spec_undoes_what_was_done_in_reverse_order(saga: Saga) -> None:
    steps = [
        {"name": "reserve", "type": "saga.work", **undone_by()},
        {"name": "charge", "type": "saga.work", "dependsOn": ["reserve"], **undone_by()},
        {
            "name": "hold",
            "type": "sagaflow.wait",
            "dependsOn": ["charge"],
            "input": {"duration": "1h"},
        },
        {"name": "ship", "type": "saga.work", "dependsOn": ["hold"]},
    ]
    # One cancelled mid-run; one created cancelled (and suspended: nothing ever ran).
    born_cancelled = execution("never", "order", suspend=True, cancel=True)
    await saga.start("order", steps, execution("order-1", "order"), born_cancelled)
    await saga.status("order-1", lambda s: s.get("currentSteps") == ["hold"])

    await saga.patch("order-1", {"cancel": True})
    await saga.kubectl.run(
        "wait", "--for=jsonpath={.status.phase}=Compensated", "execution/order-1", "--timeout=30s"
    )
    status = await saga.status("order-1", phase_is("Compensated"))
    assert steps_of(status) == {
        "reserve": "Compensated",
        "charge": "Compensated",
        "hold": "Skipped",
        "ship": "Skipped",
    }
    assert status["error"] == {"type": "Cancelled", "message": "spec.cancel set"}
    # The runner's handler undid them (ctx.compensates), dependents first; ship never ran.
    assert saga.calls("order-1") == [
        ("reserve", False),
        ("charge", False),
        ("charge", True),
        ("reserve", True),
    ]

    never = await saga.status("never", phase_is("Cancelled", "Compensated", "Completed"))
    assert never["phase"] == "Cancelled"
    assert saga.calls("never") == []
    assert "StepDispatched" not in {kind for kind, _ in await saga.history("never")}

    table = parse_table((await saga.kubectl.run("get", "executions")).stdout)
    assert rows_by_name(table)["order-1"]["PHASE"] == "Compensated"
    assert rows_by_name(table)["never"]["PHASE"] == "Cancelled"

    described = (await saga.kubectl.run("describe", "execution", "order-1")).stdout
    for expected in (
        "ExecutionCompensating",
        "StepCompensating",
        "StepCompensated",
        "ExecutionCompensated",
        "undid charge, reserve",
    ):
        assert expected in described, (expected, described)
    events = {e["reason"]: e["type"] for e in saga.cluster.events_of("order-1")}
    assert events["StepCompensated"] == "Normal"
    assert events["ExecutionCompensated"] == "Warning"


async def test_a_suspended_run_dispatches_nothing_until_resumed(saga: Saga) -> None:
    steps = [
        {"name": "first", "type": "saga.work", "input": {"gate": "first-open"}},
        {"name": "second", "type": "saga.work", "dependsOn": ["first"]},
    ]
    created_suspended = execution("held-2", "held", suspend=True)
    await saga.start("held", steps, execution("held-1", "held"), created_suspended)
    await saga.api.wait_until(lambda: saga.calls("held-1") == [("first", False)])

    await saga.patch("held-1", {"suspend": True})
    status = await saga.status("held-1", phase_is("Suspended"))
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Suspended")
    # The attempt in flight finishes and is recorded; its dependent is not dispatched.
    (saga.files / "first-open").touch()
    status = await saga.status("held-1", lambda s: steps_of(s).get("first") == "Succeeded")
    assert status["phase"] == "Suspended"
    assert steps_of(status)["second"] == "Pending"
    assert ("StepDispatched", "second") not in await saga.history("held-1")
    assert saga.calls("held-1") == [("first", False)]
    # Created suspended: nothing at all was dispatched.
    assert (await saga.status("held-2", phase_is("Suspended")))["phase"] == "Suspended"
    assert saga.calls("held-2") == []

    for name in ("held-1", "held-2"):
        await saga.patch(name, {"suspend": False})
    for name in ("held-1", "held-2"):
        done = await saga.status(name, phase_is("Completed", "Failed"))
        assert done["phase"] == "Completed"
        assert saga.calls(name) == [("first", False), ("second", False)]
    kinds = [kind for kind, _ in await saga.history("held-1")]
    assert kinds.index("ExecutionSuspended") < kinds.index("ExecutionResumed")


async def test_a_failed_run_redriven_by_the_spec_reruns_only_what_failed(saga: Saga) -> None:
    (saga.files / "broken").touch()
    steps = [
        {"name": "a", "type": "saga.work"},
        {
            "name": "b",
            "type": "saga.work",
            "dependsOn": ["a"],
            "input": {"failWhile": "broken"},
            "retry": {"maxAttempts": 1},
        },
        {"name": "c", "type": "saga.work", "dependsOn": ["b"]},
    ]
    await saga.start("fragile", steps, execution("fragile-1", "fragile"))
    failed = await saga.status("fragile-1", phase_is("Failed", "Completed"))
    assert failed["phase"] == "Failed" and failed["error"]["type"] == "Broken"

    (saga.files / "broken").unlink()  # the cause is fixed: ask for one more try
    await saga.patch("fragile-1", {"redrive": 1})
    done = await saga.status("fragile-1", phase_is("Completed"))
    assert done["redrives"] == 1
    assert "error" not in done
    assert saga.calls("fragile-1") == [("a", False), ("b", False), ("b", False), ("c", False)]
    redriven = saga.events("fragile-1", "ExecutionRedriven")
    assert len(redriven) == 1 and redriven[0]["type"] == "Normal"
    assert "keeping a" in redriven[0]["message"]


async def test_a_compensation_failed_for_good_is_retried_by_a_redrive(saga: Saga) -> None:
    (saga.files / "undo-broken").touch()
    steps = [
        {
            "name": "a",
            "type": "saga.work",
            **undone_by(input={"failWhile": "undo-broken"}, retry={"maxAttempts": 1}),
        },
        {"name": "b", "type": "saga.work", "dependsOn": ["a"], "input": {"fail": True}},
    ]
    await saga.start("stuck", steps, execution("stuck-1", "stuck"))
    status = await saga.status("stuck-1", phase_is("CompensationFailed", "Compensated"))
    assert status["phase"] == "CompensationFailed"
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "CompensationFailed")
    assert "compensation of step a failed" in ready["message"]
    assert steps_of(status)["a"] == "CompensationFailed"
    failed = saga.events("stuck-1", "StepCompensationFailed")
    assert [e["type"] for e in failed] == ["Warning"]
    described = (await saga.kubectl.run("describe", "execution", "stuck-1")).stdout
    assert "ExecutionCompensationFailed" in described

    (saga.files / "undo-broken").unlink()
    await saga.patch("stuck-1", {"redrive": 1})
    done = await saga.status("stuck-1", phase_is("Compensated"))
    assert done["redrives"] == 1
    a = next(s for s in done["steps"] if s["name"] == "a")
    assert a["phase"] == "Compensated" and a["compensation"]["attempts"] == 2
    assert saga.calls("stuck-1") == [("a", False), ("b", False), ("a", True), ("a", True)]
    assert condition(done, "Ready")["reason"] == "Compensated"


async def test_invalid_spec_changes_are_named_and_change_nothing(saga: Saga) -> None:
    steps = [{"name": "a", "type": "saga.work", **undone_by()}]
    # spec.redrive at creation is the baseline: nothing to redrive.
    ghost = execution("steady-2", "steady", skipCompensation=["ghost"])
    await saga.start("steady", steps, execution("steady-1", "steady", redrive=2), ghost)
    event = await saga.warning("steady-2", "InvalidSpec", "spec.skipCompensation[0]")
    assert "'ghost' is not a step of this execution (workflow steady v1 has a)" in event["message"]
    status = await saga.status("steady-1", phase_is("Completed", "Failed"))
    assert status["phase"] == "Completed" and "redrives" not in status
    before = await saga.history("steady-1")

    await saga.patch("steady-1", {"redrive": 1})
    event = await saga.warning("steady-1", "InvalidSpec", "spec.redrive")
    assert "must not decrease (was 2, now 1)" in event["message"]
    assert "set it back to 2" in event["message"]
    status = await saga.status(
        "steady-1", lambda s: any(c["type"] == "SpecAccepted" for c in s.get("conditions", ()))
    )
    accepted = condition(status, "SpecAccepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "InvalidSpec")
    assert "spec.redrive: must not decrease" in accepted["message"]
    assert await saga.history("steady-1") == before  # no request was made
    # Put back, it asks for nothing (a redrive of a Completed run would be refused).
    await saga.patch("steady-1", {"redrive": 2})
    await saga.status("steady-1", lambda s: condition(s, "SpecAccepted")["status"] == "True")
    assert await saga.history("steady-1") == before

    # A name no step has is named by its index; the known one is asked for, and the
    # engine's refusal (nothing is left to undo) is one Warning, from the history.
    await saga.patch("steady-1", {"skipCompensation": ["a", "nope"]})
    event = await saga.warning("steady-1", "InvalidSpec", "spec.skipCompensation[1]")
    assert "'nope' is not a step of this execution" in event["message"]
    refused = await saga.warning("steady-1", "RequestRefused", "SkipCompensation refused")
    assert "nothing is left to undo" in refused["message"]
    status = await saga.status(
        "steady-1",
        lambda s: (
            "skipCompensation[1]" in str(s.get("conditions"))
            and "SkipCompensationRefused" in str(s.get("conditions"))
        ),
    )
    assert condition(status, "Request")["status"] == "False"
    assert condition(status, "SpecAccepted")["status"] == "False"  # kept by the mirror
    assert len([e for e in saga.api.bodies(EVENTS) if "refused" in e.get("message", "")]) == 1

    # A change with nothing wrong says so; a cancel cannot be undone, and says so too.
    await saga.patch("steady-1", {"cancel": True})
    await saga.status("steady-1", lambda s: condition(s, "SpecAccepted")["status"] == "True")
    await saga.patch("steady-1", {"cancel": False, "input": {"late": True}})
    await saga.warning("steady-1", "SpecChangeIgnored", "spec.cancel: a cancel cannot be undone")
    await saga.warning("steady-1", "SpecChangeIgnored", "spec.input")

    before = await saga.history("steady-1")
    await saga.patch("steady-1", {"redrive": -1})
    await saga.warning("steady-1", "InvalidSpec", "spec.redrive: Input should be greater than")
    assert await saga.history("steady-1") == before
    kinds = {kind for kind, _ in before}
    assert "ExecutionRedriven" not in kinds and "ExecutionCancelled" not in kinds
    final = await saga.status("steady-1", phase_is("Completed"))
    assert final["phase"] == "Completed"
    assert saga.calls("steady-1") == [("a", False)]


RUN = new_execution(
    execution_id="uid-1",
    namespace=NS,
    name="run-1",
    workflow="flow",
    version=1,
    input={},
    step_names=("a", "b"),
)


def test_the_mirror_keeps_the_condition_the_handlers_own() -> None:
    """Whichever writes last, the mirror (state) or a handler (`SpecAccepted`), both stay."""
    state = replace(RUN, revision=2)
    ours = {
        "type": "SpecAccepted",
        "status": "False",
        "reason": "InvalidSpec",
        "message": "generation 3: spec.redrive: must not decrease (was 2, now 1)",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    stale_ready = {"type": "Ready", "status": "True", "reason": "Running", "message": ""}
    obj = {
        "metadata": {"resourceVersion": "7", "generation": 3},
        "status": {"revision": 1, "conditions": [stale_ready, ours]},
    }
    patch = status_patch(Pending("uid-1", NS, "run-1", state, 0), obj)
    assert patch is not None
    conditions = patch["status"]["conditions"]
    assert [c["type"] for c in conditions] == ["Succeeded", "Ready", "SpecAccepted"]
    assert conditions[-1] == ours


REF = {"workflowRef": {"name": "flow"}}
PLANS: dict[str, tuple[Body, Body, int, list[tuple[str, Any]], list[str]]] = {
    # name: (old spec, new spec, redrive seen, [(field, fact)], problem prefixes)
    "all-at-once-in-order": (
        {**REF, "suspend": True},
        {**REF, "redrive": 1, "cancel": True, "skipCompensation": ["b", "a", "b"]},
        0,
        [
            ("spec.skipCompensation", SkipCompensation(("b", "a"))),
            ("spec.redrive", Redrive(1, False)),
            ("spec.suspend", Resume()),
            ("spec.cancel", Cancel("spec.cancel set")),
        ],
        [],
    ),
    "cancel-then-suspend": (
        REF,
        {**REF, "cancel": True, "suspend": True},
        0,
        [("spec.cancel", Cancel("spec.cancel set")), ("spec.suspend", Suspend())],
        [],
    ),
    "redrive-to-latest": (
        {**REF, "redrive": 1},
        {**REF, "redrive": 2, "redriveToLatest": True},
        1,
        [("spec.redrive", Redrive(2, True))],
        [],
    ),
    "put-back-after-lowering": ({**REF, "redrive": 1}, {**REF, "redrive": 3}, 3, [], []),
    "lowered": ({**REF, "redrive": 3}, {**REF, "redrive": 1}, 3, [], ["spec.redrive:"]),
    "unknown-names-only": (
        REF,
        {**REF, "skipCompensation": ["x"]},
        0,
        [],
        ["spec.skipCompensation[0]:"],
    ),
    "names-already-listed": (
        {**REF, "skipCompensation": ["a"]},
        {**REF, "skipCompensation": ["a"], "suspend": True},
        0,
        [("spec.suspend", Suspend())],
        [],
    ),
    "an-invalid-old-spec-counts-as-defaults": (
        {**REF, "redrive": -4, "suspend": "yes"},
        {**REF, "redrive": 0, "suspend": True},
        0,
        [("spec.suspend", Suspend())],
        [],
    ),
    "an-invalid-new-spec-asks-nothing": (
        REF,
        {**REF, "redrive": -1, "suspend": True},
        0,
        [],
        ["spec.redrive:"],
    ),
}


@pytest.mark.parametrize("case", list(PLANS.values()), ids=list(PLANS))
def test_a_spec_change_plans_its_requests(
    case: tuple[Body, Body, int, list[tuple[str, Any]], list[str]],
) -> None:
    old, new, seen, asks, problems = case
    plan = plan_change(old, new, parse_spec(new), RUN, seen)
    assert [(a.field, a.fact) for a in plan.asks] == asks
    assert len(plan.problems) == len(problems)
    assert all(p.startswith(want) for p, want in zip(plan.problems, problems, strict=True))
