"""The pooling endpoints on a pooling model: /v1/embeddings, /pooling and /classify. Every
input of a request is pooled in the same engine steps; a request that fails anywhere aborts
the rest of its inputs."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Any

from lmserve.api.errors import APIError
from lmserve.api.pooling_protocol import (
    MAX_INPUTS,
    ClassificationRequest,
    EmbeddingRequest,
    InputsRequest,
    PoolingRequest,
)
from lmserve.api.replies import Reply, Whole
from lmserve.api.schemas.embeddings import (
    Embedding,
    EmbeddingList,
    EmbeddingUsage,
    PoolingData,
    PoolingList,
)
from lmserve.api.schemas.scores import ClassificationData, ClassificationList
from lmserve.api.serving import common
from lmserve.api.serving.chat import apply_chat_template
from lmserve.engine.protocol import EngineClient
from lmserve.outputs import PoolingRequestOutput
from lmserve.pooling.score import labels
from lmserve.pooling_params import PoolingParams

# what each pooling task serves, for the 400 that names the right flag
_SERVES = {
    "embed": "/v1/embeddings, /pooling, /score and /rerank",
    "classify": "/classify, /pooling and (with one label) /score and /rerank",
}


class PoolingServing:
    def __init__(self, engine: EngineClient, config: common.ServingConfig) -> None:
        self.engine = engine
        self.config = config

    def check(self, request_model: str | None, task: str | None, endpoint: str) -> str:
        """The served model's name, or a 400 when this model does not serve `endpoint` (task
        None: any pooling model does)."""
        model, lora = common.check_model(self.config, request_model)
        if lora is not None:
            raise APIError(f"{endpoint} does not take LoRA adapters", param="model")
        pooler = self.engine.config.pooler
        if self.engine.config.runner != "pooling" or pooler is None:
            raise APIError(
                f"The model `{model}` generates text and does not serve {endpoint}: serve a "
                "pooling model with `lmserve serve MODEL --runner pooling` (embeddings) or a "
                "*ForSequenceClassification checkpoint (classify, score, rerank)",
                param="model",
            )
        if task is not None and pooler.task != task:
            flag = "--convert embed" if task == "embed" else "--convert classify"
            raise APIError(
                f"The model `{model}` runs as a {pooler.task} model and serves "
                f"{_SERVES[pooler.task]}; {endpoint} needs a model served with {flag}",
                param="model",
            )
        return model

    async def encode_all(
        self,
        prompts: Sequence[str | list[int] | dict[str, Any]],
        params: PoolingParams,
        base_id: str,
        truncate: int | None,
    ) -> list[PoolingRequestOutput]:
        """Every prompt pooled at once; a bad one is a 400 naming the field."""
        if not prompts or any(len(x) == 0 for x in prompts if isinstance(x, list)):
            raise APIError("input must not be empty", param="input")
        if len(prompts) > MAX_INPUTS:
            raise APIError(f"at most {MAX_INPUTS} inputs, got {len(prompts)}", param="input")
        tasks = [
            asyncio.ensure_future(
                self.engine.encode(
                    x if isinstance(x, (str, dict)) else {"prompt_token_ids": x},
                    params,
                    f"{base_id}-{i}",
                    truncate,
                )
            )
            for i, x in enumerate(prompts)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except ValueError as exc:
            message = str(exc)
            param = "dimensions" if "dimensions" in message else "input"
            raise APIError(_with_truncation_hint(message), param=param) from None
        finally:  # one input failing (or the client leaving) aborts the others
            for task in tasks:
                task.cancel()

    async def prompts(self, request: InputsRequest) -> list[str | list[int]]:
        """The request's prompts: its inputs, or its chat rendered by the model's template."""
        if request.messages is None:
            return request.inputs()
        text = await apply_chat_template(
            self.engine,
            self.config,
            request.messages,
            request.chat_template,
            request.add_generation_prompt,
            request.continue_final_message,
            request.chat_template_kwargs,
        )
        if self.engine.tokenizer is None:
            raise APIError("this model has no tokenizer to read messages with", param="messages")
        ids = self.engine.tokenizer.encode(text, add_special_tokens=request.add_special_tokens)
        return [list(ids)]

    async def _pool(
        self,
        request: EmbeddingRequest | ClassificationRequest,
        task: str | None,
        endpoint: str,
        id_prefix: str,
    ) -> tuple[str, str, list[PoolingRequestOutput]]:
        """(served model name, response id, one output per prompt) of an inputs request."""
        model = self.check(request.model, task, endpoint)
        base_id = common.new_id(id_prefix, request.request_id)
        outputs = await self.encode_all(
            await self.prompts(request),
            request.pooling_params(),
            base_id,
            request.truncate_prompt_tokens,
        )
        return model, base_id, outputs

    async def embeddings(self, request: EmbeddingRequest) -> Reply:
        model, base_id, outputs = await self._pool(request, "embed", "/v1/embeddings", "embd")
        data = [
            Embedding(index=i, embedding=_encoded(o, request.encoding_format))
            for i, o in enumerate(outputs)
        ]
        return Whole(
            EmbeddingList(
                id=base_id, created=common.now(), model=model, data=data, usage=usage(outputs)
            )
        )

    async def pooling(self, request: PoolingRequest) -> Reply:
        model, base_id, outputs = await self._pool(request, None, "/pooling", "pool")
        data = [
            PoolingData(index=i, data=_encoded(o, request.encoding_format))
            for i, o in enumerate(outputs)
        ]
        return Whole(
            PoolingList(
                id=base_id, created=common.now(), model=model, data=data, usage=usage(outputs)
            )
        )

    async def classify(self, request: ClassificationRequest) -> Reply:
        model, base_id, outputs = await self._pool(request, "classify", "/classify", "classify")
        names = labels(self.engine.config.model.hf_config)
        data = []
        for i, output in enumerate(outputs):
            probs = output.outputs.data.tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append(
                ClassificationData(index=i, label=names[best], probs=probs, num_classes=len(probs))
            )
        return Whole(
            ClassificationList(
                id=base_id, created=common.now(), model=model, data=data, usage=usage(outputs)
            )
        )


def usage(outputs: Sequence[PoolingRequestOutput]) -> EmbeddingUsage:
    num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    return EmbeddingUsage(prompt_tokens=num_prompt, total_tokens=num_prompt)


def _encoded(output: PoolingRequestOutput, encoding: str) -> Any:
    data = output.outputs.data
    if encoding == "base64":  # OpenAI's: little-endian float32 bytes
        raw = data.numpy().astype("<f4", copy=False).tobytes()
        return base64.b64encode(raw).decode()
    return data.tolist()


def _with_truncation_hint(message: str) -> str:
    if "longer than the maximum model length" in message:
        return f"{message}, or send truncate_prompt_tokens (-1: cut to the context)"
    return message
