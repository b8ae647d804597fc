"""POST /v1/responses: OpenAI's Responses API over the chat path.

The request runs as a chat completion; its result (or its stream of chunks) is rewritten as a
Response: output items (reasoning, message, function_call), usage with token details, and the
event stream response.created ... response.completed with sequence numbers.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from lmserve.api.replies import Event, Reply, Stream, Whole
from lmserve.api.responses_protocol import ResponsesRequest
from lmserve.api.serving import common
from lmserve.api.serving.chat import ChatServing


class ResponsesServing:
    def __init__(self, chat: ChatServing) -> None:
        self.chat = chat

    async def create(self, request: ResponsesRequest) -> Reply:
        result = await self.chat.create(request.chat_request())
        head = _Head(request, f"resp_{uuid.uuid4().hex}", common.now())
        if isinstance(result, Whole):
            return Whole(_whole(head, result.body))
        return Stream(_events(head, result.events))


class _Head:
    """What every snapshot of one response shares: the request's settings, id and time."""

    def __init__(self, request: ResponsesRequest, response_id: str, created: int) -> None:
        self.request = request
        self.id = response_id
        self.created = created

    def response(
        self,
        model: str,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
    ) -> dict[str, Any]:
        request = self.request
        body = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": common.now() if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": request.instructions,
            "model": model,
            "output": output,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "metadata": request.metadata or {},
            "tool_choice": request.tool_choice or "auto",
            "tools": [_tool_echo(tool) for tool in request.tools or []],
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_output_tokens": request.max_output_tokens,
            "text": request.text or {"format": {"type": "text"}},
            "truncation": "disabled",
            "store": False,
        }
        if usage is not None:  # optional, but not nullable
            body["usage"] = usage
        return body


def _whole(head: _Head, chat: dict[str, Any]) -> dict[str, Any]:
    choice = chat["choices"][0]
    message = choice["message"]
    output = []
    if message.get("reasoning_content"):
        output.append(_reasoning_item(_new_id("rs"), message["reasoning_content"], "completed"))
    if message.get("content"):
        output.append(_message_item(_new_id("msg"), message["content"], "completed"))
    for call in message.get("tool_calls") or []:
        function = call["function"]
        output.append(
            _call_item(
                _new_id("fc"), call["id"], function["name"], function["arguments"], "completed"
            )
        )
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    return head.response(chat["model"], status, output, _usage(chat["usage"]))


async def _events(head: _Head, chunks: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """The chat stream's chunks (usage on each) as the Responses API's events."""
    items = _ItemStream()
    model, usage, finish = "", None, None
    started = False
    async for event in chunks:
        chunk = event.data
        model = chunk.get("model", model)
        if chunk.get("usage"):
            usage = _usage(chunk["usage"])
        if not started:
            started = True
            snapshot = head.response(model, "in_progress", [], None)
            yield items.event("response.created", response=snapshot)
            yield items.event("response.in_progress", response=snapshot)
        for choice in chunk.get("choices") or []:
            for event in items.feed(choice.get("delta") or {}):
                yield event
            finish = choice.get("finish_reason") or finish
    for event in items.close():
        yield event
    status = "incomplete" if finish == "length" else "completed"
    final = head.response(model, status, items.output, usage)
    yield items.event(f"response.{status}", response=final)


class _ItemStream:
    """Output items opened as the deltas' kind changes: reasoning, message, one per call; each
    event numbered in order."""

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []  # finished items
        self.sequence = 0
        self.item: dict[str, Any] | None = None  # the open one
        self.text = ""

    def event(self, kind: str, **payload: Any) -> Event:
        body = {"type": kind, **payload, "sequence_number": self.sequence}
        self.sequence += 1
        return Event(body, name=kind)

    def feed(self, delta: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        if delta.get("reasoning_content"):
            events += self._open("reasoning")
            events.append(
                self._text_delta("response.reasoning_text.delta", delta["reasoning_content"])
            )
        if delta.get("content"):
            events += self._open("message")
            events.append(
                self._text_delta("response.output_text.delta", delta["content"], logprobs=[])
            )
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            if call.get("id"):
                events += self.close()
                self.item = _call_item(
                    _new_id("fc"), call["id"], function.get("name") or "", "", "in_progress"
                )
                events.append(
                    self.event(
                        "response.output_item.added", output_index=len(self.output), item=self.item
                    )
                )
            if function.get("arguments") and self.item is not None:
                self.text += function["arguments"]
                events.append(
                    self.event(
                        "response.function_call_arguments.delta",
                        item_id=self.item["id"],
                        output_index=len(self.output),
                        delta=function["arguments"],
                    )
                )
        return events

    def close(self) -> list[Event]:
        item, text = self.item, self.text
        if item is None:
            return []
        self.item, self.text = None, ""
        index = len(self.output)
        where = {"item_id": item["id"], "output_index": index}
        events = []
        if item["type"] == "message":
            done = _message_item(item["id"], text, "completed")
            part = done["content"][0]
            events.append(
                self.event(
                    "response.output_text.done", **where, content_index=0, text=text, logprobs=[]
                )
            )
            events.append(
                self.event("response.content_part.done", **where, content_index=0, part=part)
            )
        elif item["type"] == "reasoning":
            done = _reasoning_item(item["id"], text, "completed")
            part = done["content"][0]
            events.append(
                self.event("response.reasoning_text.done", **where, content_index=0, text=text)
            )
            events.append(
                self.event("response.content_part.done", **where, content_index=0, part=part)
            )
        else:
            done = _call_item(item["id"], item["call_id"], item["name"], text, "completed")
            events.append(
                self.event(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=text,
                )
            )
        events.append(self.event("response.output_item.done", output_index=index, item=done))
        self.output.append(done)
        return events

    def _open(self, kind: str) -> list[Event]:
        if self.item is not None and self.item["type"] == kind:
            return []
        events = self.close()
        if kind == "message":
            self.item = {"id": _new_id("msg"), "type": "message", "status": "in_progress",
                         "role": "assistant", "content": []}  # fmt: skip
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            self.item = {"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                         "status": "in_progress"}  # fmt: skip
            part = {"type": "reasoning_text", "text": ""}
        where = {"output_index": len(self.output)}
        events.append(self.event("response.output_item.added", **where, item=self.item))
        events.append(
            self.event(
                "response.content_part.added",
                item_id=self.item["id"],
                **where,
                content_index=0,
                part=part,
            )
        )
        return events

    def _text_delta(self, kind: str, text: str, **extra: Any) -> Event:
        assert self.item is not None
        self.text += text
        return self.event(
            kind,
            item_id=self.item["id"],
            output_index=len(self.output),
            content_index=0,
            delta=text,
            **extra,
        )


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [part],
    }


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["total_tokens"],
    }


def _tool_echo(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as a Response lists it: strict and parameters are required there."""
    return {
        **tool,
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict"),
    }


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
