"""Where dense (or layout-restricted) attention puts its mass, computed blockwise: never a T×T matrix.

Shared by capture and the locality audit. One pass over query chunks computes, from the same
probabilities, the block mass, the mass by distance, chosen rows, the log-sum-exp and (on request) the
mass of each query by key block and on a range of keys per query.

Cost, per layer, is about one dense attention (on a CPU thread about what SDPA takes): the scores of a
chunk of query rows are computed only up to the chunk's last visible key (causal: half the square) by
one batched matmul, the softmax is done in place in base 2 (one ``exp2`` per score), and the mass by
distance is summed tile by tile: a query block's row of ``block × block`` tiles is added, in one
contiguous add, to the running sums of the tiles at the same block distance, instead of scattering
every score. Chunks are kept small (``chunk_bytes``) so that they stay in the CPU's cache between passes.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from .layout import BlockLayout

# scores of one chunk of query rows; small enough to stay in the last-level cache of a CPU
DEFAULT_CHUNK_BYTES = 8 * 2**20
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


@torch.no_grad()
def attention_mass_stats(q: torch.Tensor, k: torch.Tensor, block: int = 64, scale: Optional[float] = None,
                         causal: bool = True, layout: Optional[BlockLayout] = None, rows=None,
                         max_bytes: int = 128 * 2**20, *, row_blocks: Sequence[int] = (),
                         spans: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    """Attention probabilities of ``q [B, Tq, HQ, D]`` on ``k [B, Tk, HKV, D]`` reduced several ways.

    Returns a dict of float32 tensors:
      ``block_mass [B, HQ, NQB, NKB]``: summed probability of the queries of query block i on keys of block j
        (each query contributes 1 in total, so a row of blocks sums to the number of queries in it);
      ``distance_mass [B, HQ, Tk]``: summed probability at each distance ``q_pos - k_pos`` (>= 0 when causal;
        without ``causal`` ``[B, HQ, 2 Tk - 1]`` indexed by ``q_pos - k_pos + Tk - 1``);
      ``lse [B, HQ, Tq]``: log-sum-exp of the (visible) scores, -inf for a query that sees nothing;
      ``rows [B, HQ, len(rows), Tk]``: the full probability rows of the chosen query indices (if ``rows``);
      ``row_block_mass {b: [B, HQ, Tq, ceil(Tk / b)]}``: each query's mass by key block of ``b`` tokens, for
        every ``b`` in ``row_blocks``;
      ``span_mass {name: [B, HQ, Tq]}``: each query's mass on keys ``[start[i], stop[i])`` for
        ``spans[name] = (start [Tq], stop [Tq])`` (integer key indices).
    With ``layout`` the softmax is restricted to it (the pattern's own attention); otherwise dense.
    ``max_bytes`` bounds the scores of a chunk (``chunk_bytes``, smaller, is what is used when it fits).
    """
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    offset = tk - tq
    dev = q.device
    nqb, nkb = math.ceil(tq / block), math.ceil(tk / block)
    row_blocks = sorted({int(x) for x in row_blocks})
    spans = dict(spans or {})
    for name, (start, stop) in spans.items():
        if tuple(start.shape) != (tq,) or tuple(stop.shape) != (tq,):
            raise ValueError(f"spans[{name!r}] must be two [Tq] = [{tq}] tensors of key indices")
    block_mass = torch.zeros(b, hq, nqb, nkb, dtype=torch.float32, device=dev)
    # tiles summed by block distance: diag[..., i, u, j] = sum over query blocks c of tile (c, c + u + umin) at
    # query row i, key column j. Indexed by kb - qb (not qb - kb) so that one query block's row of tiles is a
    # contiguous run of slots: the add below reads and writes whole rows.
    umin = -(nqb - 1)
    umax = (nkb - 1) if (not causal or layout is not None) else (offset + block - 1) // block
    diag = torch.zeros(b, hq, block, umax - umin + 1, block, dtype=torch.float32, device=dev)
    lse_out = torch.empty(b, hq, tq, dtype=torch.float32, device=dev)
    row_mass = {bs: torch.zeros(b, hq, tq, math.ceil(tk / bs), dtype=torch.float32, device=dev) for bs in row_blocks}
    span_out = {name: torch.zeros(b, hq, tq, dtype=torch.float32, device=dev) for name in spans}
    wanted = sorted(set(int(r) for r in rows)) if rows is not None else []
    picked = {}
    # keys as [B, HKV, D, Tk]: each chunk's scores are one batched matmul straight into [B, HQ, rows, keys]
    k_t = k.float().permute(0, 2, 3, 1).contiguous()
    # scores in base 2 (exp2 is about twice as fast as exp on CPUs); lse is converted back at the end
    qscale = scale * LOG2E
    # chunks of whole query blocks so that each chunk adds to whole block rows
    per_row = max(1, b * hq * tk * 4)
    budget = min(max_bytes, max(chunk_bytes, block * per_row))
    step = max(block, (budget // per_row) // block * block)
    for r0 in range(0, tq, step):
        r1 = min(r0 + step, tq)
        nr = r1 - r0
        # keys this chunk can see: causal ones end at its last query's position (rounded up to a whole key
        # block: the few extra keys are masked as future anyway, and the block sums then need no padded copy)
        kend = min(tk, math.ceil((r1 + offset) / block) * block) if (causal and layout is None) else tk
        kpad = min(math.ceil(kend / block) * block, nkb * block)
        for bs in row_blocks:
            kpad = max(kpad, min(math.ceil(kend / bs) * bs, math.ceil(tk / bs) * bs))
        qc = (q[:, r0:r1].float() * qscale).view(b, nr, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * nr, d)
        s = torch.matmul(qc, k_t[..., :kend]).view(b, hkv, g, nr, kend)
        q_pos = torch.arange(r0, r1, device=dev)[:, None] + offset
        if layout is not None:
            s.masked_fill_(~layout.token_mask(r0, r1)[:, :, None], float("-inf"))  # mask [LB, LH, 1, r, Tk]
        elif causal and r0 + offset + 1 < kend:
            # only the keys after the chunk's first query can be in its future
            c0 = r0 + offset + 1
            fut = torch.arange(c0, kend, device=dev)[None, :] > q_pos
            s[..., c0:kend].masked_fill_(fut, float("-inf"))
        s = s.view(b, hq, nr, kend)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # a row that sees nothing stays -inf -> exp 0
        s.sub_(m).exp2_()
        z = s.sum(-1, keepdim=True)
        lse_out[:, :, r0:r1] = ((m + z.log2()) * LN2).squeeze(-1)
        s.mul_(torch.where(z > 0, 1.0 / z, torch.zeros_like(z)))
        p = s  # [B, HQ, r, kend], probabilities
        if kpad > kend:
            p = torch.nn.functional.pad(p, (0, kpad - kend))
        # mass by key block per query, then by query block
        nk_c = math.ceil(kend / block)
        pk = p[..., : nk_c * block].reshape(b, hq, nr, nk_c, block).sum(-1)
        if block in row_mass:
            row_mass[block][:, :, r0:r1, :nk_c] = pk
        for bs in row_blocks:
            if bs != block:
                n_c = math.ceil(kend / bs)
                row_mass[bs][:, :, r0:r1, :n_c] = p[..., : n_c * bs].reshape(b, hq, nr, n_c, bs).sum(-1)
        pad_q = (-nr) % block
        pq = torch.nn.functional.pad(pk, (0, 0, 0, pad_q)) if pad_q else pk
        qb0 = r0 // block
        nq_c = pq.shape[2] // block
        block_mass[:, :, qb0: qb0 + nq_c, :nk_c] += pq.view(b, hq, nq_c, block, nk_c).sum(-2)
        # mass by distance: query block qb's tiles kb = 0..kb_hi go to slots kb - qb - umin (one add per block)
        for c in range(nq_c):
            i0, i1 = c * block, min((c + 1) * block, nr)
            qb = qb0 + c
            kb_hi = min(nk_c - 1, qb + umax)
            if kb_hi < 0:
                continue
            tiles = p[:, :, i0:i1, : (kb_hi + 1) * block].reshape(b, hq, i1 - i0, kb_hi + 1, block)
            diag[:, :, : i1 - i0, -qb - umin: kb_hi - qb - umin + 1] += tiles
        for name, (start, stop) in spans.items():
            st = start[r0:r1].to(dev).long().clamp(0, kpad)
            sp = stop[r0:r1].to(dev).long().clamp(0, kpad)
            width = int((sp - st).clamp(min=0).max()) if nr else 0
            if width == 0:
                continue
            idx = st[:, None] + torch.arange(width, device=dev)[None, :]  # [r, width]
            inside = idx < sp[:, None]
            vals = torch.gather(p, 3, idx.clamp(max=kpad - 1).expand(b, hq, nr, width))
            span_out[name][:, :, r0:r1] = (vals * inside).sum(-1)
        for r in wanted:
            if r0 <= r < r1:
                picked[r] = p[:, :, r - r0, :tk].clone() if kpad >= tk else \
                    torch.nn.functional.pad(p[:, :, r - r0], (0, tk - kpad))
    distance_mass = _distance_from_tiles(diag, umin, block, offset, tk, causal)
    out = {"block_mass": block_mass, "distance_mass": distance_mass, "block": block, "q_offset": offset,
           "lse": lse_out}
    if rows is not None:
        out["rows"] = torch.stack([picked[r] for r in wanted], 2) if wanted else torch.zeros(b, hq, 0, tk)
        out["row_index"] = torch.tensor(wanted, dtype=torch.long)
    if row_blocks:
        out["row_block_mass"] = row_mass
    if spans:
        out["span_mass"] = span_out
    return out


def _distance_from_tiles(diag: torch.Tensor, umin: int, block: int, offset: int, tk: int, causal: bool) -> torch.Tensor:
    """Mass by distance from the tile sums ``diag [B, HQ, i, u, j]`` (tiles with key block - query block =
    ``u + umin``): entry (i, u, j) lies at distance ``-(u + umin) * block + i - j + offset`` (shifted by
    ``Tk - 1`` without causality)."""
    b, hq, _, nu, _ = diag.shape
    dev = diag.device
    dist_len = tk if causal else 2 * tk - 1
    i = torch.arange(block, device=dev)[:, None, None]
    u = torch.arange(nu, device=dev)[None, :, None] + umin
    j = torch.arange(block, device=dev)[None, None, :]
    dist = (-u * block + i - j + offset).reshape(-1)
    if not causal:
        dist = dist + tk - 1
    keep = (dist >= 0) & (dist < dist_len)
    out = torch.zeros(b, hq, dist_len, dtype=torch.float32, device=dev)
    out.index_add_(2, dist[keep], diag.reshape(b, hq, -1)[:, :, keep])
    return out
