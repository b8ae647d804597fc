"""OpenAI Responses API request bodies (POST /v1/responses), and their translation to a chat
completion request, as vLLM serves them: the same template, sampling, tool and structured-output
handling. Responses are not stored, so `previous_response_id` is refused; input items other than
messages (text and `input_image` parts), function calls and their outputs (files, built-in
tools) are refused.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

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


class _Item(BaseModel):
    """Input items echo fields of earlier outputs (id, status): kept, not used."""

    model_config = ConfigDict(extra="allow")


class TextPart(_Item):
    type: Literal["input_text", "output_text", "text"]
    text: str


class ImagePart(_Item):
    """An image by URL (http(s) or data:); `file_id` needs OpenAI's Files API, which this
    server does not have."""

    type: Literal["input_image"]
    image_url: str
    detail: str | None = None


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart | ImagePart] | None = None


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = ""


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart] = ""


class ReasoningItem(_Item):
    type: Literal["reasoning"]


def _item_type(item: Any) -> str | None:
    """A message may leave out its type; any other item names it."""
    if isinstance(item, dict):
        kind = item.get("type", "message")
        return kind if isinstance(kind, str) else None
    return getattr(item, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(
        _item_type,
        custom_error_type="input_item_type",
        custom_error_message="input item type must be message, function_call, "
        "function_call_output or reasoning (others are not supported)",
    ),
]


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class HostedTool(BaseModel):
    """A tool OpenAI's servers run (MCP, web search, ...): recognised, so it is refused by name
    rather than as a malformed function."""

    model_config = ConfigDict(extra="allow")

    type: Literal[
        "mcp", "web_search", "web_search_preview", "file_search", "code_interpreter",
        "image_generation", "computer_use_preview", "local_shell", "shell", "custom",
    ]  # fmt: skip


class FunctionToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    name: str = "output"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    tools: list[Annotated[FunctionTool | HostedTool, Field(discriminator="type")]] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
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
        for i, tool in enumerate(self.tools or []):
            if tool.type == "mcp":
                raise APIError(
                    "MCP tools are not supported yet (vLLM runs them with --tool-server): give "
                    "the model function tools and call the MCP server from your client",
                    param=f"tools[{i}]",
                )
            if isinstance(tool, HostedTool):
                raise APIError(
                    f"{tool.type!r} tools are not supported: only function tools are",
                    param=f"tools[{i}]",
                )
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
            match item:
                case MessageItem():
                    content = _content(item.content)
                    messages.append({"role": _ROLES[item.role], "content": content})
                case FunctionCallItem():
                    function = {"name": item.name, "arguments": item.arguments}
                    call = {"id": item.call_id, "type": "function", "function": function}
                    last = messages[-1] if messages else None
                    if last and last["role"] == "assistant" and "tool_calls" in last:
                        last["tool_calls"].append(call)  # parallel calls: one assistant turn
                    else:
                        messages.append(
                            {"role": "assistant", "content": None, "tool_calls": [call]}
                        )
                case FunctionCallOutputItem():
                    content = _text(item.output)
                    messages.append(
                        {"role": "tool", "tool_call_id": item.call_id, "content": content}
                    )
                case ReasoningItem():
                    continue  # earlier reasoning is not replayed into the prompt
        return messages

    def _chat_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        return [
            {
                "type": "function",
                "function": tool.model_dump(exclude={"type", "strict"}, exclude_none=True),
            }
            for tool in self.tools
        ]

    def _chat_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if isinstance(choice, FunctionToolChoice):
            return {"type": "function", "function": {"name": choice.name}}
        return choice

    def _response_format(self) -> dict[str, Any] | None:
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_}}


def _content(content: str | list[TextPart | ImagePart] | None) -> str | list[dict[str, Any]]:
    """A message's content: its text joined, or with images its parts as chat parts."""
    if not isinstance(content, list) or not any(isinstance(p, ImagePart) for p in content):
        return _text(content)  # type: ignore[arg-type]
    return [
        {"type": "image_url", "image_url": {"url": part.image_url}}
        if isinstance(part, ImagePart)
        else {"type": "text", "text": part.text}
        for part in content
    ]


def _text(content: str | list[TextPart] | None) -> str:
    """A message's content: a string, or its text parts (input_text / output_text) joined."""
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text for part in content)
