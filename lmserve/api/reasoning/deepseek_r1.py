"""`--reasoning-parser deepseek_r1`: DeepSeek-R1 and its distills (also QwQ-32B).

DeepSeek-R1's chat template ends the prompt with `<think>\\n`, so the output usually holds only
the thinking, `</think>`, then the answer; older templates let the model write `<think>` itself,
which is dropped. The split is `think_tags`'s.
"""

from __future__ import annotations

from typing import ClassVar

from lmserve.api.reasoning.think_tags import ThinkTagReasoningParser


class DeepSeekR1ReasoningParser(ThinkTagReasoningParser):
    start_text: ClassVar[str] = "<think>"
    end_text: ClassVar[str] = "</think>"
