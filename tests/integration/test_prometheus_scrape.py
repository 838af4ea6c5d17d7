"""A real Prometheus scrapes a running `sagaflow server` and evaluates the chart's alerts.

`sagaflow server` runs as a user starts it; Debian's prometheus binary scrapes its
`/metrics` every second and loads files/prometheus-rules.yaml, so the metrics' names and
labels and the rules' expressions meet a real server, not a parser. Skips only where the
prometheus binary is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from test_local_mode import ROOT, state_dir  # noqa: F401
from test_server_flow import free_port, stop

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="the prometheus binary is not installed (Debian package `prometheus`)",
    ),
]

SAMPLE = ROOT / "samples" / "order-fulfilment.yaml"
RUNNERS = ROOT / "samples" / "order_runners.py"
RULES = ROOT / "charts" / "sagaflow" / "files" / "prometheus-rules.yaml"
T = TypeVar("T")


@pytest.fixture
def server(state_dir: Path) -> Iterator[str]:  # noqa: F811
    """`host:port` of a running `sagaflow server`, once it says it listens."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env["SAGAFLOW_API_PORT"] = str(port)
    env["SAGAFLOW_METRICS_INTERVAL"] = "1"  # sample the gauges as often as Prometheus scrapes
    command = [sys.executable, "-m", "sagaflow.cli", "server", "-f", str(SAMPLE)]
    command += ["--runners", str(RUNNERS), "--state-dir", str(state_dir)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        said = []
        for line in process.stderr:
            said.append(line)
            if line.startswith("sagaflow server:") or process.poll() is not None:
                break
        assert said and f"API on http://127.0.0.1:{port}" in said[-1], "".join(said)
        # keep reading, so a chatty server never blocks on a full pipe
        threading.Thread(target=process.stderr.read, daemon=True).start()
        yield f"127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture
def prometheus(server: str, tmp_path: Path) -> Iterator[str]:
    """Base URL of a Prometheus that scrapes `server` every second, with the chart's rules."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "sagaflow",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [server]}],
            }
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        shutil.which("prometheus") or "prometheus",
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: ready(url, process, tmp_path / "prometheus.log"), "Prometheus ready")
        yield url
    finally:
        stop(process)
        log.close()


def ready(url: str, process: subprocess.Popen[Any], log: Path) -> bool | None:
    assert process.poll() is None, log.read_text()
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as response:  # noqa: S310
            return response.status == 200 or None
    except (urllib.error.URLError, ConnectionError):
        return None


def eventually(probe: Callable[[], T | None], what: str, within: float = 60) -> T:
    """The first non-empty answer of `probe`, polled until a deadline."""
    deadline = time.monotonic() + within
    while True:
        answer = probe()
        if answer:
            return answer
        assert time.monotonic() < deadline, f"no {what} within {within}s"
        time.sleep(0.2)


def api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=10) as response:  # noqa: S310
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def series(url: str, query: str) -> list[dict[str, Any]] | None:
    result: list[dict[str, Any]] = api(url, "query", query=query)["result"]
    return result or None


def test_prometheus_scrapes_the_build_info_of_a_running_server(
    server: str, prometheus: str
) -> None:
    (up,) = eventually(lambda: series(prometheus, 'up{job="sagaflow"} == 1'), "target up")
    assert up["metric"]["instance"] == server
    (build,) = eventually(lambda: series(prometheus, "sagaflow_build_info"), "sagaflow_build_info")
    labels = build["metric"]
    assert labels["__name__"] == "sagaflow_build_info"
    assert labels["job"] == "sagaflow" and labels["instance"] == server
    assert labels["version"] == version("sagaflow")
    assert labels["python"] == ".".join(map(str, sys.version_info[:3]))
    assert build["value"][1] == "1"


def test_prometheus_evaluates_every_alert_rule_without_error(server: str, prometheus: str) -> None:
    expected = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }

    def evaluated() -> list[dict[str, Any]] | None:
        groups = api(prometheus, "rules", type="alert")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation") for r in rules) else None

    eventually(lambda: series(prometheus, "sagaflow_build_info"), "sagaflow_build_info")
    # every rule evaluated again after the first scrape, so it has seen the server's series
    first = {r["name"]: r["lastEvaluation"] for r in eventually(evaluated, "rule evaluation")}

    def evaluated_again() -> list[dict[str, Any]] | None:
        rules = evaluated() or []
        fresh = all(r["lastEvaluation"] != first.get(r["name"]) for r in rules)
        return rules if rules and fresh else None

    rules = eventually(evaluated_again, "a second evaluation of every rule")
    assert {r["name"] for r in rules} == expected
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert rule["labels"]["severity"]

    # The sample's two orders run to an end phase within seconds: once Prometheus sees
    # both finished and no run live any more, no alert is pending or firing.
    def settled() -> list[dict[str, Any]] | None:
        finished = series(prometheus, "sum(sagaflow_executions_finished_total) == 2")
        live = series(prometheus, 'sagaflow_executions{phase=~"Running|Compensating|Pending"}')
        alerts = api(prometheus, "alerts")["alerts"]
        return finished if finished and not live and not alerts else None

    eventually(settled, "two finished runs, none live, and no alert")
