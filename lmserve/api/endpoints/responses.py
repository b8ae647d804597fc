"""POST /v1/responses, and GET /v1/responses/{id}, which says that nothing is stored."""

from __future__ import annotations

from fastapi import APIRouter

from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.errors import APIError
from lmserve.api.replies import Reply
from lmserve.api.responses_protocol import ResponsesRequest


async def create_response(servings: Servings, request: ResponsesRequest) -> Reply:
    return await servings.responses.create(request)


ENDPOINTS = (Endpoint("responses", "/v1/responses", ResponsesRequest, create_response),)


def routes() -> APIRouter:
    """Routes that need no model, served by both servers as they are."""
    router = APIRouter()

    @router.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> None:
        raise APIError(
            f"response {response_id!r} was not stored: this server keeps no responses",
            status=404,
            param="response_id",
        )

    return router
