"""Signals, child workflows and forEach through `sagaflow run` over Service Bus.

`sagaflow run` with `SAGAFLOW_BUS=servicebus` against the AMQP test peer
(`tests/support/servicebus_peer`), state in the test's Postgres database
(`SAGAFLOW_DATABASE_URL`), the handlers of `flow_runners.py` in-process (every call a
JSON line in the log, so calls and undos are counted, never inferred from timing).

- Signals come from outside, as another system sends them: the real azure-servicebus
  SDK puts `Signal` messages on `sagaflow.events`; a refused one is dead-lettered
  (`SignalRefused`) and the orchestrator's dead-letter pass logs it, while the run
  keeps waiting for a good one.
- A child's end reaches its parent as a result event through the outbox relay and
  the events queue (the bus is not transactional), for a parent that completes and
  one that is compensated with its child.
- A forEach of 50 items, at most 5 at once, every item a command over the bus.

Each test ends with what a user would notice: nothing logged at ERROR, no traceback,
every queue drained (dead letters included) and no more AMQP connections than the
links the run keeps.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue
from operator_proc import ROOT, base_env
from test_servicebus_product import PLAIN, bus_env, drained, logged, most_connections, statuses
from tests.support.servicebus_peer import ServiceBusPeer, running_peer

from sagaflow.adapters.servicebus import topology_queues
from sagaflow.core.messages import EVENTS_QUEUE, attempt_id

pytestmark = pytest.mark.slow

RUNNERS = Path(__file__).with_name("flow_runners.py")
QUEUES = topology_queues(["flow"])  # sagaflow.events and steps.flow
DEADLINE = 40.0  # for any one condition a test waits for


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


class Flow:
    """One test's folder, database, handler log and peer, and `sagaflow run` over it."""

    def __init__(self, dsn: str, folder: Path, peer: ServiceBusPeer) -> None:
        self.dsn = dsn
        self.folder = folder
        self.peer = peer
        self.log = folder / "calls.log"
        self.log.touch()
        self.env = base_env(
            dsn, folder, **bus_env(peer), FLOW_LOG=str(self.log), FLOW_DIR=str(folder)
        )
        self._out = folder / "run.out"
        self._err = folder / "run.err"

    def write(self, name: str, text: str) -> Path:
        path = self.folder / name
        path.write_text(text)
        return path

    def args(self, file: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sagaflow.cli",
            "run",
            "-f",
            str(file),
            "--runners",
            str(RUNNERS),
            "--state-dir",
            str(self.folder / "state"),
            "-o",
            "json",
        ]

    def run(self, file: Path) -> tuple[int, dict[str, Any], str]:
        """`sagaflow run -f FILE -o json` to its end: exit code, statuses, stderr."""
        done = subprocess.run(
            self.args(file),
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=DEADLINE * 2,
            check=False,
        )
        return done.returncode, statuses(done.stdout), done.stderr

    @contextmanager
    def background(self, file: Path) -> Iterator[subprocess.Popen[str]]:
        """`sagaflow run` in the background, output to files; killed if left running."""
        with self._out.open("w") as stdout, self._err.open("w") as stderr:
            proc = subprocess.Popen(
                self.args(file), env=self.env, cwd=ROOT, stdout=stdout, stderr=stderr, text=True
            )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

    def stderr(self) -> str:
        return self._err.read_text(errors="replace")

    def finish(self, proc: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
        code = proc.wait(timeout=DEADLINE)
        return code, statuses(self._out.read_text()), self.stderr()

    def wait_for(self, what: Callable[[], bool], proc: subprocess.Popen[str], about: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not what():
            if proc.poll() is not None:
                raise AssertionError(f"sagaflow run ended first: {self.stderr()[-3000:]}")
            assert time.monotonic() < deadline, f"timed out waiting for {about}"
            time.sleep(0.05)

    # -- reading ----------------------------------------------------------------------

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def of(self, execution: str) -> list[dict[str, Any]]:
        return [c for c in self.calls() if c["ex"] == f"default/{execution}"]

    def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        async def fetch() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(self.dsn)
            try:
                return [dict(r) for r in await conn.fetch(sql, *args)]
            finally:
                await conn.close()

        return asyncio.run(fetch())

    def history(self, name: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT h.kind, h.step, h.message FROM sagaflow_history h "
            "JOIN sagaflow_executions e USING (execution_id) WHERE e.name = $1 ORDER BY h.seq",
            name,
        )

    def check_clean(self, err: str, *, extra_connections: int = 0) -> None:
        """Nothing at ERROR, no traceback, every queue drained, the links kept."""
        assert logged(err, "ERROR", "CRITICAL") == [], err[-5000:]
        assert drained(self.peer, QUEUES) == {}
        assert self.query("SELECT seq FROM sagaflow_outbox") == []
        opened = self.peer.connections_opened
        assert opened <= most_connections(QUEUES) + extra_connections, opened


@pytest.fixture
def flow(pg_database: str, tmp_path: Path) -> Iterator[Flow]:
    with running_peer(dict.fromkeys(QUEUES, PLAIN)) as peer:
        yield Flow(pg_database, tmp_path, peer)


def started(calls: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [
        c for c in calls if c["event"] == "start" and all(c.get(k) == v for k, v in match.items())
    ]


# ---------------------------------------------------------------------------- signals

SIGNALS = manifest(
    workflow(
        "approvals",
        """
  - {name: first, type: flow.work, input: {echo: begin}}
  - {name: wait, type: sagaflow.waitForSignal, dependsOn: [first],
     input: {signal: approval, timeout: 5m}}
  - {name: after, type: flow.work, dependsOn: [wait], input: {echo: '${{ steps.wait.output }}'}}
""",
        """  signals:
    - name: approval
      schema:
        type: object
        required: [approved]
        properties: {approved: {type: boolean}, by: {type: string}}
  output: {approval: '${{ steps.wait.output }}'}
""",
    ),
    execution("sb-sig", "approvals", {}, ", correlationKey: ORDER-77"),
)


def signal_body(key: str, data: Any, signal_id: str) -> str:
    """A Signal as an outside system writes it (`SignalMessage`'s format)."""
    return json.dumps(
        {
            "kind": "Signal",
            "namespace": "default",
            "workflow": "approvals",
            "correlationKey": key,
            "signal": "approval",
            "id": signal_id,
            "data": data,
        }
    )


def dead_letter_logged(err: str, message_id: str) -> bool:
    """The dead-letter pass's line for a refused signal (`faults._handle`)."""
    return f"signal {message_id} was refused (SignalRefused: " in err


@pytest.mark.timeout(90)
def test_a_signal_from_the_sdk_completes_a_wait_and_refused_ones_are_dead_lettered(
    flow: Flow,
) -> None:
    file = flow.write("signals.yaml", SIGNALS)
    client = ServiceBusClient.from_connection_string(flow.peer.connection_string)
    with flow.background(file) as proc, client:
        flow.wait_for(
            lambda: any(h["kind"] == "StepWaitingForSignal" for h in flow.history("sb-sig")),
            proc,
            "the wait to begin",
        )
        [waiting] = flow.query(
            "SELECT state->'steps' AS steps FROM sagaflow_executions WHERE name = 'sb-sig'"
        )
        wait_step = next(s for s in json.loads(waiting["steps"]) if s["name"] == "wait")
        assert wait_step["phase"] == "Running", wait_step

        dead_letters = ServiceBusSubQueue.DEAD_LETTER
        with (
            client.get_queue_sender(EVENTS_QUEUE) as sender,
            client.get_queue_receiver(EVENTS_QUEUE, sub_queue=dead_letters) as dlq,
        ):
            sender.send_messages(
                [
                    ServiceBusMessage(
                        signal_body("ORDER-77", {"approved": "yes"}, "bad-77"),
                        message_id="ext-bad-77",
                        content_type="application/json",
                    ),
                    ServiceBusMessage(
                        signal_body("ORDER-404", {"approved": True}, "nobody-404"),
                        message_id="ext-nobody-404",
                        content_type="application/json",
                    ),
                ]
            )
            # Both refused: dead-lettered by the consumer, then taken off the subqueue and
            # logged by the dead-letter pass (every few seconds). Peek while they are there.
            peeked: dict[str, Any] = {}

            def both_handled() -> bool:
                for m in dlq.peek_messages(max_message_count=10):
                    peeked[str(m.message_id)] = m
                err = flow.stderr()
                return all(dead_letter_logged(err, i) for i in ("ext-bad-77", "ext-nobody-404"))

            flow.wait_for(both_handled, proc, "the dead-letter pass to log both refusals")
            for message_id, letter in peeked.items():
                assert letter.dead_letter_reason == "SignalRefused", (message_id, letter)
            if "ext-bad-77" in peeked:
                description = peeked["ext-bad-77"].dead_letter_error_description
                assert "data.approved: 'yes' is not of type 'boolean'" in description
            print(f"dead letters seen by an SDK peek before the pass took them: {sorted(peeked)}")

            # Still waiting: the refusals changed nothing but the history.
            [row] = flow.query("SELECT phase FROM sagaflow_executions WHERE name = 'sb-sig'")
            assert row["phase"] == "Running"
            assert not started(flow.of("sb-sig"), step="after")

            sender.send_messages(
                ServiceBusMessage(
                    signal_body("ORDER-77", {"approved": True, "by": "ana"}, "good-77"),
                    message_id="ext-good-77",
                    content_type="application/json",
                )
            )
        code, status, err = flow.finish(proc)

    assert code == 0, err
    assert status["sb-sig"]["phase"] == "Completed", err
    data = {"approved": True, "by": "ana"}
    assert steps_by_name(status["sb-sig"])["wait"]["output"] == data
    assert status["sb-sig"]["output"] == {"approval": data}
    assert started(flow.of("sb-sig"), step="after")[0]["input"] == {"echo": data}

    # The refused one's reason is in the run's history and in the pass's log line; the
    # one for no execution only in the log.
    refusals = [h for h in flow.history("sb-sig") if h["kind"] == "SignalRefused"]
    assert [h["message"] for h in refusals] == [
        "signal approval refused: data.approved: 'yes' is not of type 'boolean'"
    ]
    assert "data.approved: 'yes' is not of type 'boolean'" in err
    assert "no unfinished execution of workflow default/approvals with correlation key" in err
    assert [h["kind"] for h in flow.history("sb-sig")].count("SignalReceived") == 1
    assert "Traceback" not in err
    # The SDK's sender and dead-letter receiver are two connections more.
    flow.check_clean(err, extra_connections=2)


# --------------------------------------------------------------------------- children

CHILDREN = manifest(
    workflow(
        "child-wf",
        """
  - {name: c1, type: flow.work, input: {echo: '${{ input.x }}'}, compensate: {type: flow.undo}}
""",
        "  output: {made: '${{ steps.c1.output.echo }}'}\n",
    ),
    workflow(
        "parent-wf",
        """
  - {name: prep, type: flow.work, compensate: {type: flow.undo}}
  - {name: kid, workflowRef: {name: child-wf}, dependsOn: [prep], input: {x: '${{ input.x }}'}}
  - {name: later, type: flow.work, dependsOn: [kid],
     input: {fail: '${{ input.laterFails }}', echo: '${{ steps.kid.output }}'}}
""",
        "  output: {fromChild: '${{ steps.kid.output.made }}'}\n",
    ),
    execution("p-ok", "parent-wf", {"x": 7, "laterFails": False}),
    execution("p-undo", "parent-wf", {"x": 9, "laterFails": True}),
)


@pytest.mark.timeout(90)
def test_child_workflows_complete_and_are_compensated_over_service_bus(flow: Flow) -> None:
    code, status, err = flow.run(flow.write("children.yaml", CHILDREN))

    assert code == 1, err  # p-undo did not complete
    assert {n: s["phase"] for n, s in status.items()} == {
        "p-ok": "Completed",
        "p-undo": "Compensated",
    }, err
    children = {
        r["parent"]: r
        for r in flow.query(
            "SELECT e.execution_id, e.name, e.phase, e.state, p.name AS parent, "
            "p.execution_id AS parent_id FROM sagaflow_children c "
            "JOIN sagaflow_executions e ON e.execution_id = c.execution_id "
            "JOIN sagaflow_executions p ON p.execution_id = c.parent_id"
        )
    }
    assert sorted(children) == ["p-ok", "p-undo"]

    # Completed: the parent's step has the child's output, and passes it on.
    ok = steps_by_name(status["p-ok"])
    assert children["p-ok"]["phase"] == "Completed"
    assert json.loads(children["p-ok"]["state"])["output"] == {"made": 7}
    assert ok["kid"]["phase"] == "Succeeded"
    assert ok["kid"]["output"] == {"made": 7}
    assert status["p-ok"]["output"] == {"fromChild": 7}
    assert started(flow.of("p-ok"), step="later")[0]["input"]["echo"] == {"made": 7}

    # Compensated: `later` failed; the child was compensated (its c1 undone exactly
    # once, by its own handler), then the parent's earlier step.
    undo = steps_by_name(status["p-undo"])
    assert undo["later"]["phase"] == "Failed"
    assert undo["kid"]["phase"] == "Compensated"
    assert undo["prep"]["phase"] == "Compensated"
    child = children["p-undo"]
    assert child["phase"] == "Compensated"
    child_calls = flow.of(child["name"])
    child_undos = started(child_calls, undo=True)
    assert [c["step"] for c in child_undos] == ["c1"], child_calls
    prep_undos = started(flow.of("p-undo"), undo=True)
    assert [c["step"] for c in prep_undos] == ["prep"]
    child_undo_end = max(c["t"] for c in child_calls if c["undo"] and c["event"] == "end")
    assert child_undo_end < prep_undos[0]["t"]

    # Each child's ends reached its parent over the events queue: the parent consumed
    # them as bus messages, through its inbox (the forward end, and the undo's).
    consumed = {r["message_id"] for r in flow.query("SELECT message_id FROM sagaflow_inbox")}
    for parent, undone in (("p-ok", False), ("p-undo", False), ("p-undo", True)):
        result_id = attempt_id(children[parent]["parent_id"], "kid", 1, undone) + "/result"
        assert result_id in consumed, (result_id, sorted(consumed))
    assert "Traceback" not in err
    flow.check_clean(err)


# ---------------------------------------------------------------------------- forEach

FAN = 50
FAN_OUT = manifest(
    workflow(
        "fan",
        """
  - name: each
    type: flow.work
    forEach: '${{ input.items }}'
    maxParallel: 5
    input: {index: '${{ index }}', item: '${{ item }}', sleep: 0.02}
""",
        "  output: {all: '${{ steps.each.output }}'}\n",
    ),
    execution("fan-1", "fan", {"items": [f"i{i}" for i in range(FAN)]}),
)


def most_in_flight(calls: list[dict[str, Any]]) -> int:
    open_: set[Any] = set()
    most = 0
    for c in calls:
        if c["event"] == "start":
            open_.add(c["index"])
            most = max(most, len(open_))
        elif c["event"] == "end":
            open_.discard(c["index"])
    return most


@pytest.mark.timeout(90)
def test_a_for_each_of_fifty_items_five_at_a_time_over_service_bus(flow: Flow) -> None:
    code, status, err = flow.run(flow.write("fan.yaml", FAN_OUT))

    assert code == 0, err
    assert status["fan-1"]["phase"] == "Completed", err
    each = steps_by_name(status["fan-1"])["each"]
    assert each["items"] == {"total": FAN, "Succeeded": FAN}
    expected = [{"index": i} for i in range(FAN)]
    assert each["output"] == expected
    assert status["fan-1"]["output"] == {"all": expected}
    calls = flow.of("fan-1")
    assert Counter(c["index"] for c in started(calls)) == Counter(range(FAN))  # once each
    assert {c["index"]: c["input"]["item"] for c in started(calls)} == {
        i: f"i{i}" for i in range(FAN)
    }
    most = most_in_flight(calls)
    print(f"most items in flight at once: {most} (maxParallel 5)")
    assert 1 < most <= 5
    assert "Traceback" not in err
    flow.check_clean(err)
