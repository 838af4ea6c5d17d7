"""The operator's probe endpoints answer from their checks, and a bad configuration
stops `sagaflow operator` before it starts anything."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
from operator_proc import ROOT, base_env, free_port

from sagaflow.kube.health import HealthServer, loops_alive


async def probe(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.text()


async def test_probes_report_a_dead_loop_and_an_unready_dependency() -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(stop.wait(), name="orchestrator")
    ready: list[str | None] = ["database unreachable"]

    async def readiness() -> str | None:
        if ready[0] == "raise":
            raise OSError("connection refused")
        return ready[0]

    port = free_port()
    server = HealthServer(port, live=loops_alive(lambda: [task]), ready=readiness, host="127.0.0.1")
    await server.start()
    try:
        assert await probe(port, "/healthz") == (200, "ok\n")
        assert await probe(port, "/readyz") == (503, "database unreachable\n")
        ready[0] = None
        assert await probe(port, "/readyz") == (200, "ok\n")
        stop.set()
        await task
        assert await probe(port, "/healthz") == (503, "orchestrator stopped\n")
        ready[0] = "raise"
        status, text = await probe(port, "/readyz")
        assert status == 503 and "OSError: connection refused" in text
    finally:
        await server.stop()


def operator_exit(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = base_env("postgresql://nowhere.invalid/db", tmp_path, **env)
    return subprocess.run(
        [sys.executable, "-m", "sagaflow.cli", "operator"],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_operator_refuses_a_bad_configuration(tmp_path: Path) -> None:
    bad = operator_exit(tmp_path, SAGAFLOW_WATCH_NAMESPACES="Team_A")
    assert bad.returncode == 2
    assert "SAGAFLOW_WATCH_NAMESPACES" in bad.stderr
    missing = operator_exit(tmp_path, SAGAFLOW_DATABASE_URL="")
    assert missing.returncode == 2
    assert "SAGAFLOW_DATABASE_URL" in missing.stderr
