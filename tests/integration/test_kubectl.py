"""Real kubectl against the in-memory API server: what a user of the chart will type.

`kubectl apply -f samples/` creates the sample objects and re-applies cleanly, with
kubectl's default strict validation (the server publishes an OpenAPI v3 document and
refuses fields the CRD does not declare). `kubectl get` prints the printer columns of
the generated CRDs with values from each object's status, by resource name, category
and short name, narrowed by label and field selectors. `kubectl describe` shows the
status and that object's Events only. `kubectl wait` and `kubectl delete` (held by a
finalizer) follow watches to the end. Statuses are written through the status
subresource and built from the status models, as the operator will write them; expected
cells are computed from those statuses here, independently of the server's JSONPath.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.kube import (
    EVENTS,
    EXECUTIONS,
    GROUP,
    WORKFLOWS,
    ApiServer,
    KubeClient,
    is_watch_of,
    running_api_server,
)
from tests.support.kubectl import Kubectl, parse_table, parse_tables, rows_by_name

from sagaflow.core.crds import custom_resource_definitions
from sagaflow.core.manifests import (
    Condition,
    ExecutionPhase,
    ExecutionStatus,
    StepError,
    StepPhase,
    StepStatus,
    WorkflowStatus,
)

NS = "shop"
SAMPLES = Path(__file__).resolve().parents[2] / "samples"
RESOURCES = {"Workflow": WORKFLOWS, "Execution": EXECUTIONS}
AGE = re.compile(r"^\d+s$")  # objects made by the test are seconds old
WHEN = "2030-01-01T00:00:00Z"  # a time in a status: printed as it is
TIMEOUT = StepError(type="GatewayTimeout", message="no answer in 30s")

Body = dict[str, Any]
ORDERS = "order-fulfilment"  # the sample whose objects get a status written


def sample_documents() -> list[Body]:
    """The objects `kubectl apply -f samples/` reads: its .yaml/.yml/.json files' documents."""
    documents: list[Body] = []
    for path in sorted(SAMPLES.iterdir()):
        if path.suffix in (".yaml", ".yml", ".json"):
            documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def of_kind(kind: str) -> list[Body]:
    return [doc for doc in sample_documents() if doc["kind"] == kind]


def printer_columns(kind: str) -> list[Body]:
    crd = next(c for c in custom_resource_definitions() if c["spec"]["names"]["kind"] == kind)
    columns: list[Body] = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    return columns


def headers(kind: str) -> list[str]:
    """What kubectl prints as the header of `kind`'s table: NAME, then the CRD's columns."""
    return ["NAME"] + [column["name"].upper() for column in printer_columns(kind)]


def status_body(model: ExecutionStatus | WorkflowStatus) -> Body:
    """A status as the operator writes it: the model's JSON, camelCase, no nulls."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def running_status(workflow: Body) -> Body:
    """A running execution of `workflow`: its first step done, the next ones running, the
    first of those on its third attempt (so Attempts must pick the first running step)."""
    first, second, third = (step["name"] for step in workflow["spec"]["steps"][:3])
    steps = (
        StepStatus(name=first, phase=StepPhase.SUCCEEDED, attempts=1),
        StepStatus(name=second, phase=StepPhase.RUNNING, attempts=3, error=TIMEOUT),
        StepStatus(name=third, phase=StepPhase.RUNNING, attempts=1),
    )
    message = f"{second} retries at {WHEN}"
    retrying = Condition(
        type="Ready",
        status="False",
        reason="StepRetrying",
        message=message,
        last_transition_time=WHEN,
    )
    return status_body(
        ExecutionStatus(
            phase=ExecutionPhase.RUNNING,
            workflow_version=3,
            current_steps=(second, third),
            steps=steps,
            next_retry_at=WHEN,
            error=TIMEOUT,
            conditions=(retrying,),
        )
    )


def workflow_status() -> Body:
    """A reconciled workflow; Ready is not its first condition (the column must filter)."""
    conditions = (
        Condition(type="Validated", status="False", reason="X", last_transition_time=WHEN),
        Condition(type="Ready", status="True", reason="Valid", last_transition_time=WHEN),
    )
    return status_body(WorkflowStatus(observed_generation=1, version=3, conditions=conditions))


def expected_execution_cells(body: Body) -> dict[str, str]:
    """The cells kubectl must print for an Execution, computed from its status here."""
    status = body.get("status", {})
    running = [step["attempts"] for step in status.get("steps", []) if step["phase"] == "Running"]
    return {
        "NAME": body["metadata"]["name"],
        "WORKFLOW": body["spec"]["workflowRef"]["name"],
        "VERSION": str(status["workflowVersion"]) if "workflowVersion" in status else "",
        "PHASE": status.get("phase", ""),
        "STEP": status["currentSteps"][0] if status.get("currentSteps") else "",
        "ATTEMPTS": str(running[0]) if running else "",
    }


def expected_workflow_cells(body: Body) -> dict[str, str]:
    status = body.get("status", {})
    ready = [c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"]
    return {
        "NAME": body["metadata"]["name"],
        "VERSION": str(status["version"]) if "version" in status else "",
        "READY": ready[0] if ready else "",
    }


def without_age(row: dict[str, str]) -> dict[str, str]:
    assert AGE.match(row["AGE"]), row
    return {key: value for key, value in row.items() if key != "AGE"}


def cells(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """A table's rows by NAME, their AGE checked and left out."""
    return {name: without_age(row) for name, row in rows_by_name(rows).items()}


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with running_api_server() as server:
        yield server


@pytest.fixture
async def client(api: ApiServer) -> AsyncIterator[KubeClient]:
    async with KubeClient(api.url) as kube:
        yield kube


@pytest.fixture
def kubectl(api: ApiServer, tmp_path: Path) -> Kubectl:
    return Kubectl(api.url, tmp_path / "kubectl", namespace=NS)


@pytest.fixture
async def samples(api: ApiServer, client: KubeClient) -> dict[str, Body]:
    """The sample objects, created; the workflow and the first execution with a status
    (written through /status), the other executions without. Keyed by name."""
    workflow = next(w for w in of_kind("Workflow") if w["metadata"]["name"] == ORDERS)
    first = next(e for e in of_kind("Execution") if e["spec"]["workflowRef"]["name"] == ORDERS)
    for document in sample_documents():
        await client.create(RESOURCES[document["kind"]], NS, copy.deepcopy(document))
    name = workflow["metadata"]["name"]
    await client.patch(WORKFLOWS, NS, name, {"status": workflow_status()}, subresource="status")
    status = running_status(workflow)
    name = first["metadata"]["name"]
    await client.patch(EXECUTIONS, NS, name, {"status": status}, subresource="status")
    stored: dict[str, Body] = {}
    for doc in sample_documents():
        body = api.peek(RESOURCES[doc["kind"]], NS, doc["metadata"]["name"])
        assert body is not None
        stored[doc["metadata"]["name"]] = body
    assert stored[name]["status"] == status
    return stored


# -- apply -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_apply_creates_every_sample_and_reapplies_unchanged(
    api: ApiServer, kubectl: Kubectl
) -> None:
    documents = sample_documents()
    assert {doc["kind"] for doc in documents} == {"Workflow", "Execution"}

    def lines(verb: str) -> set[str]:
        return {f"{d['kind'].lower()}.{GROUP}/{d['metadata']['name']} {verb}" for d in documents}

    # kubectl validates strictly by default: no --validate=false needed (see kube_openapi).
    first = await kubectl.run("apply", "-f", str(SAMPLES))
    assert set(first.stdout.splitlines()) == lines("created")
    stored: dict[str, Body] = {}
    for doc in documents:
        body = api.peek(RESOURCES[doc["kind"]], NS, doc["metadata"]["name"])
        assert body is not None, doc["metadata"]["name"]
        assert body["spec"] == doc["spec"]
        assert "kubectl.kubernetes.io/last-applied-configuration" in body["metadata"]["annotations"]
        stored[doc["metadata"]["name"]] = body

    again = await kubectl.run("apply", "-f", str(SAMPLES))
    assert set(again.stdout.splitlines()) == lines("unchanged")
    for doc in documents:
        # The same objects, not written again.
        assert (
            api.peek(RESOURCES[doc["kind"]], NS, doc["metadata"]["name"])
            == stored[doc["metadata"]["name"]]
        )


@pytest.mark.timeout(30)
async def test_apply_of_a_changed_manifest_configures_the_object(
    api: ApiServer, kubectl: Kubectl, tmp_path: Path
) -> None:
    await kubectl.run("apply", "-f", str(SAMPLES))
    execution = of_kind("Execution")[0]
    name = execution["metadata"]["name"]
    before = api.peek(EXECUTIONS, NS, name)
    assert before is not None

    changed = copy.deepcopy(execution)
    changed["spec"]["input"] = {"order": {"id": "changed"}}
    manifest = tmp_path / "changed.yaml"
    manifest.write_text(yaml.safe_dump(changed))
    result = await kubectl.run("apply", "-f", str(manifest))

    assert result.stdout.strip() == f"execution.{GROUP}/{name} configured"
    after = api.peek(EXECUTIONS, NS, name)
    assert after is not None
    assert after["spec"] == changed["spec"]
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1


@pytest.mark.timeout(30)
async def test_apply_refuses_a_field_the_crd_does_not_declare(
    api: ApiServer, kubectl: Kubectl, tmp_path: Path
) -> None:
    misspelt = copy.deepcopy(of_kind("Execution")[0])
    misspelt["metadata"]["name"] = "misspelt"
    misspelt["spec"]["workflowRef"]["nmae"] = misspelt["spec"]["workflowRef"].pop("name")
    manifest = tmp_path / "misspelt.yaml"
    manifest.write_text(yaml.safe_dump(misspelt))

    result = await kubectl.run("apply", "-f", str(manifest), check=False)

    assert result.returncode != 0
    assert 'unknown field "spec.workflowRef.nmae"' in result.stderr
    assert api.peek(EXECUTIONS, NS, "misspelt") is None


# -- get -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_get_prints_the_crd_columns_with_values_from_status(
    samples: dict[str, Body], kubectl: Kubectl
) -> None:
    executions = [body for body in samples.values() if body["kind"] == "Execution"]
    assert any("status" in body for body in executions)
    assert any("status" not in body for body in executions)  # empty cells, not errors

    result = await kubectl.run("get", "executions")

    rows = parse_table(result.stdout)
    assert list(rows[0]) == headers("Execution")
    assert cells(rows) == {
        body["metadata"]["name"]: expected_execution_cells(body) for body in executions
    }

    workflows = [body for body in samples.values() if body["kind"] == "Workflow"]
    result = await kubectl.run("get", "workflows")
    rows = parse_table(result.stdout)
    assert list(rows[0]) == headers("Workflow")
    assert cells(rows) == {
        body["metadata"]["name"]: expected_workflow_cells(body) for body in workflows
    }


@pytest.mark.timeout(30)
async def test_category_and_short_names_print_the_same_tables(
    samples: dict[str, Body], kubectl: Kubectl
) -> None:
    by_resource = {
        kind: cells(parse_table((await kubectl.run("get", plural)).stdout))
        for kind, plural in (("Workflow", "workflows"), ("Execution", "executions"))
    }
    for kind, short_name in (("Workflow", "sfwf"), ("Execution", "sfex")):
        rows = parse_table((await kubectl.run("get", short_name)).stdout)
        assert list(rows[0]) == headers(kind)
        assert cells(rows) == by_resource[kind]

    # The `sagaflow` category: one table per kind, names qualified by kind and group.
    tables = parse_tables((await kubectl.run("get", "sagaflow")).stdout)
    assert len(tables) == 2
    for rows in tables:
        kind = next(k for k in by_resource if rows[0]["NAME"].startswith(f"{k.lower()}."))
        assert list(rows[0]) == headers(kind)
        prefix = f"{kind.lower()}.{GROUP}/"
        unqualified = [{**row, "NAME": row["NAME"].removeprefix(prefix)} for row in rows]
        assert cells(unqualified) == by_resource[kind]
        assert all(row["NAME"].startswith(prefix) for row in rows)


@pytest.mark.timeout(30)
async def test_get_selects_by_label_and_by_name(
    samples: dict[str, Body], client: KubeClient, kubectl: Kubectl
) -> None:
    names = sorted(name for name, body in samples.items() if body["kind"] == "Execution")
    labelled = names[-1]
    await client.patch(EXECUTIONS, NS, labelled, {"metadata": {"labels": {"team": "payments"}}})

    def printed(result_stdout: str) -> list[str]:
        return [row["NAME"] for row in parse_table(result_stdout)]

    assert printed((await kubectl.run("get", "sfex", "-l", "team=payments")).stdout) == [labelled]
    others = (await kubectl.run("get", "sfex", "-l", "team!=payments")).stdout
    assert sorted(printed(others)) == names[:-1]
    by_name = await kubectl.run("get", "sfex", "--field-selector", f"metadata.name={names[0]}")
    assert printed(by_name.stdout) == [names[0]]

    # As on a real server, a custom resource is not selectable by its status fields.
    refused = await kubectl.run(
        "get", "sfex", "--field-selector", "status.phase=Running", check=False
    )
    assert refused.returncode != 0 and "field label not supported" in refused.stderr


@pytest.mark.timeout(30)
async def test_get_jsonpath_and_delete(
    api: ApiServer, samples: dict[str, Body], kubectl: Kubectl
) -> None:
    name, body = next((n, b) for n, b in samples.items() if "currentSteps" in b.get("status", {}))
    template = "{.status.phase}/{.status.currentSteps[*]}/{.metadata.uid}"
    result = await kubectl.run("get", "execution", name, "-o", f"jsonpath={template}")
    status = body["status"]
    current = " ".join(status["currentSteps"])
    assert result.stdout == f"{status['phase']}/{current}/{body['metadata']['uid']}"

    deleted = await kubectl.run("delete", "execution", name)
    assert deleted.stdout.startswith(f'execution.{GROUP} "{name}" deleted')
    assert api.peek(EXECUTIONS, NS, name) is None
    gone = await kubectl.run("get", "execution", name, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    others = [n for n, b in samples.items() if b["kind"] == "Execution" and n != name]
    assert others and all(api.peek(EXECUTIONS, NS, other) is not None for other in others)


def is_watch_for(name: str) -> Callable[[Any], bool]:
    """A request predicate: a WATCH of Executions narrowed to `name` (how kubectl waits)."""
    watch = is_watch_of(EXECUTIONS)
    selector = f"metadata.name={name}"
    return lambda request: watch(request) and request.params.get("fieldSelector") == selector


@pytest.mark.timeout(30)
async def test_wait_follows_the_status_through_a_watch(
    api: ApiServer, samples: dict[str, Body], client: KubeClient, kubectl: Kubectl
) -> None:
    name, body = next((n, b) for n, b in samples.items() if "currentSteps" in b.get("status", {}))
    done = ExecutionPhase.COMPLETED.value
    assert body["status"]["phase"] != done
    waiting = asyncio.create_task(
        kubectl.run("wait", f"--for=jsonpath={{.status.phase}}={done}", f"execution/{name}")
    )
    # Listed and now watching: only the watch can tell kubectl about the change.
    await api.wait_for_request(is_watch_for(name))
    assert not waiting.done()
    status = {**body["status"], "phase": done, "currentSteps": []}
    await client.patch(EXECUTIONS, NS, name, {"status": status}, subresource="status")

    result = await waiting
    assert result.stdout.strip() == f"execution.{GROUP}/{name} condition met"


@pytest.mark.timeout(30)
async def test_delete_waits_for_the_finalizer(
    api: ApiServer, samples: dict[str, Body], client: KubeClient, kubectl: Kubectl
) -> None:
    name = next(n for n, b in samples.items() if b["kind"] == "Execution")
    finalizers = {"metadata": {"finalizers": [f"{GROUP}/cleanup"]}}
    await client.patch(EXECUTIONS, NS, name, finalizers)
    deleting = asyncio.create_task(kubectl.run("delete", "execution", name))

    def marked(body: Body | None) -> bool:
        return body is not None and "deletionTimestamp" in body["metadata"]

    await api.wait_for(EXECUTIONS, NS, name, marked)
    await api.wait_for_request(is_watch_for(name))
    assert not deleting.done()  # held by the finalizer, as the operator's would hold it
    await client.patch(EXECUTIONS, NS, name, {"metadata": {"finalizers": None}})

    result = await deleting
    assert result.stdout.startswith(f'execution.{GROUP} "{name}" deleted')
    assert api.peek(EXECUTIONS, NS, name) is None


# -- describe --------------------------------------------------------------------------


def _ago(minutes: int) -> str:
    moment = datetime.datetime.now(tz=datetime.UTC) - datetime.timedelta(minutes=minutes)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def event(involved: Body, reason: str, message: str, kind: str = "Normal", count: int = 1) -> Body:
    """A core/v1 Event about `involved` as the operator posts it."""
    meta = involved["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}."},
        "involvedObject": {
            "apiVersion": involved["apiVersion"],
            "kind": involved["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "reason": reason,
        "message": message,
        "type": kind,
        "source": {"component": "sagaflow"},
        "reportingComponent": "sagaflow",
        # First seen ten minutes ago, last five: describe prints "5m (xN over 10m)".
        "firstTimestamp": _ago(minutes=10),
        "lastTimestamp": _ago(minutes=5),
        "count": count,
    }


def events_section(described: str) -> list[dict[str, str]]:
    """The rows of the Events table at the end of `kubectl describe` output."""
    _, _, section = described.partition("\nEvents:")
    lines = [line[2:] for line in section.splitlines()[1:] if not line.strip().startswith("--")]
    return parse_table("\n".join(lines))


def field(described: str, label: str) -> list[str]:
    """Every value printed after `label:` (at any depth) in `kubectl describe` output."""
    return re.findall(rf"^\s*{re.escape(label)}:\s+(.*?)\s*$", described, flags=re.MULTILINE)


@pytest.mark.timeout(30)
async def test_describe_shows_status_and_only_this_objects_events(
    samples: dict[str, Body], client: KubeClient, kubectl: Kubectl
) -> None:
    name, body = next((n, b) for n, b in samples.items() if "currentSteps" in b.get("status", {}))
    other = next(b for n, b in samples.items() if b["kind"] == "Execution" and n != name)
    ours = [
        event(body, "Started", f"{name} started"),
        event(body, "StepRetrying", "charge failed; retrying", kind="Warning", count=3),
    ]
    stale = copy.deepcopy(ours[0])  # an earlier object of the same name: another uid
    stale["involvedObject"]["uid"] = "00000000-0000-0000-0000-000000000000"
    stale["message"] = "from an earlier object of that name"
    theirs = event(other, "Started", f"{other['metadata']['name']} started")
    for item in [*ours, stale, theirs]:
        await client.create(EVENTS, NS, item)

    described = (await kubectl.run("describe", "execution", name)).stdout

    status = body["status"]
    assert field(described, "Phase")[0] == status["phase"]  # the execution's, before steps'
    assert field(described, "Workflow Version") == [str(status["workflowVersion"])]
    for step in status["currentSteps"]:
        assert re.search(rf"Current Steps:\n(\s+\S+\n)*\s+{re.escape(step)}\n", described)
    assert field(described, "Attempts") == [str(step["attempts"]) for step in status["steps"]]
    assert status["error"]["message"] in field(described, "Message")
    assert status["error"]["type"] in field(described, "Type")
    assert field(described, "Next Retry At") == [status["nextRetryAt"]]
    condition = status["conditions"][0]
    assert condition["reason"] in field(described, "Reason")
    assert condition["message"] in field(described, "Message")

    rows = events_section(described)
    assert {(r["Type"], r["Reason"], r["From"], r["Message"]) for r in rows} == {
        (e["type"], e["reason"], e["source"]["component"], e["message"]) for e in ours
    }
    # Repeated events show their count and the time since the first (ten minutes ago).
    repeated = next(e for e in ours if e["count"] > 1)
    row = next(row for row in rows if row["Reason"] == repeated["reason"])
    assert row["Age"].endswith(f"(x{repeated['count']} over 10m)")
    assert stale["message"] not in described and theirs["message"] not in described
