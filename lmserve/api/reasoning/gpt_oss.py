"""`--reasoning-parser openai`: gpt-oss, whose harmony output (lmserve/api/harmony.py) puts its
thinking in the `analysis` channel and its answer in `final`.

- Reasoning: the bodies of analysis messages, and of calls to the model's built-in tools.
- Content: the bodies of `final` messages and of `commentary` preambles (text the model shows
  the user before calling a tool), and text outside any message.
- A call to a function (`to=functions.NAME`) stays in the content as one canonical harmony
  message, `<|channel|>commentary to=functions.NAME<|message|>ARGS<|call|>`, for the `openai`
  tool parser to read; without one, a client sees that markup, as with every other format.
- The split is by channel, so the prompt never closes the thinking (`reasoning_ended` is False
  for a prompt that ends in `<|start|>assistant`, as the template's does); the engine applies a
  structured-output grammar from `<|channel|>final<|message|>` on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from lmserve.api.harmony import CHANNEL, MESSAGE, Body, Closed, HarmonyScanner, Loose, Opened
from lmserve.api.reasoning import (
    ReasoningDelta,
    ReasoningParser,
    ReasoningResult,
    ReasoningStream,
)


class GptOssReasoningParser(ReasoningParser):
    start_text: ClassVar[str] = "<|start|>assistant"
    end_text: ClassVar[str] = "<|channel|>final<|message|>"
    needs_special_tokens: ClassVar[bool] = True

    def extract(self, text: str) -> ReasoningResult:
        stream = self.stream()
        parts = [stream.feed(text), stream.finish()]
        reasoning = "".join(p.reasoning or "" for p in parts)
        content = "".join(p.content or "" for p in parts)
        return ReasoningResult(reasoning or None, content or None)

    def stream(self) -> HarmonyReasoningStream:
        return HarmonyReasoningStream()


@dataclass(slots=True)
class HarmonyReasoningStream(ReasoningStream):
    scanner: HarmonyScanner = field(default_factory=HarmonyScanner)
    sink: str = "content"  # where the open message's body goes: reasoning, content or call

    def feed(self, delta_text: str) -> ReasoningDelta:
        return self._route(self.scanner.feed(delta_text))

    def finish(self) -> ReasoningDelta:
        return self._route(self.scanner.finish())

    def _route(self, events: list) -> ReasoningDelta:
        reasoning, content = [], []
        for event in events:
            match event:
                case Loose(text):
                    content.append(text)
                case Opened(header) if header.function:
                    self.sink = "call"
                    content.append(f"{CHANNEL}commentary to={header.recipient}{MESSAGE}")
                case Opened(header):
                    self.sink = "reasoning" if header.is_reasoning else "content"
                case Body(text):
                    (reasoning if self.sink == "reasoning" else content).append(text)
                case Closed():
                    if self.sink == "call":  # however it ended: the tool parser needs its end
                        content.append("<|call|>")
                    self.sink = "content"
        return ReasoningDelta("".join(reasoning) or None, "".join(content) or None)
