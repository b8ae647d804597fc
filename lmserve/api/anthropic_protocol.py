"""Anthropic Messages API request bodies, and their translation to an OpenAI chat request.

Served as vLLM serves them: the request becomes a chat completion request (the same template,
sampling, tool and reasoning handling), and the result is written back in Anthropic's shapes.
Image blocks (base64 or URL sources) become chat image parts; other content blocks than text,
image, tool_use and tool_result (documents, ...) are refused.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmserve.api.errors import APIError
from lmserve.api.protocol import ChatCompletionRequest, StreamOptions

logger = logging.getLogger(__name__)

# Anthropic fields accepted without effect on a local engine.
_IGNORED = (
    "metadata", "service_tier", "thinking", "container", "context_management", "mcp_servers",
    "cache_control", "diagnostics", "inference_geo", "speed", "user_profile_id", "workspace_id",
)  # fmt: skip


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, type, ...
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class AnthropicToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class JSONOutputFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    """Structured outputs: `format` constrains the reply to a JSON schema; `effort` is ignored."""

    model_config = ConfigDict(extra="forbid")
    format: JSONOutputFormat | None = None
    effort: Any = None


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class CountTokensRequest(BaseModel):
    """POST /v1/messages/count_tokens: the prompt a Messages request would run, counted."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: Any = None
    mcp_servers: Any = None
    context_management: Any = None
    cache_control: Any = None

    def chat_messages(self) -> list[dict[str, Any]]:
        """Anthropic's system and turns as OpenAI chat messages: tool_use blocks become the
        assistant's tool_calls, tool_result blocks become `tool` messages."""
        messages = []
        if self.system:
            messages.append({"role": "system", "content": _text_of(self.system, "system")})
        for message in self.messages:
            messages.extend(_chat_messages(message))
        return messages

    @property
    def continues_reply(self) -> bool:
        """A conversation ending with an assistant turn asks for that turn's continuation
        (Anthropic's prefill), not for a new turn."""
        return self.messages[-1].role == "assistant"

    def chat_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        return [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.input_schema,
                },
            }
            for tool in self.tools
        ]

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if choice is None:
            return None
        if choice.type == "tool":
            if not choice.name:
                raise APIError("tool_choice of type tool needs a name", param="tool_choice")
            return {"type": "function", "function": {"name": choice.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages. Sampling fields (temperature, top_p, top_k) are gone from Anthropic's
    current SDK but still taken, from older clients or the SDK's extra_body."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = None
    top_k: int | None = None
    output_config: OutputConfig | None = None
    metadata: Any = None
    service_tier: Any = None
    container: Any = None
    diagnostics: Any = None
    inference_geo: Any = None
    speed: Any = None
    user_profile_id: Any = None
    workspace_id: Any = None

    def chat_request(self) -> ChatCompletionRequest:
        """The same generation as an OpenAI chat request (streamed with usage, which the
        Anthropic events need on the first and the last event)."""
        for name in _IGNORED:
            if getattr(self, name, None) is not None:
                logger.warning("ignoring %r: it has no effect on this server", name)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.chat_messages(),
            "max_tokens": self.max_tokens,
            "stop": self.stop_sequences,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "tools": self.chat_tools(),
            "tool_choice": self.chat_tool_choice(),
            "stream": self.stream,
            "add_generation_prompt": not self.continues_reply,
            "continue_final_message": self.continues_reply,
        }
        output_format = self.output_config.format if self.output_config else None
        if output_format is not None:
            schema = {"name": "output", "schema": output_format.schema_}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        if self.tool_choice is not None and self.tool_choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
        if self.stream:
            body["stream_options"] = StreamOptions(include_usage=True, continuous_usage_stats=True)
        return ChatCompletionRequest(**{k: v for k, v in body.items() if v is not None})


def _chat_messages(message: AnthropicMessage) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    texts: list[str] = []
    parts: list[dict[str, Any]] = []  # a user turn's text and image parts, in order
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in message.content:
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
            parts.append({"type": "text", "text": texts[-1]})
        elif kind == "image" and message.role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block)}})
        elif kind == "tool_use" and message.role == "assistant":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": json.dumps(block.get("input") or {}),
                    },
                }
            )
        elif kind == "tool_result" and message.role == "user":
            content = block.get("content")
            results.append(
                {
                    "role": "tool",
                    "tool_call_id": block.get("tool_use_id"),
                    "content": _text_of(content, "messages") if content is not None else "",
                }
            )
        elif kind in ("thinking", "redacted_thinking") and message.role == "assistant":
            continue  # earlier reasoning is not replayed into the prompt
        else:
            raise APIError(
                f"content block type {kind!r} is not supported in a {message.role} message "
                "(text, image, tool_use and tool_result only)",
                param="messages",
            )
    out = list(results)  # tool results answer the previous turn, so they come first
    if message.role == "assistant":
        reply: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) or None}
        if calls:
            reply["tool_calls"] = calls
        out.append(reply)
    elif len(parts) > len(texts):  # images: the parts as they came
        out.append({"role": "user", "content": parts})
    elif texts or not results:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _image_url(block: dict[str, Any]) -> str:
    """An image block's source as a URL: base64 data as a data: URL, or the URL given."""
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if isinstance(media_type, str) and isinstance(data, str):
            return f"data:{media_type};base64,{data}"
    if (
        isinstance(source, dict)
        and source.get("type") == "url"
        and isinstance(source.get("url"), str)
    ):
        return source["url"]
    raise APIError(
        "an image block's source is {type: base64, media_type, data} or {type: url, url}",
        param="messages",
    )


def _text_of(content: str | list[Any], param: str) -> str:
    """A string, or the text of a list of text blocks joined by newlines."""
    if isinstance(content, str):
        return content
    texts = []
    for block in content:
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise APIError(f"only text blocks are supported here, got {kind!r}", param=param)
        texts.append(str(block.get("text", "")))
    return "\n".join(texts)
