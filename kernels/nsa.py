"""Native sparse attention (arXiv 2502.11089) composed from its primitives.

``nsa_attention`` runs, in order:

1. compression: ``compress_mean`` (training-free) or the caller's learnable ``compress``;
2. ``compressed_attention`` for ``gated`` (its output is a branch) then ``selection_importance``; for
   ``union`` ``compressed_importance`` (the compressed branch only scores blocks there: one kernel finds
   the LSE and the importance, no values read): eq. 9 importance of each selection block, summed over
   the GQA group;
3. top-n with the forced initial and local blocks, deterministic ties (``nsa_topk.pick_top_blocks``;
   ``select_blocks`` is the same step as a public function);
4. attention over the selected blocks and the window: one softmax (``union``) or three gated
   branches (``gated``: ``g_cmp*o_cmp + g_slc*o_slc + g_win*o_win``, fused in ``gated_combine`` so
   that no float32 copy of a branch output is kept for backward).

Every step dispatches to Triton or to its PyTorch reference by ``backend``. With
``granularity="block"`` all queries of a query block share one selection, scored by the queries of
the block before it (so that it stays causal), and the selected tiles
are whole ``l' x l'`` tiles and the selection runs through the block-sparse kernel on a per
(sequence, key/value head) ``BlockLayout`` (full tensor-core tiles instead of one program per
token); where that layout cannot express the semantics (query blocks not aligned to the keys'
blocks, a window shorter than a block in ``union``, a block outside 16..256) the per-token
selected-attention primitive runs instead. ``nsa_ref.nsa_attention_reference`` is the oracle.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import block_sparse_attention, resolve_backend
from .checks import check_qkv, needs_grad
from .layout import EMPTY, BlockLayout, TokenRule, layout_from_rule
from .nsa_compressed import compressed_attention, compressed_importance, selection_importance
from .nsa_ref import (GRANULARITIES, check_compressed, check_gates, check_nsa_params, num_compressed_blocks,
                      split_compress)
from .nsa_decode_kernels import selected_window_decode, token_decode_supported, token_decode_triton
from .nsa_selected import selected_attention, selected_attention_triton, window_layout
from .nsa_topk import pick_top_blocks

# Block granularity runs the selected tiles through the block-sparse kernel when the layout can express them
# (tests switch this off to cover the per-token path with block granularity too).
BLOCK_GRANULARITY_VIA_LAYOUT = True
# At most this many queries without gradient run the split-key decode kernels (their partial buffers grow with
# the number of queries, see nsa_decode_kernels).
DECODE_MAX_QUERIES = 16
# Bytes of the int64 ranking keys that select_blocks materialises at once (rows are processed in chunks).
SELECT_CHUNK_BYTES = 256 * 2**20
_FLOAT_INF_BITS = 0x7F800000  # bit pattern of +inf in float32: above every finite importance


# --------------------------------------------------------------------------- compression
def _check_compression_args(x: torch.Tensor, cmp_block: int, cmp_stride: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dimensions [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    for name, value in (("cmp_block", cmp_block), ("cmp_stride", cmp_stride)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value!r}")
    if cmp_block % cmp_stride:
        raise ValueError(f"cmp_block (l={cmp_block}) must be a multiple of cmp_stride (d={cmp_stride})")


def compress_mean(x: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """Mean of every complete block of ``cmp_block`` tokens taken every ``cmp_stride`` tokens:
    ``x [B, Tk, H, D] -> [B, NC, H, D]``, block ``j`` covering tokens ``[j*d, j*d + l)``.

    Sums stride-sized chunks once and adds ``l/d`` neighbouring chunk sums (no running sum over the
    whole sequence, whose cancellation would cost precision at long lengths). Differentiable."""
    _check_compression_args(x, cmp_block, cmp_stride)
    b, tk, h, d = x.shape
    nc = num_compressed_blocks(tk, cmp_block, cmp_stride)
    if nc == 0:
        return x.new_zeros(b, 0, h, d)
    per_block = cmp_block // cmp_stride
    n_chunks = nc - 1 + per_block  # chunks of d tokens covered by some block
    chunks = x[:, : n_chunks * cmp_stride].reshape(b, n_chunks, cmp_stride, h, d).float().sum(2)
    total = chunks[:, :nc]
    for m in range(1, per_block):
        total = total + chunks[:, m: m + nc]
    return (total / cmp_block).to(x.dtype)


def compress_kv(k: torch.Tensor, v: torch.Tensor, compress, cmp_block: int, cmp_stride: int):
    """``(k_cmp, v_cmp)`` ``[B, NC, HKV, D]``: mean pooling, or the caller's compression (checked)."""
    pair = split_compress(compress)
    if pair is None:
        return compress_mean(k, cmp_block, cmp_stride), compress_mean(v, cmp_block, cmp_stride)
    nc = num_compressed_blocks(k.shape[1], cmp_block, cmp_stride)
    k_cmp, v_cmp = pair[0](k), pair[1](v)
    check_compressed("compress (keys)", k_cmp, k, nc)
    check_compressed("compress (values)", v_cmp, v, nc)
    return k_cmp, v_cmp


# --------------------------------------------------------------------------- selection
def _rank_and_pick(scores: torch.Tensor, cur_block: torch.Tensor, top_n: int, init_blocks: int,
                   local_blocks: int) -> torch.Tensor:
    """Top-n of ``scores [B, HKV, R, NSEL]`` (float32 >= 0) per row; ``cur_block [R]`` is the block holding
    the row's query. Visible blocks are ``s <= cur``; forced ones always win; equal scores go to the lower
    block index. Ties are broken without a sort: a non-negative float32 orders like its bit pattern, so
    ``bits * 2^32 + (2^32 - 1 - s)`` is one int64 key per block, unique within a row."""
    nsel = scores.shape[-1]
    dev = scores.device
    s = torch.arange(nsel, device=dev)
    cur = cur_block.to(dev)[:, None]
    visible = s[None, :] <= cur
    forced = visible & ((s[None, :] < init_blocks) | (s[None, :] > cur - local_blocks))
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns a -0.0 into +0.0
    bits = torch.where(forced, torch.full_like(bits, _FLOAT_INF_BITS), bits)
    key = bits * 2**32 + (2**32 - 1 - s)
    key = torch.where(visible, key, torch.full_like(key, -1))
    width = min(top_n, nsel)
    top = torch.topk(key, width, dim=-1, sorted=False)
    idx = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, nsel))
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx == nsel, torch.full_like(idx, -1), idx).to(torch.int32)
    if width < top_n:
        idx = torch.nn.functional.pad(idx, (0, top_n - width), value=-1)
    return idx


def _pick_in_chunks(scores: torch.Tensor, cur_block: torch.Tensor, top_n: int, init_blocks: int,
                    local_blocks: int) -> torch.Tensor:
    """The PyTorch ranking (oracle of ``nsa_topk.pick_top_blocks``), rows in chunks to bound the int64 keys."""
    b, h, rows, nsel = scores.shape
    step = max(1, SELECT_CHUNK_BYTES // max(1, b * h * nsel * 8 * 3))
    if rows <= step:
        return _rank_and_pick(scores, cur_block, top_n, init_blocks, local_blocks)
    return torch.cat([_rank_and_pick(scores[:, :, r0:r0 + step], cur_block[r0:r0 + step], top_n, init_blocks,
                                     local_blocks) for r0 in range(0, rows, step)], dim=2)


def _candidates(first_positions, *, block: int, window: int, select_outside_window: bool, local_blocks: int):
    """``(last candidate block, local blocks to force)`` of rows whose first position is ``first_positions``
    (a tensor, or one int: the query's, or its query block's first query). Candidates are the blocks up to the
    row's own; with ``select_outside_window`` only those starting before the row's window,
    ``s*block <= position - window`` (floor division: negative when none), none forced as local (the window
    holds them): the ranking kernels see a lower last block."""
    if select_outside_window:
        return (first_positions - window) // block, 0
    return first_positions // block, local_blocks


def _pick_rows(scores: torch.Tensor, first_positions: torch.Tensor, *, block: int, window: int,
               select_outside_window: bool, top_n: int, init_blocks: int, local_blocks: int,
               backend: str) -> torch.Tensor:
    """``pick_top_blocks`` for rows whose first position is ``first_positions`` (see ``_candidates``)."""
    last, local = _candidates(first_positions, block=block, window=window, select_outside_window=select_outside_window,
                              local_blocks=local_blocks)
    return pick_top_blocks(scores, last, top_n=top_n, init_blocks=init_blocks, local_blocks=local, backend=backend)


def query_block_importance(importance: torch.Tensor, q_start: int, block: int,
                           prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum ``importance [B, HKV, Tq, NSEL]`` over the queries of each query block (absolute positions
    ``[c*l', (c+1)*l')``; the queries sit at ``q_start .. q_start + Tq - 1``) -> ``[B, HKV, NQB, NSEL]``.

    ``prefix [B, HKV, n <= NSEL]`` is added to the first query block: the importance its earlier
    queries (not in this call, e.g. before a decode step) already gathered. Sums are taken in a fixed
    order (no atomics) so that the selection is reproducible."""
    b, h, tq, nsel = importance.shape
    head = min(tq, (-q_start) % block)  # rows before the first block boundary
    parts = []
    if head:
        parts.append(importance[:, :, :head].sum(2, keepdim=True))
    whole = (tq - head) // block
    if whole:
        parts.append(importance[:, :, head: head + whole * block].reshape(b, h, whole, block, nsel).sum(3))
    if head + whole * block < tq:
        parts.append(importance[:, :, head + whole * block:].sum(2, keepdim=True))
    per_block = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
    if prefix is not None:
        first = per_block[:, :, :1] + _block_sums_row("prefix", prefix, b, h, nsel)
        per_block = torch.cat([first, per_block[:, :, 1:]], 2)
    return per_block


def _block_sums_row(name: str, sums: torch.Tensor, b: int, h: int, nsel: int) -> torch.Tensor:
    """A kept query-block sum ``[B, HKV, n <= NSEL]`` (fewer columns: blocks that did not exist yet) as one
    ``[B, HKV, 1, NSEL]`` float32 row."""
    if sums.shape[:2] != (b, h) or sums.shape[-1] > nsel:
        raise ValueError(f"{name} must have shape [B, HKV, n <= {nsel}] = [{b}, {h}, ...], got {tuple(sums.shape)}")
    return torch.nn.functional.pad(sums.float(), (0, nsel - sums.shape[-1]))[:, :, None]


def block_selection_scores(importance: torch.Tensor, q_start: int, block: int,
                           prefix: Optional[torch.Tensor] = None,
                           previous: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Selection scores ``[B, HKV, NQB, NSEL]`` of the query blocks holding the queries of ``importance
    [B, HKV, Tq, NSEL]`` (absolute positions from ``q_start``) under block granularity.

    Query block ``c`` is scored by the importance summed over the queries of block ``c - 1``, so that a
    selection never depends on a query at or after the block's first position (a block scored by its own
    queries would let early queries see later ones in a prefill). The first block of the call takes
    ``previous [B, HKV, n <= NSEL]`` (the finished sum of the block before it, kept by a decode cache) or
    zeros (only its forced blocks are chosen then); ``prefix`` completes the first block's own sum with its
    queries that came before ``q_start`` (see ``query_block_importance``)."""
    return _scores_from_previous_block(query_block_importance(importance, q_start, block, prefix), previous)


def _scores_from_previous_block(per_block: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
    b, h, _, nsel = per_block.shape
    if previous is None:
        first = per_block.new_zeros(b, h, 1, nsel)
    else:
        first = _block_sums_row("previous", previous, b, h, nsel)
    return torch.cat([first, per_block[:, :, :-1]], 2)


def select_blocks(importance: torch.Tensor, *, top_n: int, block: int, init_blocks: int = 1, local_blocks: int = 2,
                  q_positions: Optional[torch.Tensor] = None, kv_len: Optional[int] = None,
                  granularity: str = "token", prefix: Optional[torch.Tensor] = None,
                  previous: Optional[torch.Tensor] = None, backend: str = "auto", window: int = 0,
                  select_outside_window: bool = False) -> torch.Tensor:
    """Selected blocks ``[B, HKV, Tq, top_n]`` int32 from ``importance [B, HKV, Tq, NSEL]`` (float32).

    Query ``i`` sits at ``q_positions[i]`` (default ``kv_len - Tq + i``); it sees blocks ``s`` with
    ``s*block <= position``. The first ``init_blocks`` blocks and the ``local_blocks`` blocks ending at the
    query's own block are always chosen; the rest by importance, ties to the lower block index; fewer
    visible blocks than ``top_n`` are all chosen. Rows are sorted ascending and padded with -1.
    ``granularity="block"``: one selection per query block of ``block`` positions, from the importance
    summed over the queries of the block before it (causal: no query's selection depends on a later query;
    ``prefix``/``previous``, see ``block_selection_scores``); positions must then be consecutive.
    ``backend``: the ranking runs in Triton (``nsa_topk``) or in PyTorch (the oracle).
    ``select_outside_window``: candidates are only the blocks starting before the query's ``window`` (see
    ``nsa_ref``); ``window`` is used only then."""
    check_nsa_params(block=block, top_n=top_n, window=window, cmp_block=block, cmp_stride=block, init_blocks=init_blocks,
                     local_blocks=local_blocks, combine="union", granularity=granularity,
                     select_outside_window=select_outside_window)
    if not isinstance(importance, torch.Tensor) or importance.dim() != 4 or not importance.is_floating_point():
        raise ValueError("importance must be a floating-point tensor [B, HKV, Tq, NSEL]")
    tq = importance.shape[2]
    if q_positions is None:
        if kv_len is None:
            raise ValueError("select_blocks needs q_positions or kv_len (queries at kv_len - Tq .. kv_len - 1)")
        q_positions = torch.arange(kv_len - tq, kv_len, device=importance.device)
    q_positions = torch.as_tensor(q_positions, device=importance.device).long()
    if tuple(q_positions.shape) != (tq,):
        raise ValueError(f"q_positions must have shape [Tq] = [{tq}], got {tuple(q_positions.shape)}")
    pick = dict(block=block, window=window, select_outside_window=select_outside_window, top_n=top_n,
                init_blocks=init_blocks, local_blocks=local_blocks, backend=backend)
    if granularity == "token":
        return _pick_rows(importance, q_positions, **pick)
    q_start = int(q_positions[0])
    if tq and not torch.equal(q_positions, torch.arange(q_start, q_start + tq, device=importance.device)):
        raise ValueError("granularity='block' needs consecutive q_positions")
    scores = block_selection_scores(importance, q_start, block, prefix, previous)
    first = q_start // block
    blocks = torch.arange(first, first + scores.shape[2], device=importance.device)
    chosen = _pick_rows(scores, blocks * block, **pick)
    return chosen[:, :, q_positions // block - first]


# --------------------------------------------------------------------------- selection as a block layout
def _layout_expresses(granularity: str, combine: str, block: int, window: int, q_len: int, kv_len: int) -> bool:
    """Whether the block-granularity selection (with the window for union) is exactly a tile layout."""
    return (BLOCK_GRANULARITY_VIA_LAYOUT and granularity == "block" and 16 <= block <= 256
            and (kv_len - q_len) % block == 0
            # in union the layout's one token rule (causal + window) also masks the diagonal selected tile
            and (combine == "gated" or window == 0 or window >= block))


@functools.lru_cache(maxsize=16)
def _rule_tiles(q_len: int, kv_len: int, block: int, window: int, device: str):
    """``(causal, window)`` tile classes of ``selection_layout``, cached per shape: built on every call they were
    about forty small launches of host work, which at 8k-16k kept the GPU waiting (NOTES run 16)."""
    causal = layout_from_rule(TokenRule(causal=True), q_len, kv_len, block, block, device=device).tile_class
    win = (layout_from_rule(TokenRule(causal=True, window=window), q_len, kv_len, block, block,
                            device=device).tile_class if window > 0 else None)
    return causal, win


def selection_layout(chosen: torch.Tensor, q_len: int, kv_len: int, block: int, window: int = 0) -> BlockLayout:
    """BlockLayout ``[B, HKV, NQB, NKB]`` of block-granularity selections ``chosen [B, HKV, NQB, top_n]`` with
    ``block x block`` tiles (queries aligned to key blocks), optionally united with a causal window."""
    b, h, nqb, _ = chosen.shape
    dev = chosen.device
    nkb = math.ceil(kv_len / block)
    causal, win = _rule_tiles(q_len, kv_len, block, window, str(dev))
    hit = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=dev)
    hit.scatter_(-1, torch.where(chosen < 0, torch.full_like(chosen, nkb), chosen).long(), True)
    cls = torch.where(hit[..., :nkb], causal, torch.zeros((), dtype=torch.int8, device=dev))
    if window > 0:
        rule = TokenRule(causal=True, window=window)
        cls = torch.maximum(cls, win)  # EMPTY < PARTIAL < FULL: a selected tile needs no window mask
    else:
        rule = TokenRule(causal=True)
    return BlockLayout(q_len, kv_len, block, block, cls.to(torch.int8).contiguous(), rule, name="nsa_selection",
                       full_width_lists=True)


# --------------------------------------------------------------------------- gated combination
@triton.jit
def _gate_fwd_kernel(G, O1, O2, O3, OUT, n_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)
    rmask = rows < n_rows
    at = rows[:, None].to(tl.int64) * HEAD_DIM + cols[None, :]
    g1 = tl.load(G + rows.to(tl.int64) * 3, mask=rmask, other=0.0).to(tl.float32)[:, None]
    g2 = tl.load(G + rows.to(tl.int64) * 3 + 1, mask=rmask, other=0.0).to(tl.float32)[:, None]
    g3 = tl.load(G + rows.to(tl.int64) * 3 + 2, mask=rmask, other=0.0).to(tl.float32)[:, None]
    acc = g1 * tl.load(O1 + at, mask=rmask[:, None], other=0.0).to(tl.float32)
    acc += g2 * tl.load(O2 + at, mask=rmask[:, None], other=0.0).to(tl.float32)
    acc += g3 * tl.load(O3 + at, mask=rmask[:, None], other=0.0).to(tl.float32)
    tl.store(OUT + at, acc.to(OUT.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _gate_grad_one(G, O, D, DG, i: tl.constexpr, rows, at, rmask, do):
    g = tl.load(G + rows.to(tl.int64) * 3 + i, mask=rmask, other=0.0).to(tl.float32)
    o = tl.load(O + at, mask=rmask[:, None], other=0.0).to(tl.float32)
    tl.store(D + at, (g[:, None] * do).to(D.dtype.element_ty), mask=rmask[:, None])
    tl.store(DG + rows.to(tl.int64) * 3 + i, tl.sum(do * o, axis=1).to(DG.dtype.element_ty), mask=rmask)


@triton.jit
def _gate_bwd_kernel(G, O1, O2, O3, DO, DG, D1, D2, D3, n_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """d o_i = g_i * dout; d g_i = <dout, o_i> over the head dimension (float32)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HEAD_DIM)
    rmask = rows < n_rows
    at = rows[:, None].to(tl.int64) * HEAD_DIM + cols[None, :]
    do = tl.load(DO + at, mask=rmask[:, None], other=0.0).to(tl.float32)
    _gate_grad_one(G, O1, D1, DG, 0, rows, at, rmask, do)
    _gate_grad_one(G, O2, D2, DG, 1, rows, at, rmask, do)
    _gate_grad_one(G, O3, D3, DG, 2, rows, at, rmask, do)


GATE_ROWS = 16  # rows of [head_dim] per program of the gate kernels (elementwise: any size is fine)


class _GatedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, o1, o2, o3):
        gates, o1, o2, o3 = (t.contiguous() for t in (gates, o1, o2, o3))
        d = o1.shape[-1]
        rows = o1.numel() // d
        out = torch.empty_like(o1)
        _gate_fwd_kernel[(triton.cdiv(rows, GATE_ROWS),)](gates, o1, o2, o3, out, rows, HEAD_DIM=d, BLOCK_R=GATE_ROWS)
        ctx.save_for_backward(gates, o1, o2, o3)
        return out

    @staticmethod
    def backward(ctx, dout):
        gates, o1, o2, o3 = ctx.saved_tensors
        dout = dout.contiguous()
        d = o1.shape[-1]
        rows = o1.numel() // d
        dg = torch.empty_like(gates)
        d1, d2, d3 = torch.empty_like(o1), torch.empty_like(o2), torch.empty_like(o3)
        _gate_bwd_kernel[(triton.cdiv(rows, GATE_ROWS),)](gates, o1, o2, o3, dout, dg, d1, d2, d3, rows, HEAD_DIM=d,
                                                           BLOCK_R=GATE_ROWS)
        return dg, d1, d2, d3


def gated_combine(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, *,
                  backend: str = "auto") -> torch.Tensor:
    """``g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`` with ``gates [B, Tq, HQ, 3]`` and branch outputs
    ``[B, Tq, HQ, D]``, summed in float32 and rounded once to the outputs' dtype. Differentiable in all four.
    The Triton form keeps no float32 copies (the PyTorch form holds several, 4 bytes per element each)."""
    backend = resolve_backend(backend, o_cmp.device)
    same = o_cmp.dtype == o_slc.dtype == o_win.dtype and o_cmp.shape == o_slc.shape == o_win.shape
    if backend == "triton" and same and (o_cmp.shape[-1] & (o_cmp.shape[-1] - 1)) == 0:
        return _GatedCombine.apply(gates, o_cmp, o_slc, o_win)
    g = gates.float()
    return (g[..., 0:1] * o_cmp.float() + g[..., 1:2] * o_slc.float() + g[..., 2:3] * o_win.float()).to(o_cmp.dtype)


# --------------------------------------------------------------------------- composition
def _window_branch(q, k, v, window: int, scale: float, backend: str):
    b, tq, hq, d = q.shape
    if window == 0:
        return q.new_zeros(b, tq, hq, d), torch.full((b, tq, hq), -math.inf, device=q.device)
    layout = window_layout(tq, k.shape[1], window, d, q.device)
    out, lse = block_sparse_attention(q, k, v, layout, scale, backend=backend, return_lse=True)
    return out, lse.transpose(1, 2)


def nsa_from_compressed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, *,
                        block: int, top_n: int, window: int, cmp_block: int, cmp_stride: int, init_blocks: int,
                        local_blocks: int, combine: str, granularity: str, gates: Optional[torch.Tensor],
                        scale: float, backend: str, block_prefix: Optional[torch.Tensor] = None,
                        block_previous: Optional[torch.Tensor] = None, select_outside_window: bool = False):
    """NSA given compressed keys/values (arguments already checked, backend resolved).

    Returns ``(out, parts)`` where ``parts`` holds what was computed anyway: ``importance``,
    ``chosen`` (per token, or per query block with ``chosen_per_block``), the LSEs and, for gated,
    the branch outputs. ``block_prefix``/``block_previous``: see ``block_selection_scores`` (decode);
    block granularity also leaves ``block_importance``, the per-query-block sums (for the decode cache)."""
    tq, tk = q.shape[1], k.shape[1]
    kw = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, scale=scale, kv_len=tk, backend=backend)
    parts = {}
    # one token and nothing to differentiate (gates and a learned compression included): three launches
    if (not needs_grad(q, k, v, k_cmp, v_cmp, gates) and backend == "triton" and granularity == "token"
            and token_decode_supported(q, k_cmp, block=block, cmp_block=cmp_block, cmp_stride=cmp_stride, kv_len=tk)):
        last, local = _candidates(tk - 1, block=block, window=window, select_outside_window=select_outside_window,
                                  local_blocks=local_blocks)
        return token_decode_triton(q, k, v, k_cmp, v_cmp, block=block, top_n=top_n, window=window,
                                   cmp_block=cmp_block, cmp_stride=cmp_stride, init_blocks=init_blocks,
                                   last_candidate=last, local_blocks=local, scale=scale, combine=combine, gates=gates)
    if combine == "union":  # the compressed branch only scores blocks here: its LSE is found and used in place
        importance = compressed_importance(q.detach(), k_cmp.detach(), block=block, **kw)
    else:
        o_cmp, lse_cmp = compressed_attention(q, k_cmp, v_cmp, **kw)
        importance = selection_importance(q.detach(), k_cmp.detach(), lse_cmp, block=block, **kw)
    parts["importance"] = importance

    q_start = tk - tq
    # a few queries with no gradient (decoding) take the split-key kernels: one token alone would leave
    # the per-token kernels with HKV programs walking all its keys serially
    few_queries = tq <= DECODE_MAX_QUERIES and not needs_grad(q, k, v)
    by_layout = not few_queries and _layout_expresses(granularity, combine, block, window, tq, tk)
    pick = dict(block=block, window=window, select_outside_window=select_outside_window, top_n=top_n,
                init_blocks=init_blocks, local_blocks=local_blocks, backend=backend)
    with torch.no_grad():
        if granularity == "token":
            chosen = _pick_rows(importance, torch.arange(q_start, tk, device=q.device), **pick)
        else:
            per_block = query_block_importance(importance, q_start, block, block_prefix)
            scores = _scores_from_previous_block(per_block, block_previous)
            first = q_start // block
            starts = torch.arange(first, first + scores.shape[2], device=q.device) * block
            chosen = _pick_rows(scores, starts, **pick)
            parts["block_importance"] = per_block
            parts["chosen_per_block"] = True
            if not by_layout:
                chosen = chosen[:, :, torch.arange(q_start, tk, device=q.device) // block - first]
                parts["chosen_per_block"] = False
    parts["chosen"] = chosen

    def selected_branch(with_window: int):
        if few_queries:
            return selected_window_decode(q, k, v, chosen, block=block, scale=scale, window=with_window,
                                          backend=backend)
        if by_layout:
            layout = selection_layout(chosen, tq, tk, block, with_window)
            out, lse = block_sparse_attention(q, k, v, layout, scale, backend=backend, return_lse=True)
            return out, lse.transpose(1, 2)
        if backend == "triton":  # the top-n's rows: sorted, -1 last
            return selected_attention_triton(q, k, v, chosen, block=block, scale=scale, window=with_window,
                                             rows_from_top_n=True)
        return selected_attention(q, k, v, chosen, block=block, scale=scale, window=with_window, backend=backend)

    if combine == "union":
        out, lse = selected_branch(window)
        parts["lse"] = lse
        return out, parts
    o_slc, lse_slc = selected_branch(0)
    if few_queries and window > 0:  # the window alone: no selected slot, split-key window parts
        nothing = torch.full((*chosen.shape[:3], 1), -1, dtype=torch.int32, device=q.device)
        o_win, lse_win = selected_window_decode(q, k, v, nothing, block=block, scale=scale, window=window,
                                                backend=backend)
    else:
        o_win, lse_win = _window_branch(q, k, v, window, scale, backend)
    out = gated_combine(gates, o_cmp, o_slc, o_win, backend=backend)
    parts.update(o_cmp=o_cmp, o_slc=o_slc, o_win=o_win, lse_cmp=lse_cmp, lse_slc=lse_slc, lse_win=lse_win)
    return out, parts


def build_aux(parts: dict, combine: str, q_start: int, tq: int, block: int) -> dict:
    """The ``aux`` dict of ``nsa_attention`` from what ``nsa_from_compressed`` computed."""
    chosen = parts["chosen"]
    if parts.get("chosen_per_block"):
        first = q_start // block
        chosen = chosen[:, :, torch.arange(q_start, q_start + tq, device=chosen.device) // block - first]
    aux = {"block_idx": chosen.contiguous(), "block_count": (chosen >= 0).sum(-1, dtype=torch.int32),
           "importance": parts["importance"]}
    names = ("lse",) if combine == "union" else ("o_cmp", "o_slc", "o_win", "lse_cmp", "lse_slc", "lse_win")
    aux.update({name: parts[name] for name in names})
    return aux


def nsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int = 64, top_n: int = 16,
                  window: int = 512, cmp_block: int = 32, cmp_stride: int = 16, init_blocks: int = 1,
                  local_blocks: int = 2, combine: str = "union", granularity: str = "token",
                  gates: Optional[torch.Tensor] = None, compress=None, scale: Optional[float] = None,
                  backend: str = "auto", return_aux: bool = False, select_outside_window: bool = False):
    """Native sparse attention of ``q [B, Tq, HQ, D]`` over ``k, v [B, Tk, HKV, D]`` (queries at the last Tq
    positions); semantics in ``nsa_ref`` (the oracle) and the module docstring.

    ``block`` (l'), ``top_n`` (n), ``window`` (w), ``cmp_block``/``cmp_stride`` (l, d), ``init_blocks`` and
    ``local_blocks`` (always selected); ``combine="union"`` (one softmax over selected blocks and window) or
    ``"gated"`` (needs ``gates [B, Tq, HQ, 3]``: g_cmp, g_slc, g_win); ``granularity="token"`` or ``"block"``;
    ``compress``: None (mean pooling), a callable/nn.Module ``[B, Tk, HKV, D] -> [B, NC, HKV, D]`` or a pair
    (keys, values); ``select_outside_window``: the top-n slots go only to blocks starting before the query's
    window (the union's window holds the rest; no local block is forced; see ``nsa_ref``). Gradients reach q, k, v, gates and the compression's parameters (through the
    compressed branch, used for the output only by ``gated``). ``backend``: "auto" (Triton on CUDA),
    "triton" or "reference".

    Returns ``out [B, Tq, HQ, D]``; with ``return_aux`` ``(out, aux)``: ``block_idx [B, HKV, Tq, top_n]``
    int32 (ascending, -1 padded), ``block_count [B, HKV, Tq]`` int32, ``importance [B, HKV, Tq, NSEL]``
    float32 (per query), ``lse [B, Tq, HQ]`` (union) or ``o_cmp/o_slc/o_win``, ``lse_cmp/lse_slc/lse_win``
    (gated). The aux tensors are computed anyway; asking for them costs only the block-granularity
    index expansion.
    """
    check_nsa_params(block=block, top_n=top_n, window=window, cmp_block=cmp_block, cmp_stride=cmp_stride,
                     init_blocks=init_blocks, local_blocks=local_blocks, combine=combine, granularity=granularity,
                     backend=backend, select_outside_window=select_outside_window)
    scale = check_qkv(q, k, v, scale)
    check_gates(gates, combine, q)
    backend = resolve_backend(backend, q.device)
    k_cmp, v_cmp = compress_kv(k, v, compress, cmp_block, cmp_stride)
    out, parts = nsa_from_compressed(q, k, v, k_cmp, v_cmp, block=block, top_n=top_n, window=window,
                                     cmp_block=cmp_block, cmp_stride=cmp_stride, init_blocks=init_blocks,
                                     local_blocks=local_blocks, combine=combine, granularity=granularity, gates=gates,
                                     scale=scale, backend=backend, select_outside_window=select_outside_window)
    if not return_aux:
        return out
    return out, build_aux(parts, combine, k.shape[1] - q.shape[1], q.shape[1], block)


__all__ = ["nsa_attention", "compress_mean", "compress_kv", "select_blocks", "query_block_importance",
           "block_selection_scores",
           "selection_layout", "gated_combine", "nsa_from_compressed", "GRANULARITIES"]
