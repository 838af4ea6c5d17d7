"""`SAGAFLOW_LOG_FORMAT=json`: the README sample's log as one JSON object a line.

The sample's payment gateway times out on every first charge, so the runner logs a
failed attempt: that line must say whose it is (execution, step, attempt) without
the handler doing anything for it. No traceback: a retried failure is expected.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_local_mode import RUNNERS, SAMPLE, sagaflow, state_dir  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(180)


def test_the_sample_logs_json_lines_with_the_attempts_ids(state_dir: Path) -> None:  # noqa: F811
    env = {"SAGAFLOW_LOG_FORMAT": "json", "SAGAFLOW_LOG_LEVEL": "INFO"}
    done = sagaflow("run", "-f", SAMPLE, "--runners", RUNNERS, "--state-dir", state_dir, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert records, done.stderr[-2000:]
    for r in records:
        assert {"time", "level", "logger", "message"} <= r.keys(), r
    failed = [r for r in records if r["message"].startswith("step failed")]
    assert failed, [r["message"] for r in records]
    first = failed[0]
    assert first["level"] == "WARNING"
    assert first["step"] == "charge-payment"
    assert first["attempt"] == 1
    assert first["attempt_id"] == f"{first['execution_id']}/charge-payment/1"
    assert "/" in first["execution"]  # namespace/name
    # Nothing else on stderr pretends to be a log line in another format.
    plain = [line for line in done.stderr.splitlines() if " WARNING " in line or " INFO " in line]
    assert plain == []


def test_an_unknown_log_format_is_refused_by_name(state_dir: Path) -> None:  # noqa: F811
    env = {"SAGAFLOW_LOG_FORMAT": "yaml"}
    done = sagaflow("run", "-f", SAMPLE, "--runners", RUNNERS, "--state-dir", state_dir, env=env)
    assert done.returncode == 2
    assert "SAGAFLOW_LOG_FORMAT" in done.stderr
    assert "Traceback" not in done.stderr
