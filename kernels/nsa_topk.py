"""NSA top-n block selection in one Triton kernel (the rank-and-pick step of ``nsa.select_blocks``).

``pick_top_blocks(scores [B, HKV, R, NSEL], cur_block [R], ...)`` returns exactly what
``nsa._pick_in_chunks`` returns (the oracle, used by ``backend="reference"``): per row, the blocks
``s <= cur_block[row]`` are visible; the first ``init_blocks`` and the ``local_blocks`` ending at
``cur_block`` are forced; the rest go by score, equal scores to the lower block index; the chosen
indices are sorted ascending and padded with -1 (int32, ``top_n`` slots).

Why a kernel: the PyTorch path builds an int64 ranking key per (row, block) and runs ``torch.topk``
plus a sort; at 64k tokens that is 4 × 64k × 1024 keys and took 30.7 ms on an H100, the largest
single cost of the NSA forward. Here one program holds ``BLOCK_R`` rows and streams their visible
columns in chunks, keeping a running top-n list per row in registers: each chunk is merged into the
list by ``top_n`` arg-max steps over (list ∪ chunk). The list is kept in descending (score, -index)
order and every list entry comes from an earlier chunk (a lower block index), so a tie is won by
the list and, within the list, by the earlier position: the lower index, as the oracle. A chunk
whose best score cannot enter any row's list is skipped. Columns past a row's own block are never
read (half the tensor under the causal mask).

``top_n_mask`` / ``ranking_keys`` are the same rule for rows held whole in registers (the one-token
decode kernels): a 3-way search over the key values finds each row's n-th largest key in at most 20
counting passes (as many as the row's own bounds need: about 13 at 64k since run 16).
``_topn_whole_rows_kernel`` uses them for the forward when a row has at most ``TOPN_WHOLE_ROW_MAX`` columns:
in its first, int64 4-way form it was slower than the chunked merge on an H200 at 64k (5.7 vs 5.1 ms, NOTES
run 9); in the int32 3-way form, with 4 rows and 2 warps per program,
it takes 3.6 ms (run 12), 2.6 ms with registers capped at 96 so that more programs share an SM (run 13). Since
run 14 a program holds only the columns its rows can see (2.4 ms in that run's machine; not timed against the
old form in one call); since run 16 the search starts from each row's bounds, capped at 128 registers (1.97 ms).
Longer rows and decode's column splits keep the merge.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import resolve_backend
from .block_sparse import launch_options

_NONE = 2**30  # index of an empty / removed entry: above every block index, maps to -1 at the end


@triton.jit
def _row_block(CUR, n_rows, num_heads, BLOCK_R: tl.constexpr):
    """This program's rows (program ids: row block, sequence × head): ``(b, h, offs_r, rmask, cur)``, with each
    row's current block in ``cur`` (-1: the row sees nothing)."""
    bh = tl.program_id(1)
    # the last rows first: they see the most columns (the causal mask), so the cheapest programs end the launch
    offs_r = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < n_rows
    return bh // num_heads, bh % num_heads, offs_r, rmask, tl.load(CUR + offs_r, mask=rmask, other=-1).to(tl.int32)


@triton.jit
def _topn_kernel(
    S, CAND_I, CUR, OUT, OUT_V,
    ssb, ssh, ssr, sss, sob, soh, sor, son,
    n_rows, num_sel, num_heads, init_blocks, local_blocks, cols_per_split,
    TOP_N: tl.constexpr, NP: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, NONE: tl.constexpr,
    CANDIDATES: tl.constexpr, PARTIAL: tl.constexpr,
):
    """Scores mode (CANDIDATES=False): S holds scores, visibility and forced blocks come from CUR.
    Candidates mode: S holds partial lists' values (+inf forced, -inf empty) and CAND_I their block
    indices (same strides), laid out split after split, each in descending order: among equal values a
    lower position is a lower block index, so the merge below keeps the oracle's tie rule.
    PARTIAL: write this split's list (values to OUT_V, indices to OUT, descending) instead of the
    ascending -1 padded result; the split is program_id(2), over columns [split*cols_per_split, ...)."""
    split = tl.program_id(2)
    b, h, offs_r, rmask, cur = _row_block(CUR, n_rows, num_heads, BLOCK_R)
    pos_p = tl.arange(0, NP)
    pos_c = tl.arange(0, CHUNK)
    run_v = tl.full([BLOCK_R, NP], float("-inf"), tl.float32)
    run_i = tl.full([BLOCK_R, NP], NONE, tl.int32)
    c_lo = split * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, num_sel)
    if not CANDIDATES:
        c_hi = tl.minimum(c_hi, tl.max(cur, 0) + 1)
    offs = b.to(tl.int64) * ssb + h.to(tl.int64) * ssh + offs_r[:, None].to(tl.int64) * ssr
    for c0 in range(c_lo, c_hi, CHUNK):
        cols = c0 + pos_c
        inside = (cols[None, :] < c_hi) & rmask[:, None]
        if CANDIDATES:
            x = tl.load(S + offs + cols[None, :].to(tl.int64) * sss, mask=inside, other=float("-inf")).to(tl.float32)
            xi = tl.load(CAND_I + offs + cols[None, :].to(tl.int64) * sss, mask=inside, other=NONE)
        else:
            vis = inside & (cols[None, :] <= cur[:, None])
            x = tl.load(S + offs + cols[None, :].to(tl.int64) * sss, mask=vis, other=0.0).to(tl.float32)
            forced = vis & ((cols[None, :] < init_blocks) | (cols[None, :] > cur[:, None] - local_blocks))
            x = tl.where(forced, float("inf"), x)
            x = tl.where(vis, x, float("-inf"))
            xi = tl.where(vis, cols[None, :], NONE)
        # the n-th entry of each row's list (lists are full or padded with -inf): a chunk entry must beat it
        nth = tl.min(tl.where(pos_p[None, :] < TOP_N, run_v, float("inf")), 1)
        gain = tl.max(tl.where(tl.max(x, 1) > nth, 1, 0), 0)
        if gain > 0:
            new_v = tl.full([BLOCK_R, NP], float("-inf"), tl.float32)
            new_i = tl.full([BLOCK_R, NP], NONE, tl.int32)
            for t in tl.static_range(TOP_N):
                mr, pr = tl.max(run_v, 1, return_indices=True, return_indices_tie_break_left=True)
                mc, pc = tl.max(x, 1, return_indices=True, return_indices_tie_break_left=True)
                take_run = mr >= mc  # ties: the list's entries have lower block indices
                hit_r = (pos_p[None, :] == pr[:, None]) & take_run[:, None]
                hit_c = (pos_c[None, :] == pc[:, None]) & (~take_run)[:, None]
                ir = tl.sum(tl.where(hit_r, run_i, 0), 1)
                ic = tl.sum(tl.where(hit_c, xi, 0), 1)
                val = tl.where(take_run, mr, mc)
                idx = tl.where(take_run, ir, ic)
                slot = pos_p[None, :] == t
                new_v = tl.where(slot, val[:, None], new_v)
                new_i = tl.where(slot, idx[:, None], new_i)
                run_v = tl.where(hit_r, float("-inf"), run_v)
                run_i = tl.where(hit_r, NONE, run_i)
                x = tl.where(hit_c, float("-inf"), x)
                xi = tl.where(hit_c, NONE, xi)
            run_v = new_v
            run_i = new_i
    o_offs = (b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_r[:, None].to(tl.int64) * sor
              + (split * NP + pos_p[None, :]) * son)
    if PARTIAL:
        tl.store(OUT + o_offs, run_i, mask=rmask[:, None])
        tl.store(OUT_V + o_offs, run_v, mask=rmask[:, None])
    else:
        # ascending block indices, empty slots (NONE) last, then -1
        out = tl.full([BLOCK_R, NP], NONE, tl.int32)
        for t in tl.static_range(TOP_N):
            m = tl.min(run_i, 1)
            out = tl.where(pos_p[None, :] == t, m[:, None], out)
            run_i = tl.where(run_i == m[:, None], NONE, run_i)
        out = tl.where(out == NONE, -1, out)
        tl.store(OUT + o_offs, out, mask=rmask[:, None] & (pos_p[None, :] < TOP_N))


@triton.jit
def top_n_mask(key, TOP_N: tl.constexpr, TOP_N_P: tl.constexpr):
    """Each row's top-n of ``key [R, C]`` (int32 ranking keys: the bit pattern of a non-negative float32 score,
    0x7F800000 (+inf) for a forced block, -1 for a column that is not a candidate) as a bool mask; equal keys
    go to the lower column; a row with fewer than TOP_N candidates keeps them all (C < 2^16).

    The n-th largest key of each row is found by a 3-way search on the key values: each pass counts the keys
    at or above two thresholds in one packed int32 sum (two counts < 2^16 in 16-bit fields) and keeps the
    third of [lo, hi) that holds it, so 20 passes cover the 31-bit range, whatever C is (fewer from the bounds
    below). (The first form, a
    4-way search with int64 counts in 17 passes, took about 7 of the 15.5 us of the decode selection kernel
    at 64k on an H200: int64 compares, adds and shuffles cost about twice their int32 forms.)"""
    R: tl.constexpr = key.shape[0]
    C: tl.constexpr = key.shape[1]
    FORCED: tl.constexpr = 0x7F800000
    # per row: at least TOP_N keys >= lo, or lo = 0; fewer than TOP_N keys >= hi. Tighter than [0, 2^31) from the
    # start: hi just above the largest key below +inf (forced blocks and infinite scores share that key) unless
    # TOP_N keys are +inf, lo the smallest of the maxima of TOP_N_P >= TOP_N disjoint column groups (that many
    # distinct keys are at least that). The passes then needed are counted per program: at 64k on random inputs
    # the top blocks' importance lies within a few percent, about 13 passes instead of 20 (NOTES run 16)
    n_inf = tl.sum((key >= FORCED).to(tl.int32), 1)
    hi = tl.where(n_inf >= TOP_N, FORCED + 1, tl.max(tl.where(key >= FORCED, -1, key), 1) + 1)
    if C >= TOP_N_P:
        lo = tl.maximum(tl.min(tl.max(tl.reshape(key, [R, C // TOP_N_P, TOP_N_P]), 1), 1), 0)
    else:
        lo = tl.zeros([R], tl.int32)
    lo = tl.minimum(lo, tl.maximum(hi - 1, 0))
    # each pass leaves at most a third (rounded up) of [lo, hi); passes past convergence change nothing
    span = tl.maximum(tl.max(hi - lo, 0), 1)
    passes = (tl.math.log2(span.to(tl.float32)) * 0.6309297535714574).to(tl.int32) + 2
    for _ in range(0, passes):
        r = (hi - lo).to(tl.int64)
        t1 = lo + ((r + 2) // 3).to(tl.int32)
        t2 = lo + ((2 * r + 2) // 3).to(tl.int32)
        counts = tl.sum((key >= t1[:, None]).to(tl.int32) + ((key >= t2[:, None]).to(tl.int32) << 16), 1)
        ok1 = (counts & 0xFFFF) >= TOP_N
        ok2 = (counts >> 16) >= TOP_N
        new_lo = tl.where(ok2, t2, tl.where(ok1, t1, lo))
        hi = tl.where(ok2, hi, tl.where(ok1, t2, t1))
        lo = new_lo
    above = key > lo[:, None]
    tied = key == lo[:, None]
    need = TOP_N - tl.sum(above.to(tl.int32), 1)
    return above | (tied & (tl.cumsum(tied.to(tl.int32), 1) <= need[:, None]))


@triton.jit
def ranking_keys(scores, cols, last, init_blocks, local_blocks):
    """int32 ranking keys of ``scores [R, C]`` (float32 >= 0 where visible) for rows whose last candidate block
    is ``last [R]`` (see ``top_n_mask``): forced initial and local blocks, -1 past the row's last block."""
    cand = cols[None, :] <= last[:, None]
    forced = cand & ((cols[None, :] < init_blocks) | (cols[None, :] > last[:, None] - local_blocks))
    key = tl.where(forced, 0x7F800000, (scores + 0.0).to(tl.int32, bitcast=True))  # + 0.0: -0.0 becomes +0.0
    return tl.where(cand, key, -1)


@triton.jit
def _topn_whole_rows_kernel(S, CUR, OUT, ssb, ssh, ssr, sss, sob, soh, sor, son, n_rows, num_sel, num_heads,
                            init_blocks, local_blocks, TOP_N: tl.constexpr, NP: tl.constexpr, BLOCK_R: tl.constexpr,
                            COLS: tl.constexpr):
    """``_topn_kernel``'s result for rows held whole in registers (num_sel <= COLS): the ranking keys and the
    counting search of ``top_n_mask``, then each row's chosen columns written in ascending order at their rank
    among the chosen (a prefix count), the remaining slots -1. The search's work grows with the columns held,
    so rows that see only the first quarter or half of them (the causal mask: early queries) hold only those."""
    b, h, offs_r, rmask, cur = _row_block(CUR, n_rows, num_heads, BLOCK_R)
    seen = tl.max(tl.where(rmask, cur, -1))  # the last column any of these rows can see
    if COLS >= 64:
        if seen < COLS // 4:
            _topn_whole_rows(S, OUT, b, h, offs_r, rmask, cur, ssb, ssh, ssr, sss, sob, soh, sor, son, num_sel,
                             init_blocks, local_blocks, TOP_N, NP, BLOCK_R, COLS // 4)
        elif seen < COLS // 2:
            _topn_whole_rows(S, OUT, b, h, offs_r, rmask, cur, ssb, ssh, ssr, sss, sob, soh, sor, son, num_sel,
                             init_blocks, local_blocks, TOP_N, NP, BLOCK_R, COLS // 2)
        else:
            _topn_whole_rows(S, OUT, b, h, offs_r, rmask, cur, ssb, ssh, ssr, sss, sob, soh, sor, son, num_sel,
                             init_blocks, local_blocks, TOP_N, NP, BLOCK_R, COLS)
    else:
        _topn_whole_rows(S, OUT, b, h, offs_r, rmask, cur, ssb, ssh, ssr, sss, sob, soh, sor, son, num_sel,
                         init_blocks, local_blocks, TOP_N, NP, BLOCK_R, COLS)


@triton.jit
def _topn_whole_rows(S, OUT, b, h, offs_r, rmask, cur, ssb, ssh, ssr, sss, sob, soh, sor, son, num_sel, init_blocks,
                     local_blocks, TOP_N: tl.constexpr, NP: tl.constexpr, BLOCK_R: tl.constexpr, COLS: tl.constexpr):
    """``_topn_whole_rows_kernel``'s work on the first COLS columns (all that its rows can see)."""
    cols = tl.arange(0, COLS)
    vis = (cols[None, :] <= cur[:, None]) & (cols[None, :] < num_sel) & rmask[:, None]
    rows_in = b.to(tl.int64) * ssb + h.to(tl.int64) * ssh + offs_r[:, None].to(tl.int64) * ssr
    x = tl.load(S + rows_in + cols[None, :].to(tl.int64) * sss, mask=vis, other=0.0).to(tl.float32)
    chosen = top_n_mask(tl.where(vis, ranking_keys(x, cols, cur, init_blocks, local_blocks), -1), TOP_N, NP)
    rows_out = OUT + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_r[:, None].to(tl.int64) * sor
    rank = tl.cumsum(chosen.to(tl.int32), 1) - 1
    tl.store(rows_out + rank * son, cols[None, :] + tl.zeros_like(rank), mask=chosen)
    count = tl.sum(chosen.to(tl.int32), 1)
    pos_p = tl.arange(0, NP)
    tl.store(rows_out + pos_p[None, :] * son, tl.full([BLOCK_R, NP], -1, tl.int32),
             mask=rmask[:, None] & (pos_p[None, :] >= count[:, None]) & (pos_p[None, :] < TOP_N))


# Benchmarks may change these (rows per program, columns per chunk, warps).
# With fewer programs than TOPN_SPLIT_BELOW_PROGRAMS (decode), columns are split into runs of about
# TOPN_SPLIT_COLUMNS, each run's top-n found by its own program, then merged.
TOPN_SPLIT_BELOW_PROGRAMS = 64
TOPN_SPLIT_COLUMNS = 128
TOPN_LAUNCH = {"block_r": 8, "chunk": 128, "num_warps": 4}  # H100 sweep at 16k: 0.50 ms vs 0.83 with 16 rows
# Rows of at most this many columns (one program's rows held whole) take _topn_whole_rows_kernel: at 64k
# (1024 columns) 3.6 ms with 4 rows / 2 warps against 5.1 for the chunked merge on an H200 (NOTES run 12), 2.6 ms
# with the register cap below (run 13).
TOPN_WHOLE_ROW_MAX = 1024
# "maxnreg": a register cap per thread, or None. Uncapped, 2 warps take 202 registers (4 programs, 8 warps per SM)
# for a search that waits on its own reductions; capped at 96 (24 bytes spilled, 48 with run 14's three column
# widths) 10 programs fit: 2.6 ms against 3.6 at 64k on an H200 (128: 3.1; 4 warps at 96: 3.9; NOTES run 13;
# run 14: 2.44 at 96, 2.39 at 128). Since run 16 the search's bounds spill 456 bytes at 96 and 272 at 128, outside
# the passes' loops: 128 is the faster (1.97 against 2.06 ms, run 16c). Counts are Triton 3.6's (3.9 spills 720
# bytes at 96): check them again with benchmarks/inspect_kernel.py when Triton changes.
TOPN_WHOLE_ROW_LAUNCH = {"block_r": 4, "num_warps": 2, "maxnreg": 128}


def _check(scores, cur_block, top_n, init_blocks, local_blocks):
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4 or not scores.is_floating_point():
        raise ValueError("scores must be a floating-point tensor [B, HKV, R, NSEL]")
    if not isinstance(cur_block, torch.Tensor) or tuple(cur_block.shape) != (scores.shape[2],):
        raise ValueError(f"cur_block must be a tensor of shape [R] = [{scores.shape[2]}]")
    for name, value, low in (("top_n", top_n, 1), ("init_blocks", init_blocks, 0), ("local_blocks", local_blocks, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if top_n < init_blocks + local_blocks:
        raise ValueError(f"top_n ({top_n}) must be >= init_blocks + local_blocks ({init_blocks} + {local_blocks})")


@torch.compiler.disable
@torch.no_grad()
def pick_top_blocks_triton(scores: torch.Tensor, cur_block: torch.Tensor, top_n: int, init_blocks: int,
                           local_blocks: int, splits: Optional[int] = None) -> torch.Tensor:
    """Triton version of ``nsa._pick_in_chunks`` (same arguments and result). ``splits``: programs per row
    block over the columns, each writing a partial top-n list that a second launch merges (decode: one
    row would otherwise walk all columns in one program); default: split only when few programs run
    (on the GPU). The result does not depend on it."""
    _check(scores, cur_block, top_n, init_blocks, local_blocks)
    b, h, rows, nsel = scores.shape
    out = torch.empty(b, h, rows, top_n, dtype=torch.int32, device=scores.device)
    if out.numel() == 0:
        return out
    cur = cur_block.to(device=scores.device, dtype=torch.int32).contiguous()
    block_r = TOPN_LAUNCH["block_r"]
    chunk = min(TOPN_LAUNCH["chunk"], max(16, triton.next_power_of_2(nsel)))
    extra = {"num_warps": TOPN_LAUNCH["num_warps"]} if scores.device.type == "cuda" else {}
    np_ = max(2, triton.next_power_of_2(top_n))
    common = dict(TOP_N=top_n, NP=np_, BLOCK_R=block_r, CHUNK=chunk, NONE=_NONE, **extra)
    row_blocks = triton.cdiv(rows, block_r)
    if splits is None:
        few = scores.device.type == "cuda" and row_blocks * b * h < TOPN_SPLIT_BELOW_PROGRAMS
        splits = triton.cdiv(nsel, TOPN_SPLIT_COLUMNS) if few else 1
    per_split = triton.cdiv(triton.cdiv(nsel, max(1, splits)), chunk) * chunk
    splits = triton.cdiv(nsel, per_split)
    if splits == 1 and nsel <= TOPN_WHOLE_ROW_MAX:
        block_r = TOPN_WHOLE_ROW_LAUNCH["block_r"]
        _topn_whole_rows_kernel[(triton.cdiv(rows, block_r), b * h)](
            scores, cur, out, *scores.stride(), *out.stride(), rows, nsel, h, init_blocks, local_blocks, TOP_N=top_n,
            NP=np_, BLOCK_R=block_r, COLS=max(16, triton.next_power_of_2(nsel)),
            **(launch_options(TOPN_WHOLE_ROW_LAUNCH["num_warps"], max_registers=TOPN_WHOLE_ROW_LAUNCH["maxnreg"])
               if scores.device.type == "cuda" else {}))
        return out
    if splits == 1:
        _topn_kernel[(row_blocks, b * h, 1)](
            scores, cur, cur, out, out, *scores.stride(), *out.stride(), rows, nsel, h, init_blocks, local_blocks, nsel,
            CANDIDATES=False, PARTIAL=False, **common)
        return out
    cand_i = torch.empty(b, h, rows, splits * np_, dtype=torch.int32, device=scores.device)
    cand_v = torch.empty(b, h, rows, splits * np_, dtype=torch.float32, device=scores.device)
    _topn_kernel[(row_blocks, b * h, splits)](
        scores, cur, cur, cand_i, cand_v, *scores.stride(), *cand_i.stride(), rows, nsel, h, init_blocks, local_blocks,
        per_split, CANDIDATES=False, PARTIAL=True, **common)
    width = splits * np_
    common["CHUNK"] = min(chunk, triton.next_power_of_2(width))
    _topn_kernel[(row_blocks, b * h, 1)](
        cand_v, cand_i, cur, out, out, *cand_v.stride(), *out.stride(), rows, width, h, init_blocks, local_blocks, width,
        CANDIDATES=True, PARTIAL=False, **common)
    return out


def pick_top_blocks(scores: torch.Tensor, cur_block: torch.Tensor, *, top_n: int, init_blocks: int, local_blocks: int,
                    backend: str = "auto") -> torch.Tensor:
    """Top-n selection ``[B, HKV, R, top_n]`` int32 from ``scores [B, HKV, R, NSEL]`` (float, >= 0) for rows
    whose query sits in block ``cur_block [R]``: forced initial/local blocks, causal visibility, ties to
    the lower block index, ascending, -1 padded (see the module docstring). ``backend="reference"`` is
    ``nsa._pick_in_chunks``."""
    backend = resolve_backend(backend, scores.device)
    if backend == "triton":
        return pick_top_blocks_triton(scores, cur_block, top_n, init_blocks, local_blocks)
    _check(scores, cur_block, top_n, init_blocks, local_blocks)
    from .nsa import _pick_in_chunks  # the composition's PyTorch ranking is the oracle (imported late: nsa imports us)
    return _pick_in_chunks(scores, cur_block, top_n, init_blocks, local_blocks)


__all__ = ["pick_top_blocks", "pick_top_blocks_triton", "TOPN_LAUNCH"]
