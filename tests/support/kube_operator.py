"""kopf against the in-memory API server: settings, login, and running it in a thread.

kopf runs in a thread of its own (`kopf.testing.KopfRunner`), not in the test's event
loop: in the same loop its shutdown waits 5 s for kmock's server tasks. Its readiness
comes before its watch stream exists, so `operator_in_thread` enters only after the
server has seen kopf's first WATCH (`is_watch_of`). `Recorder` collects what handlers
did, from kopf's thread, for the test's assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import kmock
import kopf
import kopf.testing
from kmock._internal import rendering

if TYPE_CHECKING:
    from tests.support.kube import ApiServer


def is_watch_of(resource: kmock.resource) -> Callable[[rendering.Request], bool]:
    """A request predicate: a WATCH of this resource (for `ApiServer.wait_for_request`)."""
    return lambda request: request.action == kmock.action.WATCH and request.resource == resource


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
    "Recorder",
    "is_watch_of",
    "login_to",
    "operator_in_thread",
    "operator_settings",
    "running_operator",
]
