"""The fan-out and approval samples, run as the README runs them: `sagaflow run` on the
embedded defaults, and `sagaflow signal --wait` beside a run in the background."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_local_mode import sagaflow
from test_local_mode import state_dir as state_dir  # the fixture: a scratch state dir

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"

pytestmark = pytest.mark.timeout(180)


def steps_of(item: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in item["status"]["steps"]}


def test_the_fan_out_sample_charges_each_invoice_and_tolerates_a_decline(
    state_dir: Path,
) -> None:
    run = sagaflow(
        "run",
        "-f",
        SAMPLES / "fan-out.yaml",
        "--runners",
        SAMPLES / "fan_out_runners.py",
        "--state-dir",
        state_dir,
        "-o",
        "json",
    )
    assert run.returncode == 0, run.stderr
    (item,) = json.loads(run.stdout)["items"]
    assert item["status"]["phase"] == "Completed"
    steps = steps_of(item)
    assert steps["charge"]["items"] == {"total": 8, "Succeeded": 7, "Failed": 1}
    charges = item["status"]["output"]["charges"]
    assert [c and c["invoice"] for c in charges] == [
        "inv-1",
        "inv-2",
        None,  # the declined card, tolerated
        "inv-4",
        "inv-5",
        "inv-6",
        "inv-7",
        "inv-8",
    ]
    assert steps["summary-mail"]["phase"] == "Skipped"
    assert steps["summary-mail"]["reason"] == "when ${{ input.mailSummary }} gave false"
    assert steps["record"]["output"] == {"recorded": "2026-12", "phase": "Completed"}
    assert item["status"]["finally"] == "Succeeded"


def test_the_approval_sample_waits_for_its_signal(state_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    args = [
        sys.executable,
        "-m",
        "sagaflow.cli",
        "run",
        "-f",
        str(SAMPLES / "approval.yaml"),
        "--runners",
        str(SAMPLES / "approval_runners.py"),
        "--state-dir",
        str(state_dir),
        "-o",
        "json",
    ]
    with subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as run:
        try:
            signalled = sagaflow(
                "signal",
                "expense-1042",
                "approval",
                "--data",
                '{"approved": true, "by": "ana"}',
                "--wait",
                "60s",
                "--state-dir",
                state_dir,
            )
            assert signalled.returncode == 0, signalled.stderr
            assert "signal approval accepted" in signalled.stdout
            out, err = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
    assert run.returncode == 0, err
    (item,) = json.loads(out)["items"]
    assert item["status"]["phase"] == "Completed"
    steps = steps_of(item)
    assert steps["approval"]["output"] == {"approved": True, "by": "ana"}
    assert steps["pay"]["output"]["approvedBy"] == "ana"
    assert steps["tell-submitter"]["phase"] == "Skipped"
    assert item["status"]["output"]["payment"].startswith("pay-")
    # The run is over: the same signal again is refused, saying why.
    late = sagaflow(
        "signal",
        "expense-1042",
        "approval",
        "--data",
        '{"approved": false}',
        "--state-dir",
        state_dir,
    )
    assert late.returncode == 1
    assert "refused: the execution is Completed" in late.stderr
    assert "Traceback" not in late.stderr + err
