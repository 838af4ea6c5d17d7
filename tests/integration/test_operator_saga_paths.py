"""The saga's paths through `sagaflow operator`: undo order and parallelism, a retried
compensation, the pivot, in doubt, redrive onto the latest version, a kill -9 of the
operator mid-undo, and the rollback sample.

`test_local_saga.py` proves the same semantics through `sagaflow run`; here the same
shapes are objects in the in-memory API server, the phases are read back from it and
what ran (and was undone, and when) from the log of the runner's handlers
(`saga_runners.py`), never inferred from timing. Independent cases share a cluster:
starting one is most of a test's cost.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import test_operator
import test_operator_saga
import yaml
from operator_proc import ROOT
from test_local_saga import window
from test_operator import NS, Body, Cluster, condition, execution, phase_is
from test_operator_saga import Saga, steps_of, undone_by
from tests.support.kube import EXECUTIONS, WORKFLOWS

pytestmark = pytest.mark.timeout(60)

# The neighbours' fixtures, under the names the tests ask for: the saga cluster
# (`saga_runners.py`) and the plain one (the sample's runners).
saga = test_operator_saga.saga
cluster = test_operator.cluster

FAST_RETRY = {"maxAttempts": 3, "initialInterval": "10ms"}
SHAPES: dict[str, tuple[list[Body], Body]] = {
    # workflow: (steps, more of its spec); each has one Execution, `<workflow>-1`
    "chain": (
        [
            {"name": "a", "type": "saga.work", **undone_by()},
            {"name": "b", "type": "saga.work", "dependsOn": ["a"], **undone_by()},
            {"name": "c", "type": "saga.work", "dependsOn": ["b"], "input": {"fail": True}},
        ],
        {},
    ),
    "diamond": (
        [
            {"name": "root", "type": "saga.work", **undone_by()},
            {
                "name": "left",
                "type": "saga.work",
                "dependsOn": ["root"],
                **undone_by(input={"slow": 0.3}),
            },
            {
                "name": "right",
                "type": "saga.work",
                "dependsOn": ["root"],
                **undone_by(input={"slow": 0.3}),
            },
            {
                "name": "end",
                "type": "saga.work",
                "dependsOn": ["left", "right"],
                "input": {"fail": True},
            },
        ],
        {},
    ),
    "retried": (
        [
            {"name": "a", "type": "saga.work", **undone_by(input={"failTimes": 2})},
            {"name": "b", "type": "saga.work", "dependsOn": ["a"], "input": {"fail": True}},
        ],
        {"retry": FAST_RETRY},
    ),
    "pivoted": (
        [
            {"name": "a", "type": "saga.work", **undone_by()},
            {"name": "ship", "type": "saga.work", "dependsOn": ["a"], "pivot": True},
            {"name": "notify", "type": "saga.work", "dependsOn": ["ship"], "input": {"fail": True}},
        ],
        {},
    ),
    "in-doubt": (
        [
            {"name": "root", "type": "saga.work", **undone_by()},
            {"name": "quick", "type": "saga.work", "dependsOn": ["root"], "input": {"fail": True}},
            {
                "name": "slow",
                "type": "saga.work",
                "dependsOn": ["root"],
                "input": {"slow": 0.5},
                **undone_by(),
            },
        ],
        {"compensation": {"inDoubt": "await"}},
    ),
}


def log_of(saga: Saga, name: str) -> list[dict[str, Any]]:
    """Every line the execution's handlers logged (start and end, with time and key)."""
    lines = [json.loads(line) for line in saga.log.read_text().splitlines() if line]
    return [c for c in lines if c["ex"] == f"{NS}/{name}"]


async def test_failed_runs_are_undone_in_reverse_order_in_parallel_or_not_at_all(
    saga: Saga,
) -> None:
    for name, (steps, spec) in SHAPES.items():
        await saga.start(name, steps, execution(f"{name}-1", name), **spec)
    ended = ("Completed", "Failed", "Compensated", "CompensationFailed")
    status = {name: await saga.status(f"{name}-1", phase_is(*ended)) for name in SHAPES}
    assert {name: s["phase"] for name, s in status.items()} == {
        "chain": "Compensated",
        "diamond": "Compensated",
        "retried": "Compensated",
        "pivoted": "Failed",
        "in-doubt": "Compensated",
    }

    # Chain: b undone, then a; c failed and is not undone.
    assert steps_of(status["chain"]) == {"a": "Compensated", "b": "Compensated", "c": "Failed"}
    assert status["chain"]["error"]["step"] == "c"
    assert saga.calls("chain-1", undo=True) == [("b", True), ("a", True)]
    chain = log_of(saga, "chain-1")
    assert window(chain, "b", True)[1] < window(chain, "a", True)[0]

    # Diamond: the branches undone at once (their windows overlap), the root after both.
    assert steps_of(status["diamond"])["end"] == "Failed"
    diamond = log_of(saga, "diamond-1")
    left, right = window(diamond, "left", True), window(diamond, "right", True)
    assert left[0] < right[1] and right[0] < left[1]
    assert max(left[1], right[1]) < window(diamond, "root", True)[0]

    # A compensation retried on the workflow's policy, succeeding on its third attempt.
    retried = {s["name"]: s for s in status["retried"]["steps"]}
    assert retried["a"]["phase"] == "Compensated"
    assert retried["a"]["compensation"]["attempts"] == 3
    assert saga.calls("retried-1", undo=True) == [("a", True)] * 3

    # Past the pivot nothing is undone: the run is Failed and says why.
    assert steps_of(status["pivoted"]) == {
        "a": "Succeeded",
        "ship": "Succeeded",
        "notify": "Failed",
    }
    ready = condition(status["pivoted"], "Ready")
    assert ready["status"] == "False"
    assert "pivot step ship succeeded, nothing is undone" in ready["message"]
    assert saga.calls("pivoted-1", undo=True) == []

    # In doubt, awaited: slow's result came after quick failed; slow undone, then root.
    assert steps_of(status["in-doubt"]) == {
        "root": "Compensated",
        "quick": "Failed",
        "slow": "Compensated",
    }
    doubt = log_of(saga, "in-doubt-1")
    assert window(doubt, "quick", False)[1] < window(doubt, "slow", False)[1]
    assert window(doubt, "slow", False)[1] < window(doubt, "slow", True)[0]
    assert window(doubt, "slow", True)[1] < window(doubt, "root", True)[0]

    # The chain's Events, in history order: the undo step by step, dependents first.
    def all_posted() -> list[Body] | None:
        found = saga.cluster.events_of("chain-1")
        return found if found and found[-1]["reason"] == "ExecutionCompensated" else None

    events = await saga.api.wait_until(all_posted, within=20)
    undo = [(e["reason"], e["message"]) for e in events if "Compensat" in e["reason"]]
    assert [reason for reason, _ in undo] == [
        "ExecutionCompensating",
        "StepCompensating",
        "StepCompensated",
        "StepCompensating",
        "StepCompensated",
        "ExecutionCompensated",
    ]
    compensated = [message for reason, message in undo if reason == "StepCompensated"]
    assert compensated == ["step b compensated on attempt 1", "step a compensated on attempt 1"]


FIXABLE = [
    {"name": "a", "type": "saga.work"},
    {
        "name": "b",
        "type": "saga.work",
        "dependsOn": ["a"],
        "input": {"fail": True},
        "retry": {"maxAttempts": 1},
    },
]


async def test_a_redrive_to_latest_moves_a_failed_run_onto_the_fixed_workflow(saga: Saga) -> None:
    await saga.start(
        "fixable", FIXABLE, execution("fix-1", "fixable"), execution("fix-2", "fixable")
    )
    for name in ("fix-1", "fix-2"):
        failed = await saga.status(name, phase_is("Failed", "Completed"))
        assert failed["phase"] == "Failed" and failed["workflowVersion"] == 1

    fixed = [FIXABLE[0], {**FIXABLE[1], "input": {"fail": False}}]
    await saga.cluster.client.patch(WORKFLOWS, NS, "fixable", {"spec": {"steps": fixed}})
    await saga.cluster.wait_status(WORKFLOWS, "fixable", lambda s: s.get("version") == 2)
    await saga.patch("fix-1", {"redrive": 1, "redriveToLatest": True})
    ended = phase_is("Completed", "Failed")
    done = await saga.status("fix-1", lambda s: s.get("redrives") == 1 and ended(s))
    assert done["phase"] == "Completed" and done["workflowVersion"] == 2
    assert done["redrives"] == 1
    assert condition(done, "Request")["reason"] == "RedriveAccepted"
    redriven = saga.events("fix-1", "ExecutionRedriven")
    assert [e["message"] for e in redriven] == ["redrive 1 onto v2: running b again; keeping a"]
    # a kept its result: only b ran again, on the fixed input.
    assert saga.calls("fix-1") == [("a", False), ("b", False), ("b", False)]

    # A version without a, which fix-2 keeps, cannot take the run: refused, nothing moves.
    await saga.cluster.client.patch(
        WORKFLOWS, NS, "fixable", {"spec": {"steps": [{"name": "b", "type": "saga.work"}]}}
    )
    await saga.cluster.wait_status(WORKFLOWS, "fixable", lambda s: s.get("version") == 3)
    await saga.patch("fix-2", {"redrive": 1, "redriveToLatest": True})
    refused = await saga.warning("fix-2", "RequestRefused", "lacks steps this run keeps: a")
    assert "version 3 of workflow fixable" in refused["message"]
    status = await saga.status(
        "fix-2", lambda s: any(c["type"] == "Request" for c in s.get("conditions", ()))
    )
    request = condition(status, "Request")
    assert (request["status"], request["reason"]) == ("False", "RedriveRefused")
    assert "lacks steps this run keeps: a" in request["message"]
    assert status["phase"] == "Failed" and status["workflowVersion"] == 1
    assert "redrives" not in status
    assert len(saga.events("fix-2", "RequestRefused")) == 1
    assert saga.calls("fix-2") == [("a", False), ("b", False)]


async def test_an_operator_killed_mid_undo_applies_each_compensation_once(saga: Saga) -> None:
    steps = [
        {"name": "a", "type": "saga.work", **undone_by()},
        {"name": "b", "type": "saga.work", "dependsOn": ["a"], **undone_by(input={"gate": "open"})},
        {"name": "c", "type": "saga.work", "dependsOn": ["b"], "input": {"fail": True}},
    ]
    await saga.start("slow-undo", steps, execution("killed-1", "slow-undo"))
    await saga.api.wait_until(lambda: ("b", True) in saga.calls("killed-1"), within=30)
    await saga.cluster.operator.kill()
    # b's undo finishes while no operator runs: its result waits on the bus.
    (saga.files / "open").touch()
    b_undone = {"step": "b", "undo": True, "event": "end"}
    await saga.api.wait_until(
        lambda: any(b_undone.items() <= c.items() for c in log_of(saga, "killed-1")),
        within=30,
    )
    await saga.cluster.operator_watching()

    status = await saga.status("killed-1", phase_is("Compensated", "CompensationFailed"))
    assert status["phase"] == "Compensated"
    assert steps_of(status) == {"a": "Compensated", "b": "Compensated", "c": "Failed"}
    undone = {
        s["name"]: s["compensation"]["attempts"] for s in status["steps"] if "compensation" in s
    }
    assert undone == {"a": 1, "b": 1}
    history = await saga.history("killed-1")
    assert [step for kind, step in history if kind == "StepCompensated"] == ["b", "a"]
    # a was undone once, after b; a redelivered b (if any) carried its attempt's one key.
    undos = [c for c in log_of(saga, "killed-1") if c["undo"] and c["event"] == "start"]
    assert [c["step"] for c in undos].count("a") == 1 and undos[-1]["step"] == "a"
    assert len({c["key"] for c in undos if c["step"] == "b"}) == 1


async def test_the_rollback_sample_is_undone_through_the_operator(cluster: Cluster) -> None:
    for sample in ("order-fulfilment.yaml", "order-rollback.yaml"):
        for doc in yaml.safe_load_all((ROOT / "samples" / sample).read_text()):
            if doc:
                await cluster.apply(WORKFLOWS if doc["kind"] == "Workflow" else EXECUTIONS, doc)

    ended = phase_is("Completed", "Failed", "Compensated", "CompensationFailed")
    rolled_back = (await cluster.wait_status(EXECUTIONS, "order-1003", ended))["status"]
    assert rolled_back["phase"] == "Compensated"
    assert steps_of(rolled_back) == {
        "validate": "Succeeded",
        "reserve-inventory": "Compensated",
        "charge-payment": "Compensated",
        "ship": "Failed",
        "confirm": "Skipped",
    }
    assert rolled_back["error"]["step"] == "ship"
    assert rolled_back["error"]["type"] == "AddressRejected"
    steps = {s["name"]: s for s in rolled_back["steps"]}
    for name in ("reserve-inventory", "charge-payment"):
        assert steps[name]["compensation"]["attempts"] == 1
    # Both listed, in the order their undos finished (parallel: either may be first).
    ready = condition(rolled_back, "Ready")["message"]
    undid = ready.split("; undid ", 1)[1].split(", ")
    assert sorted(undid) == ["charge-payment", "reserve-inventory"]
    # Neither depends on the other: both undos were dispatched before either was done.
    undo = [e["reason"] for e in cluster.events_of("order-1003") if "Compensat" in e["reason"]]
    assert undo == [
        "ExecutionCompensating",
        "StepCompensating",
        "StepCompensating",
        "StepCompensated",
        "StepCompensated",
        "ExecutionCompensated",
    ]
    for name in ("order-1001", "order-1002"):
        body = await cluster.wait_status(EXECUTIONS, name, ended)
        assert body["status"]["phase"] == "Completed"
