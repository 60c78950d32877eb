"""NSA compressed-branch primitives: dispatchers (Triton on CUDA, the PyTorch reference elsewhere).

Semantics, shapes and the eq. 9 block mapping are documented in ``nsa_compressed_ref``; both backends
share them exactly.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import resolve_backend
from .nsa_compressed_ref import (check_compressed_inputs, check_importance_inputs, compressed_attention_reference,
                                 selection_importance_reference)


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, *, cmp_block: int, cmp_stride: int,
                         scale: Optional[float] = None, kv_len: Optional[int] = None, backend: str = "auto"):
    """Attention of ``q [B, Tq, HQ, D]`` over compressed keys/values ``[B, NC, HKV, D]``, causal at compressed
    granularity (query at position p sees key j iff ``j*cmp_stride + cmp_block - 1 <= p``).

    Returns ``(out [B, Tq, HQ, D], lse [B, Tq, HQ] float32)``; differentiable in q, k_cmp, v_cmp.
    ``kv_len`` is the uncompressed key length (default Tq); queries sit at ``kv_len - Tq .. kv_len - 1``.
    """
    backend = resolve_backend(backend, q.device)
    check_compressed_inputs(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, kv_len)
    return compressed_attention_reference(q, k_cmp, v_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                          scale=scale, kv_len=kv_len)


def selection_importance(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, *, cmp_block: int, cmp_stride: int,
                         block: int, scale: Optional[float] = None, kv_len: int, backend: str = "auto") -> torch.Tensor:
    """Importance ``[B, HKV, Tq, ceil(kv_len / block)]`` float32 of each selection block for each query:
    the compressed-branch probabilities (recomputed from ``lse`` of ``compressed_attention``) summed over
    the GQA group's query heads and mapped to blocks of ``block`` tokens (eq. 9). No gradient."""
    backend = resolve_backend(backend, q.device)
    check_importance_inputs(q, k_cmp, lse, cmp_block, cmp_stride, block, scale, kv_len)
    return selection_importance_reference(q, k_cmp, lse, cmp_block=cmp_block, cmp_stride=cmp_stride, block=block,
                                          scale=scale, kv_len=kv_len)


__all__ = ["compressed_attention", "selection_importance"]
