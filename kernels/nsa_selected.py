"""NSA selected-block attention, optionally merged with the sliding window into one softmax: Triton and dispatcher.

Semantics are documented in ``nsa_selected_ref`` (the oracle); both backends share them exactly.

How the Triton path splits the work (why: the window is shared by neighbouring queries, the selected
blocks are not):

- Window (``window > 0``): the keys ``p - window < t <= p`` run through the block-sparse kernel
  (``block_sparse``) on a sliding-window layout, whose 64-query tiles reuse every key tile 64 times.
- Selected blocks: one program per (query token, key/value head) loads the G query heads of the GQA
  group as the rows of ``tl.dot`` (padded to >= 16 rows) and walks the token's selected blocks (16-row tiles
  with d <= 128: two tokens per program, one warp each, ``_sel_fwd_tokens_kernel``), keeping
  only keys ``t <= p - window``: keys in the window belong to the window part, so a key chosen twice
  counts once. The epilogue merges the window part's (output, LSE) into one softmax.
- Backward: gradients of a merged softmax split exactly by part, given the merged LSE and
  ``delta = rowsum(O * dO)``: the window part is the block-sparse backward; dQ of the selected part is
  per token like the forward; dK/dV of the selected part walks an inverse index (for each key block,
  the tokens that chose it), gathers those tokens' query rows into 64-row tiles, and adds into fp32
  buffers with atomics, several programs per popular block (the first block is chosen by every token).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import preferred_block_sizes, resolve_backend
from .block_sparse import (LOG2E, _bwd_delta_kernel, _finish_softmax, _mm, _precision, _scaled_softmax_step,
                           _strides, block_sparse_backward, block_sparse_forward, launch_options)
from .checks import check_power_of_two
from .layout import TokenRule, layout_from_rule
from .nsa_selected_ref import check_selected_inputs, selected_attention_reference


@triton.jit
def _slot_tile(blk, c, offs_n, last, BLOCK: tl.constexpr):
    """``(first, kmask)`` for sub-tile ``c`` of the selected blocks ``blk [R]``: each tile's first key, and which of
    its keys ``first + offs_n`` (``[R, N]``) the slot owns: those up to ``last [R]``. A slot that selects nothing (any
    negative entry, any block after ``last``) reads block 0 with every key masked, so that loads need no mask of
    their own; the entry is checked before it is narrowed to int32 (-2**31 * 16 is 0)."""
    owned = (blk >= 0) & (blk <= last // BLOCK)
    first = tl.where(owned, blk, 0).to(tl.int32) * BLOCK + c
    return first, owned[:, None] & ((first[:, None] + offs_n[None, :]) <= last[:, None])


@triton.jit
def _owned_slots(idx_ptrs, valid, sin, n_slots, last, SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    """``(row, ranks, n_owned)`` for the index rows at ``idx_ptrs [R]`` (``valid [R]``; a row of ``n_slots`` entries
    loaded as ``row [R, SLOTS]``, -1 past them) whose tokens own keys up to ``last [R]``: each slot's rank among the
    slots that own any key (-1 for the others) and the most such slots in one row.

    The kernels loop over ranks, not slots: with a branch-free loop a slot that owns nothing still costs a whole
    QK -> softmax -> PV step, and the top-n's local blocks (about 2.5 of 16 slots at 64k) lie in the window,
    whose keys belong to the window part."""
    offs_s = tl.arange(0, SLOTS)
    row = tl.load(idx_ptrs[:, None] + offs_s[None, :] * sin, mask=valid[:, None] & (offs_s < n_slots)[None, :],
                  other=-1)
    owns = (row >= 0) & (last[:, None] >= 0) & (row <= last[:, None] // BLOCK)
    ranks = tl.cumsum(owns.to(tl.int32), 1) - 1
    return row, tl.where(owns, ranks, -1), tl.max(tl.sum(owns.to(tl.int32), 1), 0)


@triton.jit
def _nth_owned_block(idx_ptrs, valid, n, sin, row, ranks, ASCENDING: tl.constexpr):
    """``[R]``: the block of each ``n``-th owned slot (``n [R]``, ranks of ``_owned_slots``; ``ranks`` and ``row``
    have 1 or R rows), or a slot that owns nothing. With ASCENDING (rows as the top-n writes them: sorted ascending,
    negative entries last) the owned slots come first and entry ``n`` is read directly, a load the pipelined loop
    issues one step ahead with the keys; otherwise it is picked out of the row held in registers. (Finding the
    first owned slot, so that negative entries could come first too, cost 0.5-2 ms at 64k: NOTES run 15h.)"""
    if ASCENDING:
        return tl.load(idx_ptrs + n * sin, mask=valid, other=-1)
    return tl.max(tl.where(ranks == n[:, None], row, -1), 1)


@triton.jit
def _token_block(idx_ptr, n, sin, row, ranks, ASCENDING: tl.constexpr):
    """``[1]``: the one-token kernels' ``n``-th owned block (``_nth_owned_block`` on the token's row as a batch of
    one), rebuilt from a scalar: used as it comes out of the row, it took the score tile's layout back into the
    row's cumsum, which Triton 3.6 then failed to lower (ASCENDING false; NOTES run 16)."""
    one = tl.arange(0, 1)
    return tl.zeros([1], tl.int64) + tl.max(_nth_owned_block(idx_ptr, one < 1, n + one, sin, row, ranks, ASCENDING), 0)


@triton.jit
def _load_kv(k_ptrs, v_ptrs, k_in, v_in, IN_BOUNDS: tl.constexpr):
    """A selected tile's keys and values: whole where every owned block lies in the sequence (IN_BOUNDS), else only
    the keys in it (``k_in``, ``v_in``: masks shaped like the tiles; the rest 0)."""
    if IN_BOUNDS:
        return tl.load(k_ptrs), tl.load(v_ptrs)
    return tl.load(k_ptrs, mask=k_in, other=0.0), tl.load(v_ptrs, mask=v_in, other=0.0)


@triton.jit
def _selected_tile(q, k_ptrs, v_ptrs, kmask, in_seq, m_i, l_i, acc, qk_scale_log2, IN_BOUNDS: tl.constexpr,
                   PRECISION: tl.constexpr):
    """One key tile of the online softmax over selected keys (``k_ptrs [D, N]``, ``v_ptrs [N, D]``; keys outside
    ``kmask [1, N]`` get no mass, and with IN_BOUNDS false only keys in ``in_seq [1, N]`` are read)."""
    k, v = _load_kv(k_ptrs, v_ptrs, in_seq, tl.trans(in_seq), IN_BOUNDS)
    m_new, p, alpha = _scaled_softmax_step(m_i, tl.where(kmask, _mm(q, k, PRECISION), float("-inf")), qk_scale_log2,
                                           True)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)


@triton.jit
def _finish_with_window(acc, m_i, l_i, o_win, lse_win):
    """``_finish_softmax`` of the selected part merged with the window part's (output, natural-log LSE) into one
    softmax: each part's normalised output weighted by its share of the total mass."""
    out, lse2 = _finish_softmax(acc, m_i, l_i)
    lw = lse_win * 1.4426950408889634
    mx = tl.maximum(lse2, lw)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    a_sel = tl.math.exp2(lse2 - mx)
    a_win = tl.math.exp2(lw - mx)
    total = a_sel + a_win
    t_safe = tl.where(total == 0.0, 1.0, total)
    out = out * tl.expand_dims(a_sel, -1) + o_win.to(tl.float32) * tl.expand_dims(a_win, -1)
    out = out / tl.expand_dims(t_safe, -1)
    return out, tl.where(total == 0.0, float("-inf"), mx + tl.math.log2(t_safe))


@triton.jit
def _sel_fwd_kernel(
    Q, K, V, IDX, O, LSE, OW, LSEW,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod,
    sib, sih, sit, sin, swb, swt, swh, swd,
    q_len, num_q_heads, num_kv_heads, n_slots, q_offset, qk_scale_log2,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr, SLOTS: tl.constexpr, ASCENDING: tl.constexpr,
):
    """One program per (query token, sequence × key/value head); rows are the GQA group's query heads."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_r < GROUP
    heads = hk * GROUP + offs_r
    q = tl.load(Q + b.to(tl.int64) * sqb + i.to(tl.int64) * sqt + heads[:, None] * sqh + offs_d[None, :] * sqd,
                mask=rmask[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    idx_base = IDX + b.to(tl.int64) * sib + hk * sih + i.to(tl.int64) * sit
    last = q_offset + i - WINDOW  # the last key this part owns: later ones are the window's (or the future)
    offs_n = tl.arange(0, BLOCK_N)
    one = tl.arange(0, 1)  # the token's index row as a batch of one
    row, ranks, n_owned = _owned_slots(idx_base + one, one < 1, sin, n_slots, tl.full([1], last, tl.int32), SLOTS,
                                       BLOCK)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    # no branch on the slot: the loop stays one that Triton can software-pipeline (prefetching the next block
    # while this one is computed: 20.2 -> 15.2 ms at 64k, benchmarks/NOTES.md run 12)
    # keys are addressed as a tile's first key plus offsets that are the same for every tile (a gather built per key
    # took about two thirds of the loop's instructions). Loads are whole tiles: an owned block starts at or before
    # last = p - window, so it ends before p, inside the sequence, when the window is at least a block (its keys
    # past last are masked in the scores); a mask per key, to skip those keys' loads, cost 128 more instructions per
    # step here and 600 in _sel_fwd_tokens_kernel (NOTES run 16)
    IN_BOUNDS: tl.constexpr = WINDOW >= BLOCK
    k_tile = offs_n[None, :] * skt + offs_d[:, None] * skd
    v_tile = offs_n[:, None] * svt + offs_d[None, :] * svd
    for n in range(0, n_owned):
        blk = _token_block(idx_base, n, sin, row, ranks, ASCENDING)
        for c in tl.static_range(0, BLOCK, BLOCK_N):
            first, kmask = _slot_tile(blk, c, offs_n, tl.full([1], last, tl.int32), BLOCK)
            first = first[:, None]  # [1, 1]: broadcast
            in_seq = (first + offs_n[None, :]) < q_offset + q_len
            first = first.to(tl.int64)
            m_i, l_i, acc = _selected_tile(q, k_base + first * skt + k_tile, v_base + first * svt + v_tile, kmask,
                                           in_seq, m_i, l_i, acc, qk_scale_log2, IN_BOUNDS, PRECISION)
    stat = LSE + (b * num_q_heads + heads).to(tl.int64) * q_len + i
    if WINDOW > 0:
        lw = tl.load(LSEW + (b * num_q_heads + heads).to(tl.int64) * q_len + i, mask=rmask, other=float("-inf"))
        ow = tl.load(OW + b.to(tl.int64) * swb + i.to(tl.int64) * swt + heads[:, None] * swh + offs_d[None, :] * swd,
                     mask=rmask[:, None], other=0.0)
        out, lse2 = _finish_with_window(acc, m_i * qk_scale_log2, l_i, ow, lw)
    else:
        out, lse2 = _finish_softmax(acc, m_i * qk_scale_log2, l_i)
    tl.store(O + b.to(tl.int64) * sob + i.to(tl.int64) * sot + heads[:, None] * soh + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=rmask[:, None])
    tl.store(stat, lse2 * 0.6931471805599453, mask=rmask)


@triton.jit
def _sel_fwd_tokens_kernel(
    Q, K, V, IDX, O, LSE, OW, LSEW,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod,
    sib, sih, sit, sin, swb, swt, swh, swd,
    q_len, num_q_heads, num_kv_heads, n_slots, q_offset, qk_scale_log2,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr, SLOTS: tl.constexpr, ASCENDING: tl.constexpr, TOKENS: tl.constexpr,
):
    """``_sel_fwd_kernel`` for TOKENS consecutive query tokens per program, as a batch of TOKENS independent
    problems (3-d tl.dot, one warp per token): each token keeps its own blocks, softmax and accumulator,
    and the program has TOKENS independent QK -> softmax -> PV chains to interleave."""
    i0 = tl.program_id(0) * TOKENS
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    offs_t = tl.arange(0, TOKENS)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    tok = i0 + offs_t
    tmask = tok < q_len
    heads = hk * GROUP + offs_r
    qmask = tmask[:, None] & (offs_r < GROUP)[None, :]
    tok3 = tok[:, None, None].to(tl.int64)
    q = tl.load(Q + b.to(tl.int64) * sqb + tok3 * sqt + heads[None, :, None] * sqh + offs_d[None, None, :] * sqd,
                mask=qmask[:, :, None], other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    idx_base = IDX + b.to(tl.int64) * sib + hk * sih + tok.to(tl.int64) * sit
    # a token past the end owns no key (last < 0)
    last = tl.where(tmask, q_offset + tok - WINDOW, -1)
    m_i = tl.full([TOKENS, ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TOKENS, ROWS], dtype=tl.float32)
    acc = tl.zeros([TOKENS, ROWS, HEAD_DIM], dtype=tl.float32)
    row, ranks, n_owned = _owned_slots(idx_base, tmask, sin, n_slots, last, SLOTS, BLOCK)
    IN_BOUNDS: tl.constexpr = WINDOW >= BLOCK  # as in _sel_fwd_kernel
    k_tile = offs_n[None, None, :] * skt + offs_d[None, :, None] * skd
    v_tile = offs_n[None, :, None] * svt + offs_d[None, None, :] * svd
    for n in range(0, n_owned):  # a token with fewer owned slots than the other: slots that _slot_tile masks
        blk = _nth_owned_block(idx_base, tmask, n + tl.zeros([TOKENS], tl.int32), sin, row, ranks, ASCENDING)
        for c in tl.static_range(0, BLOCK, BLOCK_N):
            first, kmask = _slot_tile(blk, c, offs_n, last, BLOCK)
            k_ptrs = k_base + first[:, None, None].to(tl.int64) * skt + k_tile
            v_ptrs = v_base + first[:, None, None].to(tl.int64) * svt + v_tile
            in_seq = (first[:, None] + offs_n[None, :]) < q_offset + q_len
            k, v = _load_kv(k_ptrs, v_ptrs, in_seq[:, None, :], in_seq[:, :, None], IN_BOUNDS)
            s = tl.where(kmask[:, None, :], _mm(q, k, PRECISION), float("-inf"))
            m_new, p, alpha = _scaled_softmax_step(m_i, s, qk_scale_log2, True)
            l_i = l_i * alpha + tl.sum(p, 2)
            acc = acc * alpha[:, :, None] + _mm(p.to(v.dtype), v, PRECISION)
            m_i = m_new
    stat = LSE + (b * num_q_heads + heads[None, :]).to(tl.int64) * q_len + tok[:, None]
    if WINDOW > 0:
        lw = tl.load(LSEW + (b * num_q_heads + heads[None, :]).to(tl.int64) * q_len + tok[:, None], mask=qmask,
                     other=float("-inf"))
        ow = tl.load(OW + b.to(tl.int64) * swb + tok3 * swt + heads[None, :, None] * swh + offs_d[None, None, :] * swd,
                     mask=qmask[:, :, None], other=0.0)
        out, lse2 = _finish_with_window(acc, m_i * qk_scale_log2, l_i, ow, lw)
    else:
        out, lse2 = _finish_softmax(acc, m_i * qk_scale_log2, l_i)
    tl.store(O + b.to(tl.int64) * sob + tok3 * sot + heads[None, :, None] * soh + offs_d[None, None, :] * sod,
             out.to(O.dtype.element_ty), mask=qmask[:, :, None])
    tl.store(stat, lse2 * 0.6931471805599453, mask=qmask)


@triton.jit
def _selected_dq_tile(q, do, lse, delta, dq, k_ptrs, v_ptrs, kmask, in_seq, qk_scale_log2, IN_BOUNDS: tl.constexpr,
                      PRECISION: tl.constexpr):
    """dQ of one key tile of the selected part (``k_ptrs``, ``v_ptrs`` ``[N, D]``; keys outside ``kmask [1, N]`` give
    no gradient, and with IN_BOUNDS false only keys in ``in_seq [1, N]`` are read)."""
    k, v = _load_kv(k_ptrs, v_ptrs, tl.trans(in_seq), tl.trans(in_seq), IN_BOUNDS)
    s = _mm(q, tl.trans(k), PRECISION) * qk_scale_log2
    p = tl.where(kmask, tl.math.exp2(s - lse[:, None]), 0.0)
    ds = p * (_mm(do, tl.trans(v), PRECISION) - delta[:, None])
    return dq + _mm(ds.to(k.dtype), k, PRECISION)


@triton.jit
def _sel_bwd_dq_kernel(
    Q, K, V, IDX, DO, LSE, DELTA, DQ,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod,
    sib, sih, sit, sin, sdb, sdt, sdh, sdd,
    q_len, num_q_heads, num_kv_heads, n_slots, q_offset, qk_scale_log2, sm_scale,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr, SLOTS: tl.constexpr, ASCENDING: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """dQ of the selected part, per (query token, sequence × key/value head); with ACCUMULATE it adds to
    what DQ holds (the window part's dQ)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_r < GROUP
    heads = hk * GROUP + offs_r
    q = tl.load(Q + b.to(tl.int64) * sqb + i.to(tl.int64) * sqt + heads[:, None] * sqh + offs_d[None, :] * sqd,
                mask=rmask[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sob + i.to(tl.int64) * sot + heads[:, None] * soh + offs_d[None, :] * sod,
                 mask=rmask[:, None], other=0.0)
    stat = (b * num_q_heads + heads).to(tl.int64) * q_len + i
    lse = tl.load(LSE + stat, mask=rmask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # empty rows: p = 0
    delta = tl.load(DELTA + stat, mask=rmask, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh
    idx_base = IDX + b.to(tl.int64) * sib + hk * sih + i.to(tl.int64) * sit
    last = q_offset + i - WINDOW
    offs_n = tl.arange(0, BLOCK_N)
    one = tl.arange(0, 1)  # the token's index row as a batch of one
    row, ranks, n_owned = _owned_slots(idx_base + one, one < 1, sin, n_slots, tl.full([1], last, tl.int32), SLOTS,
                                       BLOCK)
    dq = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    IN_BOUNDS: tl.constexpr = WINDOW >= BLOCK  # keys addressed as in _sel_fwd_kernel
    k_tile = offs_n[:, None] * skt + offs_d[None, :] * skd
    v_tile = offs_n[:, None] * svt + offs_d[None, :] * svd
    for n in range(0, n_owned):  # branch-free, as in the forward
        blk = _token_block(idx_base, n, sin, row, ranks, ASCENDING)
        for c in tl.static_range(0, BLOCK, BLOCK_N):
            first, kmask = _slot_tile(blk, c, offs_n, tl.full([1], last, tl.int32), BLOCK)
            first = first[:, None]  # [1, 1]: broadcast
            in_seq = (first + offs_n[None, :]) < q_offset + q_len
            first = first.to(tl.int64)
            dq = _selected_dq_tile(q, do, lse, delta, dq, k_base + first * skt + k_tile, v_base + first * svt + v_tile,
                                   kmask, in_seq, qk_scale_log2, IN_BOUNDS, PRECISION)
    dq = dq * sm_scale
    dq_ptrs = DQ + b.to(tl.int64) * sdb + i.to(tl.int64) * sdt + heads[:, None] * sdh + offs_d[None, :] * sdd
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=rmask[:, None], other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _sel_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, ITEM_KEY, ITEM_START, ITEM_END, TOKENS,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod,
    sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd,
    q_len, kv_len, num_q_heads, num_kv_heads, num_blocks, q_offset, qk_scale_log2, sm_scale,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK/dV of the selected part for one work item: a key sub-tile of one selected block and a run of
    the tokens that chose that block (from the inverse index). Rows of a tile are (token, head) pairs:
    ROWS // GROUP tokens × GROUP heads. Results are added (atomically) into fp32 buffers."""
    item = tl.program_id(0)
    c = tl.program_id(1)
    key = tl.load(ITEM_KEY + item)
    t_begin = tl.load(ITEM_START + item)
    t_end = tl.load(ITEM_END + item)
    bh = key // num_blocks
    blk = key % num_blocks
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    offs_k = blk * BLOCK + c * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = offs_k < kv_len
    k = tl.load(K + b.to(tl.int64) * skb + hk * skh + offs_k[:, None].to(tl.int64) * skt + offs_d[None, :] * skd,
                mask=kmask[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + hk * svh + offs_k[:, None].to(tl.int64) * svt + offs_d[None, :] * svd,
                mask=kmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    TOKENS_PER_TILE: tl.constexpr = ROWS // GROUP
    offs_r = tl.arange(0, ROWS)
    tok_in_tile = offs_r // GROUP
    heads = hk * GROUP + offs_r % GROUP
    row_used = offs_r < TOKENS_PER_TILE * GROUP
    q_head_base = Q + b.to(tl.int64) * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd
    do_head_base = DO + b.to(tl.int64) * sob + heads[:, None] * soh + offs_d[None, :] * sod
    stat_base = (b * num_q_heads + heads).to(tl.int64) * q_len
    for t0 in range(t_begin, t_end, TOKENS_PER_TILE):
        slot = t0 + tok_in_tile
        rmask = row_used & (slot < t_end)
        tok = tl.load(TOKENS + slot, mask=rmask, other=0)
        q = tl.load(q_head_base + tok[:, None].to(tl.int64) * sqt, mask=rmask[:, None], other=0.0)
        do = tl.load(do_head_base + tok[:, None].to(tl.int64) * sot, mask=rmask[:, None], other=0.0)
        lse = tl.load(LSE + stat_base + tok, mask=rmask, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + stat_base + tok, mask=rmask, other=0.0)
        s_t = _mm(k, tl.trans(q), PRECISION) * qk_scale_log2  # [keys, rows]
        p_t = tl.math.exp2(s_t - lse[None, :])
        vis = (offs_k[:, None] <= (q_offset + tok - WINDOW)[None, :]) & rmask[None, :]
        p_t = tl.where(vis, p_t, 0.0)
        dv += _mm(p_t.to(do.dtype), do, PRECISION)
        dp_t = _mm(v, tl.trans(do), PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mm(ds_t.to(q.dtype), q, PRECISION)
    dk_ptrs = DK + b.to(tl.int64) * sdkb + hk * sdkh + offs_k[:, None].to(tl.int64) * sdkt + offs_d[None, :] * sdkd
    dv_ptrs = DV + b.to(tl.int64) * sdvb + hk * sdvh + offs_k[:, None].to(tl.int64) * sdvt + offs_d[None, :] * sdvd
    tl.atomic_add(dk_ptrs, dk * sm_scale, mask=kmask[:, None])
    tl.atomic_add(dv_ptrs, dv, mask=kmask[:, None])


# ----------------------------------------------------------------------------- host side
# Benchmarks may pin launch settings per kernel ("fwd", "fwd_tokens", "dq", "dkdv") to sweep them:
# {"fwd": (warps, stages)}, or (warps, stages, register cap per thread).
LAUNCH_OVERRIDES: dict = {}
# and the key tile (keys per tl.dot, at most the block) per kernel: {"fwd": 32}
TILE_OVERRIDES: dict = {}
# Query tokens per program of the selected forward for 16-row tiles (groups of at most 16 heads) and d <= 128 (a
# power of two): 2 runs _sel_fwd_tokens_kernel, one warp per token, 15.44 ms against 16.27 for one token per
# program at 64k, 64/4, d=128, on an H200 (NOTES run 14); 1 runs _sel_fwd_kernel, which also serves larger groups
# and d=256 (not timed with two tokens: it would hold 144 KiB of shared memory per program and spill)
FWD_TOKENS_PER_PROGRAM = 2
# Query heads per program of the window part's forward at d=128 (block_sparse_forward): two heads' rows share each
# key tile, 3.53 ms against 4.44 for one at 64k, 64/4, on an H200 (NOTES run 15); other head dims keep one (at
# d=256 two were 38 % slower in a review's check at 16k)
WINDOW_HEADS_PER_PROGRAM = 2
# Tokens of one dK/dV work item, in tiles of ROWS // G tokens: a block chosen by more tokens is split
# over several programs (benchmarks may change it).
DKDV_TILES_PER_ITEM = 16


def _rows(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


def _key_tile(block: int, head_dim: int, kernel: str) -> int:
    return min(block, TILE_OVERRIDES.get(kernel, 64 if head_dim <= 128 else 32))


def _tuning(kernel: str, device: torch.device, rows: int = 16) -> dict:
    if device.type != "cuda":
        return {}
    if kernel in LAUNCH_OVERRIDES:
        return launch_options(*LAUNCH_OVERRIDES[kernel])
    if kernel == "fwd_tokens":  # one warp per token: the row reductions stay inside a warp
        return dict(num_warps=FWD_TOKENS_PER_PROGRAM, num_stages=2)
    # the one-token forward with 16-row tiles (FWD_TOKENS_PER_PROGRAM = 1, or d = 256): 2 warps keep more programs
    # in flight per SM, 15.2 ms against 16.4 for 4 warps at 64k on an H200 (NOTES run 12; 3 stages or 32-key tiles
    # were slower: shared memory, occupancy). Larger groups keep 4 warps: 2 would hold a [rows, d] fp32 accumulator
    # on 64 threads
    return dict(num_warps=2 if kernel == "fwd" and rows <= 16 else 4, num_stages=2)

def window_layout(q_len: int, kv_len: int, window: int, head_dim: int, device: torch.device):
    """Sliding-window BlockLayout for the window part, cached (a model calls this with the same shapes
    in every layer)."""
    return _window_layout(q_len, kv_len, window, head_dim, str(device))


@functools.lru_cache(maxsize=16)
def _window_layout(q_len: int, kv_len: int, window: int, head_dim: int, device: str):
    block_q, block_kv = preferred_block_sizes(head_dim, torch.device(device))
    return layout_from_rule(TokenRule(causal=True, window=window), q_len, kv_len, block_q, block_kv, device=device,
                            name=f"window{window}")


def inverse_index(block_idx: torch.Tensor, q_offset: int, kv_len: int, block: int, window: int, tokens_per_item: int):
    """For each (sequence, kv head, key block), the query tokens that chose it and own some of its keys
    (keys before the window), sorted; cut into work items of at most ``tokens_per_item`` tokens.

    Returns ``(item_key, item_start, item_end, tokens)`` int32 with ``item_key = (b*HKV + h)*NSEL + s``
    and ``tokens[item_start:item_end]`` the item's tokens. One host sync (the number of items)."""
    b, hkv, tq, n = block_idx.shape
    nsel = -(-kv_len // block)
    device = block_idx.device
    idx = block_idx.long()
    last = torch.arange(tq, device=device) + (q_offset - window)
    valid = (idx >= 0) & (idx < nsel) & (idx * block <= last[:, None])
    heads = torch.arange(b * hkv, device=device).view(b, hkv, 1, 1) * nsel
    sentinel = b * hkv * nsel
    key = torch.where(valid, heads + idx, sentinel).flatten()
    order = torch.sort(key, stable=True).indices  # stable: tokens stay ascending within a block
    tokens = (order // n % tq).to(torch.int32)   # flat index (b, h, t, n) -> t
    counts = torch.bincount(key, minlength=sentinel + 1)[:sentinel]
    first = torch.cumsum(counts, 0) - counts
    n_items = (counts + tokens_per_item - 1) // tokens_per_item
    total = int(n_items.sum())
    item_key = torch.repeat_interleave(torch.arange(sentinel, device=device), n_items, output_size=total)
    item_first = torch.cumsum(n_items, 0) - n_items
    item_start = first[item_key] + (torch.arange(total, device=device) - item_first[item_key]) * tokens_per_item
    item_end = torch.minimum(item_start + tokens_per_item, first[item_key] + counts[item_key])
    return item_key.to(torch.int32), item_start.to(torch.int32), item_end.to(torch.int32), tokens


def selected_forward(q, k, v, block_idx, block: int, scale: float, window: int, ascending: bool = False):
    """Returns ``(out [B, Tq, HQ, D], lse [B, HQ, Tq] float32)`` of the merged softmax."""
    tq, tk, d = q.shape[1], k.shape[1], q.shape[3]
    if window > 0:
        heads = WINDOW_HEADS_PER_PROGRAM if d == 128 else 1  # measured at d=128 only (slower at d=256)
        o_win, lse_win = block_sparse_forward(q, k, v, window_layout(tq, tk, window, d, q.device), scale, heads)
    else:
        o_win, lse_win = q, q  # unused (WINDOW=0 compiles the merge away)
    return selected_part_forward(q, k, v, block_idx, o_win, lse_win, block, scale, window, ascending)


def selected_part_forward(q, k, v, block_idx, o_win, lse_win, block: int, scale: float, window: int,
                          ascending: bool = False):
    """The selected blocks' kernel alone, merging the window part's ``(o_win, lse_win)`` when ``window > 0``;
    ``ascending``: ``rows_from_top_n`` of ``selected_attention_triton``."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    out = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    args = (q, k, v, block_idx, out, lse, o_win, lse_win,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(block_idx), *_strides(o_win),
            tq, hq, hkv, block_idx.shape[3], tk - tq, scale * LOG2E)
    consts = dict(GROUP=hq // hkv, ROWS=_rows(hq // hkv), HEAD_DIM=d, BLOCK=block, BLOCK_N=_key_tile(block, d, "fwd"),
                  WINDOW=window, PRECISION=_precision(q.dtype, q.device),
                  SLOTS=triton.next_power_of_2(block_idx.shape[3]), ASCENDING=ascending)
    tokens = FWD_TOKENS_PER_PROGRAM if consts["ROWS"] == 16 and d <= 128 else 1
    check_power_of_two("FWD_TOKENS_PER_PROGRAM", tokens)
    if tokens > 1:
        _sel_fwd_tokens_kernel[(triton.cdiv(tq, tokens), b * hkv)](*args, **consts, TOKENS=tokens,
                                                                   **_tuning("fwd_tokens", q.device))
    else:
        _sel_fwd_kernel[(tq, b * hkv)](*args, **consts, **_tuning("fwd", q.device, consts["ROWS"]))
    return out, lse


def selected_backward(do, q, k, v, block_idx, out, lse, block: int, scale: float, window: int,
                      ascending: bool = False):
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    do = do.contiguous() if do.stride(-1) != 1 else do
    if window > 0:
        # the window part's gradients under the merged softmax: the block-sparse backward given the merged out/LSE
        dq, dk_w, dv_w = block_sparse_backward(do, q, k, v, out, lse, window_layout(tq, tk, window, d, q.device), scale)
        dk_acc, dv_acc = dk_w.float(), dv_w.float()
    else:
        dq = torch.empty(b, tq, hq, d, dtype=q.dtype, device=q.device)
        dk_acc = torch.zeros(b, tk, hkv, d, dtype=torch.float32, device=q.device)
        dv_acc = torch.zeros_like(dk_acc)
    delta = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(tq, 64), b * hq)](out, do, delta, *_strides(out), *_strides(do), tq, hq,
                                                      HEAD_DIM=d, BLOCK=64)
    common = dict(GROUP=group, ROWS=_rows(group), HEAD_DIM=d, BLOCK=block, WINDOW=window,
                  PRECISION=_precision(q.dtype, q.device))
    _sel_bwd_dq_kernel[(tq, b * hkv)](
        q, k, v, block_idx, do, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(block_idx), *_strides(dq),
        tq, hq, hkv, block_idx.shape[3], tk - tq, scale * LOG2E, scale, **common, ACCUMULATE=window > 0,
        BLOCK_N=_key_tile(block, d, "dq"),
        SLOTS=triton.next_power_of_2(block_idx.shape[3]), ASCENDING=ascending, **_tuning("dq", q.device))
    rows = max(64, _rows(group))
    tokens_per_item = DKDV_TILES_PER_ITEM * (rows // group)
    item_key, item_start, item_end, tokens = inverse_index(block_idx, tk - tq, tk, block, window, tokens_per_item)
    if item_key.numel():
        common["ROWS"] = rows
        block_n = _key_tile(block, d, "dkdv")
        _sel_bwd_dkdv_kernel[(item_key.numel(), block // block_n)](
            q, k, v, do, lse, delta, dk_acc, dv_acc, item_key, item_start, item_end, tokens,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk_acc), *_strides(dv_acc),
            tq, tk, hq, hkv, -(-tk // block), tk - tq, scale * LOG2E, scale, **common, BLOCK_N=block_n,
            **_tuning("dkdv", q.device))
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)


class _SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block, scale, window, ascending):
        out, lse = selected_forward(q, k, v, block_idx, block, scale, window, ascending)
        ctx.save_for_backward(q, k, v, block_idx, out, lse)
        ctx.block, ctx.scale, ctx.window, ctx.ascending = block, scale, window, ascending
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, block_idx, out, lse = ctx.saved_tensors
        dq, dk, dv = selected_backward(do, q, k, v, block_idx, out, lse, ctx.block, ctx.scale, ctx.window,
                                       ctx.ascending)
        return dq, dk, dv, None, None, None, None, None


@torch.compiler.disable
def selected_attention_triton(q, k, v, block_idx, *, block: int, scale: Optional[float] = None, window: int = 0,
                              rows_from_top_n: bool = False):
    """Triton version of ``selected_attention_reference``: ``(out [B, Tq, HQ, D], lse [B, Tq, HQ])``
    (the LSE is a transposed view of a ``[B, HQ, Tq]`` buffer: no copy).

    ``rows_from_top_n=True`` promises rows as ``select_blocks`` writes them: sorted ascending with every negative
    entry last. The kernels then read the slots that own keys in order instead of picking them out of the row
    (faster); rows in another order (``torch.sort`` puts negatives first) would lose blocks without an error."""
    scale = check_selected_inputs(q, k, v, block_idx, block, scale, window)
    out, lse = _SelectedAttention.apply(q, k, v, block_idx, block, scale, window, bool(rows_from_top_n))
    return out, lse.transpose(1, 2)


def selected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, *, block: int,
                       scale: Optional[float] = None, window: int = 0, backend: str = "auto"):
    """Attention of ``q [B, Tq, HQ, D]`` over ``k, v [B, Tk, HKV, D]`` restricted, per query token and
    key/value head, to the blocks ``block_idx [B, HKV, Tq, N]`` (-1 = unused slot, any order, no duplicates)
    and, with ``window > 0``, the ``window`` most recent keys, in one softmax; future keys are masked.
    Returns ``(out [B, Tq, HQ, D], lse [B, Tq, HQ] float32)``; differentiable in q, k, v.

    The Triton backend trusts the index values (checking them would stall the GPU): an entry < 0 is
    unused, one past the last block selects nothing."""
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        return selected_attention_triton(q, k, v, block_idx, block=block, scale=scale, window=window)
    return selected_attention_reference(q, k, v, block_idx, block=block, scale=scale, window=window)


__all__ = ["selected_attention", "selected_attention_triton", "inverse_index", "window_layout"]
