"""The built-in pages: a chat playground at `/` and a live metrics dashboard at `/dashboard`.
Each is one self-contained HTML file (no CDN, no build step) that talks to this server's own
API, so both work offline; `--disable-playground` leaves them out."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse


def routes(window_s: float = 1.0) -> APIRouter:
    """The playground, and the dashboard over this app's /metrics, its rates over the last
    `window_s` seconds (the metrics' own update interval, if longer than the page's 1 s)."""
    pages = resources.files("lmserve.api") / "static"
    playground = (pages / "playground.html").read_text()
    page = (
        (pages / "dashboard.html")
        .read_text()
        .replace('<body data-window="1">', f'<body data-window="{window_s:g}">')
    )
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def root() -> HTMLResponse:
        return HTMLResponse(playground)

    @router.get("/dashboard", include_in_schema=False)
    async def metrics_dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    return router
