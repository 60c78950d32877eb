"""Decode-shaped NSA kernels: a few new queries against a long KV cache, with the key range split over
programs (flash-decoding) so that one token is limited by bytes, not by a handful of serial programs.

- ``selected_window_decode``: same semantics and result as ``nsa_selected.selected_attention`` (one
  softmax over the selected blocks ∪ the window; a key in both counts once; future keys masked), for
  few queries. One program per (part, query token, sequence × kv head), where a part is one selected
  slot (one block of ``l'`` keys, keys in the window left to the window parts) or one ``BLOCK_N``-key
  chunk of the window; rows are the GQA group's query heads (padded to >= 16 for ``tl.dot``). Each part
  writes its partial (max, sum, unnormalised output); ``_combine_kernel`` merges them per (token, head).
  With n = 16, w = 512, l' = 64 that is 24 parts × HKV programs of one 64-key tile each, instead of the
  prefill kernel's HKV programs walking 16 blocks serially (plus a block-sparse window launch).
- The compressed side has its decode forms in ``nsa_compressed``: ``compressed_lse(..., splits=S)`` and
  ``selection_importance`` (its default splits the output columns when there are few query rows).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import resolve_backend
from .block_sparse import LOG2E, _mm, _precision, _strides
from .nsa_selected_ref import check_selected_inputs, selected_attention_reference


@triton.jit
def _sel_win_part_kernel(
    Q, K, V, IDX, M_PART, L_PART, ACC,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sib, sih, sit, sin,
    q_len, num_q_heads, num_kv_heads, n_slots, q_offset, qk_scale_log2, batch,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    part = tl.program_id(0)
    i = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    rmask = offs_r < GROUP
    heads = hk * GROUP + offs_r
    pos = q_offset + i
    # a selected slot owns its block's keys up to p - window (later ones are the window's, or the future);
    # a window chunk owns BLOCK_N of the keys p - window < t <= p
    is_slot = part < n_slots
    blk = tl.load(IDX + b.to(tl.int64) * sib + hk * sih + i.to(tl.int64) * sit + tl.minimum(part, n_slots - 1) * sin)
    blk = blk.to(tl.int32)
    slot_start = tl.where(blk >= 0, blk * BLOCK, pos + 1)  # an unused slot sees nothing
    start = tl.where(is_slot, slot_start, pos - WINDOW + 1 + (part - n_slots) * BLOCK_N)
    last = tl.where(is_slot, pos - WINDOW, pos)
    n_sub = tl.where(is_slot, BLOCK // BLOCK_N, 1)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    if start <= last:
        q = tl.load(Q + b.to(tl.int64) * sqb + i.to(tl.int64) * sqt + heads[:, None] * sqh + offs_d[None, :] * sqd,
                    mask=rmask[:, None], other=0.0)
        k_base = K + b.to(tl.int64) * skb + hk * skh
        v_base = V + b.to(tl.int64) * svb + hk * svh
        for c in range(0, n_sub):
            offs_k = start + c * BLOCK_N + offs_n
            kmask = (offs_k <= last) & (offs_k >= 0)
            k = tl.load(k_base + offs_k[None, :].to(tl.int64) * skt + offs_d[:, None] * skd, mask=kmask[None, :], other=0.0)
            s = _mm(q, k, PRECISION) * qk_scale_log2
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_k[:, None].to(tl.int64) * svt + offs_d[None, :] * svd, mask=kmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)
            m_i = m_new
    # partial buffers [part, b, t, hq] and [part, b, t, hq, d]
    row = ((part.to(tl.int64) * batch + b) * q_len + i) * num_q_heads + heads
    tl.store(M_PART + row, m_i, mask=rmask)
    tl.store(L_PART + row, l_i, mask=rmask)
    tl.store(ACC + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=rmask[:, None])


@triton.jit
def _combine_kernel(M_PART, L_PART, ACC, O, LSE, n_parts, n_rows, sob, sot, soh, sod, q_len, num_q_heads,
                    PARTS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program per (b, t, hq) row: merge the parts' partial softmaxes into the output and LSE."""
    r = tl.program_id(0)
    offs_p = tl.arange(0, PARTS)
    offs_d = tl.arange(0, HEAD_DIM)
    pmask = offs_p < n_parts
    idx = offs_p.to(tl.int64) * n_rows + r
    m = tl.load(M_PART + idx, mask=pmask, other=float("-inf"))
    l = tl.load(L_PART + idx, mask=pmask, other=0.0)
    mx = tl.max(m, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.math.exp2(m - mx)
    total = tl.sum(w * l, 0)
    acc = tl.load(ACC + idx[:, None] * HEAD_DIM + offs_d[None, :], mask=pmask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0)
    t_safe = tl.where(total == 0.0, 1.0, total)
    out = out / t_safe
    lse = tl.where(total == 0.0, float("-inf"), (mx + tl.math.log2(t_safe)) * 0.6931471805599453)
    h = r % num_q_heads
    bt = r // num_q_heads
    t = bt % q_len
    b = bt // q_len
    tl.store(O + b.to(tl.int64) * sob + t.to(tl.int64) * sot + h * soh + offs_d * sod, out.to(O.dtype.element_ty))
    tl.store(LSE + r, lse)


def _key_tile(block: int, head_dim: int) -> int:
    return min(block, 64 if head_dim <= 128 else 32)


@torch.compiler.disable
@torch.no_grad()
def selected_window_decode_triton(q, k, v, block_idx, *, block: int, scale: Optional[float] = None, window: int = 0):
    """Triton split-key version of ``selected_attention_reference`` for few queries (no gradient)."""
    scale = check_selected_inputs(q, k, v, block_idx, block, scale, window)
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    bn = _key_tile(block, d)
    n_slots = block_idx.shape[3]
    parts = n_slots + triton.cdiv(window, bn)
    m_part = torch.empty(parts, b, tq, hq, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc = torch.empty(parts, b, tq, hq, d, dtype=torch.float32, device=q.device)
    extra = dict(num_warps=4, num_stages=2) if q.device.type == "cuda" else {}
    _sel_win_part_kernel[(parts, tq, b * hkv)](
        q, k, v, block_idx, m_part, l_part, acc, *_strides(q), *_strides(k), *_strides(v), *_strides(block_idx),
        tq, hq, hkv, n_slots, tk - tq, scale * LOG2E, b, GROUP=group, ROWS=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, BLOCK=block, BLOCK_N=bn, WINDOW=window, PRECISION=_precision(q.dtype, q.device), **extra)
    out = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, tq, hq, dtype=torch.float32, device=q.device)
    rows = b * tq * hq
    _combine_kernel[(rows,)](m_part, l_part, acc, out, lse, parts, rows, *_strides(out), tq, hq,
                             PARTS=max(2, triton.next_power_of_2(parts)), HEAD_DIM=d,
                             **({"num_warps": 2} if q.device.type == "cuda" else {}))
    return out, lse


def selected_window_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, *, block: int,
                           scale: Optional[float] = None, window: int = 0, backend: str = "auto"):
    """``selected_attention`` (selected blocks ∪ window, one softmax) for decode: few queries against a long
    cache, the key range split over programs. Returns ``(out [B, Tq, HQ, D], lse [B, Tq, HQ] float32)``;
    no gradient (decode). Prefer ``selected_attention`` when Tq is large (the parts' buffers grow with
    Tq × (n + w / 64) × HQ × D floats)."""
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        return selected_window_decode_triton(q, k, v, block_idx, block=block, scale=scale, window=window)
    with torch.no_grad():
        return selected_attention_reference(q, k, v, block_idx, block=block, scale=scale, window=window)


__all__ = ["selected_window_decode", "selected_window_decode_triton"]
