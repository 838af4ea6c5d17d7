"""Serving the API on a host and port, for as long as a context lasts.

`serve` starts an aiohttp site for an application and stops it when the block ends
(open requests get a moment to finish). `bind_host` decides where the API may
listen: with no auth (`LoopbackOnly`) only on a loopback address, because anyone who
can connect could then start and cancel runs; with auth, wherever asked (every
interface by default). `serve_api` puts the two together from the settings, and
serves nothing when `SAGAFLOW_API_PORT` is 0.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from sagaflow.api.app import WebhookReceiver, make_app
from sagaflow.api.auth import Authorizer, LoopbackOnly
from sagaflow.api.contract import Sagaflow
from sagaflow.settings import Settings

log = logging.getLogger("sagaflow.api")

LOOPBACK = "127.0.0.1"
EVERYWHERE = "0.0.0.0"  # noqa: S104 - with auth the API is meant to be reached from outside
# How long open requests may take to finish when the server stops.
SHUTDOWN_SECONDS = 5.0


class ServeError(Exception):
    """The API cannot listen where it was asked to (the message says why)."""


@dataclass(frozen=True, slots=True)
class Served:
    host: str
    port: int  # the bound port (a free one when 0 was asked)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it could resolve to anything
        return False


def bind_host(authorizer: Authorizer, host: str | None) -> str:
    """Where the API listens: `host`, else every interface; loopback only without auth."""
    if not isinstance(authorizer, LoopbackOnly):
        return host or EVERYWHERE
    if host is None:
        host = LOOPBACK
    elif not _is_loopback(host):
        raise ServeError(
            f"SAGAFLOW_API_HOST={host}: the API has no authentication (set "
            "SAGAFLOW_API_TOKENS_FILE for that), so it listens on a loopback address only, "
            "such as 127.0.0.1 or ::1"
        )
    log.warning(
        "the API has no authentication (no SAGAFLOW_API_TOKENS_FILE): it listens on %s "
        "only, so that only this machine can reach it",
        host,
    )
    return host


@asynccontextmanager
async def serve(app: web.Application, host: str, port: int) -> AsyncIterator[Served]:
    """Serve `app` on host:port (port 0: a free one) until the block ends."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ServeError(f"the API cannot listen on {host}:{port}: {reason}") from exc
        bound = runner.addresses[0]
        yield Served(host, int(bound[1]))
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serve_api(
    service: Sagaflow,
    authorizer: Authorizer,
    settings: Settings,
    *,
    webhooks: WebhookReceiver | None = None,
) -> AsyncIterator[Served | None]:
    """The API as the settings say (None: SAGAFLOW_API_PORT=0, no API)."""
    if settings.api_port == 0:
        yield None
        return
    host = bind_host(authorizer, settings.api_host)
    app = make_app(
        service, authorizer, webhooks=webhooks, max_body_bytes=settings.api_max_body_bytes
    )
    async with serve(app, host, settings.api_port) as served:
        yield served


__all__ = ["EVERYWHERE", "LOOPBACK", "ServeError", "Served", "bind_host", "serve", "serve_api"]
