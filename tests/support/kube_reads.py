"""The read side of the in-memory API server: what it serves, and how it answers reads.

`ReadSide` extends kmock's `KubernetesEmulator` with what kubectl and kopf read from a
real API server and kmock lacks or gets wrong:

- resources registered from the CRDs the project generates
  (`sagaflow.core.crds.custom_resource_definitions()`), so discovery shows their kinds,
  short names (`sfwf`, `sfex`), the `sagaflow` category and the status subresource
  (and, unlike kmock's, names the core group-version `v1` and gives subresources no
  short names or categories of their own);
- lists with `kind`/`apiVersion` and the current `resourceVersion`, filtered, like
  watches, by `fieldSelector` and `labelSelector` (`kube_selectors`);
- server-side Tables of the CRDs' printer columns (`kube_tables`) for gets, lists and
  watches that ask for them;
- an OpenAPI v3 document per CRD group-version (`kube_openapi`);
- watches labelled `application/json` (client-go decodes nothing else) that resume
  from a `resourceVersion` out of a log of every event, and watch-lists
  (`sendInitialEvents=true`) that end their initial state with a bookmark;
- `GET /api/v1/namespaces/NAME` (kubectl apply asks): 404, unless a test stored that
  Namespace in `objects` (kmock cannot parse `/api/v1/namespaces`, so none can be
  created over HTTP).

The write side (`kube.ApiServer`) appends to that log and bumps `_revision`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

import aiohttp.web
import attrs
import kmock
from kmock._internal import rendering
from tests.support.kube_openapi import document_index, group_version_document
from tests.support.kube_selectors import SelectorError, selectors_of
from tests.support.kube_tables import PrinterColumns, requested_table_version

from sagaflow.core.crds import custom_resource_definitions

NAMESPACES = kmock.resource("", "v1", "namespaces")
EVENTS = kmock.resource("", "v1", "events")

_NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces/[^/]+/?$")
_VERBS = frozenset({"create", "delete", "get", "list", "patch", "update", "watch"})

Body = dict[str, Any]
Selected = Callable[[Mapping[str, Any]], bool]


def api_version(resource: kmock.resource) -> str:
    """The `apiVersion` of a resource's objects: `group/version`, or `v1` for the core."""
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def status_error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    """An error kmock answers with a Kubernetes `Status` body."""
    return kmock.KubernetesError(
        status=status, reason=reason, message=message, details={"reason": reason}
    )


@attrs.define(kw_only=True)
class ReadSide(kmock.KubernetesEmulator):
    """kmock's emulator serving the project's CRDs the way kubectl and kopf read them."""

    _revision: int = attrs.field(default=0, init=False)
    # Every watch event ever, as (resourceVersion, resource, event): for watches that
    # start from a resourceVersion.
    _log: list[tuple[int, kmock.resource, Body]] = attrs.field(factory=list, init=False)
    # The CRDs the server serves, and per resource what its Tables and Strict
    # validation read from them.
    _crds: list[Body] = attrs.field(factory=custom_resource_definitions, init=False)
    _columns: dict[kmock.resource, PrinterColumns] = attrs.field(factory=dict, init=False)
    _schemas: dict[kmock.resource, Body] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        info = kmock.ResourceInfo
        self.resources[NAMESPACES] = info(
            namespaced=False, kind="Namespace", singular="namespace", verbs=_VERBS
        )
        self.resources[EVENTS] = info(
            namespaced=True, kind="Event", singular="event", shortnames={"ev"}, verbs=_VERBS
        )
        for crd in self._crds:
            self._serve_crd(crd)

    def _serve_crd(self, crd: Body) -> None:
        """Serve the resource a CRD defines, in each of its served versions."""
        spec, names = crd["spec"], crd["spec"]["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            resource = kmock.resource(spec["group"], version["name"], names["plural"])
            self.resources[resource] = kmock.ResourceInfo(
                namespaced=spec["scope"] == "Namespaced",
                kind=names["kind"],
                singular=names["singular"],
                verbs=_VERBS,
                shortnames=set(names.get("shortNames", ())),
                categories=set(names.get("categories", ())),
                subresources=set(version.get("subresources", {})),
            )
            self._columns[resource] = PrinterColumns.of_crd_version(version)
            self._schemas[resource] = version["schema"]["openAPIV3Schema"]

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.url.path.startswith("/openapi/v3"):
            return self._serve_openapi(request)
        if _NAMESPACE_PATH.match(request.url.path):
            # kmock reads `/api/v1/namespaces/NAME` as "everything in namespace NAME".
            return self._serve_namespace(request)
        if request.action in (kmock.action.LIST, kmock.action.WATCH):
            self._selector(request)  # a bad selector is a 400 before any streaming starts
        if request.action == kmock.action.FETCH and request.resource in self.resources:
            # Served here, not through kmock's reaction matching, which scans every
            # request received so far: one GET per object would make a run quadratic.
            try:
                body = await self._serve_fetch(request)
            except kmock.KubernetesObjectNotFoundError:
                raise status_error(404, "NotFound", f"{request.name!r} not found") from None
            return aiohttp.web.json_response(body)
        return await super()._handle(request)

    def _serve_namespace(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # Objects may live in any namespace, but a client asking for the Namespace
        # itself hears what a cluster without it would say.
        key = (NAMESPACES, None, request.namespace or "")
        if request.method != kmock.method.GET:
            raise status_error(405, "MethodNotAllowed", f"not served: {request.url.path}")
        if key not in self.objects or self.objects[key].deleted:
            raise status_error(404, "NotFound", f'namespaces "{request.namespace}" not found')
        return aiohttp.web.json_response(self.objects[key].raw)

    async def _serve_version(self, request: rendering.Request) -> Any:
        # kmock's discovery names the core group-version "/v1" and repeats a resource's
        # short names and categories on its subresources, which makes kubectl's
        # `get sagaflow` and `get sfex` look for `executions/status`.
        listing = cast(Body, await super()._serve_version(request))
        listing["groupVersion"] = listing["groupVersion"].removeprefix("/")
        for entry in listing["resources"]:
            if "/" in entry["name"]:
                entry.update(shortNames=[], categories=[], verbs=["get", "patch", "update"])
        return listing

    def _serve_openapi(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path.removeprefix("/openapi/v3").strip("/")
        if not path:
            return aiohttp.web.json_response(document_index(self._crds))
        _apis, _, group_version = path.partition("/")
        group, _, version = group_version.partition("/")
        document = group_version_document(self._crds, group, version)
        if document is None:
            raise status_error(404, "NotFound", f"no OpenAPI v3 document for {path!r}")
        return aiohttp.web.json_response(document)

    def _selector(self, request: rendering.Request) -> Selected:
        info = self._info(request.resource) if request.resource is not None else None
        try:
            return selectors_of(request.params, info.kind if info is not None else None)
        except SelectorError as e:
            raise status_error(400, "BadRequest", str(e)) from e

    def _matches(
        self,
        request: rendering.Request,
        event: Mapping[str, Any],
        selected: Selected,
    ) -> bool:
        body = event.get("object", {})
        namespace = body.get("metadata", {}).get("namespace")
        return (request.namespace is None or namespace == request.namespace) and selected(body)

    def _as_table(self, request: rendering.Request, bodies: list[Body]) -> Body | None:
        """The Table kubectl asked for (see `kube_tables`), or None for plain JSON."""
        accept = next((v for k, v in request.headers.items() if k.lower() == "accept"), "")
        table_version = requested_table_version(accept)
        columns = self._columns.get(request.resource) if request.resource else None
        if table_version is None or columns is None:
            return None  # no columns known: kubectl then prints with its own defaults
        return columns.table(
            bodies,
            resource_version=str(self._revision),
            table_version=table_version,
            include=request.params.get("includeObject", "Metadata"),
        )

    async def _serve_fetch(self, request: rendering.Request) -> Any:
        body = cast(Body, await super()._serve_fetch(request))
        return self._as_table(request, [body]) or body

    async def _serve_list(self, request: rendering.Request) -> Any:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        resource = request.resource
        assert resource is not None
        selected = self._selector(request)
        items = [
            copy.deepcopy(obj.raw)
            for (res, namespace, _), obj in self.objects.items()
            if res == resource
            and not obj.deleted
            and (request.namespace is None or namespace == request.namespace)
            and selected(obj.raw)
        ]
        table = self._as_table(request, items)
        if table is not None:
            return table
        info = self._info(resource)
        return {
            "apiVersion": api_version(resource),
            "kind": f"{info.kind}List" if info is not None and info.kind else "List",
            "metadata": {"resourceVersion": str(self._revision)},
            "items": items,
        }

    async def _serve_watch(self, request: rendering.Request) -> Any:  # type: ignore[override]
        # kmock streams with aiohttp's default `application/octet-stream`, for which
        # client-go has no decoder: `kubectl get -w`, `wait` and `delete` of an object
        # with finalizers fail. The stream is the same, labelled as JSON.
        events = self._tabulated(request, self._stream_watch(request))
        return rendering.Response(payload=events, headers={"Content-Type": "application/json"})

    async def _tabulated(
        self, request: rendering.Request, events: AsyncIterator[Any]
    ) -> AsyncIterator[Any]:
        # `kubectl get -w` asks for Tables in the watch too: each event carries a
        # one-row Table instead of the object.
        async for event in events:
            if isinstance(event, dict) and event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                table = self._as_table(request, [event["object"]])
                if table is not None:
                    event = {**event, "object": table}
            yield event

    async def _stream_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        # kmock's own watch ignores `resourceVersion`, replays every object as ADDED, and
        # subscribes to its event bus only afterwards: writes in between are lost, and a
        # client that listed first sees stale duplicates. Here: subscribe first; then
        # replay the events after the requested resourceVersion (or, without one, every
        # live object as ADDED); then stream the bus, skipping what was replayed.
        # A watch-list (`sendInitialEvents=true`, client-go's WatchListClient, which
        # kubectl's `wait` and `delete` use) gets every live object and then a BOOKMARK
        # marking the end of that initial state, as kube-apiserver sends it.
        resource = request.resource
        assert resource is not None
        bus = self._buses[resource]
        selected = self._selector(request)
        watch_list = request.params.get("sendInitialEvents") == "true"
        mark = await bus.mark()
        try:
            since = request.params.get("resourceVersion", "")
            horizon = self._revision
            if since.isdigit() and since != "0" and not watch_list:
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
                if self._matches(request, event, selected):
                    yield event
            if watch_list:
                yield self._initial_events_end(resource, horizon)
            async for event in bus.stream(since=mark):
                revision = event.get("object", {}).get("metadata", {}).get("resourceVersion")
                if str(revision).isdigit() and int(revision) <= horizon:
                    continue  # already replayed above
                if self._matches(request, event, selected):
                    yield event
        finally:
            await bus.unmark(mark)

    def _initial_events_end(self, resource: kmock.resource, revision: int) -> Body:
        info = self._info(resource)
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": info.kind if info is not None else None,
                "apiVersion": api_version(resource),
                "metadata": {
                    "resourceVersion": str(revision),
                    "annotations": {"k8s.io/initial-events-end": "true"},
                },
            },
        }

    def _record(self, resource: kmock.resource, event: str, body: Body) -> None:
        revision = int(body["metadata"]["resourceVersion"])
        self._log.append((revision, resource, {"type": event, "object": copy.deepcopy(body)}))

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo | None:
        info = self.resources.get(resource)
        return info if isinstance(info, kmock.ResourceInfo) else None


__all__ = ["EVENTS", "NAMESPACES", "ReadSide", "api_version", "status_error"]
