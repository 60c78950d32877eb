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
- ``token_decode_triton``: the whole per-token-selection step for ONE new query per sequence in three
  launches (``nsa.nsa_from_compressed`` takes it when it can). (1) ``_token_scores_window_kernel``: the
  compressed keys split into tiles, one program each, rows = the group's heads; each writes its tile's
  partial LSE (max, sum) and each head's eq. 9 mass of the tile's selection blocks relative to that max,
  so the compressed keys are read once (no separate LSE pass); beside them, the window's parts. (2)
  ``_token_select_attend_kernel``: one program per selected slot merges the LSE, rescales and sums the
  masses over heads, finds the top-n (``nsa_topk.top_n_mask``) and attends to its slot's block. (3)
  ``_combine_kernel`` (union: one softmax over all parts) or ``_gated_token_combine_kernel`` (gated: the
  compressed branch from the scoring splits, which then also carry P·V, the selected and window branches
  from their parts, and the gates). The general decode chain took about ten launches, several of them one serial
  program per head (122 us at 64k on an H200, benchmarks/NOTES.md run 8).
- The compressed side of the general chain has its decode forms in ``nsa_compressed``:
  ``compressed_lse(..., splits=S)`` and ``selection_importance`` (its default splits the output columns
  when there are few query rows).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import resolve_backend
from .block_sparse import LOG2E, _masked_softmax_step, _mm, _precision, _strides, launch_options
from .nsa_compressed import _importance_tiling, _overlap_weights, _visible_count
from .nsa_compressed_ref import check_compressed_inputs
from .nsa_selected_ref import check_selected_inputs, selected_attention_reference
from .nsa_topk import ranking_keys, top_n_mask


@triton.jit
def _attend_span(q, k_base, v_base, start, last, n_sub, skt, skd, svt, svd, qk_scale_log2,
                 ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Partial softmax (max in log2 units, sum, unnormalised output) of the query rows ``q [ROWS, HEAD_DIM]`` over
    the keys ``start .. last`` (at most ``n_sub`` tiles of BLOCK_N from ``start``); (-inf, 0, 0) when the span is
    empty. The caller loads q, so that its latency overlaps whatever comes before (the top-n in decode)."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    if start <= last:
        for c in range(0, n_sub):
            offs_k = start + c * BLOCK_N + offs_n
            kmask = (offs_k <= last) & (offs_k >= 0)
            k = tl.load(k_base + offs_k[None, :].to(tl.int64) * skt + offs_d[:, None] * skd, mask=kmask[None, :], other=0.0)
            s = _mm(q, k, PRECISION) * qk_scale_log2
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_new, p, alpha = _masked_softmax_step(m_i, s)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_k[:, None].to(tl.int64) * svt + offs_d[None, :] * svd, mask=kmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)
            m_i = m_new
    return m_i, l_i, acc


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
    rmask = offs_r < GROUP
    heads = hk * GROUP + offs_r
    pos = q_offset + i
    # a selected slot owns its block's keys up to p - window (later ones are the window's, or the future);
    # a window chunk owns BLOCK_N of the keys p - window < t <= p
    is_slot = part < n_slots
    blk = tl.load(IDX + b.to(tl.int64) * sib + hk.to(tl.int64) * sih + i.to(tl.int64) * sit
                  + tl.minimum(part, n_slots - 1) * sin)
    blk = blk.to(tl.int32)
    slot_start = tl.where(blk >= 0, blk * BLOCK, pos + 1)  # an unused slot sees nothing
    start = tl.where(is_slot, slot_start, pos - WINDOW + 1 + (part - n_slots) * BLOCK_N)
    last = tl.where(is_slot, pos - WINDOW, pos)
    n_sub = tl.where(is_slot, BLOCK // BLOCK_N, 1)
    q = tl.load(Q + b.to(tl.int64) * sqb + i.to(tl.int64) * sqt + heads[:, None] * sqh + offs_d[None, :] * sqd,
                mask=rmask[:, None], other=0.0)
    m_i, l_i, acc = _attend_span(q, K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh,
                                 V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh, start, last, n_sub, skt, skd, svt,
                                 svd, qk_scale_log2, ROWS, HEAD_DIM, BLOCK_N, PRECISION)
    _store_part(M_PART, L_PART, ACC, ((part.to(tl.int64) * batch + b) * q_len + i) * num_q_heads + heads, rmask,
                m_i, l_i, acc, HEAD_DIM)


@triton.jit
def _store_part(M_PART, L_PART, ACC, row, rmask, m_i, l_i, acc, HEAD_DIM: tl.constexpr):
    """A part's partial softmax into the buffers [part, b, t, hq] and [part, b, t, hq, d] that _combine_kernel
    merges (``row`` = ((part * B + b) * Tq + t) * HQ + head)."""
    tl.store(M_PART + row, m_i, mask=rmask)
    tl.store(L_PART + row, l_i, mask=rmask)
    tl.store(ACC + row[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], acc, mask=rmask[:, None])


@triton.jit
def _merge_parts(M, L, ACC, n, stride, acc_stride, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr):
    """Merge ``n`` partial softmaxes (max in log2 units at ``M + i*stride``, sum at ``L + i*stride``, unnormalised
    output at ``ACC + i*acc_stride``) of one row, CHUNK at a time: ``(out [HEAD_DIM] float32, lse)`` (natural log;
    0 and -inf when nothing was seen)."""
    offs = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    m_run = tl.full([], float("-inf"), tl.float32)
    l_run = tl.zeros([], tl.float32)
    acc_run = tl.zeros([HEAD_DIM], tl.float32)
    for c0 in range(0, n, CHUNK):
        idx = (c0 + offs).to(tl.int64)
        mask = idx < n
        m = tl.load(M + idx * stride, mask=mask, other=float("-inf"))
        l = tl.load(L + idx * stride, mask=mask, other=0.0)
        acc = tl.load(ACC + idx[:, None] * acc_stride + offs_d[None, :], mask=mask[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(m - m_safe)
        alpha = tl.math.exp2(m_run - m_safe)
        l_run = l_run * alpha + tl.sum(w * l, 0)
        acc_run = acc_run * alpha + tl.sum(acc * w[:, None], 0)
        m_run = m_new
    t_safe = tl.where(l_run == 0.0, 1.0, l_run)
    m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
    lse = tl.where(l_run == 0.0, float("-inf"), (m_safe + tl.math.log2(t_safe)) * 0.6931471805599453)
    return acc_run / t_safe, lse


@triton.jit
def _combine_kernel(M_PART, L_PART, ACC, O, LSE, n_parts, n_rows, sob, sot, soh, sod, q_len, num_q_heads,
                    PARTS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program per (b, t, hq) row: merge the parts' partial softmaxes into the output and LSE."""
    r = tl.program_id(0)
    out, lse = _merge_parts(M_PART + r, L_PART + r, ACC + r.to(tl.int64) * HEAD_DIM, n_parts, n_rows,
                            n_rows * HEAD_DIM, HEAD_DIM, PARTS)
    h = r % num_q_heads
    bt = r // num_q_heads
    t = bt % q_len
    b = bt // q_len
    tl.store(O + b.to(tl.int64) * sob + t.to(tl.int64) * sot + h * soh + tl.arange(0, HEAD_DIM) * sod,
             out.to(O.dtype.element_ty))
    tl.store(LSE + r, lse)


@triton.jit
def _gated_token_combine_kernel(
    M_PART, L_PART, ACC, M_SPLIT, L_SPLIT, ACC_CMP, G, O, O_BRANCH, LSE_BRANCH,
    sgb, sgh, sgc, n_rows, n_splits, num_q_heads, num_kv_heads,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, TOP_N: tl.constexpr, N_WIN: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program per (b, hq) row of one decode token: the three branches' softmaxes merged from their parts
    (compressed: the scoring splits; selected: the slots; window: the window chunks), then
    ``g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`` in float32. O_BRANCH [3, B*HQ, D] and LSE_BRANCH [3, B*HQ] keep
    the branches (cmp, slc, win) for aux."""
    r = tl.program_id(0)
    b = r // num_q_heads
    h = r % num_q_heads
    bh = b * num_kv_heads + h // GROUP
    at_cmp = bh.to(tl.int64) * n_splits * GROUP_P + h % GROUP
    o_cmp, lse_cmp = _merge_parts(M_SPLIT + at_cmp, L_SPLIT + at_cmp, ACC_CMP + at_cmp * HEAD_DIM, n_splits, GROUP_P,
                                  GROUP_P * HEAD_DIM, HEAD_DIM, CHUNK)
    o_slc, lse_slc = _merge_parts(M_PART + r, L_PART + r, ACC + r.to(tl.int64) * HEAD_DIM, TOP_N, n_rows,
                                  n_rows * HEAD_DIM, HEAD_DIM, CHUNK)
    at_win = TOP_N * n_rows + r.to(tl.int64)
    o_win, lse_win = _merge_parts(M_PART + at_win, L_PART + at_win, ACC + at_win * HEAD_DIM, N_WIN, n_rows,
                                  n_rows * HEAD_DIM, HEAD_DIM, CHUNK)
    g = G + b.to(tl.int64) * sgb + h * sgh
    out = (tl.load(g).to(tl.float32) * o_cmp + tl.load(g + sgc).to(tl.float32) * o_slc
           + tl.load(g + 2 * sgc).to(tl.float32) * o_win)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(O + r.to(tl.int64) * HEAD_DIM + offs_d, out.to(O.dtype.element_ty))
    row = r.to(tl.int64) * HEAD_DIM + offs_d
    tl.store(O_BRANCH + row, o_cmp.to(O_BRANCH.dtype.element_ty))
    tl.store(O_BRANCH + n_rows * HEAD_DIM + row, o_slc.to(O_BRANCH.dtype.element_ty))
    tl.store(O_BRANCH + 2 * n_rows * HEAD_DIM + row, o_win.to(O_BRANCH.dtype.element_ty))
    tl.store(LSE_BRANCH + r, lse_cmp)
    tl.store(LSE_BRANCH + n_rows + r, lse_slc)
    tl.store(LSE_BRANCH + 2 * n_rows + r, lse_win)


# ----------------------------------------------------------------------------- one token in three launches
@triton.jit
def _token_scores(Q, KC, VC, M_SPLIT, L_SPLIT, MASS, ACC_CMP, b, hk, bh, split, sqb, sqh, sqd, skb, skt, skh, skd,
                  svb, svt, svh, svd, num_cmp, pos, qk_scale_log2, n_splits, nsel_pad, GROUP: tl.constexpr,
                  GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SEL: tl.constexpr,
                  SPILL_P: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
                  PRECISION: tl.constexpr, GATED: tl.constexpr):
    """Split ``split`` scores compressed key tile ``split`` (keys [split*BLOCK_N, +BLOCK_N), which start in selection
    blocks [split*NUM_SEL, +NUM_SEL)) and the SPILL_P keys before it (the previous tile's last keys reach into
    these blocks when l > d), rows = the group's heads, against one reference m per head. It writes m, the
    tile's own sum of exp2(s - m) (a partial of the compressed LSE) and each head's eq. 9 mass of its NUM_SEL
    blocks relative to m; the selection rescales the masses by exp2(m - lse) once the LSE is known. One pass
    over the compressed keys, instead of an LSE pass and a scoring pass. GATED: also the tile's unnormalised
    compressed-branch output (P·V over the compressed values), merged by ``_gated_token_combine_kernel``."""
    offs_g = tl.arange(0, GROUP_P)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, NUM_SEL)
    q = tl.load(Q + b.to(tl.int64) * sqb + (hk * GROUP + offs_g)[:, None] * sqh + offs_d[None, :] * sqd,
                mask=(offs_g < GROUP)[:, None], other=0.0)
    n_vis = tl.minimum(_visible_count(pos, CMP_BLOCK, CMP_STRIDE), num_cmp)
    k_base = KC + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    offs_k = split * BLOCK_N + tl.arange(0, BLOCK_N)
    own = offs_k < n_vis
    k = tl.load(k_base + offs_k[None, :].to(tl.int64) * skt + offs_d[:, None] * skd, mask=own[None, :], other=0.0)
    s = tl.where(own[None, :], _mm(q, k, PRECISION) * qk_scale_log2, float("-inf"))
    m = tl.max(s, 1)
    if SPILL_P > 0:
        offs_p = split * BLOCK_N - SPILL_P + tl.arange(0, SPILL_P)
        prev = (offs_p >= 0) & (offs_p < n_vis)
        kp = tl.load(k_base + offs_p[None, :].to(tl.int64) * skt + offs_d[:, None] * skd, mask=prev[None, :], other=0.0)
        sp = tl.where(prev[None, :], _mm(q, kp, PRECISION) * qk_scale_log2, float("-inf"))
        m = tl.maximum(m, tl.max(sp, 1))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.math.exp2(s - m_safe[:, None])
    # fp32 products: the masses keep their precision (ties in top-n depend on it)
    w_own = _overlap_weights(offs_k, split * NUM_SEL, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, NUM_SEL)
    mass = tl.dot(p, w_own, input_precision="ieee")
    if SPILL_P > 0:
        w_spill = _overlap_weights(offs_p, split * NUM_SEL, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, NUM_SEL)
        mass += tl.dot(tl.math.exp2(sp - m_safe[:, None]), w_spill, input_precision="ieee")
    at = (bh.to(tl.int64) * n_splits + split) * GROUP_P + offs_g
    tl.store(M_SPLIT + at, m)
    tl.store(L_SPLIT + at, tl.sum(p, 1))
    tl.store(MASS + (bh.to(tl.int64) * GROUP_P + offs_g[:, None]) * nsel_pad + split * NUM_SEL + offs_s[None, :], mass)
    if GATED:
        v = tl.load(VC + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + offs_k[:, None].to(tl.int64) * svt
                    + offs_d[None, :] * svd, mask=own[:, None], other=0.0)
        tl.store(ACC_CMP + at[:, None] * HEAD_DIM + offs_d[None, :], _mm(p.to(v.dtype), v, PRECISION))


@triton.jit
def _token_scores_window_kernel(
    Q, KC, VC, K, V, M_SPLIT, L_SPLIT, MASS, ACC_CMP, M_PART, L_PART, ACC,
    sqb, sqh, sqd, skcb, skct, skch, skcd, svcb, svct, svch, svcd, skb, skt, skh, skd, svb, svt, svh, svd,
    num_cmp, num_q_heads, num_kv_heads, pos, qk_scale_log2, n_splits, nsel_pad, batch,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SEL: tl.constexpr,
    SPILL_P: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    TOP_N: tl.constexpr, WINDOW: tl.constexpr, WIN_N: tl.constexpr, PRECISION: tl.constexpr, GATED: tl.constexpr,
):
    """One program per (split or window chunk, sequence × kv head): the first n_splits programs score the
    compressed keys (``_token_scores``); the others attend to WIN_N keys each of the window, which needs no
    selection, so it runs beside the scoring (its partials are parts TOP_N.. of the combine; the window branch
    alone when GATED)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    if pid < n_splits:
        _token_scores(Q, KC, VC, M_SPLIT, L_SPLIT, MASS, ACC_CMP, b, hk, bh, pid, sqb, sqh, sqd, skcb, skct, skch, skcd,
                      svcb, svct, svch, svcd, num_cmp, pos, qk_scale_log2, n_splits, nsel_pad, GROUP, GROUP_P, HEAD_DIM,
                      BLOCK_N, NUM_SEL, SPILL_P, CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, PRECISION, GATED)
    else:
        chunk = pid - n_splits
        offs_g = tl.arange(0, GROUP_P)
        gmask = offs_g < GROUP
        heads = hk * GROUP + offs_g
        q = tl.load(Q + b.to(tl.int64) * sqb + heads[:, None] * sqh + tl.arange(0, HEAD_DIM)[None, :] * sqd,
                    mask=gmask[:, None], other=0.0)
        m_i, l_i, acc = _attend_span(q, K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh,
                                     V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh,
                                     pos - WINDOW + 1 + chunk * WIN_N, pos, 1,
                                     skt, skd, svt, svd, qk_scale_log2, GROUP_P, HEAD_DIM, WIN_N, PRECISION)
        _store_part(M_PART, L_PART, ACC, ((TOP_N + chunk).to(tl.int64) * batch + b) * num_q_heads + heads, gmask,
                    m_i, l_i, acc, HEAD_DIM)


@triton.jit
def _token_importance(M_SPLIT, L_SPLIT, MASS, bh, nsel, nsel_pad, n_splits, GROUP: tl.constexpr,
                      GROUP_P: tl.constexpr, NUM_SEL: tl.constexpr, NSEL_P: tl.constexpr,
                      HEADS_AT_ONCE: tl.constexpr):
    """[NSEL_P] eq. 9 importance (group's heads summed) from the splits' masses: each head's compressed LSE is
    merged from the splits' (m, sum), then mass * exp2(m_split - lse) is summed over the heads, HEADS_AT_ONCE at
    a time, the masses seen as [heads, split, block of the split] so that the factor of a (head, split) is
    broadcast rather than gathered per column (NSEL_P = splits * NUM_SEL)."""
    SPLITS_P: tl.constexpr = NSEL_P // NUM_SEL
    offs_sp = tl.arange(0, SPLITS_P)
    offs_s = tl.arange(0, NUM_SEL)
    imp = tl.zeros([SPLITS_P, NUM_SEL], tl.float32)
    for h0 in tl.static_range(0, GROUP, HEADS_AT_ONCE):
        hh = h0 + tl.arange(0, HEADS_AT_ONCE)
        at = (bh.to(tl.int64) * n_splits + offs_sp[None, :]) * GROUP_P + hh[:, None]
        sp_mask = (offs_sp[None, :] < n_splits) & (hh < GROUP)[:, None]
        m_sp = tl.load(M_SPLIT + at, mask=sp_mask, other=float("-inf"))  # [heads, splits]
        l_sp = tl.load(L_SPLIT + at, mask=sp_mask, other=0.0)
        cols = offs_sp[None, :, None] * NUM_SEL + offs_s[None, None, :]
        mass = tl.load(MASS + (bh.to(tl.int64) * GROUP_P + hh[:, None, None]) * nsel_pad + cols,
                       mask=sp_mask[:, :, None] & (cols < nsel), other=0.0)  # [heads, splits, NUM_SEL]
        mx = tl.max(m_sp, 1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        total = tl.sum(tl.where(m_sp == float("-inf"), 0.0, l_sp * tl.math.exp2(m_sp - mx[:, None])), 1)
        lse2 = tl.where(total > 0, mx + tl.math.log2(tl.where(total > 0, total, 1.0)), float("inf"))
        factor = tl.where(m_sp == float("-inf"), 0.0, tl.math.exp2(m_sp - lse2[:, None]))
        imp += tl.sum(mass * factor[:, :, None], 0)
    return tl.reshape(imp, [NSEL_P])


@triton.jit
def _token_top_blocks(M_SPLIT, L_SPLIT, MASS, IMP, CHOSEN, bh, part, nsel, nsel_pad, n_splits, last_cand,
                      init_blocks, local_blocks, GROUP: tl.constexpr, GROUP_P: tl.constexpr, NUM_SEL: tl.constexpr,
                      NSEL_P: tl.constexpr, HEADS_AT_ONCE: tl.constexpr,
                      TOP_N: tl.constexpr, TOP_N_P: tl.constexpr):
    """The block in ascending slot ``part`` of the query's top-n (-1: none); slot 0's program also writes the
    importance row and the chosen blocks. Same rule as ``nsa_topk``: candidates ``s <= last_cand``, the first
    init_blocks and the local_blocks ending at last_cand forced, the rest by importance, ties to the lower
    block (``nsa_topk.top_n_mask`` on the row held in registers)."""
    imp = _token_importance(M_SPLIT, L_SPLIT, MASS, bh, nsel, nsel_pad, n_splits, GROUP, GROUP_P, NUM_SEL, NSEL_P,
                            HEADS_AT_ONCE)
    cols = tl.arange(0, NSEL_P)
    valid = cols < nsel
    key = ranking_keys(imp[None, :], cols, tl.full([1], last_cand, tl.int32), init_blocks, local_blocks)
    chosen = tl.reshape(top_n_mask(tl.where(valid[None, :], key, -1), TOP_N, TOP_N_P), [NSEL_P])
    order = tl.cumsum(chosen.to(tl.int32), 0) - 1
    here = chosen & (order == part)
    blk = tl.where(tl.sum(here.to(tl.int32), 0) > 0, tl.sum(tl.where(here, cols, 0), 0), -1)
    if part == 0:
        tl.store(IMP + bh.to(tl.int64) * nsel + cols, imp, mask=valid)
        tl.store(CHOSEN + bh.to(tl.int64) * TOP_N + order, cols, mask=chosen)
        slots = tl.arange(0, TOP_N_P)
        n_chosen = tl.sum(chosen.to(tl.int32), 0)
        tl.store(CHOSEN + bh.to(tl.int64) * TOP_N + slots, tl.full([TOP_N_P], -1, tl.int32),
                 mask=(slots >= n_chosen) & (slots < TOP_N))
    return blk


@triton.jit
def _token_select_attend_kernel(
    Q, K, V, M_SPLIT, L_SPLIT, MASS, IMP, CHOSEN, M_PART, L_PART, ACC,
    sqb, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd,
    num_q_heads, num_kv_heads, pos, nsel, nsel_pad, n_splits, last_cand, init_blocks, local_blocks, qk_scale_log2,
    batch,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SEL: tl.constexpr, NSEL_P: tl.constexpr, HEADS_AT_ONCE: tl.constexpr,
    TOP_N: tl.constexpr, TOP_N_P: tl.constexpr, SLOT_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (selected slot, sequence × kv head): the slot's program finds the top-n itself
    (``_token_top_blocks``: the TOP_N programs do it side by side instead of in extra launches) and attends to
    its block's keys up to pos - SLOT_WINDOW (union: later keys are the window's; gated: SLOT_WINDOW = 0, the
    selected branch is its own softmax); partials go to the combine."""
    part = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    offs_g = tl.arange(0, GROUP_P)
    gmask = offs_g < GROUP
    heads = hk * GROUP + offs_g
    q = tl.load(Q + b.to(tl.int64) * sqb + heads[:, None] * sqh + tl.arange(0, HEAD_DIM)[None, :] * sqd,
                mask=gmask[:, None], other=0.0)
    blk = _token_top_blocks(M_SPLIT, L_SPLIT, MASS, IMP, CHOSEN, bh, part, nsel, nsel_pad, n_splits, last_cand,
                            init_blocks, local_blocks, GROUP, GROUP_P, NUM_SEL, NSEL_P, HEADS_AT_ONCE, TOP_N, TOP_N_P)
    m_i, l_i, acc = _attend_span(q, K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh,
                                 V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh,
                                 tl.where(blk >= 0, blk * BLOCK, pos + 1), pos - SLOT_WINDOW, BLOCK // BLOCK_N, skt,
                                 skd, svt, svd, qk_scale_log2, GROUP_P, HEAD_DIM, BLOCK_N, PRECISION)
    _store_part(M_PART, L_PART, ACC, (part.to(tl.int64) * batch + b) * num_q_heads + heads, gmask, m_i, l_i, acc,
                HEAD_DIM)


# The one-token path holds a query's importance row in registers: up to this many selection blocks (256k
# tokens at l' = 64); longer caches take the general decode chain.
TOKEN_DECODE_MAX_BLOCKS = 4096
# The selection sums the heads' masses over [heads, NSEL_P] tiles of at most this many elements.
TOKEN_IMPORTANCE_ELEMENTS = 4096
# Benchmarks may pin launch settings: {"scores": (warps, stages), "select": (warps, stages)}.
TOKEN_DECODE_LAUNCH: dict = {}


def token_decode_supported(q, k_cmp, *, block: int, cmp_block: int, cmp_stride: int, kv_len: int) -> bool:
    """Whether ``token_decode_triton`` takes this step: one query per sequence, a tiled eq. 9 mapping and a row
    that fits in registers."""
    nsel = -(-kv_len // block)
    return (q.shape[1] == 1 and _importance_tiling(cmp_block, cmp_stride, block) is not None
            and nsel <= TOKEN_DECODE_MAX_BLOCKS and k_cmp.shape[1] > 0)


def _launch(name: str, default: tuple, device) -> dict:
    if device.type != "cuda":
        return {}
    return launch_options(*TOKEN_DECODE_LAUNCH.get(name, default))


@torch.compiler.disable
@torch.no_grad()
def token_decode_triton(q, k, v, k_cmp, v_cmp, *, block: int, top_n: int, window: int, cmp_block: int,
                        cmp_stride: int, init_blocks: int, last_candidate: int, local_blocks: int, scale: float,
                        combine: str = "union", gates: Optional[torch.Tensor] = None):
    """NSA with per-token selection for one new query per sequence (``q [B, 1, HQ, D]`` at position ``Tk - 1``)
    in three launches: the compressed keys' scores (split over programs) beside the window's parts; the
    selection and the selected blocks (one program per slot); the merge of the parts (``union``: one softmax;
    ``gated``: three, combined with ``gates [B, 1, HQ, 3]``). Returns ``(out, parts)`` with the ``parts`` of
    ``nsa.nsa_from_compressed``: ``importance [B, HKV, 1, NSEL]``, ``chosen [B, HKV, 1, top_n]`` and ``lse``
    (union) or the branch outputs and LSEs (gated). The candidates are the blocks up to ``last_candidate``, the
    last ``local_blocks`` of them forced (``nsa._candidates``). Arguments are checked by the caller;
    ``token_decode_supported`` must hold."""
    check_compressed_inputs(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, k.shape[1])  # as the general chain does
    b, _, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    gated = combine == "gated"
    group = hq // hkv
    group_p = max(16, triton.next_power_of_2(group))
    pos = tk - 1
    nsel = -(-tk // block)
    block_n, num_sel = _importance_tiling(cmp_block, cmp_stride, block)
    spill = cmp_block // cmp_stride - 1  # keys of a tile that reach into the next tile's blocks
    n_splits = triton.cdiv(nsel, num_sel)
    nsel_pad = n_splits * num_sel
    nsel_p = max(num_sel, triton.next_power_of_2(nsel))  # a whole number of splits
    bn = _key_tile(block, d)
    n_win = triton.cdiv(window, bn)
    parts = top_n + n_win
    f32 = dict(dtype=torch.float32, device=q.device)
    m_split = torch.empty(b * hkv, n_splits, group_p, **f32)
    l_split = torch.empty_like(m_split)
    mass = torch.empty(b * hkv, group_p, nsel_pad, **f32)
    acc_cmp = torch.empty(b * hkv, n_splits, group_p, d, **f32) if gated else m_split
    m_part = torch.empty(parts, b, 1, hq, **f32)
    l_part = torch.empty_like(m_part)
    acc = torch.empty(parts, b, 1, hq, d, **f32)
    precision = _precision(q.dtype, q.device)
    q_strides = (q.stride(0), q.stride(2), q.stride(3))
    common = dict(GROUP=group, GROUP_P=group_p, HEAD_DIM=d, NUM_SEL=num_sel, TOP_N=top_n, PRECISION=precision)
    _token_scores_window_kernel[(n_splits + n_win, b * hkv)](
        q, k_cmp, v_cmp, k, v, m_split, l_split, mass, acc_cmp, m_part, l_part, acc, *q_strides, *_strides(k_cmp),
        *_strides(v_cmp), *_strides(k), *_strides(v), k_cmp.shape[1], hq, hkv, pos, scale * LOG2E, n_splits, nsel_pad,
        b, BLOCK_N=block_n, SPILL_P=0 if spill == 0 else max(16, triton.next_power_of_2(spill)), CMP_BLOCK=cmp_block,
        CMP_STRIDE=cmp_stride, SEL_BLOCK=block, WINDOW=window, WIN_N=bn, GATED=gated, **common,
        **_launch("scores", (4, 1), q.device))
    importance = torch.empty(b, hkv, 1, nsel, **f32)
    chosen = torch.empty(b, hkv, 1, top_n, dtype=torch.int32, device=q.device)
    _token_select_attend_kernel[(top_n, b * hkv)](
        q, k, v, m_split, l_split, mass, importance, chosen, m_part, l_part, acc, *q_strides, *_strides(k),
        *_strides(v), hq, hkv, pos, nsel, nsel_pad, n_splits, last_candidate, init_blocks, local_blocks,
        scale * LOG2E, b,
        BLOCK=block, BLOCK_N=bn, NSEL_P=nsel_p, HEADS_AT_ONCE=max(1, min(group_p, TOKEN_IMPORTANCE_ELEMENTS // nsel_p)),
        TOP_N_P=max(2, triton.next_power_of_2(top_n)),
        SLOT_WINDOW=0 if gated else window, **common, **_launch("select", (4, 2), q.device))
    found = {"importance": importance, "chosen": chosen}
    if not gated:
        out, found["lse"] = _combine_parts(m_part, l_part, acc, q)
        return out, found
    rows = b * hq
    out = torch.empty(b, 1, hq, d, dtype=q.dtype, device=q.device)
    branches = torch.empty(3, b, 1, hq, d, dtype=q.dtype, device=q.device)
    lses = torch.empty(3, b, 1, hq, **f32)
    _gated_token_combine_kernel[(rows,)](
        m_part, l_part, acc, m_split, l_split, acc_cmp, gates, out, branches, lses, gates.stride(0), gates.stride(2),
        gates.stride(3), rows, n_splits, hq, hkv, GROUP=group, GROUP_P=group_p, HEAD_DIM=d, TOP_N=top_n, N_WIN=n_win,
        CHUNK=32, **({"num_warps": 4} if q.device.type == "cuda" else {}))  # 64 splits at 64k: two rounds of loads
    found.update(o_cmp=branches[0], o_slc=branches[1], o_win=branches[2], lse_cmp=lses[0], lse_slc=lses[1],
                 lse_win=lses[2])
    return out, found


def _combine_parts(m_part, l_part, acc, q):
    """``(out, lse)`` of the parts' partial softmaxes ``[parts, B, Tq, HQ(, D)]`` (``_combine_kernel``)."""
    parts, b, tq, hq = m_part.shape
    d = q.shape[-1]
    out = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, tq, hq, dtype=torch.float32, device=q.device)
    rows = b * tq * hq
    _combine_kernel[(rows,)](m_part, l_part, acc, out, lse, parts, rows, *_strides(out), tq, hq,
                             PARTS=max(2, triton.next_power_of_2(parts)), HEAD_DIM=d,
                             **({"num_warps": 2} if q.device.type == "cuda" else {}))
    return out, lse


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
    return _combine_parts(m_part, l_part, acc, q)


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


__all__ = ["selected_window_decode", "selected_window_decode_triton", "token_decode_triton",
           "token_decode_supported"]
