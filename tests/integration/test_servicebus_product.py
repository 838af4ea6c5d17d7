"""The whole product over Service Bus: `sagaflow run`, `sagaflow runner` and `sagaflow
operator` as the processes a user starts, with `SAGAFLOW_BUS=servicebus`, against the
AMQP test peer (`tests/support/servicebus_peer`) through the real, unmodified SDK.

The peer runs on a thread of the test process and holds the documented topology: plain
queues with duplicate detection, `sagaflow.events` and one `steps.<prefix>` per step-type
prefix the manifests use (built-in `sagaflow.*` steps never travel over the bus). Every
other setting is the default. Besides the phases each execution reaches, the tests
check what a user would notice: nothing logged at ERROR (or WARNING, while only idle)
and no traceback; every queue drained; and the number of AMQP connections the
processes opened, which stays at the links they keep (see `most_connections`).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_proc import ROOT, Process, base_env, running
from test_local_mode import RUNNERS, SAMPLE, sagaflow
from test_local_mode import state_dir as state_dir  # a fixture: the embedded default
from test_operator import Cluster, condition, phase_is
from tests.support.kube import EXECUTIONS, WORKFLOWS, KubeClient, is_watch_of, running_api_server
from tests.support.servicebus_peer import QueueCounts, QueueSpec, ServiceBusPeer, running_peer

from sagaflow.adapters.servicebus import topology_queues
from sagaflow.core.definition import BUILTIN_TYPES

pytestmark = pytest.mark.slow

ROLLBACK = ROOT / "samples" / "order-rollback.yaml"
RELAY = Path(__file__).with_name("relay_runners.py")
# As the documented topology creates them (create_topology): duplicate detection on.
PLAIN = QueueSpec(requires_duplicate_detection=True)
EMPTY = QueueCounts(active=0, locked=0, deferred=0, scheduled=0, dead_lettered=0)
# The SDK opens an AMQP connection of its own for every sender and receiver, and a
# process keeps each one it opens for its whole life. A process that orchestrates
# (`sagaflow run`, `sagaflow operator`) needs at most three per queue: a sender, a
# receiver and a receiver on the dead-letter subqueue (it watches those); a separate
# `sagaflow runner` one per queue: a receiver per commands queue and a sender on the
# events queue. So however many messages a clean run moves, it opens no more than
# `most_connections`; opening one per receive (or per idle receive that ends empty,
# which each receive loop has every 5 s) goes past it within seconds.
LINKS_PER_QUEUE = 3


def most_connections(queues: Sequence[str], *, orchestrators: int = 1, runners: int = 0) -> int:
    return (orchestrators * LINKS_PER_QUEUE + runners) * len(queues)


# A level that is not INFO or DEBUG, in the log format of every sagaflow command.
_LEVEL = re.compile(r"^\S+ \S+ (?P<level>WARNING|ERROR|CRITICAL) ", re.MULTILINE)


def queues_of(*files: Path) -> list[str]:
    """The topology the manifests need: the events queue and one queue per prefix of
    the step types (forward and compensating) their Workflows use."""
    types: set[str] = set()
    for file in files:
        for doc in yaml.safe_load_all(file.read_text()):
            if doc and doc["kind"] == "Workflow":
                for s in doc["spec"]["steps"]:
                    types.update(t for t in (s["type"], s.get("compensate", {}).get("type")) if t)
    return topology_queues(t.split(".", 1)[0] for t in types - BUILTIN_TYPES)


def bus_env(peer: ServiceBusPeer) -> dict[str, str]:
    return {
        "SAGAFLOW_BUS": "servicebus",
        "SAGAFLOW_SERVICEBUS_CONNECTION_STRING": peer.connection_string,
    }


def logged(text: str, *levels: str) -> list[str]:
    """The lines of a log at one of `levels`, and any traceback."""
    lines = [m.group(0) for m in _LEVEL.finditer(text) if m.group("level") in levels]
    return lines + (["Traceback"] if "Traceback" in text else [])


def drained(peer: ServiceBusPeer, queues: Iterable[str]) -> dict[str, QueueCounts]:
    """The queues that still hold something (nothing left, locked or dead-lettered)."""
    counts = {q: peer.counts(q) for q in queues}
    return {q: c for q, c in counts.items() if c != EMPTY}


async def run_beside_runner(
    manifest: Path, env: dict[str, str], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], Process, int, int | None]:
    """`sagaflow run` of `manifest` beside a `sagaflow runner` of the relay steps: the
    run's result, the runner, its pid, and its exit code once stopped."""
    runner = Process("runner", ["runner", "--module", str(RELAY)], env, tmp_path / "r.log")
    async with running(runner):
        assert runner.proc is not None
        pid = runner.proc.pid
        args = ["run", "-f", manifest, "--runners", RELAY, "--state-dir", tmp_path / "s"]
        run = await asyncio.to_thread(sagaflow, *args, "-o", "json", env=env)
        stopped = await runner.stop()
    return run, runner, pid, stopped


def statuses(listing: str) -> dict[str, dict[str, Any]]:
    return {i["metadata"]["name"]: i["status"] for i in json.loads(listing)["items"]}


@pytest.mark.timeout(120)
def test_the_readme_sample_runs_over_service_bus(state_dir: Path) -> None:
    # The README's command (and the rollback sample beside it), on the embedded Postgres.
    queues = queues_of(SAMPLE, ROLLBACK)
    assert len(queues) == 5  # events; orders, inventory, payments, shipping
    with running_peer(dict.fromkeys(queues, PLAIN)) as peer:
        run = sagaflow(
            "run",
            "-f",
            SAMPLE,
            "-f",
            ROLLBACK,
            "--runners",
            RUNNERS,
            "--state-dir",
            state_dir,
            "-o",
            "json",
            env=bus_env(peer),
        )
        opened = peer.connections_opened
        left = drained(peer, queues)
    assert run.returncode == 1, run.stderr  # 1: the rolled-back order did not complete
    status = statuses(run.stdout)
    phases = {name: s["phase"] for name, s in status.items()}
    assert phases == {
        "order-1001": "Completed",
        "order-1002": "Completed",
        "order-1003": "Compensated",
    }, run.stderr
    for name in ("order-1001", "order-1002"):
        steps = {s["name"]: s for s in status[name]["steps"]}
        assert steps["charge-payment"]["attempts"] == 2  # the flaky gateway, retried
        assert status[name]["output"]["tracking"].startswith("trk-")
    undone = {s["name"]: s for s in status["order-1003"]["steps"]}
    assert undone["ship"]["phase"] == "Failed"
    assert (
        undone["reserve-inventory"]["phase"] == undone["charge-payment"]["phase"] == "Compensated"
    )

    # The sample's retry and rollback are WARNINGs by design; nothing is an ERROR.
    assert logged(run.stderr, "ERROR", "CRITICAL") == [], run.stderr
    assert left == {}
    assert opened <= most_connections(queues), opened


@pytest.mark.timeout(60)
def test_a_missing_queue_is_named_before_anything_starts(state_dir: Path) -> None:
    # The topology without the queue of the `orders.*` steps: the run must say so at
    # once, not start executions whose commands can never be sent.
    queues = [q for q in queues_of(SAMPLE) if q != "steps.orders"]
    with running_peer(dict.fromkeys(queues, PLAIN)) as peer:
        run = sagaflow(
            "run", "-f", SAMPLE, "--runners", RUNNERS, "--state-dir", state_dir, env=bus_env(peer)
        )
        left = {q: peer.counts(q) for q in queues}
    assert run.returncode == 1, run.stderr
    assert "error: Service Bus cannot serve steps.orders" in run.stderr, run.stderr
    assert "servicebus-topology" in run.stderr and "Traceback" not in run.stderr
    assert all(c == EMPTY for c in left.values()), left  # nothing was sent


@pytest.mark.timeout(120)
async def test_a_separate_runner_process_serves_steps_over_service_bus(
    pg_database: str, tmp_path: Path
) -> None:
    # Four runs of a step that finishes only once all four have started, and a
    # concurrency of two in each process: the runner process must have taken two.
    runs = 4
    manifest = tmp_path / "relay.yaml"
    manifest.write_text(
        "apiVersion: sagaflow.io/v1alpha1\nkind: Workflow\nmetadata: {name: relay}\n"
        "spec:\n  steps:\n"
        f"    - {{name: work, type: relay.work, timeout: 60s, input: {{together: {runs}}}}}\n"
        + "".join(
            f"---\napiVersion: sagaflow.io/v1alpha1\nkind: Execution\nmetadata: {{name: r{i}}}\n"
            "spec: {workflowRef: {name: relay}}\n"
            for i in range(runs)
        )
    )
    queues = topology_queues(["relay"])
    async with running_peer(dict.fromkeys(queues, PLAIN)) as peer:
        env = base_env(
            pg_database,
            tmp_path,
            **bus_env(peer),
            SAGAFLOW_RUNNER_CONCURRENCY="2",
            RELAY_LOG=str(tmp_path / "calls.log"),
        )
        run, runner, runner_pid, stopped = await run_beside_runner(manifest, env, tmp_path)
        opened = peer.connections_opened
        left = drained(peer, queues)
    assert run.returncode == 0, run.stderr
    status = statuses(run.stdout)
    assert {s["phase"] for s in status.values()} == {"Completed"}
    pids = [s["steps"][0]["output"]["pid"] for s in status.values()]
    assert pids.count(runner_pid) == 2, (pids, runner_pid)  # two each, at the same time
    assert len(set(pids)) == 2
    assert stopped == 0
    assert logged(run.stderr, "ERROR", "CRITICAL") == [], run.stderr
    assert logged(runner.output(), "ERROR", "CRITICAL") == [], runner.output()
    assert left == {}
    assert opened <= most_connections(queues, runners=1), opened


@pytest.mark.timeout(150)
async def test_the_operator_runs_the_samples_over_service_bus(
    pg_database: str, tmp_path: Path
) -> None:
    queues = queues_of(SAMPLE, ROLLBACK)
    documents = [d for f in (SAMPLE, ROLLBACK) for d in yaml.safe_load_all(f.read_text()) if d]
    async with (
        running_peer(dict.fromkeys(queues, PLAIN)) as peer,
        running_api_server() as api,
        KubeClient(api.url) as client,
    ):
        cluster = Cluster(api, client, pg_database, tmp_path)
        for process in (cluster.operator, cluster.runner):
            process.env.update(bus_env(peer))
        async with running(cluster.operator, cluster.runner):
            await api.wait_for_request(is_watch_of(EXECUTIONS), within=30)
            # The Workflow first: an Execution created before its Workflow has a version
            # waits for it, which kopf logs as a handler that "failed temporarily" at
            # ERROR, whatever the bus.
            for doc in documents:
                if doc["kind"] == "Workflow":
                    await cluster.apply(WORKFLOWS, doc)
            wf = await cluster.wait_status(WORKFLOWS, "order-fulfilment", lambda s: "version" in s)
            assert condition(wf["status"], "Ready")["status"] == "True"
            for doc in documents:
                if doc["kind"] == "Execution":
                    await cluster.apply(EXECUTIONS, doc)
            ended = ("Completed", "Failed", "Compensated", "CompensationFailed")
            ended_as = {}
            for name in ("order-1001", "order-1002", "order-1003"):
                body = await cluster.wait_status(EXECUTIONS, name, phase_is(*ended), within=60)
                ended_as[name] = body["status"]
            codes = [await p.stop() for p in (cluster.operator, cluster.runner)]
        opened = peer.connections_opened
        left = drained(peer, queues)
    assert {name: status["phase"] for name, status in ended_as.items()} == {
        "order-1001": "Completed",
        "order-1002": "Completed",
        "order-1003": "Compensated",
    }
    done = ended_as["order-1001"]
    assert {s["name"]: s["attempts"] for s in done["steps"]}["charge-payment"] == 2
    assert condition(done, "Succeeded")["status"] == "True"
    assert codes == [0, 0]
    for process in (cluster.operator, cluster.runner):
        assert logged(process.output(), "ERROR", "CRITICAL") == [], process.output()[-5000:]
    assert left == {}
    assert opened <= most_connections(queues, runners=1), opened


@pytest.mark.timeout(120)
async def test_idle_queues_are_quiet(pg_database: str, tmp_path: Path) -> None:
    # A step, a wait, a step: during the wait every queue is idle in both processes for
    # longer than a receive waits (5 s) and than the SDK's keep-alive interval on a
    # receiver (5 s), so each idle receive ends empty and each kept link is kept alive
    # at least once. The step after it shows the kept links still carry messages.
    manifest = tmp_path / "idle.yaml"
    manifest.write_text("""
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: idle}
spec:
  steps:
    - {name: before, type: relay.work}
    - {name: pause, type: sagaflow.wait, dependsOn: [before], input: {duration: 6s}}
    - {name: after, type: relay.work, dependsOn: [pause]}
---
apiVersion: sagaflow.io/v1alpha1
kind: Execution
metadata: {name: idle-1}
spec: {workflowRef: {name: idle}}
""")
    queues = topology_queues(["relay"])
    async with running_peer(dict.fromkeys(queues, PLAIN)) as peer:
        # INFO: what is said about the idle links is shown, so that none of it is a warning.
        env = base_env(pg_database, tmp_path, **bus_env(peer), RELAY_LOG=str(tmp_path / "log"))
        run, runner, _, stopped = await run_beside_runner(manifest, env, tmp_path)
        opened = peer.connections_opened
        left = drained(peer, queues)
    assert run.returncode == 0, run.stderr
    assert statuses(run.stdout)["idle-1"]["phase"] == "Completed"
    assert stopped == 0
    assert "INFO sagaflow.runner: runner serving steps.relay" in run.stderr  # INFO was on
    for log in (run.stderr, runner.output()):
        assert logged(log, "WARNING", "ERROR", "CRITICAL") == [], log[-5000:]
    assert left == {}
    assert opened <= most_connections(queues, runners=1), opened
