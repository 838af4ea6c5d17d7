"""The web view in a real browser: Debian's chromium, headless, through chromedriver.

A real `sagaflow server` runs the order samples (one order ends Compensated), the
approval sample (a run that waits for a signal) and a run whose output is stored
by reference. The browser opens their pages and the test compares what they show
with what the JSON API says: each step's node and phase, compensations marked as
such, a history row per row, a timeline bar per attempt, references as links with
their size, the list filtered by workflow and phase and paged. A page refreshes by
itself while its run goes on. Against a server with a tokens file the page asks
for a token, and shows the run once given one. Screenshots land in tests/artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pg import server_dir
from test_local_mode import ROOT, stop_leftover_postgres
from test_server_flow import free_port, post, stop

pytestmark = pytest.mark.timeout(240)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)",
)
ARTIFACTS = ROOT / "tests" / "artifacts"
SAMPLES = ROOT / "samples"
NS = "default"
TOKEN = "web-view-token-0123456789"  # noqa: S105 - a test token
END = {"Completed", "Failed", "Compensated", "CompensationFailed", "Cancelled"}
UNDO = {"Compensating", "Compensated", "CompensationFailed", "CompensationSkipped"}
BULK = """\
apiVersion: sagaflow.io/v1alpha1
kind: Workflow
metadata: {name: bulk}
spec:
  steps:
    - {name: produce, type: bulk.produce, input: {bytes: 6000}}
    - name: measure
      type: bulk.measure
      dependsOn: [produce]
      input: {data: "${{ steps.produce.output }}"}
---
apiVersion: sagaflow.io/v1alpha1
kind: Execution
metadata: {name: bulk-1}
spec: {workflowRef: {name: bulk}, input: {}}
"""


@contextmanager
def sagaflow_server(files: list[Path], runners: list[Path], **env: str) -> Iterator[str]:
    """`sagaflow server` over `files` on a free loopback port; its URL once it is ready."""
    with server_dir("sagaflow-web-") as scratch:
        state = scratch / "state"
        port = free_port()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
        full_env |= {"SAGAFLOW_API_PORT": str(port), "SAGAFLOW_API_HOST": "127.0.0.1", **env}
        command = [sys.executable, "-m", "sagaflow.cli", "server", "--state-dir", str(state)]
        for path in files:
            command += ["-f", str(path)]
        for path in runners:
            command += ["--runners", str(path)]
        process = subprocess.Popen(command, env=full_env, stderr=subprocess.PIPE, text=True)
        said: list[str] = []
        ready = threading.Event()

        def drain() -> None:  # read on: a full pipe would stall the server
            assert process.stderr is not None
            for line in process.stderr:
                said.append(line)
                if line.startswith("sagaflow server:"):
                    ready.set()
            ready.set()

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            assert ready.wait(120) and process.poll() is None, "".join(said)
            yield f"http://127.0.0.1:{port}"
        finally:
            try:
                stop(process)
            finally:
                stop_leftover_postgres(state)
            reader.join(10)


def get(url: str, token: str | None = None) -> tuple[int, str, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - a loopback URL
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def api(url: str, path: str, token: str | None = None) -> Any:
    status, _, body = get(f"{url}/v1/namespaces/{NS}/{path}", token)
    assert status == 200, body
    return json.loads(body)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with server_dir("sagaflow-web-files-") as files:
        bulk = files / "bulk.yaml"
        bulk.write_text(BULK)
        orders = [SAMPLES / "order-fulfilment.yaml", SAMPLES / "order-rollback.yaml"]
        runners = [SAMPLES / "order_runners.py", SAMPLES / "approval_runners.py"]
        runners.append(ROOT / "tests" / "integration" / "payload_runners.py")
        # A low threshold: the bulk run's 6 kB output is stored by reference.
        threshold = {"SAGAFLOW_PAYLOAD_THRESHOLD_BYTES": "2048"}
        with sagaflow_server(
            [*orders, SAMPLES / "approval.yaml", bulk], runners, **threshold
        ) as url:
            yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver: Selenium Manager has nothing to find or download.
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Any, timeout: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def attr(driver: Any, selector: str, name: str) -> str | None:
    from selenium.common.exceptions import NoSuchElementException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.CSS_SELECTOR, selector).get_attribute(name)
    except NoSuchElementException:
        return None


def find_all(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def shown_phase_is(phase: str) -> Any:
    return lambda d: attr(d, "#phase", "data-phase") == phase


def no_script_errors(driver: Any) -> None:
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def screenshot(driver: Any, name: str) -> Path:
    """The whole page as a PNG in tests/artifacts."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(int(height) + 40, 6000))
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    return path


def page_url(url: str, name: str) -> str:
    return f"{url}/ui/namespaces/{NS}/executions/{name}"


@needs_browser
def test_the_page_of_a_compensated_run_shows_what_the_api_says(server: str, browser: Any) -> None:
    browser.get(page_url(server, "order-1003"))
    wait_for(browser, lambda d: attr(d, "#phase", "data-phase") in END)
    execution = api(server, "executions/order-1003")
    status = execution["status"]
    assert status["phase"] == "Compensated"
    assert attr(browser, "#phase", "data-phase") == "Compensated"
    assert browser.find_element("id", "phase").text == "Compensated"
    wait_for(browser, lambda d: attr(d, "#live", "data-live") == "false")

    nodes = {n.get_attribute("data-step"): n for n in find_all(browser, "#dag .node")}
    assert {name: n.get_attribute("data-phase") for name, n in nodes.items()} == {
        s["name"]: s["phase"] for s in status["steps"]
    }
    undone = {name for name, n in nodes.items() if "compensation" in n.get_attribute("class")}
    assert undone == {"reserve-inventory", "charge-payment"}
    assert {s["name"] for s in status["steps"] if s["phase"] in UNDO} == undone
    legend = browser.find_element("id", "legend").text
    assert "Compensated" in legend and "CompensationFailed" in legend

    history = api(server, "executions/order-1003/history")["items"]
    rows = find_all(browser, "#history tbody tr")
    assert [r.get_attribute("data-kind") for r in rows] == [
        r["kind"] for r in history if r["kind"] != "Transition"
    ]
    assert rows[-1].get_attribute("data-kind") == "ExecutionCompensated"

    for step in status["steps"]:
        name = step["name"]
        forward = find_all(
            browser, f'#gantt .bar[data-step="{name}"]:not([data-kind="compensation"])'
        )
        assert len(forward) == step["attempts"], name
        undo = find_all(browser, f'#gantt .bar[data-step="{name}"][data-kind="compensation"]')
        assert len(undo) == step.get("compensation", {}).get("attempts", 0), name
    charge = find_all(browser, '#gantt .bar[data-step="charge-payment"][data-kind="attempt"]')
    assert [b.get_attribute("data-outcome") for b in charge] == ["retried", "succeeded"]
    assert attr(browser, '#gantt .bar[data-step="ship"]', "data-outcome") == "failed"

    assert "1 Sunken Street, Atlantis" in browser.find_element("id", "exec-input").text
    assert "AddressRejected" in browser.find_element("id", "exec-error").text
    no_script_errors(browser)
    screenshot(browser, "web-view-order-1003.png")


@needs_browser
def test_a_reference_shows_as_a_link_with_its_size(server: str, browser: Any) -> None:
    browser.get(page_url(server, "bulk-1"))
    wait_for(browser, lambda d: attr(d, "#phase", "data-phase") in END)
    steps = {s["name"]: s for s in api(server, "executions/bulk-1")["status"]["steps"]}
    ref = steps["produce"]["outputRef"]
    link = find_all(browser, '#step-table tr[data-step="produce"] a.ref')
    assert len(link) == 1
    assert link[0].get_attribute("href") == ref["uri"]
    assert link[0].get_attribute("data-size") == str(ref["size"])
    shown = browser.find_element("css selector", '#step-table tr[data-step="produce"]').text
    assert f"({ref['size'] / 1024:.1f} KiB)" in shown


@needs_browser
def test_the_page_refreshes_while_the_run_goes(server: str, browser: Any) -> None:
    browser.get(page_url(server, "expense-1042"))
    wait_for(
        browser, lambda d: attr(d, '#dag .node[data-step="approval"]', "data-phase") == "Running"
    )
    assert attr(browser, "#live", "data-live") == "true"
    assert attr(browser, '#gantt .bar[data-step="approval"]', "data-kind") == "wait"
    status, _ = post(
        f"{server}/v1/namespaces/{NS}/executions/expense-1042/signals/approval",
        {"data": {"approved": True, "by": "ana"}},
        {},
    )
    assert status == 200
    wait_for(browser, shown_phase_is("Completed"))  # no reload: the page asked again
    assert attr(browser, '#dag .node[data-step="pay"]', "data-phase") == "Succeeded"
    assert attr(browser, '#dag .node[data-step="tell-submitter"]', "data-phase") == "Skipped"
    wait_for(browser, lambda d: attr(d, "#live", "data-live") == "false")
    assert attr(browser, '#gantt .bar[data-step="approval"]', "data-outcome") == "succeeded"


def list_rows(driver: Any) -> dict[str, str]:
    return {
        r.get_attribute("data-name"): r.get_attribute("data-phase")
        for r in find_all(driver, "#executions tbody tr")
    }


@needs_browser
def test_the_list_filters_by_workflow_and_phase_and_pages(server: str, browser: Any) -> None:
    def orders_ended(_: Any) -> bool:
        runs = api(server, "executions?workflow=order-fulfilment")["items"]
        return len(runs) == 3 and all(e["status"]["phase"] in END for e in runs)

    wait_for(browser, orders_ended)
    browser.get(f"{server}/ui?namespace={NS}&phase=Compensated")
    wait_for(browser, lambda d: find_all(d, "#executions tbody tr"))
    expected = api(server, "executions?phase=Compensated")["items"]
    assert list_rows(browser) == {e["metadata"]["name"]: "Compensated" for e in expected}
    assert "order-1003" in list_rows(browser)
    link = browser.find_element("css selector", '#executions tr[data-name="order-1003"] a')
    assert link.get_attribute("href") == page_url(server, "order-1003")
    assert attr(browser, "#f-phase", "value") == "Compensated"

    browser.get(f"{server}/ui?namespace={NS}&workflow=order-fulfilment&limit=2")
    wait_for(browser, lambda d: len(find_all(d, "#executions tbody tr")) == 2)
    first = list_rows(browser)
    assert attr(browser, "#f-workflow", "value") == "order-fulfilment"
    screenshot(browser, "web-view-list.png")
    browser.find_element("id", "next-page").click()
    wait_for(browser, lambda d: "continue=" in d.current_url and list_rows(d) != first)
    wait_for(browser, lambda d: len(find_all(d, "#executions tbody tr")) == 1)
    runs = api(server, "executions?workflow=order-fulfilment")["items"]
    assert first | list_rows(browser) == {e["metadata"]["name"]: e["status"]["phase"] for e in runs}
    assert len(runs) == 3 and attr(browser, "#next-page", "hidden") is not None
    no_script_errors(browser)


@needs_browser
def test_with_a_tokens_file_the_page_asks_for_a_token(tmp_path: Path, browser: Any) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"tokens:\n  - {{name: web, token: {TOKEN}, namespaces: [{NS}]}}\n")
    env = {"SAGAFLOW_API_TOKENS_FILE": str(tokens)}
    files, runners = [SAMPLES / "approval.yaml"], [SAMPLES / "approval_runners.py"]
    with sagaflow_server(files, runners, **env) as url:
        assert get(f"{url}/v1/namespaces/{NS}/executions/expense-1042")[0] == 401
        browser.get(page_url(url, "expense-1042"))
        wait_for(browser, lambda d: d.find_element("id", "token-form").is_displayed())
        assert not browser.find_element("id", "content").is_displayed()
        assert "bearer token" in browser.find_element("id", "token-reason").text

        browser.find_element("id", "token-input").send_keys("not-the-token-at-all")
        browser.find_element("css selector", "#token-form button").click()
        wait_for(browser, lambda d: "not known" in d.find_element("id", "token-reason").text)

        browser.find_element("id", "token-input").send_keys(TOKEN)
        browser.find_element("css selector", "#token-form button").click()
        wait_for(
            browser,
            lambda d: attr(d, '#dag .node[data-step="approval"]', "data-phase") == "Running",
        )
        assert not browser.find_element("id", "token-form").is_displayed()
        assert attr(browser, "#phase", "data-phase") == "Running"
        steps = api(url, "executions/expense-1042", TOKEN)["status"]["steps"]
        nodes = {n.get_attribute("data-step") for n in find_all(browser, "#dag .node")}
        assert nodes == {s["name"] for s in steps}


def test_the_pages_and_files_are_served_with_their_types(server: str) -> None:
    for path in ("/ui", f"/ui/namespaces/{NS}/executions/order-1003"):
        status, kind, body = get(server + path)
        assert (status, kind) == (200, "text/html; charset=utf-8")
        assert b"/ui/static/app.js" in body and b"Atlantis" not in body  # code, no data
    for name, kind in (
        ("app.js", "text/javascript"),
        ("execution.js", "text/javascript"),
        ("style.css", "text/css"),
    ):
        status, got, body = get(f"{server}/ui/static/{name}")
        assert (status, got) == (200, f"{kind}; charset=utf-8") and body
    for missing in ("nope.js", "..%2Fweb.py", "web.py"):
        status, kind, body = get(f"{server}/ui/static/{missing}")
        assert (status, kind) == (404, "application/json; charset=utf-8")
        assert json.loads(body)["error"]["reason"] == "NotFound"


@pytest.mark.timeout(180)
def test_setuptools_ships_the_web_files(tmp_path: Path) -> None:
    # setuptools' own build of the packages, from a copy: a build in the tree would
    # leave build/ and egg-info behind; without a wheel build, nothing is fetched.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("operator", "step_runners"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path / "lib"
    build = "from setuptools import setup; setup()"
    built = subprocess.run(
        [sys.executable, "-c", build, "-q", "build_py", "--build-lib", str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    shipped = {p.name for p in (out / "sagaflow" / "api" / "web").iterdir()}
    assert shipped == {p.name for p in (ROOT / "operator/sagaflow/api/web").iterdir()}
    assert (out / "sagaflow" / "api" / "web.py").is_file()
