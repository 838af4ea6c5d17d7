"""Data flow and coordination through `sagaflow run`, as a user runs them: `when`,
forEach with limits, tolerated failures and per-item undo, child workflows, signals
(CLI and bus), concurrency limits, `finally`, and kill -9 in the middle of a fan-out.

Subprocesses against one database (SAGAFLOW_DATABASE_URL); the handlers
(`flow_runners.py`) log start and end of every call as JSON lines, so order,
overlap and repeats are read from the log, never inferred from timing. Conditions
the tests wait for are polled with a deadline (the log, the database, a CLI answer).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sagaflow.adapters.postgres.bus import PostgresBus
from sagaflow.core.messages import EVENTS_QUEUE, SignalMessage
from sagaflow.core.ports import OutgoingMessage

RUNNERS = Path(__file__).with_name("flow_runners.py")
DEADLINE = 60.0


class Flows:
    """A scratch folder, a database and the handler log of one test."""

    def __init__(self, dsn: str, folder: Path) -> None:
        self.dsn = dsn
        self.folder = folder
        self.log = folder / "calls.log"
        self.state = folder / "state"
        self.log.touch()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
        self.env.update(SAGAFLOW_DATABASE_URL=dsn, FLOW_LOG=str(self.log), FLOW_DIR=str(folder))
        self._started = 0

    # -- processes ------------------------------------------------------------------

    def args(self, *args: str | Path) -> list[str]:
        return [sys.executable, "-m", "sagaflow.cli", *map(str, args)]

    def run_args(self, *files: Path) -> list[str]:
        pairs = [a for f in files for a in ("-f", f)]
        return self.args(
            "run", *pairs, "-o", "json", "--runners", RUNNERS, "--state-dir", self.state
        )

    def run(self, *files: Path) -> tuple[int, dict[str, Any], str]:
        """`sagaflow run -f ... -o json`: exit code, status by execution name, stderr."""
        done = subprocess.run(
            self.run_args(*files),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=DEADLINE * 2,
            check=False,
        )
        return done.returncode, listing(done.stdout), done.stderr

    @contextmanager
    def background(self, *files: Path) -> Iterator[Background]:
        """`sagaflow run` in the background (output to files, never a pipe that fills);
        killed if the test leaves it running."""
        self._started += 1
        out = self.folder / f"run-{self._started}.out"
        err = self.folder / f"run-{self._started}.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(
                self.run_args(*files), env=self.env, stdout=stdout, stderr=stderr, text=True
            )
        bg = Background(proc, out, err)
        try:
            yield bg
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

    def cli(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.args(*args, "--state-dir", self.state),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )

    def signal(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli("signal", *args)

    # -- reading ----------------------------------------------------------------------

    def calls(self) -> list[dict[str, Any]]:
        """The log; a last line cut short by a kill is left out."""
        text = self.log.read_text()
        lines = text.split("\n")[:-1]  # a complete line ends with "\n"
        return [json.loads(line) for line in lines]

    def of(self, execution: str) -> list[dict[str, Any]]:
        return [c for c in self.calls() if c["ex"] == f"default/{execution}"]

    def write(self, name: str, text: str) -> Path:
        path = self.folder / name
        path.write_text(text)
        return path

    def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        async def fetch() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(self.dsn)
            try:
                return [dict(r) for r in await conn.fetch(sql, *args)]
            finally:
                await conn.close()

        return asyncio.run(fetch())

    def state_of(self, name: str) -> dict[str, Any] | None:
        rows = self.query("SELECT state FROM sagaflow_executions WHERE name = $1", name)
        return json.loads(rows[0]["state"]) if rows else None

    def phase_of(self, name: str) -> str | None:
        state = self.state_of(name)
        return None if state is None else str(state["phase"])

    def wait_for(self, what: Callable[[], bool], bg: Background | None = None) -> None:
        deadline = time.monotonic() + DEADLINE
        while not what():
            if bg is not None and bg.proc.poll() is not None:
                raise AssertionError(f"sagaflow run ended first: {bg.stderr()[-3000:]}")
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)


class Background:
    def __init__(self, proc: subprocess.Popen[str], out: Path, err: Path) -> None:
        self.proc = proc
        self._out = out
        self._err = err

    def stderr(self) -> str:
        return self._err.read_text()

    def finish(self, timeout: float = DEADLINE) -> tuple[int, dict[str, Any], str]:
        code = self.proc.wait(timeout=timeout)
        return code, listing(self._out.read_text()), self.stderr()


@pytest.fixture
def flows(pg_database: str, tmp_path: Path) -> Flows:
    return Flows(pg_database, tmp_path)


def listing(stdout: str) -> dict[str, Any]:
    items = json.loads(stdout)["items"] if stdout.strip() else []
    return {i["metadata"]["name"]: i["status"] for i in items}


def manifest(*docs: str) -> str:
    return "\n---\n".join(f"apiVersion: sagaflow.io/v1alpha1\n{d.strip()}" for d in docs)


def workflow(name: str, steps: str, spec: str = "") -> str:
    return f"kind: Workflow\nmetadata: {{name: {name}}}\nspec:\n{spec}  steps:\n{steps}"


def execution(name: str, wf: str, input: Any = None, spec: str = "") -> str:
    body = json.dumps(input or {})
    return (
        f"kind: Execution\nmetadata: {{name: {name}}}\n"
        f"spec: {{workflowRef: {{name: {wf}}}, input: {body}{spec}}}"
    )


def steps_by_name(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in status["steps"]}


def started(calls: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [
        c for c in calls if c["event"] == "start" and all(c.get(k) == v for k, v in match.items())
    ]


def most_in_flight(calls: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> int:
    """The most calls between their start and end at once, in log order (`key` says
    which start and end belong together)."""
    open_: set[Any] = set()
    most = 0
    for c in calls:
        if c["event"] == "start":
            open_.add(key(c))
            most = max(most, len(open_))
        elif c["event"] == "end":
            open_.discard(key(c))
    return most


# ------------------------------------------------------------------------------ when

WHEN = manifest(
    workflow(
        "branchy",
        """
  - {name: notify, type: flow.work, when: '${{ input.notify }}', input: {echo: hello}}
  - {name: after, type: flow.work, dependsOn: [notify],
     input: {echo: '${{ steps.notify.output.echo }}'}}
""",
    ),
    execution("when-off", "branchy", {"notify": False}),
    execution("when-on", "branchy", {"notify": True}),
)


@pytest.mark.timeout(90)
def test_a_branch_skipped_by_when_is_never_called_and_its_dependent_reads_null(
    flows: Flows,
) -> None:
    code, status, err = flows.run(flows.write("when.yaml", WHEN))

    assert code == 0, err
    assert {n: s["phase"] for n, s in status.items()} == {
        "when-off": "Completed",
        "when-on": "Completed",
    }
    off = steps_by_name(status["when-off"])
    assert off["notify"]["phase"] == "Skipped"
    assert off["notify"]["attempts"] == 0
    assert off["notify"]["reason"] == "when ${{ input.notify }} gave false"
    assert [c["step"] for c in started(flows.of("when-off"))] == ["after"]
    assert started(flows.of("when-off"))[0]["input"] == {"echo": None}
    assert off["after"]["output"] == {"step": "after", "echo": None}
    # The same workflow with the condition true calls it and passes its output on.
    on = flows.of("when-on")
    assert [c["step"] for c in started(on)] == ["notify", "after"]
    assert started(on, step="after")[0]["input"] == {"echo": "hello"}


# --------------------------------------------------------------------------- forEach

FAN_SIZE = 1000


def fan_out(name: str, more: str = "", item_input: str = "") -> str:
    return workflow(
        name,
        f"""
  - name: each
    type: flow.work
    forEach: '${{{{ input.items }}}}'
{more}    input: {{index: '${{{{ index }}}}', item: '${{{{ item }}}}'{item_input}}}
""",
    )


@pytest.mark.timeout(120)
def test_a_thousand_items_run_once_each_at_most_max_parallel_at_once(flows: Flows) -> None:
    file = flows.write(
        "fan.yaml",
        manifest(
            fan_out("fan", "    maxParallel: 10\n", ", sleep: 0.005"),
            execution("fan-1", "fan", {"items": [f"i{i}" for i in range(FAN_SIZE)]}),
        ),
    )

    code, status, err = flows.run(file)

    assert code == 0, err
    assert status["fan-1"]["phase"] == "Completed"
    each = steps_by_name(status["fan-1"])["each"]
    assert each["items"] == {"total": FAN_SIZE, "Succeeded": FAN_SIZE}
    assert each["output"] == [{"index": i} for i in range(FAN_SIZE)]
    calls = flows.of("fan-1")
    starts = Counter(c["index"] for c in started(calls))
    assert starts == Counter(range(FAN_SIZE))  # every item called exactly once
    assert [c["input"]["item"] for c in sorted(started(calls), key=lambda c: c["index"])] == [
        f"i{i}" for i in range(FAN_SIZE)
    ]
    most = most_in_flight(calls, lambda c: c["index"])
    print(f"most items in flight at once: {most} (maxParallel 10)")
    assert 1 < most <= 10


FAILURES = manifest(
    fan_out("tolerant", "    toleratedFailures: 2\n", ", failAt: '${{ input.failAt }}'"),
    fan_out(
        "undoable",
        "    toleratedFailures: 2\n"
        "    compensate: {type: flow.undo,"
        " input: {index: '${{ index }}', saw: '${{ steps.each.output }}'}}\n",
        ", failAt: '${{ input.failAt }}'",
    ),
    workflow(
        "undoable-then",
        """
  - name: each
    type: flow.work
    forEach: '${{ input.items }}'
    input: {index: '${{ index }}'}
    compensate: {type: flow.undo, input: {index: '${{ index }}', saw: '${{ steps.each.output }}'}}
  - {name: boom, type: flow.work, dependsOn: [each], input: {fail: true}}
""",
    ),
    execution("tolerated", "tolerant", {"items": list(range(5)), "failAt": [1, 3]}),
    execution("intolerable", "tolerant", {"items": list(range(5)), "failAt": [0, 2, 4]}),
    execution("intolerable-undone", "undoable", {"items": list(range(5)), "failAt": [0, 2, 4]}),
    execution("undone-later", "undoable-then", {"items": list(range(4))}),
)


@pytest.mark.timeout(90)
def test_tolerated_and_intolerable_item_failures_and_per_item_compensation(flows: Flows) -> None:
    code, status, err = flows.run(flows.write("failures.yaml", FAILURES))

    assert code == 1, err
    assert {n: s["phase"] for n, s in status.items()} == {
        "tolerated": "Completed",
        "intolerable": "Failed",
        "intolerable-undone": "Compensated",
        "undone-later": "Compensated",
    }
    tolerated = steps_by_name(status["tolerated"])["each"]
    assert tolerated["output"] == [{"index": 0}, None, {"index": 2}, None, {"index": 4}]
    assert tolerated["items"] == {"total": 5, "Succeeded": 3, "Failed": 2}

    for name in ("intolerable", "intolerable-undone"):
        each = steps_by_name(status[name])["each"]
        assert each["error"]["type"] == "ItemsFailed", each
        assert status[name]["error"]["step"] == "each"
    assert not [c for c in flows.of("intolerable") if c["undo"]]  # nothing to undo with

    # Each item that succeeded is undone exactly once, reading its own output; failed
    # items are not undone.
    for name, done in (("intolerable-undone", [1, 3]), ("undone-later", [0, 1, 2, 3])):
        undos = started(flows.of(name), undo=True)
        assert sorted(c["index"] for c in undos) == done, name
        assert all(c["input"]["saw"] == {"index": c["index"]} for c in undos)
        assert len({c["key"] for c in undos}) == len(done)
        each = steps_by_name(status[name])["each"]
        assert each["phase"] == "Compensated", each
    later = flows.of("undone-later")
    boom_end = next(c["t"] for c in later if c["step"] == "boom" and c["event"] == "end")
    assert all(c["t"] > boom_end for c in started(later, undo=True))


# --------------------------------------------------------------------------- children

CHILDREN = manifest(
    workflow(
        "child-wf",
        """
  - {name: c1, type: flow.work, input: {echo: '${{ input.x }}', fail: '${{ input.fail }}'},
     compensate: {type: flow.undo}}
""",
        "  output: {made: '${{ steps.c1.output.echo }}'}\n",
    ),
    workflow(
        "parent-wf",
        """
  - {name: prep, type: flow.work, compensate: {type: flow.undo}}
  - {name: kid, workflowRef: {name: child-wf}, dependsOn: [prep],
     input: {x: '${{ input.x }}', fail: '${{ input.childFails }}'}}
  - {name: later, type: flow.work, dependsOn: [kid],
     input: {fail: '${{ input.laterFails }}', echo: '${{ steps.kid.output }}'}}
""",
    ),
    execution("p-ok", "parent-wf", {"x": 7, "childFails": False, "laterFails": False}),
    execution("p-childfail", "parent-wf", {"x": 8, "childFails": True, "laterFails": False}),
    execution("p-undo", "parent-wf", {"x": 9, "childFails": False, "laterFails": True}),
)


@pytest.mark.timeout(90)
def test_child_workflows_succeed_fail_and_are_compensated(flows: Flows) -> None:
    code, status, err = flows.run(flows.write("children.yaml", CHILDREN))

    assert code == 1, err
    assert {n: s["phase"] for n, s in status.items()} == {
        "p-ok": "Completed",
        "p-childfail": "Compensated",
        "p-undo": "Compensated",
    }
    children = {
        r["parent"]: r
        for r in flows.query(
            "SELECT execution_id, name, phase, state, state->'parent'->>'name' AS parent "
            "FROM sagaflow_executions WHERE state->'parent' IS NOT NULL"
        )
    }
    assert sorted(children) == ["p-childfail", "p-ok", "p-undo"]
    for parent, child in children.items():
        history = flows.query(
            "SELECT kind FROM sagaflow_history WHERE execution_id = $1", child["execution_id"]
        )
        assert history, f"the child of {parent} has no history of its own"
        assert json.loads(child["state"])["parent"]["step"] == "kid"

    # Succeeded: the parent step's output is the child's output.
    ok = steps_by_name(status["p-ok"])
    child_ok = children["p-ok"]
    assert child_ok["phase"] == "Completed"
    assert json.loads(child_ok["state"])["output"] == {"made": 7}
    assert ok["kid"]["output"] == {"made": 7}
    assert started(flows.of("p-ok"), step="later")[0]["input"]["echo"] == {"made": 7}

    # Failed: the parent step fails as ChildFailed, and the run is undone.
    failed = steps_by_name(status["p-childfail"])
    assert children["p-childfail"]["phase"] == "Failed"
    assert failed["kid"]["phase"] == "Failed"
    assert failed["kid"]["error"]["type"] == "ChildFailed"
    assert f"{children['p-childfail']['name']} ended Failed" in failed["kid"]["error"]["message"]
    assert status["p-childfail"]["error"]["step"] == "kid"
    assert [c["step"] for c in started(flows.of("p-childfail"), undo=True)] == ["prep"]

    # Compensated: a later step failed; the child's completed step is undone once (by
    # the child's own compensation), before the parent's earlier step.
    undo = steps_by_name(status["p-undo"])
    assert children["p-undo"]["phase"] == "Compensated"
    assert undo["kid"]["phase"] == "Compensated"
    child_undos = started(flows.of(children["p-undo"]["name"]), undo=True)
    assert [c["step"] for c in child_undos] == ["c1"]
    child_end = max(c["t"] for c in flows.of(children["p-undo"]["name"]) if c["undo"])
    prep_undo = started(flows.of("p-undo"), undo=True)
    assert [c["step"] for c in prep_undo] == ["prep"]
    assert child_end < prep_undo[0]["t"]


# ---------------------------------------------------------------------------- signals

APPROVALS = workflow(
    "approvals",
    """
  - {name: first, type: flow.work, input: {gate: '${{ input.gate }}'}}
  - {name: wait, type: sagaflow.waitForSignal, dependsOn: [first],
     input: {signal: approval, timeout: '${{ input.timeout }}'}}
  - {name: after, type: flow.work, dependsOn: [wait], input: {echo: '${{ steps.wait.output }}'}}
""",
    """  signals:
    - name: approval
      schema:
        type: object
        required: [approved]
        properties: {approved: {type: boolean}}
""",
)

SIGNALS = manifest(
    APPROVALS,
    execution("sig-main", "approvals", {"timeout": "5m"}),
    execution("sig-early", "approvals", {"gate": "open-early"}),
    execution("sig-timeout", "approvals", {"timeout": "1s"}),
    execution("sig-corr", "approvals", {}, ", correlationKey: order-77"),
)


def exists_now(flows: Flows, name: str) -> Callable[[], bool]:
    return lambda: flows.state_of(name) is not None


@pytest.mark.timeout(120)
def test_signals_through_the_cli(flows: Flows) -> None:
    with flows.background(flows.write("signals.yaml", SIGNALS)) as bg:
        # Retry the CLI until the execution exists (it says "no execution" until then).
        deadline = time.monotonic() + DEADLINE
        while (
            sent := flows.signal(
                "sig-early", "approval", "--data", '{"approved": false}', "--id", "e1"
            )
        ).returncode == 2:
            assert "no execution default/sig-early" in sent.stderr, sent.stderr
            assert time.monotonic() < deadline, "sig-early never appeared"
            assert bg.proc.poll() is None, bg.stderr()
        # Sent while `first` still blocks on its gate: kept for the wait.
        assert sent.returncode == 0, sent.stderr
        assert "kept until a step waits for it" in sent.stdout
        assert flows.phase_of("sig-early") == "Running"
        assert not started(flows.of("sig-early"), step="after")

        flows.wait_for(exists_now(flows, "sig-main"), bg)
        undeclared = flows.signal("sig-main", "nope", "--data", "{}")
        assert undeclared.returncode == 1, undeclared
        assert "does not declare it (declared: approval)" in undeclared.stderr
        bad = flows.signal("sig-main", "approval", "--data", '{"approved": "yes"}')
        assert bad.returncode == 1, bad
        assert "data.approved: 'yes' is not of type 'boolean'" in bad.stderr

        good = flows.signal("sig-main", "approval", "--data", '{"approved": true}', "--id", "s1")
        assert good.returncode == 0, good.stderr
        assert "accepted" in good.stdout
        again = flows.signal("sig-main", "approval", "--data", '{"approved": true}', "--id", "s1")
        assert again.returncode == 0, again.stderr
        assert "nothing to do" in again.stdout

        flows.wait_for(lambda: flows.phase_of("sig-main") == "Completed", bg)
        late = flows.signal("sig-main", "approval", "--data", '{"approved": true}', "--id", "s2")
        assert late.returncode == 1, late
        assert "the execution is Completed" in late.stderr

        flows.wait_for(exists_now(flows, "sig-corr"), bg)
        keyed = flows.signal(
            "approval",
            "--correlation-key",
            "order-77",
            "--workflow",
            "approvals",
            "--data",
            '{"approved": true, "by": "key"}',
            "--id",
            "c1",
        )
        assert keyed.returncode == 0, keyed.stderr

        flows.write("open-early", "")
        code, status, err = bg.finish()

    assert code == 1, err  # sig-timeout failed
    assert {n: s["phase"] for n, s in status.items()} == {
        "sig-main": "Completed",
        "sig-early": "Completed",
        "sig-timeout": "Failed",
        "sig-corr": "Completed",
    }
    for name, data in (
        ("sig-main", {"approved": True}),
        ("sig-early", {"approved": False}),
        ("sig-corr", {"approved": True, "by": "key"}),
    ):
        assert steps_by_name(status[name])["wait"]["output"] == data, name
        assert started(flows.of(name), step="after")[0]["input"] == {"echo": data}
    # The early signal was sent before the wait began; the wait took it when it began.
    early = flows.of("sig-early")
    assert [c["step"] for c in started(early)] == ["first", "after"]
    timed_out = steps_by_name(status["sig-timeout"])["wait"]
    assert timed_out["error"]["type"] == "SignalTimeout", timed_out
    assert not started(flows.of("sig-timeout"), step="after")


async def _send(dsn: str, *messages: OutgoingMessage) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    bus = PostgresBus(pool)
    try:
        await bus.send(messages)
    finally:
        await bus.close()
        await pool.close()


def signal_message(message_id: str, session: str, signal: SignalMessage) -> OutgoingMessage:
    return OutgoingMessage(
        queue=EVENTS_QUEUE, message_id=message_id, session_id=session, body=signal.encode()
    )


@pytest.mark.timeout(90)
def test_signal_messages_on_the_events_queue_complete_a_wait_or_are_dead_lettered(
    flows: Flows,
) -> None:
    file = flows.write("bus.yaml", manifest(APPROVALS, execution("bus-1", "approvals", {})))
    # Events whose receive is cut short come back after the lock duration: keep it short.
    flows.env["SAGAFLOW_LOCK_DURATION_SECONDS"] = "5"
    with flows.background(file) as bg:
        flows.wait_for(exists_now(flows, "bus-1"), bg)
        refused = SignalMessage(
            "default", "approval", {"approved": "yes"}, id="b0", execution="bus-1"
        )
        good = SignalMessage("default", "approval", {"approved": True}, id="b1", execution="bus-1")
        nobody = SignalMessage("default", "approval", {"approved": True}, execution="nobody")
        asyncio.run(
            _send(
                flows.dsn,
                # One session: received in this order, so the refusal is the schema's.
                signal_message("ext-bad-1", "ext/bus-1", refused),
                signal_message("ext-good-1", "ext/bus-1", good),
                signal_message("ext-nobody-1", "ext/nobody", nobody),
            )
        )
        code, status, err = bg.finish()

    assert code == 0, err
    assert status["bus-1"]["phase"] == "Completed"
    assert steps_by_name(status["bus-1"])["wait"]["output"] == {"approved": True}
    letters = {
        r["message_id"]: r
        for r in flows.query(
            "SELECT message_id, reason, description FROM bus_dead_letters WHERE queue = $1",
            EVENTS_QUEUE,
        )
    }
    assert sorted(letters) == ["ext-bad-1", "ext-nobody-1"], err[-3000:]
    assert letters["ext-bad-1"]["reason"] == "SignalRefused"
    assert "data.approved: 'yes' is not of type 'boolean'" in letters["ext-bad-1"]["description"]
    assert letters["ext-nobody-1"]["reason"] == "SignalRefused"
    assert "no execution default/nobody" in letters["ext-nobody-1"]["description"]


# -------------------------------------------------------------------- maxExecutions

LIMITED = manifest(
    workflow(
        "limited",
        "  - {name: work, type: flow.work, input: {sleep: 0.1}}\n",
        "  concurrency: {maxExecutions: 2}\n",
    ),
    *[execution(f"lim-{i}", "limited") for i in range(10)],
)


@pytest.mark.timeout(90)
def test_max_executions_runs_at_most_two_at_once_in_creation_order(flows: Flows) -> None:
    code, status, err = flows.run(flows.write("limited.yaml", LIMITED))

    assert code == 0, err
    names = [f"lim-{i}" for i in range(10)]
    assert {n: s["phase"] for n, s in status.items()} == dict.fromkeys(names, "Completed")
    calls = [c for c in flows.calls() if c["ex"].startswith("default/lim-")]
    assert Counter(c["ex"] for c in started(calls)) == Counter(f"default/{n}" for n in names)
    most = most_in_flight(calls, lambda c: c["ex"])
    print(f"most executions running at once: {most} (maxExecutions 2)")
    assert most <= 2
    # Creation order: when lim-k starts, at most one earlier run can still hold a
    # slot, so at least k-1 runs have ended.
    ended: set[str] = set()
    for c in calls:
        if c["event"] == "end":
            ended.add(c["ex"])
        else:
            k = int(c["ex"].rsplit("-", 1)[1])
            assert len(ended) >= k - 1, (c["ex"], sorted(ended))
    starts = [datetime.fromisoformat(status[n]["startedAt"]) for n in names]
    assert starts == sorted(starts)


# --------------------------------------------------------------------------- finally

AUDIT = (
    "  finally:\n"
    "    - {name: audit, type: flow.audit, input: {phase: '${{ execution.phase }}'%s}}\n"
)

FINALLY = manifest(
    workflow("fin-good", "  - {name: a, type: flow.work}\n", AUDIT % ""),
    workflow(
        "fin-bad",
        """
  - {name: a, type: flow.work, compensate: {type: flow.undo}}
  - {name: b, type: flow.work, dependsOn: [a], input: {fail: true}}
""",
        AUDIT % "",
    ),
    workflow("fin-broken", "  - {name: a, type: flow.work}\n", AUDIT % ", fail: true"),
    execution("fin-ok", "fin-good"),
    execution("fin-undone", "fin-bad"),
    execution("fin-failing", "fin-broken"),
)


@pytest.mark.timeout(90)
def test_finally_runs_once_after_success_and_after_compensation(flows: Flows) -> None:
    code, status, err = flows.run(flows.write("finally.yaml", FINALLY))

    assert code == 1, err  # fin-undone is Compensated
    assert {n: s["phase"] for n, s in status.items()} == {
        "fin-ok": "Completed",
        "fin-undone": "Compensated",
        "fin-failing": "Completed",
    }
    for name, phase in (
        ("fin-ok", "Completed"),
        ("fin-undone", "Compensated"),
        ("fin-failing", "Completed"),
    ):
        audits = started(flows.of(name), step="audit")
        assert [c["phase"] for c in audits] == [phase], name
    assert status["fin-ok"]["finally"] == "Succeeded"
    assert status["fin-undone"]["finally"] == "Succeeded"
    undone = flows.of("fin-undone")
    undo_end = max(c["t"] for c in undone if c["undo"] and c["event"] == "end")
    assert started(undone, step="audit")[0]["t"] > undo_end  # after the compensation
    # A failed finally step is recorded; the phase stays as the run ended.
    assert status["fin-failing"]["finally"] == "Failed"
    audit = steps_by_name(status["fin-failing"])["audit"]
    assert audit["phase"] == "Failed"
    assert audit["error"]["type"] == "AuditDown"


SLOW_FINALLY = manifest(
    workflow("fin-slow", "  - {name: a, type: flow.work}\n", AUDIT % ", gate: audit-open"),
    execution("fin-slow-1", "fin-slow"),
)


@pytest.mark.timeout(90)
def test_sagaflow_run_waits_for_finally_steps_still_running(flows: Flows) -> None:
    """The run's phase is Completed while its `finally` step still runs; the run is not
    at rest until that step is done (`ExecutionState.at_rest`), so `sagaflow run`
    neither reports it finished nor stops its runner under the step."""
    with flows.background(flows.write("slow.yaml", SLOW_FINALLY)) as bg:
        flows.wait_for(lambda: bool(started(flows.of("fin-slow-1"), step="audit")), bg)
        flows.wait_for(lambda: flows.phase_of("fin-slow-1") == "Completed", bg)
        # Long enough for `sagaflow run` to look at its executions a few times (it
        # looks at least every 5 s); it prints each execution as it comes to rest.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and "fin-slow-1: Completed" not in bg.stderr():
            time.sleep(0.05)
        reported = bg.stderr()
        flows.write("audit-open", "")
        code, status, err = bg.finish()
    state = flows.state_of("fin-slow-1")
    assert state is not None

    audit = steps_by_name(status["fin-slow-1"])["audit"]
    assert "fin-slow-1: Completed" not in reported, (
        "sagaflow run reported the execution at rest while its finally step ran; at exit "
        f"(code {code}) finally={status['fin-slow-1'].get('finally')}, audit={audit['phase']}, "
        f"stored finalizing={state.get('finalizing')}"
    )
    assert code == 0, err
    assert status["fin-slow-1"]["finally"] == "Succeeded"
    assert audit["phase"] == "Succeeded"
    assert state.get("finalizing") == "done"


# ---------------------------------------------------------------------- kill -9

KILLED_SIZE = 300


@pytest.mark.timeout(120)
def test_kill_9_mid_for_each_then_run_again_completes_every_item_once(flows: Flows) -> None:
    file = flows.write(
        "killed.yaml",
        manifest(
            fan_out("big", "    maxParallel: 20\n", ", sleep: 0.02, effect: true"),
            execution("kill-1", "big", {"items": list(range(KILLED_SIZE))}),
        ),
    )

    def mid_fan_out() -> bool:
        """~100 items ended and some are running (items run in waves of up to 20)."""
        events = Counter(c["event"] for c in flows.calls())
        return events["end"] >= 100 and events["start"] > events["end"]

    with flows.background(file) as bg:
        flows.wait_for(mid_fan_out, bg)
        bg.proc.send_signal(signal.SIGKILL)
        bg.proc.wait(timeout=30)
    before = flows.calls()
    state = flows.state_of("kill-1")
    assert state is not None
    [each] = [s for s in state["steps"] if s["name"] == "each"]
    recorded = {i for i, e in enumerate(each["items"]["entries"]) if e["phase"] == "Succeeded"}
    ended_before = sum(1 for c in before if c["event"] == "end")
    assert ended_before < KILLED_SIZE, "the run finished before the kill"

    code, status, err = flows.run(file)

    assert code == 0, err
    assert status["kill-1"]["phase"] == "Completed"
    step = steps_by_name(status["kill-1"])["each"]
    assert step["output"] == [{"index": i} for i in range(KILLED_SIZE)]
    assert step["items"] == {"total": KILLED_SIZE, "Succeeded": KILLED_SIZE}
    calls = flows.calls()
    after = calls[len(before) :]
    # A completed (recorded) item attempt is never run again.
    rerun = sorted({c["index"] for c in started(after)} & recorded)
    assert not rerun, f"items recorded before the kill ran again: {rerun}"
    # Every item's effect was applied once, under one attempt's key.
    effects = [c for c in calls if c["event"] == "effect"]
    assert Counter(c["index"] for c in effects) == Counter(range(KILLED_SIZE))
    keys_per_item: dict[int, set[str]] = {}
    for c in started(calls):
        keys_per_item.setdefault(c["index"], set()).add(c["key"])
    assert all(len(k) == 1 for k in keys_per_item.values()), {
        i: k for i, k in keys_per_item.items() if len(k) > 1
    }
    # Attempts cut short by the kill are delivered again under the same key.
    cut = {c["key"] for c in started(before)} - {c["key"] for c in before if c["event"] == "end"}
    again = Counter(c["key"] for c in started(after))
    assert all(again[k] == 1 for k in cut), {k: again[k] for k in cut}
    repeated = sum(n - 1 for n in Counter(c["key"] for c in started(calls)).values())
    repeats = sum(1 for c in calls if c["event"] == "repeat")
    print(
        f"kill -9 after {ended_before} item ends ({len(recorded)} recorded, {len(cut)} in "
        f"flight); handler calls repeated under the same key: {repeated}; "
        f"effects found applied already: {repeats}"
    )
