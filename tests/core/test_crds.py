"""The generated CRDs: in step with the models, structural, and as strict as the models.

Three things are checked. The files in `crds/` are exactly what
`sagaflow.core.crds.render_yaml()` produces (drift). The schemas obey the Kubernetes
structural-schema rules the API server enforces (no `$ref`/`anyOf`/`allOf`, no
titles or defaults, a type on every property unless it preserves unknown fields).
And, with `jsonschema` installed, every sample manifest passes its CRD schema while
known-bad manifests fail it as well as the pydantic models.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from sagaflow.core.crds import custom_resource_definitions, peering_definitions, render_yaml
from sagaflow.core.manifests import Execution, Workflow
from sagaflow.core.trigger_specs import Schedule, Trigger

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
SAMPLES = sorted((REPO / "samples").rglob("*.yaml"))
REGENERATE = "regenerate with `python -m sagaflow.local.crdgen` from the repository root"

FORBIDDEN_KEYS = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "title", "default"}
PRESERVE = "x-kubernetes-preserve-unknown-fields"


def schemas() -> dict[str, dict[str, Any]]:
    """`{kind: openAPIV3Schema}` of every generated CRD."""
    return {
        crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for crd in custom_resource_definitions()
    }


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}[{index}]")


def sub_schemas(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node reachable through `properties` and `items`."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from sub_schemas(sub, f"{path}.{name}")
    if "items" in node:
        yield from sub_schemas(node["items"], f"{path}[]")


# --- drift ----------------------------------------------------------------------------


def test_files_in_crds_match_the_models() -> None:
    expected = render_yaml()
    on_disk = {path.name for path in CRDS.glob("*.yaml")}
    assert on_disk == set(expected), f"crds/ holds {sorted(on_disk)}; {REGENERATE}"
    for name, text in expected.items():
        assert (CRDS / name).read_text(encoding="utf-8") == text, (
            f"crds/{name} is out of date; {REGENERATE}"
        )


def test_files_are_plain_yaml_of_the_crds() -> None:
    loaded = [yaml.safe_load(text) for text in render_yaml().values()]
    assert loaded == custom_resource_definitions() + peering_definitions()


def test_peering_crds_are_structural_and_free_form() -> None:
    # kopf writes its own status into peering objects: the schema must keep it.
    for crd in peering_definitions():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema["type"] == "object"
        assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
    scopes = {c["spec"]["names"]["kind"]: c["spec"]["scope"] for c in peering_definitions()}
    assert scopes == {"ClusterKopfPeering": "Cluster", "KopfPeering": "Namespaced"}


# --- shape of the CRDs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "plural", "short_name"),
    [
        ("Workflow", "workflows", "sfwf"),
        ("Execution", "executions", "sfex"),
        ("Schedule", "schedules", "sfs"),
        ("Trigger", "triggers", "sft"),
    ],
)
def test_names_and_version(kind: str, plural: str, short_name: str) -> None:
    crd = next(c for c in custom_resource_definitions() if c["spec"]["names"]["kind"] == kind)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{plural}.sagaflow.io"
    spec = crd["spec"]
    assert spec["group"] == "sagaflow.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == plural
    assert spec["names"]["shortNames"] == [short_name]
    assert spec["names"]["categories"] == ["sagaflow"]
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


# --- structural-schema rules ----------------------------------------------------------


def test_every_kind_has_a_crd_in_order() -> None:
    kinds = [crd["spec"]["names"]["kind"] for crd in custom_resource_definitions()]
    assert kinds == ["Workflow", "Execution", "Schedule", "Trigger"]
    short_names = [
        n for crd in custom_resource_definitions() for n in crd["spec"]["names"]["shortNames"]
    ]
    assert len(set(short_names)) == len(short_names)


@pytest.mark.parametrize("kind", ["Workflow", "Execution", "Schedule", "Trigger"])
def test_schema_is_structural(kind: str) -> None:
    schema = schemas()[kind]
    for path, node in walk(schema):
        if isinstance(node, dict) and path.rsplit(".", 1)[-1] != "properties":
            found = FORBIDDEN_KEYS & set(node)
            assert not found, f"{kind}{path} has {sorted(found)}"
            assert node.get("additionalProperties") is not False, f"{kind}{path}"
    for path, node in sub_schemas(schema):
        assert "type" in node or node.get(PRESERVE) is True, f"{kind}{path} has no type"
        if node.get("type") == "object" and "properties" in node:
            assert "additionalProperties" not in node, f"{kind}{path}"
    assert schema["properties"]["metadata"] == {"type": "object"}


def test_free_form_fields_preserve_unknown_fields() -> None:
    workflow = schemas()["Workflow"]["properties"]["spec"]["properties"]
    execution = schemas()["Execution"]["properties"]
    step = workflow["steps"]["items"]["properties"]
    assert workflow["output"] == {PRESERVE: True}
    assert step["input"] == {"type": "object", PRESERVE: True, "nullable": True}
    assert execution["spec"]["properties"]["input"] == {"type": "object", PRESERVE: True}
    status = execution["status"]["properties"]
    assert status["output"] == {PRESERVE: True}
    assert status["steps"]["items"]["properties"]["output"] == {PRESERVE: True}


def test_durations_carry_the_duration_pattern() -> None:
    spec = schemas()["Workflow"]["properties"]["spec"]["properties"]
    step = spec["steps"]["items"]["properties"]
    duration_nodes = [
        spec["timeout"],
        step["timeout"],
        step["heartbeatTimeout"],
        spec["retry"]["properties"]["initialInterval"],
        step["retry"]["properties"]["maxInterval"],
    ]
    schedule = schemas()["Schedule"]["properties"]["spec"]["properties"]
    auth = schemas()["Trigger"]["properties"]["spec"]["properties"]["source"]["properties"]
    duration_nodes += [
        schedule["interval"],
        schedule["catchupWindow"],
        auth["http"]["properties"]["auth"]["properties"]["maxSkew"],
    ]
    for node in duration_nodes:
        assert node["type"] == "string" and node["pattern"].startswith("^(")


def _schema_at(schema: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    """Follow a printer-column path through the schema; None where it leaves it."""
    node: dict[str, Any] = schema
    for name, subscript in re.findall(r"\.(\w+)(\[[^\]]*\])?", json_path):
        if node.get("type") == "object" and "properties" not in node:
            return node  # free-form (metadata): anything goes below
        if name not in node.get("properties", {}):
            return None
        node = node["properties"][name]
        union = re.findall(r"'(\w+)'", subscript)
        if union:
            # A union of fields (`['cron','interval']`): each must be a field here.
            if not all(field in node.get("properties", {}) for field in union):
                return None
            node = node["properties"][union[0]]
        elif subscript:
            node = node["items"]
    return node


@pytest.mark.parametrize(
    "crd", custom_resource_definitions(), ids=lambda c: c["spec"]["names"]["kind"]
)
def test_printer_columns_point_at_schema_fields(crd: dict[str, Any]) -> None:
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns][-1] == "Age"
    for column in columns:
        assert _schema_at(schema, column["jsonPath"]) is not None, column


# --- validation against the schemas (needs jsonschema) ---------------------------------


def _as_json_schema(node: Any) -> Any:
    """OpenAPI `nullable: true` as JSON Schema: add `null` to the allowed types."""
    if isinstance(node, list):
        return [_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _as_json_schema(value) for key, value in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _errors(document: dict[str, Any]) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(_as_json_schema(schemas()[document["kind"]]))
    return [error.message for error in validator.iter_errors(document)]


def _sample_documents() -> list[dict[str, Any]]:
    return [
        doc
        for path in SAMPLES
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and doc.get("apiVersion") == "sagaflow.io/v1alpha1"
    ]


def test_there_are_samples_to_validate() -> None:
    kinds = {doc["kind"] for doc in _sample_documents()}
    assert {"Workflow", "Execution"} <= kinds <= set(schemas())


@pytest.mark.parametrize(
    "document", _sample_documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_samples_pass_their_crd_schema(document: dict[str, Any]) -> None:
    assert _errors(document) == []


def _order_workflow() -> dict[str, Any]:
    return next(d for d in _sample_documents() if d["metadata"]["name"] == "order-fulfilment")


def _order_execution() -> dict[str, Any]:
    return next(
        d
        for d in _sample_documents()
        if d["kind"] == "Execution" and d["spec"]["workflowRef"]["name"] == "order-fulfilment"
    )


MODELS: dict[str, Any] = {
    "Workflow": Workflow,
    "Execution": Execution,
    "Schedule": Schedule,
    "Trigger": Trigger,
}


def _schedule(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": "Schedule",
        "metadata": {"name": "nightly"},
        "spec": {
            "workflowRef": {"name": "report"},
            "cron": "0 2 * * *",
            "timezone": "Europe/Amsterdam",
            "input": {"day": "${{ schedule.time }}"},
            "overlap": "BufferOne",
            "catchupWindow": "1h30m",
            **spec,
        },
    }


def _trigger(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": "Trigger",
        "metadata": {"name": "orders"},
        "spec": {
            "workflowRef": {"name": "order"},
            "source": {"queue": "orders.submitted"},
            "filter": "${{ body.type == 'OrderSubmitted' }}",
            "input": {"order": "${{ body.order }}"},
            "idempotencyKey": "${{ body.order.id }}",
            **spec,
        },
    }


def _webhook(**auth: Any) -> dict[str, Any]:
    return _trigger(
        source={
            "http": {
                "path": "approvals",
                "auth": {"hmacSecretRef": {"name": "hook", "key": "secret"}, **auth},
            }
        },
        action="signal",
        signal="approval",
        correlationKey="${{ body.id }}",
    )


GOOD_SOURCES = {
    "schedule-cron": _schedule(),
    "schedule-interval": _schedule(cron=None, interval="15m", suspend=True),
    "trigger-queue": _trigger(),
    "trigger-webhook": _webhook(timestampHeader="X-Timestamp", maxSkew="2m"),
}


@pytest.mark.parametrize("document", list(GOOD_SOURCES.values()), ids=list(GOOD_SOURCES))
def test_good_schedules_and_triggers_pass_schema_and_models(document: dict[str, Any]) -> None:
    document = {**document, "spec": {k: v for k, v in document["spec"].items() if v is not None}}
    MODELS[document["kind"]].model_validate(document)
    assert _errors(document) == []


BAD_SOURCES = {
    "schedule-without-workflow": _schedule(workflowRef=None),
    "schedule-interval-words": _schedule(cron=None, interval="5 minutes"),
    "schedule-catchup-bare-number": _schedule(catchupWindow="60"),
    "schedule-unknown-overlap": _schedule(overlap="Never"),
    "schedule-suspend-string": _schedule(suspend="maybe"),
    "trigger-without-source": _trigger(source=None),
    "trigger-bad-queue": _trigger(source={"queue": "-orders"}),
    "trigger-unknown-action": _trigger(action="stop"),
    "trigger-bad-signal-name": _webhook() | {"spec": {**_webhook()["spec"], "signal": "1st"}},
    "webhook-path-with-slash": _trigger(
        source={"http": {"path": "a/b", "auth": {"bearerSecretRef": {"name": "h", "key": "k"}}}}
    ),
    "webhook-skew-bare-number": _webhook(maxSkew="300"),
    "webhook-secret-without-key": _trigger(
        source={"http": {"path": "a", "auth": {"hmacSecretRef": {"name": "h"}}}}
    ),
}


@pytest.mark.parametrize("document", list(BAD_SOURCES.values()), ids=list(BAD_SOURCES))
def test_bad_schedules_and_triggers_fail_both_schema_and_models(document: dict[str, Any]) -> None:
    document = {**document, "spec": {k: v for k, v in document["spec"].items() if v is not None}}
    with pytest.raises(ValidationError):
        MODELS[document["kind"]].model_validate(document)
    assert _errors(document), "the CRD schema accepted a manifest the models reject"


def _cells(document: dict[str, Any]) -> dict[str, Any]:
    """The printer columns of `document` as kube-apiserver fills them: each cell the
    first match of its column's JSONPath."""
    from tests.support.kube_tables import first_match

    crd = next(
        c for c in custom_resource_definitions() if c["spec"]["names"]["kind"] == document["kind"]
    )
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    return {c["name"]: first_match(c["jsonPath"], document) for c in columns if c["name"] != "Age"}


def test_schedule_columns_show_cron_or_interval_and_the_status() -> None:
    status = {
        "lastScheduleTime": "2026-01-01T01:00:00Z",
        "nextScheduleTime": "2026-01-02T01:00:00Z",
        "active": ["nightly-1"],
        "started": 3,
    }
    assert _cells({**_schedule(), "status": status}) == {
        "Workflow": "report",
        "Schedule": "0 2 * * *",
        "Timezone": "Europe/Amsterdam",
        "Suspend": None,
        "Last Schedule": "2026-01-01T01:00:00Z",
        "Next": "2026-01-02T01:00:00Z",
        "Active": ["nightly-1"],
    }
    interval = _schedule(interval="15m", suspend=True)
    del interval["spec"]["cron"]
    cells = _cells(interval)
    assert (cells["Schedule"], cells["Suspend"], cells["Active"]) == ("15m", True, None)


def test_trigger_columns_show_the_queue_or_the_webhook_and_the_counts() -> None:
    status = {"started": 4, "filtered": 2, "duplicates": 1}
    assert _cells({**_trigger(), "status": status}) == {
        "Workflow": "order",
        "Queue": "orders.submitted",
        "Webhook": None,
        "Action": None,
        "Started": 4,
        "Filtered": 2,
    }
    cells = _cells(_webhook())
    assert (cells["Queue"], cells["Webhook"], cells["Action"]) == (None, "approvals", "signal")


def _missing_workflow_ref() -> dict[str, Any]:
    doc = copy.deepcopy(_order_execution())
    del doc["spec"]["workflowRef"]
    return doc


def _bad_step_name() -> dict[str, Any]:
    doc = copy.deepcopy(_order_workflow())
    doc["spec"]["steps"][0]["name"] = "1-validate"
    return doc


def _bad_duration() -> dict[str, Any]:
    doc = copy.deepcopy(_order_workflow())
    doc["spec"]["steps"][1]["timeout"] = "30 seconds"
    return doc


def _bad_retry_duration() -> dict[str, Any]:
    doc = copy.deepcopy(_order_workflow())
    doc["spec"]["retry"]["maxInterval"] = "5"
    return doc


def _zero_max_attempts() -> dict[str, Any]:
    doc = copy.deepcopy(_order_workflow())
    doc["spec"]["steps"][2]["retry"]["maxAttempts"] = 0
    return doc


def _no_steps() -> dict[str, Any]:
    doc = copy.deepcopy(_order_workflow())
    doc["spec"]["steps"] = []
    return doc


@pytest.mark.parametrize(
    "make",
    [
        _missing_workflow_ref,
        _bad_step_name,
        _bad_duration,
        _bad_retry_duration,
        _zero_max_attempts,
        _no_steps,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_manifests_fail_both_schema_and_models(make: Any) -> None:
    document = make()
    model = MODELS[document["kind"]]
    with pytest.raises(ValidationError):
        model.model_validate(document)
    assert _errors(document), "the CRD schema accepted a manifest the models reject"


def test_the_status_projection_fits_the_status_model_the_crd_is_made_from() -> None:
    """What the mirror writes must survive the API server's schema: nothing pruned."""
    from datetime import UTC, datetime

    from sagaflow.core.definition import compile_definition
    from sagaflow.core.engine import decide
    from sagaflow.core.facts import Start, StepFailed
    from sagaflow.core.manifests import ExecutionStatus, WorkflowSpec
    from sagaflow.core.state import new_execution
    from sagaflow.core.status import execution_status

    spec = WorkflowSpec.model_validate(
        {"steps": [{"name": "a", "type": "x.a"}, {"name": "b", "type": "x.b"}]}
    )
    definition = compile_definition(spec, name="w", version=1)
    state = new_execution(
        execution_id="e",
        namespace="default",
        name="r",
        workflow="w",
        version=1,
        input={},
        step_names=("a", "b"),
    )
    now = datetime(2026, 1, 1, tzinfo=UTC)
    state = decide(state, definition, Start(), now).state
    state = decide(state, definition, StepFailed("a", 1, "Boom", "x"), now).state
    status = execution_status(state)
    model = ExecutionStatus.model_validate(status)
    assert model.model_dump(mode="json", by_alias=True, exclude_defaults=True) == {
        k: v for k, v in status.items() if v not in (None, [], ())
    }
    assert status["currentSteps"] == ["a", "b"]
