"""`sagaflow start|get|describe|history` on a state, as a user types them.

The verbs open the state of `--state-dir` themselves here (no server): the same
client interface the HTTP API serves, so what they print is what `--server` prints.
Exit codes: 0 done, 1 refused, 2 invalid input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_local_mode import RUNNERS, SAMPLE, sagaflow, state_dir  # noqa: F401

pytestmark = pytest.mark.timeout(180)


def test_start_get_describe_and_history_on_a_state(state_dir: Path) -> None:  # noqa: F811
    run = sagaflow("run", "-f", SAMPLE, "--runners", RUNNERS, "--state-dir", state_dir)
    assert run.returncode == 0, run.stderr
    s = ("--state-dir", str(state_dir))

    table = sagaflow("get", "executions", *s)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["NAME", "WORKFLOW", "PHASE", "CURRENT", "AGE"]
    assert sorted(r.split()[:3] for r in rows) == [
        ["order-1001", "order-fulfilment", "Completed"],
        ["order-1002", "order-fulfilment", "Completed"],
    ]
    listing = json.loads(sagaflow("get", "executions", "-o", "json", *s).stdout)
    assert listing["kind"] == "List" and len(listing["items"]) == 2
    one = yaml.safe_load(sagaflow("get", "execution", "order-1001", "-o", "yaml", *s).stdout)
    assert one["status"]["phase"] == "Completed"
    workflows = sagaflow("get", "workflows", *s).stdout.splitlines()
    assert workflows[0].split()[:3] == ["NAME", "VERSION", "STEPS"]
    assert workflows[1].split()[:3] == ["order-fulfilment", "1", "5"]

    described = sagaflow("describe", "execution", "order-1001", *s)
    assert described.returncode == 0, described.stderr
    assert "Phase:        Completed" in described.stdout
    charge = next(line for line in described.stdout.splitlines() if "charge-payment" in line)
    assert charge.split()[:3] == ["charge-payment", "Succeeded", "2"]
    history = json.loads(sagaflow("history", "order-1001", "-o", "json", *s).stdout)
    assert history[0]["kind"] and any(r["step"] == "ship" for r in history)

    # A start is once per idempotency key; nothing serves the state now, so it waits.
    started = sagaflow(
        "start",
        "order-fulfilment",
        "--input",
        '{"order": {"id": "x"}}',
        "--idempotency-key",
        "order-x",
        *s,
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip().endswith("started")
    again = sagaflow(
        "start",
        "order-fulfilment",
        "--input",
        '{"order": {"id": "x"}}',
        "--idempotency-key",
        "order-x",
        "-o",
        "name",
        *s,
    )
    assert again.returncode == 0 and again.stdout.startswith("execution/order-fulfilment-")
    other = sagaflow(
        "start",
        "order-fulfilment",
        "--input",
        '{"order": {"id": "y"}}',
        "--idempotency-key",
        "order-x",
        *s,
    )
    assert other.returncode == 1 and "idempotency key 'order-x'" in other.stderr
    running = sagaflow("get", "executions", "--phase", "Running", *s).stdout.splitlines()
    assert len(running) == 2 and running[1].startswith("order-fulfilment-")


def test_bad_input_names_the_flag_and_exits_2(state_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    missing = sagaflow("get", "executions", "--state-dir", state_dir)
    assert missing.returncode == 2 and "no state here" in missing.stderr
    run = sagaflow("run", "-f", SAMPLE, "--runners", RUNNERS, "--state-dir", state_dir)
    assert run.returncode == 0, run.stderr
    s = ("--state-dir", str(state_dir))
    not_json = sagaflow("start", "order-fulfilment", "--input", "{nope", *s)
    assert not_json.returncode == 2 and "--input: not JSON" in not_json.stderr
    (tmp_path / "in.yaml").write_text("- a list\n")
    listed = sagaflow("start", "order-fulfilment", "--input", f"@{tmp_path / 'in.yaml'}", *s)
    assert listed.returncode == 2 and "must be an object" in listed.stderr
    unknown = sagaflow("start", "nope", *s)
    assert unknown.returncode == 2 and "nope" in unknown.stderr
    gone = sagaflow("describe", "execution", "ghost", *s)
    assert gone.returncode == 2 and "ghost" in gone.stderr
    phase = sagaflow("get", "executions", "--phase", "Sleeping", *s)
    assert phase.returncode == 2 and "phase" in phase.stderr


def test_run_refuses_schedules_and_triggers_naming_the_document(
    state_dir: Path,  # noqa: F811
) -> None:
    triggers = SAMPLE.parent / "triggers" / "triggers.yaml"
    run = sagaflow("run", "-f", triggers, "--state-dir", state_dir)
    assert run.returncode == 2
    assert (
        f"{triggers}: document 2 (Schedule nightly-report): kind: served by `sagaflow server`"
        in (run.stderr)
    ), run.stderr
