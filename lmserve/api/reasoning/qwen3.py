"""`--reasoning-parser qwen3`: Qwen3 and Qwen3.5.

Qwen3's original template leaves `<think>` to the model, so it is the first thing in the output
and is dropped; Qwen3.5's template puts `<think>\\n` in the prompt, so the output starts inside
the thinking. With `enable_thinking=False` both render an empty, closed `<think>\\n\\n</think>\\n\\n`
into the prompt: `reasoning_ended` sees it and the whole output is content. Thinking that never
closes is all reasoning: vLLM's `qwen3` once returned any output without both tags as content, and
now reads it as unfinished thinking. The split is `think_tags`'s; vLLM's implicit end of thinking
at a `<tool_call>` waits for a tool-call parser.
"""

from __future__ import annotations

from typing import ClassVar

from lmserve.api.reasoning.think_tags import ThinkTagReasoningParser


class Qwen3ReasoningParser(ThinkTagReasoningParser):
    start_text: ClassVar[str] = "<think>"
    end_text: ClassVar[str] = "</think>"
