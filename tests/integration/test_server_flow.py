"""`sagaflow server` end to end, as the README runs it: start a run over HTTP, signal
it with the CLI through `--server`, watch it complete with `sagaflow get`; a repeat
of the same request answers 200 with the same run, a different one under its key 409.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_local_mode import ROOT, sagaflow, state_dir  # noqa: F401

pytestmark = pytest.mark.timeout(180)

APPROVAL = ROOT / "samples" / "approval.yaml"
TRIGGERS = ROOT / "samples" / "triggers" / "triggers.yaml"
RUNNERS = ROOT / "samples" / "approval_runners.py"
EXPENSE = {"id": "EXP-2001", "submitter": "li@example.com", "amount": 12.5, "what": "lunch"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - a loopback URL the test made
        url, data=data, method="POST", headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def server(state_dir: Path) -> Iterator[tuple[str, Path]]:  # noqa: F811
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env["SAGAFLOW_API_PORT"] = str(port)
    command = [sys.executable, "-m", "sagaflow.cli", "server", "-f", str(APPROVAL)]
    command += ["-f", str(TRIGGERS), "--runners", str(RUNNERS), "--state-dir", str(state_dir)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert process.stderr is not None
        said = []  # the server says where it listens once ready (after a warning: no auth)
        for line in process.stderr:
            said.append(line)
            if line.startswith("sagaflow server:") or process.poll() is not None:
                break
        assert f"API on {url}" in said[-1], "".join(said)
        assert "loopback only" in said[-1] and "no authentication" in said[0]
        yield url, state_dir
    finally:
        stop(process)


def stop(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, as a user stops the server, and a kill if it does not end within 60 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_start_by_http_signal_and_watch_it_complete(server: tuple[str, Path]) -> None:
    url, _ = server
    start = f"{url}/v1/namespaces/default/workflows/expense-approval/executions"
    body = {"name": "expense-2001", "input": {"expense": EXPENSE}}
    status, created = post(start, body, {"Idempotency-Key": "EXP-2001"})
    assert status == 201, created
    assert created["execution"]["metadata"]["name"] == "expense-2001"
    status, again = post(start, body, {"Idempotency-Key": "EXP-2001"})
    assert (
        status == 200
        and again["execution"]["metadata"]["uid"] == (created["execution"]["metadata"]["uid"])
    )
    other = {"name": "expense-2002", "input": {"expense": EXPENSE}}
    status, refused = post(start, other, {"Idempotency-Key": "EXP-2001"})
    assert status == 409 and refused["error"]["reason"] == "Conflict"

    env = {"SAGAFLOW_SERVER": url}
    sent = sagaflow(
        "signal",
        "expense-2001",
        "approval",
        "--data",
        '{"approved": true, "by": "ana"}',
        "--wait",
        "30s",
        env=env,
    )
    assert sent.returncode == 0, sent.stderr
    deadline = time.monotonic() + 60
    while True:
        got = sagaflow("get", "execution", "expense-2001", "-o", "json", env=env)
        assert got.returncode == 0, got.stderr
        phase = json.loads(got.stdout)["status"]["phase"]
        if phase == "Completed" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert phase == "Completed"
    table = sagaflow("get", "executions", env=env)
    rows = {line.split()[0]: line.split()[2] for line in table.stdout.splitlines()[1:]}
    assert rows["expense-2001"] == "Completed" and "expense-1042" in rows
    waited = sagaflow(
        "start", "daily-report", "--input", '{"day": "2026-12-01"}', "--wait", "60s", env=env
    )
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.splitlines()[-1].endswith(": Completed")
    schedules = sagaflow("get", "schedules", env=env)
    row = schedules.stdout.splitlines()[1]
    assert row.split()[:2] == ["nightly-report", "daily-report"], schedules.stdout
    assert "0 2 * * *" in row and "Europe/Amsterdam" in row
