"""Triton kernels: leaves, tensors in and out.

Nothing is imported here on purpose: importing `lmserve.kernels` must not import Triton. Callers
import the kernel module they need (`lmserve.kernels.paged_attention`), and only backends that
are chosen through a lazy registry do so.
"""
