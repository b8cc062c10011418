"""The built-in on-call page: ``GET /dashboard`` (a static page, its script and its style sheet).

The page itself holds no data. It reads an admin API key from the URL fragment (``/dashboard#key=...``; browsers
never send the fragment to the server, and the page removes it from the address bar) or from a small form (kept in
``sessionStorage``), and fetches ``GET /v1/monitor/summary`` with ``Authorization: Bearer``: every number, key and
image it shows is behind that endpoint's admin scope. The script puts every string into the DOM as text, never as
markup; a strict Content-Security-Policy (script and style from this origin only, images only as ``data:`` URLs,
fetches to this origin only, no framing) is the second line of defense.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

# served name -> (file under safedl/serve/static, media type)
ASSETS = {"": ("dashboard.html", "text/html; charset=utf-8"),
          "app.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "app.css": ("dashboard.css", "text/css; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


@lru_cache(maxsize=None)
def asset(name: str) -> bytes:
    """The bytes of one packaged asset (``name`` is a key of ``ASSETS``)."""
    return resources.files("safedl.serve").joinpath("static", ASSETS[name][0]).read_bytes()


def _response(name: str) -> Response:
    return Response(asset(name), media_type=ASSETS[name][1], headers=HEADERS)


def dashboard_router() -> APIRouter:
    """The page's routes: ``/dashboard`` and its two assets (not in the OpenAPI schema: they carry no data)."""
    router = APIRouter()

    @router.get("/dashboard", include_in_schema=False)
    async def page() -> Response:
        return _response("")

    @router.get("/dashboard/app.js", include_in_schema=False)
    async def script() -> Response:
        return _response("app.js")

    @router.get("/dashboard/app.css", include_in_schema=False)
    async def style() -> Response:
        return _response("app.css")

    return router
