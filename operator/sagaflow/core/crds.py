"""The CustomResourceDefinitions of `sagaflow.io/v1alpha1`, derived from the manifest models.

`sagaflow.core.manifests` (Workflow, Execution) and `sagaflow.core.trigger_specs`
(Schedule, Trigger) are the one description of what each kind may contain. This
module turns those pydantic models into `apiextensions.k8s.io/v1` CRDs, so the API
server rejects what local mode would reject and the two can never drift apart by hand.
Kubernetes demands *structural* schemas, so the pydantic JSON Schema is rewritten:
`$ref`s inlined, `anyOf [X, null]` folded into `X` with `nullable: true`, titles and
defaults dropped (defaults would make the API server rewrite stored objects; the models
apply them when they read), and free-form JSON marked
`x-kubernetes-preserve-unknown-fields`. Duration strings carry
`DURATION_PATTERN`, which the models only check in a validator.

Short names are `sfwf`, `sfex`, `sfs` and `sft`: `wf` is taken by Argo Workflows and
`ex` is too generic to be safe in a shared cluster; every one starts with `sf`.
`kubectl get sagaflow` lists all four kinds. Cross-field rules of the models (exactly
one of cron and interval, of a queue and a webhook) stay in their validators: the
operator refuses such an object with the field's path.

Printer columns are evaluated by kube-apiserver, which shows a cell's first match: a
union of two fields (`.spec['cron','interval']`) shows whichever of the two is set. A
future time is a `string` column, since a `date` column prints an age and a time to
come has none.

Pure: no I/O. `python -m sagaflow.local.crdgen` writes the files to `crds/`.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from sagaflow.core.durations import DURATION_PATTERN
from sagaflow.core.manifests import (
    API_GROUP,
    ExecutionSpec,
    ExecutionStatus,
    RetryPolicy,
    StepSpec,
    WorkflowSpec,
    WorkflowStatus,
)
from sagaflow.core.trigger_specs import (
    ScheduleSpec,
    ScheduleStatus,
    TriggerSpec,
    TriggerStatus,
    WebhookAuth,
)

VERSION = "v1alpha1"
CATEGORIES = ["sagaflow"]
HEADER = (
    "# generated from operator/sagaflow/core (manifests.py, crds.py) by "
    "`python -m sagaflow.local.crdgen`; do not edit\n"
)

# Fields holding duration strings, per model. The models check them in a validator,
# which JSON Schema cannot see, so the pattern is added here.
DURATION_FIELDS: dict[type[BaseModel], tuple[str, ...]] = {
    RetryPolicy: ("initial_interval", "max_interval"),
    StepSpec: ("timeout", "heartbeat_timeout"),
    WorkflowSpec: ("timeout",),
    ScheduleSpec: ("interval", "catchup_window"),
    WebhookAuth: ("max_skew",),
}

# Keys Kubernetes rejects in a structural schema or that would make it mutate objects.
_DROPPED_KEYS = frozenset({"title", "default", "additionalProperties", "$defs"})
_PRESERVE = "x-kubernetes-preserve-unknown-fields"

Schema = dict[str, Any]


def _duration_aliases() -> dict[str, tuple[str, ...]]:
    aliases: dict[str, tuple[str, ...]] = {}
    for model, fields in DURATION_FIELDS.items():
        aliases[model.__name__] = tuple(
            model.model_fields[field].alias or field for field in fields
        )
    return aliases


def _mark_durations(node: Schema, aliases: dict[str, tuple[str, ...]]) -> None:
    """Add the duration pattern to the named properties of one model's schema."""
    for alias in aliases.get(str(node.get("title", "")), ()):
        node["properties"][alias]["pattern"] = DURATION_PATTERN


def _structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Rewrite one pydantic JSON Schema node into a Kubernetes structural schema node."""
    if "$ref" in node:
        name = str(node["$ref"]).removeprefix("#/$defs/")
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _structural({**defs[name], **extra}, defs)
    if "anyOf" in node:
        options = node["anyOf"]
        others = [o for o in options if o != {"type": "null"}]
        if len(options) != 2 or len(others) != 1:
            raise ValueError(f"only `X | None` unions can be expressed in a CRD: {options}")
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        return {**_structural({**others[0], **outer}, defs), "nullable": True}
    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        else:
            out[key] = value
    if "type" not in out and "enum" not in out:
        # `Any`: free-form JSON of any shape.
        out[_PRESERVE] = True
    elif out.get("type") == "object" and "properties" not in out:
        # `dict[str, Any]`: a free-form JSON object.
        out[_PRESERVE] = True
    if "type" in out:
        out = {"type": out["type"], **out}
    return out


def model_schema(model: type[BaseModel]) -> Schema:
    """The structural schema of one manifest model, `$ref`-free and Kubernetes-ready."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    aliases = _duration_aliases()
    defs: dict[str, Schema] = raw.get("$defs", {})
    for sub in (raw, *defs.values()):
        _mark_durations(sub, aliases)
    return _structural(raw, defs)


def _resource_schema(spec: Schema, status: Schema) -> Schema:
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def _column(name: str, json_path: str, kind: str = "string", **extra: Any) -> Schema:
    return {"name": name, "type": kind, "jsonPath": json_path, **extra}


_AGE = _column("Age", ".metadata.creationTimestamp", "date")

# Step is the first current step; Attempts that of the first running step (kubectl
# prints a path's first match).
_EXECUTION_COLUMNS = [
    _column("Workflow", ".spec.workflowRef.name"),
    _column("Version", ".status.workflowVersion", "integer"),
    _column("Phase", ".status.phase"),
    _column("Step", ".status.currentSteps[0]"),
    _column("Attempts", '.status.steps[?(@.phase=="Running")].attempts', "integer"),
    _AGE,
]

_WORKFLOW_COLUMNS = [
    _column("Version", ".status.version", "integer"),
    _column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
    _AGE,
]


# kubectl shows an empty cell for a field left at its default (CRDs carry no defaults):
# a blank Timezone is UTC, a blank Suspend or Action the model's default.
_SCHEDULE_COLUMNS = [
    _column("Workflow", ".spec.workflowRef.name"),
    _column("Schedule", ".spec['cron','interval']"),
    _column("Timezone", ".spec.timezone"),
    _column("Suspend", ".spec.suspend", "boolean"),
    _column("Last Schedule", ".status.lastScheduleTime", "date"),
    _column("Next", ".status.nextScheduleTime"),
    # The names of the runs not finished yet: the status holds names, not a count.
    _column("Active", ".status.active"),
    _AGE,
]

# The source is a queue or a webhook path: two columns, since a union reaching into a
# nested field (`['queue','http.path']`) is a path to kube-apiserver but a literal key
# to jsonpath-ng and other JSONPath readers.
_TRIGGER_COLUMNS = [
    _column("Workflow", ".spec.workflowRef.name"),
    _column("Queue", ".spec.source.queue"),
    _column("Webhook", ".spec.source.http.path"),
    _column("Action", ".spec.action"),
    _column("Started", ".status.started", "integer"),
    _column("Filtered", ".status.filtered", "integer"),
    _AGE,
]


def _crd(kind: str, plural: str, short_name: str, schema: Schema, columns: list[Schema]) -> Schema:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def custom_resource_definitions() -> list[dict[str, Any]]:
    """The Workflow, Execution, Schedule and Trigger CRDs, in that order."""
    workflow = _resource_schema(model_schema(WorkflowSpec), model_schema(WorkflowStatus))
    execution = _resource_schema(model_schema(ExecutionSpec), model_schema(ExecutionStatus))
    schedule = _resource_schema(model_schema(ScheduleSpec), model_schema(ScheduleStatus))
    trigger = _resource_schema(model_schema(TriggerSpec), model_schema(TriggerStatus))
    return [
        _crd("Workflow", "workflows", "sfwf", workflow, _WORKFLOW_COLUMNS),
        _crd("Execution", "executions", "sfex", execution, _EXECUTION_COLUMNS),
        _crd("Schedule", "schedules", "sfs", schedule, _SCHEDULE_COLUMNS),
        _crd("Trigger", "triggers", "sft", trigger, _TRIGGER_COLUMNS),
    ]


class _NoAliasDumper(yaml.SafeDumper):
    """Writes repeated sub-schemas out in full: anchors would make the files unreadable."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


PEERING_GROUP = "kopf.dev"


def peering_definitions() -> list[dict[str, Any]]:
    """The CRDs of kopf's peering objects, through which operator replicas elect one
    to run handlers: `ClusterKopfPeering` for a cluster-wide operator, `KopfPeering`
    for one that watches namespaces. kopf reads and writes their free-form status."""
    free_form = {
        "type": "object",
        "properties": {
            "status": {"type": "object", _PRESERVE: True},
        },
        _PRESERVE: True,
    }
    crds = []
    for kind, plural, scope in (
        ("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
        ("KopfPeering", "kopfpeerings", "Namespaced"),
    ):
        crds.append(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{plural}.{PEERING_GROUP}"},
                "spec": {
                    "group": PEERING_GROUP,
                    "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                    "scope": scope,
                    "versions": [
                        {
                            "name": "v1",
                            "served": True,
                            "storage": True,
                            "schema": {"openAPIV3Schema": free_form},
                        }
                    ],
                },
            }
        )
    return crds


def render_yaml() -> dict[str, str]:
    """`{file name: YAML text}` for `crds/`, one file per CRD (ours, then kopf's peering)."""
    return {
        f"{crd['spec']['group']}_{crd['spec']['names']['plural']}.yaml": HEADER
        + yaml.dump(crd, Dumper=_NoAliasDumper, sort_keys=False, width=100)
        for crd in custom_resource_definitions() + peering_definitions()
    }
