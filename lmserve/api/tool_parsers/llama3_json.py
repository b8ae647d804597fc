"""`--tool-call-parser llama3_json`: Llama 3.1 and 3.2 JSON tool calling, where the whole output
is the calls:

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

The tag is optional (it is a special token, gone unless special tokens are kept), `"arguments"`
is read as well as `"parameters"` (first one wins), and calls are separated by `;` and/or
whitespace. Rules beyond the package's:
- An output whose first text (after the tag and whitespace) is not `{` is content, as written,
  as is one whose first object is not a call (a JSON answer such as `{"name": "Ada"}` with no
  parameters).
- Text after the calls is content, from the end of the last call (vLLM also reads calls that
  text follows); trailing separators alone are dropped. An object after a call that is not a
  call itself ends the calls and, like the rest of a broken call, is dropped with what follows.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

from lmserve.api.tool_parsers import ToolParser, random_id
from lmserve.api.tool_parsers.json_call import JsonCallReader, JsonCallStream
from lmserve.api.tool_parsers.markers import match_end

_TAG = "<|python_tag|>"
_LEAD = re.compile(r"\s*(?:<\|python_tag\|>)?\s*")
_SEPARATOR = re.compile(r"\s*(?:;\s*)?")


class Llama3JsonToolParser(ToolParser):
    def stream(self) -> Llama3JsonStream:
        return Llama3JsonStream(lambda: "call_" + random_id(24))


class _Phase(enum.Enum):
    LEAD = enum.auto()  # before the first object: calls or content?
    CALL = enum.auto()
    BETWEEN = enum.auto()  # after a call: a separator and the next call, or the end of calls
    CONTENT = enum.auto()  # the rest is content
    DROPPED = enum.auto()  # a call broke off: the rest is dropped


class Llama3JsonStream(JsonCallStream):
    def __init__(self, new_call_id: Callable[[], str]) -> None:
        super().__init__(new_call_id, arguments_keys=("parameters", "arguments"))
        self._phase = _Phase.LEAD

    def _advance(self, text: str, final: bool) -> int:
        pos = 0
        while pos < len(text):
            if self._phase is _Phase.CONTENT:
                self._content(text[pos:])
                return len(text)
            if self._phase is _Phase.DROPPED:
                return len(text)
            if self._phase is _Phase.CALL:
                pos = self._read_call(text, pos)
                continue
            pattern = _LEAD if self._phase is _Phase.LEAD else _SEPARATOR
            end = match_end(pattern, text, pos)
            could_grow = end == len(text) or (
                self._phase is _Phase.LEAD
                and _TAG not in text[pos:end]
                and _TAG.startswith(text[end:])
            )
            if could_grow and not final:
                return pos
            if end < len(text) and text[end] == "{":
                self._block.append(text[pos:end])
                pos = end
                self._phase = _Phase.CALL
                self._open_call()
            elif end == len(text) and self._phase is _Phase.BETWEEN:
                return len(text)  # trailing separators
            else:
                self._phase = _Phase.CONTENT
        if final and self._call is not None:
            self._end_call()
        return pos

    def _call_ended(self, call: JsonCallReader) -> None:
        if call.done and call.committed:
            self._phase = _Phase.BETWEEN
        elif call.committed or self._num_calls > 0:
            self._phase = _Phase.DROPPED  # a broken call, or an object after calls that is none
        else:
            self._content("".join(self._block))
            self._phase = _Phase.CONTENT
