"""The chart's monitoring objects: a ServiceMonitor, a PrometheusRule and a Grafana
dashboard ConfigMap, each off by default and well-formed when enabled.

Rendered offline with `helm-python-sdk`, as test_chart.py renders the rest of the chart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_values import merged

helm_python = pytest.importorskip("helm_python")

pytestmark = pytest.mark.timeout(60)

CHART = Path(__file__).resolve().parents[2] / "charts" / "sagaflow"
RELEASE = "sf"
NAMESPACE = "sagaflow-system"
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule", "ConfigMap"}
ENABLED: dict[str, Any] = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kps"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
        "dashboard": {
            "enabled": True,
            "namespace": "grafana",
            "annotations": {"grafana_folder": "Sagaflow"},
        },
    }
}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    loaded = helm_python.Chart.load(CHART)
    yield loaded
    loaded.close()


def documents(chart: Any, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rendered: dict[str, str] = chart.render(
        values, name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    docs = [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]
    return {d["kind"]: d for d in docs if d["kind"] in MONITORING_KINDS}


def test_nothing_is_rendered_by_default(chart: Any) -> None:
    assert documents(chart, {}) == {}


def test_each_option_renders_only_its_object(chart: Any) -> None:
    for key, kind in (
        ("serviceMonitor", "ServiceMonitor"),
        ("prometheusRule", "PrometheusRule"),
        ("dashboard", "ConfigMap"),
    ):
        assert set(documents(chart, {"metrics": {key: {"enabled": True}}})) == {kind}


def test_the_service_monitor_scrapes_the_api_service_metrics(chart: Any) -> None:
    rendered: dict[str, str] = chart.render(
        ENABLED, name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    docs = [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kps"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # it selects exactly the API Service, and scrapes that Service's named port
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    assert endpoint["honorLabels"] is True  # keeps the workflow's namespace label
    assert "scrapeTimeout" not in endpoint


def test_the_prometheus_rule_is_the_rules_file(chart: Any) -> None:
    rule = documents(chart, ENABLED)["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == "sf-sagaflow"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert "SagaflowExecutionsStuck" in alerts and len(alerts) == 8
    # Prometheus' own templates survive Helm untouched
    assert "{{ $labels.workflow }}" in json.dumps(rule["spec"])


def test_the_dashboard_config_map_holds_the_dashboard(chart: Any) -> None:
    config_map = documents(chart, ENABLED)["ConfigMap"]
    metadata = config_map["metadata"]
    assert metadata["name"] == "sf-sagaflow-dashboard"
    assert metadata["namespace"] == "grafana"
    assert metadata["labels"]["grafana_dashboard"] == "1"
    assert metadata["annotations"] == {"grafana_folder": "Sagaflow"}
    (key,) = config_map["data"]
    assert key.endswith(".json")
    shipped = json.loads((CHART / "dashboards" / "sagaflow.json").read_text())
    assert json.loads(config_map["data"][key]) == shipped
    config_map = documents(chart, {"metrics": {"dashboard": {"enabled": True}}})["ConfigMap"]
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert "annotations" not in config_map["metadata"]


def test_the_scrape_timeout_is_passed_when_set(chart: Any) -> None:
    values = {"metrics": {"serviceMonitor": {"enabled": True, "scrapeTimeout": "10s"}}}
    (endpoint,) = documents(chart, values)["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["scrapeTimeout"] == "10s" and endpoint["interval"] == "30s"


def test_lint_passes_with_everything_enabled() -> None:
    report = helm_python.lint(CHART, ENABLED, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


BAD = {
    "unknown-key": {"metrics": {"serviceMonitor": {"enabeld": True}}},
    "enabled-not-boolean": {"metrics": {"prometheusRule": {"enabled": "yes"}}},
    "interval-not-a-duration": {"metrics": {"serviceMonitor": {"interval": "30"}}},
    "timeout-not-a-duration": {"metrics": {"serviceMonitor": {"scrapeTimeout": "soon"}}},
    "label-not-a-string": {"metrics": {"dashboard": {"labels": {"team": 1}}}},
    "unknown-section": {"metrics": {"podMonitor": {"enabled": True}}},
}


def test_schema_accepts_the_monitoring_values(chart: Any) -> None:
    chart.validate_schema(merged(chart.values, ENABLED))


@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
def test_schema_rejects_bad_monitoring_values(chart: Any, bad: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema(merged(chart.values, bad))
    with pytest.raises(helm_python.HelmError):
        chart.render(bad, name=RELEASE, namespace=NAMESPACE, is_install=True)


def test_runner_pods_serve_metrics_and_a_pod_monitor_scrapes_them(chart: Any) -> None:
    runners = {"runners": [{"name": "orders", "modules": ["orders.handlers"]}]}
    rendered: dict[str, str] = chart.render(
        {**ENABLED, **runners}, name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    docs = [d for text in rendered.values() for d in yaml.safe_load_all(text) if d]
    (runner,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("orders")
    ]
    pod = runner["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SAGAFLOW_METRICS_PORT"] == "9090"
    assert {"name": "metrics", "containerPort": 9090} in container["ports"]
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["honorLabels"]) == (
        "metrics",
        "/metrics",
        True,
    )
    # Without runners, or with the monitors off, there is no PodMonitor.
    for values in (ENABLED, runners):
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        kinds = {d["kind"] for text in rendered.values() for d in yaml.safe_load_all(text) if d}
        assert "PodMonitor" not in kinds
