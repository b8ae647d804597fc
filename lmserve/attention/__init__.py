"""Attention backends over the paged KV cache, chosen by name through a lazy registry."""

from lmserve.attention.backend import AttentionBackend, CommonAttentionMetadata, get_backend

__all__ = ["AttentionBackend", "CommonAttentionMetadata", "get_backend"]
