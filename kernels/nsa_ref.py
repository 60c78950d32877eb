"""Native sparse attention (arXiv 2502.11089) written the slow, obvious way: the test oracle.

``nsa_attention_reference`` has the signature of ``nsa.nsa_attention`` and computes the same thing
with token-level masks, chunk by chunk over the queries, without any of the NSA primitives
(compressed/selected attention kernels or their references), so that a shared mistake cannot hide.

What it computes, for a query at absolute position ``p`` (query ``i`` of ``Tq`` sits at
``p = Tk - Tq + i``):

1. Compressed keys/values: block ``j`` covers tokens ``[j*d, j*d + l)`` (``l = cmp_block``,
   ``d = cmp_stride``); only complete blocks exist; the default compression is the mean.
   The query sees compressed block ``j`` iff ``j*d + l - 1 <= p``.
2. Compressed-branch probabilities ``p_cmp`` (softmax of the scaled scores over visible blocks).
3. Importance of selection block ``s`` (tokens ``[s*l', (s+1)*l')``, ``l' = block``):
   ``sum_j p_cmp[j] * |cmp block j ∩ selection block s| / d`` (the paper's eq. 9 written as
   token overlap: for l=32, d=16, l'=64 it weighs compressed blocks 4s-1 .. 4s+3 by 1,2,2,2,1;
   when l = l' = d it is p_cmp itself), summed over the query heads of a GQA group.
   With ``granularity="block"`` query block ``c`` (absolute positions ``[c*l', (c+1)*l')``) is
   scored by the importance summed over the queries of block ``c - 1`` that are present in ``q``
   (none for the first block of ``q``: only forced blocks are chosen there), so that no selection
   depends on a query at or after the block's start: causal, like the token granularity.
4. Selection: the ``top_n`` visible blocks (``s*l' <= p``, or ``s <= c`` for a query block ``c``)
   of highest importance, where the first ``init_blocks`` blocks and the ``local_blocks`` blocks
   ending at the query's own block always win and ties go to the lower block index; fewer
   visible blocks than ``top_n`` are all taken. Keys of a selected block after ``p`` are masked.
   With ``select_outside_window=True`` the candidates are only the blocks that start before the
   window, ``s*l' <= p - w`` (for a query block: ``p = c*l'``, its first query, whose window lies
   inside every later query's one): a block starting inside the window is all window already, so
   the ``top_n`` slots go to blocks the window does not reach. The local blocks are then not forced
   (the window must cover them: ``w >= local_blocks*l'``); forced initial blocks stay forced when
   they are candidates.
5. Window: the ``window`` most recent keys ``p - window < t <= p``.
6. ``union``: one softmax over selected ∪ window keys; ``gated``:
   ``g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`` with caller-given gates ``[B, Tq, HQ, 3]``.

A query with nothing to attend to in a branch gets 0 there and LSE -inf. The argument checks
(``check_nsa_params``, ``check_gates``, ``split_compress``) live here and are shared with ``nsa.py``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from .checks import check_qkv, needs_grad

DEFAULT_MAX_BYTES = 256 * 2**20
COMBINES = ("union", "gated")
GRANULARITIES = ("token", "block")
BACKENDS = ("auto", "triton", "reference")


# --------------------------------------------------------------------------- argument checks
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _power_of_two(name: str, value) -> None:
    if not _is_int(value) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two (1, 2, 4, ...), got {value!r}")


def _non_negative(name: str, value) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def check_nsa_params(*, block, top_n, window, cmp_block, cmp_stride, init_blocks, local_blocks, combine,
                     granularity, backend="auto", select_outside_window=False) -> None:
    """Validate the NSA hyper-parameters; one ValueError naming the parameter and what is allowed."""
    _power_of_two("block (selection block l')", block)
    _power_of_two("cmp_block (compression block l)", cmp_block)
    _power_of_two("cmp_stride (compression stride d)", cmp_stride)
    if not _is_int(top_n) or top_n < 1:
        raise ValueError(f"top_n must be an integer >= 1, got {top_n!r}")
    _non_negative("window", window)
    _non_negative("init_blocks", init_blocks)
    _non_negative("local_blocks", local_blocks)
    if cmp_block % cmp_stride:
        raise ValueError(f"cmp_block (l={cmp_block}) must be a multiple of cmp_stride (d={cmp_stride})")
    if block % cmp_stride:
        raise ValueError(f"block (l'={block}) must be a multiple of cmp_stride (d={cmp_stride})")
    if top_n < init_blocks + local_blocks:
        raise ValueError(f"top_n ({top_n}) must be >= init_blocks + local_blocks ({init_blocks} + {local_blocks}), "
                         "the blocks that are always selected")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(select_outside_window, bool):
        raise ValueError(f"select_outside_window must be True or False, got {select_outside_window!r}")
    if select_outside_window and window < local_blocks * block:
        raise ValueError(f"select_outside_window=True leaves the local blocks to the window: window ({window}) must be "
                         f">= local_blocks * block ({local_blocks} * {block}); lower local_blocks or widen the window")


def check_gates(gates: Optional[torch.Tensor], combine: str, q: torch.Tensor) -> None:
    """``gated`` needs gates ``[B, Tq, HQ, 3]`` (cmp, slc, win); ``union`` has no gates."""
    if combine == "union":
        if gates is not None:
            raise ValueError("gates are only used with combine='gated'; combine='union' takes one softmax over the "
                             "selected blocks and the window and must get gates=None")
        return
    if gates is None:
        raise ValueError("combine='gated' needs gates [batch, q_len, q_heads, 3] (g_cmp, g_slc, g_win)")
    if not isinstance(gates, torch.Tensor):
        raise TypeError(f"gates must be a torch.Tensor, got {type(gates).__name__}")
    expected = (*q.shape[:3], 3)
    if tuple(gates.shape) != expected:
        raise ValueError(f"gates must have shape [batch, q_len, q_heads, 3] = {list(expected)}, got {list(gates.shape)}")
    if not gates.is_floating_point():
        raise ValueError(f"gates must be a floating-point tensor, got {gates.dtype}")
    if gates.device != q.device:
        raise ValueError(f"gates are on {gates.device} but q is on {q.device}")


Compress = Callable[[torch.Tensor], torch.Tensor]


def split_compress(compress) -> Optional[Tuple[Compress, Compress]]:
    """``None`` (mean pooling), one callable used for keys and values, or a pair ``(compress_k, compress_v)``."""
    if compress is None:
        return None
    if isinstance(compress, (tuple, list)):
        if len(compress) != 2 or not all(callable(c) for c in compress):
            raise TypeError("compress as a pair must be (compress_k, compress_v), two callables")
        return compress[0], compress[1]
    if not callable(compress):
        raise TypeError(f"compress must be None, a callable/nn.Module or a pair of them, got {type(compress).__name__}")
    return compress, compress


def num_compressed_blocks(kv_len: int, cmp_block: int, cmp_stride: int) -> int:
    """Number of complete compression blocks ``j`` with ``j*d + l <= kv_len``."""
    return 0 if kv_len < cmp_block else (kv_len - cmp_block) // cmp_stride + 1


def check_compressed(name: str, x_cmp, source: torch.Tensor, num_blocks: int) -> None:
    """A compression's output must be ``[B, NC, HKV, D]`` on the source's device."""
    if not isinstance(x_cmp, torch.Tensor):
        raise TypeError(f"{name} must return a torch.Tensor, got {type(x_cmp).__name__}")
    b, _, h, d = source.shape
    if tuple(x_cmp.shape) != (b, num_blocks, h, d):
        raise ValueError(f"{name} must map [B, Tk, HKV, D] = {list(source.shape)} to [B, NC, HKV, D] = "
                         f"{[b, num_blocks, h, d]} (NC complete blocks of cmp_block with cmp_stride), got {list(x_cmp.shape)}")
    if x_cmp.device != source.device:
        raise ValueError(f"{name} returned a tensor on {x_cmp.device}, expected {source.device}")


# --------------------------------------------------------------------------- naive pieces
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 is kept so that finite-difference gradient checks are meaningful
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mean_blocks(x: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    nc = num_compressed_blocks(x.shape[1], cmp_block, cmp_stride)
    blocks = [x[:, j * cmp_stride: j * cmp_stride + cmp_block].mean(1) for j in range(nc)]
    if not blocks:
        return x.new_zeros(x.shape[0], 0, *x.shape[2:])
    return torch.stack(blocks, 1)


def _overlap_weights(nc: int, nsel: int, cmp_block: int, cmp_stride: int, block: int, device, dtype) -> torch.Tensor:
    """``W[j, s] = |[j d, j d + l) ∩ [s l', (s+1) l')| / d``: how much of compressed block j lies in selection block s."""
    j = torch.arange(nc, device=device, dtype=torch.float64)[:, None]
    s = torch.arange(nsel, device=device, dtype=torch.float64)[None, :]
    lo = torch.maximum(j * cmp_stride, s * block)
    hi = torch.minimum(j * cmp_stride + cmp_block, (s + 1) * block)
    return ((hi - lo).clamp(min=0) / cmp_stride).to(dtype)


def _attend(q_rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float):
    """Softmax attention of ``q_rows [B, r, HQ, D]`` over ``keys, values [B, S, HKV, D]`` where ``mask``
    (broadcast to ``[B, HKV, r, S]``) allows. Returns ``(out [B, r, HQ, D], p [B, HKV, G, r, S],
    lse [B, r, HQ])`` in the work dtype; a row that sees nothing gives 0 and LSE -inf (no NaN, in
    the gradient either: the row maximum is detached and an empty row divides by 1)."""
    b, r, hq, d = q_rows.shape
    hkv = keys.shape[2]
    g = hq // hkv
    work = _work_dtype(q_rows.dtype)
    if keys.shape[1] == 0:
        zeros = q_rows.new_zeros(b, r, hq, d, dtype=work)
        return zeros, q_rows.new_zeros(b, hkv, g, r, 0, dtype=work), q_rows.new_full((b, r, hq), -math.inf, dtype=work)
    scores = torch.einsum("brhgd,bshd->bhgrs", q_rows.to(work).reshape(b, r, hkv, g, d), keys.to(work)) * scale
    allowed = mask[:, :, None]
    scores = scores.masked_fill(~allowed, -math.inf)
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhgrs,bshd->brhgd", p, values.to(work)).reshape(b, r, hq, d)
    lse = (torch.log(denom) + row_max).detach().squeeze(-1)  # [B, HKV, G, r]
    return out, p, lse.permute(0, 3, 1, 2).reshape(b, r, hq)


def _select(importance: torch.Tensor, cur_block: torch.Tensor, *, top_n: int, init_blocks: int, local_blocks: int,
            window_from: Optional[torch.Tensor] = None, block: int = 0):
    """Per row: forced blocks, then the most important visible ones (stable sort: lower index wins ties).
    ``importance [B, HKV, R, NSEL]``, ``cur_block [R]`` (the block holding the query, or the query block).
    ``window_from [R]`` (select_outside_window): the first position of each row's window; blocks of ``block``
    tokens starting there or later are no candidates and no block is forced as local."""
    nsel = importance.shape[-1]
    s = torch.arange(nsel, device=importance.device)[None, :]
    cur = cur_block[:, None]
    visible = s <= cur
    if window_from is None:
        forced = visible & ((s < init_blocks) | (s > cur - local_blocks))
    else:
        visible = visible & (s * block < window_from[:, None])
        forced = visible & (s < init_blocks)
    score = importance.to(torch.float64)
    score = torch.where(forced, torch.full_like(score, math.inf), score)
    score = torch.where(visible, score, torch.full_like(score, -math.inf))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :top_n]
    taken = torch.gather(visible.expand_as(score), -1, order)
    idx = torch.where(taken, order, torch.full_like(order, nsel))  # unused slots sort last
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx == nsel, torch.full_like(idx, -1), idx)
    if idx.shape[-1] < top_n:
        idx = torch.nn.functional.pad(idx, (0, top_n - idx.shape[-1]), value=-1)
    return idx.to(torch.int32)


def _selected_token_mask(block_idx: torch.Tensor, block: int, kv_len: int, q_pos: torch.Tensor) -> torch.Tensor:
    """Keys of the selected blocks that are not after the query: bool ``[B, HKV, r, Tk]``."""
    b, h, r, _ = block_idx.shape
    nsel = math.ceil(kv_len / block)
    chosen = torch.zeros(b, h, r, nsel + 1, dtype=torch.bool, device=block_idx.device)
    slot = torch.where(block_idx < 0, torch.full_like(block_idx, nsel), block_idx).long()
    chosen.scatter_(-1, slot, True)
    t = torch.arange(kv_len, device=block_idx.device)
    return chosen[..., t // block] & (t[None, :] <= q_pos[:, None])


def _window_mask(window: int, kv_len: int, q_pos: torch.Tensor) -> torch.Tensor:
    t = torch.arange(kv_len, device=q_pos.device)[None, :]
    diff = q_pos[:, None] - t
    return ((diff >= 0) & (diff < window))[None, None]  # [1, 1, r, Tk]


def _chunk_rows(batch: int, heads: int, width: int, max_bytes: int) -> int:
    # scores, exponentials, probabilities and masks: about 16 bytes per (row, key, head)
    return max(1, int(max_bytes // max(1, batch * heads * max(width, 1) * 16)))


def _branches(q_rows, k, v, k_cmp, v_cmp, gates_rows, sel_mask, win_mask, cmp_mask, scale, combine, window):
    """Outputs of one chunk of rows (work dtype), as a tuple so that checkpoint can recompute it."""
    if combine == "union":
        out, _, lse = _attend(q_rows, k, v, sel_mask | win_mask, scale)
        return out, lse
    o_cmp, _, lse_cmp = _attend(q_rows, k_cmp, v_cmp, cmp_mask, scale)
    o_slc, _, lse_slc = _attend(q_rows, k, v, sel_mask, scale)
    if window > 0:
        o_win, _, lse_win = _attend(q_rows, k, v, win_mask, scale)
    else:
        o_win, lse_win = torch.zeros_like(o_slc), torch.full_like(lse_slc, -math.inf)
    g = gates_rows.to(o_cmp.dtype)
    out = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    return out, o_cmp, o_slc, o_win, lse_cmp, lse_slc, lse_win


# --------------------------------------------------------------------------- the oracle
def nsa_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block: int = 64, top_n: int = 16,
                            window: int = 512, cmp_block: int = 32, cmp_stride: int = 16, init_blocks: int = 1,
                            local_blocks: int = 2, combine: str = "union", granularity: str = "token",
                            gates: Optional[torch.Tensor] = None, compress=None, scale: Optional[float] = None,
                            backend: str = "auto", return_aux: bool = False, max_bytes: int = DEFAULT_MAX_BYTES,
                            select_outside_window: bool = False):
    """Native sparse attention of ``q [B, Tq, HQ, D]`` over ``k, v [B, Tk, HKV, D]`` (see the module docstring).

    Same signature and semantics as ``nsa.nsa_attention``; ``backend`` is accepted for that and
    ignored. Works in float32 (float64 for float64 inputs), chunks over query rows so that no
    intermediate exceeds about ``max_bytes``, and recomputes chunks in backward (checkpointing).
    Gradients reach q, k, v, ``gates`` and the parameters of ``compress`` (through the compressed
    branch, hence only with ``combine="gated"``); the selection itself has no gradient.

    Returns ``out [B, Tq, HQ, D]`` in q's dtype, or ``(out, aux)`` with ``return_aux``: ``block_idx``
    ``[B, HKV, Tq, top_n]`` int32 (ascending, -1 padded), ``block_count [B, HKV, Tq]`` int32,
    ``importance [B, HKV, Tq, NSEL]`` float32 (per query, before any query-block sum), and ``lse``
    ``[B, Tq, HQ]`` float32 for union, or ``lse_cmp/lse_slc/lse_win`` and ``o_cmp/o_slc/o_win`` for gated.
    """
    check_nsa_params(block=block, top_n=top_n, window=window, cmp_block=cmp_block, cmp_stride=cmp_stride,
                     init_blocks=init_blocks, local_blocks=local_blocks, combine=combine, granularity=granularity,
                     backend=backend, select_outside_window=select_outside_window)
    if q.dtype == torch.float64 and k.dtype == v.dtype == torch.float64:
        # check_qkv knows the kernels' dtypes only; validate shapes through float32 stand-ins
        stand_in = lambda t: torch.empty(t.shape, dtype=torch.float32, device="meta")
        scale = check_qkv(stand_in(q), stand_in(k), stand_in(v), scale)
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    else:
        scale = check_qkv(q, k, v, scale)
    check_gates(gates, combine, q)
    b, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    dev = q.device
    nc = num_compressed_blocks(tk, cmp_block, cmp_stride)
    nsel = math.ceil(tk / block)

    pair = split_compress(compress)
    if pair is None:
        k_cmp, v_cmp = _mean_blocks(k, cmp_block, cmp_stride), _mean_blocks(v, cmp_block, cmp_stride)
    else:
        k_cmp, v_cmp = pair[0](k), pair[1](v)
        check_compressed("compress (keys)", k_cmp, k, nc)
        check_compressed("compress (values)", v_cmp, v, nc)

    q_pos = torch.arange(tk - tq, tk, device=dev)
    cmp_end = torch.arange(nc, device=dev) * cmp_stride + cmp_block - 1  # last token of each compressed block
    overlap = _overlap_weights(nc, nsel, cmp_block, cmp_stride, block, dev, _work_dtype(q.dtype))

    # ---- importance and selection (no gradient)
    importance = torch.empty(b, hkv, tq, nsel, dtype=torch.float32, device=dev)
    step = _chunk_rows(b, hq, max(nc, nsel), max_bytes)
    with torch.no_grad():
        for r0 in range(0, tq, step):
            r1 = min(r0 + step, tq)
            cmp_mask = (cmp_end[None, :] <= q_pos[r0:r1, None])[None, None]
            _, p_cmp, _ = _attend(q[:, r0:r1], k_cmp.detach(), v_cmp.detach(), cmp_mask, scale)
            importance[:, :, r0:r1] = (p_cmp.sum(2) @ overlap).float()
        pick = dict(top_n=top_n, init_blocks=init_blocks, local_blocks=local_blocks, block=block)
        if granularity == "token":
            window_from = q_pos - window + 1 if select_outside_window else None
            idx = _select(importance, q_pos // block, window_from=window_from, **pick)
        else:
            q_blocks = q_pos // block
            first = int(q_blocks[0])
            nqb = int(q_blocks[-1]) - first + 1
            # block c is scored by block c - 1's queries: shift the per-block sums by one block
            per_block = importance.new_zeros(b, hkv, nqb + 1, nsel).index_add_(2, q_blocks - first + 1, importance)
            per_block = per_block[:, :, :nqb]
            rows = torch.arange(first, first + nqb, device=dev)
            window_from = rows * block - window + 1 if select_outside_window else None
            idx = _select(per_block, rows, window_from=window_from, **pick)[:, :, q_blocks - first]
        block_idx = idx.contiguous()

    # ---- attention, chunk by chunk
    need_grad = needs_grad(q, k, v, k_cmp, v_cmp, gates)
    step = _chunk_rows(b, hq, tk, max_bytes)
    pieces = []
    for r0 in range(0, tq, step):
        r1 = min(r0 + step, tq)
        pos = q_pos[r0:r1]
        sel_mask = _selected_token_mask(block_idx[:, :, r0:r1], block, tk, pos)
        win_mask = _window_mask(window, tk, pos)
        cmp_mask = (cmp_end[None, :] <= pos[:, None])[None, None]
        g_rows = None if gates is None else gates[:, r0:r1]
        args = (q[:, r0:r1], k, v, k_cmp, v_cmp, g_rows, sel_mask, win_mask, cmp_mask, scale, combine, window)
        pieces.append(checkpoint(_branches, *args, use_reentrant=False) if need_grad else _branches(*args))
    cols = [torch.cat(parts, 1) for parts in zip(*pieces)]
    out = cols[0].to(q.dtype)
    if not return_aux:
        return out
    aux = {"block_idx": block_idx, "block_count": (block_idx >= 0).sum(-1, dtype=torch.int32),
           "importance": importance}
    if combine == "union":
        aux["lse"] = cols[1].float()
    else:
        for name, t in zip(("o_cmp", "o_slc", "o_win"), cols[1:4]):
            aux[name] = t.to(q.dtype)
        for name, t in zip(("lse_cmp", "lse_slc", "lse_win"), cols[4:7]):
            aux[name] = t.float()
    return out, aux


__all__ = ["nsa_attention_reference", "check_nsa_params", "check_gates", "split_compress", "num_compressed_blocks",
           "check_compressed", "COMBINES", "GRANULARITIES"]
