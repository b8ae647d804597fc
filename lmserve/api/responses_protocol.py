"""OpenAI Responses API request bodies (POST /v1/responses), and their translation to a chat
completion request, as vLLM serves them: the same template, sampling, tool and structured-output
handling. Responses are not stored, so `previous_response_id` is refused; input items other than
messages, function calls and their outputs (images, files, built-in tools) are refused.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lmserve.api.errors import APIError
from lmserve.api.protocol import ChatCompletionRequest, StreamOptions

logger = logging.getLogger(__name__)

# Fields accepted without effect on a local engine.
_IGNORED = (
    "metadata", "reasoning", "store", "service_tier", "truncation", "include", "user",
    "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "max_tool_calls",
    "top_logprobs", "stream_options",
)  # fmt: skip
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    previous_response_id: str | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    metadata: dict[str, str] | None = None
    reasoning: Any = None
    store: bool | None = None
    service_tier: Any = None
    truncation: Any = None
    include: Any = None
    user: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    stream_options: Any = None

    def check_supported(self) -> None:
        for name, what in (
            ("previous_response_id", "responses are not stored; send the whole conversation"),
            ("conversation", "conversations are not stored; send the whole conversation"),
            ("prompt", "prompt templates are not supported"),
        ):
            if getattr(self, name) is not None:
                raise APIError(f"{name!r} is not supported: {what}", param=name)
        if self.background:
            raise APIError("background responses are not supported", param="background")
        for name in _IGNORED:
            if getattr(self, name, None) is not None:
                logger.warning("ignoring %r: it has no effect on this server", name)

    def chat_request(self) -> ChatCompletionRequest:
        self.check_supported()
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self._chat_messages(),
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "tools": self._chat_tools(),
            "tool_choice": self._chat_tool_choice(),
            "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": self._response_format(),
            "stream": self.stream,
        }
        if self.stream:
            body["stream_options"] = StreamOptions(include_usage=True, continuous_usage_stats=True)
        return ChatCompletionRequest(**{k: v for k, v in body.items() if v is not None})

    def _chat_messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        for item in self.input:
            kind = item.get("type", "message")
            if kind == "message":
                role = _ROLES.get(item.get("role", ""))
                if role is None:
                    raise APIError(f"unknown message role {item.get('role')!r}", param="input")
                messages.append({"role": role, "content": _text(item.get("content"))})
            elif kind == "function_call":
                call = {
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
                }
                last = messages[-1] if messages else None
                if last and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)  # parallel calls: one assistant turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output", "")
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else _text(output),
                    }
                )
            elif kind == "reasoning":
                continue  # earlier reasoning is not replayed into the prompt
            else:
                raise APIError(
                    f"input item type {kind!r} is not supported (messages, function_call and "
                    "function_call_output only)",
                    param="input",
                )
        return messages

    def _chat_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        tools = []
        for tool in self.tools:
            if tool.get("type") != "function":
                raise APIError(
                    f"tool type {tool.get('type')!r} is not supported (function tools only)",
                    param="tools",
                )
            function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            tools.append({"type": "function", "function": function})
        return tools

    def _chat_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or "name" not in choice:
                raise APIError(
                    'tool_choice must be "none", "auto", "required" or {"type": "function", '
                    '"name": ...}',
                    param="tool_choice",
                )
            return {"type": "function", "function": {"name": choice["name"]}}
        return choice

    def _response_format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format")
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_object":
            return {"type": "json_object"}
        if fmt.get("type") == "json_schema":
            spec = {"name": fmt.get("name", "output"), "schema": fmt.get("schema", {})}
            return {"type": "json_schema", "json_schema": spec}
        raise APIError(
            "text.format type must be text, json_object or json_schema", param="text.format"
        )


def _text(content: Any) -> str:
    """A message's content: a string, or its text parts (input_text / output_text) joined."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise APIError(
                f"content part type {kind!r} is not supported (text only)", param="input"
            )
        texts.append(str(part.get("text", "")))
    return "\n".join(texts)
