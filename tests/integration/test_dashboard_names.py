"""The chart's dashboard and alerts query only metrics Sagaflow exports.

Every `sagaflow_*` (and process) metric name in the dashboard's queries and the rules'
expressions must be a series name of `sagaflow.telemetry.metrics.REGISTRY`, so renaming a
metric in the code without the chart fails here. The dashboard JSON must parse, every
panel must query something, and promtool must parse every query.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sagaflow.telemetry.metrics import REGISTRY

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sagaflow"
DASHBOARD = CHART / "dashboards" / "sagaflow.json"
RULES = CHART / "files" / "prometheus-rules.yaml"

# Names a registry exports, or Prometheus makes itself; anything else in a query is a label,
# a function or a keyword. Prometheus' own `up` is allowed beside them.
METRIC = re.compile(r"\b(?:sagaflow|process|python)_[A-Za-z0-9_]+\b")
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
# Grafana's variables, replaced by values promtool can parse.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def exported_names() -> set[str]:
    """Every series name the registry exports, whether or not a child exists yet."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in panels(board) for t in p.get("targets", []) if "expr" in t]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def unknown_names(queries: list[str], exported: set[str]) -> dict[str, list[str]]:
    """Metric names a query uses that the registry does not export, by query."""
    found: dict[str, list[str]] = {}
    for query in queries:
        missing = sorted(set(METRIC.findall(query)) - exported)
        if missing:
            found[query] = missing
    return found


def test_the_registry_exports_each_kind_with_its_suffixes() -> None:
    names = exported_names()
    assert "sagaflow_executions_finished_total" in names
    assert "sagaflow_executions_finished" not in names
    assert {
        "sagaflow_step_duration_seconds_bucket",
        "sagaflow_step_duration_seconds_count",
    } <= names
    assert {"sagaflow_build_info", "sagaflow_executions", "process_start_time_seconds"} <= names


def test_the_dashboard_uses_only_exported_metrics() -> None:
    queries = dashboard_queries(dashboard())
    assert queries
    assert unknown_names(queries, exported_names()) == {}


def test_the_rules_use_only_exported_metrics() -> None:
    expressions = rule_expressions()
    assert expressions
    assert unknown_names(expressions, exported_names()) == {}


def test_a_renamed_metric_is_reported() -> None:
    queries = [
        q.replace("sagaflow_step_attempts_total", "sagaflow_step_attempt_total")
        for q in dashboard_queries(dashboard()) + rule_expressions()
    ]
    found = unknown_names(queries, exported_names())
    assert found
    assert {name for names in found.values() for name in names} == {"sagaflow_step_attempt_total"}
    # a counter named without its _total is not what Prometheus stores either
    assert unknown_names(["rate(sagaflow_dead_letters[5m])"], exported_names()) == {
        "rate(sagaflow_dead_letters[5m])": ["sagaflow_dead_letters"]
    }


def test_the_dashboard_is_valid_and_every_panel_queries() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "workflow"):
        assert variables[name]["type"] == "query"
        assert variables[name]["query"]["query"].startswith("label_values(")
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]


def test_the_dashboard_shows_what_operators_need() -> None:
    queries = "\n".join(dashboard_queries(dashboard()))
    for name in (
        "sagaflow_executions_started_total",
        "sagaflow_executions_finished_total",
        "sagaflow_step_attempts_total",
        "sagaflow_compensations_total",
        "sagaflow_execution_duration_seconds_bucket",
        "sagaflow_step_duration_seconds_bucket",
        "sagaflow_queue_wait_seconds_bucket",
        "sagaflow_orchestrator_hop_seconds_bucket",
        "sagaflow_transaction_duration_seconds_bucket",
        "sagaflow_outbox_pending",
        "sagaflow_outbox_oldest_age_seconds",
        "sagaflow_timers_due",
        "sagaflow_timers_lag_seconds",
        "sagaflow_queue_depth",
        "sagaflow_mirror_backlog",
        "sagaflow_mirror_lag_seconds",
        "sagaflow_executions{",
        "sagaflow_dead_letters_total",
        "sagaflow_schedule_ticks_total",
        "sagaflow_leader",
        "sagaflow_build_info",
    ):
        assert name in queries, name
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le" in queries


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # promtool checks PromQL only inside rules, so each query becomes a recording rule.
    rules = []
    for number, query in enumerate(dashboard_queries(dashboard())):
        if query.startswith("label_values("):
            query = query.removeprefix("label_values(").rsplit(",", 1)[0]
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        query = re.sub(r"\$\w+", ".*", query)
        rules.append({"record": f"dashboard:query_{number}", "expr": query})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout
