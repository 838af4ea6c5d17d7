"""The test's side of the in-memory API server: a small REST client and a kubeconfig.

`KubeClient` speaks plain HTTP+JSON with no discovery and no retries, so a test sees
exactly what the server answered (`ApiError` carries the status and the Status body).
`write_kubeconfig` points real clients (kubectl, the `kubernetes` package) at a server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import yaml

Body = dict[str, Any]


class ApiError(Exception):
    """An HTTP error answered by the API server."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body!r}")
        self.status = status
        self.body = body

    @property
    def reason(self) -> str | None:
        return self.body.get("reason") if isinstance(self.body, dict) else None


def resource_path(
    resource: kmock.resource,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The API path of a resource, its namespace's collection, an object or a subresource."""
    base = (
        f"/apis/{resource.group}/{resource.version}"
        if resource.group
        else f"/api/{resource.version}"
    )
    parts = [base]
    if namespace is not None:
        parts.append(f"namespaces/{namespace}")
    parts.append(str(resource.plural))
    if name is not None:
        parts.append(name)
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


class KubeClient:
    """A minimal async REST client for tests: create, get, patch, replace, delete."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        assert self._session is not None, "use `async with KubeClient(url) as client`"
        headers = {"Content-Type": content_type} if body is not None else {}
        data = None if body is None else json.dumps(body)
        async with self._session.request(method, self.url + path, data=data, headers=headers) as r:
            payload = await r.json(content_type=None)
            if r.status >= 400:
                raise ApiError(r.status, payload)
            return payload

    async def create(self, resource: kmock.resource, namespace: str | None, body: Body) -> Body:
        result: Body = await self._call("POST", resource_path(resource, namespace), body)
        return result

    async def get(self, resource: kmock.resource, namespace: str | None, name: str) -> Body:
        result: Body = await self._call("GET", resource_path(resource, namespace, name))
        return result

    async def patch(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        json_patch: bool = False,
    ) -> Body:
        """A merge patch (a dict), or a JSON patch (a list of operations) if `json_patch`."""
        content_type = (
            "application/json-patch+json" if json_patch else "application/merge-patch+json"
        )
        path = resource_path(resource, namespace, name, subresource)
        result: Body = await self._call("PATCH", path, patch, content_type)
        return result

    async def replace(
        self, resource: kmock.resource, namespace: str | None, name: str, body: Body
    ) -> Body:
        result: Body = await self._call("PUT", resource_path(resource, namespace, name), body)
        return result

    async def delete(self, resource: kmock.resource, namespace: str | None, name: str) -> Body:
        result: Body = await self._call("DELETE", resource_path(resource, namespace, name))
        return result


def write_kubeconfig(directory: Path, url: str, namespace: str = "default") -> Path:
    """Write a kubeconfig for `url` into `directory` (for kubectl or the kubernetes client)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "kmock", "user": {"token": "test"}}],
        "contexts": [
            {
                "name": "kmock",
                "context": {"cluster": "kmock", "user": "kmock", "namespace": namespace},
            }
        ],
        "current-context": "kmock",
    }
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


__all__ = ["ApiError", "KubeClient", "resource_path", "write_kubeconfig"]
