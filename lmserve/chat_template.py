"""The one chat-template renderer, below both `LLM.chat` and the server, so a conversation
renders the same way offline and over HTTP: content given as OpenAI's parts or as a string,
image parts as the model's placeholder, past tool calls with their arguments as mappings,
tools, `continue_final_message`, and template failures as one error that says what to fix.
(HF's renderer runs the Jinja in its sandbox.)"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from lmserve import template_bounds

ContentFormat = Literal["auto", "string", "openai"]

# A template that loops over a message's content expects OpenAI's list of parts.
_LOOPS_OVER_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+(\[['\"]content['\"]\]|\.content)")


# Content parts that carry an image, and the key that holds it: OpenAI's chat `image_url`
# ({"url": ...} or a bare URL), Responses' `input_image`, and offline a PIL image (vLLM's
# `image_pil`, or `image`).
_IMAGE_PARTS = {"image_url": "image_url", "input_image": "image_url", "image_pil": "image_pil",
                "image": "image"}  # fmt: skip

# Arguments the renderer passes itself: chat_template_kwargs may not set them.
RESERVED_KWARGS = frozenset(
    {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
     "continue_final_message", "tokenize", "padding", "truncation", "max_length",
     "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
)  # fmt: skip


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered: the message says why, and what to do. `param` is
    the request field at fault."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


def detect_content_format(template: str) -> Literal["string", "openai"]:
    """ "openai" when the template iterates over content parts, else "string"."""
    return "openai" if _LOOPS_OVER_CONTENT.search(template) else "string"


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    content_format: ContentFormat = "auto",
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    timeout_s: float | None = None,
    image_token: str | None = None,
) -> str:
    """The prompt text of `messages` (OpenAI-style dicts) under the model's template, or
    `chat_template` in its place. With `timeout_s` (for templates that came with a request,
    which are code a client runs here), it renders within template_bounds: that time, bounded
    memory, no one operation building a huge value. `image_token`: the model's image
    placeholder (None: the model takes no images)."""
    template = chat_template or (tokenizer.chat_template if tokenizer is not None else None)
    if tokenizer is None or not isinstance(template, str):
        raise ChatTemplateError(
            "This model has no chat template, so it cannot render a chat. Give one (the "
            "server's --chat-template, or LLM.chat(chat_template=...): a Jinja string), or send "
            "a plain prompt."
        )
    if add_generation_prompt and continue_final_message:
        raise ChatTemplateError(
            "continue_final_message continues the last message, add_generation_prompt starts a "
            "new one: set only one of them"
        )
    reserved = sorted(RESERVED_KWARGS & set(chat_template_kwargs or {}))
    if reserved:
        raise ChatTemplateError(
            f"chat_template_kwargs may not set {', '.join(reserved)}: the renderer sets "
            "them (use the request's own fields)",
            param="chat_template_kwargs",
        )
    if content_format == "auto":
        content_format = detect_content_format(template)
    rendered = [_render_message(m, content_format, image_token) for m in messages]

    def render() -> str:
        if timeout_s is not None:  # a request's template: operations past the bounds refused
            context = {**tokenizer.special_tokens_map, **(chat_template_kwargs or {})}
            template_bounds.check(
                template,
                {**context, "messages": rendered, "tools": tools,
                 "add_generation_prompt": add_generation_prompt},
            )  # fmt: skip
        return tokenizer.apply_chat_template(
            rendered,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            **(chat_template_kwargs or {}),
        )

    try:
        return render() if timeout_s is None else template_bounds.within(timeout_s, render)
    except template_bounds.TemplateBoundError as exc:
        raise ChatTemplateError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a template is code: any failure of it is the input's
        reason = str(exc) or type(exc).__name__
        raise ChatTemplateError(
            f"the chat template cannot render these messages: {reason}"
        ) from None


def _render_message(
    message: dict[str, Any], content_format: str, image_token: str | None
) -> dict[str, Any]:
    """With the "string" format, parts are joined into one string (an image as the model's
    placeholder); with "openai" the parts are passed to the template, an image as
    {"type": "image"} (what HF's templates test for). Other parts are refused. No content (an
    assistant turn of tool calls) is "" or no parts, as vLLM renders it."""
    item = copy.deepcopy(dict(message))
    content = item.get("content")
    if content is None:
        item["content"] = [] if content_format == "openai" else ""
    elif isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind in _IMAGE_PARTS:
                if image_token is None:
                    raise ChatTemplateError(
                        "this model takes no images: send text content parts only"
                    )
                parts.append({"type": "image"})
            elif kind != "text":
                raise ChatTemplateError(
                    f"content part type {kind!r} is not supported (text, image_url)"
                )
            elif not isinstance(part.get("text"), str):
                raise ChatTemplateError("a text content part needs `text`, a string")
            else:
                parts.append(part)
        item["content"] = parts
        if content_format != "openai":
            item["content"] = "\n".join(
                image_token if p["type"] == "image" else p["text"] for p in parts
            )
    elif not isinstance(content, str):
        raise ChatTemplateError("a message's content is a string or a list of content parts")
    calls = item.get("tool_calls")
    if calls is not None and not (
        isinstance(calls, list)
        and all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)
    ):
        raise ChatTemplateError(
            "tool_calls is a list of {id, type, function: {name, arguments}} objects"
        )
    for call in calls or []:
        _arguments_to_dict(call)
    return item


def _arguments_to_dict(call: dict[str, Any]) -> None:
    """Templates render a past call's arguments as a mapping (`| tojson`); OpenAI sends a JSON
    string, so it is parsed first, as vLLM does. Arguments that are not JSON stay as they are."""
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        with contextlib.suppress(json.JSONDecodeError):
            function["arguments"] = json.loads(function["arguments"])


def image_sources(messages: Sequence[dict[str, Any]]) -> list[Any]:
    """Each image part's image in conversation order (the order the template places them): a
    URL string (http(s), data: or file:) or, offline, a PIL image."""
    found = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            key = _IMAGE_PARTS.get(part.get("type")) if isinstance(part, dict) else None
            if key is None:
                continue
            value = part.get(key)
            if isinstance(value, dict):  # chat's {"url": ..., "detail": ...}
                value = value.get("url")
            if value is None or (isinstance(value, str) and not value):
                raise ChatTemplateError(f"an {part['type']} part needs its image (`{key}`)")
            found.append(value)
    return found


def image_placeholder(tokenizer: Any, hf_config: dict[str, Any]) -> str | None:
    """The text that stands for one image in a vision-language model's prompt; None for a
    model that takes no images."""
    token_id = hf_config.get("image_token_id", hf_config.get("image_token_index"))
    if "vision_config" not in hf_config or token_id is None or tokenizer is None:
        return None
    return str(tokenizer.convert_ids_to_tokens(int(token_id)))
