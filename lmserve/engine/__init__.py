"""Request lifecycle around the engine core: tokenization in, detokenization and stops out."""
