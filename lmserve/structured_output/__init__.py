"""Grammar-constrained decoding: output constraints compiled to token masks.

The frontend checks a constraint and picks the backend that can enforce it (`backends`); the
engine core compiles it off the step loop and fills one token bitmask per step for the batch
(`manager`); the worker applies the mask to the logits (`apply`). xgrammar and llguidance load
lazily, so `import lmserve` needs neither.
"""
