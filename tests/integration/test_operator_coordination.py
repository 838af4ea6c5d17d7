"""`sagaflow operator` with coordination between Executions: a concurrency limit shown in
the status of the runs that wait, and a refused correlation key reported on the object
(a condition and a Warning Event) without the operator failing."""

from __future__ import annotations

import pytest
from test_operator import Cluster, condition, execution, phase_is, workflow
from test_operator import cluster as cluster  # the fixture: operator and runner processes
from tests.support.kube import EVENTS, EXECUTIONS, WORKFLOWS

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

LONG = [{"name": "hold", "type": "sagaflow.wait", "input": {"duration": "1h"}}]


async def test_a_run_beyond_the_limit_waits_saying_why_and_starts_when_a_slot_frees(
    cluster: Cluster,
) -> None:
    await cluster.apply(
        WORKFLOWS, workflow("one-at-a-time", LONG, concurrency={"maxExecutions": 1})
    )
    await cluster.apply(EXECUTIONS, execution("first", "one-at-a-time"))
    await cluster.wait_status(EXECUTIONS, "first", phase_is("Running"))
    await cluster.apply(EXECUTIONS, execution("second", "one-at-a-time"))
    body = await cluster.wait_status(
        EXECUTIONS, "second", lambda s: s.get("revision", 0) >= 1 and s.get("phase") == "Pending"
    )
    ready = condition(body["status"], "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Waiting")
    assert ready["message"] == (
        "waiting for a slot: 1 of 1 executions of workflow one-at-a-time are running "
        "(concurrency.maxExecutions)"
    )
    # Deleting the first cancels it: the second starts in that transaction.
    await cluster.client.delete(EXECUTIONS, "team-a", "first")
    await cluster.wait_status(EXECUTIONS, "second", phase_is("Running"))
    reasons = [e["reason"] for e in cluster.events_of("second")]
    assert reasons[:3] == ["ExecutionWaiting", "ExecutionAdmitted", "ExecutionStarted"]


async def test_a_held_correlation_key_is_reported_on_the_refused_execution(
    cluster: Cluster,
) -> None:
    await cluster.apply(WORKFLOWS, workflow("keyed", LONG))
    await cluster.apply(EXECUTIONS, execution("holder", "keyed", correlationKey="cust-7"))
    await cluster.wait_status(EXECUTIONS, "holder", phase_is("Running"))
    await cluster.apply(EXECUTIONS, execution("refused", "keyed", correlationKey="cust-7"))
    body = await cluster.wait_status(
        EXECUTIONS,
        "refused",
        lambda s: any(c.get("reason") == "CorrelationKeyInUse" for c in s.get("conditions", ())),
    )
    ready = condition(body["status"], "Ready")
    assert ready["status"] == "False"
    assert (
        "correlation key 'cust-7' is held by execution team-a/holder (Running)"
        in (ready["message"])
    )

    def warnings() -> list[dict[str, object]]:
        return [
            e
            for e in cluster.api.bodies(EVENTS)
            if e.get("reason") == "CorrelationKeyInUse"
            and e.get("involvedObject", {}).get("name") == "refused"
        ]

    await cluster.api.wait_until(lambda: bool(warnings()), within=30)  # kopf posts it after
    assert warnings()[0]["type"] == "Warning"
    # The operator carries on: another key starts.
    await cluster.apply(EXECUTIONS, execution("other", "keyed", correlationKey="cust-8"))
    await cluster.wait_status(EXECUTIONS, "other", phase_is("Running"))
