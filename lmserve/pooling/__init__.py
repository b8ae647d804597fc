"""Pooling models (vLLM's pooling runner): embeddings and the poolers that make them."""
