"""POST /v1/chat/completions: the model's chat template, then generation; streaming or not."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from lmserve.api.errors import APIError
from lmserve.api.protocol import ChatCompletionRequest, ChatMessage
from lmserve.api.serving import common
from lmserve.engine.protocol import EngineClient
from lmserve.outputs import CompletionOutput, RequestOutput

# A template that loops over a message's content expects OpenAI's list of parts.
_LOOPS_OVER_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+(\[['\"]content['\"]\]|\.content)")


def detect_content_format(template: str) -> str:
    """ "openai" when the template iterates over content parts, else "string"."""
    return "openai" if _LOOPS_OVER_CONTENT.search(template) else "string"


def render_messages(messages: list[ChatMessage], content_format: str) -> list[dict[str, Any]]:
    """With the "string" format, text parts are joined into one string; with "openai" the
    parts are passed to the template as they came. Non-text parts are refused either way."""
    rendered = []
    for message in messages:
        item = message.model_dump(exclude_none=True)
        if isinstance(message.content, list) and content_format == "openai":
            for part in message.content:
                if part.get("type") != "text":
                    raise APIError(
                        f"content part type {part.get('type')!r} is not supported (text only)",
                        param="messages",
                    )
        elif isinstance(message.content, list):
            texts = []
            for part in message.content:
                if part.get("type") != "text":
                    raise APIError(
                        f"content part type {part.get('type')!r} is not supported (text only)",
                        param="messages",
                    )
                texts.append(part.get("text", ""))
            item["content"] = "\n".join(texts)
        rendered.append(item)
    return rendered


def apply_chat_template(
    engine: EngineClient,
    messages: list[ChatMessage],
    chat_template: str | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict[str, Any] | None,
    content_format: str = "auto",
) -> str:
    tokenizer = engine.tokenizer
    template = chat_template or (tokenizer.chat_template if tokenizer is not None else None)
    if tokenizer is None or not isinstance(template, str):
        raise APIError(
            "This model has no chat template, so it cannot serve chat requests. Start the server "
            "with --chat-template (a Jinja file or string), or use /v1/completions.",
        )
    if content_format == "auto":
        content_format = detect_content_format(template)
    return tokenizer.apply_chat_template(
        render_messages(messages, content_format),
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        **(chat_template_kwargs or {}),
    )


class ChatServing:
    def __init__(self, engine: EngineClient, config: common.ServingConfig) -> None:
        self.engine = engine
        self.config = config

    async def create(self, request: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        request.check_supported()
        model = common.check_model(self.config, request.model)
        text = apply_chat_template(
            self.engine,
            request.messages,
            request.chat_template or self.config.chat_template,
            request.add_generation_prompt,
            request.continue_final_message,
            request.chat_template_kwargs,
            self.config.chat_template_content_format,
        )
        assert self.engine.tokenizer is not None
        ids = self.engine.tokenizer.encode(text, add_special_tokens=request.add_special_tokens)
        ids = common.truncate(ids, request.truncate_prompt_tokens)
        max_tokens = request.max_completion_tokens or request.max_tokens
        common.check_prompt_length(self.engine, len(ids), max_tokens)
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = request.sampling_params(max_tokens, num_logprobs, self.config.sampling_defaults)
        request_id = common.new_id("chatcmpl", request.request_id)
        common.log_request(self.config, request_id, len(ids), params)
        stream = self.engine.generate(
            {"prompt_token_ids": ids, "prompt": text}, params, request_id, request.cache_salt
        )
        if request.stream:
            return self._stream(request, model, request_id, stream)
        final = await common.run_to_end(stream)
        choices = [self._choice(request, out, final) for out in final.outputs]
        num_completion = sum(len(o.token_ids) for o in final.outputs)
        response = {
            "id": request_id,
            "object": "chat.completion",
            "created": common.now(),
            "model": model,
            "choices": choices,
            "usage": common.usage(len(ids), num_completion),
        }
        if request.prompt_logprobs is not None:
            response["prompt_logprobs"] = common.prompt_logprobs_json(final)
        if request.return_token_ids:
            response["prompt_token_ids"] = final.prompt_token_ids
        return response

    def _choice(
        self, request: ChatCompletionRequest, out: CompletionOutput, final: RequestOutput
    ) -> dict[str, Any]:
        content = out.text
        if request.echo and request.messages and request.messages[-1].role == "assistant":
            content = str(request.messages[-1].content or "") + content
        choice: dict[str, Any] = {
            "index": out.index,
            "message": {"role": self.config.response_role, "content": content, "refusal": None},
            "logprobs": self._logprobs(out, 0, len(out.token_ids), request.top_logprobs or 0)
            if request.logprobs
            else None,
            "finish_reason": out.finish_reason,
            "stop_reason": out.stop_reason,
        }
        if request.return_token_ids:
            choice["token_ids"] = out.token_ids
        return choice

    def _logprobs(self, out: CompletionOutput, start: int, end: int, k: int) -> dict[str, Any]:
        """OpenAI's shape: each sampled token, and the k most likely tokens at its position."""
        content = []
        for token_id, entry in zip(
            out.token_ids[start:end], (out.logprobs or [])[start:end], strict=True
        ):
            chosen = entry[token_id]
            top = sorted(
                (lp for lp in entry.values() if (lp.rank or 0) <= k), key=lambda lp: lp.rank
            )
            content.append(
                {
                    **_token_logprob(chosen.decoded_token, chosen.logprob),
                    "top_logprobs": [_token_logprob(lp.decoded_token, lp.logprob) for lp in top],
                }
            )
        return {"content": content, "refusal": None}

    async def _stream(
        self,
        request: ChatCompletionRequest,
        model: str,
        request_id: str,
        stream: AsyncIterator[RequestOutput],
    ) -> AsyncIterator[str]:
        created = common.now()
        head = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        tracker = common.DeltaTracker()
        last: RequestOutput | None = None
        async for snapshot in stream:
            last = snapshot
            for out in snapshot.outputs:
                if tracker.is_new(out.index):
                    role = {"role": self.config.response_role, "content": ""}
                    yield common.sse(
                        {
                            **head,
                            "choices": [
                                {
                                    "index": out.index,
                                    "delta": role,
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
                sent = tracker.advance(out.index, out)
                if sent is None:
                    continue
                delta, token_start = sent
                choice = {
                    "index": out.index,
                    "delta": {"content": delta} if delta else {},
                    "logprobs": self._logprobs(
                        out, token_start, len(out.token_ids), request.top_logprobs or 0
                    )
                    if request.logprobs
                    else None,
                    "finish_reason": out.finish_reason,
                }
                if out.finish_reason is not None:
                    choice["stop_reason"] = out.stop_reason
                chunk = {**head, "choices": [choice]}
                if request.stream_options and request.stream_options.continuous_usage_stats:
                    chunk["usage"] = common.running_usage(snapshot)
                yield common.sse(chunk)
        if request.stream_options and request.stream_options.include_usage and last is not None:
            num_completion = sum(len(o.token_ids) for o in last.outputs)
            yield common.sse(
                {
                    **head,
                    "choices": [],
                    "usage": common.usage(len(last.prompt_token_ids), num_completion),
                }
            )
        yield common.sse("[DONE]")


def _token_logprob(token: str | None, logprob: float) -> dict[str, Any]:
    text = token or ""
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
