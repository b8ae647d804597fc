"""POST /v1/embeddings on a pooling model: every input pooled in the same engine steps."""

from __future__ import annotations

import asyncio
import base64

from lmserve.api.errors import APIError
from lmserve.api.pooling_protocol import MAX_INPUTS, EmbeddingRequest
from lmserve.api.replies import Reply, Whole
from lmserve.api.schemas.embeddings import Embedding, EmbeddingList, EmbeddingUsage
from lmserve.api.serving import common
from lmserve.engine.protocol import EngineClient
from lmserve.outputs import PoolingRequestOutput


class EmbeddingServing:
    def __init__(self, engine: EngineClient, config: common.ServingConfig) -> None:
        self.engine = engine
        self.config = config

    async def create(self, request: EmbeddingRequest) -> Reply:
        model, lora = common.check_model(self.config, request.model)
        if lora is not None:
            raise APIError("embeddings do not take LoRA adapters", param="model")
        if self.engine.config.runner != "pooling":
            raise APIError(
                f"The model `{model}` generates text and does not serve embeddings: serve an "
                "embedding model with `lmserve serve MODEL --runner pooling`",
                param="model",
            )
        inputs = request.inputs()
        if not inputs or any(len(x) == 0 for x in inputs if isinstance(x, list)):
            raise APIError("input must not be empty", param="input")
        if len(inputs) > MAX_INPUTS:
            raise APIError(f"at most {MAX_INPUTS} inputs, got {len(inputs)}", param="input")
        params = request.pooling_params()
        base_id = common.new_id("embd", request.request_id)
        tasks = [
            asyncio.ensure_future(
                self.engine.encode(
                    x if isinstance(x, str) else {"prompt_token_ids": x},
                    params,
                    f"{base_id}-{i}",
                    request.truncate_prompt_tokens,
                )
            )
            for i, x in enumerate(inputs)
        ]
        try:
            outputs = await asyncio.gather(*tasks)
        except ValueError as exc:
            message = str(exc)
            param = "dimensions" if "dimensions" in message else "input"
            raise APIError(_with_truncation_hint(message), param=param) from None
        finally:  # one input failing (or the client leaving) aborts the others
            for task in tasks:
                task.cancel()
        num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
        return Whole(
            EmbeddingList(
                id=base_id,
                created=common.now(),
                model=model,
                data=[_embedding(i, o, request.encoding_format) for i, o in enumerate(outputs)],
                usage=EmbeddingUsage(prompt_tokens=num_prompt, total_tokens=num_prompt),
            )
        )


def _embedding(index: int, output: PoolingRequestOutput, encoding: str) -> Embedding:
    data = output.outputs.data
    if encoding == "base64":  # OpenAI's: little-endian float32 bytes
        raw = data.numpy().astype("<f4", copy=False).tobytes()
        return Embedding(index=index, embedding=base64.b64encode(raw).decode())
    return Embedding(index=index, embedding=data.tolist())


def _with_truncation_hint(message: str) -> str:
    if "longer than the maximum model length" in message:
        return f"{message}, or send truncate_prompt_tokens (-1: cut to the context)"
    return message
