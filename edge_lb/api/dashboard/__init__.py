"""The operator's dashboard: one static page polling the REST API (/api/v1/node, /vips, /events) each second.

Plain HTML, CSS and JavaScript shipped beside this module; no build step and no third-party code. The page
holds no data of its own: everything it shows comes from the API, inserted as text (never as markup).

    add_routes(app)     serve index.html at "/" and the page's assets at "/dashboard/<name>"

Only the files named in ASSETS are served, so nothing else in this directory (this module) is reachable.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

HERE = Path(__file__).parent

# Asset name under /dashboard/ -> its content type.
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}

# The page loads its script and style from this server, talks only to its API, and may not be framed.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidate (ETag/Last-Modified) so an upgrade shows at once
}


def _file(name: str, content_type: str) -> web.FileResponse:
    return web.FileResponse(HERE / name, headers={**HEADERS, "Content-Type": content_type})


async def _index(request: web.Request) -> web.FileResponse:
    return _file("index.html", "text/html; charset=utf-8")


async def _asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound(text=f"no dashboard asset {name!r}")
    return _file(name, ASSETS[name])


def add_routes(app: web.Application) -> None:
    """Serve the dashboard from `app`: the page at "/", its script and style under "/dashboard/"."""
    app.router.add_get("/", _index)
    app.router.add_get("/dashboard/{name}", _asset)
