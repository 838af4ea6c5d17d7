"""`sagaflow operator` and `sagaflow runner` riding out their Postgres going away: the
server of the test's own is stopped under them, an Execution is created meanwhile,
and everything finishes once it is back, with one line about it and no traceback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from operator_proc import running
from pg import pg_ctl, private_server
from test_operator import Cluster, execution, phase_is, workflow
from tests.support.kube import EXECUTIONS, WORKFLOWS, KubeClient, is_watch_of, running_api_server

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture
async def own_cluster(tmp_path: Path) -> AsyncIterator[tuple[Cluster, Path]]:
    with private_server() as server:
        async with running_api_server() as api, KubeClient(api.url) as client:
            c = Cluster(api, client, server.dsn, tmp_path)
            async with running(c.operator, c.runner):
                await api.wait_for_request(is_watch_of(EXECUTIONS), within=30)
                yield c, server.pgdata


async def test_the_operator_rides_out_a_postgres_outage(
    own_cluster: tuple[Cluster, Path],
) -> None:
    cluster, pgdata = own_cluster
    steps = [
        {"name": "first", "type": "sagaflow.pass"},
        {
            "name": "pause",
            "type": "sagaflow.wait",
            "dependsOn": ["first"],
            "input": {"duration": "1s"},
        },
        {
            "name": "last",
            "type": "orders.validate",
            "dependsOn": ["pause"],
            "input": {"order": {"items": [{"price": 1, "quantity": 2}]}},
        },
    ]
    await cluster.apply(WORKFLOWS, workflow("paused", steps))
    await cluster.apply(EXECUTIONS, execution("before", "paused"))
    await cluster.wait_status(EXECUTIONS, "before", lambda s: s.get("currentSteps") == ["pause"])
    await asyncio.to_thread(pg_ctl, pgdata, "stop", "-m", "fast")
    # Its wait falls due while the database is down; another run is asked for meanwhile.
    await cluster.apply(EXECUTIONS, execution("during", "paused"))
    await asyncio.sleep(3)  # the outage itself
    await asyncio.to_thread(pg_ctl, pgdata, "start", "-o", '-h ""', "-o", f"-k {pgdata}")
    for name in ("before", "during"):
        body = await cluster.wait_status(EXECUTIONS, name, phase_is("Completed", "Failed"), 60)
        assert body["status"]["phase"] == "Completed", body["status"]
    for process in (cluster.operator, cluster.runner):
        out = process.output()
        assert "Traceback" not in out, out[-5000:]
        assert out.count("the database is unavailable") >= 1, out[-5000:]
    # One line each way from the outage watch; kopf's retries of the handler that met
    # the outage say why in one line each, without a traceback.
    operator_log = cluster.operator.output()
    assert operator_log.count("waiting for it, retrying") == 1, operator_log[-5000:]
    assert operator_log.count("the database is available again") == 1
