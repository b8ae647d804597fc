"""`--tool-call-parser hermes`: Hermes 2 Pro, Qwen2.5 and Qwen3, which write each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Arguments are the raw JSON the model wrote for them (Hermes sometimes puts them before the
name). Rules beyond the package's:
- Text before, between and after the blocks is content. vLLM's non-streamed path keeps only
  the text before the first block, while its streamed path sends the rest too; both keep it here.
- A final block that never closes still gives its call when the JSON is complete (as vLLM's
  pattern `<tool_call>(.*)` does), or an arguments object closed as it stands when it is cut
  short; vLLM would return the whole output as content then.
- Anything between a call's object and `</tool_call>` is dropped.
"""

from __future__ import annotations

from collections.abc import Callable

from lmserve.api.tool_parsers import ToolParser, random_id
from lmserve.api.tool_parsers.json_call import JsonCallReader, JsonCallStream
from lmserve.api.tool_parsers.markers import find_marker, partial_marker_start

_START = "<tool_call>"
_END = "</tool_call>"


class HermesToolParser(ToolParser):
    def stream(self) -> HermesStream:
        return HermesStream(lambda: "call_" + random_id(24))


class HermesStream(JsonCallStream):
    def __init__(self, new_call_id: Callable[[], str]) -> None:
        super().__init__(new_call_id, arguments_keys=("arguments",))
        self._skipping = False  # after a call's object, until its block ends

    def _advance(self, text: str, final: bool) -> int:
        pos = 0
        while pos < len(text):
            if self._call is not None:
                pos = self._read_call(text, pos)
            elif self._skipping:
                # A missing </tool_call> before the next block does not swallow it.
                hit = find_marker(text, pos, (_END, _START))
                if hit is None:
                    return len(text) if final else partial_marker_start(text, pos, (_END, _START))
                index, marker = hit
                pos = index + len(marker) if marker == _END else index
                self._skipping = False
            else:
                hit = find_marker(text, pos, (_START,))
                if hit is None:
                    end = len(text) if final else partial_marker_start(text, pos, (_START,))
                    self._content(text[pos:end])
                    return end
                index = hit[0]
                self._content(text[pos:index])
                pos = index + len(_START)
                self._block = [_START]
                self._open_call()
        if final and self._call is not None:
            self._end_call()
        return pos

    def _call_ended(self, call: JsonCallReader) -> None:
        if call.committed:
            self._skipping = True
        else:
            self._content("".join(self._block))
