"""An in-memory Kubernetes API server for tests, strict enough for kopf and kubectl.

`ApiServer` is kmock's `KubernetesEmulator` with the write path replaced: every object
gets `uid`, `resourceVersion`, `generation` and `creationTimestamp`; every real change
bumps `resourceVersion`; a failed JSON-patch `test` answers 422 and a stale
`resourceVersion` in a merge patch or a replace answers 409; `/status` writes change
only the status (no generation bump) while main-object writes ignore the status and
bump `generation` when anything outside metadata and status changes; a duplicate
create answers 409 AlreadyExists; deletion waits for finalizers; with
`fieldValidation=Strict` (kubectl's default), a field the CRD does not declare is a 400.

Its read side (`kube_reads.ReadSide`) serves the resources of the CRDs the project
generates (`sagaflow.core.crds`), with their short names and category, and answers
what kubectl asks of a real server: server-side Tables of the CRDs' printer columns,
an OpenAPI v3 document per group-version, field and label selectors, watches that
resume from a `resourceVersion`, watch-lists that end with a bookmark.

Not emulated: server-side apply (accepted, silently dropped), strategic merge (treated
as a plain merge patch), schema validation beyond undeclared fields under
`fieldValidation=Strict` (types, patterns and required fields pass unchecked),
defaulting and pruning, garbage collection by ownerReferences, Tables for resources
without a CRD (kubectl falls back to NAME and AGE), list chunking (`limit` returns
everything), namespaces as a precondition (objects go into any namespace), listing or
creating Namespaces (kmock cannot parse `/api/v1/namespaces`).

Typical use in an async test::

    async with running_api_server() as api:
        client = KubeClient(api.url)
        ...
        with running_operator(registry, api, namespace="ns"):
            await api.wait_for_request(is_watch_of(EXECUTIONS))
            ...

The client, kopf and patch helpers live in `kube_client`, `kube_operator` and
`kube_patches`; they are re-exported here. TokenReviews and SubjectAccessReviews are
answered from tables a test fills (`api.reviews`, `kube_reviews`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import secrets
import string
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import aiohttp.web
import attrs
import kmock
from kmock._internal import rendering
from tests.support.kube_client import ApiError, KubeClient, resource_path, write_kubeconfig
from tests.support.kube_openapi import strict_errors
from tests.support.kube_operator import (
    Recorder,
    is_watch_of,
    login_to,
    operator_in_thread,
    operator_settings,
    running_operator,
)
from tests.support.kube_patches import JsonPatchTestFailed, json_patch, merge_patch
from tests.support.kube_reads import EVENTS, NAMESPACES, ReadSide, api_version, status_error
from tests.support.kube_reviews import Reviews

GROUP = "sagaflow.io"
VERSION = "v1alpha1"
WORKFLOWS = kmock.resource(GROUP, VERSION, "workflows")
EXECUTIONS = kmock.resource(GROUP, VERSION, "executions")

Body = dict[str, Any]
ObjectKey = tuple[kmock.resource, str | None, str]
T = TypeVar("T")


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _random_suffix() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(5))


@attrs.define(kw_only=True)
class ApiServer(ReadSide):
    """The in-memory API server: `ReadSide` plus the write path and waiting for state."""

    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)
    # TokenReview and SubjectAccessReview, answered from the tables a test fills.
    reviews: Reviews = attrs.field(factory=Reviews, init=False)

    # -- reading the state from the test --------------------------------------------------

    @property
    def url(self) -> str:  # type: ignore[override]  # a str: tests join paths to it
        """Base URL of the (first) server listening for this emulator."""
        return str(self.servers[0].url).rstrip("/")

    def peek(self, resource: kmock.resource, namespace: str | None, name: str) -> Body | None:
        """The object as stored now (a copy), or None when absent or deleted."""
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def bodies(self, resource: kmock.resource) -> list[Body]:
        """Copies of all live objects of a resource."""
        return [
            copy.deepcopy(obj.raw)
            for (res, _, _), obj in self.objects.items()
            if res == resource and not obj.deleted
        ]

    async def wait_until(
        self, probe: Callable[[], T | None], within: float = 10.0, poll: float = 0.05
    ) -> T:
        """Wait until `probe()` returns something truthy; return that.

        The probe runs again whenever the server receives a request or changes an
        object, and at least every `poll` seconds (for conditions on state outside the
        server, e.g. what a handler recorded). AssertionError after `within` seconds.
        """
        try:
            async with asyncio.timeout(within), self._changed:
                while not (result := probe()):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), poll)
                return result
        except TimeoutError:
            raise AssertionError(f"Condition not met within {within}s: {probe!r}") from None

    async def wait_for(
        self,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        predicate: Callable[[Body | None], bool],
        within: float = 10.0,
    ) -> Body | None:
        """Wait until `predicate(object or None)` holds; return that state of the object."""
        found: list[Body | None] = []

        def probe() -> bool:
            body = self.peek(resource, namespace, name)
            if predicate(body):
                found.append(body)
                return True
            return False

        try:
            await self.wait_until(probe, within=within)
        except AssertionError:
            last = self.peek(resource, namespace, name)
            raise AssertionError(
                f"{resource} {namespace}/{name}: condition not met within {within}s; "
                f"last state: {last!r}"
            ) from None
        return found[0]

    async def wait_for_request(
        self, predicate: Callable[[rendering.Request], bool], within: float = 10.0
    ) -> rendering.Request:
        """Wait until a request matching `predicate` has arrived; return the first one."""

        def probe() -> rendering.Request | None:
            return next((r for r in list(self._requests) if predicate(r)), None)

        return await self.wait_until(probe, within=within)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- requests -----------------------------------------------------------------------

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        await self._notify()
        if (review := self.reviews.answer(request)) is not None:
            return review
        if request.resource is None:
            return await super()._handle(request)
        action = request.action
        if action == kmock.action.CREATE:
            return await self._respond(self._create(request), status=201)
        if request.name is not None:
            if action == kmock.action.UPDATE:
                return await self._respond(self._patch(request))
            if action == kmock.action.DELETE:
                return await self._respond(self._delete(request))
            if request.method == kmock.method.PUT:
                return await self._respond(self._replace(request))
        return await super()._handle(request)

    async def _respond(self, change: Any, status: int = 200) -> aiohttp.web.StreamResponse:
        # `change` is (resource, body to return, watch event or None); computed under the lock.
        resource, body, event = change
        if event is not None:
            self._record(resource, event, body)  # before any await: same step as the write
            await self._buses[resource].put({"type": event, "object": copy.deepcopy(body)})
        await self._notify()
        return aiohttp.web.json_response(body, status=status)

    # -- the write path ---------------------------------------------------------------

    def _next_rv(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _has_status(self, resource: kmock.resource) -> bool:
        info = self._info(resource)
        return info is not None and "status" in info.subresources

    def _key(self, request: rendering.Request) -> ObjectKey:
        assert request.resource is not None and request.name is not None
        return (request.resource, request.namespace, request.name)

    def _current(self, key: ObjectKey) -> Body:
        if key not in self.objects or self.objects[key].deleted:
            resource, _namespace, name = key
            raise status_error(404, "NotFound", f"{resource.plural} {name!r} not found")
        return copy.deepcopy(self.objects[key].raw)

    def _create(self, request: rendering.Request) -> tuple[kmock.resource, Body, str]:
        resource = request.resource
        assert resource is not None
        if not isinstance(request.data, dict):
            raise status_error(400, "BadRequest", "The body must be a JSON object")
        body: Body = copy.deepcopy(request.data)
        self._check_fields(request, body)
        meta = body.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise status_error(422, "Invalid", "metadata.name or generateName is required")
            meta["name"] = meta["generateName"] + _random_suffix()
        namespace = request.namespace or meta.get("namespace")
        info = self._info(resource)
        if namespace is not None and (info is None or info.namespaced is not False):
            meta["namespace"] = namespace
        key = (resource, namespace, meta["name"])
        if key in self.objects and not self.objects[key].deleted:
            raise status_error(
                409, "AlreadyExists", f"{resource.plural} {meta['name']!r} already exists"
            )
        if info is not None and info.kind and "kind" not in body:
            body["kind"] = info.kind
        body.setdefault("apiVersion", api_version(resource))
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(field, None)
        meta.update(
            uid=str(uuid.uuid4()),
            resourceVersion=self._next_rv(),
            generation=1,
            creationTimestamp=_now(),
        )
        if self._has_status(resource):
            body.pop("status", None)  # as a real server: status is set only via /status
        if key in self.objects:
            self.objects[key].create(body)
        else:
            self.objects[key] = body
        return resource, body, "ADDED"

    def _patch(self, request: rendering.Request) -> tuple[kmock.resource, Body, str | None]:
        key = self._key(request)
        current = self._current(key)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        data = request.data
        if content_type == "application/json-patch+json":
            if not isinstance(data, list):
                raise status_error(400, "BadRequest", "A JSON patch must be a list")
            try:
                proposed = json_patch(current, data)
            except JsonPatchTestFailed as e:
                raise status_error(422, "Invalid", f"JSON patch test failed at {e}") from e
            except (KeyError, IndexError, ValueError, TypeError) as e:
                raise status_error(422, "Invalid", f"JSON patch failed: {e!r}") from e
        elif content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            if not isinstance(data, dict):
                raise status_error(400, "BadRequest", "A merge patch must be a JSON object")
            self._check_rv(current, data)
            proposed = merge_patch(current, data)
        else:
            raise status_error(415, "UnsupportedMediaType", f"Unsupported patch: {content_type!r}")
        self._check_fields(request, proposed)
        return self._commit(key, current, proposed, request.subresource)

    def _replace(self, request: rendering.Request) -> tuple[kmock.resource, Body, str | None]:
        key = self._key(request)
        current = self._current(key)
        if not isinstance(request.data, dict):
            raise status_error(400, "BadRequest", "The body must be a JSON object")
        self._check_rv(current, request.data)
        self._check_fields(request, request.data)
        return self._commit(key, current, copy.deepcopy(request.data), request.subresource)

    def _check_fields(self, request: rendering.Request, body: Mapping[str, Any]) -> None:
        """`fieldValidation=Strict`: refuse fields the CRD schema does not declare."""
        schema = self._schemas.get(request.resource) if request.resource else None
        if request.params.get("fieldValidation") != "Strict" or schema is None:
            return
        if errors := strict_errors(body, schema):
            raise status_error(400, "BadRequest", "strict decoding error: " + ", ".join(errors))

    @staticmethod
    def _check_rv(current: Body, data: Mapping[str, Any]) -> None:
        wanted = (data.get("metadata") or {}).get("resourceVersion")
        actual = current["metadata"]["resourceVersion"]
        if wanted is not None and wanted != actual:
            raise status_error(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest "
                f"version and try again (resourceVersion {wanted} != {actual})",
            )

    def _commit(
        self, key: ObjectKey, current: Body, proposed: Body, subresource: str | None
    ) -> tuple[kmock.resource, Body, str | None]:
        resource = key[0]
        if subresource == "status" and self._has_status(resource):
            result = copy.deepcopy(current)
            if proposed.get("status") is None:
                result.pop("status", None)
            else:
                result["status"] = proposed["status"]
        elif subresource is None:
            result = copy.deepcopy(proposed)
            if self._has_status(resource):
                result.pop("status", None)
                if "status" in current:
                    result["status"] = current["status"]
            meta = result.setdefault("metadata", {})
            old_meta = current["metadata"]
            for field in (
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ):
                meta.pop(field, None)
                if field in old_meta:
                    meta[field] = old_meta[field]
            outside = ("metadata", "status")
            old_rest = {k: v for k, v in current.items() if k not in outside}
            new_rest = {k: v for k, v in result.items() if k not in outside}
            if old_rest != new_rest:
                meta["generation"] = old_meta.get("generation", 1) + 1
        else:
            raise status_error(404, "NotFound", f"No subresource {subresource!r}")

        result["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if result == current:
            return resource, current, None  # a no-op write changes nothing, as on a real server
        result["metadata"]["resourceVersion"] = self._next_rv()
        meta = result["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self.objects[key].create(result)
            self.objects[key].delete()
            return resource, result, "DELETED"
        self.objects[key].create(result)
        return resource, result, "MODIFIED"

    def _delete(self, request: rendering.Request) -> tuple[kmock.resource, Body, str | None]:
        key = self._key(request)
        current = self._current(key)
        meta = current["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return key[0], current, None
            meta["deletionTimestamp"] = _now()
            meta["deletionGracePeriodSeconds"] = 0
            meta["resourceVersion"] = self._next_rv()
            self.objects[key].create(current)
            return key[0], current, "MODIFIED"
        meta["resourceVersion"] = self._next_rv()
        self.objects[key].create(current)
        self.objects[key].delete()
        return key[0], current, "DELETED"


@contextlib.asynccontextmanager
async def running_api_server() -> AsyncIterator[ApiServer]:
    """Start an `ApiServer` on a free port of 127.0.0.1 for the duration of the block."""
    async with ApiServer() as api, kmock.Server(api, host="127.0.0.1"):
        yield api


__all__ = [
    "EVENTS",
    "EXECUTIONS",
    "GROUP",
    "NAMESPACES",
    "VERSION",
    "WORKFLOWS",
    "ApiError",
    "ApiServer",
    "KubeClient",
    "Recorder",
    "is_watch_of",
    "json_patch",
    "login_to",
    "merge_patch",
    "operator_in_thread",
    "operator_settings",
    "resource_path",
    "running_api_server",
    "running_operator",
    "write_kubeconfig",
]
