"""What the fault tests share: running `sagaflow` commands as a user does, reading the
handlers' call log, and reading the state a run left in its state dir."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from sagaflow.adapters.postgres.embedded import EmbeddedPostgres, pg_bin_dir, postmaster_pid

HERE = Path(__file__).resolve().parent
RUNNERS = HERE / "fault_runners.py"


@dataclass
class Scene:
    """One test's folder: state dir, manifest, call log; and the processes it started."""

    root: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def pgdata(self) -> Path:
        return self.state / "postgres" / "pgdata"

    @property
    def log(self) -> Path:
        return self.root / "calls.log"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
        env.update(FAULT_LOG=str(self.log), SAGAFLOW_LOG_LEVEL="WARNING")
        env.update(extra)
        return env

    def manifest(self, text: str, name: str = "run.yaml") -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def args(self, command: str, *rest: str | Path) -> list[str]:
        return [sys.executable, "-m", "sagaflow.cli", command, *map(str, rest)]

    def start_run(self, manifest: Path, *extra: str, **env: str) -> subprocess.Popen[str]:
        args = self.args("run", "-f", manifest, "--runners", RUNNERS, "--state-dir", self.state)
        return self._popen([*args, *extra], env)

    def start_runner(self, **env: str) -> subprocess.Popen[str]:
        args = self.args("runner", "--module", RUNNERS, "--state-dir", self.state)
        return self._popen(args, env)

    def _popen(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            args,
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def calls(self) -> list[Call]:
        if not self.log.exists():
            return []
        return [Call(*line.split()) for line in self.log.read_text().splitlines()]

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Rows from the state database (attached to, or started, for the query)."""

        async def fetch(dsn: str) -> list[asyncpg.Record]:
            conn = await asyncpg.connect(dsn)
            try:
                return list(await conn.fetch(sql, *args))
            finally:
                await conn.close()

        with EmbeddedPostgres(self.state / "postgres") as server:
            return asyncio.run(fetch(server.dsn))

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [
                str(pg_bin_dir() / "pg_ctl"),
                *args,
                "-D",
                str(self.pgdata),
                "-w",
                "-l",
                str(self.pgdata / "log"),
            ],
            user="pgserver" if os.geteuid() == 0 else None,
            check=True,
            capture_output=True,
            timeout=120,
        )


@dataclass(frozen=True)
class Call:
    event: str  # start | end
    attempt: str  # the attempt id: <execution>/<step>/<attempt>
    pid: str
    at: str


def overlapping(calls: list[Call]) -> list[str]:
    """Attempts that ran twice at the same time (in two processes, or twice in one).
    A start without an end is a run that died with its process: it ends at the next
    start of the same process, or never."""
    runs: dict[str, list[tuple[float, float]]] = {}
    open_runs: dict[tuple[str, str], float] = {}
    for c in calls:
        key = (c.attempt, c.pid)
        if c.event == "start":
            open_runs[key] = float(c.at)
        elif key in open_runs:
            runs.setdefault(c.attempt, []).append((open_runs.pop(key), float(c.at)))
    deaths: dict[str, float] = {}
    for c in calls:  # a process's last log line bounds the runs it never finished
        deaths[c.pid] = max(deaths.get(c.pid, 0.0), float(c.at))
    for (attempt, pid), started in open_runs.items():
        runs.setdefault(attempt, []).append((started, deaths[pid]))
    twice = []
    for attempt, spans in runs.items():
        spans.sort()
        if any(b_start < a_end for (_, a_end), (b_start, _) in itertools.pairwise(spans)):
            twice.append(attempt)
    return twice


def successes_applied(scene: Scene) -> Counter[tuple[str, str]]:
    rows = scene.query(
        "SELECT execution_id, step FROM sagaflow_history WHERE kind = 'StepSucceeded'"
    )
    return Counter((r["execution_id"], r["step"]) for r in rows)


@contextmanager
def scene() -> Iterator[Scene]:
    # Outside pytest's tmp_path: postgres runs as its own user (see tests/integration/pg.py).
    root = Path(tempfile.mkdtemp(prefix="sagaflow-fault-"))
    os.chmod(root, 0o755)  # noqa: S103 - postgres must enter it
    s = Scene(root)
    try:
        yield s
    finally:
        for proc in s.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
        if postmaster_pid(s.pgdata) is not None:
            subprocess.run(
                [str(pg_bin_dir() / "pg_ctl"), "stop", "-m", "immediate", "-D", str(s.pgdata)],
                user="pgserver" if os.geteuid() == 0 else None,
                capture_output=True,
                check=False,
                timeout=60,
            )
        subprocess.run(["rm", "-rf", str(root)], check=False)


def executions(count: int, workflow: str, inputs: dict[int, str] | None = None) -> str:
    """`count` Execution documents of `workflow`, run-0 ..., with inputs by index."""
    docs = []
    for i in range(count):
        extra = (inputs or {}).get(i, "{}")
        docs.append(
            "---\napiVersion: sagaflow.io/v1alpha1\nkind: Execution\n"
            f"metadata: {{name: run-{i}}}\nspec: {{workflowRef: {{name: {workflow}}}, "
            f"input: {extra}}}\n"
        )
    return "".join(docs)


def workflow(name: str, steps: str) -> str:
    head = f"apiVersion: sagaflow.io/v1alpha1\nkind: Workflow\nmetadata: {{name: {name}}}\n"
    return head + f"spec:\n  steps:\n{steps}"


def wait_until(
    done: Callable[[], bool], *procs: subprocess.Popen[str], timeout: float = 60
) -> None:
    """Until `done()` holds; fails at once if one of `procs` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not done():
        for proc in procs:
            if proc.poll() is not None:
                _, err = proc.communicate()
                raise AssertionError(f"exited {proc.returncode}: {err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)  # the test's own look at the call log or the broker
