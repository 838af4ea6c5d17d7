"""Throughput and latency of the whole loop: N executions x K no-op steps.

The orchestrator runs in this process; the step runner runs in a separate process
(`sagaflow runner`), both on one embedded Postgres (or SAGAFLOW_DATABASE_URL) and
the Postgres bus, or with `--bus servicebus` (or SAGAFLOW_BUS=servicebus) Azure Service
Bus: the namespace of SAGAFLOW_SERVICEBUS_CONNECTION_STRING if set, else the test peer
(tests/support/servicebus_peer) in a process of its own. `--sessions events|all` makes
the events queue (or every queue) session-enabled, for comparison. Prints:

- step transitions/s: step results applied per second of wall time, from the first
  start to the last execution completed;
- p50 / p99 latency from a step's result event being enqueued to the next step's
  command being receivable (the commit of the transaction that applied the result);
- a pgbench baseline of the same server: commits/s of a one-row insert.

- with `--tracing`, spans exported over OTLP/HTTP, by the orchestrator here and the
  runner process, to a sink in this process that answers every export at once: the
  cost of tracing on, against the same run without it.

    python bench/loop.py --executions 200 --steps 10
    python bench/loop.py --executions 200 --steps 10 --bus servicebus
    python bench/loop.py --executions 1000 --steps 10 --tracing
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from opentelemetry import trace

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.embedded import EmbeddedPostgres, pg_bin_dir
from sagaflow.adapters.postgres.migrate import migrate
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.manifests import WorkflowSpec
from sagaflow.core.messages import EVENTS_QUEUE, StepResult, commands_queue
from sagaflow.core.ports import Bus, ReceivedMessage
from sagaflow.runtime.orchestrator import Orchestrator
from sagaflow.settings import Settings
from sagaflow.telemetry import tracing
from sagaflow.wiring.buses import make_bus
from sagaflow.wiring.payloads import make_claim_check

HERE = Path(__file__).resolve().parent
SUPPORT = HERE.parent / "tests" / "support"
QUEUES = [EVENTS_QUEUE, commands_queue("bench.noop")]


class TimedOrchestrator(Orchestrator):
    """Records, per applied result, enqueue-to-commit latency."""

    latencies: list[float]

    async def _apply_events(
        self,
        parsed: Sequence[tuple[ReceivedMessage, StepResult]],
        settle: Sequence[ReceivedMessage],
    ) -> None:
        await super()._apply_events(parsed, settle)
        committed = datetime.now(UTC)
        self.latencies.extend((committed - m.enqueued_at).total_seconds() for m, _ in parsed)


def spec(steps: int) -> WorkflowSpec:
    chain = [{"name": "s0", "type": "bench.noop"}]
    chain += [
        {"name": f"s{i}", "type": "bench.noop", "dependsOn": [f"s{i - 1}"]} for i in range(1, steps)
    ]
    return WorkflowSpec.model_validate({"steps": chain})


def start_peer(sessions: str) -> tuple[subprocess.Popen[str], str]:
    """The Service Bus test peer in a process of its own; its connection string."""
    session_queues = {"none": [], "events": [EVENTS_QUEUE], "all": QUEUES}[sessions]
    args = [sys.executable, "-m", "servicebus_peer", "--duplicate-detection"]
    for queue in QUEUES:
        args += ["--session-queue" if queue in session_queues else "--queue", queue]
    env = dict(os.environ, PYTHONPATH=str(SUPPORT))
    peer = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    assert peer.stdout is not None
    os.environ["SAGAFLOW_SERVICEBUS_SESSION_QUEUES"] = ",".join(session_queues)
    return peer, peer.stdout.readline().strip()


async def run(dsn: str, state_dir: Path, executions: int, steps: int, batch: int) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=12)
    async with pool.acquire() as conn:
        await migrate(conn)
    settings = Settings()
    bus: Bus = PostgresBus(pool) if settings.bus == "postgres" else make_bus(settings, pool)
    # The same claim check local mode uses (local payload directory, default threshold).
    claim_check = make_claim_check(Settings(), state_dir)
    orch = TimedOrchestrator(PostgresStore(pool), bus, batch_size=batch, claim_check=claim_check)
    orch.latencies = []
    env = dict(os.environ, SAGAFLOW_RUNNER_CONCURRENCY="256")
    if "SAGAFLOW_DATABASE_URL" not in os.environ:
        env["SAGAFLOW_DATABASE_URL"] = dsn
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
    try:
        await orch.apply_workflow("default", "bench", spec(steps))
        loops = asyncio.create_task(orch.run(stop, dsn))
        started = time.perf_counter()
        starts = asyncio.Semaphore(8)

        async def start(i: int) -> None:
            async with starts:
                await orch.start("default", f"run-{i}", "bench", {})

        await asyncio.gather(*(start(i) for i in range(executions)))
        async with pool.acquire() as conn:
            while True:
                left = await conn.fetchval(
                    "SELECT count(*) FROM sagaflow_executions WHERE phase <> 'Completed'"
                )
                if left == 0:
                    break
                await asyncio.sleep(0.05)  # the benchmark's own progress check, not the loop's
        elapsed = time.perf_counter() - started
        transitions = executions * steps
        lat = sorted(orch.latencies)
        p50 = statistics.median(lat) * 1000
        p99 = lat[int(len(lat) * 0.99) - 1] * 1000
        print(f"bus={settings.bus} executions={executions} steps={steps} batch={batch}")
        print(f"step transitions: {transitions} in {elapsed:.2f}s = {transitions / elapsed:,.0f}/s")
        print(
            f"result enqueued -> next command receivable: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
            f"({len(lat)} samples)"
        )
        stop.set()
        await loops
    finally:
        runner.terminate()
        await asyncio.wait_for(runner.wait(), 30)
        await bus.close()
        await claim_check.close()
        await pool.close()


def pgbench(dsn_dir: Path, seconds: int) -> None:
    """commits/s of a one-row insert, 4 clients, on the same server."""
    script = dsn_dir / "insert.sql"
    script.write_text("INSERT INTO bench_baseline (v) VALUES (1);\n")
    host = str(dsn_dir / "postgres" / "pgdata")
    psql = [
        str(pg_bin_dir() / "psql"),
        "-h",
        host,
        "-U",
        "postgres",
        "-q",
        "-c",
        "CREATE TABLE IF NOT EXISTS bench_baseline (id bigserial PRIMARY KEY, v int)",
    ]
    subprocess.run(psql, check=True)
    out = subprocess.run(
        [
            str(pg_bin_dir() / "pgbench"),
            "-h",
            host,
            "-U",
            "postgres",
            "-n",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            str(seconds),
            "-f",
            str(script),
            "postgres",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    tps = [line for line in out.splitlines() if line.startswith("tps")]
    print(f"pgbench baseline (one-row insert, 4 clients, {seconds}s): {tps[0] if tps else out}")


class _Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that keeps nothing: counts exports and their bytes."""

    exports = 0
    received = 0

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(size)
        type(self).exports += 1
        type(self).received += size
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def start_sink() -> http.server.ThreadingHTTPServer:
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    return sink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--pgbench-seconds", type=int, default=10)
    parser.add_argument("--bus", choices=["postgres", "servicebus"])
    parser.add_argument("--sessions", choices=["none", "events", "all"], default="none")
    parser.add_argument("--tracing", action="store_true", help="export spans over OTLP/HTTP")
    args = parser.parse_args()
    sink = None
    if args.tracing:
        sink = start_sink()
        os.environ["SAGAFLOW_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink.server_port}"
        tracing.configure(Settings())
    if args.bus:
        os.environ["SAGAFLOW_BUS"] = args.bus
    peer = None
    if os.environ.get("SAGAFLOW_BUS") == "servicebus" and not os.environ.get(
        "SAGAFLOW_SERVICEBUS_CONNECTION_STRING"
    ):
        peer, connection = start_peer(args.sessions)
        os.environ["SAGAFLOW_SERVICEBUS_CONNECTION_STRING"] = connection
    try:
        bench(args)
        if sink is not None:
            trace.get_tracer_provider().force_flush()  # type: ignore[attr-defined]
            print(f"tracing: {_Sink.exports} OTLP exports, {_Sink.received:,} bytes")
    finally:
        if peer is not None:
            peer.terminate()
            peer.wait(10)


def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="sagaflow-bench-") as tmp:
        state = Path(tmp)
        os.chmod(state, 0o755)  # noqa: S103 - postgres runs as its own user and must enter it
        with EmbeddedPostgres(state / "postgres") as server:
            asyncio.run(run(server.dsn, state, args.executions, args.steps, args.batch))
            if args.pgbench_seconds:
                pgbench(state, args.pgbench_seconds)


if __name__ == "__main__":
    main()
