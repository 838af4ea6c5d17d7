"""A forEach of N no-op items: items/s and the orchestrator's peak memory.

One execution whose only step fans out over `input.items` (N integers), at most
`--max-parallel` items in flight (0: all at once). The orchestrator runs in this
process, the step runner in its own (`sagaflow runner`), on one embedded Postgres
and the Postgres bus. Prints:

- items/s: items run per second of wall time, from the start to Completed;
- the orchestrator process's peak RSS (ru_maxrss), and what it was before the run;
- the size of the execution's state row at the end, and its history rows.

    python bench/fanout.py --items 10000
    python bench/fanout.py --items 10000 --max-parallel 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.embedded import EmbeddedPostgres
from sagaflow.adapters.postgres.migrate import migrate
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.runtime.orchestrator import Orchestrator

HERE = Path(__file__).resolve().parent


def spec(max_parallel: int) -> WorkflowSpec:
    step = {
        "name": "each",
        "type": "bench.noop",
        "forEach": "${{ input.items }}",
        "maxParallel": max_parallel,
        "input": {"n": "${{ item }}"},
    }
    return WorkflowSpec.model_validate({"steps": [step], "output": {"done": True}})


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def run(dsn: str, state_dir: Path, items: int, max_parallel: int) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=12)
    async with pool.acquire() as conn:
        await migrate(conn)
    bus = PostgresBus(pool)
    orch = Orchestrator(PostgresStore(pool), bus, batch_size=256)
    env = dict(os.environ, SAGAFLOW_RUNNER_CONCURRENCY="256", SAGAFLOW_DATABASE_URL=dsn)
    runner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sagaflow.cli",
        "runner",
        "--module",
        str(HERE / "noop_runner.py"),
        "--state-dir",
        str(state_dir),
        env=env,
    )
    stop = asyncio.Event()
    before = rss_mb()
    try:
        await orch.apply_workflow("default", "fan", spec(max_parallel))
        loops = asyncio.create_task(orch.run(stop, dsn))
        started = time.perf_counter()
        await orch.start("default", "fan-1", "fan", {"items": list(range(items))})
        async with pool.acquire() as conn:
            while True:
                phase = await conn.fetchval(
                    "SELECT phase FROM sagaflow_executions WHERE name = 'fan-1'"
                )
                if phase not in ("Pending", "Running"):
                    break
                await asyncio.sleep(0.05)  # the benchmark's own progress check
            elapsed = time.perf_counter() - started
            size = await conn.fetchval(
                "SELECT pg_column_size(state) FROM sagaflow_executions WHERE name = 'fan-1'"
            )
            history = await conn.fetchval("SELECT count(*) FROM sagaflow_history")
        limit = max_parallel or "all"
        print(f"items={items} maxParallel={limit} phase={phase}")
        print(f"items run: {items} in {elapsed:.2f}s = {items / elapsed:,.0f}/s")
        print(f"orchestrator peak RSS: {rss_mb():.0f} MB (before the run: {before:.0f} MB)")
        print(f"state row at the end: {size / 1024:.0f} KiB stored; history rows: {history}")
        stop.set()
        await loops
    finally:
        runner.terminate()
        await asyncio.wait_for(runner.wait(), 30)
        await bus.close()
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--max-parallel", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sagaflow-bench-") as tmp:
        state = Path(tmp)
        os.chmod(state, 0o755)  # noqa: S103 - postgres runs as its own user and must enter it
        with EmbeddedPostgres(state / "postgres") as server:
            asyncio.run(run(server.dsn, state, args.items, args.max_parallel))


if __name__ == "__main__":
    main()
