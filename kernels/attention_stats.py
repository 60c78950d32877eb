"""Where dense (or layout-restricted) attention puts its mass, computed blockwise: never a T×T matrix.

Shared by capture and the locality audit. Chunked over query rows like the reference kernel.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .block_sparse_ref import rows_per_chunk
from .layout import BlockLayout


@torch.no_grad()
def attention_mass_stats(q: torch.Tensor, k: torch.Tensor, block: int = 64, scale: Optional[float] = None,
                         causal: bool = True, layout: Optional[BlockLayout] = None, rows=None,
                         max_bytes: int = 128 * 2**20) -> dict:
    """Attention probabilities of ``q [B, Tq, HQ, D]`` on ``k [B, Tk, HKV, D]`` reduced three ways.

    Returns a dict of float32 tensors:
      ``block_mass [B, HQ, NQB, NKB]``: summed probability of the queries of query block i on keys of block j
        (each query contributes 1 in total, so a row of blocks sums to the number of queries in it);
      ``distance_mass [B, HQ, Tk]``: summed probability at each distance ``q_pos - k_pos`` (>= 0 when causal);
      ``rows [B, HQ, len(rows), Tk]``: the full probability rows of the chosen query indices (if ``rows``).
    With ``layout`` the softmax is restricted to it (the pattern's own attention); otherwise dense.
    """
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    offset = tk - tq
    nqb, nkb = math.ceil(tq / block), math.ceil(tk / block)
    block_mass = torch.zeros(b, hq, nqb, nkb, dtype=torch.float32, device=q.device)
    dist_len = tk if causal else 2 * tk - 1
    distance_mass = torch.zeros(b, hq, dist_len, dtype=torch.float32, device=q.device)
    wanted = sorted(set(int(r) for r in rows)) if rows is not None else []
    picked = {}
    kf = k.float()
    cols = torch.arange(tk, device=q.device)
    # chunks aligned on query blocks so that each chunk adds to whole block rows
    step = max(block, rows_per_chunk(b, hq, tk, max_bytes) // block * block)
    for r0 in range(0, tq, step):
        r1 = min(r0 + step, tq)
        qf = q[:, r0:r1].float().view(b, r1 - r0, hkv, g, d)
        s = torch.einsum("brhgd,bthd->bhgrt", qf, kf) * scale
        q_pos = torch.arange(r0, r1, device=q.device)[:, None] + offset
        if layout is not None:
            mask = layout.token_mask(r0, r1)[:, :, None]  # [LB, LH, 1, r, Tk]
        else:
            mask = (cols[None, :] <= q_pos) if causal else torch.ones(1, tk, dtype=torch.bool, device=q.device)
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)).nan_to_num_(0.0)
        p = p.reshape(b, hq, r1 - r0, tk)
        pad_k = nkb * block - tk
        pk = torch.nn.functional.pad(p, (0, pad_k)).view(b, hq, r1 - r0, nkb, block).sum(-1)
        pad_q = (-(r1 - r0)) % block
        pq = torch.nn.functional.pad(pk, (0, 0, 0, pad_q)).view(b, hq, -1, block, nkb).sum(-2)
        block_mass[:, :, r0 // block: r0 // block + pq.shape[2]] += pq
        dist = q_pos - cols[None, :]
        if not causal:
            dist = dist + tk - 1
        idx = dist.clamp(0, dist_len - 1).expand(r1 - r0, tk).reshape(-1)
        valid = ((dist >= 0) & (dist < dist_len)).expand(r1 - r0, tk).reshape(-1)
        contrib = (p.reshape(b, hq, -1) * valid).float()
        distance_mass.index_add_(2, idx, contrib)
        for r in wanted:
            if r0 <= r < r1:
                picked[r] = p[:, :, r - r0]
    out = {"block_mass": block_mass, "distance_mass": distance_mass, "block": block, "q_offset": offset}
    if rows is not None:
        out["rows"] = torch.stack([picked[r] for r in wanted], 2) if wanted else torch.zeros(b, hq, 0, tk)
        out["row_index"] = torch.tensor(wanted, dtype=torch.long)
    return out
