"""The built-in pages: a chat playground at `/` and a live metrics dashboard at `/dashboard`.
Each is one self-contained HTML file (no CDN, no build step) that talks to this server's own
API, so both work offline; `--disable-playground` leaves them out."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse


def routes(dashboard: bool = True) -> APIRouter:
    """The playground, and the dashboard where this app serves the engine's /metrics."""
    pages = resources.files("lmserve.api") / "static"
    playground = (pages / "playground.html").read_text()
    page = (pages / "dashboard.html").read_text()
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def root() -> HTMLResponse:
        return HTMLResponse(playground)

    if dashboard:

        @router.get("/dashboard", include_in_schema=False)
        async def metrics_dashboard() -> HTMLResponse:
            return HTMLResponse(page)

    return router
