"""Speculative decoding: cheap guesses of the next tokens, checked in one forward of the model."""
