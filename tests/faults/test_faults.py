"""The fault run of the reliability issue, case by case, on real processes.

Every test counts: lost (an execution that never finishes), stuck (Running with nothing
to move it), successes applied twice, attempts run twice at the same time. Handlers
log every call (`fault_runners.py`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from harness import (
    executions,
    overlapping,
    scene,
    successes_applied,
    workflow,
)

from sagaflow.adapters.postgres.embedded import postmaster_pid

pytestmark = pytest.mark.timeout(240)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def listing(out: str) -> dict[str, dict[str, object]]:
    return {i["metadata"]["name"]: i["status"] for i in json.loads(out)["items"]}


ONE_STEP = workflow(
    "one", "    - {name: s, type: fault.work, input: {behave: '${{ input.behave }}'}}\n"
)


def behaving(count: int, bad: dict[int, str]) -> str:
    return ONE_STEP + executions(
        count, "one", {i: f"{{behave: {bad.get(i, 'ok')}}}" for i in range(count)}
    )


def test_one_result_postgres_cannot_store_fails_only_its_own_run() -> None:
    with scene() as s:
        manifest = s.manifest(behaving(101, {0: "nan"}))
        code, out, err = finish(s.start_run(manifest, "-o", "json"))
        assert code == 1, err
        status = listing(out)
        assert status["run-0"]["phase"] == "Failed"
        assert "InvalidOutput" in json.dumps(status["run-0"]) and "output.total: NaN" in json.dumps(
            status["run-0"]
        )
        assert [n for n, st in status.items() if st["phase"] != "Completed"] == ["run-0"]
        assert len(s.calls()) == 2 * 101  # one start and one end each: nothing redelivered
        assert "Traceback" not in err
        assert not s.query("SELECT * FROM bus_dead_letters")


def test_handler_exits_fail_their_step_and_the_run_exits_1() -> None:
    with scene() as s:
        manifest = s.manifest(behaving(6, {0: "exit", 1: "os_exit"}))
        code, out, err = finish(s.start_run(manifest, "-o", "json"))
        assert code == 1, err  # not 3, not 7: only documented exit codes
        status = listing(out)
        errors = {n: st["steps"][0].get("error", {}).get("type") for n, st in status.items()}
        assert errors["run-0"] == "SystemExit" and errors["run-1"] == "ProcessExit"
        assert [status[f"run-{i}"]["phase"] for i in range(2, 6)] == ["Completed"] * 4
        assert "never retrieved" not in err and "Traceback" not in err


def test_a_crash_loop_fails_the_crashing_step_and_no_healthy_one() -> None:
    # A handler that kills its own process (nothing can catch that) beside 20 healthy
    # half-second steps, and `sagaflow run` started again after each death.
    healthy = "{behave: sleep, seconds: 0.5}"
    text = ONE_STEP.replace(
        "input: {behave: '${{ input.behave }}'}",
        "input: {behave: '${{ input.behave }}', seconds: '${{ input.seconds }}'}",
    ) + executions(
        21, "one", dict.fromkeys(range(1, 21), healthy) | {0: "{behave: kill, seconds: 0}"}
    )
    with scene() as s:
        manifest = s.manifest(text)
        runs = []
        for _ in range(8):
            code, out, _ = finish(s.start_run(manifest, "-o", "json"))
            runs.append(code)
            if code >= 0:
                break
        assert runs[-1] == 1 and all(c == -signal.SIGKILL for c in runs[:-1]), runs
        assert len(runs) <= 6  # two deaths beside the others, then three alone
        status = listing(out)
        bad = status["run-0"]["steps"][0]["error"]
        assert bad["type"] == "DeadLettered" and "ReceiverCrashed" in bad["message"]
        assert [n for n, st in status.items() if st["phase"] != "Completed"] == ["run-0"]
        assert set(successes_applied(s).values()) == {1}  # each success applied once
        letters = s.query("SELECT message_id, reason FROM bus_dead_letters")
        assert [r["reason"] for r in letters] == ["ReceiverCrashed"]
        assert overlapping(s.calls()) == []


SLOW = workflow(
    "slow", "    - {name: s, type: fault.blocking, input: {until: '${{ input.until }}'}}\n"
)


def test_restarting_a_run_never_takes_the_work_of_a_live_runner() -> None:
    with scene() as s:
        go = s.root / "go"
        manifest = s.manifest(
            SLOW + executions(6, "slow", dict.fromkeys(range(6), f"{{until: '{go}'}}"))
        )
        # The runner and the run take at most three of the six blocked attempts each.
        runner = s.start_runner(SAGAFLOW_RUNNER_CONCURRENCY="3")
        first = s.start_run(manifest, "-o", "json", SAGAFLOW_RUNNER_CONCURRENCY="3")
        _wait(lambda: len(s.calls()) == 6, first)
        assert len({c.pid for c in s.calls()}) == 2
        first.kill()  # kill -9: its three attempts die with it
        first.communicate(timeout=30)
        second = s.start_run(manifest, "-o", "json")
        # The dead run's three come back to the new one at once; the live runner's stay
        # with it: nothing is left unlocked for the new run to take.
        _wait(lambda: len(s.calls()) == 9, second)
        assert (
            s.query(
                "SELECT count(*) AS n FROM bus_messages WHERE queue = 'steps.fault' "
                "AND lock_token IS NULL"
            )[0]["n"]
            == 0
        )
        go.touch()
        code, _, err = finish(second)
        assert code == 0, err
        runner.send_signal(signal.SIGTERM)
        assert finish(runner)[0] == 0
        assert overlapping(s.calls()) == []
        assert set(successes_applied(s).values()) == {1}
        by_pid: dict[str, int] = {}
        for c in s.calls():
            if c.event == "start":
                by_pid[c.pid] = by_pid.get(c.pid, 0) + 1
        assert sorted(by_pid.values()) == [3, 3, 3]  # runner 3, dead run 3, new run 3


def _wait(done: object, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)  # the test's own look at the call log


def test_sigterm_and_ctrl_c_stop_gracefully_and_a_rerun_resumes() -> None:
    with scene() as s:
        go = s.root / "go"
        manifest = s.manifest(
            SLOW + executions(3, "slow", dict.fromkeys(range(3), f"{{until: '{go}'}}"))
        )
        env = {"SAGAFLOW_GRACE_PERIOD_SECONDS": "1"}
        for sig, expected in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
            proc = s.start_run(manifest, **env)
            _wait(lambda: len([c for c in s.calls() if c.event == "start"]) >= 3, proc)
            proc.send_signal(sig)
            code, out, err = finish(proc, 60)
            assert code == expected, err
            assert "Traceback" not in err
            assert "stopping; running steps get 1s to finish" in err
            assert "3 execution(s) not finished" in err
            assert out.count("Running") == 3  # the summary: where each one stands
            assert postmaster_pid(s.pgdata) is None  # the embedded Postgres is stopped
            s.log.unlink()
        go.touch()
        code, out, err = finish(s.start_run(manifest))
        assert code == 0, err
        assert out.count("Completed") == 3


def test_a_handler_blocking_the_loop_is_named_and_threads_keep_others_going() -> None:
    text = workflow(
        "mixed",
        "    - {name: hog, type: fault.work, input: {behave: hog, seconds: 2}}\n"
        "    - {name: thread, type: fault.blocking, input: {seconds: 2}}\n",
    ) + executions(1, "mixed")
    with scene() as s:
        code, _, err = finish(s.start_run(s.manifest(text)))
        assert code == 0, err
        assert "blocked for" in err and "by step hog of execution default/run-0" in err
        assert "by step thread" not in err  # a plain `def` runs in a thread


@pytest.mark.parametrize("how", ["restart-fast", "restart-immediate", "outage"])
def test_a_run_rides_out_postgres_going_away(how: str) -> None:
    text = workflow(
        "three",
        "    - {name: a, type: fault.work, input: {behave: sleep, seconds: 0.05}}\n"
        "    - {name: b, type: fault.work, dependsOn: [a], input: {behave: sleep, seconds: 0.05}}\n"
        "    - {name: c, type: fault.work, dependsOn: [b]}\n",
    ) + executions(300, "three")
    with scene() as s:
        proc = s.start_run(s.manifest(text), "-o", "json")
        _wait(lambda: len(s.calls()) >= 300, proc)
        if how == "outage":
            s.pg_ctl("stop", "-m", "fast")
            time.sleep(5)  # the outage itself
            # As the embedded server runs: no TCP, its socket in its data folder.
            s.pg_ctl("start", "-o", '-h ""', "-o", f"-k {s.pgdata}")
        else:
            s.pg_ctl("restart", "-m", how.removeprefix("restart-"))
        code, out, err = finish(proc, 180)
        assert code == 0, err
        assert {st["phase"] for st in listing(out).values()} == {"Completed"}
        assert err.count("is unavailable") == 1 and err.count("is available again") == 1, err
        assert "Traceback" not in err
        assert set(successes_applied(s).values()) == {1}
        assert overlapping(s.calls()) == []


def test_starting_many_runs_the_first_step_at_once() -> None:
    with scene() as s:
        manifest = s.manifest(behaving(3000, {}))
        started = time.time()
        code, _, err = finish(s.start_run(manifest))
        assert code == 0, err
        first = min(float(c.at) for c in s.calls())
        assert len(s.calls()) == 6000
        # Not a speed claim: executions are started in batches beside the loops, so the
        # first step runs before the last execution is even started.
        last_start = s.query("SELECT max(created_at) AS t FROM sagaflow_executions")[0]["t"]
        assert first < last_start.timestamp(), first - started


@pytest.mark.parametrize("command", ["runner", "run"])
def test_a_database_that_does_not_answer_yet_is_waited_for_and_sigterm_still_stops(
    command: str,
) -> None:
    with scene() as s:
        # A Postgres that is not up yet (a pod started before its database).
        down = {"SAGAFLOW_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/sagaflow"}
        if command == "runner":
            proc = s.start_runner(**down)
        else:
            proc = s.start_run(s.manifest(behaving(1, {})), **down)
        assert proc.stderr is not None
        line = proc.stderr.readline()  # blocks until the process says it waits
        assert "the database is not answering" in line and "waiting for it" in line, line
        assert proc.poll() is None  # waiting, not dead
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc, 30)
        assert code == (0 if command == "runner" else 143), err
        assert "Traceback" not in err
