"""The Helm chart: renders, lints, rejects bad values, least privilege, Argo CD friendly.

Helm runs through `helm-python-sdk` (no helm binary) and the Argo CD health checks run
under `lupa`; both are optional, so the suite skips without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_values import env_of, merged

helm_python = pytest.importorskip("helm_python")
lupa = pytest.importorskip("lupa")

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sagaflow"
ARGOCD = CHART / "argocd"
RELEASE = "sf"
NAMESPACE = "sagaflow-system"

AZURE_VALUES: dict[str, Any] = {
    "image": {"repository": "acr.example.io/sagaflow", "tag": "1.2.3", "pullPolicy": "Always"},
    "serviceAccount": {"annotations": {"example.io/team": "flows"}},
    "workloadIdentity": {"enabled": True, "clientId": "00000000-0000-0000-0000-000000000001"},
    "rbac": {"watchNamespaces": ["orders", "billing"]},
    "database": {"urlSecret": {"name": "sagaflow-pg", "key": "dsn"}},
    "bus": {
        "type": "servicebus",
        "servicebus": {"connectionStringSecret": {"name": "sagaflow-sb", "key": "conn"}},
    },
    "payloads": {
        "type": "azureblob",
        "thresholdBytes": 32768,
        "azureblob": {
            "connectionStringSecret": {"name": "sagaflow-blob", "key": "conn"},
            "container": "flow-payloads",
            "createContainer": True,
        },
    },
    "logLevel": "INFO",
    "operator": {"replicas": 2, "healthPort": 9090},
    "runners": [
        {
            "name": "inventory",
            "modules": ["acme.inventory.steps", "acme.shipping.steps"],
            "replicas": 3,
            "resources": {"requests": {"cpu": "100m"}, "limits": {"memory": "512Mi"}},
        },
        {
            "name": "payments",
            "image": {"repository": "acr.example.io/payments-steps", "tag": "4.5.6"},
            "modules": ["acme.payments"],
        },
    ],
}

IDENTITY_VALUES: dict[str, Any] = {
    "workloadIdentity": {"enabled": True, "clientId": "00000000-0000-0000-0000-000000000002"},
    "bus": {"type": "servicebus", "servicebus": {"namespace": "acme.servicebus.windows.net"}},
    "payloads": {
        "type": "azureblob",
        "azureblob": {"accountUrl": "https://acmeflows.blob.core.windows.net"},
    },
    "runners": [{"name": "inventory", "modules": ["acme.inventory.steps"]}],
}


INGRESS_VALUES: dict[str, Any] = {
    "api": {
        "port": 9443,
        "service": {"type": "LoadBalancer", "annotations": {"example.io/lb": "internal"}},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "host": "flows.example.com",
            "path": "/v1",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "4m"},
            "tls": [{"secretName": "flows-tls", "hosts": ["flows.example.com"]}],
        },
    }
}


@pytest.fixture(scope="module")
def chart() -> Any:
    loaded = helm_python.Chart.load(CHART)
    yield loaded
    loaded.close()


def render(chart: Any, values: dict[str, Any] | None = None, **options: Any) -> dict[str, str]:
    options.setdefault("is_install", True)
    rendered: dict[str, str] = chart.render(
        values or {}, name=RELEASE, namespace=NAMESPACE, **options
    )
    return rendered


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for _path, text in sorted(rendered.items()):
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        c for d in of_kind(docs, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]
    ]


# --- rendering and lint ------------------------------------------------------------


def test_renders_with_default_values(chart: Any) -> None:
    docs = documents(render(chart))
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ClusterKopfPeering",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    (operator,) = containers(docs)
    assert operator["command"] == ["sagaflow", "operator"]
    assert operator["image"] == f"ghcr.io/sagaflow/sagaflow:{chart.metadata['appVersion']}"
    assert operator["imagePullPolicy"] == "IfNotPresent"
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert operator["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert operator["ports"] == [
        {"name": "health", "containerPort": 8080, "protocol": "TCP"},
        {"name": "api", "containerPort": 8090, "protocol": "TCP"},
    ]
    assert operator["resources"]["requests"] and operator["resources"]["limits"]
    security = operator["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    env = env_of(operator)
    assert env["SAGAFLOW_API_PORT"] == {"name": "SAGAFLOW_API_PORT", "value": "8090"}
    assert env["SAGAFLOW_BUS"]["value"] == "postgres"
    assert env["SAGAFLOW_PAYLOADS"]["value"] == "local"
    assert env["SAGAFLOW_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "sagaflow-database",
        "key": "url",
    }


def test_full_azure_example_renders_runners_and_identity(chart: Any) -> None:
    docs = documents(render(chart, AZURE_VALUES))
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    assert set(deployments) == {
        "sf-sagaflow-operator",
        "sf-sagaflow-runner-inventory",
        "sf-sagaflow-runner-payments",
    }
    inventory = deployments["sf-sagaflow-runner-inventory"]
    assert inventory["spec"]["replicas"] == 3
    (runner,) = inventory["spec"]["template"]["spec"]["containers"]
    assert runner["command"] == [
        "sagaflow",
        "runner",
        "--module",
        "acme.inventory.steps",
        "--module",
        "acme.shipping.steps",
    ]
    assert runner["image"] == "acr.example.io/sagaflow:1.2.3"
    assert runner["resources"] == {"requests": {"cpu": "100m"}, "limits": {"memory": "512Mi"}}
    payments = deployments["sf-sagaflow-runner-payments"]["spec"]["template"]["spec"]
    assert payments["containers"][0]["image"] == "acr.example.io/payments-steps:4.5.6"
    assert payments["automountServiceAccountToken"] is False
    operator = deployments["sf-sagaflow-operator"]
    assert operator["spec"]["replicas"] == 2
    assert (
        operator["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == 9090
    )
    for deployment in deployments.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["azure.workload.identity/use"] == "true"
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        assert env["SAGAFLOW_BUS"]["value"] == "servicebus"
        assert env["SAGAFLOW_PAYLOADS"]["value"] == "azureblob"
        assert env["SAGAFLOW_BLOB_CONTAINER"]["value"] == "flow-payloads"
        assert env["SAGAFLOW_BLOB_CREATE_CONTAINER"]["value"] == "true"
        assert env["SAGAFLOW_PAYLOAD_THRESHOLD_BYTES"]["value"] == "32768"
        assert env["SAGAFLOW_LOG_LEVEL"]["value"] == "INFO"
    for account in of_kind(docs, "ServiceAccount"):
        annotations = account["metadata"]["annotations"]
        assert annotations["azure.workload.identity/client-id"].endswith("0001")
        assert annotations["example.io/team"] == "flows"


def test_runner_replicas_zero_and_existing_service_account(chart: Any) -> None:
    values = {
        "serviceAccount": {"create": False, "name": "platform-sagaflow"},
        "runners": [{"name": "idle", "modules": ["acme.idle"], "replicas": 0}],
    }
    docs = documents(render(chart, values))
    assert not of_kind(docs, "ServiceAccount")
    runner = next(d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("idle"))
    assert runner["spec"]["replicas"] == 0
    for deployment in of_kind(docs, "Deployment"):
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sagaflow"


def test_workload_identity_without_connection_strings(chart: Any) -> None:
    docs = documents(render(chart, IDENTITY_VALUES))
    for container in containers(docs):
        env = env_of(container)
        assert env["SAGAFLOW_SERVICEBUS_NAMESPACE"]["value"] == "acme.servicebus.windows.net"
        assert (
            env["SAGAFLOW_BLOB_ACCOUNT_URL"]["value"] == "https://acmeflows.blob.core.windows.net"
        )
        assert "SAGAFLOW_SERVICEBUS_CONNECTION_STRING" not in env
        assert "SAGAFLOW_BLOB_CONNECTION_STRING" not in env


@pytest.mark.parametrize(
    "values",
    [{}, AZURE_VALUES, IDENTITY_VALUES, INGRESS_VALUES],
    ids=["default", "azure", "identity", "ingress"],
)
def test_lint_passes_without_errors(values: dict[str, Any]) -> None:
    report = helm_python.lint(CHART, values, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- the API: Service, Ingress ------------------------------------------------------


def test_the_api_service_reaches_the_operator_pods_by_port_name(chart: Any) -> None:
    docs = documents(render(chart))
    (service,) = of_kind(docs, "Service")
    assert service["metadata"]["name"] == "sf-sagaflow-api"
    assert service["metadata"]["namespace"] == NAMESPACE
    assert "annotations" not in service["metadata"]
    spec = service["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["ports"] == [{"name": "api", "port": 8090, "targetPort": "api", "protocol": "TCP"}]
    (operator,) = of_kind(docs, "Deployment")
    pod_labels = operator["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= pod_labels.items()
    assert spec["selector"]["app.kubernetes.io/component"] == "operator"
    assert not of_kind(docs, "Ingress")


def test_the_api_port_and_an_ingress_follow_the_values(chart: Any) -> None:
    docs = documents(render(chart, INGRESS_VALUES))
    (operator,) = containers(docs)
    assert {"name": "api", "containerPort": 9443, "protocol": "TCP"} in operator["ports"]
    assert env_of(operator)["SAGAFLOW_API_PORT"]["value"] == "9443"
    (service,) = of_kind(docs, "Service")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"][0]["port"] == 9443
    assert service["metadata"]["annotations"] == {"example.io/lb": "internal"}
    (ingress,) = of_kind(docs, "Ingress")
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    assert ingress["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/proxy-body-size": "4m"
    }
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"secretName": "flows-tls", "hosts": ["flows.example.com"]}]
    (rule,) = spec["rules"]
    assert rule["host"] == "flows.example.com"
    assert rule["http"]["paths"] == [
        {
            "path": "/v1",
            "pathType": "Prefix",
            "backend": {"service": {"name": "sf-sagaflow-api", "port": {"name": "api"}}},
        }
    ]


def test_an_ingress_without_class_or_tls_leaves_them_to_the_cluster(chart: Any) -> None:
    values = {"api": {"ingress": {"enabled": True, "host": "flows.example.com"}}}
    (ingress,) = of_kind(documents(render(chart, values)), "Ingress")
    assert "ingressClassName" not in ingress["spec"] and "tls" not in ingress["spec"]
    assert "annotations" not in ingress["metadata"]
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/"


def test_the_api_and_health_ports_must_differ(chart: Any) -> None:
    with pytest.raises(helm_python.HelmError, match=r"api\.port and operator\.healthPort"):
        render(chart, {"api": {"port": 8080}})


# --- values schema -----------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [{}, AZURE_VALUES, IDENTITY_VALUES, INGRESS_VALUES],
    ids=["default", "azure", "identity", "ingress"],
)
def test_schema_accepts_good_values(chart: Any, values: dict[str, Any]) -> None:
    chart.validate_schema(merged(chart.values, values))


BAD_VALUES = {
    "bus-enum": {"bus": {"type": "kafka"}},
    "payloads-enum": {"payloads": {"type": "s3"}},
    # null removes the default name, as `--set database.urlSecret.name=null` would
    "database-secret-name-missing": {"database": {"urlSecret": {"name": None, "key": "url"}}},
    "database-secret-name-empty": {"database": {"urlSecret": {"name": "", "key": "url"}}},
    "servicebus-secret-name-missing": {
        "bus": {"type": "servicebus", "servicebus": {"connectionStringSecret": {"key": "conn"}}}
    },
    "servicebus-without-auth": {"bus": {"type": "servicebus"}},
    "blob-secret-name-missing": {
        "payloads": {
            "type": "azureblob",
            "azureblob": {"connectionStringSecret": {"key": "conn"}},
        }
    },
    "blob-without-auth": {"payloads": {"type": "azureblob"}},
    "negative-operator-replicas": {"operator": {"replicas": -1}},
    "negative-runner-replicas": {"runners": [{"name": "a", "modules": ["m"], "replicas": -2}]},
    "string-port": {"operator": {"healthPort": "8080"}},
    "fractional-port": {"operator": {"healthPort": 8080.5}},
    "unknown-top-level-key": {"databse": {"urlSecret": {"name": "x", "key": "y"}}},
    "runner-without-modules": {"runners": [{"name": "a", "modules": []}]},
    "inlined-secret-value": {
        "database": {"urlSecret": {"name": "x", "key": "y", "value": "pg://"}}
    },
    "string-api-port": {"api": {"port": "8090"}},
    "api-port-out-of-range": {"api": {"port": 70000}},
    "unknown-api-key": {"api": {"prot": 8090}},
    "unknown-service-type": {"api": {"service": {"type": "ExternalName"}}},
    "ingress-without-host": {"api": {"ingress": {"enabled": True}}},
    "ingress-empty-host": {"api": {"ingress": {"enabled": True, "host": ""}}},
    "ingress-relative-path": {"api": {"ingress": {"enabled": True, "host": "a.b", "path": "v1"}}},
    "ingress-tls-without-hosts": {
        "api": {"ingress": {"enabled": True, "host": "a.b", "tls": [{"secretName": "t"}]}}
    },
}


@pytest.mark.parametrize("bad", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_schema_rejects_bad_values(chart: Any, bad: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema(merged(chart.values, bad))
    with pytest.raises(helm_python.HelmError):
        render(chart, bad)


# --- least privilege, secrets, determinism -----------------------------------------


@pytest.mark.parametrize("values", [{}, AZURE_VALUES], ids=["cluster", "namespaced"])
def test_rbac_lists_everything_exactly(chart: Any, values: dict[str, Any]) -> None:
    docs = documents(render(chart, values))
    roles = of_kind(docs, "ClusterRole") + of_kind(docs, "Role")
    assert roles
    granted: set[tuple[str, str, str]] = set()
    for role in roles:
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups"):
                assert all("*" not in item for item in rule[field]), (role["metadata"], rule)
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
            granted |= {
                (g, r, v)
                for g in rule["apiGroups"]
                for r in rule["resources"]
                for v in rule["verbs"]
            }
    for resource in ("workflows", "executions", "schedules", "triggers"):
        for verb in ("get", "list", "watch", "patch"):
            assert ("sagaflow.io", resource, verb) in granted
        assert ("sagaflow.io", f"{resource}/status", "patch") in granted
    for resource in ("workflows", "executions"):
        assert ("sagaflow.io", f"{resource}/finalizers", "update") in granted
    assert {("", "events", "create"), ("", "events", "patch")} <= granted
    assert ("kopf.dev", "kopfpeerings", "watch") in granted
    # Delete only where the operator deletes: finished Executions past their TTL.
    assert {(g, r) for g, r, v in granted if v == "delete"} == {("sagaflow.io", "executions")}
    # Create: Executions (children, schedules, triggers, the API), Events, and reviews.
    assert {(g, r) for g, r, v in granted if v == "create"} == {
        ("sagaflow.io", "executions"),
        ("", "events"),
        ("authentication.k8s.io", "tokenreviews"),
        ("authorization.k8s.io", "subjectaccessreviews"),
    }
    # Webhook secrets are read by name: never listed or watched, never written.
    assert {v for g, r, v in granted if r == "secrets"} == {"get"}
    assert {r for g, r, _v in granted if g == ""} == {"events", "secrets"}
    verbs = {v for _g, _r, v in granted}
    assert verbs <= {"get", "list", "watch", "patch", "update", "create", "delete"}


@pytest.mark.parametrize(
    ("values", "kind", "namespaces"),
    [({}, "ClusterKopfPeering", [None]), (AZURE_VALUES, "KopfPeering", ["billing", "orders"])],
    ids=["cluster", "namespaced"],
)
def test_peering_objects_match_the_watch_scope(
    chart: Any, values: dict[str, Any], kind: str, namespaces: list[str | None]
) -> None:
    docs = documents(render(chart, values))
    peerings = of_kind(docs, kind)
    assert sorted(p["metadata"].get("namespace") or "" for p in peerings) == sorted(
        n or "" for n in namespaces
    )
    (operator,) = [c for c in containers(docs) if c["name"] == "operator"]
    assert {p["metadata"]["name"] for p in peerings} == {
        env_of(operator)["SAGAFLOW_PEERING_NAME"]["value"]
    }
    docs = documents(render(chart, {**values, "operator": {"peering": False}}))
    assert not of_kind(docs, "ClusterKopfPeering") and not of_kind(docs, "KopfPeering")
    (operator,) = [c for c in containers(docs) if c["name"] == "operator"]
    assert "SAGAFLOW_PEERING_NAME" not in env_of(operator)


def test_namespaced_rbac_has_one_role_per_watched_namespace(chart: Any) -> None:
    docs = documents(render(chart, AZURE_VALUES))
    # Cluster-wide only what a Role cannot grant: token and access reviews.
    (auth,) = of_kind(docs, "ClusterRole")
    assert auth["metadata"]["name"] == "sf-sagaflow-auth"
    assert auth["rules"] == [
        {
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"],
        },
        {
            "apiGroups": ["authorization.k8s.io"],
            "resources": ["subjectaccessreviews"],
            "verbs": ["create"],
        },
    ]
    (auth_binding,) = of_kind(docs, "ClusterRoleBinding")
    assert auth_binding["roleRef"]["name"] == "sf-sagaflow-auth"
    assert auth_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "sf-sagaflow", "namespace": NAMESPACE}
    ]
    for role in of_kind(docs, "Role"):
        groups = {g for rule in role["rules"] for g in rule["apiGroups"]}
        assert groups == {"sagaflow.io", "", "kopf.dev"}
    assert sorted(r["metadata"]["namespace"] for r in of_kind(docs, "Role")) == [
        "billing",
        "orders",
    ]
    bindings = of_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["billing", "orders"]
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "sf-sagaflow", "namespace": NAMESPACE}
        ]
    (operator,) = [c for c in containers(docs) if c["name"] == "operator"]
    assert env_of(operator)["SAGAFLOW_WATCH_NAMESPACES"]["value"] == "orders,billing"


SECRET_ENV = {
    "SAGAFLOW_DATABASE_URL": {"name": "sagaflow-pg", "key": "dsn"},
    "SAGAFLOW_SERVICEBUS_CONNECTION_STRING": {"name": "sagaflow-sb", "key": "conn"},
    "SAGAFLOW_BLOB_CONNECTION_STRING": {"name": "sagaflow-blob", "key": "conn"},
}


def test_secrets_are_referenced_never_inlined(chart: Any) -> None:
    docs = documents(render(chart, AZURE_VALUES))
    assert not of_kind(docs, "Secret")
    found = containers(docs)
    assert len(found) == 3
    for container in found:
        env = env_of(container)
        for name, ref in SECRET_ENV.items():
            assert "value" not in env[name]
            assert env[name]["valueFrom"] == {"secretKeyRef": ref}


def test_rendering_is_deterministic(chart: Any) -> None:
    for values in ({}, AZURE_VALUES):
        first = render(chart, values)
        assert render(chart, values) == first
        # An upgrade (what Argo CD compares against) renders the same manifests.
        upgrade = render(chart, values, is_install=False, is_upgrade=True, revision=7)
        assert upgrade == first
    for template in (CHART / "templates").iterdir():
        text = template.read_text()
        for volatile in (
            "randAlpha",
            "randNumeric",
            "randAscii",
            "randBytes",
            "uuidv4",
            "now",
            "genCA",
        ):
            assert volatile not in text, (template.name, volatile)


def test_chart_crds_match_generated_crds() -> None:
    generated = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    shipped = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert generated, "no generated CRDs in crds/"
    assert shipped == generated, "charts/sagaflow/crds/ drifted from crds/: copy them again"


def test_loaded_chart_carries_the_crds(chart: Any) -> None:
    shipped = {Path(c["name"]).name: c["data"] for c in chart.crds}
    generated = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert shipped == generated
    names = {yaml.safe_load(text)["metadata"]["name"] for text in shipped.values()}
    assert names == {
        "executions.sagaflow.io",
        "workflows.sagaflow.io",
        "schedules.sagaflow.io",
        "triggers.sagaflow.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }


# --- Argo CD health checks ---------------------------------------------------------


def run_health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    script = (ARGOCD / f"sagaflow.io_{kind}" / "health.lua").read_text()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(script)
    return result["status"], result["message"]


def execution(status: dict[str, Any] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": "Execution",
        "metadata": {"name": "order-1", "namespace": "orders", "generation": 1},
        "spec": {"workflowRef": {"name": "order"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def succeeded(verdict: str, reason: str, message: str) -> list[dict[str, Any]]:
    return [{"type": "Succeeded", "status": verdict, "reason": reason, "message": message}]


EXECUTIONS = {
    "no-status": (None, "Progressing", "Waiting for the operator to start the execution"),
    "empty-status": ({}, "Progressing", "Waiting for the operator to start the execution"),
    "pending": ({"phase": "Pending"}, "Progressing", "Execution pending"),
    "running": (
        {"phase": "Running", "conditions": succeeded("Unknown", "Running", "execution running")},
        "Progressing",
        "Execution running",
    ),
    "retrying": (
        {
            "phase": "Running",
            "conditions": [
                *succeeded("Unknown", "Running", "execution running"),
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "StepRetrying",
                    "message": "step charge attempt 1 failed; retry at 10:00",
                },
            ],
        },
        "Progressing",
        "step charge attempt 1 failed; retry at 10:00",
    ),
    "waiting-for-workflow": (
        {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "WorkflowNotReady",
                    "message": "workflow orders/order has no valid version yet",
                }
            ],
        },
        "Progressing",
        "workflow orders/order has no valid version yet",
    ),
    "compensating": ({"phase": "Compensating"}, "Progressing", "Execution compensating"),
    "compensating-retrying": (
        {
            "phase": "Compensating",
            "conditions": [
                *succeeded("Unknown", "Compensating", "execution compensating"),
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "CompensationRetrying",
                    "message": "compensation of step charge attempt 1 failed",
                },
            ],
        },
        "Progressing",
        "compensation of step charge attempt 1 failed",
    ),
    "compensated": (
        {
            "phase": "Compensated",
            "error": {"type": "CardDeclined", "message": "card declined"},
            "conditions": succeeded("False", "Compensated", "card declined"),
        },
        "Degraded",
        "Execution compensated after: card declined",
    ),
    "compensated-bare": ({"phase": "Compensated"}, "Degraded", "Execution compensated"),
    "compensation-failed": (
        {
            "phase": "CompensationFailed",
            "error": {"type": "CardDeclined", "message": "card declined"},
            "conditions": [
                *succeeded("False", "CompensationFailed", "card declined"),
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "CompensationFailed",
                    "message": "compensation of step reserve failed: Gone: no such hold",
                },
            ],
        },
        "Degraded",
        "compensation of step reserve failed: Gone: no such hold",
    ),
    "compensation-failed-bare": (
        {"phase": "CompensationFailed"},
        "Degraded",
        "Execution compensation failed",
    ),
    "suspended": ({"phase": "Suspended"}, "Suspended", "Execution suspended"),
    "suspended-with-ready": (
        {
            "phase": "Suspended",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "Suspended",
                    "message": "suspended while Compensating",
                }
            ],
        },
        "Suspended",
        "suspended while Compensating",
    ),
    "completed": (
        {"phase": "Completed", "conditions": succeeded("True", "Completed", "execution completed")},
        "Healthy",
        "Execution completed",
    ),
    "failed-with-error": (
        {
            "phase": "Failed",
            "error": {"type": "PaymentDeclined", "message": "card declined"},
            "conditions": succeeded("False", "Failed", "card declined"),
        },
        "Degraded",
        "card declined",
    ),
    "failed-condition-only": (
        {"phase": "Failed", "conditions": succeeded("False", "Failed", "step charge timed out")},
        "Degraded",
        "step charge timed out",
    ),
    "cancelled-with-error": (
        {"phase": "Cancelled", "error": {"type": "Cancelled", "message": "cancelled by alice"}},
        "Degraded",
        "cancelled by alice",
    ),
    "cancelled-bare": ({"phase": "Cancelled"}, "Degraded", "Execution cancelled"),
}


@pytest.mark.parametrize("case", list(EXECUTIONS.values()), ids=list(EXECUTIONS))
def test_execution_health(case: tuple[dict[str, Any] | None, str, str]) -> None:
    status, expected_status, expected_message = case
    assert run_health("Execution", execution(status)) == (expected_status, expected_message)


def workflow(generation: int, status: dict[str, Any] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "order", "namespace": "orders", "generation": generation},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


def ready(verdict: str, message: str, observed: int) -> dict[str, Any]:
    return {
        "observedGeneration": observed,
        "version": "abc123",
        "conditions": [
            {"type": "Ready", "status": verdict, "reason": "Validated", "message": message}
        ],
    }


WORKFLOWS = {
    "no-status": (
        workflow(1, None),
        "Progressing",
        "Waiting for the operator to validate the workflow",
    ),
    "no-conditions": (
        workflow(1, {"observedGeneration": 1}),
        "Progressing",
        "Waiting for the operator to validate the workflow",
    ),
    "ready-current": (workflow(3, ready("True", "workflow valid", 3)), "Healthy", "workflow valid"),
    "ready-stale-generation": (
        workflow(4, ready("True", "workflow valid", 3)),
        "Progressing",
        "Waiting for the operator to observe generation 4",
    ),
    "ready-unknown": (
        workflow(1, ready("Unknown", "checking", 1)),
        "Progressing",
        "Waiting for the operator to validate the workflow",
    ),
    "not-ready": (
        workflow(2, ready("False", "step charge: unknown compensation refund", 2)),
        "Degraded",
        "step charge: unknown compensation refund",
    ),
}


@pytest.mark.parametrize("case", list(WORKFLOWS.values()), ids=list(WORKFLOWS))
def test_workflow_health(case: tuple[dict[str, Any], str, str]) -> None:
    obj, expected_status, expected_message = case
    assert run_health("Workflow", obj) == (expected_status, expected_message)


def source(kind: str, spec: dict[str, Any], status: dict[str, Any] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "sagaflow.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "nightly", "namespace": "orders", "generation": 1},
        "spec": {"workflowRef": {"name": "order"}, **spec},
    }
    if status is not None:
        obj["status"] = status
    return obj


SCHEDULES = {
    "no-status": (source("Schedule", {"cron": "0 2 * * *"}, None), "Healthy", "Schedule active"),
    "next-tick": (
        source(
            "Schedule",
            {"interval": "15m", "suspend": False},
            {"nextScheduleTime": "2026-01-01T02:00:00Z", "active": ["nightly-1"]},
        ),
        "Healthy",
        "Next run at 2026-01-01T02:00:00Z",
    ),
    "suspended": (
        source(
            "Schedule",
            {"cron": "0 2 * * *", "suspend": True},
            {"nextScheduleTime": "2026-01-01T02:00:00Z", "missed": 3},
        ),
        "Suspended",
        "Schedule suspended",
    ),
}


@pytest.mark.parametrize("case", list(SCHEDULES.values()), ids=list(SCHEDULES))
def test_schedule_health(case: tuple[dict[str, Any], str, str]) -> None:
    obj, expected_status, expected_message = case
    assert run_health("Schedule", obj) == (expected_status, expected_message)


QUEUE = {"source": {"queue": "orders.submitted"}}
TRIGGERS = {
    "no-status": (source("Trigger", QUEUE, None), "Healthy", "Trigger active"),
    "nothing-yet": (source("Trigger", QUEUE, {"started": 0}), "Healthy", "Trigger active"),
    "counts": (
        source("Trigger", QUEUE, {"started": 5, "filtered": 2, "deadLettered": 1}),
        "Healthy",
        "5 started, 0 signalled, 2 filtered, 1 dead-lettered",
    ),
    "suspended": (
        source("Trigger", {**QUEUE, "suspend": True}, {"started": 5}),
        "Suspended",
        "Trigger suspended",
    ),
}


@pytest.mark.parametrize("case", list(TRIGGERS.values()), ids=list(TRIGGERS))
def test_trigger_health(case: tuple[dict[str, Any], str, str]) -> None:
    obj, expected_status, expected_message = case
    assert run_health("Trigger", obj) == (expected_status, expected_message)


def test_every_kind_with_a_crd_has_a_health_check() -> None:
    kinds = {
        yaml.safe_load(p.read_text())["spec"]["names"]["kind"]
        for p in CHART.glob("crds/sagaflow.io_*.yaml")
    }
    assert {p.parent.name for p in ARGOCD.glob("*/health.lua")} == {
        f"sagaflow.io_{k}" for k in kinds
    }
