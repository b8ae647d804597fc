"""`--tool-call-parser qwen3_xml`: Qwen3-Coder, which writes each call as

    <tool_call>
    <function=write_file>
    <parameter=path>
    a.py
    </parameter>
    </function>
    </tool_call>

A value is the text between its tags less one leading and one trailing newline, typed by the
tool's JSON schema (`param_types`). The arguments are `json.dumps(..., ensure_ascii=False)` of
the parameters, streamed a parameter at a time (`{"path": "a.py"`, `, "n": 3`, `}`), and a
string-typed value character by character, as its JSON-escaped text. Rules beyond the package's:
- A call commits at its complete `<function=NAME>`. As in vLLM, a missing `</parameter>` ends the
  value at the next tag, and a call cut off by the output's end keeps its parameters so far,
  the last one's value as far as it got.
- Text before, between and after the blocks is content; stray text inside a function is dropped.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable
from typing import Any

from lmserve.api.tool_parsers import ToolCallStream, ToolParser, random_id
from lmserve.api.tool_parsers.markers import find_marker, partial_marker_start
from lmserve.api.tool_parsers.param_types import is_string, parameter_schemas, typed_value

_START = "<tool_call>"
_END = "</tool_call>"
_FUNCTION = "<function="
_FUNCTION_END = "</function>"
_PARAMETER = "<parameter="
_PARAMETER_END = "</parameter>"
_HEAD = re.compile(r"\s*<function=([^\s<>]+)>")
_NAME_CHARS = re.compile(r"[^\s<>]*")
_BODY_MARKERS = (_PARAMETER, _FUNCTION_END, _END)
_VALUE_MARKERS = (_PARAMETER_END, *_BODY_MARKERS)


class Qwen3XmlToolParser(ToolParser):
    def stream(self) -> Qwen3XmlStream:
        return Qwen3XmlStream(lambda: "call_" + random_id(24), parameter_schemas(self.tools))


class _Phase(enum.Enum):
    CONTENT = enum.auto()
    HEAD = enum.auto()  # after <tool_call>: `<function=NAME>` is next
    BODY = enum.auto()  # in a function, between parameters
    PARAMETER = enum.auto()  # in `<parameter=NAME>`
    VALUE = enum.auto()
    SKIPPING = enum.auto()  # after </function>, up to the block's end


class Qwen3XmlStream(ToolCallStream):
    def __init__(self, new_call_id: Callable[[], str], schemas: dict[str, dict[str, Any]]) -> None:
        super().__init__(new_call_id)
        self._schemas = schemas
        self._phase = _Phase.CONTENT
        self._parameters: dict[str, Any] = {}  # the schemas of this call's function
        self._num_pairs = 0
        self._value = _Value("", None)

    def _advance(self, text: str, final: bool) -> int:
        pos = 0
        while pos < len(text):
            phase = self._phase
            if phase is _Phase.HEAD:
                end = self._read_head(text, pos, final)
            elif phase is _Phase.PARAMETER:
                end = self._read_parameter_name(text, pos, final)
            else:
                markers = {
                    _Phase.CONTENT: (_START,),
                    _Phase.SKIPPING: (_END, _START),
                    _Phase.BODY: _BODY_MARKERS,
                    _Phase.VALUE: _VALUE_MARKERS,
                }[phase]
                end = self._read_to_marker(text, pos, final, markers)
            if end is None:
                return pos  # what is there may still grow into markup
            pos = end
        if final:
            self._end_of_output()
        return pos

    def _read_to_marker(
        self, text: str, pos: int, final: bool, markers: tuple[str, ...]
    ) -> int | None:
        """Pass the text up to the next of `markers` to the phase, then act on the marker."""
        hit = find_marker(text, pos, markers)
        if hit is None:
            end = len(text) if final else partial_marker_start(text, pos, markers)
        else:
            end = hit[0]
        if self._phase is _Phase.CONTENT:
            self._content(text[pos:end])
        elif self._phase is _Phase.VALUE:
            self._arguments(self._value.add(text[pos:end]))
        if hit is None:
            return end if end > pos else None
        marker = hit[1]
        if self._phase is _Phase.VALUE:
            self._end_parameter()
            if marker != _PARAMETER_END:
                return end  # the tag also ends the parameter: read it again in the body
        elif marker == _START:
            self._phase = _Phase.HEAD if self._phase is _Phase.CONTENT else _Phase.CONTENT
            if self._phase is _Phase.CONTENT:
                return end  # a block after one missing its </tool_call>
        elif marker == _PARAMETER:
            self._phase = _Phase.PARAMETER
        elif marker == _FUNCTION_END:
            self._end_call()
            self._phase = _Phase.SKIPPING
        else:  # </tool_call>
            if self._phase is _Phase.BODY:
                self._end_call()
            self._phase = _Phase.CONTENT
        return end + len(marker)

    def _read_head(self, text: str, pos: int, final: bool) -> int | None:
        """Commit the call at its complete `<function=NAME>`."""
        match = _HEAD.match(text, pos)
        if match is not None:
            name = match.group(1)
            self._begin_call(name)
            self._parameters = self._schemas.get(name, {})
            self._num_pairs = 0
            self._phase = _Phase.BODY
            return match.end()
        rest = text[pos:].lstrip()
        could_grow = _FUNCTION.startswith(rest) or (
            rest.startswith(_FUNCTION) and _NAME_CHARS.fullmatch(rest, len(_FUNCTION))
        )
        if could_grow and not final:
            return None
        self._content(_START)  # not a call after all: the tag was text
        self._phase = _Phase.CONTENT
        return pos

    def _read_parameter_name(self, text: str, pos: int, final: bool) -> int | None:
        end = text.find(">", pos)
        name = text[pos:end] if end >= 0 else text[pos:]
        if "<" in name or "\n" in name or (end >= 0 and not name):
            self._phase = _Phase.BODY  # not a parameter tag: stray text
            return pos
        if end < 0:
            return len(text) if final else None
        opening = "{" if self._num_pairs == 0 else ", "
        key = json.dumps(name, ensure_ascii=False)
        self._value = _Value(opening + key + ": ", self._parameters.get(name))
        self._phase = _Phase.VALUE
        return end + 1

    def _end_parameter(self) -> None:
        self._arguments(self._value.finish())
        self._num_pairs += 1
        self._phase = _Phase.BODY

    def _end_call(self) -> None:
        self._arguments("}" if self._num_pairs else "{}")

    def _end_of_output(self) -> None:
        if self._phase is _Phase.HEAD:
            self._content(_START)
        elif self._phase is _Phase.VALUE:
            self._end_parameter()
            self._end_call()
        elif self._phase in (_Phase.BODY, _Phase.PARAMETER):
            self._end_call()
        self._phase = _Phase.CONTENT


class _Value:
    """One parameter's value as it arrives; `add` and `finish` return the arguments text that
    each piece makes certain: nothing until the end, except for a string-typed value, which is
    sent as it comes once it cannot be `null` (held back: its trailing newline, which is cut)."""

    def __init__(self, prefix: str, schema: Any) -> None:
        self._prefix = prefix  # `{"key": ` or `, "key": `
        self._schema = schema
        self._streamed = is_string(schema)
        self._parts: list[str] = []  # the value as written, unless streamed
        self._started = False  # streamed: the leading newline is cut
        self._held = ""  # streamed: text not sent yet
        self._open = False  # streamed: the opening quote was sent

    def add(self, text: str) -> str:
        if not text:
            return ""
        if not self._streamed:
            self._parts.append(text)
            return ""
        if not self._started:
            self._started = True
            text = text.removeprefix("\n")
        held = self._held + text
        sent = ""
        if not self._open:
            if "null\n".startswith(held.lower()):
                self._held = held
                return ""
            self._open = True
            sent = self._prefix + '"'
        num_held = 1 if held.endswith("\n") else 0
        self._held = held[len(held) - num_held :]
        return sent + _escape(held[: len(held) - num_held])

    def finish(self) -> str:
        if self._open:
            return '"'  # what is held is the trailing newline, cut
        if self._streamed:
            text = self._held.removesuffix("\n")
        else:
            text = "".join(self._parts).removeprefix("\n").removesuffix("\n")
        try:
            value = json.dumps(typed_value(text, self._schema), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):  # a literal with no JSON form, such as a set
            value = json.dumps(text, ensure_ascii=False)
        return self._prefix + value


def _escape(text: str) -> str:
    """`text` as inside a JSON string; per character, so pieces escape to pieces."""
    return json.dumps(text, ensure_ascii=False)[1:-1]
