"""End to end on a real kind cluster: the image, the chart, the operator and a runner.

It does what the README's "Running on a kind cluster" says, in a namespace and Helm
release of its own (`sagaflow-e2e-<random>`): builds the image and `kind load`s it,
applies samples/kind/postgres.yaml, installs the chart with samples/kind/values.yaml,
waits for the operator and runner Deployments, applies samples/ and waits until the
sample Workflows are Ready and every sample Execution is Completed (or Compensated,
for a `*-rollback.yaml` sample), with Events. Then
it deletes the samples (while the operator still runs, so it can drop its finalizers),
the release, the namespace, and the CRDs if it was the one that created them. The
image stays in Docker and on the nodes.

It needs a cluster nobody else's Sagaflow operator watches (two operators would both
act on the samples), so it refuses to run beside one. It runs only when
SAGAFLOW_E2E_KIND_CLUSTER names a kind cluster that answers and docker, kind, kubectl
and helm are on PATH; otherwise the cluster tests are skipped with the reason. Waiting
on a remote cluster has no event to wait for here: the tests poll `kubectl` with a
deadline and, when it passes, fail with what the cluster shows.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"
KIND = SAMPLES / "kind"
VALUES = KIND / "values.yaml"
POSTGRES = KIND / "postgres.yaml"
CHART = ROOT / "charts" / "sagaflow"
CRDS = CHART / "crds"

CLUSTER_ENV = "SAGAFLOW_E2E_KIND_CLUSTER"
TOOLS = ("docker", "kind", "kubectl", "helm")
# A test's budget, including the shared setup the first one pays: building the image
# (a full pip install when Docker has no cache), loading it into the nodes, pulling
# Postgres and rolling everything out.
TEST_TIMEOUT = 1200
WAIT_SECONDS = 300.0  # one wait on the cluster: a rollout, a Workflow, the Executions
POLL_SECONDS = 2.0
OPERATOR_LABELS = "app.kubernetes.io/part-of=sagaflow,app.kubernetes.io/component=operator"
TERMINAL_FAILURES = {"Failed", "Cancelled", "CompensationFailed"}


# --- commands ----------------------------------------------------------------------


def run(argv: list[str], *, timeout: float = 120.0, check: bool = True) -> str:
    """Run one command; its stdout, or an AssertionError that shows what it said."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(
            f"`{' '.join(argv)}` exited {done.returncode}\n"
            f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
        )
    return done.stdout


def answers(argv: list[str]) -> bool:
    try:
        subprocess.run(argv, capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def unavailable(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the cluster tests cannot run here, or None when they can."""
    cluster = environ.get(CLUSTER_ENV, "").strip()
    if not cluster:
        return f"no cluster: set {CLUSTER_ENV}=<kind cluster name> to run the end-to-end suite"
    missing = [tool for tool in TOOLS if shutil.which(tool, path=environ.get("PATH")) is None]
    if missing:
        return f"{CLUSTER_ENV} is set but these are not on PATH: {', '.join(missing)}"
    if not answers(["docker", "info"]):
        return "the Docker engine does not answer `docker info`"
    clusters = run(["kind", "get", "clusters"], timeout=30, check=False).split()
    if cluster not in clusters:
        return f"kind has no cluster {cluster!r} (it has: {', '.join(clusters) or 'none'})"
    context = f"kind-{cluster}"
    if not answers(["kubectl", "--context", context, "get", "--raw", "/readyz"]):
        return f"the API server of kubectl context {context!r} does not answer"
    return None


# Signals the samples wait for: (execution, signal, data).
SIGNALS = [("expense-1042", "approval", '{"approved": true, "by": "kind"}')]


def expected_phases() -> dict[str, str]:
    """Each sample Execution's final phase: Compensated for a `*-rollback.yaml` sample (an
    order that fails and is rolled back), Completed for the others."""
    phases = {}
    for path in sorted(SAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Execution":
                rollback = path.name.endswith("-rollback.yaml")
                phases[doc["metadata"]["name"]] = "Compensated" if rollback else "Completed"
    return phases


def sample_objects(kind: str) -> list[str]:
    """Names of the sample objects of `kind` that `kubectl apply -f samples/` creates."""
    names = []
    for path in sorted(SAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind:
                names.append(doc["metadata"]["name"])
    return names


def events_in_description(text: str) -> list[str]:
    """The rows of the Events table of a `kubectl describe` output (none: [])."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Events:")), None)
    if start is None or lines[start].split(":", 1)[1].strip() == "<none>":
        return []
    table = []
    for line in lines[start + 1 :]:
        if line.strip() and not line.startswith((" ", "\t")):
            break
        if line.strip():
            table.append(line.strip())
    # A header row and a row of dashes come first.
    return [row for row in table[2:] if not set(row) <= {"-", " "}]


# --- the cluster -------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """One run's view of the cluster: its context, namespace and Helm release."""

    name: str
    namespace: str

    @property
    def context(self) -> str:
        return f"kind-{self.name}"

    @property
    def release(self) -> str:
        return self.namespace

    def kubectl(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        return run(["kubectl", "--context", self.context, *args], timeout=timeout, check=check)

    def k(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        """kubectl in this run's namespace."""
        return self.kubectl("-n", self.namespace, *args, timeout=timeout, check=check)

    def helm(self, *args: str, timeout: float = 300.0, check: bool = True) -> str:
        argv = ["helm", "--kube-context", self.context, "-n", self.namespace, *args]
        return run(argv, timeout=timeout, check=check)

    def get_json(self, *args: str) -> Any:
        return json.loads(self.k("get", *args, "-o", "json"))

    def deployments(self) -> list[str]:
        selector = f"app.kubernetes.io/instance={self.release}"
        return self.k("get", "deployments", "-l", selector, "-o", "name").split()

    def roll_out(self, deployment: str) -> None:
        self.k(
            "rollout",
            "status",
            deployment,
            f"--timeout={WAIT_SECONDS:.0f}s",
            timeout=WAIT_SECONDS + 30,
        )

    def diagnostics(self) -> str:
        """What the namespace shows, for a failure message."""
        parts = []
        commands: list[tuple[str, ...]] = [
            ("get", "all,workflows.sagaflow.io,executions.sagaflow.io", "-o", "wide"),
            ("get", "executions.sagaflow.io", "-o", "yaml"),
            ("get", "events", "--sort-by=.lastTimestamp"),
            ("describe", "pods"),
        ]
        commands += [
            ("logs", name, "--all-containers", "--tail=100") for name in self.deployments_or_none()
        ]
        for command in commands:
            try:
                output = self.k(*command, timeout=60, check=False)
            except subprocess.TimeoutExpired:
                output = "(timed out)"
            parts.append(f"$ kubectl -n {self.namespace} {' '.join(command)}\n{output[-4000:]}")
        return "\n".join(parts)

    def deployments_or_none(self) -> list[str]:
        try:
            return self.deployments()
        except (AssertionError, subprocess.TimeoutExpired):
            return []


def wait_until(cluster: Cluster, what: str, probe: Callable[[], tuple[bool, str]]) -> None:
    """Poll `probe` (done?, what it saw) until done or WAIT_SECONDS pass."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        done, seen = probe()
        if done:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"{what}: not within {WAIT_SECONDS:.0f}s; last seen: {seen}\n"
                f"{cluster.diagnostics()}"
            )
        time.sleep(POLL_SECONDS)


def image_reference() -> str:
    image = yaml.safe_load(VALUES.read_text())["image"]
    return f"{image['repository']}:{image['tag']}"


def missing_crds(cluster: Cluster) -> list[Path]:
    """The chart's CRD files whose CRD the cluster does not have yet (this run makes them)."""
    files = {yaml.safe_load(p.read_text())["metadata"]["name"]: p for p in CRDS.glob("*.yaml")}
    found = cluster.kubectl("get", "crd", *sorted(files), "-o", "name", "--ignore-not-found")
    present = {
        line.removeprefix("customresourcedefinition.apiextensions.k8s.io/")
        for line in found.split()
    }
    return sorted(path for name, path in files.items() if name not in present)


def install(cluster: Cluster) -> None:
    """Everything of the README's steps, into this run's namespace."""
    image = image_reference()
    run(["docker", "build", "-t", image, str(ROOT)], timeout=900)
    run(["kind", "load", "docker-image", image, "--name", cluster.name], timeout=300)
    cluster.kubectl("create", "namespace", cluster.namespace)
    # Helm installs the chart's CRDs only where they are missing: bring stale Sagaflow
    # ones up to date (kopf's peering CRDs may belong to other operators: left alone).
    for crd in sorted(CRDS.glob("sagaflow.io_*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.k("apply", "-f", str(POSTGRES))
    cluster.roll_out("deployment/sagaflow-postgres")
    cluster.helm("install", cluster.release, str(CHART), "-f", str(VALUES))
    deployments = cluster.deployments()
    assert f"deployment.apps/{cluster.release}-operator" in deployments, deployments
    for deployment in deployments:
        cluster.roll_out(deployment)
    cluster.k("apply", "-f", str(SAMPLES))


def uninstall(cluster: Cluster, *, created_crds: list[Path]) -> list[str]:
    """Delete what `install` made, in an order that lets the operator drop its
    finalizers; every step is tried. Returns what could not be deleted."""
    problems = []
    steps: list[tuple[str, Callable[[], object]]] = [
        (
            "samples",
            lambda: cluster.k(
                "delete", "-f", str(SAMPLES), "--ignore-not-found", "--timeout=120s", timeout=180
            ),
        ),
        ("finalizers", lambda: drop_finalizers(cluster)),
        ("release", lambda: cluster.helm("uninstall", cluster.release, timeout=180)),
        (
            "namespace",
            lambda: cluster.kubectl(
                "delete", "namespace", cluster.namespace, "--timeout=300s", timeout=360
            ),
        ),
    ]
    if created_crds:
        files = [arg for crd in created_crds for arg in ("-f", str(crd))]
        steps.append(
            (
                "CRDs",
                lambda: cluster.kubectl(
                    "delete", *files, "--ignore-not-found", "--timeout=120s", timeout=180
                ),
            )
        )
    for what, step in steps:
        try:
            step()
        except (AssertionError, subprocess.SubprocessError) as exc:
            problems.append(f"{what}: {exc}")
    return problems


def drop_finalizers(cluster: Cluster) -> None:
    """Whatever the operator left behind (it failed, or the deletion timed out) would
    keep the namespace Terminating for good."""
    for resource in ("executions.sagaflow.io", "workflows.sagaflow.io"):
        for name in cluster.k("get", resource, "-o", "name", check=False).split():
            cluster.k("patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')


@pytest.fixture(scope="class")
def cluster() -> Iterator[Cluster]:
    """One install for the tests of `TestOnKind`, deleted after the last of them."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    run_cluster = Cluster(
        name=os.environ[CLUSTER_ENV].strip(), namespace=f"sagaflow-e2e-{secrets.token_hex(3)}"
    )
    others = run_cluster.kubectl(
        "get", "deployments", "--all-namespaces", "-l", OPERATOR_LABELS, "-o", "name"
    )
    if others.strip():
        pytest.fail(
            f"a Sagaflow operator already runs on {run_cluster.context} ({others.split()}); "
            "it would act on this suite's samples too: uninstall it or use another cluster"
        )
    created_crds = missing_crds(run_cluster)
    installed = False
    try:
        try:
            install(run_cluster)
        except BaseException:
            print(run_cluster.diagnostics())
            raise
        installed = True
        yield run_cluster
    finally:
        problems = uninstall(run_cluster, created_crds=created_crds)
        message = "left behind on the cluster:\n" + "\n".join(problems)
        if problems and installed:
            raise AssertionError(message)
        if problems:  # the install's own error is the one to report
            print(message)


# --- on the cluster ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT)
class TestOnKind:
    """In file order: the Executions are waited for before their Events are read."""

    def test_sample_workflows_become_ready(self, cluster: Cluster) -> None:
        names = sample_objects("Workflow")
        assert names

        def probe() -> tuple[bool, str]:
            ready: dict[str, str] = {}
            for name in names:
                obj = cluster.get_json("workflows.sagaflow.io", name)
                conditions = obj.get("status", {}).get("conditions", [])
                status: dict[str, str] = next((c for c in conditions if c["type"] == "Ready"), {})
                if status.get("status") == "False":
                    pytest.fail(f"Workflow {name} is not Ready: {status}")
                ready[name] = status.get("status", "no Ready condition")
            return all(v == "True" for v in ready.values()), str(ready)

        wait_until(cluster, "sample Workflows Ready", probe)

    def test_sample_executions_complete(self, cluster: Cluster) -> None:
        expected = expected_phases()
        assert len(expected) == len(sample_objects("Execution"))
        # The approval sample waits for a person: send its signal as one would, with
        # the CLI in the operator's image (it reads the database URL the chart gives it).
        for name, signal, data in SIGNALS:
            cluster.k(
                "exec",
                f"deploy/{cluster.release}-operator",
                "--",
                "sagaflow",
                "signal",
                name,
                signal,
                "--data",
                data,
                "-n",
                cluster.namespace,
                "--wait",
                "120s",
                timeout=180,
            )

        def probe() -> tuple[bool, str]:
            items = cluster.get_json("executions.sagaflow.io")["items"]
            phases = {
                i["metadata"]["name"]: i.get("status", {}).get("phase", "no phase yet")
                for i in items
            }
            failed = {n: p for n, p in phases.items() if p in TERMINAL_FAILURES}
            if failed:
                pytest.fail(f"Executions ended {failed}\n{cluster.diagnostics()}")
            return all(phases.get(n) == p for n, p in expected.items()), str(phases)

        wait_until(cluster, "sample Executions Completed or rolled back", probe)

    def test_executions_carry_events(self, cluster: Cluster) -> None:
        for name in sample_objects("Execution"):

            def probe(name: str = name) -> tuple[bool, str]:
                text = cluster.k("describe", "executions.sagaflow.io", name)
                return bool(events_in_description(text)), text[-1500:]

            wait_until(cluster, f"Events on Execution {name}", probe)


# --- the suite's own helpers, checked without a cluster ---------------------------


@pytest.mark.timeout(10)
def test_without_the_variable_the_suite_says_how_to_enable_it() -> None:
    reason = unavailable({"PATH": os.environ.get("PATH", "")})
    assert reason is not None and CLUSTER_ENV in reason


@pytest.mark.timeout(10)
def test_missing_tools_are_named(tmp_path: Path) -> None:
    reason = unavailable({CLUSTER_ENV: "sagaflow", "PATH": str(tmp_path)})
    assert reason is not None
    for tool in TOOLS:
        assert tool in reason


DESCRIBED = """\
Name:         order-1001
Namespace:    sagaflow-e2e-1a2b3c
API Version:  sagaflow.io/v1alpha1
Kind:         Execution
Status:
  Phase:  Completed
Events:
  Type     Reason              Age   From               Message
  ----     ------              ----  ----               -------
  Normal   ExecutionStarted    40s   sagaflow-operator  execution started (workflow version 1)
  Warning  StepRetrying        39s   sagaflow-operator  step charge-payment: attempt 2
  Normal   ExecutionCompleted  37s   sagaflow-operator  execution completed
"""


@pytest.mark.timeout(10)
def test_events_are_read_from_describe_output() -> None:
    rows = events_in_description(DESCRIBED)
    assert len(rows) == 3
    assert rows[-1].split()[:2] == ["Normal", "ExecutionCompleted"]
    assert events_in_description(DESCRIBED.split("Events:")[0] + "Events:  <none>\n") == []
    assert events_in_description("Name: x\n") == []


@pytest.mark.timeout(10)
def test_expectations_come_from_the_samples() -> None:
    assert sample_objects("Workflow") == ["expense-approval", "invoice-batch", "order-fulfilment"]
    assert sample_objects("Execution") == [
        "expense-1042",
        "batch-2026-12",
        "order-1001",
        "order-1002",
        "order-1003",
    ]
    assert expected_phases()["order-1003"] == "Compensated"
    assert image_reference() == "sagaflow:dev"
