"""The operator's probe endpoints: `/healthz` (liveness) and `/readyz` (readiness).

Liveness fails when a loop the operator cannot work without has died (the
orchestrator, the status mirror, kopf): restarting the pod is then the cure.
Readiness fails while kopf is still starting or the database does not answer:
the pod is alive but cannot do its work yet, and a restart would not help.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import aiohttp.web

Check = Callable[[], Awaitable[str | None]]


def loops_alive(tasks: Callable[[], Iterable[asyncio.Task[None]]]) -> Check:
    """A check that names the first background task that has finished."""

    async def check() -> str | None:
        for task in tasks():
            if task.done():
                return f"{task.get_name()} stopped"
        return None

    return check


class HealthServer:
    def __init__(self, port: int, *, live: Check, ready: Check, host: str = "0.0.0.0") -> None:  # noqa: S104 - probes come from the kubelet, not localhost
        self.port = port
        self.host = host
        self._live = live
        self._ready = ready
        self._runner: aiohttp.web.AppRunner | None = None

    async def _answer(self, check: Check) -> aiohttp.web.Response:
        try:
            problem = await asyncio.wait_for(check(), timeout=5)
        except Exception as exc:  # a probe answers; it never raises
            problem = f"check failed: {type(exc).__name__}: {exc}"
        if problem is None:
            return aiohttp.web.Response(text="ok\n")
        return aiohttp.web.Response(status=503, text=f"{problem}\n")

    async def start(self) -> None:
        async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
            return await self._answer(self._live)

        async def readyz(_: aiohttp.web.Request) -> aiohttp.web.Response:
            return await self._answer(self._ready)

        app = aiohttp.web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        self._runner = aiohttp.web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, self.host, self.port)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
