"""`--tool-call-parser pythonic`: Llama 3.2 and Llama 4, which write the calls as a Python list,

    [get_weather(city="Paris", days=3), get_time()]

optionally between `<|python_start|>` and `<|python_end|>`. Keyword values are Python literals
(`ast.literal_eval`), so the arguments are built, not copied: `json.dumps(..., ensure_ascii=False)`
of the keyword dict, streamed a keyword at a time (`{"city": "Paris"`, then `, "days": 3`, then
`}`), which concatenates to exactly that string. Rules beyond the package's:
- The output must open with the list (after the tag and whitespace), else it is all content.
- A call commits at its first complete keyword, or at `)` when it has none, so prose such as
  `[Note(s) below]` is content; an output that breaks before then is content, as written.
- vLLM makes the whole output content unless all of it is the list; streaming cannot take calls
  back, so here text after the list (less `<|python_end|>`) is content, and after a call breaks
  the rest of the output is dropped.
"""

from __future__ import annotations

import ast
import enum
import json
import re
from collections.abc import Callable

from lmserve.api.tool_parsers import ToolCallStream, ToolParser, random_id
from lmserve.api.tool_parsers.markers import match_end

_LEAD = re.compile(r"\s*(?:<\|python_start\|>)?\s*")
_START_TAG = "<|python_start|>"
_END_TAG_TEXT = "<|python_end|>"
_END_TAG = re.compile(r"(?:\s*<\|python_end\|>)?")
_CALL_HEAD = re.compile(r"\s*([A-Za-z_]\w*)\s*\(")
_KEYWORD = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*")
_CLOSE = re.compile(r"\s*\)")
_NEXT_CALL = re.compile(r"\s*([,\]])")
_VALUE_END = re.compile(r"[,)]")
# Text that may still grow into a call head or a keyword.
_PARTIAL_NAME = re.compile(r"\s*(?:[A-Za-z_]\w*\s*)?")
_PARTIAL_BLANK = re.compile(r"\s*")


class PythonicToolParser(ToolParser):
    def stream(self) -> PythonicStream:
        return PythonicStream(lambda: "call_" + random_id(24))


class _Phase(enum.Enum):
    LEAD = enum.auto()  # before the list: calls or content?
    CALL_HEAD = enum.auto()  # `name(` is next
    KEYWORD = enum.auto()  # `key=` or `)` is next
    VALUE = enum.auto()  # a keyword's value, up to `,` or `)`
    AFTER_CALL = enum.auto()  # `,` or `]` is next
    AFTER_LIST = enum.auto()
    CONTENT = enum.auto()
    DROPPED = enum.auto()


class PythonicStream(ToolCallStream):
    def __init__(self, new_call_id: Callable[[], str]) -> None:
        super().__init__(new_call_id)
        self._phase = _Phase.LEAD
        self._block: list[str] = []  # the output as written, until the first call commits
        self._name = ""  # of the call being read
        self._committed = False  # the call being read was sent
        self._num_pairs = 0  # keywords of the call being read
        self._key = ""
        self._value: list[str] = []  # the keyword's value as written so far

    def _advance(self, text: str, final: bool) -> int:
        pos = 0
        while pos < len(text):
            phase = self._phase
            if phase is _Phase.CONTENT:
                self._content(text[pos:])
                return len(text)
            if phase is _Phase.DROPPED:
                return len(text)
            if phase is _Phase.VALUE:
                pos = self._read_value(text, pos)
                continue
            end = self._step(text, pos, final)
            if end is None:
                return pos  # what is there may still grow into the next piece of markup
            if self._phase not in (_Phase.CONTENT, _Phase.DROPPED) and not self._num_calls:
                self._block.append(text[pos:end])
            pos = end
        if final and self._phase not in (_Phase.AFTER_LIST, _Phase.CONTENT, _Phase.DROPPED):
            self._broke()
        return pos

    def _step(self, text: str, pos: int, final: bool) -> int | None:
        """Read the next piece of list markup; the new position, or None to wait for more."""
        phase = self._phase
        if phase is _Phase.LEAD:
            end = match_end(_LEAD, text, pos)
            tail = text[end:]
            could_grow = not tail or (
                _START_TAG not in text[pos:end] and _START_TAG.startswith(tail)
            )
            if could_grow and not final:
                return None
            if tail.startswith("["):
                self._phase = _Phase.CALL_HEAD
                return end + 1
            self._phase = _Phase.CONTENT
            return pos
        if phase is _Phase.AFTER_LIST:
            end = match_end(_END_TAG, text, pos)
            if not final and end == pos and _END_TAG_TEXT.startswith(text[pos:].lstrip()):
                return None
            self._phase = _Phase.CONTENT
            return end
        pattern = {_Phase.CALL_HEAD: _CALL_HEAD, _Phase.AFTER_CALL: _NEXT_CALL}.get(phase)
        match = (pattern or _KEYWORD).match(text, pos)
        close = _CLOSE.match(text, pos) if phase is _Phase.KEYWORD else None
        if match is None and close is None:
            partial = _PARTIAL_BLANK if phase is _Phase.AFTER_CALL else _PARTIAL_NAME
            if not final and partial.fullmatch(text, pos) is not None:
                return None
            self._broke()
            return pos
        if close is not None:
            self._end_call()
            return close.end()
        assert match is not None
        if phase is _Phase.CALL_HEAD:
            self._name, self._num_pairs = match.group(1), 0
            self._phase = _Phase.KEYWORD
        elif phase is _Phase.AFTER_CALL:
            self._phase = _Phase.CALL_HEAD if match.group(1) == "," else _Phase.AFTER_LIST
        else:
            self._key, self._value, self._phase = match.group(1), [], _Phase.VALUE
        return match.end()

    def _read_value(self, text: str, pos: int) -> int:
        """Read up to a `,` or `)` that ends the keyword's value: one after which the value
        parses (an earlier one is inside a string or brackets)."""
        while True:
            hit = _VALUE_END.search(text, pos)
            end = hit.end() if hit is not None else len(text)
            if not self._num_calls:
                self._block.append(text[pos:end])
            self._value.append(text[pos:end])
            pos = end
            if hit is None:
                return pos
            try:
                value = ast.literal_eval("".join(self._value)[:-1].strip())
            except SyntaxError:
                continue
            except (ValueError, TypeError, MemoryError, RecursionError):
                self._broke()
                return pos
            pair = _keyword_json(self._key, value)
            if pair is None:
                self._broke()
                return pos
            if not self._committed:
                self._begin_call(self._name)
                self._committed = True
            self._arguments(("{" if self._num_pairs == 0 else ", ") + pair)
            self._num_pairs += 1
            if hit.group() == ")":
                self._end_call()
            else:
                self._phase = _Phase.KEYWORD
            return pos

    def _end_call(self) -> None:
        if not self._committed:
            self._begin_call(self._name)
        self._arguments("}" if self._num_pairs else "{}")
        self._committed = False
        self._phase = _Phase.AFTER_CALL

    def _broke(self) -> None:
        """The list stopped making sense: content as written if no call came of it yet."""
        if self._committed:
            self._arguments("}")
            self._committed = False
        if self._num_calls:
            self._phase = _Phase.DROPPED
        else:
            self._content("".join(self._block))
            self._phase = _Phase.CONTENT


def _keyword_json(key: str, value: object) -> str | None:
    """`"key": value` as it appears in `json.dumps` of the keyword dict; None when the value
    has no JSON form (a set, bytes, a complex number, NaN)."""
    try:
        return (
            json.dumps(key, ensure_ascii=False)
            + ": "
            + json.dumps(value, ensure_ascii=False, allow_nan=False)
        )
    except (TypeError, ValueError):
        return None
