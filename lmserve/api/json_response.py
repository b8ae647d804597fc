"""A typed body as an HTTP JSON response, encoded by msgspec (the edge's one JSON encoder)."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi.responses import Response


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """`body`: a msgspec Struct, or plain JSON data."""
    return Response(
        msgspec.json.encode(body), status, headers=headers, media_type="application/json"
    )
