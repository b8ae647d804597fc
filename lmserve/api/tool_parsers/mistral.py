"""`--tool-call-parser mistral`: Mistral's `[TOOL_CALLS]` marker, in both of its forms:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {...}]   (tokenizer < v11)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}      (v11 and later)

`[TOOL_CALLS]` is a special token, so the text must keep special tokens (vLLM turns off
`skip_special_tokens` for this parser); `[ARGS]`, which vLLM's own tests leave out, and a
`[CALL_ID]xyz` before it are optional. Call ids are 9 alphanumerics, as Mistral's templates
require. Rules beyond the package's:
- Text before, between and after the calls is content. vLLM's non-streamed path drops the text
  after the calls and its streamed path keeps it; both keep it here.
- A broken call drops the text up to the next `[TOOL_CALLS]`; so does a broken list element
  after a call. vLLM streams a cut-short v11 call's arguments unclosed; here they are closed.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

from lmserve.api.tool_parsers import ToolParser, random_id
from lmserve.api.tool_parsers.json_call import JsonCallReader, JsonCallStream
from lmserve.api.tool_parsers.json_scanner import JsonScanner
from lmserve.api.tool_parsers.markers import find_marker, match_end, partial_marker_start

_MARKER = "[TOOL_CALLS]"
_WHITESPACE = re.compile(r"\s*")
# The v11 head: the name, then an optional call id and [ARGS], up to the arguments' "{".
_HEAD = re.compile(r"\s*([\w.\-]+)(?:\[CALL_ID\]\w*)?(?:\[ARGS\])?\s*")
_HEAD_MARKERS = ("[CALL_ID]", "[ARGS]")


class MistralToolParser(ToolParser):
    needs_special_tokens = True

    def stream(self) -> MistralStream:
        return MistralStream(lambda: random_id(9))


class _Phase(enum.Enum):
    CONTENT = enum.auto()
    OPENED = enum.auto()  # after [TOOL_CALLS]: a list, or a v11 head?
    LIST_ITEM = enum.auto()  # a list element's "{" is next
    LIST_CALL = enum.auto()
    LIST_NEXT = enum.auto()  # after an element: "," or "]"
    HEAD = enum.auto()  # a v11 call's name, up to its arguments
    ARGUMENTS = enum.auto()  # a v11 call's arguments
    SKIPPING = enum.auto()  # after a broken call, up to the next [TOOL_CALLS]


# What may come after whitespace in the list phases.
_LIST_EXPECTS = {_Phase.OPENED: "[", _Phase.LIST_ITEM: "{", _Phase.LIST_NEXT: ",]"}


class MistralStream(JsonCallStream):
    def __init__(self, new_call_id: Callable[[], str]) -> None:
        super().__init__(new_call_id, arguments_keys=("arguments",))
        self._phase = _Phase.CONTENT
        self._num_calls_before_block = 0
        self._json: JsonScanner | None = None  # a v11 call's arguments
        self._num_sent = 0  # of the v11 arguments

    def _advance(self, text: str, final: bool) -> int:
        pos = 0
        while pos < len(text):
            phase = self._phase
            if phase is _Phase.CONTENT or phase is _Phase.SKIPPING:
                hit = find_marker(text, pos, (_MARKER,))
                if hit is None:
                    end = len(text) if final else partial_marker_start(text, pos, (_MARKER,))
                    if phase is _Phase.CONTENT:
                        self._content(text[pos:end])
                    return end
                if phase is _Phase.CONTENT:
                    self._content(text[pos : hit[0]])
                pos = hit[0] + len(_MARKER)
                self._phase, self._block = _Phase.OPENED, [_MARKER]
                self._num_calls_before_block = self._num_calls
            elif phase is _Phase.LIST_CALL:
                pos = self._read_call(text, pos)
            elif phase is _Phase.ARGUMENTS:
                pos = self._read_arguments(text, pos)
            elif phase is _Phase.HEAD:
                head_end = self._read_head(text, pos, final)
                if head_end is None:
                    return pos
                pos = head_end
            else:
                end = match_end(_WHITESPACE, text, pos)
                if end == len(text) and not final:
                    return pos
                pos = self._list_step(text, pos, end)
        if final:
            self._end_of_output()
        return pos

    def _list_step(self, text: str, pos: int, end: int) -> int:
        """After the whitespace `text[pos:end]`, the list structure's next character."""
        c = text[end : end + 1]
        if self._phase is _Phase.OPENED and c != "[":
            self._phase = _Phase.HEAD
            return pos
        if not c or c not in _LIST_EXPECTS[self._phase]:
            self._block_broke()
            return pos
        self._block.append(text[pos:end])
        if c == "{":
            self._phase = _Phase.LIST_CALL
            self._open_call()
            return end
        self._block.append(c)
        self._phase = _Phase.CONTENT if c == "]" else _Phase.LIST_ITEM
        return end + 1

    def _read_head(self, text: str, pos: int, final: bool) -> int | None:
        """Commit a v11 call at its arguments' "{"; None while the head may still grow."""
        match = _HEAD.match(text, pos)
        end = match.end() if match is not None else pos
        if match is not None and end < len(text) and text[end] == "{":
            self._begin_call(match.group(1))
            self._block = []
            self._phase, self._json, self._num_sent = _Phase.ARGUMENTS, JsonScanner(), 0
            return end
        tail = text[end:]
        if not final and (not tail or any(m.startswith(tail) for m in _HEAD_MARKERS)):
            return None
        self._block_broke()
        return pos

    def _read_arguments(self, text: str, pos: int) -> int:
        assert self._json is not None
        num_read = self._json.push(text[pos:])
        self._send_arguments()
        if self._json.done:
            self._phase = _Phase.CONTENT
        elif self._json.failed:
            self._arguments(self._json.closers())
            self._phase = _Phase.SKIPPING
        return pos + num_read

    def _send_arguments(self) -> None:
        assert self._json is not None
        end = self._json.closable_end
        self._arguments(self._json.text[self._num_sent : end])
        self._num_sent = end

    def _call_ended(self, call: JsonCallReader) -> None:
        if call.done and call.committed:
            self._phase = _Phase.LIST_NEXT
        else:
            self._block_broke()

    def _block_broke(self) -> None:
        """The markup stopped making sense: content as written if no call came of it yet."""
        if self._num_calls > self._num_calls_before_block:
            self._phase = _Phase.SKIPPING
        else:
            self._content("".join(self._block))
            self._phase = _Phase.CONTENT

    def _end_of_output(self) -> None:
        if self._call is not None:
            self._end_call()
        elif self._phase is _Phase.ARGUMENTS:
            assert self._json is not None
            self._arguments(self._json.closers())
        elif self._phase in (_Phase.OPENED, _Phase.LIST_ITEM, _Phase.LIST_NEXT, _Phase.HEAD):
            self._block_broke()
