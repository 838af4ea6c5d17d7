"""The chart's Prometheus alerts: promtool accepts the rules file, the unit tests in
alerts_test.yaml pass, and every alert has a case in which it fires.

These run the real promtool (Debian's `prometheus` package, installed by .ci/run); they
skip only where it is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts" / "sagaflow" / "files" / "prometheus-rules.yaml"
UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`)"
)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def alert_rules(path: Path = RULES) -> list[dict[str, Any]]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def firing_cases(path: Path = UNIT_TESTS) -> set[str]:
    """Alert names some unit test expects to fire."""
    tests = yaml.safe_load(path.read_text())["tests"]
    return {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }


@needs_promtool
def test_promtool_accepts_the_rules_file() -> None:
    checked = promtool("check", "rules", RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout


@needs_promtool
def test_promtool_rejects_a_broken_copy(tmp_path: Path) -> None:
    text = RULES.read_text()
    assert "sum by (queue, reason) (increase(" in text
    broken = tmp_path / "rules.yaml"
    broken.write_text(text.replace("sum by (queue, reason) (increase(", "sum by (queue, reason (("))
    checked = promtool("check", "rules", broken)
    assert checked.returncode != 0
    assert "SagaflowDeadLetters" in checked.stdout + checked.stderr


@needs_promtool
def test_the_alert_unit_tests_pass() -> None:
    tested = promtool("test", "rules", UNIT_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@needs_promtool
def test_the_unit_tests_can_fail(tmp_path: Path) -> None:
    # The same tests against rules with a threshold moved: promtool must notice.
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.read_text().replace("> 0.25", "> 0.9"))
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [str(rules)]
    moved = tmp_path / "alerts_test.yaml"
    moved.write_text(yaml.safe_dump(tests))
    tested = promtool("test", "rules", moved)
    assert tested.returncode != 0
    assert "SagaflowHighFailureRate" in tested.stdout + tested.stderr


def test_every_alert_has_a_firing_case() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "alert names must be unique"
    assert set(names) - firing_cases() == set()


def test_the_firing_case_check_reports_an_untested_alert(tmp_path: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())
    rules["groups"][0]["rules"].append(
        {"alert": "SagaflowSomethingNew", "expr": "vector(1)", "labels": {"severity": "info"}}
    )
    extended = tmp_path / "rules.yaml"
    extended.write_text(yaml.safe_dump(rules))
    untested = {rule["alert"] for rule in alert_rules(extended)} - firing_cases()
    assert untested == {"SagaflowSomethingNew"}


def test_every_alert_has_severity_summary_description_and_for() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert "for" in rule, rule["alert"]
