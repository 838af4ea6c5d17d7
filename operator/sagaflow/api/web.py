"""The web view: static pages the API serves beside its JSON routes.

`GET /ui` is the list of executions, `GET /ui/namespaces/{ns}/executions/{name}`
one execution (its DAG, a timeline of attempts and waits, its history, its inputs
and outputs), `GET /ui/static/{file}` their script and style. The files live in
`web/` as package data: plain HTML, CSS and JavaScript, nothing to build.

The pages carry no data. Their script reads the JSON routes with the bearer token
the user gives (kept in the tab's sessionStorage), so what a page shows follows the
API's auth exactly: without a token against a server with tokens, the JSON routes
answer 401 and the page asks for one. The shells themselves are open, like
`/healthz`, since they hold nothing but code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from sagaflow.api.contract import ApiError

PREFIX = "/ui"
_CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
_FILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(html|js|css|svg)$")
# The pages load only their own script and style and talk only to this server.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files, and a new version must show on the next load.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str


def load_assets() -> dict[str, Asset]:
    """Every servable file of `web/`, by name, read once."""
    assets: dict[str, Asset] = {}
    for entry in (resources.files("sagaflow.api") / "web").iterdir():
        if not entry.is_file() or not _FILE_NAME.match(entry.name):
            continue
        suffix = entry.name[entry.name.rindex(".") :]
        assets[entry.name] = Asset(entry.read_bytes(), _CONTENT_TYPES[suffix])
    return assets


def _answer(asset: Asset) -> web.Response:
    return web.Response(
        body=asset.body,
        content_type=asset.content_type,
        charset="utf-8",
        headers=_SECURITY_HEADERS,
    )


def add_routes(app: web.Application) -> None:
    """Serve the web view from `app`, under `/ui`."""
    assets = load_assets()
    for page in ("index.html", "execution.html"):
        if page not in assets:
            raise RuntimeError(f"the web view's {page} is missing from the installed package")

    async def index(_: web.Request) -> web.Response:
        return _answer(assets["index.html"])

    async def execution(_: web.Request) -> web.Response:
        return _answer(assets["execution.html"])

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["file"]
        asset = assets.get(name)
        if asset is None:
            raise ApiError(404, "NotFound", f"the web view has no file {name!r}")
        return _answer(asset)

    app.router.add_get(PREFIX, index)
    app.router.add_get(f"{PREFIX}/namespaces/{{ns}}/executions/{{name}}", execution)
    app.router.add_get(f"{PREFIX}/static/{{file}}", static)


__all__ = ["PREFIX", "Asset", "add_routes", "load_assets"]
