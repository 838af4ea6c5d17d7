"""The operator end to end: N Execution objects x K no-op steps, created through the API.

`sagaflow operator` and `sagaflow runner` (module `noop_runner.py`) run as separate
processes, as in a cluster, against the in-memory Kubernetes API server of the test
support code (`tests/support/kube.py`) and one embedded Postgres. The script creates
the Workflow and the Executions as a user would and prints:

- executions/s and step transitions/s, from the first Execution created (once the
  Workflow is accepted) to the last object showing `phase: Completed`;
- mirror lag p50 / p99: from an execution's `finishedAt` (committed in Postgres) to
  its object showing Completed;
- API writes the mirror made: status patches and Events per execution.

    python bench/operator.py --executions 200 --steps 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import kmock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.kube import (  # noqa: E402
    EVENTS,
    EXECUTIONS,
    WORKFLOWS,
    KubeClient,
    is_watch_of,
    running_api_server,
    write_kubeconfig,
)

from sagaflow.adapters.postgres.embedded import EmbeddedPostgres  # noqa: E402

NS = "bench"


def workflow(steps: int) -> dict[str, object]:
    chain = [
        {"name": f"s{i}", "type": "bench.noop", **({"dependsOn": [f"s{i - 1}"]} if i else {})}
        for i in range(steps)
    ]
    return {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "chain"},
        "spec": {"steps": chain},
    }


async def spawn(args: list[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    out = log.open("ab")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sagaflow.cli", *args, env=env, cwd=ROOT, stdout=out, stderr=out
    )


async def run(dsn: str, tmp: Path, logs: Path, executions: int, steps: int) -> None:
    async with running_api_server() as api, KubeClient(api.url) as client:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAFLOW_", "KUBE"))}
        env.update(
            SAGAFLOW_DATABASE_URL=dsn,
            SAGAFLOW_PAYLOAD_DIR=str(tmp / "payloads"),
            SAGAFLOW_WATCH_NAMESPACES=NS,
            SAGAFLOW_HEALTH_PORT="0",
            SAGAFLOW_LOG_LEVEL=os.environ.get("SAGAFLOW_LOG_LEVEL", "WARNING"),
            KUBECONFIG=str(write_kubeconfig(tmp, api.url, NS)),
        )
        runner_module = str(ROOT / "bench" / "noop_runner.py")
        procs = [
            await spawn(["operator"], env, logs / "operator.log"),
            await spawn(["runner", "--module", runner_module], env, logs / "runner.log"),
        ]
        try:
            await api.wait_for_request(is_watch_of(EXECUTIONS), within=60)
            await client.create(WORKFLOWS, NS, workflow(steps))
            # Executions created before the Workflow is accepted wait out a retry
            # delay: that would time the retry, not the operator.
            await api.wait_for(
                WORKFLOWS, NS, "chain", lambda b: "version" in ((b or {}).get("status") or {}), 60
            )
            seen: dict[str, float] = {}
            began = time.monotonic()
            for i in range(executions):
                body = {
                    "apiVersion": "sagaflow.io/v1alpha1",
                    "kind": "Execution",
                    "metadata": {"name": f"run-{i}"},
                    "spec": {"workflowRef": {"name": "chain"}},
                }
                await client.create(EXECUTIONS, NS, body)

            # Look every 100 ms (the lag's resolution): each look reads every object,
            # and this process also serves the API.
            deadline = began + 600
            while len(seen) < executions and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                now = datetime.now(UTC).timestamp()
                for (resource, _, name), obj in list(api.objects.items()):
                    status = obj.raw.get("status") or {}
                    if (
                        resource == EXECUTIONS
                        and name not in seen
                        and status.get("phase") == "Completed"
                    ):
                        finished = datetime.fromisoformat(status["finishedAt"])
                        seen[name] = now - finished.timestamp()
            elapsed = time.monotonic() - began
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                await proc.wait()
        patches = sum(
            1
            for r in list(api._requests)
            if r.method == kmock.method.PATCH
            and r.url.path.endswith("/status")
            and "/executions/" in r.url.path
        )
        events = len(api.bodies(EVENTS))
        lags = sorted(seen.values())
        print(f"{executions} executions x {steps} steps in {elapsed:.2f} s")
        print(f"  executions/s:        {executions / elapsed:,.1f}")
        print(f"  step transitions/s:  {executions * steps / elapsed:,.1f}")
        print(
            f"  mirror lag:          p50 {statistics.median(lags) * 1000:.0f} ms, "
            f"p99 {lags[int(len(lags) * 0.99) - 1 if len(lags) > 1 else 0] * 1000:.0f} ms"
        )
        print(
            f"  status patches:      {patches} ({patches / executions:.1f} per execution, "
            f"{2 + 2 * steps} transitions each)"
        )
        print(f"  events:              {events} ({events / executions:.1f} per execution)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sagaflow-bench-") as tmp:
        state = Path(tmp)
        logs = args.logs or state
        logs.mkdir(parents=True, exist_ok=True)
        if os.environ.get("SAGAFLOW_DATABASE_URL"):
            dsn = os.environ["SAGAFLOW_DATABASE_URL"]
            asyncio.run(run(dsn, state, logs, args.executions, args.steps))
            return
        with EmbeddedPostgres(state / "postgres") as server:
            asyncio.run(run(server.dsn, state, logs, args.executions, args.steps))


if __name__ == "__main__":
    main()
