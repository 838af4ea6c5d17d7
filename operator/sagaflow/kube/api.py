"""The few Kubernetes API calls the operator makes outside kopf's handlers.

kopf drives the handlers; the status mirror, the Event poster and the TTL collector
run beside it and need only: read an Execution, merge-patch its status under a
resourceVersion precondition, create an Event, create (a child's object) or delete
an Execution. `KubeApi` is
that narrow interface; `ClientKubeApi` implements it with the `kubernetes` client
(in-cluster service account, else the kubeconfig), whose blocking calls run in
threads so they never stall the event loop kopf and the orchestrator share.
"""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import kubernetes

from sagaflow.core.crds import PEERING_GROUP
from sagaflow.core.manifests import API_GROUP

VERSION = "v1alpha1"
EXECUTIONS = "executions"
WORKFLOWS = "workflows"

Body = dict[str, Any]
# On the object of a child execution (which the operator creates for it): the id of
# the execution it shows. Other Execution objects' runs are keyed by their uid.
EXECUTION_ID = f"{API_GROUP}/execution-id"


def execution_id_of(meta: Any) -> str:
    """The execution an Execution object's metadata belongs to."""
    annotations = meta.get("annotations") or {}
    found = annotations.get(EXECUTION_ID)
    return str(found) if found else str(meta["uid"])


class ConflictError(Exception):
    """The object changed since it was read (HTTP 409): read it again and retry."""


class KubeApi(Protocol):
    async def get(self, plural: str, namespace: str, name: str) -> Body | None:
        """The object, or None when it does not exist."""

    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> None:
        """Merge-patch the status subresource; ConflictError on a stale resourceVersion.

        Returns quietly when the object is gone.
        """

    async def create_event(self, namespace: str, event: Body) -> bool:
        """Create a core/v1 Event; False when one of that name exists already."""

    async def delete(self, plural: str, namespace: str, name: str, *, uid: str) -> None:
        """Delete the object if its uid is `uid`; returns quietly when it is gone."""

    async def create(self, plural: str, namespace: str, body: Body) -> bool:
        """Create a custom object; False when one of that name exists already."""


# Calls in flight at once: the mirror's concurrency, threads and pooled connections.
CONCURRENCY = 16


def load_client_config() -> kubernetes.client.ApiClient:
    """In a pod, the service account; elsewhere `$KUBECONFIG` or `~/.kube/config`."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)  # type: ignore[no-untyped-call]
    config.connection_pool_maxsize = CONCURRENCY
    return kubernetes.client.ApiClient(configuration=config)


class ClientKubeApi:
    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self._custom = kubernetes.client.CustomObjectsApi(client)
        self._core = kubernetes.client.CoreV1Api(client)
        # Its own threads: the loop's default executor is small (CPUs + 4) and shared.
        self._threads = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="kube-api")

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """The raw response: turning it into the client's model objects costs more CPU
        than the request itself, and this process also runs kopf and the orchestrator."""
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, _preload_content=False, **kwargs)
        return await loop.run_in_executor(self._threads, call)

    async def get(self, plural: str, namespace: str, name: str) -> Body | None:
        get = self._custom.get_namespaced_custom_object
        return await self._found(get, API_GROUP, VERSION, namespace, plural, name)

    async def get_peering(self, namespace: str | None, name: str) -> Body | None:
        """kopf's peering object: a KopfPeering in `namespace`, else the cluster's."""
        custom = self._custom
        if namespace is None:
            cluster = custom.get_cluster_custom_object
            return await self._found(cluster, PEERING_GROUP, "v1", "clusterkopfpeerings", name)
        namespaced = custom.get_namespaced_custom_object
        return await self._found(namespaced, PEERING_GROUP, "v1", namespace, "kopfpeerings", name)

    async def _found(self, fn: Any, *args: Any) -> Body | None:
        """The object a read returns; None for a 404."""
        try:
            response = await self._call(fn, *args)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        body: Body = json.loads(response.data)
        return body

    async def patch_status(self, plural: str, namespace: str, name: str, patch: Body) -> None:
        try:
            # A dict body is sent as application/merge-patch+json.
            await self._call(
                self._custom.patch_namespaced_custom_object_status,
                API_GROUP,
                VERSION,
                namespace,
                plural,
                name,
                patch,
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:
                raise ConflictError(f"{plural} {namespace}/{name} changed") from exc
            if exc.status != 404:
                raise

    async def create_event(self, namespace: str, event: Body) -> bool:
        try:
            # The client serialises a plain dict as it is.
            body: Any = event
            await self._call(self._core.create_namespaced_event, namespace, body)
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def create(self, plural: str, namespace: str, body: Body) -> bool:
        try:
            await self._call(
                self._custom.create_namespaced_custom_object,
                API_GROUP,
                VERSION,
                namespace,
                plural,
                body,
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def list(self, plural: str, namespace: str, *, label_selector: str) -> list[Body]:
        response = await self._call(
            self._custom.list_namespaced_custom_object,
            API_GROUP,
            VERSION,
            namespace,
            plural,
            label_selector=label_selector,
        )
        items: list[Body] = json.loads(response.data).get("items") or []
        return items

    async def patch(self, plural: str, namespace: str, name: str, patch: Body) -> bool:
        try:
            # A dict body is sent as application/merge-patch+json.
            await self._call(
                self._custom.patch_namespaced_custom_object,
                API_GROUP,
                VERSION,
                namespace,
                plural,
                name,
                patch,
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def delete(self, plural: str, namespace: str, name: str, *, uid: str) -> None:
        try:
            await self._call(
                self._custom.delete_namespaced_custom_object,
                API_GROUP,
                VERSION,
                namespace,
                plural,
                name,
                body=kubernetes.client.V1DeleteOptions(
                    preconditions=kubernetes.client.V1Preconditions(uid=uid)
                ),
            )
        except kubernetes.client.ApiException as exc:
            # 409: the uid differs, the name belongs to a newer object now.
            if exc.status not in (404, 409):
                raise
