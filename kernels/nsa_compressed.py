"""NSA compressed-branch primitives: Triton kernels and dispatchers (Triton on CUDA, the reference elsewhere).

Semantics, shapes and the eq. 9 block mapping are documented in ``nsa_compressed_ref``; both backends
share them exactly. Query row i sits at position ``p = kv_len - Tq + i`` and sees compressed key j iff
``j*d + l - 1 <= p``, i.e. ``j <= (p - l + 1) // d``: a causal mask at compressed granularity, so a tile of
BLOCK_M queries sees a prefix of the keys and only its last key tiles need a mask.

- forward: FlashAttention-style, one program per (query tile, sequence × query head);
- backward: dQ per query tile; dK/dV per (key tile, query head) into fp32 per-query-head buffers that
  are then summed over the GQA group (no atomics, and 16x more programs than one per kv head: the
  first key tiles are seen by every query and would otherwise serialise the whole pass);
- selection importance, many queries: one program per (a few queries × the GQA group's heads as rows,
  sequence × kv head): the query tile is loaded once, every key tile serves all rows, the head sum is a
  reshape; with ``compressed_importance`` the same program first finds the LSE (union mode);
- selection importance, decode: one program per (query tile, sequence × kv head) recomputes the probabilities
  with the saved LSE, sums them over the group's heads, and maps each key tile to selection blocks with
  two small matrix products: the blocks the tile starts in ("own") and the spill of its last keys into
  the next tile's blocks, carried in registers so each output column is written exactly once.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import resolve_backend
from .block_sparse import (LOG2E, _bwd_delta_kernel, _finish_softmax, _masked_softmax_step, _mm, _precision,
                           _scaled_softmax_step, _strides, launch_options)
from .nsa_compressed_ref import (check_compressed_inputs, check_compression, check_importance_inputs,
                                 compressed_attention_reference, compressed_importance_reference,
                                 compressed_lse_reference, selection_importance_reference)


@triton.jit
def _visible_count(pos, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """Number of compressed keys a query at ``pos`` sees: (pos - l + 1) // d + 1, or 0 before the first block."""
    return tl.where(pos >= CMP_BLOCK - 1, (pos - CMP_BLOCK + 1) // CMP_STRIDE + 1, 0)


@triton.jit
def _cmp_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod,
    q_len, num_cmp, num_q_heads, q_offset, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, PRECISION: tl.constexpr, WITH_OUT: tl.constexpr,
):
    """WITH_OUT=False: the LSE only (union mode scores blocks with it): no V loads, no P·V, O untouched."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    hk = h // GROUP
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mrow = offs_m < q_len
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :] * sqd,
                mask=mrow[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    n_vis = tl.minimum(_visible_count(offs_m + q_offset, CMP_BLOCK, CMP_STRIDE), num_cmp)  # per row
    first_row = qb * BLOCK_M + q_offset
    last_row = tl.minimum(qb * BLOCK_M + BLOCK_M, q_len) - 1 + q_offset
    n_full = tl.minimum(_visible_count(first_row, CMP_BLOCK, CMP_STRIDE), num_cmp) // BLOCK_N  # tiles every row sees
    n_all = tl.cdiv(tl.minimum(_visible_count(last_row, CMP_BLOCK, CMP_STRIDE), num_cmp), BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in range(0, n_full):
        offs_k = j * BLOCK_N + offs_n
        k = tl.load(k_base + offs_k[None, :].to(tl.int64) * skt + offs_d[:, None] * skd)
        s = _mm(q, k, PRECISION) * qk_scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if WITH_OUT:
            v = tl.load(v_base + offs_k[:, None].to(tl.int64) * svt + offs_d[None, :] * svd)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    for j in range(n_full, n_all):
        offs_k = j * BLOCK_N + offs_n
        kmask = offs_k < num_cmp
        k = tl.load(k_base + offs_k[None, :].to(tl.int64) * skt + offs_d[:, None] * skd, mask=kmask[None, :], other=0.0)
        s = _mm(q, k, PRECISION) * qk_scale_log2
        s = tl.where(offs_k[None, :] < n_vis[:, None], s, float("-inf"))
        m_new, p, alpha = _masked_softmax_step(m_i, s)
        l_i = l_i * alpha + tl.sum(p, 1)
        if WITH_OUT:
            v = tl.load(v_base + offs_k[:, None].to(tl.int64) * svt + offs_d[None, :] * svd, mask=kmask[:, None],
                        other=0.0)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    out, lse2 = _finish_softmax(acc, m_i, l_i)  # without WITH_OUT, out is never stored (and compiled away)
    lse = lse2 * 0.6931471805599453
    if WITH_OUT:
        tl.store(O + b.to(tl.int64) * sob + h * soh + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=mrow[:, None])
    tl.store(LSE + bh.to(tl.int64) * q_len + offs_m, lse, mask=mrow)


@triton.jit
def _cmp_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod, sdb, sdt, sdh, sdd,
    q_len, num_cmp, num_q_heads, q_offset, qk_scale_log2, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    hk = h // GROUP
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mrow = offs_m < q_len
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :] * sqd,
                mask=mrow[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sob + h * soh + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :] * sod,
                 mask=mrow[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * q_len + offs_m, mask=mrow, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * q_len + offs_m, mask=mrow, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    n_vis = tl.minimum(_visible_count(offs_m + q_offset, CMP_BLOCK, CMP_STRIDE), num_cmp)
    last_row = tl.minimum(qb * BLOCK_M + BLOCK_M, q_len) - 1 + q_offset
    n_all = tl.cdiv(tl.minimum(_visible_count(last_row, CMP_BLOCK, CMP_STRIDE), num_cmp), BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j in range(0, n_all):
        offs_k = j * BLOCK_N + offs_n
        kmask = offs_k < num_cmp
        k = tl.load(k_base + offs_k[:, None].to(tl.int64) * skt + offs_d[None, :] * skd, mask=kmask[:, None], other=0.0)
        v = tl.load(v_base + offs_k[:, None].to(tl.int64) * svt + offs_d[None, :] * svd, mask=kmask[:, None], other=0.0)
        s = _mm(q, tl.trans(k), PRECISION) * qk_scale_log2
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(offs_k[None, :] < n_vis[:, None], p, 0.0)
        dp = _mm(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * sdb + h * sdh + offs_m[:, None].to(tl.int64) * sdt + offs_d[None, :] * sdd,
             dq.to(DQ.dtype.element_ty), mask=mrow[:, None])


@triton.jit
def _cmp_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod,
    sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd,
    q_len, num_cmp, num_q_heads, q_offset, qk_scale_log2, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of one key tile from one query head (written to that head's slot of the fp32 buffers)."""
    kt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    hk = h // GROUP
    offs_k = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = offs_k < num_cmp
    k = tl.load(K + b.to(tl.int64) * skb + hk * skh + offs_k[:, None].to(tl.int64) * skt + offs_d[None, :] * skd,
                mask=kmask[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + hk * svh + offs_k[:, None].to(tl.int64) * svt + offs_d[None, :] * svd,
                mask=kmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # the first query that sees key kt*BLOCK_N sits at position kt*BLOCK_N*d + l - 1
    first = tl.maximum(kt * BLOCK_N * CMP_STRIDE + CMP_BLOCK - 1 - q_offset, 0)
    q_base = Q + b.to(tl.int64) * sqb + h * sqh
    do_base = DO + b.to(tl.int64) * sob + h * soh
    stat = bh.to(tl.int64) * q_len
    for m0 in range((first // BLOCK_M) * BLOCK_M, q_len, BLOCK_M):
        offs_m = m0 + offs_m0
        mrow = offs_m < q_len
        q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :] * sqd, mask=mrow[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :] * sod, mask=mrow[:, None], other=0.0)
        lse = tl.load(LSE + stat + offs_m, mask=mrow, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + stat + offs_m, mask=mrow, other=0.0)
        n_vis = _visible_count(offs_m + q_offset, CMP_BLOCK, CMP_STRIDE)
        s_t = _mm(k, tl.trans(q), PRECISION) * qk_scale_log2
        p_t = tl.math.exp2(s_t - lse[None, :])
        p_t = tl.where(offs_k[:, None] < n_vis[None, :], p_t, 0.0)
        dv += _mm(p_t.to(do.dtype), do, PRECISION)
        dp_t = _mm(v, tl.trans(do), PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mm(ds_t.to(q.dtype), q, PRECISION)
    tl.store(DK + b.to(tl.int64) * sdkb + h * sdkh + offs_k[:, None].to(tl.int64) * sdkt + offs_d[None, :] * sdkd,
             dk * sm_scale, mask=kmask[:, None])
    tl.store(DV + b.to(tl.int64) * sdvb + h * sdvh + offs_k[:, None].to(tl.int64) * sdvt + offs_d[None, :] * sdvd,
             dv, mask=kmask[:, None])


@triton.jit
def _overlap_weights(offs_j, first_block, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
                     NUM_SEL: tl.constexpr):
    """[len(offs_j), NUM_SEL] eq. 9 weights of compressed keys offs_j onto selection blocks first_block + s."""
    blk = first_block + tl.arange(0, NUM_SEL)
    lo = tl.maximum(offs_j[:, None] * CMP_STRIDE, blk[None, :] * SEL_BLOCK)
    hi = tl.minimum(offs_j[:, None] * CMP_STRIDE + CMP_BLOCK, blk[None, :] * SEL_BLOCK + SEL_BLOCK)
    return (tl.maximum(hi - lo, 0).to(tl.float32) / CMP_STRIDE)


@triton.jit
def _tile_weights(offs_n, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
                  NUM_SEL: tl.constexpr):
    """``(w_own, w_next)``: eq. 9 weights of a key tile's keys ``offs_n`` onto its own NUM_SEL selection blocks and
    onto the next tile's. The same for every tile: tile j shifts keys and blocks by the same j * BLOCK_N * d
    tokens (BLOCK_N * d == NUM_SEL * l'), so they are found once, outside the key loop (recomputed per tile they
    were stored to shared memory twice per tile)."""
    return (_overlap_weights(offs_n, 0, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, NUM_SEL),
            _overlap_weights(offs_n, NUM_SEL, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, NUM_SEL))


@triton.jit
def _map_by_blocks(psum, carry, TOKENS: tl.constexpr, NUM_SEL: tl.constexpr, BLOCK_N: tl.constexpr,
                   CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr):
    """The eq. 9 mapping of one key tile's probabilities ``psum [TOKENS, BLOCK_N]`` where no compressed key reaches
    past the next selection block (``_maps_by_blocks``): block s's R = l'/d keys are columns s*R + r, and key r
    gives a fixed weight w0[r] to its own block and w1[r] to the next. Two weighted sums over a reshape and a shift
    of the spill by one block (a gather along the blocks), instead of [TOKENS, BLOCK_N] x [BLOCK_N, NUM_SEL]
    products. ``carry``: the previous tile's spill into this tile's block 0 (column 0, the rest 0); returns
    ``(own, carry)`` for this tile, as the general form does."""
    R: tl.constexpr = BLOCK_N // NUM_SEL
    start = tl.arange(0, R) * CMP_STRIDE  # key r's first token, relative to its block's
    w0 = tl.minimum(CMP_BLOCK, SEL_BLOCK - start).to(tl.float32) / CMP_STRIDE
    w1 = tl.maximum(start + CMP_BLOCK - SEL_BLOCK, 0).to(tl.float32) / CMP_STRIDE
    parts = tl.reshape(psum, [TOKENS, NUM_SEL, R])
    own = tl.sum(parts * w0[None, None, :], 2)
    spill = tl.sum(parts * w1[None, None, :], 2)
    s = tl.arange(0, NUM_SEL)
    before = tl.gather(spill, tl.broadcast_to(tl.maximum(s - 1, 0)[None, :], [TOKENS, NUM_SEL]), 1)
    own = own + tl.where(s[None, :] == 0, carry, before)
    last = tl.sum(tl.where(s[None, :] == NUM_SEL - 1, spill, 0.0), 1)
    return own, tl.where(s[None, :] == 0, last[:, None], 0.0)


@triton.jit
def _group_probs(Q, LSE, k, offs_m, offs_k, mrow, n_vis, b, hk, sqb, sqt, sqh, sqd, slb, slt, slh, qk_scale_log2,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] compressed-branch probabilities of key tile ``k`` summed over the group's heads."""
    offs_d = tl.arange(0, HEAD_DIM)
    vis = offs_k[None, :] < n_vis[:, None]
    psum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :] * sqd,
                    mask=mrow[:, None], other=0.0)
        lse = tl.load(LSE + b.to(tl.int64) * slb + h * slh + offs_m.to(tl.int64) * slt, mask=mrow, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        s = _mm(q, k, PRECISION) * qk_scale_log2
        psum += tl.where(vis, tl.math.exp2(s - lse[:, None]), 0.0)
    return psum


@triton.jit
def _importance_kernel(
    Q, K, LSE, IMP,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, slb, slt, slh, sib, sih, sit, sis,
    q_len, num_cmp, num_sel, num_kv_heads, q_offset, qk_scale_log2, tiles_per_split,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SEL: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (query tile, sequence × kv head, split of the output columns). Key tile j covers
    compressed keys [j*BLOCK_N, (j+1)*BLOCK_N), which start inside selection blocks [j*NUM_SEL, (j+1)*NUM_SEL)
    (BLOCK_N*d == NUM_SEL*l'); their last keys may spill into the next NUM_SEL blocks. A split owns column
    tiles [j0, j0 + tiles_per_split) and recomputes the spill of key tile j0 - 1, so every column is
    written once, with the same arithmetic whatever the split (decode splits to fill the GPU)."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, NUM_SEL)
    mrow = offs_m < q_len
    n_vis = _visible_count(offs_m + q_offset, CMP_BLOCK, CMP_STRIDE)
    last_row = tl.minimum(qb * BLOCK_M + BLOCK_M, q_len) - 1 + q_offset
    n_tiles = tl.cdiv(tl.minimum(_visible_count(last_row, CMP_BLOCK, CMP_STRIDE), num_cmp), BLOCK_N)
    j0 = split * tiles_per_split
    j1 = tl.minimum(j0 + tiles_per_split, tl.cdiv(num_sel, NUM_SEL))
    k_base = K + b.to(tl.int64) * skb + hk * skh
    imp_rows = IMP + b.to(tl.int64) * sib + hk * sih + offs_m[:, None].to(tl.int64) * sit
    w_own, w_next = _tile_weights(offs_n, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, NUM_SEL)
    carry = tl.zeros([BLOCK_M, NUM_SEL], dtype=tl.float32)
    if (j0 > 0) & (j0 - 1 < n_tiles):  # the spill of the previous split's last key tile
        offs_k = (j0 - 1) * BLOCK_N + offs_n
        k = tl.load(k_base + offs_k[None, :].to(tl.int64) * skt + offs_d[:, None] * skd, mask=offs_k[None, :] < num_cmp,
                    other=0.0)
        psum = _group_probs(Q, LSE, k, offs_m, offs_k, mrow, n_vis, b, hk, sqb, sqt, sqh, sqd, slb, slt, slh,
                            qk_scale_log2, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PRECISION)
        carry = tl.dot(psum, w_next, input_precision="ieee")
    for j in range(j0, tl.minimum(j1, n_tiles)):
        offs_k = j * BLOCK_N + offs_n
        kmask = offs_k < num_cmp
        k = tl.load(k_base + offs_k[None, :].to(tl.int64) * skt + offs_d[:, None] * skd, mask=kmask[None, :], other=0.0)
        psum = _group_probs(Q, LSE, k, offs_m, offs_k, mrow, n_vis, b, hk, sqb, sqt, sqh, sqd, slb, slt, slh,
                            qk_scale_log2, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, PRECISION)
        # fp32 products: the probabilities keep their precision (ties in top-n depend on it)
        own = tl.dot(psum, w_own, input_precision="ieee") + carry
        carry = tl.dot(psum, w_next, input_precision="ieee")
        cols = j * NUM_SEL + offs_s
        tl.store(imp_rows + cols[None, :] * sis, own, mask=mrow[:, None] & (cols[None, :] < num_sel))
    # the remaining blocks: the spill of the last tile, then zeros (blocks no query of this tile sees)
    for j in range(tl.maximum(j0, n_tiles), j1):
        cols = j * NUM_SEL + offs_s
        tl.store(imp_rows + cols[None, :] * sis, carry, mask=mrow[:, None] & (cols[None, :] < num_sel))
        carry = tl.zeros([BLOCK_M, NUM_SEL], dtype=tl.float32)


@triton.jit
def _running_lse_step(m_i, l_i, s):
    """One key tile of a running log-sum-exp without values (log2 units, masked scores at -inf): the new
    (max, sum) of each row; a row that has seen nothing keeps (-inf, 0)."""
    m_new, p, alpha = _masked_softmax_step(m_i, s)
    return m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _raw_lse_step(m_i, l_i, s, qk_scale_log2, MASKED: tl.constexpr):
    """``_running_lse_step`` on unscaled scores ``s`` (``_scaled_softmax_step``: the running max unscaled too)."""
    m_new, p, alpha = _scaled_softmax_step(m_i, s, qk_scale_log2, MASKED)
    return m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _key_tile(k_base, j, offs_n, offs_d, skt, skd, num_cmp, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """``(offs_k, k [D, BLOCK_N])``: compressed key tile ``j``; MASKED reads only keys below ``num_cmp`` (a tile that
    every row sees whole lies below it)."""
    offs_k = j * BLOCK_N + offs_n
    ptrs = k_base + offs_k[None, :].to(tl.int64) * skt + offs_d[:, None] * skd
    if MASKED:
        return offs_k, tl.load(ptrs, mask=offs_k[None, :] < num_cmp, other=0.0)
    return offs_k, tl.load(ptrs)


@triton.jit
def _head_sum(p, TOKENS: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_N: tl.constexpr, SPREAD: tl.constexpr):
    """``[TOKENS, BLOCK_N]``: the probabilities ``p [TOKENS * GROUP_P, BLOCK_N]`` summed over each token's heads, rows
    ordered as ``_packed_row_order`` puts them. SPREAD (256 rows): row bit b is axis 7 - b of a reshape, and the
    head bits are summed in HEAD_ROW_BITS order (registers first, then lanes)."""
    if SPREAD:
        x = tl.reshape(p, [2, 2, 2, 2, 2, 2, 2, 2, BLOCK_N])
        for i in tl.static_range(8):
            if GROUP_P >= (2 << i):  # head bit i is row bit HEAD_ROW_BITS[i], axis 7 - HEAD_ROW_BITS[i]
                x = tl.sum(x, 4 if i == 0 else (0 if i == 1 else (9 - i if i < 5 else 8 - i)), keep_dims=True)
        return tl.reshape(x, [TOKENS, BLOCK_N])
    return tl.sum(tl.reshape(p, [TOKENS, GROUP_P, BLOCK_N]), 1)


@triton.jit
def _importance_tile(q, k, lse2, offs_k, n_vis, carry, w_own, w_next, qk_scale_log2, TOKENS: tl.constexpr,
                     GROUP_P: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SEL: tl.constexpr, CMP_BLOCK: tl.constexpr,
                     CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr, PRECISION: tl.constexpr,
                     BY_BLOCKS: tl.constexpr, SPREAD: tl.constexpr, MASKED: tl.constexpr):
    """``(own, carry)``: one key tile's probabilities (LSE given in log2 units; +inf for rows that take no part),
    summed over heads and mapped onto its selection blocks. Without MASKED every row sees the whole tile."""
    x = _mm(q, k, PRECISION) * qk_scale_log2 - lse2[:, None]
    if MASKED:
        x = tl.where(offs_k[None, :] < n_vis[:, None], x, float("-inf"))
    psum = _head_sum(tl.math.exp2(x), TOKENS, GROUP_P, BLOCK_N, SPREAD)
    # the eq. 9 mapping: by blocks where no key reaches past the next block (12.7 ms at 64k on an H200 against 14.3
    # for the products, NOTES run 14), else as fp32 products. Written as a broadcast-multiply-sum, Triton 3.6 made
    # those TF32 tl.dots: the importance was off by 5.6e-4 and 4 % of rows picked other blocks than the fp32
    # reference at 16k; an "ieee" tl.dot is exact (NOTES run 13). Fewer than 16 tokens are too few rows for tl.dot:
    # multiply-adds, which Triton leaves as they are at that size
    if BY_BLOCKS:
        own, carry = _map_by_blocks(psum, carry, TOKENS, NUM_SEL, BLOCK_N, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK)
    elif TOKENS >= 16:
        own = tl.dot(psum, w_own, input_precision="ieee") + carry
        carry = tl.dot(psum, w_next, input_precision="ieee")
    else:
        own = tl.sum(psum[:, :, None] * w_own[None, :, :], 1) + carry
        carry = tl.sum(psum[:, :, None] * w_next[None, :, :], 1)
    return own, carry


@triton.jit
def _packed_importance_kernel(
    Q, K, LSE, IMP, ROW_TOKEN, ROW_HEAD,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, slb, slt, slh, sib, sih, sit, sis,
    q_len, num_cmp, num_sel, num_kv_heads, q_offset, qk_scale_log2,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SEL: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr, FIND_LSE: tl.constexpr, BY_BLOCKS: tl.constexpr = False, SPREAD: tl.constexpr = False,
):
    """Importance with the GQA group packed into the rows: one program per (TOKENS consecutive queries,
    sequence × kv head); row r is query ROW_TOKEN[r] of the tile and head ROW_HEAD[r] of the group
    (``_packed_row_order``; GROUP_P: GROUP rounded up to a power of two, extra rows take no part). The query tile
    is loaded once and every key tile is shared by all rows, instead of reloading each head's queries for every
    key tile (``_importance_kernel``). FIND_LSE: a first pass over the key tiles finds each row's LSE (the union
    mode needs nothing else from the compressed branch); otherwise LSE is read. The eq. 9 mapping is as in
    ``_importance_kernel`` (own blocks plus the spill carried to the next tile), each column written once.

    Both passes split the key tiles into those every row sees whole (no mask: a score then costs 4-5
    instructions, not 8-10) and the last ones, masked per row."""
    # the last query tiles first: a tile's work grows with its position (the causal mask), and the GPU starts
    # programs in order, so the longest run first and the shortest fill the end of the launch
    tb = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    ROWS: tl.constexpr = TOKENS * GROUP_P
    offs_r = tl.arange(0, ROWS)
    tok = tb * TOKENS + tl.load(ROW_TOKEN + offs_r)
    g = tl.load(ROW_HEAD + offs_r)
    rmask = (tok < q_len) & (g < GROUP)
    h = hk * GROUP + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, NUM_SEL)
    q = tl.load(Q + b.to(tl.int64) * sqb + h[:, None] * sqh + tok[:, None].to(tl.int64) * sqt + offs_d[None, :] * sqd,
                mask=rmask[:, None], other=0.0)
    n_vis = tl.where(rmask, tl.minimum(_visible_count(tok + q_offset, CMP_BLOCK, CMP_STRIDE), num_cmp), 0)
    last_tok = tl.minimum(tb * TOKENS + TOKENS, q_len) - 1 + q_offset
    n_tiles = tl.cdiv(tl.minimum(_visible_count(last_tok, CMP_BLOCK, CMP_STRIDE), num_cmp), BLOCK_N)
    # tiles every taking-part row sees whole (the first token sees the fewest keys; rows that take no part see all)
    n_full = tl.min(tl.where(rmask, n_vis, num_cmp), 0) // BLOCK_N
    k_base = K + b.to(tl.int64) * skb + hk * skh
    if FIND_LSE:
        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        for j in range(0, n_full):
            _, k = _key_tile(k_base, j, offs_n, offs_d, skt, skd, num_cmp, BLOCK_N, False)
            m_i, l_i = _raw_lse_step(m_i, l_i, _mm(q, k, PRECISION), qk_scale_log2, False)
        for j in range(n_full, n_tiles):
            offs_k, k = _key_tile(k_base, j, offs_n, offs_d, skt, skd, num_cmp, BLOCK_N, True)
            s = tl.where(offs_k[None, :] < n_vis[:, None], _mm(q, k, PRECISION), float("-inf"))
            m_i, l_i = _raw_lse_step(m_i, l_i, s, qk_scale_log2, True)
        # log2 units; +inf: nothing visible, or a row that takes no part (its scores were not masked)
        lse2 = tl.where(rmask & (l_i > 0), m_i * qk_scale_log2 + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)),
                        float("inf"))
    else:
        lse = tl.load(LSE + b.to(tl.int64) * slb + h * slh + tok.to(tl.int64) * slt, mask=rmask, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    offs_t = tb * TOKENS + tl.arange(0, TOKENS)
    tmask = offs_t < q_len
    imp_rows = IMP + b.to(tl.int64) * sib + hk * sih + offs_t[:, None].to(tl.int64) * sit
    w_own, w_next = _tile_weights(offs_n, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, NUM_SEL)
    carry = tl.zeros([TOKENS, NUM_SEL], dtype=tl.float32)
    for j in range(0, n_full):
        offs_k, k = _key_tile(k_base, j, offs_n, offs_d, skt, skd, num_cmp, BLOCK_N, False)
        own, carry = _importance_tile(q, k, lse2, offs_k, n_vis, carry, w_own, w_next, qk_scale_log2, TOKENS, GROUP_P,
                                      BLOCK_N, NUM_SEL, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, PRECISION, BY_BLOCKS, SPREAD,
                                      False)
        cols = j * NUM_SEL + offs_s
        tl.store(imp_rows + cols[None, :] * sis, own, mask=tmask[:, None] & (cols[None, :] < num_sel))
    for j in range(n_full, n_tiles):
        offs_k, k = _key_tile(k_base, j, offs_n, offs_d, skt, skd, num_cmp, BLOCK_N, True)
        own, carry = _importance_tile(q, k, lse2, offs_k, n_vis, carry, w_own, w_next, qk_scale_log2, TOKENS, GROUP_P,
                                      BLOCK_N, NUM_SEL, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, PRECISION, BY_BLOCKS, SPREAD,
                                      True)
        cols = j * NUM_SEL + offs_s
        tl.store(imp_rows + cols[None, :] * sis, own, mask=tmask[:, None] & (cols[None, :] < num_sel))
    for j in range(n_tiles, tl.cdiv(num_sel, NUM_SEL)):  # the spill of the last tile, then unseen blocks: 0
        cols = j * NUM_SEL + offs_s
        tl.store(imp_rows + cols[None, :] * sis, carry, mask=tmask[:, None] & (cols[None, :] < num_sel))
        carry = tl.zeros([TOKENS, NUM_SEL], dtype=tl.float32)


@triton.jit
def _cmp_lse_split_kernel(
    Q, K, M_PART, L_PART,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd,
    q_len, num_cmp, num_q_heads, q_offset, qk_scale_log2, tiles_per_split, part_stride,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial (running max in log2 units, sum) of the compressed softmax over one split of the key tiles,
    per (query tile, sequence × query head, split): flash-decoding for few queries; combined on the host."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // num_q_heads
    h = bh % num_q_heads
    hk = h // GROUP
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mrow = offs_m < q_len
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :] * sqd,
                mask=mrow[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    n_vis = tl.minimum(_visible_count(offs_m + q_offset, CMP_BLOCK, CMP_STRIDE), num_cmp)
    last_row = tl.minimum(qb * BLOCK_M + BLOCK_M, q_len) - 1 + q_offset
    n_all = tl.cdiv(tl.minimum(_visible_count(last_row, CMP_BLOCK, CMP_STRIDE), num_cmp), BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in range(split * tiles_per_split, tl.minimum(split * tiles_per_split + tiles_per_split, n_all)):
        offs_k = j * BLOCK_N + offs_n
        kmask = offs_k < num_cmp
        k = tl.load(k_base + offs_k[None, :].to(tl.int64) * skt + offs_d[:, None] * skd, mask=kmask[None, :], other=0.0)
        s = _mm(q, k, PRECISION) * qk_scale_log2
        s = tl.where(offs_k[None, :] < n_vis[:, None], s, float("-inf"))
        m_i, l_i = _running_lse_step(m_i, l_i, s)
    part = split.to(tl.int64) * part_stride + bh.to(tl.int64) * q_len + offs_m
    tl.store(M_PART + part, m_i, mask=mrow)
    tl.store(L_PART + part, l_i, mask=mrow)


@triton.jit
def _merge_lse_parts_kernel(M_PART, L_PART, LSE, n_rows, splits, BLOCK: tl.constexpr):
    """LSE (natural log) of rows from ``splits`` partial (max in log2 units, sum) pairs: one launch where the
    host form took six (each a graph node in decode)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n_rows
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for i in range(splits):
        m = tl.maximum(m, tl.load(M_PART + i * n_rows + rows, mask=mask, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK], tl.float32)
    for i in range(splits):
        part_m = tl.load(M_PART + i * n_rows + rows, mask=mask, other=float("-inf"))
        part_l = tl.load(L_PART + i * n_rows + rows, mask=mask, other=0.0)
        total += tl.where(part_m == float("-inf"), 0.0, part_l * tl.exp2(part_m - m_safe))
    lse = tl.where(total > 0, (m_safe + tl.log2(tl.where(total > 0, total, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + rows, lse, mask=mask)


# ----------------------------------------------------------------------------- host side
# Benchmarks may pin launch settings per kernel ("fwd", "dq", "dkdv", "importance", "packed_importance"):
# {"fwd": (warps, stages)} or (warps, stages, register cap per thread),
# and tile sizes: {"fwd": (block_m, block_n), ...}.
LAUNCH_OVERRIDES: dict = {}
TILE_OVERRIDES: dict = {}


def _tiles(kernel: str, device: torch.device) -> tuple:
    return TILE_OVERRIDES.get(kernel, (64, 64))


def _tuning(kernel: str, head_dim: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    if kernel in LAUNCH_OVERRIDES:
        return launch_options(*LAUNCH_OVERRIDES[kernel])
    if kernel == "fwd":
        return dict(num_warps=8 if head_dim >= 128 else 4, num_stages=3)
    return dict(num_warps=4, num_stages=2)


def compressed_forward(q, k_cmp, v_cmp, cmp_block: int, cmp_stride: int, scale: float, kv_len: int,
                       with_out: bool = True):
    """``(out [B, Tq, HQ, D], lse [B, HQ, Tq] float32)``; ``with_out=False``: ``(None, lse)`` (v_cmp unused)."""
    b, tq, hq, d = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if with_out else q
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    bm, bn = _tiles("fwd", q.device)
    _cmp_fwd_kernel[(triton.cdiv(tq, bm), b * hq)](
        q, k_cmp, v_cmp, out, lse, *_strides(q), *_strides(k_cmp), *_strides(v_cmp), *_strides(out),
        tq, nc, hq, kv_len - tq, scale * LOG2E, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn,
        CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride, PRECISION=_precision(q.dtype, q.device), WITH_OUT=with_out,
        **_tuning("fwd", d, q.device))
    return (out if with_out else None), lse


def compressed_lse_split(q, k_cmp, cmp_block: int, cmp_stride: int, scale: float, kv_len: int, splits: int):
    """LSE ``[B, HQ, Tq]`` from ``splits`` partial passes over the key tiles (flash-decoding), combined here.
    Equal to the single pass up to float rounding (the sums are grouped differently)."""
    b, tq, hq, d = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    bm, bn = (16 if tq <= 16 else 64), _tiles("fwd", q.device)[1]
    tiles = triton.cdiv(nc, bn)
    splits = max(1, min(splits, tiles))
    per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, per_split)
    m_part = torch.empty(splits, b * hq, tq, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    _cmp_lse_split_kernel[(triton.cdiv(tq, bm), b * hq, splits)](
        q, k_cmp, m_part, l_part, *_strides(q), *_strides(k_cmp), tq, nc, hq, kv_len - tq, scale * LOG2E, per_split,
        b * hq * tq, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride,
        PRECISION=_precision(q.dtype, q.device), **_tuning("lse_split", d, q.device))
    n_rows = b * hq * tq
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    _merge_lse_parts_kernel[(triton.cdiv(n_rows, 128),)](m_part, l_part, lse, n_rows, splits, BLOCK=128)
    return lse


def compressed_backward(do, q, k_cmp, v_cmp, out, lse, cmp_block: int, cmp_stride: int, scale: float, kv_len: int):
    b, tq, hq, d = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    group = hq // hkv
    delta = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(tq, 64), b * hq)](out, do, delta, *_strides(out), *_strides(do), tq, hq,
                                                      HEAD_DIM=d, BLOCK=64)
    common = dict(GROUP=group, HEAD_DIM=d, CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride,
                  PRECISION=_precision(q.dtype, q.device))
    dq = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device)
    bm, bn = _tiles("dq", q.device)
    _cmp_bwd_dq_kernel[(triton.cdiv(tq, bm), b * hq)](
        q, k_cmp, v_cmp, do, lse, delta, dq, *_strides(q), *_strides(k_cmp), *_strides(v_cmp), *_strides(do),
        *_strides(dq), tq, nc, hq, kv_len - tq, scale * LOG2E, scale, BLOCK_M=bm, BLOCK_N=bn, **common,
        **_tuning("dq", d, q.device))
    dk_h = torch.empty(b, nc, hq, d, dtype=torch.float32, device=q.device)  # one slot per query head
    dv_h = torch.empty_like(dk_h)
    bm, bn = _tiles("dkdv", q.device)
    _cmp_bwd_dkdv_kernel[(triton.cdiv(nc, bn), b * hq)](
        q, k_cmp, v_cmp, do, lse, delta, dk_h, dv_h, *_strides(q), *_strides(k_cmp), *_strides(v_cmp), *_strides(do),
        *_strides(dk_h), *_strides(dv_h), tq, nc, hq, kv_len - tq, scale * LOG2E, scale, BLOCK_M=bm, BLOCK_N=bn,
        **common, **_tuning("dkdv", d, q.device))
    dk = dk_h.view(b, nc, hkv, group, d).sum(3).to(k_cmp.dtype)
    dv = dv_h.view(b, nc, hkv, group, d).sum(3).to(v_cmp.dtype)
    return dq, dk, dv


class _CompressedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, kv_len):
        out, lse = compressed_forward(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, kv_len)
        ctx.save_for_backward(q, k_cmp, v_cmp, out, lse)
        ctx.args = (cmp_block, cmp_stride, scale, kv_len)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k_cmp, v_cmp, out, lse = ctx.saved_tensors
        dq, dk, dv = compressed_backward(do, q, k_cmp, v_cmp, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


@torch.compiler.disable
def compressed_attention_triton(q, k_cmp, v_cmp, *, cmp_block: int, cmp_stride: int, scale: Optional[float] = None,
                                kv_len: Optional[int] = None):
    """Triton version of ``compressed_attention_reference`` (LSE returned as a ``[B, Tq, HQ]`` view)."""
    scale, kv_len = check_compressed_inputs(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, kv_len)
    if k_cmp.shape[1] == 0:
        return compressed_attention_reference(q, k_cmp, v_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                              scale=scale, kv_len=kv_len)
    out, lse = _CompressedAttention.apply(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, kv_len)
    return out, lse.transpose(1, 2)


@torch.compiler.disable
@torch.no_grad()
def compressed_lse_triton(q, k_cmp, *, cmp_block: int, cmp_stride: int, scale: Optional[float] = None,
                          kv_len: Optional[int] = None, splits: int = 1):
    """Triton version of ``compressed_lse_reference``: the forward without P·V and without V loads."""
    scale, kv_len = check_compressed_inputs(q, k_cmp, k_cmp, cmp_block, cmp_stride, scale, kv_len)
    if k_cmp.shape[1] == 0:
        return compressed_lse_reference(q, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, scale=scale, kv_len=kv_len)
    if splits > 1:
        lse = compressed_lse_split(q, k_cmp, cmp_block, cmp_stride, scale, kv_len, splits)
    else:
        _, lse = compressed_forward(q, k_cmp, k_cmp, cmp_block, cmp_stride, scale, kv_len, with_out=False)
    return lse.transpose(1, 2)


# More queries than this take the packed importance kernel (query tiles of several tokens × the group's
# heads); fewer (decode) the per-head kernel, whose output columns can be split over programs.
PACKED_MIN_QUERIES = 16
# Rows (tokens × padded group heads) per program of the packed importance kernel (H100 sweep at 16k, 64/4:
# 256 rows/8 warps 1.24 ms, 64/4 1.25, 128/4 1.65, 128/8 2.28; the LSE + per-head chain 2.00; H200 at 64k:
# 256/4 15.3 ms, 256/8 17.8, 256/16 19.8, 128/4 24.1).
PACKED_ROWS = 256
# (warps, stages[, register cap per thread]) of the packed importance kernel. Uncapped, ptxas gives 4 warps all 255
# registers and 8 warps 166: two programs of 4 warps or one of 8 per SM, and 8 warps were the slower (17.8 against
# 15.3 ms, NOTES run 12). Capped at 128 (8 bytes spilled), two programs of 8 warps fit: 14.7 ms against 15.2 for 4
# warps at 64k, 64/4, on an H200 (run 13); with run 14's mapping by blocks 56 bytes spill at 128 (12.7 ms). Register
# counts are Triton 3.6's (the GPU image's; 3.9 spills none): check them again with benchmarks/inspect_kernel.py
# when Triton changes.
PACKED_LAUNCH = (8, 2, 128)


def _importance_tiling(cmp_block: int, cmp_stride: int, block: int):
    """``(block_n, num_sel)``: a key tile of block_n compressed keys starts in num_sel selection blocks
    (num_sel >= 16 for tl.dot, block_n >= 64 for efficiency); None where a key would spill past the next
    tile's blocks (not tiled: the reference runs)."""
    block_n = max(64, 16 * block // cmp_stride)
    num_sel = block_n * cmp_stride // block
    return None if cmp_block - cmp_stride > num_sel * block else (block_n, num_sel)


def _maps_by_blocks(cmp_block: int, cmp_stride: int, block: int) -> bool:
    """Whether ``_map_by_blocks`` applies: no key reaches past the next selection block (l <= l' + d). A block's
    l'/d keys are the reshape's last axis: at least one and a power of two (always so under ``check_compression``,
    checked again since the kernel's shapes depend on it)."""
    keys = block // cmp_stride
    return MAPPING_BY_BLOCKS and cmp_block <= block + cmp_stride and keys >= 1 and keys & (keys - 1) == 0


# The packed kernel's eq. 9 mapping by reshape-sums and a one-block shift where it applies (False: the general
# [tokens, keys] x [keys, blocks] products everywhere).
MAPPING_BY_BLOCKS = True


def _packed_importance(q, k_cmp, lse, cmp_block, cmp_stride, block, scale, kv_len, block_n, num_sel):
    """``[B, HKV, Tq, NSEL]`` from ``_packed_importance_kernel``; ``lse`` None: the kernel finds it."""
    b, tq, hq, d = q.shape
    hkv = k_cmp.shape[2]
    imp = torch.empty(b, hkv, tq, -(-kv_len // block), dtype=torch.float32, device=q.device)
    group = hq // hkv
    group_p = triton.next_power_of_2(group)
    # a fine compression (small cmp_stride) widens the key tile to keep 16 selection blocks per tile: fewer
    # rows then keep the score tile (rows x block_n) within shared memory (256 x 256 needs 256 KiB on an H100)
    rows = PACKED_ROWS if block_n <= 128 else max(16, PACKED_ROWS * 128 // block_n)
    tokens = max(1, rows // group_p)
    lse_args = _strides(lse) if lse is not None else (0, 0, 0)
    launch = launch_options(*LAUNCH_OVERRIDES.get("packed_importance", PACKED_LAUNCH))
    spread = SPREAD_HEADS and tokens * group_p == 256
    row_token, row_head = _packed_row_order(tokens, group_p, spread, q.device)
    _packed_importance_kernel[(triton.cdiv(tq, tokens), b * hkv)](
        q, k_cmp, lse if lse is not None else q, imp, row_token, row_head, *_strides(q), *_strides(k_cmp), *lse_args,
        *_strides(imp),
        tq, k_cmp.shape[1], imp.shape[-1], hkv, kv_len - tq, scale * LOG2E, GROUP=group, GROUP_P=group_p,
        TOKENS=tokens, HEAD_DIM=d, BLOCK_N=block_n, NUM_SEL=num_sel, CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride,
        SEL_BLOCK=block, PRECISION=_precision(q.dtype, q.device), FIND_LSE=lse is None,
        BY_BLOCKS=_maps_by_blocks(cmp_block, cmp_stride, block), SPREAD=spread,
        **(launch if q.device.type == "cuda" else {}))
    return imp


# Which row bits of a 256-row packed importance tile hold a token's heads, in the order they are summed. On Hopper
# (8 warps, wgmma m64 tiles, Triton 3.6) a thread holds rows whose bits 3 and 7 differ, the lanes of a quad spread
# bits 0-2 and the warps bits 4-6: with the heads on bits 3, 7, 0, 1 (a group of 16) the head sum is two adds in
# registers and two shuffle rounds on a quarter of the values, against one add and three rounds on half of them in
# token-major order (131 shuffles per thread and key tile; NOTES run 16). Any order gives the same sums.
HEAD_ROW_BITS = (3, 7, 0, 1, 2, 4, 5, 6)
# _head_sum sums these bits as axes 7 - bit of its reshape, in this order, by a formula: they must agree
assert [7 - bit for bit in HEAD_ROW_BITS] == [4 if i == 0 else 0 if i == 1 else 9 - i if i < 5 else 8 - i
                                              for i in range(8)]
# False: rows in token-major order (row = token * GROUP_P + head) at every size.
SPREAD_HEADS = True
_ROW_ORDERS: dict = {}


def _packed_row_order(tokens: int, group_p: int, spread: bool, device: torch.device):
    """``(row_token, row_head)`` int32 ``[tokens * group_p]``: which token of the tile and which head of the group each
    row of ``_packed_importance_kernel`` holds. Spread (256 rows): head bit i is row bit HEAD_ROW_BITS[i] and the token
    takes the other bits in ascending order, as ``_head_sum`` sums them; else token-major."""
    key = (tokens, group_p, spread, device)
    if key not in _ROW_ORDERS:
        rows = torch.arange(tokens * group_p)
        if spread:
            head_bits = HEAD_ROW_BITS[:group_p.bit_length() - 1]
            token_bits = [bit for bit in range(8) if bit not in head_bits]
            head = sum(((rows >> bit) & 1) << i for i, bit in enumerate(head_bits)) if head_bits else rows * 0
            token = sum(((rows >> bit) & 1) << i for i, bit in enumerate(token_bits)) if token_bits else rows * 0
        else:
            token, head = rows // group_p, rows % group_p
        _ROW_ORDERS[key] = (token.to(torch.int32).to(device), head.to(torch.int32).to(device))
    return _ROW_ORDERS[key]


@torch.compiler.disable
@torch.no_grad()
def compressed_importance_triton(q, k_cmp, *, cmp_block: int, cmp_stride: int, block: int,
                                 scale: Optional[float] = None, kv_len: int):
    """Triton version of ``compressed_importance_reference``: one kernel finds the compressed LSE and the
    importance, queries and heads of a GQA group packed into the rows (no LSE written)."""
    scale, kv_len = check_compressed_inputs(q, k_cmp, k_cmp, cmp_block, cmp_stride, scale, kv_len)
    check_compression(cmp_block, cmp_stride, block)
    tiling = _importance_tiling(cmp_block, cmp_stride, block)
    if q.shape[1] <= PACKED_MIN_QUERIES or tiling is None or k_cmp.shape[1] == 0:
        # decode: one program per query head walks all compressed keys alone (55 us of a 122 us step at 64k on
        # an H200, benchmarks/NOTES.md run 8). DECODE_LSE_SPLITS > 1 splits them over programs (merged by
        # _merge_lse_parts_kernel); off by default until it has been timed and checked on a GPU
        programs = triton.cdiv(q.shape[1], 16) * q.shape[0] * q.shape[2]
        few = q.device.type == "cuda" and DECODE_LSE_SPLITS > 1 and programs < IMPORTANCE_MIN_PROGRAMS
        splits = DECODE_LSE_SPLITS if few else 1
        lse = compressed_lse_triton(q, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, scale=scale, kv_len=kv_len,
                                    splits=splits)
        return selection_importance_triton(q, k_cmp, lse, cmp_block=cmp_block, cmp_stride=cmp_stride, block=block,
                                           scale=scale, kv_len=kv_len)
    return _packed_importance(q, k_cmp, None, cmp_block, cmp_stride, block, scale, kv_len, *tiling)


# Decode has few query rows: split the importance's output columns over programs until about this many
# programs run (the arithmetic per column is the same whatever the split, so results are identical).
IMPORTANCE_MIN_PROGRAMS = 512
# Key splits of the compressed LSE in decode (1: the single pass, the only form checked on a GPU so far).
DECODE_LSE_SPLITS = 1


@torch.compiler.disable
@torch.no_grad()
def selection_importance_triton(q, k_cmp, lse, *, cmp_block: int, cmp_stride: int, block: int,
                                scale: Optional[float] = None, kv_len: int, splits: Optional[int] = None):
    """Triton version of ``selection_importance_reference``; ``splits``: programs per (query tile, kv head)
    over the output columns (default: enough to keep about IMPORTANCE_MIN_PROGRAMS programs busy)."""
    scale = check_importance_inputs(q, k_cmp, lse, cmp_block, cmp_stride, block, scale, kv_len)
    b, tq, hq, d = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    nsel = -(-kv_len // block)
    if nc == 0:
        return torch.zeros(b, hkv, tq, nsel, dtype=torch.float32, device=q.device)
    tiling = _importance_tiling(cmp_block, cmp_stride, block)
    if tiling is None:
        return selection_importance_reference(q, k_cmp, lse, cmp_block=cmp_block, cmp_stride=cmp_stride, block=block,
                                              scale=scale, kv_len=kv_len)
    block_n, num_sel = tiling
    if tq > PACKED_MIN_QUERIES:
        return _packed_importance(q, k_cmp, lse, cmp_block, cmp_stride, block, scale, kv_len, block_n, num_sel)
    imp = torch.empty(b, hkv, tq, nsel, dtype=torch.float32, device=q.device)
    bm, _ = _tiles("importance", q.device)
    if tq <= 16 and "importance" not in TILE_OVERRIDES:
        bm = 16  # decode: one query row, the smallest tl.dot tile
    col_tiles = triton.cdiv(nsel, num_sel)
    programs = triton.cdiv(tq, bm) * b * hkv
    if splits is None:  # only on the GPU: the interpreter gains nothing from more programs
        few = q.device.type == "cuda" and programs < IMPORTANCE_MIN_PROGRAMS
        splits = triton.cdiv(IMPORTANCE_MIN_PROGRAMS, programs) if few else 1
    per_split = triton.cdiv(col_tiles, max(1, min(splits, col_tiles)))
    _importance_kernel[(triton.cdiv(tq, bm), b * hkv, triton.cdiv(col_tiles, per_split))](
        q, k_cmp, lse, imp, *_strides(q), *_strides(k_cmp), *_strides(lse), *_strides(imp),
        tq, nc, nsel, hkv, kv_len - tq, scale * LOG2E, per_split, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=block_n,
        NUM_SEL=num_sel, CMP_BLOCK=cmp_block, CMP_STRIDE=cmp_stride, SEL_BLOCK=block,
        PRECISION=_precision(q.dtype, q.device), **_tuning("importance", d, q.device))
    return imp


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, *, cmp_block: int, cmp_stride: int,
                         scale: Optional[float] = None, kv_len: Optional[int] = None, backend: str = "auto"):
    """Attention of ``q [B, Tq, HQ, D]`` over compressed keys/values ``[B, NC, HKV, D]``, causal at compressed
    granularity (query at position p sees key j iff ``j*cmp_stride + cmp_block - 1 <= p``).

    Returns ``(out [B, Tq, HQ, D], lse [B, Tq, HQ] float32)``; differentiable in q, k_cmp, v_cmp.
    ``kv_len`` is the uncompressed key length (default Tq); queries sit at ``kv_len - Tq .. kv_len - 1``.
    """
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        return compressed_attention_triton(q, k_cmp, v_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, scale=scale,
                                           kv_len=kv_len)
    return compressed_attention_reference(q, k_cmp, v_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                          scale=scale, kv_len=kv_len)


def compressed_lse(q: torch.Tensor, k_cmp: torch.Tensor, *, cmp_block: int, cmp_stride: int,
                   scale: Optional[float] = None, kv_len: Optional[int] = None, splits: int = 1,
                   backend: str = "auto") -> torch.Tensor:
    """Only the LSE ``[B, Tq, HQ]`` float32 of ``compressed_attention`` (what ``union`` needs to score blocks):
    no values read, no output written, no gradient. ``splits > 1`` (Triton) divides the key range over that
    many programs per (query tile, head) and combines partial sums, for decode's few queries; equal to the
    single pass up to rounding. Identical to ``compressed_attention(...)[1]`` with ``splits=1``."""
    backend = resolve_backend(backend, q.device)
    if not isinstance(splits, int) or isinstance(splits, bool) or splits < 1:
        raise ValueError(f"splits must be a positive integer, got {splits!r}")
    if backend == "triton":
        return compressed_lse_triton(q, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, scale=scale, kv_len=kv_len,
                                     splits=splits)
    return compressed_lse_reference(q, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, scale=scale, kv_len=kv_len)


def selection_importance(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, *, cmp_block: int, cmp_stride: int,
                         block: int, scale: Optional[float] = None, kv_len: int, backend: str = "auto",
                         splits: Optional[int] = None) -> torch.Tensor:
    """Importance ``[B, HKV, Tq, ceil(kv_len / block)]`` float32 of each selection block for each query:
    the compressed-branch probabilities (recomputed from ``lse`` of ``compressed_attention``) summed over
    the GQA group's query heads and mapped to blocks of ``block`` tokens (eq. 9). No gradient.
    ``splits`` (Triton): programs per (query tile, kv head) over the output columns; the default fills
    the GPU when there are few query rows (decode). The result does not depend on it."""
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        return selection_importance_triton(q, k_cmp, lse, cmp_block=cmp_block, cmp_stride=cmp_stride, block=block,
                                           scale=scale, kv_len=kv_len, splits=splits)
    return selection_importance_reference(q, k_cmp, lse, cmp_block=cmp_block, cmp_stride=cmp_stride, block=block,
                                          scale=scale, kv_len=kv_len)


def compressed_importance(q: torch.Tensor, k_cmp: torch.Tensor, *, cmp_block: int, cmp_stride: int, block: int,
                          scale: Optional[float] = None, kv_len: int, backend: str = "auto") -> torch.Tensor:
    """``selection_importance`` with the LSE of ``compressed_lse`` found on the way (what ``union`` needs from
    the compressed branch): in Triton one kernel, the LSE never written. No gradient."""
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        return compressed_importance_triton(q, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, block=block,
                                            scale=scale, kv_len=kv_len)
    return compressed_importance_reference(q, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, block=block,
                                           scale=scale, kv_len=kv_len)


__all__ = ["compressed_attention", "compressed_lse", "selection_importance", "compressed_importance",
           "compressed_attention_triton", "compressed_lse_triton", "selection_importance_triton",
           "compressed_importance_triton"]
