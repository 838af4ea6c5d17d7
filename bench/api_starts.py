"""Starts per second through the HTTP API, and each start's request latency.

The API (`sagaflow.api`, over `DirectService`, no auth) and the orchestrator's
loops run in this process on one embedded Postgres (or SAGAFLOW_DATABASE_URL) and
the Postgres bus; the workflow's only step is the built-in `sagaflow.pass`, so no
runner is needed and the figures are the start path's: HTTP, JSON, the start's
transaction (with its idempotency key, unless `--no-keys`). N POSTs are sent by C
concurrent callers over keep-alive connections. Prints:

- starts/s: 201 answers per second of wall time, first request to last answer;
- p50 / p99 request latency (send to answer received);
- how long until every run had completed (the orchestrator finishing the step).

The callers share the process and its event loop with the server, so the figures
include their cost; on a machine with cores to spare, the server alone does more.

    python bench/api_starts.py --starts 2000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.embedded import EmbeddedPostgres
from sagaflow.adapters.postgres.migrate import migrate
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.api.app import make_app
from sagaflow.api.auth import LoopbackOnly
from sagaflow.api.server import serve
from sagaflow.api.service import DirectService
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.runtime.orchestrator import Orchestrator

NS = "default"
SPEC = WorkflowSpec.model_validate({"steps": [{"name": "noop", "type": "sagaflow.pass"}]})


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * fraction) - 1)]


async def run(dsn: str, starts: int, concurrency: int, keys: bool) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=max(8, concurrency // 2))
    async with pool.acquire() as conn:
        await migrate(conn)
    bus = PostgresBus(pool)
    orch = Orchestrator(PostgresStore(pool), bus)
    await orch.apply_workflow(NS, "noop", SPEC)
    stop = asyncio.Event()
    loops = asyncio.create_task(orch.run(stop, dsn))
    app = make_app(DirectService(orch), LoopbackOnly())
    latencies: list[float] = []
    try:
        async with serve(app, "127.0.0.1", 0) as served:
            url = f"{served.url}/v1/namespaces/{NS}/workflows/noop/executions"
            connector = aiohttp.TCPConnector(limit=concurrency)
            async with aiohttp.ClientSession(connector=connector) as http:
                queue: asyncio.Queue[int] = asyncio.Queue()
                for i in range(starts):
                    queue.put_nowait(i)

                async def caller() -> None:
                    while not queue.empty():
                        i = queue.get_nowait()
                        headers = {"Idempotency-Key": f"bench-{uuid.uuid4().hex}"} if keys else {}
                        sent = time.perf_counter()
                        async with http.post(url, json={"input": {"i": i}}, headers=headers) as r:
                            await r.read()
                            if r.status != 201:
                                raise RuntimeError(f"start {i}: HTTP {r.status}: {await r.text()}")
                        latencies.append(time.perf_counter() - sent)

                began = time.perf_counter()
                await asyncio.gather(*(caller() for _ in range(concurrency)))
                elapsed = time.perf_counter() - began
        async with pool.acquire() as conn:
            while True:
                left = await conn.fetchval(
                    "SELECT count(*) FROM sagaflow_executions WHERE phase <> 'Completed'"
                )
                if left == 0:
                    break
                await asyncio.sleep(0.05)  # the benchmark's own progress check, not the loop's
        settled = time.perf_counter() - began
        p50, p99 = statistics.median(latencies) * 1000, percentile(latencies, 0.99) * 1000
        print(
            f"starts={starts} concurrency={concurrency} idempotency keys={'on' if keys else 'off'}"
        )
        print(f"starts through the API: {starts} in {elapsed:.2f}s = {starts / elapsed:,.0f}/s")
        print(f"request latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(latencies)} samples)")
        print(f"every run completed {settled:.2f}s after the first request")
    finally:
        stop.set()
        await loops
        await bus.close()
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-keys", action="store_true", help="start without Idempotency-Key")
    args = parser.parse_args()
    if dsn := os.environ.get("SAGAFLOW_DATABASE_URL"):
        asyncio.run(run(dsn, args.starts, args.concurrency, not args.no_keys))
        return
    with tempfile.TemporaryDirectory(prefix="sagaflow-bench-") as tmp:
        state = Path(tmp)
        os.chmod(state, 0o755)  # noqa: S103 - postgres runs as its own user and must enter it
        with EmbeddedPostgres(state / "postgres") as server:
            asyncio.run(run(server.dsn, args.starts, args.concurrency, not args.no_keys))


if __name__ == "__main__":
    main()
