"""Chaos over Service Bus: executions through `sagaflow run` and a separate `sagaflow
runner` on SAGAFLOW_BUS=servicebus, against the test peer (tests/support/servicebus_peer,
through the real SDK), while the run and the runner are killed with -9 in turn, the
peer is restarted (its queues kept, every connection dropped, nothing listening for a
while) and every connection is dropped without a close. Prints, counted from the
database, the handlers' call log (`chaos_runner.py`) and the peer's queues:

- lost: executions that never finished; failed ones with their errors;
- successes applied twice: (execution, step) pairs with more than one StepSucceeded;
- attempts run twice at once; handler calls and attempts called again (redelivery);
- what is left on the queues (active, locked, dead-lettered);
- per fault: its kind, when, and how long until the next step result was applied
  (recovery), and throughput.

The peer runs on a thread of this process (which otherwise only sleeps), so a restart
keeps its queues as a Service Bus restart does; the processes under test are separate.

    python bench/chaos_servicebus.py --executions 1000 --kills 8 --restarts 2 --drops 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from chaos import APPLIED_TWICE_SQL, PHASES_SQL, WORKFLOW, Cast, overlapping
from sagaflow.adapters.postgres.embedded import EmbeddedPostgres
from sagaflow.core.messages import EVENTS_QUEUE, commands_queue

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tests.support.servicebus_peer import QueueSpec, running_peer  # noqa: E402


@dataclass
class History:
    phases: Counter[str]
    errors: Counter[str]
    lost: int
    twice: int
    applied: list[float]  # when each step result was applied, in order


async def history(dsn: str, names: set[str]) -> History:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(PHASES_SQL)
        twice = await conn.fetchval(APPLIED_TWICE_SQL)
        applied = await conn.fetch(
            "SELECT extract(epoch FROM at) AS t FROM sagaflow_history "
            "WHERE kind IN ('StepSucceeded', 'StepFailed', 'StepRetrying') ORDER BY at"
        )
    finally:
        await conn.close()
    terminal = {r["name"] for r in rows if r["phase"] in ("Completed", "Failed", "Cancelled")}
    return History(
        phases=Counter(r["phase"] for r in rows),
        errors=Counter(str(r["error"])[:80] for r in rows if r["error"]),
        lost=len(names - terminal),
        twice=twice,
        applied=[float(r["t"]) for r in applied],
    )


def recovery(fault_at: float, applied: list[float]) -> float | None:
    """Seconds from a fault to the first result applied after it."""
    later = [t for t in applied if t > fault_at]
    return min(later) - fault_at if later else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=1000)
    parser.add_argument("--step-seconds", type=float, default=1.0)
    parser.add_argument("--kills", type=int, default=8, help="kill -9s, run and runner in turn")
    parser.add_argument("--restarts", type=int, default=2, help="peer restarts")
    parser.add_argument("--drops", type=int, default=2, help="every connection dropped")
    parser.add_argument("--downtime", type=float, default=2.0, help="s the peer is away")
    parser.add_argument("--fault-every", type=float, default=4.0)
    parser.add_argument("--lock-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)  # noqa: S311 - when to strike, not a secret
    queues = [EVENTS_QUEUE, commands_queue("chaos.work")]
    spec = QueueSpec(
        lock_duration=args.lock_seconds, max_delivery_count=10, requires_duplicate_detection=True
    )
    with (
        tempfile.TemporaryDirectory(prefix="sagaflow-chaos-sb-") as tmp,
        running_peer(dict.fromkeys(queues, spec)) as peer,
    ):
        root = Path(tmp)
        os.chmod(root, 0o755)  # noqa: S103 - postgres runs as its own user and must enter it
        names = {f"run-{i}" for i in range(args.executions)}
        with (root / "chaos.yaml").open("w") as f:
            f.write(WORKFLOW)
            for i in range(args.executions):
                f.write(
                    "---\napiVersion: sagaflow.io/v1alpha1\nkind: Execution\n"
                    f"metadata: {{name: run-{i}}}\nspec: {{workflowRef: {{name: chaos}}, "
                    f"input: {{n: {i}}}}}\n"
                )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
        env.update(
            CHAOS_LOG=str(root / "calls.log"),
            CHAOS_STEP_SECONDS=str(args.step_seconds),
            SAGAFLOW_BUS="servicebus",
            SAGAFLOW_SERVICEBUS_CONNECTION_STRING=peer.connection_string,
            SAGAFLOW_LOCK_DURATION_SECONDS=str(args.lock_seconds),
        )
        pgdata = root / "s" / "postgres" / "pgdata"
        cast = Cast(root, env)
        started = time.monotonic()
        cast.start_run()
        while not (pgdata / "postmaster.pid").exists():
            time.sleep(0.1)  # the run starts the embedded server; the runner attaches to it
        cast.start_runner()
        plan = ["kill"] * args.kills + ["restart"] * args.restarts + ["drop"] * args.drops
        rng.shuffle(plan)
        faults: list[tuple[str, float]] = []
        kills = 0
        for kind in plan:
            time.sleep(args.fault_every * rng.uniform(0.5, 1.5))
            at = time.time()
            if kind == "kill":
                which = "run" if kills % 2 == 0 else "runner"
                kills += 1
                cast.kill(which)
                kind = f"kill -9 {which}"
            elif kind == "restart":
                peer.restart(downtime=args.downtime)
            else:
                peer.drop_connections()
            faults.append((kind, at))
            print(f"{kind} at {time.monotonic() - started:.1f}s", flush=True)
        assert cast.run is not None
        assert cast.runner is not None
        code = cast.run.wait(timeout=3600)
        finished = time.time()
        elapsed = time.monotonic() - started
        cast.runner.send_signal(signal.SIGTERM)
        runner_code = cast.runner.wait(timeout=120)
        left = {q: peer.counts(q) for q in queues}
        opened = peer.connections_opened
        lines = [line.split() for line in (root / "calls.log").read_text().splitlines()]
        calls = Counter(attempt for event, attempt, _, _ in lines if event == "start")
        text = "\n".join(log.read_text(errors="replace") for log in cast.logs)
        with EmbeddedPostgres(root / "s" / "postgres") as server:
            h = asyncio.run(history(server.dsn, names))
    applied = h.applied
    transitions = len(applied)
    print(f"executions={args.executions} steps=3 step-seconds={args.step_seconds:g} bus=servicebus")
    print(f"  last sagaflow run exit {code}, runner exit {runner_code}, {elapsed:.0f}s in all")
    print(f"  phases {dict(h.phases)}; failed with {dict(h.errors) or 'nothing'}")
    print(f"  lost {h.lost}, successes applied twice {h.twice}")
    print(f"  attempts run twice at the same time {overlapping(lines)}")
    print(
        f"  handler calls {sum(calls.values())} for {len(calls)} attempts, "
        f"{sum(1 for n in calls.values() if n > 1)} attempts called again (redelivery)"
    )
    for queue, counts in left.items():
        print(
            f"  left on {queue}: active {counts.active}, locked {counts.locked}, "
            f"dead-lettered {counts.dead_lettered}"
        )
    print(f"  faults injected {dict(Counter(k.split(' ')[0] for k, _ in faults))}:")
    for kind, at in faults:
        took = recovery(at, applied)
        print(f"    {kind}: next result applied {took:.2f}s later" if took is not None else kind)
    span = max(applied) - min(applied) if applied else 0.0
    rate = transitions / max(span, 1e-9)
    print(f"  results applied {transitions} over {span:.0f}s ({rate:.0f}/s)")
    if faults:
        print(f"  finished {finished - faults[-1][1]:.0f}s after the last fault")
    print(
        f"  AMQP connections opened {opened}; tracebacks logged {text.count('Traceback')} "
        f"over {len(cast.logs)} process starts"
    )


if __name__ == "__main__":
    main()
