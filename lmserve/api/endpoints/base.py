"""An endpoint table entry, and the serving objects of one engine that every entry calls."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from lmserve.api.admission import Admission
from lmserve.api.errors import ErrorStyle, error_reply
from lmserve.api.replies import Reply
from lmserve.api.serving.chat import ChatServing
from lmserve.api.serving.common import PromptEncoder, ServingConfig
from lmserve.api.serving.completions import CompletionServing
from lmserve.api.serving.generate import GenerateServing
from lmserve.api.serving.messages import MessagesServing
from lmserve.api.serving.pooling import PoolingServing
from lmserve.api.serving.responses import ResponsesServing
from lmserve.api.serving.scores import ScoreServing
from lmserve.api.serving.transcription import TranscriptionServing
from lmserve.engine.protocol import EngineClient


class Servings:
    """One engine's serving objects: what the endpoints of the model it serves call. The single
    server holds one; each Ray replica holds its own."""

    def __init__(self, engine: EngineClient, config: ServingConfig) -> None:
        self.engine = engine
        self.config = config
        encoder = PromptEncoder(engine)  # one: its bound is worked out from the vocabulary once
        self.chat = ChatServing(engine, config, encoder)
        self.completions = CompletionServing(engine, config, encoder)
        self.messages = MessagesServing(engine, config, self.chat)
        self.responses = ResponsesServing(self.chat)
        self.generate = GenerateServing(engine, config, self.chat)
        self.pooling = PoolingServing(engine, config)
        self.scores = ScoreServing(self.pooling)
        self.transcription = TranscriptionServing(engine, config)
        self.admission = Admission(engine, config.max_num_queued_reqs, config.max_num_queued_tokens)

    async def answer(self, endpoint: Endpoint, body: Any) -> Reply:
        """The endpoint's reply to a JSON body; a request's fault is a reply in the endpoint's
        error style (a bug still raises). An overloaded server turns a generating request away
        before anything is done for it."""
        try:
            ticket = self.admission.admit(body) if endpoint.generates else None
            try:
                request = (
                    body if endpoint.request is None else endpoint.request.model_validate(body)
                )
                reply = await endpoint.serve(self, request)
            except BaseException:
                if ticket is not None:
                    ticket.release()
                raise
            return reply if ticket is None else ticket.hold_until_done(reply)
        except Exception as exc:
            reply = error_reply(exc, endpoint.errors)
            if reply is None:
                raise
            return reply


@dataclass(frozen=True)
class Endpoint:
    """A POST route a model answers, with a JSON (or multipart form) body. `lmserve serve` mounts the table of these
    and the Ray ingress forwards by it (to the replica of the body's `model`), so an endpoint is
    written once and both servers serve it. `request` None: the body goes to `serve` as parsed."""

    name: str
    path: str
    request: type[BaseModel] | None
    serve: Callable[[Servings, Any], Awaitable[Reply]]
    errors: ErrorStyle = "openai"
    generates: bool = True  # runs a request in the engine (counted against the queue limit)
    form: bool = False  # the body is multipart/form-data (a file upload), not JSON
