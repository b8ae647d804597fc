"""Turning logits into tokens: penalties, bias, temperature, min-p/top-k/top-p, seeds, logprobs."""
