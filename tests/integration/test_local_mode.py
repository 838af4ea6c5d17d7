"""`sagaflow run` end to end, as a user runs it: a subprocess on the embedded defaults."""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pg import server_dir

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.adapters.postgres.embedded import EmbeddedPostgres, pg_bin_dir
from sagaflow.adapters.postgres.store import PostgresStore
from sagaflow.core.manifests import ExecutionPhase, StepPhase
from sagaflow.core.state import ExecutionState, Failure, Undo, new_execution
from sagaflow.core.validation import parse_documents, validate_documents
from sagaflow.local.output import Progress, Snapshot, current_detail, table
from sagaflow.runtime.orchestrator import Orchestrator

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "order-fulfilment.yaml"
RUNNERS = ROOT / "samples" / "order_runners.py"


def sagaflow(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sagaflow.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )


@pytest.fixture
def state_dir() -> Iterator[Path]:
    with server_dir("sagaflow-local-") as path:
        try:
            yield path / "state"
        finally:
            stop_leftover_postgres(path / "state")


def stop_leftover_postgres(state: Path) -> None:
    """A killed run leaves its postgres running; stop it so no process outlives the test."""
    pgdata = state / "postgres" / "pgdata"
    if (pgdata / "postmaster.pid").exists():
        subprocess.run(
            [
                "su",
                "pgserver",
                "-s",
                "/bin/sh",
                "-c",
                f"{pg_bin_dir() / 'pg_ctl'} stop -m immediate -D {pgdata}",
            ],
            capture_output=True,
            check=False,
            timeout=60,
        )


@pytest.mark.timeout(180)
def test_the_sample_runs_to_completion(state_dir: Path) -> None:
    run = sagaflow(
        "run", "-f", SAMPLE, "--runners", RUNNERS, "--state-dir", state_dir, "-o", "json"
    )
    assert run.returncode == 0, run.stderr
    listing = json.loads(run.stdout)
    assert listing["kind"] == "List"
    items = {i["metadata"]["name"]: i for i in listing["items"]}
    assert set(items) == {"order-1001", "order-1002"}
    for item in items.values():
        status = item["status"]
        assert status["phase"] == "Completed"
        steps = {s["name"]: s for s in status["steps"]}
        assert steps["charge-payment"]["attempts"] == 2  # the flaky gateway, retried
        assert all(steps[n]["attempts"] == 1 for n in steps if n != "charge-payment")
        assert status["conditions"][0]["status"] == "True"
    first = items["order-1001"]["status"]
    assert first["output"]["charged"] == 28.0
    assert first["output"]["tracking"].startswith("trk-")
    assert "order for ada" in json.dumps(first["steps"])

    # Running again with the same state dir starts nothing new: both are already done.
    again = sagaflow(
        "run", "-f", SAMPLE, "--runners", RUNNERS, "--state-dir", state_dir, "-o", "json"
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == listing


@pytest.mark.timeout(120)
def test_table_output_and_exit_code_of_a_failing_run(state_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "fails.yaml"
    manifest.write_text("""
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: doomed}
spec:
  steps:
    - {name: wait, type: sagaflow.wait, input: {duration: 10ms}}
    - name: boom
      type: sagaflow.fail
      dependsOn: [wait]
      input: {type: OutOfStock, message: "no ${{ input.sku }} left"}
---
apiVersion: sagaflow.io/v1alpha1
kind: Execution
metadata: {name: doomed-1}
spec: {workflowRef: {name: doomed}, input: {sku: LAMP-3}}
""")
    run = sagaflow("run", "-f", manifest, "--state-dir", state_dir)
    assert run.returncode == 1, run.stderr
    header, row = run.stdout.strip().splitlines()
    assert header.split()[:4] == ["NAMESPACE", "NAME", "WORKFLOW", "PHASE"]
    assert row.split()[:4] == ["default", "doomed-1", "doomed:v1", "Failed"]
    assert "OutOfStock: step boom failed: no LAMP-3 left" in row


BAD_INPUTS = {
    "unknown step type": (
        "kind: Workflow\napiVersion: sagaflow.io/v1alpha1\nmetadata: {name: w}\n"
        "spec: {steps: [{name: a, type: nobody.serves}]}\n",
        "document 1 (Workflow w): spec.steps[0].type: no runner registered for step type "
        "'nobody.serves'",
    ),
    "malformed yaml": ("kind: [Workflow\n", "line 1"),
    "unknown kind": ("apiVersion: sagaflow.io/v1alpha1\nkind: Flow\nmetadata: {name: x}\n", "kind"),
    "bad duration": (
        "kind: Workflow\napiVersion: sagaflow.io/v1alpha1\nmetadata: {name: w}\n"
        "spec: {steps: [{name: a, type: sagaflow.pass, timeout: soon}]}\n",
        "spec.steps[0].timeout",
    ),
    "missing workflow": (
        "kind: Execution\napiVersion: sagaflow.io/v1alpha1\nmetadata: {name: e}\n"
        "spec: {workflowRef: {name: ghost}}\n",
        "spec.workflowRef.name",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_naming_file_and_field(
    case: str, state_dir: Path, tmp_path: Path
) -> None:
    text, expected = BAD_INPUTS[case]
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(text)
    run = sagaflow("run", "-f", manifest, "--state-dir", state_dir)
    assert run.returncode == 2
    assert str(manifest) in run.stderr and expected in run.stderr, run.stderr
    assert not (state_dir / "postgres").exists()  # nothing was started


@pytest.mark.timeout(60)
def test_a_missing_file_and_a_bad_setting_exit_2(state_dir: Path) -> None:
    missing = sagaflow("run", "-f", "no/such.yaml", "--state-dir", state_dir)
    assert missing.returncode == 2 and "no/such.yaml: cannot read" in missing.stderr
    bad = sagaflow(
        "run", "-f", SAMPLE, "--state-dir", state_dir, env={"SAGAFLOW_BATCH_SIZE": "lots"}
    )
    assert bad.returncode == 2 and "SAGAFLOW_BATCH_SIZE" in bad.stderr


CHAIN = """
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: chain}
spec:
  steps:
    - {name: s1, type: crash.work}
    - {name: s2, type: crash.work, dependsOn: [s1], input: {prev: "${{ steps.s1.output.step }}"}}
    - {name: s3, type: crash.work, dependsOn: [s2], input: {prev: "${{ steps.s2.output.step }}"}}
    - {name: s4, type: crash.work, dependsOn: [s3], input: {prev: "${{ steps.s3.output.step }}"}}
"""


def wait_for_fifo(fifo: Path, proc: subprocess.Popen[str], timeout: float) -> None:
    """Block until the runner writes to the FIFO (or fail if the process ends first)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable or not os.read(fd, 64):
            _, err = proc.communicate(timeout=5) if proc.poll() is not None else ("", "")
            raise AssertionError(f"runner never signalled; rc={proc.poll()} {err[-2000:]}")
    finally:
        os.close(fd)


@pytest.mark.timeout(240)
def test_kill_9_mid_run_then_resume_loses_and_repeats_nothing(
    state_dir: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "chain.yaml"
    runs = "".join(
        f"---\napiVersion: sagaflow.io/v1alpha1\nkind: Execution\nmetadata: {{name: c{i}}}\n"
        f"spec: {{workflowRef: {{name: chain}}}}\n"
        for i in range(5)
    )
    manifest.write_text(CHAIN + runs)
    log, fifo = tmp_path / "calls.log", tmp_path / "signal.fifo"
    os.mkfifo(fifo)
    runner = Path(__file__).with_name("crash_runners.py")
    args = [
        sys.executable,
        "-m",
        "sagaflow.cli",
        "run",
        "-f",
        str(manifest),
        "--runners",
        str(runner),
        "--state-dir",
        str(state_dir),
        "-o",
        "json",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env.update(CRASH_LOG=str(log), CRASH_FIFO=str(fifo), CRASH_SIGNAL_AT="9")
    first = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_fifo(fifo, first, timeout=120)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    before = log.read_text().splitlines()
    assert len(before) >= 9
    applied_before = query_history(state_dir)["succeeded_attempts"]
    assert applied_before  # the kill came mid-run, after some results were applied

    env["CRASH_SIGNAL_AT"] = "0"
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert second.returncode == 0, second.stderr
    items = json.loads(second.stdout)["items"]
    assert [i["status"]["phase"] for i in items] == ["Completed"] * 5
    for item in items:
        steps = item["status"]["steps"]
        assert [s["attempts"] for s in steps] == [1, 1, 1, 1]
        assert steps[3]["output"] == {"step": "s4", "seen": "s3"}

    calls = log.read_text().splitlines()
    assert len(set(calls)) == 20  # every attempt ran
    # Only attempts in flight at the kill may run twice (at-least-once delivery); an
    # attempt whose result had been applied before the kill never runs again.
    repeated = {c for c in calls if calls.count(c) > 1}
    assert repeated <= set(before)
    assert not repeated & applied_before
    assert all(calls.count(c) <= 2 for c in calls)

    history = query_history(state_dir)
    assert history["succeeded_per_step"] == {1}  # each step's success applied once
    assert history["attempt_rows"] == 20


def query_history(state: Path) -> dict[str, Any]:
    async def read(dsn: str) -> dict[str, Any]:
        conn = await asyncpg.connect(dsn)
        try:
            per_step = await conn.fetch(
                "SELECT count(*) AS n FROM sagaflow_history WHERE kind='StepSucceeded' "
                "GROUP BY execution_id, step"
            )
            rows = await conn.fetchval("SELECT count(*) FROM sagaflow_step_attempts")
            succeeded = await conn.fetch(
                "SELECT execution_id || '/' || step || '/' || attempt AS id "
                "FROM sagaflow_step_attempts WHERE status = 'Succeeded'"
            )
            return {
                "succeeded_per_step": {r["n"] for r in per_step},
                "attempt_rows": rows,
                "succeeded_attempts": {r["id"] for r in succeeded},
            }
        finally:
            await conn.close()

    with EmbeddedPostgres(state / "postgres") as server:
        return asyncio.run(read(server.dsn))


@pytest.mark.timeout(120)
def test_an_external_database_via_sagaflow_database_url(pg_database: str, tmp_path: Path) -> None:
    run = sagaflow(
        "run",
        "-f",
        SAMPLE,
        "--runners",
        RUNNERS,
        "--state-dir",
        tmp_path / "s",
        "-o",
        "yaml",
        env={"SAGAFLOW_DATABASE_URL": pg_database},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("phase: Completed") == 2
    assert not (tmp_path / "s" / "postgres").exists()  # no embedded server was started


@pytest.mark.timeout(120)
async def test_a_separate_runner_process_serves_steps_and_stops_cleanly(
    pg_database: str,
    pg_pool: Any,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env["SAGAFLOW_DATABASE_URL"] = pg_database
    runner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sagaflow.cli",
        "runner",
        "--module",
        str(RUNNERS),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    bus = PostgresBus(pg_pool)
    orchestrator = Orchestrator(PostgresStore(pg_pool), bus)
    stop = asyncio.Event()
    loops = asyncio.create_task(orchestrator.run(stop, pg_database))
    try:
        docs, _ = parse_documents(SAMPLE.read_text(), str(SAMPLE))
        manifests = validate_documents(docs)
        for _, wf in manifests.workflows:
            await orchestrator.apply_workflow("default", wf.metadata.name, wf.spec)
        for _, ex in manifests.executions:
            await orchestrator.start(
                "default", ex.metadata.name, ex.spec.workflow_ref.name, ex.spec.input
            )
        async with pg_pool.acquire() as conn:
            await conn.execute("LISTEN sagaflow_executions")
            done = asyncio.Event()

            def changed(*_: Any) -> None:
                done.set()

            await conn.add_listener("sagaflow_executions", changed)
            while await conn.fetchval(
                "SELECT count(*) FROM sagaflow_executions WHERE phase <> 'Completed'"
            ):
                await asyncio.wait_for(done.wait(), 60)
                done.clear()
            await conn.remove_listener("sagaflow_executions", changed)
    finally:
        stop.set()
        await loops
        await bus.close()
        runner.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(runner.communicate(), 60)
    assert runner.returncode == 0, err.decode()


def test_progress_redraws_in_place_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress(screen)
    state = new_execution(
        execution_id="e",
        namespace="default",
        name="run-1",
        workflow="w",
        version=1,
        input={},
        step_names=("a", "b"),
    )
    progress.update(Snapshot(1, 1, {"Pending": 1}, [state]))
    done = replace(
        state,
        phase=ExecutionPhase.COMPLETED,
        started_at=datetime.now(UTC),
        finished_at=datetime.now(UTC),
    )
    progress.update(Snapshot(1, 1, {"Completed": 1}, [done]))
    text = screen.getvalue()
    assert text.count("\x1b[2F\x1b[J") == 1  # the two-line table was redrawn over itself
    assert "Pending" in text and "Completed" in text

    plain = io.StringIO()
    quiet = Progress(plain)
    quiet.update(Snapshot(1, 1, {"Pending": 1}, [state]))
    quiet.update(Snapshot(1, 1, {"Completed": 1}, [done]))
    quiet.update(Snapshot(1, 1, {"Completed": 1}, [done]))
    assert plain.getvalue() == "default/run-1: Completed\n"  # once, no escape codes


def one_run(*steps: str) -> ExecutionState:
    """A fresh execution default/run-1 of these steps, for tests of what is shown."""
    return new_execution(
        execution_id="e",
        namespace="default",
        name="run-1",
        workflow="w",
        version=1,
        input={},
        step_names=steps,
    )


def test_progress_shows_running_steps_with_their_attempt_and_time() -> None:
    now = datetime.now(UTC)
    state = one_run("slow", "flaky")
    state = state.with_step(
        replace(
            state.steps["slow"],
            phase=StepPhase.RUNNING,
            attempt=1,
            attempt_started_at=now - timedelta(seconds=95),
        )
    ).with_step(
        replace(
            state.steps["flaky"],
            phase=StepPhase.RETRYING,
            attempt=2,
            next_retry_at=now + timedelta(seconds=3),
        )
    )
    state = replace(state, phase=ExecutionPhase.RUNNING, started_at=now - timedelta(seconds=95))
    detail = current_detail(state, now)
    assert detail == "at slow (attempt 1, 1m35s), flaky (attempt 3 in 3.0s)"

    # Without a terminal, a line every so often says what the run waits for.
    clock = iter([0.0, 31.0, 31.0, 40.0])
    log = io.StringIO()
    progress = Progress(log, waiting_every=30, clock=lambda: next(clock))
    progress.update(Snapshot(1, 1, {"Running": 1}, [state]))
    progress.update(Snapshot(1, 1, {"Running": 1}, [state]))
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "waiting on default/run-1 at slow (attempt 1" in lines[0], lines


def test_the_table_says_what_is_undone_and_what_a_person_must_act_on() -> None:
    now = datetime.now(UTC)
    base = one_run("reserve", "charge")
    failed = Failure("Declined", "step charge failed: no", step="charge")
    undoing = replace(
        base.with_step(
            replace(
                base.steps["reserve"],
                phase=StepPhase.COMPENSATING,
                attempt=1,
                undo=Undo(
                    status="running", attempt=2, attempt_started_at=now - timedelta(seconds=2)
                ),
            )
        ),
        phase=ExecutionPhase.COMPENSATING,
        error=failed,
        started_at=now,
    )
    assert current_detail(undoing, now) == "at undoing reserve (attempt 2, 2.0s)"
    assert "Declined: step charge failed: no; at undoing reserve" in table([undoing], now)

    stuck = replace(
        undoing.with_step(
            replace(
                undoing.steps["reserve"],
                phase=StepPhase.COMPENSATION_FAILED,
                undo=Undo(status="done", attempt=3, error=Failure("Down", "warehouse offline")),
            )
        ),
        phase=ExecutionPhase.COMPENSATION_FAILED,
    )
    row = table([stuck], now).splitlines()[1]
    assert "CompensationFailed" in row
    assert "compensation of step reserve failed: Down: warehouse offline; redrive" in row

    paused = replace(base, phase=ExecutionPhase.SUSPENDED, resume_phase=ExecutionPhase.RUNNING)
    assert "suspended; resume it with `sagaflow resume`" in table([paused], now)
