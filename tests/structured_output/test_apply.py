from __future__ import annotations

import numpy as np
import pytest
import torch

from lmserve.structured_output.apply import apply_grammar_bitmask


def reference(logits: torch.Tensor, bitmask: np.ndarray, rows: list[int]) -> torch.Tensor:
    out = logits.clone()
    vocab = logits.shape[1]
    for i, row in enumerate(rows):
        for token in range(vocab):
            word, bit = divmod(token, 32)
            if word >= bitmask.shape[1] or not (int(bitmask[i, word]) >> bit) & 1:
                out[row, token] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", [64, 100, 130])  # exact words, a partial word, padded vocab
def test_only_disallowed_tokens_of_constrained_rows_are_masked(vocab: int) -> None:
    rng = np.random.default_rng(0)
    logits = torch.randn(5, vocab)
    words = -(-min(vocab, 100) // 32)  # the tokenizer knows 100 tokens; the model may pad
    bitmask = rng.integers(-(2**31), 2**31, (2, words), dtype=np.int64).astype(np.int32)
    rows = [3, 1]
    expected = reference(logits, bitmask, rows)
    apply_grammar_bitmask(logits, bitmask, torch.tensor(rows))
    assert torch.equal(logits, expected)
    assert torch.isfinite(logits[[0, 2, 4]]).all()
