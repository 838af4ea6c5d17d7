"""Child workflows through `sagaflow operator`: the child is an Execution object of its
own, owner-referenced to its parent, mirrored like any other; cancelling the parent
cancels the child; compensating the parent's step compensates the child."""

from __future__ import annotations

from typing import Any

import pytest
from test_operator import NS, Cluster, execution, phase_is, workflow
from test_operator import cluster as cluster  # the fixture: operator and runner processes
from tests.support.kube import EXECUTIONS, WORKFLOWS

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

CHILD = [
    {
        "name": "reserve",
        "type": "inventory.reserve",
        "input": {"items": [{"sku": "${{ input.account }}"}]},
        "compensate": {
            "type": "inventory.release",
            "input": {"reservationId": "${{ steps.reserve.output.reservationId }}"},
        },
    },
]
HOLD = [{"name": "hold", "type": "sagaflow.wait", "input": {"duration": "1h"}}]


def parent(name: str, child: str, *after: dict[str, Any]) -> dict[str, Any]:
    steps = [
        {"name": "billing", "workflowRef": {"name": child}, "input": {"account": "acc-1"}},
        *after,
    ]
    return workflow(name, steps)


async def workflows(cluster: Cluster, *bodies: dict[str, Any]) -> None:
    for body in bodies:
        await cluster.apply(WORKFLOWS, body)
        name = body["metadata"]["name"]
        await cluster.wait_status(WORKFLOWS, name, lambda s: s.get("version") is not None)


async def children_of(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    listed = await cluster.client.get(EXECUTIONS, NS, "")
    items: list[dict[str, Any]] = listed.get("items", [])
    return [
        i
        for i in items
        if any(o.get("name") == name for o in i["metadata"].get("ownerReferences", ()))
    ]


async def test_a_child_is_an_execution_object_owned_by_its_parent(cluster: Cluster) -> None:
    await workflows(cluster, workflow("charge-account", CHILD), parent("monthly", "charge-account"))
    created = await cluster.apply(EXECUTIONS, execution("m-1", "monthly"))
    done = await cluster.wait_status(EXECUTIONS, "m-1", phase_is("Completed"))
    billing = next(s for s in done["status"]["steps"] if s["name"] == "billing")
    assert billing["output"]["reserve"]["skus"] == ["acc-1"]
    kids = await children_of(cluster, "m-1")
    assert [k["metadata"]["name"] for k in kids] == ["m-1-billing-1"]
    owner = kids[0]["metadata"]["ownerReferences"][0]
    assert owner["uid"] == created["metadata"]["uid"]
    assert kids[0]["spec"] == {
        "workflowRef": {"name": "charge-account"},
        "input": {"account": "acc-1"},
    }
    child = await cluster.wait_status(EXECUTIONS, "m-1-billing-1", phase_is("Completed"))
    assert child["metadata"]["labels"]["sagaflow.io/parent"] == "m-1"


async def test_cancelling_the_parent_cancels_its_child(cluster: Cluster) -> None:
    await workflows(cluster, workflow("hold-on", HOLD), parent("holder", "hold-on"))
    await cluster.apply(EXECUTIONS, execution("h-1", "holder"))
    await cluster.wait_status(EXECUTIONS, "h-1-billing-1", phase_is("Running"))
    await cluster.client.patch(EXECUTIONS, NS, "h-1", {"spec": {"cancel": True}})
    await cluster.wait_status(EXECUTIONS, "h-1-billing-1", phase_is("Cancelled"))
    body = await cluster.wait_status(EXECUTIONS, "h-1", phase_is("Cancelled", "Compensated"))
    billing = next(s for s in body["status"]["steps"] if s["name"] == "billing")
    assert billing["phase"] == "Failed"
    assert "ended Cancelled" in billing["error"]["message"]


async def test_compensating_the_parent_step_compensates_the_child(cluster: Cluster) -> None:
    boom = {"name": "boom", "type": "sagaflow.fail", "dependsOn": ["billing"]}
    await workflows(
        cluster, workflow("charge-account", CHILD), parent("undone", "charge-account", boom)
    )
    await cluster.apply(EXECUTIONS, execution("u-1", "undone"))
    await cluster.wait_status(EXECUTIONS, "u-1", phase_is("Compensated"))
    child = await cluster.wait_status(EXECUTIONS, "u-1-billing-1", phase_is("Compensated"))
    reserve = next(s for s in child["status"]["steps"] if s["name"] == "reserve")
    assert reserve["phase"] == "Compensated"
