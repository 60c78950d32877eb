"""Plain-PyTorch NSA selected-block attention (optionally merged with the sliding window): CPU path and oracle.

Each query token ``i`` (absolute position ``p = kv_len - Tq + i``) of key/value head ``h`` attends to the
keys of the selection blocks ``block_idx[b, h, i, :]`` (block ``s`` covers tokens ``[s*block, (s+1)*block)``;
``-1`` marks an unused slot) that are not in its future, and, with ``window > 0``, to the ``window`` most
recent keys ``p - window < t <= p``, all in ONE softmax; a key in both sets counts once.
The query heads of a GQA group share their key/value head's selection.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from .block_sparse_ref import DEFAULT_MAX_BYTES, attend_masked, rows_per_chunk
from .checks import check_qkv, needs_grad

INDEX_DTYPES = (torch.int32, torch.int64)


def check_selected_inputs(q, k, v, block_idx, block, scale, window) -> float:
    """Validate shapes, dtypes and parameters (no look at index values: that would sync a GPU)."""
    scale = check_qkv(q, k, v, scale)
    if not isinstance(block, int) or isinstance(block, bool) or block < 1 or block & (block - 1):
        raise ValueError(f"block must be a positive power of two, got {block!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = no window), got {window!r}")
    if not isinstance(block_idx, torch.Tensor):
        raise TypeError(f"block_idx must be a torch.Tensor, got {type(block_idx).__name__}")
    if block_idx.dtype not in INDEX_DTYPES:
        raise ValueError(f"block_idx.dtype must be int32 or int64, got {block_idx.dtype}")
    b, tq = q.shape[:2]
    hkv = k.shape[2]
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (b, hkv, tq) or block_idx.shape[3] < 1:
        raise ValueError(f"block_idx must have shape [B, HKV, Tq, N] = [{b}, {hkv}, {tq}, N>=1], got {tuple(block_idx.shape)}")
    if block_idx.device != q.device:
        raise ValueError(f"block_idx is on {block_idx.device} but q is on {q.device}")
    return scale


def check_index_values(block_idx: torch.Tensor, kv_len: int, block: int) -> None:
    nsel = -(-kv_len // block)
    if block_idx.numel() and (int(block_idx.min()) < -1 or int(block_idx.max()) >= nsel):
        raise ValueError(f"block_idx entries must be -1 (unused) or a block index in [0, {nsel}) "
                         f"(kv_len={kv_len}, block={block}), got values in [{int(block_idx.min())}, {int(block_idx.max())}]")


def selected_token_mask(block_idx_rows: torch.Tensor, r0: int, q_offset: int, kv_len: int, block: int,
                        window: int) -> torch.Tensor:
    """``[B, HKV, r, Tk]`` bool visibility for query rows ``r0 .. r0 + r`` from their selected blocks (and window)."""
    b, hkv, r, _ = block_idx_rows.shape
    nsel = -(-kv_len // block)
    device = block_idx_rows.device
    idx = block_idx_rows.long()
    idx = torch.where((idx < 0) | (idx >= nsel), torch.full_like(idx, nsel), idx)  # unused slots -> a spare column
    chosen = torch.zeros(b, hkv, r, nsel + 1, dtype=torch.bool, device=device)
    chosen.scatter_(-1, idx, True)
    k_pos = torch.arange(kv_len, device=device)
    q_pos = torch.arange(r0, r0 + r, device=device)[:, None] + q_offset
    vis = chosen[..., k_pos // block]
    if window > 0:
        vis = vis | (q_pos - k_pos < window)
    return vis & (k_pos <= q_pos)


def selected_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, *,
                                 block: int, scale: Optional[float] = None, window: int = 0,
                                 max_bytes: int = DEFAULT_MAX_BYTES):
    """Attention of ``q [B, Tq, HQ, D]`` over ``k, v [B, Tk, HKV, D]`` restricted to each token's selected
    blocks ``block_idx [B, HKV, Tq, N]`` (and the window). Returns ``(out [B, Tq, HQ, D],
    lse [B, Tq, HQ] float32)``; differentiable in q, k, v. Chunked over queries, each chunk recomputed
    in backward, so memory stays within about ``max_bytes``."""
    scale = check_selected_inputs(q, k, v, block_idx, block, scale, window)
    b, tq, hq, _ = q.shape
    tk = k.shape[1]
    check_index_values(block_idx, tk, block)
    q_offset = tk - tq
    step = rows_per_chunk(b, hq, tk, max_bytes)
    need_grad = needs_grad(q, k, v)
    outs, lses = [], []
    for r0 in range(0, tq, step):
        r1 = min(r0 + step, tq)
        mask = selected_token_mask(block_idx[:, :, r0:r1], r0, q_offset, tk, block, window)
        if need_grad:
            o, l = checkpoint(attend_masked, q[:, r0:r1], k, v, mask, scale, use_reentrant=False)
        else:
            o, l = attend_masked(q[:, r0:r1], k, v, mask, scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 1), torch.cat(lses, -1).transpose(1, 2).contiguous()


__all__ = ["selected_attention_reference", "selected_token_mask", "check_selected_inputs"]
