"""The HTTP surface, one module per endpoint family.

`ENDPOINTS` is the table of what a model answers (POST with a JSON body): `lmserve serve` mounts
it over its one engine and the Ray ingress forwards by it to each model's replicas, so both serve
every entry. Each family module may also build an `APIRouter` of server-level routes.
"""

from __future__ import annotations

from types import MappingProxyType

from lmserve.api.endpoints import (
    audio,
    chat,
    completions,
    embeddings,
    generate,
    invocations,
    messages,
    responses,
    scores,
    tokenize,
)
from lmserve.api.endpoints.base import Endpoint, Servings

ENDPOINTS: tuple[Endpoint, ...] = (
    *chat.ENDPOINTS,
    *completions.ENDPOINTS,
    *responses.ENDPOINTS,
    *messages.ENDPOINTS,
    *tokenize.ENDPOINTS,
    *invocations.ENDPOINTS,
    *generate.ENDPOINTS,
    *embeddings.ENDPOINTS,
    *scores.ENDPOINTS,
    *audio.ENDPOINTS,
)
ENDPOINTS_BY_NAME = MappingProxyType({endpoint.name: endpoint for endpoint in ENDPOINTS})

__all__ = ["ENDPOINTS", "ENDPOINTS_BY_NAME", "Endpoint", "Servings"]
