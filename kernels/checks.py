"""Input validation shared by every kernel and its reference: one clear message per mistake."""
from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names=("q", "k", "v")) -> None:
    """Validate ``q [B, Tq, HQ, D]`` against keys/values ``[B, Tk, HKV, D]`` (any key length: full or
    compressed keys); ``names`` are what the error messages call the three tensors."""
    nq, nk, nv = names
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be one of float16, bfloat16, float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{nq}, {nk} and {nv} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{nq}, {nk} and {nv} must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{nk} and {nv} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, tq, hq, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"{nq} and {nk} must have the same batch size, got {b} and {k.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"{nq} and {nk} must have the same head_dim, got {d} and {k.shape[3]}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    hkv = k.shape[2]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hkv})")


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale to use: ``head_dim ** -0.5`` when None, else a positive number."""
    if scale is None:
        return head_dim ** -0.5
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return float(scale)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> float:
    """Validate ``q [B, Tq, HQ, D]``, ``k, v [B, Tk, HKV, D]``; return the softmax scale to use."""
    check_heads(q, k, v)
    tq = q.shape[1]
    if tq < 1 or k.shape[1] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got q_len={tq}, kv_len={k.shape[1]}")
    if tq > k.shape[1]:
        raise ValueError(f"q_len ({tq}) must not exceed kv_len ({k.shape[1]})")
    return check_scale(scale, q.shape[3])


def check_layout(layout, q: torch.Tensor, k: torch.Tensor) -> None:
    b, tq, _, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if (layout.q_len, layout.kv_len) != (tq, tk):
        raise ValueError(f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len} but got q_len={tq}, kv_len={tk}")
    lb, lh = layout.tile_class.shape[:2]
    if lb not in (1, b):
        raise ValueError(f"layout batch dimension must be 1 or the batch size {b}, got {lb}")
    if lh not in (1, hkv):
        raise ValueError(f"layout head dimension must be 1 or the number of key/value heads {hkv}, got {lh}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}: use layout.to(q.device)")


def needs_grad(*tensors) -> bool:
    """Whether autograd will want a gradient of any of ``tensors`` (anything not a tensor, e.g. None, is
    skipped): the references then keep the graph, and the Triton paths that have no backward step aside."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def check_power_of_two(name: str, value) -> None:
    """A launch or tiling setting that must be a power of two >= 1 (an int, not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {value!r}")
