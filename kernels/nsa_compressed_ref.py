"""Plain-PyTorch NSA compressed-branch primitives: the CPU path and the test oracle.

Compressed key ``j`` summarises tokens ``[j*d, j*d + l)`` (``l = cmp_block``, ``d = cmp_stride``); only
complete blocks exist, so there are ``NC = num_compressed(kv_len, l, d)`` of them. A query at absolute
position ``p`` sees compressed key ``j`` iff the whole block lies at or before it: ``j*d + l - 1 <= p``.
Queries ``q [B, Tq, HQ, D]`` sit at positions ``kv_len - Tq .. kv_len - 1``.

- ``compressed_attention_reference``: softmax attention over the visible compressed keys; a query that
  sees none (``p < l - 1``) gets output 0 and LSE -inf.
- ``selection_importance_reference``: the same softmax probabilities, recomputed from the saved LSE,
  summed over the query heads of each GQA group and mapped onto selection blocks of ``l'`` tokens.

Mapping (the paper's eq. 9, aligned with the token spans above): compressed key ``j`` adds its
probability to every selection block ``s`` it overlaps, weighted by ``overlap_tokens / d`` where
``overlap_tokens = |[j*d, j*d + l) ∩ [s*l', (s+1)*l')|``. With l=32, d=16, l'=64 the keys touching block
``s`` get the paper's weights 1, 2, 2, 2, 1; with ``l = d = l'`` the map is the identity.
"""
from __future__ import annotations

from typing import Optional

import torch

from .block_sparse_ref import DEFAULT_MAX_BYTES, attend_masked, rows_per_chunk
from .checks import check_heads, check_scale, needs_grad


def _power_of_two(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value!r}")


def num_compressed(kv_len: int, cmp_block: int, cmp_stride: int) -> int:
    """Number of complete compressed blocks over ``kv_len`` tokens: the j with ``j*d + l <= kv_len``."""
    return 0 if kv_len < cmp_block else (kv_len - cmp_block) // cmp_stride + 1


def check_compression(cmp_block: int, cmp_stride: int, block: Optional[int] = None) -> None:
    """The contract's geometry: powers of two, ``l % d == 0`` and ``l' % d == 0``."""
    _power_of_two("cmp_stride", cmp_stride)
    _power_of_two("cmp_block", cmp_block)
    if cmp_block % cmp_stride:
        raise ValueError(f"cmp_block ({cmp_block}) must be a multiple of cmp_stride ({cmp_stride})")
    if block is not None:
        _power_of_two("block", block)
        if block % cmp_stride:
            raise ValueError(f"block (l'={block}) must be a multiple of cmp_stride (d={cmp_stride})")


def check_compressed_inputs(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, kv_len) -> tuple:
    """Validate the compressed branch's inputs; return ``(scale, kv_len)`` with defaults filled in
    (``scale = D**-0.5``, ``kv_len = Tq``: a prefill whose queries are the whole sequence)."""
    check_heads(q, k_cmp, v_cmp, names=("q", "k_cmp", "v_cmp"))
    tq = q.shape[1]
    if tq < 1:
        raise ValueError(f"q_len must be >= 1, got {tq}")
    check_compression(cmp_block, cmp_stride)
    if kv_len is None:
        kv_len = tq
    if not isinstance(kv_len, int) or isinstance(kv_len, bool) or kv_len < tq:
        raise ValueError(f"kv_len must be an int >= q_len ({tq}), got {kv_len!r}")
    nc = num_compressed(kv_len, cmp_block, cmp_stride)
    if k_cmp.shape[1] != nc:
        raise ValueError(f"k_cmp has {k_cmp.shape[1]} compressed keys but kv_len={kv_len} with cmp_block={cmp_block}, "
                         f"cmp_stride={cmp_stride} gives {nc}; pass kv_len= the full key length (e.g. when decoding)")
    return check_scale(scale, q.shape[3]), kv_len


def compressed_visibility(r0: int, r1: int, q_offset: int, nc: int, cmp_block: int, cmp_stride: int, device) -> torch.Tensor:
    """``[r1 - r0, NC]`` bool: query row i (absolute position ``i + q_offset``) sees compressed key j."""
    pos = torch.arange(r0, r1, device=device) + q_offset
    last = torch.arange(nc, device=device) * cmp_stride + cmp_block - 1
    return last[None, :] <= pos[:, None]


def compressed_to_selection(nc: int, nsel: int, cmp_block: int, cmp_stride: int, block: int, device) -> torch.Tensor:
    """``[NC, NSEL]`` float32 weights of the eq. 9 mapping (see the module docstring)."""
    start = torch.arange(nc, device=device, dtype=torch.float32)[:, None] * cmp_stride
    sel = torch.arange(nsel, device=device, dtype=torch.float32)[None, :] * block
    overlap = (torch.minimum(start + cmp_block, sel + block) - torch.maximum(start, sel)).clamp_min(0)
    return overlap / cmp_stride


def compressed_attention_reference(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, *, cmp_block: int,
                                   cmp_stride: int, scale: Optional[float] = None, kv_len: Optional[int] = None,
                                   max_bytes: int = DEFAULT_MAX_BYTES):
    """Attention of ``q [B, Tq, HQ, D]`` over compressed keys/values ``[B, NC, HKV, D]``, causal at
    compressed granularity. Returns ``(out [B, Tq, HQ, D], lse [B, Tq, HQ] float32, natural log)``;
    differentiable in q, k_cmp and v_cmp. ``kv_len`` (default Tq) is the uncompressed key length."""
    from torch.utils.checkpoint import checkpoint

    scale, kv_len = check_compressed_inputs(q, k_cmp, v_cmp, cmp_block, cmp_stride, scale, kv_len)
    b, tq, hq, d = q.shape
    nc = k_cmp.shape[1]
    if nc == 0:  # nothing is visible to anyone; keep the graph so gradients are zeros, not None
        out = q * 0
        return out, torch.full((b, tq, hq), float("-inf"), device=q.device)
    q_offset = kv_len - tq
    step = rows_per_chunk(b, hq, nc, max_bytes)
    need_grad = needs_grad(q, k_cmp, v_cmp)
    outs, lses = [], []
    for r0 in range(0, tq, step):
        r1 = min(r0 + step, tq)
        mask = compressed_visibility(r0, r1, q_offset, nc, cmp_block, cmp_stride, q.device)[None, None]
        if need_grad:
            o, l = checkpoint(attend_masked, q[:, r0:r1], k_cmp, v_cmp, mask, scale, use_reentrant=False)
        else:
            o, l = attend_masked(q[:, r0:r1], k_cmp, v_cmp, mask, scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 1), torch.cat(lses, -1).transpose(1, 2).contiguous()


@torch.no_grad()
def compressed_lse_reference(q: torch.Tensor, k_cmp: torch.Tensor, *, cmp_block: int, cmp_stride: int,
                             scale: Optional[float] = None, kv_len: Optional[int] = None,
                             max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """Only the LSE ``[B, Tq, HQ]`` float32 of ``compressed_attention_reference`` (no gradient)."""
    return compressed_attention_reference(q, k_cmp, k_cmp, cmp_block=cmp_block, cmp_stride=cmp_stride, scale=scale,
                                          kv_len=kv_len, max_bytes=max_bytes)[1]


def check_importance_inputs(q, k_cmp, lse, cmp_block, cmp_stride, block, scale, kv_len) -> float:
    scale, _ = check_compressed_inputs(q, k_cmp, k_cmp, cmp_block, cmp_stride, scale, kv_len)
    check_compression(cmp_block, cmp_stride, block)
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must have shape [B, Tq, HQ] = {tuple(q.shape[:3])} (from compressed_attention), "
                         f"got {tuple(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    return scale


@torch.no_grad()
def selection_importance_reference(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, *, cmp_block: int,
                                   cmp_stride: int, block: int, scale: Optional[float] = None, kv_len: int,
                                   max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """Importance ``[B, HKV, Tq, NSEL]`` float32 of each selection block of ``block`` tokens
    (``NSEL = ceil(kv_len / block)``) for each query: the compressed-branch softmax probabilities
    ``exp(q·k_cmp·scale - lse)`` summed over the GQA group's query heads and mapped by eq. 9."""
    scale = check_importance_inputs(q, k_cmp, lse, cmp_block, cmp_stride, block, scale, kv_len)
    return _importance(q, k_cmp, lse, cmp_block, cmp_stride, block, scale, kv_len, max_bytes)


@torch.no_grad()
def compressed_importance_reference(q: torch.Tensor, k_cmp: torch.Tensor, *, cmp_block: int, cmp_stride: int,
                                    block: int, scale: Optional[float] = None, kv_len: int,
                                    max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """``selection_importance_reference`` with the compressed branch's own softmax (the LSE of
    ``compressed_lse_reference``, found on the way): the importance that the ``union`` mode ranks."""
    scale, kv_len = check_compressed_inputs(q, k_cmp, k_cmp, cmp_block, cmp_stride, scale, kv_len)
    check_compression(cmp_block, cmp_stride, block)
    return _importance(q, k_cmp, None, cmp_block, cmp_stride, block, scale, kv_len, max_bytes)


def _importance(q, k_cmp, lse, cmp_block, cmp_stride, block, scale, kv_len, max_bytes) -> torch.Tensor:
    """Scores computed once per chunk of queries; probabilities from ``lse`` or, when it is None, a softmax
    over the visible compressed keys (a query that sees none gets zeros)."""
    b, tq, hq, d = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    g = hq // hkv
    nsel = -(-kv_len // block)
    out = torch.zeros(b, hkv, tq, nsel, dtype=torch.float32, device=q.device)
    if nc == 0:
        return out
    weights = compressed_to_selection(nc, nsel, cmp_block, cmp_stride, block, q.device)
    q_offset = kv_len - tq
    kf = k_cmp.float()
    step = rows_per_chunk(b, hq, nc, max_bytes)
    for r0 in range(0, tq, step):
        r1 = min(r0 + step, tq)
        vis = compressed_visibility(r0, r1, q_offset, nc, cmp_block, cmp_stride, q.device)
        qf = q[:, r0:r1].float().view(b, r1 - r0, hkv, g, d)
        s = torch.einsum("brhgd,bthd->bhgrt", qf, kf) * scale
        if lse is None:
            p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num_(0.0)
        else:
            l = lse[:, r0:r1].float().view(b, r1 - r0, hkv, g).permute(0, 2, 3, 1)  # [B, HKV, G, r]
            p = torch.exp(s - l[..., None])  # lse = -inf only where nothing is visible: masked below
            p = torch.where(vis, p, torch.zeros((), device=p.device))
        out[:, :, r0:r1] = p.sum(2) @ weights
    return out


__all__ = ["compressed_attention_reference", "compressed_lse_reference", "selection_importance_reference",
           "compressed_importance_reference", "num_compressed",
           "compressed_to_selection", "check_compression"]

