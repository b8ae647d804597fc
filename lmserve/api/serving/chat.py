"""POST /v1/chat/completions: the model's chat template, then generation; streaming or not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from msgspec import UNSET, UnsetType

from lmserve.api.errors import APIError
from lmserve.api.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice, tool_dicts
from lmserve.api.reasoning import ReasoningParser, get_reasoning_parser
from lmserve.api.replies import Event, Reply, Stream, Whole
from lmserve.api.schemas.chat import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatDelta,
    ChoiceLogprobs,
    DeltaFunction,
    DeltaToolCall,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
)
from lmserve.api.schemas.common import Usage
from lmserve.api.serving import common
from lmserve.api.serving.chat_message import (
    MessageDelta,
    MessageParser,
    ToolMode,
    required_calls_schema,
)
from lmserve.api.tool_parsers import get_tool_parser
from lmserve.chat_template import (
    ChatTemplateError,
    image_placeholder,
    image_sources,
    render_chat,
)
from lmserve.config import DEFAULT_MM_LIMIT
from lmserve.engine.beam_search import beam_search
from lmserve.engine.protocol import EngineClient
from lmserve.multimodal.media import MediaError, MediaPolicy, load_images
from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import SamplingParams, StructuredOutputsParams

# How long a template that came with a request may render (it is code from a client).
REQUEST_TEMPLATE_TIMEOUT_S = 0.5


async def apply_chat_template(
    engine: EngineClient,
    config: common.ServingConfig,
    messages: list[ChatMessage],
    request_template: str | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The request's messages through the one renderer, in a worker thread (a long
    conversation does not hold the event loop); what it cannot render is a 400. A template
    sent with the request runs only with --trust-request-chat-template, and for a bounded
    time."""
    if request_template is not None and not config.trust_request_chat_template:
        raise APIError(
            "this server does not run chat templates sent with a request: leave out "
            "`chat_template`, or start the server with --trust-request-chat-template",
            param="chat_template",
        )
    dumped = [message.model_dump(exclude_none=True) for message in messages]
    try:
        return await asyncio.to_thread(
            render_chat,
            engine.tokenizer,
            dumped,
            chat_template=request_template or config.chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            content_format=config.chat_template_content_format,
            tools=tools,
            chat_template_kwargs=chat_template_kwargs,
            timeout_s=None if request_template is None else REQUEST_TEMPLATE_TIMEOUT_S,
            image_token=image_placeholder(engine.tokenizer, engine.config.model.hf_config),
        )
    except ChatTemplateError as exc:
        raise APIError(str(exc), param=exc.param) from None


async def chat_images(engine: EngineClient, messages: list[ChatMessage]) -> list[Any]:
    """The conversation's images, fetched and decoded under the engine's media rules (none for
    a conversation of text); a part that cannot be had is a 400 that says which and why."""
    try:
        sources = image_sources([m.model_dump(exclude_none=True) for m in messages])
        if not sources:
            return []
        limit = engine.config.model.limit_mm_per_prompt.get("image", DEFAULT_MM_LIMIT)
        if len(sources) > limit:  # before anything is fetched
            raise APIError(
                f"{len(sources)} images in one prompt, more than the {limit} allowed "
                "(--limit-mm-per-prompt)",
                param="messages",
            )
        return await load_images(sources, MediaPolicy.of(engine.config.model))
    except (ChatTemplateError, MediaError) as exc:
        raise APIError(str(exc), param="messages") from None


class ChatServing:
    def __init__(
        self, engine: EngineClient, config: common.ServingConfig, encoder: common.PromptEncoder
    ) -> None:
        self.engine = engine
        self.config = config
        self.encoder = encoder

    async def create(self, request: ChatCompletionRequest) -> Reply:
        request.check_supported()
        model, lora = common.check_model(self.config, request.model)
        common.check_generates(self.engine, model)
        tools = tool_dicts(request.tools)
        tool_mode = self._tool_mode(request, tools)
        if tool_mode.choice in ("required", "named") and request.response_format is not None:
            # as vLLM: the call's schema is the output's shape (instructor sends both)
            request = request.model_copy(update={"response_format": None})
        text = await apply_chat_template(
            self.engine,
            self.config,
            request.messages,
            request.chat_template,
            request.add_generation_prompt,
            request.continue_final_message,
            request.chat_template_kwargs,
            tools,
        )
        images = await chat_images(self.engine, request.messages)
        max_tokens = request.max_completion_tokens or request.max_tokens
        prompt: dict[str, Any]
        if images:  # the processor expands each placeholder; the engine checks the length
            if request.use_beam_search:
                raise APIError(
                    "beam search over a prompt with images is not supported",
                    param="use_beam_search",
                )
            prompt = {"prompt": text, "multi_modal_data": {"image": images}}
            ids = []
        else:
            ids = await self.encoder.encode(
                text,
                request.add_special_tokens,
                common.keep_tokens(self.engine, request.truncate_prompt_tokens),
                request.truncation_side,
            )
            common.check_prompt_length(self.engine, len(ids), max_tokens)
            prompt = {"prompt_token_ids": ids, "prompt": text}
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = request.sampling_params(max_tokens, num_logprobs, self.config.sampling_defaults)
        params = _params_for_tools(params, tool_mode, tools, request.parallel_tool_calls)
        reasoning = self._reasoning_parser(text)
        if reasoning is not None and reasoning.needs_special_tokens:
            params = replace(params, skip_special_tokens=False)  # its channels are special tokens
        parser = MessageParser(reasoning, tool_mode)
        request_id = common.new_id("chatcmpl", request.request_id)
        common.log_request(self.config, request_id, text, len(ids), params)
        salt = request.cache_salt
        if request.use_beam_search:  # it answers once, at its end: no first-token deadline
            beams = request.beam_search_params(params)
            stream = beam_search(self.engine, prompt, beams, request_id, salt, lora)
        else:
            stream = common.first_within(
                self.engine.generate(
                    prompt, params, request_id, salt, lora, request.stream_interval
                ),
                self.config.max_waiting_time_s,
            )
        if request.stream:
            events = self._stream(request, model, request_id, stream, parser)
            return Stream(events, done_marker=True)
        final = await common.run_to_end(stream)
        num_completion = sum(len(o.token_ids) for o in final.outputs)
        response = ChatCompletion(
            id=request_id,
            created=common.now(),
            model=model,
            choices=[self._choice(request, out, parser) for out in final.outputs],
            usage=Usage.of(
                len(final.prompt_token_ids),
                num_completion,
                self.config.cached_tokens(final.num_cached_tokens),
            ),
            metrics=self.config.response_metrics([final]),
        )
        if request.prompt_logprobs is not None:
            response.prompt_logprobs = common.prompt_logprobs(final)
        if request.return_token_ids:
            response.prompt_token_ids = final.prompt_token_ids
        return Whole(response)

    def _tool_mode(
        self, request: ChatCompletionRequest, tools: list[dict[str, Any]] | None
    ) -> ToolMode:
        """OpenAI's default is auto when tools are given; auto needs a parser for the model's
        own call format, so without the flags it is a 400 that names them (as in vLLM)."""
        choice = request.tool_choice or ("auto" if tools else "none")
        if isinstance(choice, NamedToolChoice):
            return ToolMode("named", name=choice.function.name)
        if choice != "auto":
            return ToolMode(choice)
        if not (self.config.enable_auto_tool_choice and self.config.tool_call_parser):
            raise APIError(
                '"auto" tool choice requires the server to be started with '
                "--enable-auto-tool-choice and --tool-call-parser NAME; or pass tool_choice "
                '"required", "none" or a named function',
                param="tool_choice",
            )
        parser_class = get_tool_parser(self.config.tool_call_parser)
        parallel = request.parallel_tool_calls is not False
        return ToolMode("auto", parser=parser_class(tools or []), parallel=parallel)

    def _reasoning_parser(self, prompt: str) -> ReasoningParser | None:
        if self.config.reasoning_parser is None:
            return None
        parser_class = get_reasoning_parser(self.config.reasoning_parser)
        return parser_class(reasoning_ended_in_prompt=parser_class.reasoning_ended(prompt))

    def _choice(
        self, request: ChatCompletionRequest, out: CompletionOutput, parser: MessageParser
    ) -> ChatChoice:
        parsed = parser.parse(out.text)
        content = parsed.content
        if request.echo and request.messages and request.messages[-1].role == "assistant":
            content = str(request.messages[-1].content or "") + (content or "")
        message = ChatCompletionMessage(role=self.config.response_role, content=content)
        if parsed.tool_calls:
            message.tool_calls = [
                ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                for c in parsed.tool_calls
            ]
        if parser.reasoning is not None:
            message.reasoning_content = message.reasoning = parsed.reasoning
        return ChatChoice(
            index=out.index,
            message=message,
            logprobs=self.choice_logprobs(
                out,
                0,
                len(out.token_ids),
                request.top_logprobs or 0,
                self._as_ids(request),
                bool(request.logprob_token_ids),
            )
            if request.logprobs
            else None,
            finish_reason=_finish_reason(out.finish_reason, bool(parsed.tool_calls)),
            stop_reason=out.stop_reason,
            token_ids=out.token_ids if request.return_token_ids else UNSET,
        )

    def _as_ids(self, request: ChatCompletionRequest) -> bool:
        return self.config.tokens_as_ids(request.return_tokens_as_token_ids)

    def choice_logprobs(
        self, out: CompletionOutput, start: int, end: int, k: int, as_ids: bool, by_id: bool
    ) -> ChoiceLogprobs:
        """OpenAI's shape: each sampled token, and the k most likely tokens at its position
        (k = -1: all of them); with `by_id` (logprob_token_ids) every token the engine
        returned, in its order: the sampled one, then those named."""
        content = []
        for token_id, entry in zip(
            out.token_ids[start:end], (out.logprobs or [])[start:end], strict=True
        ):
            chosen = entry[token_id]
            if by_id:
                top = list(entry.items())
            else:
                top = sorted(
                    ((tid, lp) for tid, lp in entry.items() if k == -1 or (lp.rank or 0) <= k),
                    key=lambda item: item[1].rank or 0,
                )
            text = self.config.token_text(token_id, chosen.decoded_token, as_ids)
            content.append(
                TokenLogprob(
                    token=text,
                    logprob=common.finite_logprob(chosen.logprob),
                    bytes=list(text.encode("utf-8")),
                    top_logprobs=[
                        _top_logprob(
                            self.config.token_text(tid, lp.decoded_token, as_ids), lp.logprob
                        )
                        for tid, lp in top
                    ],
                )
            )
        return ChoiceLogprobs(content=content)

    async def _stream(
        self,
        request: ChatCompletionRequest,
        model: str,
        request_id: str,
        stream: AsyncIterator[RequestOutput],
        parser: MessageParser,
    ) -> AsyncIterator[Event]:
        created = common.now()
        include_usage, continuous = self.config.stream_usage(request.stream_options)
        as_ids = self._as_ids(request)

        def chunk(
            choices: list[ChatChunkChoice], usage: Usage | UnsetType = UNSET, **extra: Any
        ) -> Event:
            return Event(
                ChatCompletionChunk(
                    id=request_id,
                    created=created,
                    model=model,
                    choices=choices,
                    usage=usage,
                    **extra,
                )
            )

        tracker = common.DeltaTracker()
        messages = {}  # choice index -> its MessageStream
        last: RequestOutput | None = None
        async for snapshot in stream:
            last = snapshot
            for out in snapshot.outputs:
                if tracker.is_new(out.index):
                    messages[out.index] = parser.stream()
                    role = ChatDelta(role=self.config.response_role, content="")
                    yield chunk(
                        [ChatChunkChoice(index=out.index, delta=role)],
                        common.running_usage(snapshot) if continuous else UNSET,
                        # as vLLM: the prompt's ids on the first chunk
                        prompt_token_ids=snapshot.prompt_token_ids
                        if request.return_token_ids and out.index == 0
                        else UNSET,
                    )
                sent = tracker.advance(out.index, out)
                if sent is None:
                    continue
                text, token_start = sent
                message = messages[out.index]
                delta = message.feed(text)
                if out.finish_reason is not None:
                    tail = message.finish()
                    delta = MessageDelta(
                        _join(delta.reasoning, tail.reasoning),
                        _join(delta.content, tail.content),
                        delta.tool_calls + tail.tool_calls,
                    )
                logprobs = (
                    self.choice_logprobs(
                        out,
                        token_start,
                        len(out.token_ids),
                        request.top_logprobs or 0,
                        as_ids,
                        bool(request.logprob_token_ids),
                    )
                    if request.logprobs
                    else None
                )
                if not delta and out.finish_reason is None and not (logprobs and logprobs.content):
                    continue  # held back by a parser: nothing to send yet
                choice = ChatChunkChoice(
                    index=out.index,
                    delta=_delta(delta, parser.reasoning is not None),
                    logprobs=logprobs,
                    finish_reason=_finish_reason(out.finish_reason, message.called),
                )
                if out.finish_reason is not None:
                    choice.stop_reason = out.stop_reason
                if request.return_token_ids:
                    choice.token_ids = out.token_ids[token_start:]
                yield chunk([choice], common.running_usage(snapshot) if continuous else UNSET)
        if include_usage and last is not None:
            num_completion = sum(len(o.token_ids) for o in last.outputs)
            cached = self.config.cached_tokens(last.num_cached_tokens)
            usage = Usage.of(len(last.prompt_token_ids), num_completion, cached)
            yield chunk([], usage, metrics=self.config.response_metrics([last]))


def _params_for_tools(
    params: SamplingParams,
    mode: ToolMode,
    tools: list[dict[str, Any]] | None,
    parallel: bool | None,
) -> SamplingParams:
    """tool_choice "required" and named functions are enforced with a JSON-schema grammar; a
    parser whose markup is special tokens needs them kept in the text."""
    if mode.parser is not None and mode.parser.needs_special_tokens:
        return replace(params, skip_special_tokens=False)  # the calls' markup is special tokens
    if mode.choice not in ("required", "named"):
        return params
    if params.structured_outputs is not None:
        raise APIError(
            f'tool_choice "{mode.choice}" cannot be combined with another output constraint',
            param="tool_choice",
        )
    assert tools is not None
    if mode.choice == "named":
        function = next(t["function"] for t in tools if t["function"]["name"] == mode.name)
        schema = function.get("parameters") or {"type": "object"}
    else:
        schema = required_calls_schema(tools, parallel is not False)
    return replace(params, structured_outputs=StructuredOutputsParams(json=schema))


def _finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


def _join(a: str | None, b: str | None) -> str | None:
    return (a or "") + (b or "") or None


def _delta(delta: MessageDelta, with_reasoning: bool) -> ChatDelta:
    body = ChatDelta()
    if delta.content is not None:
        body.content = delta.content
    if with_reasoning and delta.reasoning is not None:
        body.reasoning_content = body.reasoning = delta.reasoning
    if delta.tool_calls:
        body.tool_calls = [
            DeltaToolCall(
                index=call.index,
                id=UNSET if call.id is None else call.id,
                type=UNSET if call.id is None else "function",
                function=DeltaFunction(
                    name=UNSET if call.name is None else call.name, arguments=call.arguments
                ),
            )
            for call in delta.tool_calls
        ]
    return body


def _top_logprob(text: str, logprob: float) -> TopLogprob:
    return TopLogprob(
        token=text, logprob=common.finite_logprob(logprob), bytes=list(text.encode("utf-8"))
    )
