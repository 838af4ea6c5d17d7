"""How one `sagaflow run` scales: N executions x 3 steps, as a user runs it.

Runs `sagaflow run` as a subprocess on the embedded defaults (embedded Postgres, the
Postgres bus, in-process runners) over a generated manifest of N executions of a
three-step chain, with a handler that logs every invocation (`scale_runner.py`).
Prints, per N:

- wall time of the whole command (start-up, embedded Postgres and the final listing
  included) and its exit code;
- peak RSS of the `sagaflow run` process (its own rusage; the Postgres server is a
  separate process and not counted);
- handler calls, repeats (an attempt called more than once) and calls/s from the
  first call to the last;
- time from the command's start to the first handler call.

With `--saga` each step has a compensation and a fourth step fails, so every
execution is undone (c, b, a in that order): three forward and three compensation
calls per execution, every execution ending Compensated (the command exits 1). The
figures then measure the undo path against the plain one.

    python bench/scale.py --executions 1000 5000 10000
    python bench/scale.py --executions 1000 --saga
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKFLOW = """apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: scale}
spec:
  steps:
    - {name: a, type: scale.work}
    - {name: b, type: scale.work, dependsOn: [a]}
    - {name: c, type: scale.work, dependsOn: [b]}
"""


SAGA = """apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: scale}
spec:
  steps:
    - {name: a, type: scale.work, compensate: {type: scale.work}}
    - {name: b, type: scale.work, dependsOn: [a], compensate: {type: scale.work}}
    - {name: c, type: scale.work, dependsOn: [b], compensate: {type: scale.work}}
    - {name: d, type: sagaflow.fail, dependsOn: [c], input: {type: Planned}}
"""


def manifest(path: Path, executions: int, saga: bool = False) -> None:
    with path.open("w") as out:
        out.write(SAGA if saga else WORKFLOW)
        for i in range(executions):
            out.write(
                "---\napiVersion: sagaflow.io/v1alpha1\nkind: Execution\n"
                f"metadata: {{name: run-{i}}}\nspec: {{workflowRef: {{name: scale}}}}\n"
            )


def run_once(executions: int, saga: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="sagaflow-scale-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # noqa: S103 - postgres runs as its own user and must enter it
        manifest(root / "scale.yaml", executions, saga)
        log = root / "calls.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
        env["SCALE_LOG"] = str(log)
        args = [
            sys.executable,
            "-m",
            "sagaflow.cli",
            "run",
            "-f",
            str(root / "scale.yaml"),
            "--runners",
            str(HERE / "scale_runner.py"),
            "--state-dir",
            str(root / "state"),
        ]
        # Output goes to files: a pipe nobody reads until the end would fill and block.
        with (root / "stdout").open("w") as out, (root / "stderr").open("w") as err:
            started = time.time()
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=err)
            samples: list[tuple[float, int]] = []  # (time, RSS in kB) while it runs
            while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
                samples.append((time.time(), _rss_kb(proc.pid)))
                time.sleep(0.1)
            _, status, usage = waited
        elapsed = time.time() - started
        code = os.waitstatus_to_exitcode(status)
        stderr = (root / "stderr").read_text(errors="replace")
        lines = log.read_text().splitlines() if log.exists() else []
        times = [float(line.split()[0]) for line in lines]
        calls = Counter(line.split()[1] for line in lines)
        repeats = sum(1 for n in calls.values() if n > 1)
        shape = "steps=3 + 3 compensations" if saga else "steps=3"
        print(f"executions={executions} {shape} exit={code}")
        listing = (root / "stdout").read_text(errors="replace").splitlines()[1:]
        phases = Counter(line.split()[3] for line in listing if len(line.split()) > 3)
        print(f"  phases {dict(phases)}")
        print(f"  wall {elapsed:.1f}s, peak RSS {usage.ru_maxrss / 1024:.0f} MB")
        if times:
            # While handlers run: after the files are parsed, until the last call.
            running = [kb for t, kb in samples if min(times) <= t <= max(times) and kb]
            if running:
                print(
                    f"  RSS while steps run: {running[0] / 1024:.0f} MB at the first call, "
                    f"{max(running) / 1024:.0f} MB at most"
                )
            span = max(times) - min(times)
            rate = len(times) / span if span > 0 else float("nan")
            print(
                f"  handler calls {len(times)} (distinct {len(calls)}, repeated {repeats}), "
                f"{rate:,.0f} calls/s; first call {min(times) - started:.2f}s after start"
            )
        if code not in (0, 1) or (code == 1 and not saga):
            print("  stderr tail:", stderr[-1500:])


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, nargs="+", default=[1000])
    parser.add_argument("--saga", action="store_true", help="every execution is undone")
    args = parser.parse_args()
    for n in args.executions:
        run_once(n, args.saga)


if __name__ == "__main__":
    main()
