"""Plain-PyTorch block-sparse attention over a BlockLayout: the CPU path and the test oracle.

Same signature and semantics as ``block_sparse.block_sparse_attention_triton``; it works in
float32, chunks over query rows so that scores never exceed ``max_bytes``, and recomputes each
chunk in backward (checkpointing) so gradients stay bounded too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from .checks import check_layout, check_qkv, needs_grad
from .layout import BlockLayout

DEFAULT_MAX_BYTES = 256 * 2**20


def attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Softmax attention of ``q [B, r, HQ, D]`` on ``k, v [B, Tk, HKV, D]`` under ``mask`` (broadcast to
    ``[B, HKV, r, Tk]``). Returns output ``[B, r, HQ, D]`` in q's dtype and LSE ``[B, HQ, r]`` in float32;
    a row with no visible key gives output 0 and LSE -inf."""
    b, r, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qf = q.float().view(b, r, hkv, g, d)
    s = torch.einsum("brhgd,bthd->bhgrt", qf, k.float()) * scale
    s = s.masked_fill(~mask[:, :, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where nothing is visible
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    p = torch.where(mask[:, :, None], p, torch.zeros((), dtype=p.dtype, device=p.device))
    out = torch.einsum("bhgrt,bthd->brhgd", p, v.float()).reshape(b, r, hq, d)
    return out.to(q.dtype), lse.reshape(b, hq, r)


def rows_per_chunk(batch: int, heads: int, kv_len: int, max_bytes: int) -> int:
    # scores, probabilities and mask: about 10 bytes per (row, key, head) at float32
    return max(1, int(max_bytes // max(1, batch * heads * kv_len * 10)))


def block_sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                               scale: Optional[float] = None, max_bytes: int = DEFAULT_MAX_BYTES):
    """Attention of ``q [B, Tq, HQ, D]`` over ``k, v [B, Tk, HKV, D]`` restricted to ``layout``.

    Returns ``(out [B, Tq, HQ, D], lse [B, HQ, Tq] float32)``; differentiable by autograd.
    """
    scale = check_qkv(q, k, v, scale)
    check_layout(layout, q, k)
    b, tq, hq, _ = q.shape
    step = rows_per_chunk(b, hq, k.shape[1], max_bytes)
    need_grad = needs_grad(q, k, v)
    outs, lses = [], []
    for r0 in range(0, tq, step):
        r1 = min(r0 + step, tq)
        mask = layout.token_mask(r0, r1)
        if need_grad:
            o, l = checkpoint(attend_masked, q[:, r0:r1], k, v, mask, scale, use_reentrant=False)
        else:
            o, l = attend_masked(q[:, r0:r1], k, v, mask, scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 1), torch.cat(lses, -1)
