"""Kernels: leaves, tensors in and out.

Triton kernels (`paged_attention`) import Triton, so nothing is imported here: importing
`lmserve.kernels` must not import Triton, and only backends chosen through a lazy registry import
them. The C++ CPU kernels (`cpu_ops`, source in `cpu/`) are compiled at first use.
"""
