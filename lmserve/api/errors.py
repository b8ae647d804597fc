"""OpenAI's error JSON for every failure, with the right status; never a 500 for user input."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lmserve.engine.protocol import EngineDeadError

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code


_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    503: "ServiceUnavailableError",
    500: "InternalServerError",
}


def error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, HTTPStatus(status).phrase),
            "param": param,
            "code": code,  # a string or null, as OpenAI's schema has it
        }
    }


def error_response(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status)


def validation_error(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A request body that failed validation: the message for its first error, and the field."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"Unknown field {field!r}: it is neither an OpenAI field nor an lmserve extra"
    elif first.get("type") == "json_invalid":
        message = f"The request body is not valid JSON: {first.get('msg')}"
    else:
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    return message, field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.message, exc.status, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """Malformed JSON and bad fields are 400 naming the field, not FastAPI's 422."""
        message, field = validation_error(exc.errors())
        return error_response(message, 400, param=field)

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
        return error_response(str(exc), 400)

    @app.exception_handler(EngineDeadError)
    async def _dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(f"The engine is not running: {exc}", 503)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving a request")
        return error_response(f"Internal error: {type(exc).__name__}", 500)
