"""Sagas through `sagaflow run` and the control verbs, as a user runs them: subprocesses
against one database (SAGAFLOW_DATABASE_URL), step handlers that log every call.

What each test proves is in its name; the handlers (`saga_runners.py`) log start and
end of every forward and compensation attempt, so order and overlap are read from
the log, not inferred from timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

RUNNERS = Path(__file__).with_name("saga_runners.py")


class Saga:
    """A scratch folder, a database and the log of one test's handlers."""

    def __init__(self, dsn: str, folder: Path) -> None:
        self.folder = folder
        self.log = folder / "calls.log"
        self.state = folder / "state"
        self.log.touch()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
        self.env.update(SAGAFLOW_DATABASE_URL=dsn, SAGA_LOG=str(self.log), SAGA_DIR=str(folder))

    def args(self, *args: str | Path) -> list[str]:
        return [sys.executable, "-m", "sagaflow.cli", *map(str, args)]

    def start(self, file: Path) -> subprocess.Popen[str]:
        """`sagaflow run -f FILE -o json` in the background."""
        args = self.args(
            "run", "-f", file, "-o", "json", "--runners", RUNNERS, "--state-dir", self.state
        )
        return subprocess.Popen(
            args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def run(self, *files: Path) -> tuple[int, dict[str, Any], str]:
        """`sagaflow run -f ... -o json`: exit code, status by execution name, stderr."""
        done = self.cli(
            "run",
            *[a for f in files for a in ("-f", f)],
            "-o",
            "json",
            "--runners",
            RUNNERS,
            "--state-dir",
            self.folder / "state",
        )
        items = json.loads(done.stdout)["items"] if done.stdout else []
        return done.returncode, {i["metadata"]["name"]: i["status"] for i in items}, done.stderr

    def cli(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.args(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def control(self, verb: str, name: str, *more: str | Path) -> subprocess.CompletedProcess[str]:
        return self.cli(verb, name, *more, "--state-dir", self.folder / "state")

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def of(self, execution: str) -> list[dict[str, Any]]:
        return [c for c in self.calls() if c["ex"] == f"default/{execution}"]

    def write(self, name: str, text: str) -> Path:
        path = self.folder / name
        path.write_text(text)
        return path

    def wait_for(self, what: Callable[[], bool], proc: subprocess.Popen[str] | None = None) -> None:
        deadline = time.monotonic() + 60
        while not what():
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"sagaflow run ended first: {proc.communicate()[1][-3000:]}")
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)


@pytest.fixture
def saga(pg_database: str, tmp_path: Path) -> Saga:
    return Saga(pg_database, tmp_path)


def window(calls: list[dict[str, Any]], step: str, undo: bool) -> tuple[float, float]:
    """(first start, last end) of a step's forward or compensation attempts."""
    mine = [c for c in calls if c["step"] == step and c["undo"] == undo]
    assert mine, f"no calls of {step} (undo={undo})"
    return min(c["t"] for c in mine if c["event"] == "start"), max(
        c["t"] for c in mine if c["event"] == "end"
    )


def manifest(*docs: str) -> str:
    return "\n---\n".join(f"apiVersion: sagaflow.io/v1alpha1\n{d.strip()}" for d in docs)


def workflow(name: str, steps: str, spec: str = "") -> str:
    return f"kind: Workflow\nmetadata: {{name: {name}}}\nspec:\n{spec}  steps:\n{steps}"


def execution(name: str, workflow: str) -> str:
    return (
        f"kind: Execution\nmetadata: {{name: {name}}}\nspec: {{workflowRef: {{name: {workflow}}}}}"
    )


UNDO = "compensate: {type: saga.undo, input: {saw: '${{ steps.%s.output }}'}}"
RETRY = "  retry: {maxAttempts: 3, initialInterval: 10ms}\n"

SHAPES = manifest(
    workflow(
        "chain",
        f"""
  - {{name: a, type: saga.work, {UNDO % "a"}}}
  - {{name: b, type: saga.work, dependsOn: [a], {UNDO % "b"}}}
  - {{name: c, type: saga.work, dependsOn: [b], input: {{fail: true}}}}
""",
    ),
    workflow(
        "diamond",
        """
  - {name: root, type: saga.work, compensate: {type: saga.undo}}
  - {name: left, type: saga.work, dependsOn: [root],
     compensate: {type: saga.undo, input: {slow: 0.3}}}
  - {name: right, type: saga.work, dependsOn: [root],
     compensate: {type: saga.undo, input: {slow: 0.3}}}
  - {name: end, type: saga.work, dependsOn: [left, right], input: {fail: true}}
""",
    ),
    workflow(
        "retried",
        """
  - {name: a, type: saga.work, compensate: {type: saga.undo, input: {failTimes: 2}}}
  - {name: b, type: saga.work, dependsOn: [a], input: {fail: true}}
""",
        RETRY,
    ),
    workflow(
        "pivoted",
        """
  - {name: a, type: saga.work, compensate: {type: saga.undo}}
  - {name: ship, type: saga.work, dependsOn: [a], pivot: true}
  - {name: notify, type: saga.work, dependsOn: [ship], input: {fail: true}}
""",
    ),
    workflow(
        "in-doubt",
        """
  - {name: root, type: saga.work, compensate: {type: saga.undo}}
  - {name: quick, type: saga.work, dependsOn: [root], input: {fail: true}}
  - {name: slow, type: saga.work, dependsOn: [root], input: {slow: 0.5},
     compensate: {type: saga.undo}}
""",
        "  compensation: {inDoubt: await}\n",
    ),
    execution("chain-1", "chain"),
    execution("diamond-1", "diamond"),
    execution("retried-1", "retried"),
    execution("pivoted-1", "pivoted"),
    execution("in-doubt-1", "in-doubt"),
)


@pytest.mark.timeout(120)
def test_failed_runs_are_undone_in_reverse_dependency_order(saga: Saga) -> None:
    code, status, err = saga.run(saga.write("shapes.yaml", SHAPES))

    assert code == 1, err  # none Completed
    phases = {name: s["phase"] for name, s in status.items()}
    assert phases == {
        "chain-1": "Compensated",
        "diamond-1": "Compensated",
        "retried-1": "Compensated",
        "pivoted-1": "Failed",
        "in-doubt-1": "Compensated",
    }
    # Chain: b is undone before a, each reading its own step's output.
    chain = saga.of("chain-1")
    assert window(chain, "b", True)[1] < window(chain, "a", True)[0]
    steps = {s["name"]: s for s in status["chain-1"]["steps"]}
    assert [steps[n]["phase"] for n in "abc"] == ["Compensated", "Compensated", "Failed"]
    assert status["chain-1"]["error"]["step"] == "c"
    # Diamond: both branches undone at once, the root after both.
    diamond = saga.of("diamond-1")
    left, right = window(diamond, "left", True), window(diamond, "right", True)
    assert left[0] < right[1] and right[0] < left[1]  # they overlapped
    assert max(left[1], right[1]) < window(diamond, "root", True)[0]
    # A compensation retried on its own policy until it succeeded: attempts 1, 2, 3.
    retried = {s["name"]: s for s in status["retried-1"]["steps"]}
    assert retried["a"]["compensation"]["attempts"] == 3
    keys = [c["key"] for c in saga.of("retried-1") if c["undo"] and c["event"] == "start"]
    assert keys == [f"{keys[0].rsplit('/', 1)[0]}/{n}" for n in (1, 2, 3)]
    assert "/a/compensate/" in keys[0]
    # Past the pivot nothing is undone; the run waits for a redrive.
    assert not [c for c in saga.of("pivoted-1") if c["undo"]]
    assert "pivot step ship succeeded" in json.dumps(status["pivoted-1"]["conditions"])
    # In doubt, awaited: slow's result came after quick failed; then slow, then root undone.
    doubt = saga.of("in-doubt-1")
    assert window(doubt, "quick", False)[1] < window(doubt, "slow", False)[1]
    assert window(doubt, "slow", False)[1] < window(doubt, "slow", True)[0]
    assert window(doubt, "slow", True)[1] < window(doubt, "root", True)[0]


REDRIVES = manifest(
    workflow(
        "fragile",
        """
  - name: a
    type: saga.work
    compensate:
      type: saga.undo
      input: {failWhile: broken}
      retry: {maxAttempts: 2, initialInterval: 10ms}
  - {name: b, type: saga.work, dependsOn: [a], input: {fail: true}}
""",
    ),
    workflow(
        "flaky",
        """
  - {name: a, type: saga.work}
  - {name: b, type: saga.work, dependsOn: [a], input: {failWhile: broken}, retry: {maxAttempts: 1}}
  - {name: c, type: saga.work, dependsOn: [b]}
""",
    ),
    execution("fragile-1", "fragile"),
    execution("flaky-1", "flaky"),
)


@pytest.mark.timeout(180)
def test_redrive_retries_failed_compensations_and_failed_steps_keeping_successes(
    saga: Saga,
) -> None:
    saga.write("broken", "")
    file = saga.write("redrives.yaml", REDRIVES)

    code, status, err = saga.run(file)

    assert code == 1, err
    assert status["fragile-1"]["phase"] == "CompensationFailed"
    ready = next(c for c in status["fragile-1"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "CompensationFailed"
    assert "compensation of step a failed: Broken: broken is there" in ready["message"]
    assert status["flaky-1"]["phase"] == "Failed"

    (saga.folder / "broken").unlink()
    for name in ("fragile-1", "flaky-1"):
        done = saga.control("redrive", name)
        assert done.returncode == 0, done.stderr
        assert "accepted" in done.stdout
    code, status, err = saga.run(file)

    assert code == 1, err  # fragile-1 ends Compensated, not Completed
    assert status["fragile-1"]["phase"] == "Compensated"
    a = next(s for s in status["fragile-1"]["steps"] if s["name"] == "a")
    assert a["compensation"]["attempts"] == 3  # attempt numbers continue
    assert status["flaky-1"]["phase"] == "Completed"
    assert status["flaky-1"]["redrives"] == 1
    flaky = saga.of("flaky-1")
    assert len([c for c in flaky if c["step"] == "a" and c["event"] == "start"]) == 1
    assert [c["attempt"] for c in flaky if c["step"] == "b" and c["event"] == "start"] == [1, 2]

    refused = saga.control("redrive", "flaky-1")
    assert refused.returncode == 1
    assert "a Completed execution cannot be redriven" in refused.stderr
    unknown = saga.control("redrive", "nobody")
    assert unknown.returncode == 2
    assert "no execution default/nobody" in unknown.stderr


FIXABLE = workflow(
    "fixable",
    """
  - {name: a, type: saga.work}
  - {name: b, type: saga.work, dependsOn: [a], input: {fail: %s}, retry: {maxAttempts: 1}}
""",
)


@pytest.mark.timeout(180)
def test_redrive_latest_moves_a_failed_run_onto_the_fixed_workflow(saga: Saga) -> None:
    v1 = saga.write("v1.yaml", manifest(FIXABLE % "true", execution("fix-1", "fixable")))
    code, status, _ = saga.run(v1)
    assert status["fix-1"]["phase"] == "Failed"

    lacking = saga.write(
        "v3.yaml", manifest(workflow("fixable", "  - {name: b, type: saga.work}\n"))
    )
    refused = saga.control("redrive", "fix-1", "--latest", "-f", lacking)
    assert refused.returncode == 1
    assert "lacks steps this run keeps: a" in refused.stderr

    v2 = saga.write("v2.yaml", manifest(FIXABLE % "false", execution("fix-1", "fixable")))
    done = saga.control("redrive", "fix-1", "--latest", "-f", v2)
    assert done.returncode == 0, done.stderr
    assert "onto v" in done.stdout
    code, status, err = saga.run(v2)

    assert code == 0, err
    assert status["fix-1"]["phase"] == "Completed"
    calls = saga.of("fix-1")
    assert len([c for c in calls if c["step"] == "a" and c["event"] == "start"]) == 1


CONTROLLED = manifest(
    workflow(
        "three",
        """
  - {name: a, type: saga.work, input: {gate: open-a}}
  - {name: b, type: saga.work, dependsOn: [a]}
  - {name: c, type: saga.work, dependsOn: [b]}
""",
    ),
    workflow(
        "undoable",
        """
  - {name: a, type: saga.work, compensate: {type: saga.undo}}
  - {name: g, type: saga.work, dependsOn: [a], input: {gate: open-g}}
""",
    ),
    execution("paused-1", "three"),
    execution("cancelled-1", "undoable"),
)


@pytest.mark.timeout(180)
def test_suspend_and_cancel_reach_a_running_sagaflow_run(saga: Saga) -> None:
    file = saga.write("controlled.yaml", CONTROLLED)
    proc = saga.start(file)
    try:

        def started(execution: str, step: str) -> bool:
            return any(c["step"] == step and c["event"] == "start" for c in saga.of(execution))

        saga.wait_for(lambda: started("paused-1", "a") and started("cancelled-1", "g"), proc)
        suspended = saga.control("suspend", "paused-1")
        cancelled = saga.control("cancel", "cancelled-1")
        assert suspended.returncode == 0, suspended.stderr
        assert cancelled.returncode == 0, cancelled.stderr
        # Undone while g still runs: g has no compensation, so nothing waits for it.
        saga.wait_for(lambda: any(c["undo"] for c in saga.of("cancelled-1")), proc)
        saga.write("open-a", "")
        saga.write("open-g", "")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    status = {i["metadata"]["name"]: i["status"] for i in json.loads(out)["items"]}
    assert status["cancelled-1"]["phase"] == "Compensated"
    assert status["cancelled-1"]["error"]["type"] == "Cancelled"
    # Suspended: a's attempt in flight finished and was recorded; b was not dispatched.
    assert status["paused-1"]["phase"] == "Suspended"
    steps = {s["name"]: s["phase"] for s in status["paused-1"]["steps"]}
    assert steps == {"a": "Succeeded", "b": "Pending", "c": "Pending"}
    assert not [c for c in saga.of("paused-1") if c["step"] != "a"]
    again = saga.control("suspend", "paused-1")
    assert again.returncode == 0
    assert "nothing to do: already suspended" in again.stdout

    resumed = saga.control("resume", "paused-1")
    assert resumed.returncode == 0, resumed.stderr
    code, status, err = saga.run(file)
    assert code == 1, err  # cancelled-1 is Compensated, not Completed
    assert status["paused-1"]["phase"] == "Completed", err
    refused = saga.control("resume", "paused-1")
    assert refused.returncode == 1
    assert "not suspended" in refused.stderr


KILLED = manifest(
    workflow(
        "slow-undo",
        """
  - {name: a, type: saga.work, compensate: {type: saga.undo}}
  - {name: b, type: saga.work, dependsOn: [a], compensate: {type: saga.undo, input: {gate: open}}}
  - {name: c, type: saga.work, dependsOn: [b], input: {fail: true}}
""",
    ),
    execution("killed-1", "slow-undo"),
)


@pytest.mark.timeout(180)
def test_kill_9_during_compensation_then_run_again_undoes_each_step_once(saga: Saga) -> None:
    file = saga.write("killed.yaml", KILLED)
    proc = saga.start(file)
    try:
        saga.wait_for(lambda: any(c["undo"] for c in saga.of("killed-1")), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    saga.write("open", "")

    code, status, err = saga.run(file)

    assert code == 1, err
    assert status["killed-1"]["phase"] == "Compensated", err
    undos = [c for c in saga.of("killed-1") if c["undo"] and c["event"] == "start"]
    # b's undo was cut short by the kill and ran again under the same key; a's ran once.
    assert [c["step"] for c in undos] == ["b", "b", "a"]
    assert len({c["key"] for c in undos if c["step"] == "b"}) == 1
    compensated = [s for s in status["killed-1"]["steps"] if s["phase"] == "Compensated"]
    assert [s["compensation"]["attempts"] for s in compensated] == [1, 1]
