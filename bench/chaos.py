"""Chaos: executions through `sagaflow run` and a separate `sagaflow runner` while both
are killed with -9 again and again, Postgres restarts (fast, then immediate) and stays
down for an outage. Prints what happened, counted from the database and from a log
of every handler call (`chaos_runner.py`):

- lost: executions of the files that never finished (missing, or not terminal);
- failed: executions that did not complete, with the errors;
- successes applied twice: (execution, step) pairs with more than one StepSucceeded;
- attempts run twice at once: an attempt running in two places at the same moment;
- timers: retry timers that never fired, how late the others fired, and how late the
  ones that fell due during the outage fired after the database was back;
- calls, attempts called more than once (at-least-once redelivery), dead letters;
- per outage: the lines the processes logged about it, and tracebacks.

    python bench/chaos.py --executions 1000 --kills 12 --outage 60
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

from sagaflow.adapters.postgres.embedded import EmbeddedPostgres, pg_bin_dir

HERE = Path(__file__).resolve().parent
_OUTAGE_LINE = re.compile(
    r"(\d\d:\d\d:\d\d),\d+ WARNING sagaflow.outages: the database is "
    r"(unavailable \(\w+|available again after [\d.]+s)"
)

WORKFLOW = """apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: chaos}
spec:
  retry: {maxAttempts: 3, initialInterval: 1s}
  steps:
    - {name: a, type: chaos.work, input: {n: "${{ input.n }}"}}
    # A long retry delay, so that some retry timers fall due while Postgres is down.
    - {name: b, type: chaos.work, dependsOn: [a], input: {n: "${{ input.n }}"},
       retry: {maxAttempts: 3, initialInterval: 20s}}
    - {name: c, type: chaos.work, dependsOn: [b], input: {n: "${{ input.n }}"}}
"""


# Executions whose first step waits until Postgres is expected to be down, so their
# durable timers fall due during the outage.
LATER = """---
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: later}
spec:
  steps:
    - {name: wait, type: sagaflow.wait, input: {duration: "${{ input.after }}"}}
    - {name: then, type: chaos.work, dependsOn: [wait], input: {n: 1}}
"""


class Cast:
    """The processes under test, each restartable, each with its own stderr file."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.run: subprocess.Popen[bytes] | None = None
        self.runner: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.run_exits: list[int] = []

    def _start(self, *args: str) -> subprocess.Popen[bytes]:
        log = self.root / f"stderr-{len(self.logs)}-{args[0]}.log"
        self.logs.append(log)
        command = [sys.executable, "-m", "sagaflow.cli", *args, "--state-dir", str(self.root / "s")]
        with log.open("wb") as err:
            return subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=err)

    def start_run(self) -> None:
        self.run = self._start(
            "run", "-f", str(self.root / "chaos.yaml"), "--runners", str(HERE / "chaos_runner.py")
        )

    def start_runner(self) -> None:
        self.runner = self._start("runner", "--module", str(HERE / "chaos_runner.py"))

    def kill(self, which: str) -> None:
        proc = self.run if which == "run" else self.runner
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if which == "run":
            self.start_run()
        else:
            self.start_runner()


# Every execution's phase and error; (execution, step) pairs that succeeded twice.
PHASES_SQL = "SELECT name, phase, nullif(state->'error', 'null') AS error FROM sagaflow_executions"
APPLIED_TWICE_SQL = (
    "SELECT count(*) FROM (SELECT 1 FROM sagaflow_history WHERE kind = 'StepSucceeded' "
    "GROUP BY execution_id, step HAVING count(*) > 1) t"
)


def pg_ctl(pgdata: Path, *args: str) -> None:
    subprocess.run(
        [str(pg_bin_dir() / "pg_ctl"), *args, "-D", str(pgdata), "-w", "-l", str(pgdata / "log")],
        user="pgserver" if os.geteuid() == 0 else None,
        check=True,
        capture_output=True,
        timeout=120,
    )


def overlapping(lines: list[list[str]]) -> int:
    """Attempts that ran in two places at once (a run cut short by kill -9 ends at its
    process's last logged line)."""
    spans: dict[str, list[tuple[float, float]]] = {}
    running: dict[tuple[str, str], float] = {}
    last: dict[str, float] = {}
    for event, attempt, pid, at in lines:
        last[pid] = max(last.get(pid, 0.0), float(at))
        if event == "start":
            running[(attempt, pid)] = float(at)
        elif (attempt, pid) in running:
            spans.setdefault(attempt, []).append((running.pop((attempt, pid)), float(at)))
    for (attempt, pid), started in running.items():
        spans.setdefault(attempt, []).append((started, last[pid]))
    twice = 0
    for runs in spans.values():
        runs.sort()
        twice += any(b[0] < a[1] for a, b in itertools.pairwise(runs))
    return twice


async def figures(
    dsn: str, names: set[str], outage: tuple[float, float], waits: dict[str, float]
) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(PHASES_SQL)
        twice = await conn.fetchval(APPLIED_TWICE_SQL)
        retries = await conn.fetch(
            "SELECT r.execution_id, r.step, r.attempt, r.at, "
            "(r.data->>'delaySeconds')::float AS d, "
            "(SELECT min(x.at) FROM sagaflow_history x WHERE x.execution_id = r.execution_id "
            " AND x.step = r.step AND x.attempt = r.attempt + 1 AND x.kind = 'StepDispatched') "
            "AS fired FROM sagaflow_history r WHERE r.kind = 'StepRetrying'"
        )
        timers_left = await conn.fetchval("SELECT count(*) FROM sagaflow_timers")
        waited = await conn.fetch(
            "SELECT e.name, w.at AS set_at, (SELECT min(x.at) FROM sagaflow_history x "
            " WHERE x.execution_id = w.execution_id AND x.step = 'wait' "
            " AND x.kind = 'StepSucceeded') AS fired "
            "FROM sagaflow_history w JOIN sagaflow_executions e USING (execution_id) "
            "WHERE w.kind = 'StepWaiting'"
        )
        letters = await conn.fetch("SELECT reason, count(*) AS n FROM bus_dead_letters GROUP BY 1")
    finally:
        await conn.close()
    phases = Counter(r["phase"] for r in rows)
    errors = Counter(json.loads(r["error"])["type"] for r in rows if r["error"])
    seen = {r["name"] for r in rows}
    terminal = {r["name"] for r in rows if r["phase"] in ("Completed", "Failed", "Cancelled")}
    late_normal, late_outage, unfired = [], [], 0
    down, up = outage
    for r in waited:
        if r["fired"] is None:
            unfired += 1
            continue
        due = r["set_at"].timestamp() + waits[r["name"]]
        (late_outage if down <= due <= up else late_normal).append(
            r["fired"].timestamp() - (up if down <= due <= up else due)
        )
    for r in retries:
        if r["fired"] is None:
            unfired += 1
            continue
        due = (r["at"] + timedelta(seconds=r["d"])).timestamp()
        fired = r["fired"].timestamp()
        if down <= due <= up:
            late_outage.append(fired - up)
        else:
            late_normal.append(fired - due)
    return {
        "phases": dict(phases),
        "errors": dict(errors),
        "lost": len(names - terminal),
        "missing": len(names - seen),
        "twice": twice,
        "retries": len(retries) + len(waited),
        "unfired": unfired,
        "timers_left": timers_left,
        "late_normal": max(late_normal, default=0.0),
        "late_outage": max(late_outage, default=0.0),
        "due_in_outage": len(late_outage),
        "letters": {r["reason"]: r["n"] for r in letters},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=1000)
    parser.add_argument("--step-seconds", type=float, default=2.0)
    parser.add_argument("--kills", type=int, default=12, help="kill -9s, run and runner in turn")
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--outage", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)  # noqa: S311 - when to kill, not a secret
    with tempfile.TemporaryDirectory(prefix="sagaflow-chaos-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # noqa: S103 - postgres runs as its own user and must enter it
        names = {f"run-{i}" for i in range(args.executions)}
        # When the outage should begin, by the schedule below.
        outage_at = args.kills * args.kill_every + 3 * 8
        waits = {f"later-{i}": outage_at + args.outage * (0.1 + 0.8 * i / 19) for i in range(20)}
        names |= set(waits)
        with (root / "chaos.yaml").open("w") as f:
            f.write(WORKFLOW)
            for i in range(args.executions):
                f.write(
                    "---\napiVersion: sagaflow.io/v1alpha1\nkind: Execution\n"
                    f"metadata: {{name: run-{i}}}\nspec: {{workflowRef: {{name: chaos}}, "
                    f"input: {{n: {i}}}}}\n"
                )
            f.write(LATER)
            for name, seconds in waits.items():
                f.write(
                    "---\napiVersion: sagaflow.io/v1alpha1\nkind: Execution\n"
                    f"metadata: {{name: {name}}}\nspec: {{workflowRef: {{name: later}}, "
                    f"input: {{after: {seconds:.0f}s}}}}\n"
                )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
        env.update(CHAOS_LOG=str(root / "calls.log"), CHAOS_STEP_SECONDS=str(args.step_seconds))
        pgdata = root / "s" / "postgres" / "pgdata"
        cast = Cast(root, env)
        started = time.monotonic()
        cast.start_run()
        while not (pgdata / "postmaster.pid").exists():
            time.sleep(0.1)  # the run starts the embedded server; the runner attaches to it
        cast.start_runner()
        for k in range(args.kills):
            time.sleep(args.kill_every * rng.uniform(0.5, 1.5))
            cast.kill("run" if k % 2 == 0 else "runner")
        print(f"{args.kills} kill -9s done at {time.monotonic() - started:.1f}s", flush=True)
        # Apart by more than the outage watch's settle window (5 s), so each restart is an
        # outage of its own in the logs.
        for mode in ("fast", "immediate"):
            time.sleep(8)
            pg_ctl(pgdata, "restart", "-m", mode)
            print(f"postgres restarted ({mode}) at {time.monotonic() - started:.1f}s", flush=True)
        time.sleep(8)
        pg_ctl(pgdata, "stop", "-m", "fast")
        down = time.time()
        at = time.monotonic() - started
        print(f"postgres down for {args.outage:g}s from {at:.1f}s", flush=True)
        time.sleep(args.outage)
        pg_ctl(pgdata, "start", "-o", '-h ""', "-o", f"-k {pgdata}")
        up = time.time()
        assert cast.run is not None
        assert cast.runner is not None
        code = cast.run.wait(timeout=1800)
        elapsed = time.monotonic() - started
        cast.runner.send_signal(signal.SIGTERM)
        runner_code = cast.runner.wait(timeout=120)
        lines = [line.split() for line in (root / "calls.log").read_text().splitlines()]
        calls = Counter(attempt for event, attempt, _, _ in lines if event == "start")
        texts = {log.name: log.read_text(errors="replace") for log in cast.logs}
        text = "\n".join(texts.values())
        with EmbeddedPostgres(root / "s" / "postgres") as server:
            whole = {name: float(f"{seconds:.0f}") for name, seconds in waits.items()}
            f = asyncio.run(figures(server.dsn, names, (down, up), whole))
        print(f"executions={args.executions} steps=3 step-seconds={args.step_seconds:g}")
        print(f"  last sagaflow run exit {code}, runner exit {runner_code}, {elapsed:.0f}s in all")
        print(f"  phases {f['phases']}; failed with {f['errors'] or 'nothing'}")
        print(f"  lost {f['lost']} (missing {f['missing']}), successes applied twice {f['twice']}")
        print(f"  attempts run twice at the same time {overlapping(lines)}")
        print(
            f"  handler calls {sum(calls.values())} for {len(calls)} attempts, "
            f"{sum(1 for n in calls.values() if n > 1)} attempts called again (redelivery)"
        )
        print(
            f"  timers (retries, waits) {f['retries']}: {f['unfired']} never fired, "
            f"{f['timers_left']} left; "
            f"latest {f['late_normal']:.2f}s after due; {f['due_in_outage']} fell due in the "
            f"outage, fired at most {f['late_outage']:.2f}s after Postgres was back"
        )
        print(f"  dead letters {f['letters'] or 'none'}")
        print(
            f"  logged: 'unavailable' {text.count('is unavailable')} times, "
            f"'available again' {text.count('is available again')} times, "
            f"tracebacks {text.count('Traceback')}, over {len(cast.logs)} process starts"
        )
        for name, log_text in texts.items():  # the processes that lived through the outages
            said = _OUTAGE_LINE.findall(log_text)
            if said:
                print(f"    {name}: " + "; ".join(f"{at} {what}" for at, what in said))


if __name__ == "__main__":
    main()
