"""An in-memory Kubernetes API server for tests, strict enough for kopf.

`ApiServer` is kmock's `KubernetesEmulator` with the write path replaced: every object
gets `uid`, `resourceVersion`, `generation` and `creationTimestamp`; every real change
bumps `resourceVersion`; a failed JSON-patch `test` answers 422 and a stale
`resourceVersion` in a merge patch or a replace answers 409; `/status` writes change
only the status (no generation bump) while main-object writes ignore the status and
bump `generation` when anything outside metadata and status changes; a duplicate
create answers 409 AlreadyExists; deletion waits for finalizers.

Reads (get, list, watch, discovery) are kmock's own. Not emulated: server-side apply,
strategic merge (treated as a plain merge patch), label/field selectors, OpenAPI
validation or defaulting, garbage collection by ownerReferences, watching from a
resourceVersion (a watch always starts with every existing object as ADDED).

Typical use in an async test::

    async with running_api_server() as api:
        client = KubeClient(api.url)
        ...
        with running_operator(registry, api, namespace="ns"):
            await api.wait_for_request(is_watch_of(EXECUTIONS))
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import secrets
import string
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import aiohttp.web
import attrs
import kmock
import kopf
import kopf.testing
import yaml
from kmock._internal import rendering

GROUP = "sagaflow.io"
VERSION = "v1alpha1"
WORKFLOWS = kmock.resource(GROUP, VERSION, "workflows")
EXECUTIONS = kmock.resource(GROUP, VERSION, "executions")
NAMESPACES = kmock.resource("", "v1", "namespaces")
EVENTS = kmock.resource("", "v1", "events")

Body = dict[str, Any]
ObjectKey = tuple[kmock.resource, str | None, str]
T = TypeVar("T")


def _status_error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(
        status=status, reason=reason, message=message, details={"reason": reason}
    )


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _random_suffix() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(5))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, `None` removes a key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class JsonPatchTestFailed(Exception):
    """A `test` operation of a JSON patch did not hold."""


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"Bad JSON pointer: {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def json_patch(doc: Any, ops: list[Mapping[str, Any]]) -> Any:
    """RFC 6902 JSON patch with the operations clients send: test/add/remove/replace."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        kind = op["op"]
        if kind == "test":
            try:
                actual = _walk(doc, parts)
            except (KeyError, IndexError, ValueError) as e:
                raise JsonPatchTestFailed(op["path"]) from e
            if actual != op["value"]:
                raise JsonPatchTestFailed(op["path"])
            continue
        if not parts:
            if kind in ("add", "replace"):
                doc = copy.deepcopy(op["value"])
                continue
            raise ValueError(f"Cannot {kind} the whole document")
        parent = _walk(doc, parts[:-1])
        last = parts[-1]
        if kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind == "replace":
            index: Any = int(last) if isinstance(parent, list) else last
            if not isinstance(parent, list) and last not in parent:
                raise KeyError(last)
            parent[index] = copy.deepcopy(op["value"])
        else:
            raise ValueError(f"Unsupported JSON patch operation: {kind!r}")
    return doc


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with API-server metadata, optimistic concurrency and /status."""

    _revision: int = attrs.field(default=0, init=False)
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)
    # Every watch event ever, as (resourceVersion, resource, event): for watches that
    # start from a resourceVersion.
    _log: list[tuple[int, kmock.resource, Body]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        info = kmock.ResourceInfo
        self.resources[NAMESPACES] = info(namespaced=False, kind="Namespace", singular="namespace")
        self.resources[EVENTS] = info(namespaced=True, kind="Event", singular="event")
        verbs = {"create", "delete", "get", "list", "patch", "update", "watch"}
        for plural, kind in (("workflows", "Workflow"), ("executions", "Execution")):
            self.resources[kmock.resource(GROUP, VERSION, plural)] = info(
                namespaced=True,
                kind=kind,
                singular=kind.lower(),
                verbs=verbs,
                subresources={"status"},
            )

    # -- reading the state from the test --------------------------------------------------

    @property
    def url(self) -> str:
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
        self, probe: Callable[[], T], within: float = 10.0, poll: float = 0.05
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

    # -- the write path ---------------------------------------------------------------

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        await self._notify()
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

    def _matches(self, request: rendering.Request, event: Mapping[str, Any]) -> bool:
        namespace = event.get("object", {}).get("metadata", {}).get("namespace")
        return request.namespace is None or namespace == request.namespace

    async def _serve_list(self, request: rendering.Request) -> Any:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        resource = request.resource
        assert resource is not None
        items = [
            copy.deepcopy(obj.raw)
            for (res, namespace, _), obj in self.objects.items()
            if res == resource
            and not obj.deleted
            and (request.namespace is None or namespace == request.namespace)
        ]
        info = self._info(resource)
        group = resource.group
        return {
            "apiVersion": f"{group}/{resource.version}" if group else resource.version,
            "kind": f"{info.kind}List" if info is not None and info.kind else "List",
            "metadata": {"resourceVersion": str(self._revision)},
            "items": items,
        }

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        # kmock's own watch ignores `resourceVersion`, replays every object as ADDED, and
        # subscribes to its event bus only afterwards: writes in between are lost, and a
        # client that listed first sees stale duplicates. Here: subscribe first; then
        # replay the events after the requested resourceVersion (or, without one, every
        # live object as ADDED); then stream the bus, skipping what was replayed.
        resource = request.resource
        assert resource is not None
        bus = self._buses[resource]
        mark = await bus.mark()
        try:
            since = request.params.get("resourceVersion", "")
            horizon = self._revision
            if since.isdigit() and since != "0":
                initial = [
                    copy.deepcopy(event)
                    for revision, res, event in self._log
                    if res == resource and revision > int(since)
                ]
            else:
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                    for (res, _, _), obj in self.objects.items()
                    if res == resource and not obj.deleted
                ]
            yield b""
            for event in initial:
                if self._matches(request, event):
                    yield event
            async for event in bus.stream(since=mark):
                revision = event.get("object", {}).get("metadata", {}).get("resourceVersion")
                if str(revision).isdigit() and int(revision) <= horizon:
                    continue  # already replayed above
                if self._matches(request, event):
                    yield event
        finally:
            await bus.unmark(mark)

    def _record(self, resource: kmock.resource, event: str, body: Body) -> None:
        revision = int(body["metadata"]["resourceVersion"])
        self._log.append((revision, resource, {"type": event, "object": copy.deepcopy(body)}))

    def _next_rv(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo | None:
        return self.resources.get(resource)

    def _has_status(self, resource: kmock.resource) -> bool:
        info = self._info(resource)
        return info is not None and "status" in info.subresources

    def _key(self, request: rendering.Request) -> ObjectKey:
        assert request.resource is not None and request.name is not None
        return (request.resource, request.namespace, request.name)

    def _current(self, key: ObjectKey) -> Body:
        if key not in self.objects or self.objects[key].deleted:
            resource, _namespace, name = key
            raise _status_error(404, "NotFound", f"{resource.plural} {name!r} not found")
        return copy.deepcopy(self.objects[key].raw)

    def _create(self, request: rendering.Request) -> tuple[kmock.resource, Body, str]:
        resource = request.resource
        assert resource is not None
        if not isinstance(request.data, dict):
            raise _status_error(400, "BadRequest", "The body must be a JSON object")
        body: Body = copy.deepcopy(request.data)
        meta = body.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _status_error(422, "Invalid", "metadata.name or generateName is required")
            meta["name"] = meta["generateName"] + _random_suffix()
        namespace = request.namespace or meta.get("namespace")
        info = self._info(resource)
        if namespace is not None and (info is None or info.namespaced is not False):
            meta["namespace"] = namespace
        key = (resource, namespace, meta["name"])
        if key in self.objects and not self.objects[key].deleted:
            raise _status_error(
                409, "AlreadyExists", f"{resource.plural} {meta['name']!r} already exists"
            )
        if info is not None and info.kind and "kind" not in body:
            body["kind"] = info.kind
        if "apiVersion" not in body:
            group = resource.group
            body["apiVersion"] = f"{group}/{resource.version}" if group else resource.version
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
                raise _status_error(400, "BadRequest", "A JSON patch must be a list")
            try:
                proposed = json_patch(current, data)
            except JsonPatchTestFailed as e:
                raise _status_error(422, "Invalid", f"JSON patch test failed at {e}") from e
            except (KeyError, IndexError, ValueError, TypeError) as e:
                raise _status_error(422, "Invalid", f"JSON patch failed: {e!r}") from e
        elif content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            if not isinstance(data, dict):
                raise _status_error(400, "BadRequest", "A merge patch must be a JSON object")
            self._check_rv(current, data)
            proposed = merge_patch(current, data)
        else:
            raise _status_error(415, "UnsupportedMediaType", f"Unsupported patch: {content_type!r}")
        return self._commit(key, current, proposed, request.subresource)

    def _replace(self, request: rendering.Request) -> tuple[kmock.resource, Body, str | None]:
        key = self._key(request)
        current = self._current(key)
        if not isinstance(request.data, dict):
            raise _status_error(400, "BadRequest", "The body must be a JSON object")
        self._check_rv(current, request.data)
        return self._commit(key, current, copy.deepcopy(request.data), request.subresource)

    @staticmethod
    def _check_rv(current: Body, data: Mapping[str, Any]) -> None:
        wanted = (data.get("metadata") or {}).get("resourceVersion")
        actual = current["metadata"]["resourceVersion"]
        if wanted is not None and wanted != actual:
            raise _status_error(
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
            raise _status_error(404, "NotFound", f"No subresource {subresource!r}")

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


def is_watch_of(resource: kmock.resource) -> Callable[[rendering.Request], bool]:
    """A request predicate: a WATCH of this resource (for `ApiServer.wait_for_request`)."""
    return lambda request: request.action == kmock.action.WATCH and request.resource == resource


@contextlib.asynccontextmanager
async def running_api_server() -> AsyncIterator[ApiServer]:
    """Start an `ApiServer` on a free port of 127.0.0.1 for the duration of the block."""
    async with ApiServer() as api, kmock.Server(api, host="127.0.0.1"):
        yield api


# -- a client for the test's side ------------------------------------------------------


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


# -- kopf against the server -----------------------------------------------------------


def operator_settings() -> kopf.OperatorSettings:
    """Kopf settings that work against `ApiServer` (no namespace scanning, quick retries)."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # kmock cannot parse GET /api/v1/namespaces
    settings.watching.reconnect_backoff = 0.1
    settings.networking.request_timeout = 10
    return settings


def login_to(registry: kopf.OperatorRegistry, url: str, namespace: str | None = None) -> None:
    """Register a login handler in `registry` that points kopf at `url`."""

    @kopf.on.login(registry=registry)
    def _login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=url, insecure=True, default_namespace=namespace)


@contextlib.contextmanager
def running_operator(
    registry: kopf.OperatorRegistry,
    api: ApiServer,
    namespace: str,
    settings: kopf.OperatorSettings | None = None,
    stop_timeout: float = 20.0,
) -> Iterator[kopf.testing.KopfRunner]:
    """Run kopf (standalone, one namespace) with `registry` in a thread against `api`.

    Adds the login handler to `registry`. Wait for the watch afterwards with
    `await api.wait_for_request(is_watch_of(resource))`: the runner's own readiness
    comes before the watch stream exists. The exit joins the thread; call it from a
    thread (`asyncio.to_thread`) if the API server shares the caller's event loop, or use
    `operator_in_thread`, which does that.
    """
    login_to(registry, api.url, namespace)
    runner = kopf.testing.KopfRunner(
        ["run", "--standalone", f"--namespace={namespace}"],
        registry=registry,
        settings=settings or operator_settings(),
        timeout=stop_timeout,
    )
    with runner:
        yield runner


@contextlib.asynccontextmanager
async def operator_in_thread(
    registry: kopf.OperatorRegistry,
    api: ApiServer,
    namespace: str,
    watch: kmock.resource,
    settings: kopf.OperatorSettings | None = None,
) -> AsyncIterator[kopf.testing.KopfRunner]:
    """Like `running_operator`, but async: enters after kopf's first WATCH of `watch`, and
    stops the operator without blocking the event loop the API server runs on."""
    stack = contextlib.ExitStack()
    runner = await asyncio.to_thread(
        stack.enter_context, running_operator(registry, api, namespace, settings)
    )
    try:
        await api.wait_for_request(is_watch_of(watch))
        yield runner
    finally:
        await asyncio.to_thread(stack.close)


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


class Recorder:
    """A thread-safe list of what handlers did, for assertions from the test's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[Any, ...]] = []

    def add(self, *item: Any) -> None:
        with self._lock:
            self._items.append(item)

    @property
    def items(self) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._items)

    def count(self, kind: str) -> int:
        return sum(1 for item in self.items if item and item[0] == kind)


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
    "login_to",
    "operator_in_thread",
    "operator_settings",
    "resource_path",
    "running_api_server",
    "running_operator",
    "write_kubeconfig",
]
