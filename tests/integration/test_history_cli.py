"""`sagaflow history NAME [--at TIME]` as a user types it, on a state and over HTTP.

On a state dir: the timeline (cause, offset and durations; no Transition lines) and
the state at an instant, as text and `-o json`, and bad `--at` input answered with
one line and exit code 2. Over HTTP: `GET .../executions/{name}/state?at=` on a run
waiting for a retry, its errors, `HttpClient` answering as `DirectService` does, and
the CLI with `--server` against it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from test_local_mode import RUNNERS, SAMPLE, sagaflow, state_dir  # noqa: F401
from test_orchestrator import Harness, failed, harness_on

from sagaflow.api.app import make_app
from sagaflow.api.auth import LoopbackOnly
from sagaflow.api.client import HttpClient
from sagaflow.api.server import serve
from sagaflow.api.service import DirectService

pytestmark = pytest.mark.timeout(180)


def test_history_prints_a_timeline_and_the_state_at_an_instant(state_dir: Path) -> None:  # noqa: F811
    run = sagaflow("run", "-f", SAMPLE, "--runners", RUNNERS, "--state-dir", state_dir)
    assert run.returncode == 0, run.stderr
    s = ("--state-dir", str(state_dir))

    text = sagaflow("history", "order-1001", *s)
    assert text.returncode == 0, text.stderr
    header, *lines = text.stdout.splitlines()
    assert header.split() == [
        "AT", "OFFSET", "KIND", "STEP", "ATTEMPT", "CAUSE", "DURATION", "MESSAGE"
    ]  # fmt: skip
    assert not any(" Transition " in line for line in lines)
    assert lines[0].split()[1:3] == ["+0.000s", "ExecutionStarted"]
    assert lines[0].split()[5] == "start"

    timeline = json.loads(sagaflow("history", "order-1001", "-o", "json", *s).stdout)
    assert "Transition" not in {r["kind"] for r in timeline}
    assert {"cause", "offsetSeconds", "durationSeconds"} <= set(timeline[0])
    dispatched = {(r["step"], r["attempt"]) for r in timeline if r["kind"] == "StepDispatched"}
    settled = [r for r in timeline if r["kind"] == "StepSucceeded"]
    assert settled and all(r["cause"].startswith("message:") for r in settled)
    for r in settled:  # a dispatch-to-result time where there was a dispatch (not `pass`)
        ran = (r["step"], r["attempt"]) in dispatched
        assert (r["durationSeconds"] is not None) == ran, r
    retry = next(r for r in timeline if r["kind"] == "StepRetrying")
    assert retry["step"] == "charge-payment" and retry["durationSeconds"] >= 0
    redispatch = next(
        r
        for r in timeline
        if r["kind"] == "StepDispatched" and r["step"] == "charge-payment" and r["attempt"] == 2
    )
    assert redispatch["cause"] == "timer:retry:charge-payment:2"

    # At the retry: charge-payment failed its first attempt, its retry timer pending.
    at = sagaflow("history", "order-1001", "--at", retry["at"], "-o", "json", *s)
    assert at.returncode == 0, at.stderr
    doc = json.loads(at.stdout)
    assert doc["phase"] == "Running" and doc["asOf"] == retry["at"]
    steps = {x["name"]: (x["phase"], x["attempt"]) for x in doc["steps"]}
    assert steps["charge-payment"][1] == 1
    assert [t["kind"] for t in doc["timers"] if t["step"] == "charge-payment"] == ["retry"]
    assert doc["state"]["phase"] == "Running"
    shown = sagaflow("history", "order-1001", "--at", retry["at"], *s)
    assert shown.returncode == 0, shown.stderr
    assert "Phase:   Running" in shown.stdout
    timer_lines = [x.split()[:2] for x in shown.stdout.splitlines()]
    assert ["retry:charge-payment:2", "retry"] in timer_lines
    now = json.loads(sagaflow("history", "order-1001", "--at", "now", "-o", "json", *s).stdout)
    assert now["phase"] == "Completed" and now["timers"] == []

    bad = sagaflow("history", "order-1001", "--at", "yesterday", *s)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: --at: 'yesterday' is not an RFC 3339 time (e.g. 2024-05-01T12:00:00Z)"
    ]
    naive = sagaflow("history", "order-1001", "--at", "2024-05-01T12:00:00", *s)
    assert naive.returncode == 2 and "no UTC offset" in naive.stderr
    early = sagaflow("history", "order-1001", "--at", "2000-01-01T00:00:00Z", *s)
    assert early.returncode == 2 and "Traceback" not in early.stderr
    assert "before the execution's first transition" in early.stderr
    assert early.stderr.strip().endswith("(at)")

    described = sagaflow("describe", "execution", "order-1001", *s)
    assert described.returncode == 0 and "Transition" not in described.stdout


@pytest.fixture
async def served(pg_pool: asyncpg.Pool) -> AsyncIterator[tuple[Harness, str]]:
    async with harness_on(pg_pool) as h:
        app = make_app(DirectService(h.orchestrator), LoopbackOnly())
        async with serve(app, "127.0.0.1", 0) as server:
            yield h, server.url


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.json()


async def test_the_state_route_rebuilds_a_run_waiting_for_its_retry(
    served: tuple[Harness, str],
) -> None:
    h, url = served
    await h.orchestrator.start("default", "run-1", "flow", {"n": 1})
    started = h.clock()
    (msg, cmd), *_ = await h.commands("svc")
    h.clock.advance(1)
    await h.reply(msg, failed(cmd))
    await h.orchestrator.consume_once(0)
    base = f"{url}/v1/namespaces/default/executions"

    at = (h.clock() + timedelta(seconds=1)).isoformat()
    status, doc = await _get(f"{base}/run-1/state?at={at.replace('+', '%2B')}")
    assert status == 200, doc
    assert doc["phase"] == "Running" and doc["asOf"] == h.clock().isoformat()
    assert [(t["kind"], t["step"], t["attempt"]) for t in doc["timers"]] == [("retry", "a", 2)]
    assert {x["name"]: x["phase"] for x in doc["steps"]}["a"] == "Retrying"

    first = started.isoformat().replace("+", "%2B")
    status, doc = await _get(f"{base}/run-1/state?at={first}")
    assert status == 200 and doc["timers"] == [] and doc["steps"][0]["attempt"] == 1

    status, body = await _get(f"{base}/run-1/state?at=soon")
    assert status == 400 and body["error"]["field"] == "at"
    assert "not an RFC 3339 time" in body["error"]["message"]
    status, body = await _get(f"{base}/run-1/state")
    assert status == 400 and body["error"]["field"] == "at"
    status, body = await _get(f"{base}/run-1/state?at=2000-01-01T00:00:00Z")
    assert status == 400 and body["error"]["field"] == "at"
    assert "before the execution's first transition" in body["error"]["message"]
    status, body = await _get(f"{base}/nope/state?at=2000-01-01T00:00:00Z")
    assert status == 404 and body["error"]["reason"] == "NotFound"

    client = HttpClient(url)
    try:
        when = h.clock()
        service = DirectService(h.orchestrator)
        assert await client.state_at("default", "run-1", when) == await service.state_at(
            "default", "run-1", when
        )
    finally:
        await client.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sagaflow.cli",
        "history",
        "run-1",
        "--server",
        url,
        "--at",
        h.clock().isoformat(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0, err.decode()
    assert "Phase:   Running" in out.decode() and "retry:a:2" in out.decode()
