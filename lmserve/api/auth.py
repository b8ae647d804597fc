"""API keys on the inference routes (`/v1`, `/v2` and `/inference`, as vLLM guards them), for
both servers: `lmserve serve`'s --api-key and the Ray ingress's keys. Health, metrics and
version probes need none."""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from lmserve.api.errors import anthropic_error_body, error_response
from lmserve.api.json_response import json_response

KEY_VARIABLES = ("LMSERVE_API_KEY", "VLLM_API_KEY")  # ours, then a vLLM deployment's
GUARDED = ("/v1/", "/v2/", "/inference/")


def keys_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """The API key an environment sets (LMSERVE_API_KEY, else VLLM_API_KEY), if any."""
    env = os.environ if env is None else env
    key = next((env[name] for name in KEY_VARIABLES if env.get(name)), None)
    return [key] if key else []


def install_auth(app: FastAPI, api_keys: Sequence[str]) -> None:
    """Any of the keys, as OpenAI clients send it (Authorization: Bearer) or as Anthropic's do
    (x-api-key); a miss is a 401 in the route family's error shape."""
    bearers = [f"Bearer {key}".encode() for key in api_keys]
    keys = [key.encode() for key in api_keys]

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Response:
        path, root = request.url.path, request.scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a prefix (--root-path, a route)
            path = path[len(root) :]
        if path.startswith(GUARDED):
            headers = request.headers
            authorization = headers.get("authorization", "").encode()
            x_api_key = headers.get("x-api-key", "").encode()
            # every key compared, so the time taken says nothing about which was close
            matches = [hmac.compare_digest(authorization, b) for b in bearers] + [
                hmac.compare_digest(x_api_key, k) for k in keys
            ]
            if not any(matches):
                message = "Invalid or missing API key"
                if path.startswith("/v1/messages"):
                    return json_response(anthropic_error_body(message, 401), 401)
                return error_response(message, 401, code="invalid_api_key")
        return await call_next(request)
