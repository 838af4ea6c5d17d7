"""Schedules, Triggers and the API through `sagaflow operator`, against the in-memory
API server: every run they start is an Execution object, owner-referenced to its
Schedule and labelled with it; the API authenticates callers with TokenReview and
authorises them with SubjectAccessReview on executions in the namespace."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
from operator_proc import free_port, running
from test_operator import NS, Cluster, phase_is, workflow
from tests.support.kube import EXECUTIONS, GROUP, VERSION, WORKFLOWS, KubeClient, running_api_server
from tests.support.kube_reviews import User

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

SCHEDULES = kmock.resource(GROUP, VERSION, "schedules")
PASS = [{"name": "note", "type": "sagaflow.pass", "input": {"at": "${{ input.at }}"}}]


@pytest.fixture
async def cluster(pg_database: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_api_server() as api, KubeClient(api.url) as client:
        c = Cluster(api, client, pg_database, tmp_path)
        c.api_port = free_port()  # type: ignore[attr-defined]
        c.operator.env["SAGAFLOW_API_PORT"] = str(c.api_port)  # type: ignore[attr-defined]
        async with running(c.operator):
            yield c


async def runs_of(cluster: Cluster, schedule: str) -> list[dict[str, Any]]:
    listed = await cluster.client.get(EXECUTIONS, NS, "")
    return [
        i
        for i in listed.get("items", [])
        if i["metadata"].get("labels", {}).get("sagaflow.io/schedule") == schedule
    ]


async def test_a_schedule_starts_execution_objects_it_owns(cluster: Cluster) -> None:
    await cluster.apply(WORKFLOWS, workflow("note-time", PASS))
    await cluster.wait_status(WORKFLOWS, "note-time", lambda s: s.get("version") is not None)
    schedule = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Schedule",
        "metadata": {"name": "every-2s", "namespace": NS},
        "spec": {
            "workflowRef": {"name": "note-time"},
            "interval": "2s",
            "overlap": "Allow",
            "input": {"at": "${{ schedule.time }}"},
        },
    }
    created = await cluster.client.create(SCHEDULES, NS, schedule)
    status = await cluster.wait_status(SCHEDULES, "every-2s", lambda s: s.get("started", 0) >= 2)
    assert status["status"]["lastScheduleTime"] and status["status"]["nextScheduleTime"]
    runs = await runs_of(cluster, "every-2s")
    assert len(runs) >= 2
    for run in runs:
        [owner] = run["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"]) == ("Schedule", created["metadata"]["uid"])
        assert run["metadata"]["annotations"]["sagaflow.io/idempotency-key"].startswith(
            f"schedule/{created['metadata']['uid']}/"
        )
        done = await cluster.wait_status(EXECUTIONS, run["metadata"]["name"], phase_is("Completed"))
        assert done["status"]["steps"][0]["phase"] == "Succeeded"
    ticks = [r["spec"]["input"]["at"] for r in runs]
    assert len(set(ticks)) == len(ticks)  # one run per tick


async def test_the_api_checks_callers_with_token_and_access_reviews(cluster: Cluster) -> None:
    await cluster.apply(WORKFLOWS, workflow("note-time", PASS))
    await cluster.wait_status(WORKFLOWS, "note-time", lambda s: s.get("version") is not None)
    cluster.api.reviews.tokens["t-ci-0123456789"] = User("system:serviceaccount:ci:bot", ("ci",))
    cluster.api.reviews.allow("ci", "create", NS)
    url = f"http://127.0.0.1:{cluster.api_port}/v1/namespaces/{NS}/workflows/note-time/executions"  # type: ignore[attr-defined]
    body = json.dumps({"input": {"at": "now"}, "name": "by-api"})
    headers = {"Content-Type": "application/json", "Idempotency-Key": "by-api-1"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers=headers) as anonymous:
            assert anonymous.status == 401
        bearer = {**headers, "Authorization": "Bearer t-ci-0123456789"}
        async with http.post(url, data=body, headers=bearer) as started:
            assert started.status == 201, await started.text()
            answer = await started.json()
        async with http.post(url, data=body, headers=bearer) as again:
            assert again.status == 200
        read = url.replace("/workflows/note-time/executions", "/executions/by-api")
        async with http.get(read, headers=bearer) as forbidden:
            assert forbidden.status == 403  # ci may create, not get
    assert answer["execution"]["metadata"]["name"] == "by-api"
    done = await cluster.wait_status(EXECUTIONS, "by-api", phase_is("Completed"))
    assert done["metadata"]["annotations"]["sagaflow.io/idempotency-key"] == "by-api-1"
