"""What a kind cluster needs besides the chart (`samples/kind/`), checked offline.

The kind run can only be tried on a machine with Docker (`tests/e2e/test_kind.py`), so
this module pins down, without one, everything that must agree for it to work: the
values pass the chart's schema and lint; the chart renders the image that the README
builds and `kind load`s; the runner Deployment loads a module the Dockerfile copies
into the image and that serves every step type of the samples; every container reads
the database URL from the Secret in `samples/kind/postgres.yaml`, and that URL names
the Service, port, user and database of the Postgres beside it; the manifests are
valid Kubernetes objects; the image's user is the one the chart's securityContext
runs as. Helm runs through `helm-python-sdk` (no helm binary), skipped without it.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from chart_values import env_of, merged
from kubernetes import client

from sagaflow.core.definition import BUILTIN_TYPES
from sagaflow_runner import default_registry, load_module

helm_python = pytest.importorskip("helm_python")

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sagaflow"
SAMPLES = ROOT / "samples"
KIND = SAMPLES / "kind"
VALUES = KIND / "values.yaml"
DOCKERFILE = ROOT / "Dockerfile"
RELEASE = "sagaflow"
NAMESPACE = "sagaflow"


# --- helpers -----------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kind_values() -> dict[str, Any]:
    values = yaml.safe_load(VALUES.read_text())
    assert isinstance(values, dict)
    return values


def kind_manifests() -> list[dict[str, Any]]:
    """Every object in samples/kind/ except the Helm values file."""
    docs: list[dict[str, Any]] = []
    for path in sorted(KIND.glob("*.yaml")):
        if path != VALUES:
            docs.extend(load_yaml_documents(path))
    return docs


def the(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def dockerfile_instructions() -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments), continuation lines joined; arguments are split like a
    shell would only for COPY and USER, the two read here."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            logical.append(pending)
            pending = ""
    found = []
    for text in logical:
        word, _, rest = text.strip().partition(" ")
        word = word.upper()
        found.append((word, shlex.split(rest) if word in {"COPY", "USER"} else [rest]))
    return found


def in_repository(image_path: str) -> Path:
    """The repository file that the Dockerfile copies to `image_path` in the image."""
    for instruction, args in dockerfile_instructions():
        if instruction != "COPY" or any(a.startswith("--from") for a in args):
            continue
        *sources, destination = args
        absolute = destination.startswith("/")
        if len(sources) == 1 and absolute and image_path.startswith(destination):
            return ROOT / sources[0] / image_path.removeprefix(destination)
    raise AssertionError(f"the Dockerfile copies nothing to {image_path}")


@pytest.fixture(scope="module")
def chart() -> Any:
    loaded = helm_python.Chart.load(CHART)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def rendered(chart: Any) -> list[dict[str, Any]]:
    output = chart.render(kind_values(), name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [d for _path, text in sorted(output.items()) for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def deployments(rendered: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Deployment"}


def containers(deployments: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for d in deployments.values() for c in d["spec"]["template"]["spec"]["containers"]]


# --- the values and the chart ------------------------------------------------------


def test_values_pass_the_schema_and_lint(chart: Any) -> None:
    chart.validate_schema(merged(chart.values, kind_values()))
    report = helm_python.lint(CHART, kind_values(), namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_operator_and_one_runner_run_the_locally_loaded_image(
    deployments: dict[str, dict[str, Any]],
) -> None:
    assert set(deployments) == {"sagaflow-operator", "sagaflow-runner-orders"}
    image = kind_values()["image"]
    reference = f"{image['repository']}:{image['tag']}"
    assert reference == "sagaflow:dev"
    for container in containers(deployments):
        assert container["image"] == reference
        # kind nodes have the image only through `kind load`: never pull it.
        assert container["imagePullPolicy"] == "Never"
    # The README's steps build and load exactly this image and wait for these objects.
    readme = (ROOT / "README.md").read_text()
    assert f"docker build -t {reference} ." in readme
    assert f"kind load docker-image {reference}" in readme
    for name in (*deployments, the(kind_manifests(), "Deployment")["metadata"]["name"]):
        assert f"deployment/{name}" in readme


def test_runner_loads_the_image_copy_of_the_sample_runners(
    deployments: dict[str, dict[str, Any]],
) -> None:
    (runner,) = deployments["sagaflow-runner-orders"]["spec"]["template"]["spec"]["containers"]
    names = ["order_runners.py", "fan_out_runners.py", "approval_runners.py"]
    modules = [f"/app/samples/{name}" for name in names]
    assert runner["command"] == [
        "sagaflow",
        "runner",
        *(a for m in modules for a in ("--module", m)),
    ]
    assert [in_repository(m) for m in modules] == [SAMPLES / name for name in names]


def test_runner_module_serves_every_step_type_of_the_samples() -> None:
    for module in kind_values()["runners"][0]["modules"]:
        load_module(in_repository(module))
    steps = [
        step
        for path in sorted(SAMPLES.glob("*.yaml"))
        for doc in load_yaml_documents(path)
        if doc["kind"] == "Workflow"
        for step in (*doc["spec"]["steps"], *doc["spec"].get("finally", ()))
    ]
    used = {step["type"] for step in steps if "type" in step}
    used |= {step["compensate"]["type"] for step in steps if "compensate" in step}
    needed = used - BUILTIN_TYPES
    assert {"orders.validate", "billing.charge", "billing.refund", "expenses.pay"} <= needed
    assert needed <= set(default_registry.types())


def test_every_container_reads_the_url_of_the_sample_secret(
    deployments: dict[str, dict[str, Any]],
) -> None:
    secret = the(kind_manifests(), "Secret")
    assert "url" in secret["stringData"]
    reference = {"name": secret["metadata"]["name"], "key": "url"}
    assert reference == {"name": "sagaflow-database", "key": "url"}
    found = containers(deployments)
    assert len(found) == 2
    for container in found:
        database_url = env_of(container)["SAGAFLOW_DATABASE_URL"]
        assert database_url == {
            "name": "SAGAFLOW_DATABASE_URL",
            "valueFrom": {"secretKeyRef": reference},
        }


def test_image_user_is_the_one_the_chart_runs_as(
    deployments: dict[str, dict[str, Any]],
) -> None:
    instructions = dockerfile_instructions()
    assert "ENTRYPOINT" not in {word for word, _args in instructions}
    (user,) = [args for word, args in instructions if word == "USER"]
    uid, gid = (int(part) for part in user[0].split(":"))
    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]["securityContext"]
        assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["command"][0] == "sagaflow"


# --- the manifests beside the chart --------------------------------------------------


def test_database_url_names_the_sample_postgres() -> None:
    docs = kind_manifests()
    secret, service, deployment = (the(docs, k) for k in ("Secret", "Service", "Deployment"))
    url = urlsplit(secret["stringData"]["url"])
    assert url.scheme == "postgresql"
    (port,) = service["spec"]["ports"]
    assert (url.hostname, url.port) == (service["metadata"]["name"], port["port"])
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    env = env_of(container)
    assert url.username == env["POSTGRES_USER"]["value"]
    assert url.path == "/" + env["POSTGRES_DB"]["value"]
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "password",
    }
    assert url.password == secret["stringData"]["password"]
    # No TLS on the sample server: say so rather than have the client try it first.
    assert parse_qs(url.query) == {"sslmode": ["disable"]}


def test_kind_manifests_are_valid_kubernetes_objects() -> None:
    docs = kind_manifests()
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Secret", "Service"]
    api = client.ApiClient()
    for doc in docs:
        assert doc["apiVersion"] in {"v1", "apps/v1"}
        # Applied with `-n`, into the namespace the chart is installed in.
        assert "namespace" not in doc["metadata"]
        # The client's models reject missing required fields and wrong types; a field
        # they do not know (a typo) is dropped, so the round trip would differ.
        # (The private deserializer takes a dict; the public one's signature changed
        # between client versions.)
        model = api._ApiClient__deserialize(doc, "V1" + doc["kind"])  # type: ignore[attr-defined]
        back = api.sanitize_for_serialization(model)  # type: ignore[no-untyped-call]
        assert back == doc


def test_top_level_samples_hold_only_sagaflow_resources() -> None:
    """`kubectl apply -f samples/` reads the top folder only (no -R): what it finds there
    must be Workflows and Executions, so the kind files stay in samples/kind/."""
    files = [p for p in SAMPLES.iterdir() if p.suffix in {".yaml", ".yml", ".json"}]
    assert files
    for path in files:
        for doc in load_yaml_documents(path):
            assert doc["apiVersion"] == "sagaflow.io/v1alpha1", path
            assert doc["kind"] in {"Workflow", "Execution"}, path
