"""NSA selected-block attention (with the optional sliding window merged into one softmax): dispatcher.

Semantics are documented in ``nsa_selected_ref``; both backends share them exactly.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import resolve_backend
from .nsa_selected_ref import check_selected_inputs, selected_attention_reference


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, *, block: int,
                       scale: Optional[float] = None, window: int = 0, backend: str = "auto"):
    """Attention of ``q [B, Tq, HQ, D]`` over ``k, v [B, Tk, HKV, D]`` restricted, per query token and
    key/value head, to the blocks ``block_idx [B, HKV, Tq, N]`` (-1 = unused slot) and, with ``window > 0``,
    the ``window`` most recent keys; future keys are masked. Returns ``(out [B, Tq, HQ, D],
    lse [B, Tq, HQ] float32)``; differentiable in q, k, v."""
    backend = resolve_backend(backend, q.device)
    check_selected_inputs(q, k, v, block_idx, block, scale, window)
    return selected_attention_reference(q, k, v, block_idx, block=block, scale=scale, window=window)


__all__ = ["selected_attention"]
