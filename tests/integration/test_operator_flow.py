"""Data flow and coordination through `sagaflow operator`, as a platform user runs them:
`when`, a 1,000-item forEach under `maxParallel`, tolerated and intolerable item
failures with per-item compensation, signals from the CLI, `concurrency.maxExecutions`
and `finally`.

The cluster is `test_operator`'s (the in-memory API server, an operator subprocess, a
fresh database) with a runner serving `flow_runners.py`, whose handlers log the start
and end of every call as JSON lines: what ran, how often and how much overlapped is
read from that log, never inferred from timing. Gate files hold a call while the test
acts. Everything the tests wait for is polled with a deadline (`wait_status`,
`wait_until`).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import kmock
import pytest
from operator_proc import Process, base_env, running
from test_operator import NS, Body, Cluster, condition, execution, phase_is, workflow
from tests.support.kube import (
    EVENTS,
    EXECUTIONS,
    WORKFLOWS,
    KubeClient,
    is_watch_of,
    running_api_server,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

RUNNERS = Path(__file__).with_name("flow_runners.py")
TERMINAL = ("Completed", "Failed", "Compensated", "Cancelled", "CompensationFailed")


@dataclass
class Sent:
    code: int
    stdout: str
    stderr: str


class Flow:
    """The cluster, the folder of gate files and the handlers' log."""

    def __init__(self, cluster: Cluster, files: Path, tmp: Path) -> None:
        self.cluster = cluster
        self.api = cluster.api
        self.files = files
        self.log = files / "calls.log"
        self.tmp = tmp

    async def start(self, name: str, steps: list[Body], *executions: Body, **spec: Any) -> None:
        """Apply the Workflow, wait until it is Ready (a version), then the Executions in
        order (each created before the next is sent)."""
        await self.cluster.apply(WORKFLOWS, workflow(name, steps, **spec))
        await self.cluster.wait_status(WORKFLOWS, name, lambda s: s.get("version") is not None)
        for body in executions:
            await self.cluster.apply(EXECUTIONS, body)

    async def status(
        self, name: str, predicate: Callable[[Body], bool], within: float = 30
    ) -> Body:
        body = await self.cluster.wait_status(EXECUTIONS, name, predicate, within=within)
        return dict(body["status"])

    def calls(self, name: str | None = None) -> list[dict[str, Any]]:
        """The log (every handler call's start and end), of one execution if named."""
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [c for c in lines if name is None or c["ex"] == f"{NS}/{name}"]

    def open(self, gate: str) -> None:
        (self.files / gate).touch()

    async def signal(self, *args: str) -> Sent:
        """`sagaflow signal ... -n NS` against the operator's database, as a person runs it."""
        env = base_env(self.cluster.dsn, self.tmp)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sagaflow.cli",
            "signal",
            *args,
            "-n",
            NS,
            env=env,
            cwd=self.tmp,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return Sent(proc.returncode, out.decode(), err.decode())

    async def history_order(self, names: list[str], kind: str) -> list[str]:
        """The executions, in the order of their first history row of this kind."""
        conn = await asyncpg.connect(self.cluster.dsn)
        try:
            rows = await conn.fetch(
                "SELECT e.name, min(h.seq) AS seq FROM sagaflow_history h "
                "JOIN sagaflow_executions e USING (execution_id) "
                "WHERE e.namespace = $1 AND e.name = ANY($2::text[]) AND h.kind = $3 "
                "GROUP BY e.name ORDER BY seq",
                NS,
                names,
                kind,
            )
        finally:
            await conn.close()
        return [r["name"] for r in rows]

    def events(self, name: str) -> list[Body]:
        """Every Event on the Execution, whoever posted it (the mirror, kopf)."""
        return [e for e in self.api.bodies(EVENTS) if e["involvedObject"].get("name") == name]


@pytest.fixture
async def flow(pg_database: str, tmp_path: Path) -> AsyncIterator[Flow]:
    async with running_api_server() as api, KubeClient(api.url) as client:
        cluster = Cluster(api, client, pg_database, tmp_path)
        files = tmp_path / "files"
        files.mkdir()
        (files / "calls.log").touch()
        env = {**cluster.runner.env, "FLOW_LOG": str(files / "calls.log"), "FLOW_DIR": str(files)}
        args = ["runner", "--module", str(RUNNERS)]
        cluster.runner = Process("runner", args, env, tmp_path / "runner.log")
        async with running(cluster.operator, cluster.runner):
            await api.wait_for_request(is_watch_of(EXECUTIONS), within=30)
            yield Flow(cluster, files, tmp_path)


def run_of(name: str, wf: str, input: Body | None = None, **spec: Any) -> Body:
    return execution(name, wf, input=input or {}, **spec)


def steps_by_name(status: Body) -> dict[str, Body]:
    return {s["name"]: s for s in status.get("steps", ())}


def started(calls: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [
        c for c in calls if c["event"] == "start" and all(c.get(k) == v for k, v in match.items())
    ]


def most_in_flight(calls: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> int:
    """The most calls between their start and end at once, in log order."""
    open_: set[Any] = set()
    most = 0
    for c in calls:
        if c["event"] == "start":
            open_.add(key(c))
            most = max(most, len(open_))
        elif c["event"] == "end":
            open_.discard(key(c))
    return most


def most_overlapping(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals holding at once (one that ends when another starts does not
    overlap it: a slot is handed over in the finishing transaction)."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = most = 0
    for _, delta in edges:  # at equal times -1 sorts first
        now += delta
        most = max(most, now)
    return most


def when_(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def ready_reason(status: Body) -> str | None:
    """The Ready condition's reason, None before there is one."""
    found = [c for c in status.get("conditions", ()) if c.get("type") == "Ready"]
    return found[0].get("reason") if found else None


def reasons_of(flow: Flow, name: str) -> list[str]:
    return [e["reason"] for e in flow.cluster.events_of(name)]


# ------------------------------------------------------------------------------ when


async def test_a_branch_skipped_by_when_is_shown_skipped_with_its_reason(flow: Flow) -> None:
    steps = [
        {
            "name": "notify",
            "type": "flow.work",
            "when": "${{ input.notify }}",
            "input": {"echo": "hello"},
        },
        {
            "name": "after",
            "type": "flow.work",
            "dependsOn": ["notify"],
            "input": {"echo": "${{ steps.notify.output.echo }}"},
        },
    ]
    off, on = (
        run_of("when-off", "branchy", {"notify": False}),
        run_of("when-on", "branchy", {"notify": True}),
    )
    await flow.start("branchy", steps, off, on)

    status = await flow.status("when-off", phase_is(*TERMINAL))
    assert status["phase"] == "Completed", status
    notify = steps_by_name(status)["notify"]
    assert notify["phase"] == "Skipped"
    assert notify["attempts"] == 0
    assert notify["reason"] == "when ${{ input.notify }} gave false"
    after = steps_by_name(status)["after"]
    assert after["phase"] == "Succeeded"
    assert after["output"] == {"step": "after", "echo": None}  # a skipped output reads null
    assert [c["step"] for c in started(flow.calls("when-off"))] == ["after"]

    await flow.api.wait_until(lambda: "ExecutionCompleted" in reasons_of(flow, "when-off"))
    skipped = [e for e in flow.cluster.events_of("when-off") if e["reason"] == "StepSkipped"]
    assert len(skipped) == 1, skipped
    assert skipped[0]["type"] == "Normal"
    assert "step notify skipped: when ${{ input.notify }} gave false" in skipped[0]["message"]
    assert skipped[0]["involvedObject"]["kind"] == "Execution"

    # The same workflow with the condition true runs the branch and passes its output on.
    status = await flow.status("when-on", phase_is(*TERMINAL))
    assert status["phase"] == "Completed", status
    assert steps_by_name(status)["notify"]["phase"] == "Succeeded"
    assert "reason" not in steps_by_name(status)["notify"]
    assert steps_by_name(status)["after"]["output"] == {"step": "after", "echo": "hello"}
    assert [c["step"] for c in started(flow.calls("when-on"))] == ["notify", "after"]
    await flow.api.wait_until(lambda: "ExecutionCompleted" in reasons_of(flow, "when-on"))
    assert "StepSkipped" not in reasons_of(flow, "when-on")


# --------------------------------------------------------------------------- forEach

FAN_SIZE = 1000


def each(more: Body | None = None, **item_input: Any) -> Body:
    return {
        "name": "each",
        "type": "flow.work",
        "forEach": "${{ input.items }}",
        **(more or {}),
        "input": {"index": "${{ index }}", **item_input},
    }


async def test_a_thousand_items_at_most_ten_at_once_keep_status_and_events_small(
    flow: Flow,
) -> None:
    steps = [each({"maxParallel": 10}, item="${{ item }}", sleep=0.005)]
    items = [f"i{i}" for i in range(FAN_SIZE)]
    await flow.start("fan", steps, run_of("fan-1", "fan", {"items": items}))

    biggest = 0

    def done(status: Body) -> bool:
        nonlocal biggest
        biggest = max(biggest, len(json.dumps(status)))
        return status.get("phase") in TERMINAL

    status = await flow.status("fan-1", done, within=75)
    assert status["phase"] == "Completed", status
    step = steps_by_name(status)["each"]
    assert step["phase"] == "Succeeded"
    assert step["items"] == {"total": FAN_SIZE, "Succeeded": FAN_SIZE}
    # 1,000 outputs are too big for the object's status: left out, and said so.
    assert step.get("outputTruncated") is True or "outputRef" in step, step
    assert "output" not in step

    calls = flow.calls("fan-1")
    starts = Counter(c["index"] for c in started(calls))
    assert starts == Counter(range(FAN_SIZE))  # every item called exactly once
    assert sorted((c["index"], c["input"]["item"]) for c in started(calls)) == list(
        enumerate(items)
    )
    most = most_in_flight(calls, lambda c: c["index"])

    await flow.api.wait_until(lambda: "ExecutionCompleted" in reasons_of(flow, "fan-1"))
    mirrored = flow.cluster.events_of("fan-1")
    every = flow.events("fan-1")
    patches = sum(
        1
        for r in list(flow.api._requests)
        if r.resource == EXECUTIONS and r.name == "fan-1" and r.action == kmock.action.UPDATE
    )
    size = len(json.dumps(status))
    print(
        f"\nforEach {FAN_SIZE} items: most in flight {most} (maxParallel 10); final status "
        f"{size} bytes (largest seen {biggest}); Events on the Execution: {len(every)} "
        f"({len(mirrored)} from history: {Counter(e['reason'] for e in mirrored)}); "
        f"writes to the object: {patches}"
    )
    assert 1 < most <= 10
    assert size < 8 * 1024, status
    assert biggest < 8 * 1024
    assert not [e for e in mirrored if e["reason"].startswith("Item")]
    assert len(every) <= 20, Counter(e["reason"] for e in every)


async def test_tolerated_and_intolerable_item_failures_and_per_item_compensation(
    flow: Flow,
) -> None:
    fail_at = {"failAt": "${{ input.failAt }}"}
    undo = {
        "compensate": {
            "type": "flow.undo",
            "input": {"index": "${{ index }}", "saw": "${{ steps.each.output }}"},
        }
    }
    await flow.start("tolerant", [each({"toleratedFailures": 2}, **fail_at)])
    await flow.start("undoable", [each({"toleratedFailures": 2, **undo}, **fail_at)])
    boom = {"name": "boom", "type": "flow.work", "dependsOn": ["each"], "input": {"fail": True}}
    await flow.start("undoable-then", [each(undo), boom])
    for body in (
        run_of("tolerated", "tolerant", {"items": list(range(5)), "failAt": [1, 3]}),
        run_of("intolerable", "tolerant", {"items": list(range(5)), "failAt": [0, 2, 4]}),
        run_of("intolerable-undone", "undoable", {"items": list(range(5)), "failAt": [0, 2, 4]}),
        run_of("undone-later", "undoable-then", {"items": list(range(4))}),
    ):
        await flow.cluster.apply(EXECUTIONS, body)

    ended = {
        name: await flow.status(name, phase_is(*TERMINAL))
        for name in ("tolerated", "intolerable", "intolerable-undone", "undone-later")
    }
    assert {n: s["phase"] for n, s in ended.items()} == {
        "tolerated": "Completed",
        "intolerable": "Failed",
        "intolerable-undone": "Compensated",
        "undone-later": "Compensated",
    }, ended

    # Two failures tolerated: the step succeeds, null outputs for the failed items.
    tolerated = steps_by_name(ended["tolerated"])["each"]
    assert tolerated["phase"] == "Succeeded"
    assert tolerated["items"] == {"total": 5, "Succeeded": 3, "Failed": 2}
    assert tolerated["output"] == [{"index": 0}, None, {"index": 2}, None, {"index": 4}]
    await flow.api.wait_until(lambda: "ExecutionCompleted" in reasons_of(flow, "tolerated"))
    item_failures = [e for e in flow.cluster.events_of("tolerated") if e["reason"] == "ItemFailed"]
    assert len(item_failures) == 2 and {e["type"] for e in item_failures} == {"Warning"}

    # Three is one too many: the step fails, and with nothing to undo the run is Failed.
    for name in ("intolerable", "intolerable-undone"):
        step = steps_by_name(ended[name])["each"]
        assert step["error"]["type"] == "ItemsFailed", step
        assert ended[name]["error"]["step"] == "each"
    assert not [c for c in flow.calls("intolerable") if c["undo"]]
    assert steps_by_name(ended["intolerable"])["each"]["phase"] == "Failed"

    # Each item that succeeded is undone exactly once, reading its own output; failed
    # items are not undone.
    for name, succeeded in (("intolerable-undone", [1, 3]), ("undone-later", [0, 1, 2, 3])):
        undos = started(flow.calls(name), undo=True)
        assert sorted(c["index"] for c in undos) == succeeded, name
        assert Counter(c["index"] for c in undos) == Counter(succeeded), name
        assert all(c["input"]["saw"] == {"index": c["index"]} for c in undos), undos
        assert len({c["key"] for c in undos}) == len(succeeded)
        step = steps_by_name(ended[name])["each"]
        assert step["phase"] == "Compensated", step
        assert step["items"].get("Compensated") == len(succeeded), step
        assert step["items"]["total"] == len(succeeded) + step["items"].get("Failed", 0)
        await flow.api.wait_until(lambda n=name: "ExecutionCompensated" in reasons_of(flow, n))
    later = flow.calls("undone-later")
    boom_end = next(c["t"] for c in later if c["step"] == "boom" and c["event"] == "end")
    assert all(c["t"] > boom_end for c in started(later, undo=True))
    assert steps_by_name(ended["undone-later"])["boom"]["phase"] == "Failed"


# ---------------------------------------------------------------------------- signals

APPROVAL = [
    {"name": "first", "type": "flow.work", "input": {"gate": "${{ input.gate }}"}},
    {
        "name": "wait",
        "type": "sagaflow.waitForSignal",
        "dependsOn": ["first"],
        "input": {"signal": "approval", "timeout": "${{ input.timeout }}"},
    },
    {
        "name": "after",
        "type": "flow.work",
        "dependsOn": ["wait"],
        "input": {"echo": "${{ steps.wait.output }}"},
    },
]
SIGNALS = [
    {
        "name": "approval",
        "schema": {
            "type": "object",
            "required": ["approved"],
            "properties": {"approved": {"type": "boolean"}},
        },
    }
]


async def test_signals_from_the_cli_complete_a_wait_early_or_late_once_or_time_out(
    flow: Flow,
) -> None:
    await flow.start(
        "approvals",
        APPROVAL,
        run_of("sig-main", "approvals", {"timeout": "5m"}),
        run_of("sig-early", "approvals", {"gate": "open-early", "timeout": "5m"}),
        run_of("sig-timeout", "approvals", {"timeout": "1s"}),
        signals=SIGNALS,
    )

    # After the wait began: accepted, and the wait's output is the data.
    await flow.status("sig-main", lambda s: s.get("currentSteps") == ["wait"])
    sent = await flow.signal("sig-main", "approval", "--data", '{"approved": true}', "--id", "m1")
    assert sent.code == 0, sent
    assert "accepted" in sent.stdout, sent
    status = await flow.status("sig-main", phase_is(*TERMINAL))
    assert status["phase"] == "Completed", status
    assert steps_by_name(status)["wait"]["phase"] == "Succeeded"
    assert steps_by_name(status)["wait"]["output"] == {"approved": True}
    assert steps_by_name(status)["after"]["output"] == {
        "step": "after",
        "echo": {"approved": True},
    }
    again = await flow.signal("sig-main", "approval", "--data", '{"approved": false}', "--id", "m1")
    assert again.code == 0, again
    assert "nothing to do" in again.stdout, again

    # Before the wait began (`first` holds on its gate): kept, then taken by the wait.
    # The same id again, with other data, is a no-op: the first data is delivered.
    await flow.status("sig-early", lambda s: s.get("currentSteps") == ["first"])
    early = await flow.signal(
        "sig-early", "approval", "--data", '{"approved": false}', "--id", "e1"
    )
    assert early.code == 0, early
    assert "kept until a step waits for it" in early.stdout, early
    duplicate = await flow.signal(
        "sig-early", "approval", "--data", '{"approved": true}', "--id", "e1"
    )
    assert duplicate.code == 0, duplicate
    assert "nothing to do" in duplicate.stdout, duplicate
    held = await flow.status("sig-early", lambda s: s.get("currentSteps") == ["first"])
    assert held["phase"] == "Running"
    assert steps_by_name(held)["wait"]["phase"] == "Pending"
    flow.open("open-early")
    status = await flow.status("sig-early", phase_is(*TERMINAL))
    assert status["phase"] == "Completed", status
    assert steps_by_name(status)["wait"]["output"] == {"approved": False}
    assert [c["step"] for c in started(flow.calls("sig-early"))] == ["first", "after"]
    assert started(flow.calls("sig-early"), step="after")[0]["input"] == {
        "echo": {"approved": False}
    }
    await flow.api.wait_until(lambda: "ExecutionCompleted" in reasons_of(flow, "sig-early"))
    assert reasons_of(flow, "sig-early").count("SignalReceived") == 1

    # Nobody signals: the wait fails after its timeout, as SignalTimeout.
    status = await flow.status("sig-timeout", phase_is(*TERMINAL))
    assert status["phase"] == "Failed", status
    wait = steps_by_name(status)["wait"]
    assert wait["phase"] == "Failed"
    assert wait["error"]["type"] == "SignalTimeout", wait
    assert status["error"]["type"] == "SignalTimeout", status
    assert status["error"]["step"] == "wait"
    assert not started(flow.calls("sig-timeout"), step="after")


# -------------------------------------------------------------------- maxExecutions


async def test_max_executions_two_of_ten_running_at_once_the_others_waiting(flow: Flow) -> None:
    names = [f"lim-{i}" for i in range(10)]
    steps = [{"name": "work", "type": "flow.work", "input": {"gate": "lim-open", "sleep": 0.2}}]
    await flow.start(
        "limited",
        steps,
        *(run_of(n, "limited") for n in names),
        concurrency={"maxExecutions": 2},
    )

    # Two run (held on the gate); the eight others wait, saying why.
    await flow.api.wait_until(lambda: len(started(flow.calls())) >= 2)
    waiting = []
    for name in names:
        status = await flow.status(
            name,
            lambda s: (
                s.get("phase") == "Running"
                or (s.get("phase") == "Pending" and ready_reason(s) == "Waiting")
            ),
        )
        if status["phase"] == "Pending":
            ready = condition(status, "Ready")
            assert ready["status"] == "False"
            assert "2 of 2 executions of workflow limited are running" in ready["message"]
            assert "concurrency.maxExecutions" in ready["message"]
            waiting.append(name)
    assert len(waiting) == 8, waiting
    assert len(started(flow.calls())) == 2

    flow.open("lim-open")
    ended = {n: await flow.status(n, phase_is(*TERMINAL)) for n in names}
    assert {n: s["phase"] for n, s in ended.items()} == dict.fromkeys(names, "Completed")

    calls = flow.calls()
    assert Counter(c["ex"] for c in started(calls)) == Counter(f"{NS}/{n}" for n in names)
    most = most_in_flight(calls, lambda c: c["ex"])
    spans = [(when_(s["startedAt"]), when_(s["finishedAt"])) for s in ended.values()]
    overlap = most_overlapping(spans)
    order = [c["ex"].split("/")[1] for c in started(calls)]
    print(
        f"\nmaxExecutions 2: most running at once {most} (handler log), {overlap} (status); "
        f"waited: {waiting}; start order: {order}"
    )
    assert most <= 2
    assert overlap <= 2
    # The waiting ones start in the order they were queued (their ExecutionWaiting).
    queued = await flow.history_order(waiting, "ExecutionWaiting")
    admitted = await flow.history_order(waiting, "ExecutionAdmitted")
    print(f"queued: {queued}; admitted: {admitted}")
    assert admitted == queued
    await flow.api.wait_until(lambda: "ExecutionCompleted" in reasons_of(flow, waiting[-1]))
    reasons = reasons_of(flow, waiting[-1])
    assert reasons.index("ExecutionWaiting") < reasons.index("ExecutionAdmitted")
    assert reasons.index("ExecutionAdmitted") < reasons.index("ExecutionStarted")


# --------------------------------------------------------------------------- finally

AUDIT = {"name": "audit", "type": "flow.audit", "input": {"phase": "${{ execution.phase }}"}}


async def test_finally_runs_after_success_and_after_compensation_leaving_the_phase(
    flow: Flow,
) -> None:
    good = [{"name": "a", "type": "flow.work"}]
    bad = [
        {"name": "a", "type": "flow.work", "compensate": {"type": "flow.undo"}},
        {"name": "b", "type": "flow.work", "dependsOn": ["a"], "input": {"fail": True}},
    ]
    await flow.start("fin-good", good, run_of("fin-ok", "fin-good"), **{"finally": [AUDIT]})
    await flow.start("fin-bad", bad, run_of("fin-undone", "fin-bad"), **{"finally": [AUDIT]})

    for name, outcome in (("fin-ok", "Completed"), ("fin-undone", "Compensated")):
        seen: list[tuple[str | None, str | None]] = []

        def finished(status: Body, seen: list[tuple[str | None, str | None]] = seen) -> bool:
            now = (status.get("phase"), status.get("finally"))
            if not seen or seen[-1] != now:
                seen.append(now)
            return status.get("finally") in ("Succeeded", "Failed")

        status = await flow.status(name, finished)
        assert status["finally"] == "Succeeded", status
        assert status["phase"] == outcome, status
        # Once the outcome was decided, the finally step never changed it.
        phases = [phase for phase, _ in seen]
        assert set(phases[phases.index(outcome) :]) == {outcome}, seen
        assert (outcome, "Running") in seen or (outcome, "Succeeded") == seen[0], seen
        audit = steps_by_name(status)["audit"]
        assert audit["phase"] == "Succeeded", audit
        assert audit["output"] == {"recorded": outcome}
        audits = started(flow.calls(name), step="audit")
        assert [c["phase"] for c in audits] == [outcome], name
        assert condition(status, "Succeeded")["reason"] == outcome
        await flow.api.wait_until(lambda n=name: "FinallyCompleted" in reasons_of(flow, n))
        reasons = reasons_of(flow, name)
        ended = f"Execution{outcome}"
        assert reasons.index(ended) < reasons.index("ExecutionFinalizing"), reasons
        assert reasons[-1] == "FinallyCompleted", reasons
        status = await flow.status(name, lambda s: s.get("finally") == "Succeeded")
        assert status["phase"] == outcome  # still, once everything has been mirrored

    undone = flow.calls("fin-undone")
    undo_end = max(c["t"] for c in undone if c["undo"] and c["event"] == "end")
    assert started(undone, step="audit")[0]["t"] > undo_end  # after the compensation
    assert steps_by_name(status)["a"]["phase"] == "Compensated"
