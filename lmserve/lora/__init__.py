"""LoRA adapters served on top of the base model: requests, PEFT checkpoints, batched deltas."""
