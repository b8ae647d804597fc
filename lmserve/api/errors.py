"""OpenAI's error JSON for every failure, with the right status; never a 500 for user input."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from lmserve.api.json_response import json_response
from lmserve.api.replies import Whole
from lmserve.api.schemas.common import (
    AnthropicErrorInfo,
    AnthropicErrorResponse,
    ErrorInfo,
    ErrorResponse,
)
from lmserve.engine.protocol import EngineDeadError, EngineRequestError, EngineSleepingError

ErrorStyle = Literal["openai", "anthropic"]

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers


_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    503: "ServiceUnavailableError",
    500: "InternalServerError",
}


def error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    kind = _TYPES.get(status, HTTPStatus(status).phrase)
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error_body(message: str, status: int) -> AnthropicErrorResponse:
    """Anthropic's error JSON, which its clients parse for the Messages routes."""
    kind = _ANTHROPIC_TYPES.get(status, "api_error")
    return AnthropicErrorResponse(error=AnthropicErrorInfo(type=kind, message=message))


def error_response(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> Response:
    return json_response(error_body(message, status, param, code), status)


def validation_error(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A request body that failed validation: the message for its deepest error (in a union,
    the member that got furthest says most), and the field."""
    first = max(errors, key=lambda e: len(e.get("loc", ())), default=None) or {
        "msg": "invalid request",
        "loc": (),
    }
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_member(p)]
    field = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"Unknown field {field!r}: it is neither an OpenAI field nor an lmserve extra"
    elif first.get("type") == "json_invalid":  # its location is a byte offset, not a field
        message, field = f"The request body is not valid JSON: {first.get('msg')}", None
    else:
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        got = first.get("input")
        if first.get("type") in ("literal_error", "enum") and isinstance(got, str | int):
            message += f", got {got!r}"
    return message, field


def _is_union_member(part: Any) -> bool:
    """Pydantic names the union member an error came from in its location ('str',
    'list[...]'); a field name never looks like that."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_NAMES)


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def error_for(exc: Exception) -> tuple[int, ErrorResponse] | None:
    """(status, error body) for a failure caused by the request or a dead engine; None for a
    bug. Shared by the HTTP server's handlers and the Ray Serve replicas."""
    if isinstance(exc, APIError):
        return exc.status, error_body(exc.message, exc.status, exc.param, exc.code)
    if isinstance(exc, RequestValidationError | ValidationError):
        # malformed JSON and bad fields are 400 naming the field, not FastAPI's 422
        message, field = validation_error(exc.errors())
        return 400, error_body(message, 400, param=field)
    if isinstance(exc, HTTPException):  # routing (404, 405) and FastAPI's own body parsing
        return exc.status_code, error_body(str(exc.detail), exc.status_code)
    if isinstance(exc, EngineDeadError):
        return 503, error_body(f"The engine is not running: {exc}", 503)
    if isinstance(exc, EngineSleepingError):
        return 503, error_body(str(exc), 503)
    if isinstance(exc, EngineRequestError):  # the engine's fault, not the request's; it goes on
        return 500, error_body(str(exc), 500)
    if isinstance(exc, ValueError):
        return 400, error_body(str(exc), 400)
    return None


def error_reply(exc: Exception, style: ErrorStyle = "openai") -> Whole | None:
    """The answer to a known failure, in the endpoint's error style; None for a bug."""
    known = error_for(exc)
    if known is None:
        return None
    status, body = known
    headers = exc.headers if isinstance(exc, APIError | HTTPException) else None
    if style == "anthropic":
        return Whole(anthropic_error_body(body.error.message, status), status, headers)
    return Whole(body, status, headers)


def install_error_handlers(app: FastAPI) -> None:
    async def _error(_: Request, exc: Exception) -> Response:
        reply = error_reply(exc)
        if reply is None:
            logger.exception("unexpected error serving a request")
            # Starlette drops the connection after this answer: say so, or a keep-alive
            # client's next request on it fails
            response = error_response(f"Internal error: {type(exc).__name__}", 500)
            response.headers["Connection"] = "close"
            return response
        return json_response(reply.body, reply.status, reply.headers)

    # The request's own faults, by class: Starlette answers these and is done. A handler for
    # Exception alone runs in its outermost middleware, which re-raises after answering, so
    # every 400 was logged as a crash and the connection dropped (a keep-alive client could
    # see a connection error instead of the 400).
    for known in (
        HTTPException,
        APIError,
        RequestValidationError,
        ValidationError,
        ValueError,
        EngineDeadError,
        EngineSleepingError,
        EngineRequestError,
    ):
        app.add_exception_handler(known, _error)
    app.add_exception_handler(Exception, _error)  # a bug: 500, and the traceback logged
