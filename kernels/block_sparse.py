"""Triton block-sparse attention over a BlockLayout: forward, backward, autograd wrapper.

Each program owns one query block (forward, dQ) or one key block (dK/dV) and walks the layout's
index lists: full tiles first with no token mask, then partial tiles with the layout's TokenRule
(causal, window, sinks, dilation, global tokens, optional bitmaps) evaluated in registers.
Online softmax in base 2; a row with no visible key keeps l = 0 and gets output 0, LSE -inf.
Same signature and semantics as ``block_sparse_ref.block_sparse_attention_ref``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .checks import check_layout, check_power_of_two, check_qkv
from .layout import BlockLayout

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """tl.dot, except under the CPU interpreter where bf16 operands are widened first: the interpreter's
    bf16 dot is wrong (Triton 3.9: a 16x16 product off by 1e10) while the operands' rounding is kept."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _masked_softmax_step(m_i, s):
    """One key tile of an online softmax whose rows may have seen nothing yet (log2 units, masked scores at
    -inf): ``(m_new, p, alpha)``, the new running max, the tile's probabilities relative to it and the factor
    that rescales the earlier sums; a row that has seen nothing gets p = alpha = 0 (no -inf - -inf NaN).
    Keys are the last axis (a batch of independent problems may lead)."""
    m_new = tl.maximum(m_i, tl.max(s, -1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.math.exp2(s - tl.expand_dims(m_safe, -1)), tl.math.exp2(m_i - m_safe)


@triton.jit
def _scaled_softmax_step(m_i, s, qk_scale_log2, MASKED: tl.constexpr):
    """``_masked_softmax_step`` on unscaled scores: the running max ``m_i`` and the scores ``s`` stay unscaled (the
    scale is positive, so the max commutes with it) and the scale (log2 units) enters each exponent's multiply-add:
    one multiply per score fewer, the score's max, multiply-add, exp2 and sum left. Without MASKED no score is
    -inf, so every row ends the tile with a finite max. The final max is ``m_i * qk_scale_log2`` in log2 units."""
    m_new = tl.maximum(m_i, tl.max(s, -1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new) if MASKED else m_new
    mc = m_safe * qk_scale_log2
    return m_new, tl.math.exp2(s * qk_scale_log2 - tl.expand_dims(mc, -1)), tl.math.exp2(m_i * qk_scale_log2 - mc)


@triton.jit
def _finish_softmax(acc, m_i, l_i):
    """``(out, lse in log2 units)`` of an online softmax's final state (``_masked_softmax_step``'s running max and
    sum, the accumulated P·V); a row that saw nothing gives 0 and -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc / tl.expand_dims(l_safe, -1), tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))


@triton.jit
def _token_visible(q_pos, k_pos, q_idx, q_len, kv_len, glob_ptr, tile_bits_ptr, tile_id,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr, DIL_BLOCK: tl.constexpr,
                   DIL_STRIDE: tl.constexpr, HAS_GLOBAL: tl.constexpr, HAS_BITS: tl.constexpr,
                   BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, q_in_tile, k_in_tile):
    """Token visibility inside a partial tile; q_pos [M, 1] and k_pos [1, N] are absolute positions."""
    vis = (k_pos < kv_len) & (q_idx < q_len)
    if CAUSAL:
        vis = vis & (k_pos <= q_pos)
    if WINDOW > 0:
        if CAUSAL:
            admitted = (q_pos - k_pos) < WINDOW
        else:
            diff = q_pos - k_pos
            admitted = (diff < WINDOW) & (diff > -WINDOW)
        if SINK > 0:
            admitted = admitted | (k_pos < SINK)
        if DIL_STRIDE > 1:
            admitted = admitted | (((k_pos // DIL_BLOCK) % DIL_STRIDE) == 0)
        if HAS_GLOBAL:
            gk = tl.load(glob_ptr + k_pos, mask=k_pos < kv_len, other=0)
            gq = tl.load(glob_ptr + q_pos, mask=q_idx < q_len, other=0)
            admitted = admitted | (gk != 0) | (gq != 0)
        vis = vis & admitted
    if HAS_BITS:
        bits = tl.load(tile_bits_ptr + tile_id.to(tl.int64) * (BLOCK_Q * BLOCK_KV) + q_in_tile * BLOCK_KV + k_in_tile)
        vis = vis & (bits != 0)
    return vis


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, PART_TID, layout_heads, num_rows, full_w, part_w,
    GLOB, BITS,
    q_len, kv_len, num_q_heads, q_offset, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr, DIL_BLOCK: tl.constexpr, DIL_STRIDE: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, HAS_BITS: tl.constexpr, LAYOUT_PER_BATCH: tl.constexpr, LAYOUT_PER_HEAD: tl.constexpr,
    PRECISION: tl.constexpr, HEADS: tl.constexpr,
):
    """One program per (query block, sequence × HEADS query heads of one GQA group): its rows are the block's
    queries for each of those heads (head-major), which share every key tile it loads."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // (num_q_heads // HEADS)
    h0 = bh % (num_q_heads // HEADS) * HEADS
    hk = h0 // GROUP
    lb = b if LAYOUT_PER_BATCH else 0
    lh = hk if LAYOUT_PER_HEAD else 0

    ROWS: tl.constexpr = HEADS * BLOCK_Q
    row_in_block = tl.arange(0, ROWS) % BLOCK_Q
    heads = h0 + tl.arange(0, ROWS) // BLOCK_Q
    offs_m = qb * BLOCK_Q + row_in_block
    offs_n = tl.arange(0, BLOCK_KV)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b.to(tl.int64) * sqb + heads[:, None] * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < q_len, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)

    crow = (lb * layout_heads + lh) * num_rows + qb  # this query block's row in the layout's index lists
    row = crow.to(tl.int64) * full_w
    # full tiles: every (query, key) pair visible, no mask and no bounds checks on keys
    n_full = tl.load(FULL_CNT + crow)
    for j in range(0, n_full):
        kb = tl.load(FULL_IDX + row + j)
        offs_k = kb * BLOCK_KV + offs_n
        k = tl.load(k_base + offs_k[None, :].to(tl.int64) * skt + offs_d[:, None] * skd)
        m_new, p, alpha = _scaled_softmax_step(m_i, _mm(q, k, PRECISION), qk_scale_log2, False)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_k[:, None].to(tl.int64) * svt + offs_d[None, :] * svd)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    # partial tiles: token rule applied; rows may stay empty (m = -inf) so subtract a safe max (scores unscaled in both
    # loops: _scaled_softmax_step)
    n_part = tl.load(PART_CNT + crow)
    q_pos = (offs_m + q_offset)[:, None]
    prow = crow.to(tl.int64) * part_w
    for j in range(0, n_part):
        kb = tl.load(PART_IDX + prow + j)
        tid = 0
        if HAS_BITS:
            tid = tl.load(PART_TID + prow + j)
        offs_k = kb * BLOCK_KV + offs_n
        kmask = offs_k < kv_len
        k = tl.load(k_base + offs_k[None, :].to(tl.int64) * skt + offs_d[:, None] * skd, mask=kmask[None, :], other=0.0)
        s = _mm(q, k, PRECISION)
        vis = _token_visible(q_pos, offs_k[None, :], offs_m[:, None], q_len, kv_len, GLOB, BITS, tid,
                             CAUSAL, WINDOW, SINK, DIL_BLOCK, DIL_STRIDE, HAS_GLOBAL, HAS_BITS, BLOCK_Q, BLOCK_KV,
                             row_in_block[:, None], offs_n[None, :])
        m_new, p, alpha = _scaled_softmax_step(m_i, tl.where(vis, s, float("-inf")), qk_scale_log2, True)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_k[:, None].to(tl.int64) * svt + offs_d[None, :] * svd, mask=kmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    out, lse2 = _finish_softmax(acc, m_i * qk_scale_log2, l_i)
    lse = lse2 * 0.6931471805599453
    o_ptrs = O + b.to(tl.int64) * sob + heads[:, None] * soh + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < q_len)
    tl.store(LSE + (b * num_q_heads + heads).to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, sot, soh, sod, sgb, sgt, sgh, sgd, q_len, num_q_heads,
                      HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(O * dO) in fp32, read once from the half-precision tensors."""
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    m = offs_t[:, None] < q_len
    o = tl.load(O + b.to(tl.int64) * sob + h * soh + offs_t[:, None].to(tl.int64) * sot + offs_d[None, :] * sod, mask=m, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sgb + h * sgh + offs_t[:, None].to(tl.int64) * sgt + offs_d[None, :] * sgd, mask=m, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * q_len + offs_t, delta, mask=offs_t < q_len)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod,
    sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, PART_TID, layout_heads, num_rows, full_w, part_w,
    GLOB, BITS,
    q_len, kv_len, num_kv_heads, q_offset, qk_scale_log2, sm_scale, ITEM_KB, ITEM_START, split_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr, DIL_BLOCK: tl.constexpr, DIL_STRIDE: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, HAS_BITS: tl.constexpr, LAYOUT_PER_BATCH: tl.constexpr, LAYOUT_PER_HEAD: tl.constexpr,
    PRECISION: tl.constexpr, SUB_Q: tl.constexpr, SPLIT: tl.constexpr,
):
    """One program per (work item, sequence, kv head): sums dK, dV over the query heads of its GQA group.

    Without SPLIT a work item is a whole key block and the result is stored. With SPLIT, key blocks
    that many query blocks visit (a sink seen by every query) are cut into items of ``split_size``
    query blocks each, so no single program walks the whole sequence; items add into fp32 buffers.
    Query tiles are walked in sub-tiles of SUB_Q rows: smaller products pipeline better here."""
    item = tl.program_id(0)
    bh = tl.program_id(1)
    if SPLIT:
        kb = tl.load(ITEM_KB + item)
        j_begin = tl.load(ITEM_START + item)
    else:
        kb = item
        j_begin = 0
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    lb = b if LAYOUT_PER_BATCH else 0
    lh = hk if LAYOUT_PER_HEAD else 0
    num_q_heads = num_kv_heads * GROUP

    offs_k = kb * BLOCK_KV + tl.arange(0, BLOCK_KV)
    offs_m0 = tl.arange(0, SUB_Q)
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = offs_k < kv_len
    NSUB: tl.constexpr = BLOCK_Q // SUB_Q
    k = tl.load(K + b.to(tl.int64) * skb + hk * skh + offs_k[:, None].to(tl.int64) * skt + offs_d[None, :] * skd,
                mask=kmask[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + hk * svh + offs_k[:, None].to(tl.int64) * svt + offs_d[None, :] * svd,
                mask=kmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_KV, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_KV, HEAD_DIM], dtype=tl.float32)

    crow = (lb * layout_heads + lh) * num_rows + kb
    n_full = tl.load(FULL_CNT + crow)
    n_part = tl.load(PART_CNT + crow)
    j_end = n_full + n_part
    if SPLIT:
        j_end = tl.minimum(j_end, j_begin + split_size)
    k_pos = offs_k[:, None]
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b.to(tl.int64) * sqb + h * sqh
        do_base = DO + b.to(tl.int64) * sob + h * soh
        stat_base = (b * num_q_heads + h).to(tl.int64) * q_len
        for it in range(j_begin * NSUB, j_end * NSUB):
            j = it // NSUB
            sub = it % NSUB
            is_part = j >= n_full
            if is_part:
                qb = tl.load(PART_IDX + crow.to(tl.int64) * part_w + (j - n_full))
            else:
                qb = tl.load(FULL_IDX + crow.to(tl.int64) * full_w + j)
            offs_m = qb * BLOCK_Q + sub * SUB_Q + offs_m0
            mrow = offs_m < q_len
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :] * sqd, mask=mrow[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :] * sod, mask=mrow[:, None], other=0.0)
            lse = tl.load(LSE + stat_base + offs_m, mask=mrow, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = tl.load(DELTA + stat_base + offs_m, mask=mrow, other=0.0)
            s_t = _mm(k, tl.trans(q), PRECISION) * qk_scale_log2  # [N, M]
            p_t = tl.math.exp2(s_t - lse[None, :])
            if is_part:
                tid = 0
                if HAS_BITS:
                    tid = tl.load(PART_TID + crow.to(tl.int64) * part_w + (j - n_full))
                vis = _token_visible((offs_m + q_offset)[None, :], k_pos, offs_m[None, :], q_len, kv_len, GLOB, BITS, tid,
                                     CAUSAL, WINDOW, SINK, DIL_BLOCK, DIL_STRIDE, HAS_GLOBAL, HAS_BITS, BLOCK_Q, BLOCK_KV,
                                     (sub * SUB_Q + offs_m0)[None, :], tl.arange(0, BLOCK_KV)[:, None])
                p_t = tl.where(vis, p_t, 0.0)
            dv += _mm(p_t.to(do.dtype), do, PRECISION)
            dp_t = _mm(v, tl.trans(do), PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _mm(ds_t.to(q.dtype), q, PRECISION)
    dk = dk * sm_scale
    dk_ptrs = DK + b.to(tl.int64) * sdkb + hk * sdkh + offs_k[:, None].to(tl.int64) * sdkt + offs_d[None, :] * sdkd
    dv_ptrs = DV + b.to(tl.int64) * sdvb + hk * sdvh + offs_k[:, None].to(tl.int64) * sdvt + offs_d[None, :] * sdvd
    if SPLIT:
        if j_end > j_begin:
            tl.atomic_add(dk_ptrs, dk, mask=kmask[:, None])
            tl.atomic_add(dv_ptrs, dv, mask=kmask[:, None])
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kmask[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod, sdqb, sdqt, sdqh, sdqd,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, PART_TID, layout_heads, num_rows, full_w, part_w,
    GLOB, BITS,
    q_len, kv_len, num_q_heads, q_offset, qk_scale_log2, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr, DIL_BLOCK: tl.constexpr, DIL_STRIDE: tl.constexpr,
    HAS_GLOBAL: tl.constexpr, HAS_BITS: tl.constexpr, LAYOUT_PER_BATCH: tl.constexpr, LAYOUT_PER_HEAD: tl.constexpr,
    PRECISION: tl.constexpr, SUB_KV: tl.constexpr,
):
    """One program per (query block, sequence, query head); key tiles walked in sub-tiles of SUB_KV."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    hk = h // GROUP
    lb = b if LAYOUT_PER_BATCH else 0
    lh = hk if LAYOUT_PER_HEAD else 0

    offs_m = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, SUB_KV)
    offs_d = tl.arange(0, HEAD_DIM)
    mrow = offs_m < q_len
    NSUB: tl.constexpr = BLOCK_KV // SUB_KV
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :] * sqd,
                mask=mrow[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sob + h * soh + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :] * sod,
                 mask=mrow[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * q_len + offs_m, mask=mrow, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * q_len + offs_m, mask=mrow, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    dq = tl.zeros([BLOCK_Q, HEAD_DIM], dtype=tl.float32)

    crow = (lb * layout_heads + lh) * num_rows + qb
    n_full = tl.load(FULL_CNT + crow)
    n_part = tl.load(PART_CNT + crow)
    q_pos = (offs_m + q_offset)[:, None]
    for it in range(0, (n_full + n_part) * NSUB):
        j = it // NSUB
        sub = it % NSUB
        is_part = j >= n_full
        if is_part:
            kb = tl.load(PART_IDX + crow.to(tl.int64) * part_w + (j - n_full))
        else:
            kb = tl.load(FULL_IDX + crow.to(tl.int64) * full_w + j)
        offs_k = kb * BLOCK_KV + sub * SUB_KV + offs_n
        kmask = offs_k < kv_len
        k = tl.load(k_base + offs_k[:, None].to(tl.int64) * skt + offs_d[None, :] * skd, mask=kmask[:, None], other=0.0)
        v = tl.load(v_base + offs_k[:, None].to(tl.int64) * svt + offs_d[None, :] * svd, mask=kmask[:, None], other=0.0)
        s = _mm(q, tl.trans(k), PRECISION) * qk_scale_log2
        p = tl.math.exp2(s - lse[:, None])
        if is_part:
            tid = 0
            if HAS_BITS:
                tid = tl.load(PART_TID + crow.to(tl.int64) * part_w + (j - n_full))
            vis = _token_visible(q_pos, offs_k[None, :], offs_m[:, None], q_len, kv_len, GLOB, BITS, tid,
                                 CAUSAL, WINDOW, SINK, DIL_BLOCK, DIL_STRIDE, HAS_GLOBAL, HAS_BITS, BLOCK_Q, BLOCK_KV,
                                 tl.arange(0, BLOCK_Q)[:, None], (sub * SUB_KV + offs_n)[None, :])
            p = tl.where(vis, p, 0.0)
        dp = _mm(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * sdqb + h * sdqh + offs_m[:, None].to(tl.int64) * sdqt + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=mrow[:, None])


# ----------------------------------------------------------------------------- host side
def _layout_args(layout: BlockLayout, transposed: bool):
    """Index lists, widths and rule constants the kernels take, from the layout (lists are cached on it)."""
    full_idx, full_cnt = layout.full_blocks_t if transposed else layout.full_blocks
    part_idx, part_cnt = layout.partial_blocks_t if transposed else layout.partial_blocks
    part_tid = layout.partial_tile_ids_t if transposed else layout.partial_tile_ids
    rule = layout.rule
    has_bits = layout.tile_masks is not None
    has_global = layout.is_global is not None and rule.limited
    lb, lh = layout.tile_class.shape[:2]
    rows = layout.num_kv_blocks if transposed else layout.num_q_blocks
    args = [full_idx, full_cnt, part_idx, part_cnt, part_tid if has_bits else part_cnt, lh, rows,
            full_idx.shape[-1], part_idx.shape[-1],
            layout.is_global.view(torch.uint8) if has_global else full_cnt,
            layout.tile_masks.view(torch.uint8) if has_bits else full_cnt]
    meta = dict(CAUSAL=rule.causal, WINDOW=rule.window, SINK=rule.sink, DIL_BLOCK=max(rule.dilation_block, 1),
                DIL_STRIDE=rule.dilation_stride, HAS_GLOBAL=has_global, HAS_BITS=has_bits,
                LAYOUT_PER_BATCH=lb > 1, LAYOUT_PER_HEAD=lh > 1)
    return args, meta


# Benchmarks may pin launch settings per kernel ("fwd", "dkdv", "dq") to sweep them: {"fwd": (warps, stages)}.
LAUNCH_OVERRIDES: dict = {}


def launch_options(warps: int, stages: Optional[int] = None, max_registers: Optional[int] = None) -> dict:
    """Triton launch options from a launch table's ``(warps, stages[, register cap per thread])``; the cap
    (``maxnreg``) only when one is given, so ptxas otherwise takes the registers it wants."""
    options = dict(num_warps=warps)
    if stages is not None:
        options["num_stages"] = stages
    if max_registers:
        options["maxnreg"] = max_registers
    return options


def _tuning(kernel: str, head_dim: int, block_q: int, device: torch.device, heads: int = 1) -> dict:
    if device.type != "cuda":
        return {}
    if kernel in LAUNCH_OVERRIDES:
        return launch_options(*LAUNCH_OVERRIDES[kernel])
    # Chosen by benchmarks/bench_block_sparse.py on an H100 (window 512, 64/4 heads, d=128, 64x64 tiles):
    # forward 4 warps / 3 stages; both backward kernels 4 warps / 2 stages (see benchmarks/NOTES.md).
    # Several heads per forward program: 2 heads of 64 rows at d=128, 4 warps / 2 stages, 3.53 ms against 4.44 for
    # one head and 4.58 for two at 8 warps; 4 heads at 8 warps 3.55 (2 or 3 stages), at 4 warps 10.16 (window 512
    # at 64k, 64/4, H200; NOTES run 15). Larger tiles than two heads' at d=128 take 8 warps / 3 stages.
    if kernel == "fwd" and heads > 1:
        small = heads * block_q * head_dim <= 2 * 64 * 128
        return dict(num_warps=4, num_stages=2) if small else dict(num_warps=8, num_stages=3)
    if kernel == "fwd":
        return dict(num_warps=8 if head_dim * block_q >= 128 * 128 else 4, num_stages=3)
    return dict(num_warps=4, num_stages=2)


# Query heads of one GQA group per forward program (their rows share every key tile loaded; a group that it does
# not divide takes 1). Benchmarks may change it; 1 until timed (NOTES run 15).
FWD_HEADS_PER_PROGRAM = 1

# Sub-tile of the inner loop of each backward kernel (at most the layout's block); benchmarks may set them.
SUB_TILES: dict = {"dkdv": 64, "dq": 64}


def _sub_tile(kernel: str, block: int, device: torch.device) -> int:
    return min(block, SUB_TILES[kernel])


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if device.type != "cuda" and dtype == torch.bfloat16:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t: torch.Tensor):
    return list(t.stride())


# A key block visited by more query blocks than this is split over several dK/dV programs.
DKDV_SPLIT = 16


def _dkdv_work_items(layout: BlockLayout):
    """(item_kb, item_start) int32 work items for the split dK/dV kernel, or None when no key block is hot.

    Counts are taken as the maximum over the layout's sequences and heads, so one item list serves all."""
    _, full_cnt = layout.full_blocks_t
    _, part_cnt = layout.partial_blocks_t
    visits = (full_cnt + part_cnt).amax(dim=(0, 1))  # [NKB]
    n_items = torch.clamp((visits + DKDV_SPLIT - 1) // DKDV_SPLIT, min=1)
    if int(n_items.max().item()) <= 1:
        return None
    item_kb = torch.repeat_interleave(torch.arange(len(n_items), device=visits.device), n_items)
    first = torch.cumsum(n_items, 0) - n_items
    item_start = (torch.arange(item_kb.numel(), device=visits.device) - first[item_kb]) * DKDV_SPLIT
    return item_kb.to(torch.int32).contiguous(), item_start.to(torch.int32).contiguous()


def block_sparse_forward(q, k, v, layout: BlockLayout, scale: float, heads_per_program: Optional[int] = None):
    """``(out, lse [B, HQ, Tq])``; ``heads_per_program``: query heads of one GQA group per program (default
    ``FWD_HEADS_PER_PROGRAM``; 1 where it does not divide the group)."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    out = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    largs, meta = _layout_args(layout, transposed=False)
    heads = FWD_HEADS_PER_PROGRAM if heads_per_program is None else heads_per_program
    check_power_of_two("heads_per_program", heads)
    heads = heads if (hq // hkv) % heads == 0 else 1
    grid = (layout.num_q_blocks, b * hq // heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), *largs,
        tq, k.shape[1], hq, layout.q_offset, scale * LOG2E,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_Q=layout.block_q, BLOCK_KV=layout.block_kv, PRECISION=_precision(q.dtype, q.device),
        HEADS=heads, **meta, **_tuning("fwd", d, layout.block_q, q.device, heads))
    return out, lse


def block_sparse_backward(do, q, k, v, out, lse, layout: BlockLayout, scale: float):
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    delta = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(tq, 64), b * hq)](out, do, delta, *_strides(out), *_strides(do), tq, hq,
                                                      HEAD_DIM=d, BLOCK=64)
    dq = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(b, tk, hkv, d, dtype=k.dtype, device=k.device)
    dv = torch.empty(b, tk, hkv, d, dtype=v.dtype, device=v.device)
    common = dict(GROUP=hq // hkv, HEAD_DIM=d, BLOCK_Q=layout.block_q, BLOCK_KV=layout.block_kv,
                  PRECISION=_precision(q.dtype, q.device))
    largs_t, meta = _layout_args(layout, transposed=True)
    items = _dkdv_work_items(layout)
    if items is None:
        grid0, item_kb, item_start, dk_acc, dv_acc = layout.num_kv_blocks, delta, delta, dk, dv
    else:
        item_kb, item_start = items
        grid0 = item_kb.numel()
        dk_acc = torch.zeros(dk.shape, dtype=torch.float32, device=dk.device)
        dv_acc = torch.zeros(dv.shape, dtype=torch.float32, device=dv.device)
    _bwd_dkdv_kernel[(grid0, b * hkv)](
        q, k, v, do, lse, delta, dk_acc, dv_acc, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dk_acc), *_strides(dv_acc), *largs_t, tq, tk, hkv, layout.q_offset, scale * LOG2E, scale,
        item_kb, item_start, DKDV_SPLIT, **common, **meta, SPLIT=items is not None,
        SUB_Q=_sub_tile("dkdv", layout.block_q, q.device), **_tuning("dkdv", d, layout.block_kv, q.device))
    if items is not None:
        dk.copy_(dk_acc)
        dv.copy_(dv_acc)
    largs, meta = _layout_args(layout, transposed=False)
    _bwd_dq_kernel[(layout.num_q_blocks, b * hq)](
        q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        *largs, tq, tk, hq, layout.q_offset, scale * LOG2E, scale, **common, **meta,
        SUB_KV=_sub_tile("dq", layout.block_kv, q.device), **_tuning("dq", d, layout.block_q, q.device))
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale):
        out, lse = block_sparse_forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_sparse_backward(do, q, k, v, out, lse, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None


@torch.compiler.disable
def block_sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                  scale: Optional[float] = None):
    """Triton version of ``block_sparse_attention_ref``: returns ``(out [B, Tq, HQ, D], lse [B, HQ, Tq])``.

    ``torch.compile`` graph-breaks around this call (the layout is a Python object it cannot trace),
    so a compiled model runs the kernel as it is rather than failing to trace it."""
    scale = check_qkv(q, k, v, scale)
    check_layout(layout, q, k)
    return _BlockSparseAttention.apply(q, k, v, layout, scale)
