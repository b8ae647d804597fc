"""POST /v1/responses: OpenAI's Responses API over the chat path.

The request runs as a chat completion; its result (or its stream of chunks) is rewritten as a
Response: output items (reasoning, message, function_call), usage with token details, and the
event stream response.created ... response.completed with sequence numbers.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from msgspec import UNSET, UnsetType
from pydantic import BaseModel

from lmserve.api.replies import Event, Reply, Stream, Whole
from lmserve.api.responses_protocol import ResponsesRequest
from lmserve.api.schemas import responses as r
from lmserve.api.schemas.chat import ChatCompletion, ChatCompletionChunk, ChatDelta
from lmserve.api.schemas.common import ResponseMetrics, Usage
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
        output: list[r.OutputItem],
        usage: r.ResponseUsage | None,
        metrics: ResponseMetrics | None | UnsetType = UNSET,
    ) -> r.Response:
        request = self.request
        return r.Response(
            id=self.id,
            created_at=self.created,
            status=status,  # type: ignore[arg-type]
            completed_at=common.now() if status == "completed" else None,
            incomplete_details=r.IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete"
            else None,
            instructions=request.instructions,
            model=model,
            output=output,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            metadata=request.metadata or {},
            tool_choice=_echo(request.tool_choice) or "auto",
            # every key: the spec requires strict and parameters there, even when null
            tools=[tool.model_dump() for tool in request.tools or []],
            temperature=request.temperature,
            top_p=request.top_p,
            max_output_tokens=request.max_output_tokens,
            text=_echo(request.text) or {"format": {"type": "text"}},
            usage=UNSET if usage is None else usage,
            metrics=metrics,
        )


def _whole(head: _Head, chat: ChatCompletion) -> r.Response:
    choice = chat.choices[0]
    message = choice.message
    output: list[r.OutputItem] = []
    if message.reasoning_content:
        output.append(_reasoning_item(_new_id("rs"), message.reasoning_content, "completed"))
    if message.content:
        output.append(_message_item(_new_id("msg"), message.content, "completed"))
    for call in message.tool_calls or []:
        function = call.function
        output.append(
            r.FunctionCallItem(
                id=_new_id("fc"),
                call_id=call.id,
                name=function.name,
                arguments=function.arguments,
                status="completed",
            )
        )
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    return head.response(chat.model, status, output, _usage(chat.usage), chat.metrics)


async def _events(head: _Head, chunks: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """The chat stream's chunks (usage on each) as the Responses API's events."""
    items = _ItemStream()
    model, usage, finish = "", None, None
    metrics: ResponseMetrics | None | UnsetType = UNSET
    started = False
    async for event in chunks:
        chunk = event.data
        assert isinstance(chunk, ChatCompletionChunk)
        model = chunk.model
        if chunk.usage:
            usage = _usage(chunk.usage)
        if chunk.metrics is not UNSET:
            metrics = chunk.metrics
        if not started:
            started = True
            snapshot = head.response(model, "in_progress", [], None)
            yield items.emit(r.ResponseCreated, response=snapshot)
            yield items.emit(r.ResponseInProgress, response=snapshot)
        for choice in chunk.choices:
            for item_event in items.feed(choice.delta):
                yield item_event
            finish = choice.finish_reason or finish
    for item_event in items.close():
        yield item_event
    status = "incomplete" if finish == "length" else "completed"
    final = head.response(model, status, items.output, usage, metrics)
    done = r.ResponseIncomplete if status == "incomplete" else r.ResponseCompleted
    yield items.emit(done, response=final)


class _ItemStream:
    """Output items opened as the deltas' kind changes: reasoning, message, one per call; each
    event numbered in order."""

    def __init__(self) -> None:
        self.output: list[r.OutputItem] = []  # finished items
        self.sequence = 0
        self.item: r.OutputItem | None = None  # the open one
        self.text = ""

    def emit(self, kind: type[r.StreamEvent], **payload: Any) -> Event:
        event = kind(sequence_number=self.sequence, **payload)
        self.sequence += 1
        return Event.tagged(event)

    def feed(self, delta: ChatDelta) -> list[Event]:
        events: list[Event] = []
        if delta.reasoning_content:
            events += self._open(r.ReasoningItem)
            events.append(self._text_delta(r.ReasoningTextDelta, delta.reasoning_content))
        if delta.content:
            events += self._open(r.MessageItem)
            events.append(self._text_delta(r.OutputTextDelta, delta.content))
        for call in delta.tool_calls or []:
            function = call.function
            if call.id:
                events += self.close()
                self.item = r.FunctionCallItem(
                    id=_new_id("fc"),
                    call_id=call.id,
                    name=function.name or "",
                    arguments="",
                    status="in_progress",
                )
                events.append(
                    self.emit(r.OutputItemAdded, output_index=len(self.output), item=self.item)
                )
            if function.arguments and self.item is not None:
                self.text += function.arguments
                events.append(
                    self.emit(
                        r.FunctionCallArgumentsDelta,
                        item_id=self.item.id,
                        output_index=len(self.output),
                        delta=function.arguments,
                    )
                )
        return events

    def close(self) -> list[Event]:
        item, text = self.item, self.text
        if item is None:
            return []
        self.item, self.text = None, ""
        where = {"item_id": item.id, "output_index": len(self.output)}
        events = []
        done: r.OutputItem
        if isinstance(item, r.MessageItem):
            done = _message_item(item.id, text, "completed")
            events.append(self.emit(r.OutputTextDone, **where, content_index=0, text=text))
            events.append(
                self.emit(r.ContentPartDone, **where, content_index=0, part=done.content[0])
            )
        elif isinstance(item, r.ReasoningItem):
            done = _reasoning_item(item.id, text, "completed")
            events.append(self.emit(r.ReasoningTextDone, **where, content_index=0, text=text))
            events.append(
                self.emit(r.ContentPartDone, **where, content_index=0, part=done.content[0])
            )
        else:
            done = r.FunctionCallItem(
                id=item.id, call_id=item.call_id, name=item.name, arguments=text, status="completed"
            )
            events.append(
                self.emit(r.FunctionCallArgumentsDone, **where, name=item.name, arguments=text)
            )
        events.append(self.emit(r.OutputItemDone, output_index=len(self.output), item=done))
        self.output.append(done)
        return events

    def _open(self, kind: type[r.MessageItem | r.ReasoningItem]) -> list[Event]:
        if isinstance(self.item, kind):
            return []
        events = self.close()
        part: r.OutputText | r.ReasoningText
        if kind is r.MessageItem:
            self.item = r.MessageItem(id=_new_id("msg"), status="in_progress", content=[])
            part = r.OutputText(text="")
        else:
            self.item = r.ReasoningItem(id=_new_id("rs"), content=[], status="in_progress")
            part = r.ReasoningText(text="")
        index = len(self.output)
        events.append(self.emit(r.OutputItemAdded, output_index=index, item=self.item))
        events.append(
            self.emit(
                r.ContentPartAdded,
                item_id=self.item.id,
                output_index=index,
                content_index=0,
                part=part,
            )
        )
        return events

    def _text_delta(self, kind: type[r.OutputTextDelta | r.ReasoningTextDelta], text: str) -> Event:
        assert self.item is not None
        self.text += text
        return self.emit(
            kind, item_id=self.item.id, output_index=len(self.output), content_index=0, delta=text
        )


def _message_item(item_id: str, text: str, status: r.ItemStatus) -> r.MessageItem:
    return r.MessageItem(id=item_id, status=status, content=[r.OutputText(text=text)])


def _reasoning_item(item_id: str, text: str, status: r.ItemStatus) -> r.ReasoningItem:
    return r.ReasoningItem(id=item_id, content=[r.ReasoningText(text=text)], status=status)


def _usage(chat_usage: Usage) -> r.ResponseUsage:
    details = chat_usage.prompt_tokens_details
    return r.ResponseUsage(
        input_tokens=chat_usage.prompt_tokens,
        input_tokens_details=r.InputTokensDetails(
            cached_tokens=details.cached_tokens if details else 0
        ),
        output_tokens=chat_usage.completion_tokens,
        total_tokens=chat_usage.total_tokens,
    )


def _echo(field: BaseModel | str | None) -> Any:
    """A request field as the Response object repeats it."""
    if isinstance(field, BaseModel):  # as sent: no defaults filled in
        return field.model_dump(by_alias=True, exclude_none=True, exclude_unset=True)
    return field


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
