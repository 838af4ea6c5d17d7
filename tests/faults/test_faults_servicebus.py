"""The fault run of the reliability issue over Service Bus (`SAGAFLOW_BUS=servicebus`).

The broker is the AMQP test peer (`tests/support/servicebus_peer`) on a thread of this
process; `sagaflow run` and `sagaflow runner` are processes of their own that talk to
it through the real SDK. Locks are short (LOCK seconds), so what a process killed with
-9 held comes back quickly. Each test counts: lost, stuck (the run never ends),
successes applied twice, and where it applies, attempts run twice at once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from harness import (
    Scene,
    executions,
    overlapping,
    scene,
    successes_applied,
    wait_until,
    workflow,
)
from tests.support.servicebus_peer import QueueSpec, ServiceBusPeer, running_peer

from sagaflow.core.messages import EVENTS_QUEUE, StepResult

pytestmark = pytest.mark.timeout(180)

COMMANDS = "steps.fault"
LOCK = 2.0
MAX_DELIVERIES = 10


@contextmanager
def bus() -> Iterator[tuple[ServiceBusPeer, Scene, dict[str, str]]]:
    """A peer with sagaflow's two queues, a scene, and the environment that points at it."""
    spec = QueueSpec(
        lock_duration=LOCK, max_delivery_count=MAX_DELIVERIES, requires_duplicate_detection=True
    )
    with running_peer({EVENTS_QUEUE: spec, COMMANDS: spec}) as peer, scene() as s:
        env = {
            "SAGAFLOW_BUS": "servicebus",
            "SAGAFLOW_SERVICEBUS_CONNECTION_STRING": peer.connection_string,
            "SAGAFLOW_LOCK_DURATION_SECONDS": str(LOCK),
            "SAGAFLOW_MAX_DELIVERY_COUNT": str(MAX_DELIVERIES),
        }
        yield peer, s, env


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def phases(out: str) -> dict[str, str]:
    return {i["metadata"]["name"]: i["status"]["phase"] for i in json.loads(out)["items"]}


def starts(s: Scene, pid: int | None = None) -> int:
    return sum(c.event == "start" and (pid is None or c.pid == str(pid)) for c in s.calls())


def unfinished(s: Scene, pid: int) -> int:
    """Calls of process `pid` that started and never ended."""
    mine = [c for c in s.calls() if c.pid == str(pid)]
    return sum(c.event == "start" for c in mine) - sum(c.event == "end" for c in mine)


def drained(peer: ServiceBusPeer) -> None:
    """No command left, nothing dead-lettered. The events queue may still hold what the
    orchestrator received in its last receive as it stopped (heartbeats of attempts
    that had finished): settled by nobody, it comes back after its lock, and a later run
    drops it at the inbox."""
    counts = peer.counts(COMMANDS)
    assert (counts.active, counts.locked, counts.dead_lettered) == (0, 0, 0), counts
    assert peer.counts(EVENTS_QUEUE).dead_lettered == 0, peer.counts(EVENTS_QUEUE)


def both_end_cleanly(run: subprocess.Popen[str], runner: subprocess.Popen[str], count: int) -> str:
    """Wait for the run to finish with every execution Completed, stop the runner with
    SIGTERM; both exit 0 and log no traceback. Returns what they logged."""
    code, out, err = finish(run)
    assert code == 0, err
    assert set(phases(out).values()) == {"Completed"} and len(phases(out)) == count, out
    runner.send_signal(signal.SIGTERM)
    runner_code, _, runner_err = finish(runner, 60)
    assert runner_code == 0, runner_err
    said = err + runner_err
    assert "Traceback" not in said, said
    return said


def each_applied_once(s: Scene, count: int, steps: int) -> None:
    applied = successes_applied(s)
    assert len(applied) == count * steps and set(applied.values()) == {1}, applied


CHAIN = workflow(
    "chain",
    "    - {name: a, type: fault.work, input: {behave: sleep, seconds: 0.4}}\n"
    "    - {name: b, type: fault.work, dependsOn: [a], input: {behave: sleep, seconds: 0.4}}\n",
)


@pytest.mark.parametrize("victim", ["run", "runner"])
def test_kill_9_mid_run_loses_nothing_and_applies_nothing_twice(victim: str) -> None:
    # `sagaflow run` (orchestrator and in-process runners) beside a `sagaflow runner`;
    # one of them is killed with -9 while it holds attempts, then started again. What
    # it held stays locked until its locks end (LOCK s), then runs elsewhere.
    count = 40
    with bus() as (peer, s, env):
        manifest = s.manifest(CHAIN + executions(count, "chain"))
        runner = s.start_runner(**env)
        run = s.start_run(manifest, "-o", "json", **env)
        target = run if victim == "run" else runner
        wait_until(lambda: starts(s, target.pid) >= 6 and unfinished(s, target.pid) > 0, run)
        target.kill()
        target.communicate(timeout=30)
        assert unfinished(s, target.pid) > 0  # it died holding attempts
        if victim == "run":
            run = s.start_run(manifest, "-o", "json", **env)
        else:
            runner = s.start_runner(**env)
        both_end_cleanly(run, runner, count)
        each_applied_once(s, count, 2)
        assert overlapping(s.calls()) == []
        drained(peer)


THREE = workflow(
    "three",
    "    - {name: a, type: fault.work, input: {behave: sleep, seconds: 0.05}}\n"
    "    - {name: b, type: fault.work, dependsOn: [a], input: {behave: sleep, seconds: 0.05}}\n"
    "    - {name: c, type: fault.work, dependsOn: [b]}\n",
)


@pytest.mark.parametrize("fault", ["restart", "drop"])
def test_the_broker_going_away_mid_run_is_ridden_out(fault: str) -> None:
    # The peer restarted (down for a second, state kept) or every connection dropped
    # (sockets shut, no AMQP close) while the run and a runner are busy.
    count = 150
    with bus() as (peer, s, env):
        runner = s.start_runner(**env)
        run = s.start_run(s.manifest(THREE + executions(count, "three")), "-o", "json", **env)
        wait_until(lambda: starts(s) >= count, run)
        opened = peer.connections_opened
        if fault == "restart":
            peer.restart(downtime=1.0)
        else:
            peer.drop_connections()
        both_end_cleanly(run, runner, count)
        assert peer.connections_opened > opened  # they did connect again
        each_applied_once(s, count, 3)
        assert overlapping(s.calls()) == []
        drained(peer)


SLOW = workflow(
    "slow", "    - {name: s, type: fault.blocking, input: {until: '${{ input.until }}'}}\n"
)


@pytest.mark.parametrize("fault", ["none", "drop"])
def test_a_handler_that_outlives_its_lock(fault: str) -> None:
    # Handlers held for three lock durations. Unhindered, the runner renews their locks
    # and nothing is delivered again. With the connections dropped meanwhile, renewal
    # cannot save the locks: the commands are delivered again (and may run twice), but
    # each success is applied once.
    count = 4
    # Unhindered, two slots a process, so both hold attempts; with the connections
    # dropped, room to take the commands again while the first runs go on.
    slots = "2" if fault == "none" else "4"
    with bus() as (peer, s, env):
        go = s.root / "go"
        manifest = s.manifest(
            SLOW + executions(count, "slow", dict.fromkeys(range(count), f"{{until: '{go}'}}"))
        )
        runner = s.start_runner(SAGAFLOW_RUNNER_CONCURRENCY=slots, **env)
        run = s.start_run(manifest, "-o", "json", SAGAFLOW_RUNNER_CONCURRENCY=slots, **env)
        wait_until(lambda: starts(s) >= count, run)
        locked_at = peer.lock_tokens(COMMANDS)
        if fault == "drop":
            peer.drop_connections()
            # Held past the old locks' end: the commands come back, to whoever asks.
            wait_until(lambda: not (peer.lock_tokens(COMMANDS) & locked_at), run)
        # Three lock durations: every lock of an attempt still running has been renewed.
        wait_until(lambda: peer.counts(COMMANDS).locked == count and _aged(s, 3 * LOCK), run)
        if fault == "none":
            assert peer.lock_tokens(COMMANDS) == locked_at  # the same locks, kept alive
        go.touch()
        both_end_cleanly(run, runner, count)
        each_applied_once(s, count, 1)
        if fault == "none":
            assert starts(s) == count  # no redelivery at all
            assert overlapping(s.calls()) == []
        else:
            assert count <= starts(s) <= 2 * count
        drained(peer)


def _aged(s: Scene, seconds: float) -> bool:
    """Whether the last handler call started `seconds` ago or more (log time)."""
    last = max(float(c.at) for c in s.calls() if c.event == "start")
    return time.time() - last >= seconds


def test_duplicated_and_garbage_messages_are_dead_lettered_or_dropped() -> None:
    # Sent with the SDK while a run is busy: copies of in-flight commands (the same
    # message id, which the broker drops, and a new one, which a runner may take),
    # garbage bodies on both queues, a garbage command that names a real execution and
    # an attempt it never dispatched, and copies of results already applied under new
    # message ids. Garbage is dead-lettered with a reason and the run finishes.
    count = 4
    text = workflow(
        "two",
        "    - {name: a, type: fault.blocking, input: {until: '${{ input.a }}'}}\n"
        "    - {name: b, type: fault.blocking, dependsOn: [a], input: {until: '${{ input.b }}'}}\n",
    )
    with bus() as (peer, s, env):
        go_a, go_b = s.root / "go-a", s.root / "go-b"
        inputs = f"{{a: '{go_a}', b: '{go_b}'}}"
        manifest = s.manifest(text + executions(count, "two", dict.fromkeys(range(count), inputs)))
        runner = s.start_runner(**env)
        run = s.start_run(manifest, "-o", "json", **env)
        wait_until(lambda: starts(s) >= count, run)
        with ServiceBusClient.from_connection_string(peer.connection_string) as client:
            with client.get_queue_receiver(COMMANDS) as receiver:
                commands = receiver.peek_messages(max_message_count=50)
            assert len(commands) == count
            some = str(commands[0].message_id).rsplit("/", 2)[0]  # <execution id>/a
            with client.get_queue_sender(COMMANDS) as sender:
                for m in commands:
                    body = b"".join(m.body)
                    sender.send_messages(ServiceBusMessage(body, message_id=m.message_id))
                    sender.send_messages(ServiceBusMessage(body, message_id=f"{m.message_id}+"))
                sender.send_messages(ServiceBusMessage(b"not json", message_id="garbage-c1"))
                sender.send_messages(ServiceBusMessage(b"{}", message_id="garbage-c2"))
                sender.send_messages(ServiceBusMessage(b"[1, 2]", message_id=f"{some}/7"))
            with client.get_queue_sender(EVENTS_QUEUE) as sender:
                sender.send_messages(ServiceBusMessage(b"\x00\xff", message_id="garbage-e1"))
                sender.send_messages(
                    ServiceBusMessage(b'{"kind": "StepCompleted"}', message_id="garbage-e2")
                )
            # Dead-lettered (garbage, and copies the runner with the state refuses) and
            # then handled by the orchestrator while every a still runs: none fails it.
            wait_until(lambda: peer.counts(COMMANDS).dead_lettered >= 3, run)
            wait_until(lambda: peer.counts(COMMANDS).dead_lettered == 0, run)
            go_a.touch()
            # Every a succeeded; now its result again, under a new message id.
            wait_until(lambda: len(successes_applied(s)) == count, run)
            with client.get_queue_sender(EVENTS_QUEUE) as sender:
                for m in commands:
                    execution_id = str(m.message_id).split("/")[0]
                    again = StepResult("StepCompleted", execution_id, "a", 1, output={"step": "a"})
                    body = again.encode()
                    sender.send_messages(ServiceBusMessage(body, message_id=f"{m.message_id}/x"))
        go_b.touch()
        said = both_end_cleanly(run, runner, count)
        each_applied_once(s, count, 2)
        # Dead-lettered, each with its reason: by the runner that took it, by the
        # orchestrator for the events queue.
        for garbage in ("garbage-c1", "garbage-c2", f"{some}/7"):
            assert f"dead-lettering {garbage}: MalformedMessage:" in said, said
        for garbage in ("garbage-e1", "garbage-e2"):
            assert f"dead-lettering malformed event {garbage}:" in said, said
        assert starts(s) <= 2 * 2 * count  # a copy under a new id may run once more
        drained(peer)
