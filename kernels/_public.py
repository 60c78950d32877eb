"""The public names of ``nsa_viz.kernels`` (re-exported by its ``__init__``): the backend choice, the
block-sparse entry point, the layouts and checks."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .block_sparse_ref import block_sparse_attention_ref
from .checks import check_layout, check_qkv
from .layout import EMPTY, FULL, PARTIAL, BlockLayout, TokenRule, layout_from_block_mask, layout_from_mask_mod, layout_from_rule

BACKENDS = ("auto", "triton", "reference")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` picks Triton on CUDA and the reference elsewhere; ``triton`` on a CPU tensor needs TRITON_INTERPRET=1."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported")
    return backend


def preferred_block_sizes(head_dim: int, device) -> tuple:
    """(block_q, block_kv) for layouts the kernels will run: 64x64 was fastest on an H100 for both
    passes at head_dim 128 (benchmarks/NOTES.md); the CPU reference does not care."""
    return (64, 64)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                           scale: Optional[float] = None, *, backend: str = "auto", return_lse: bool = False):
    """Attention of ``q [B, Tq, HQ, D]`` over ``k, v [B, Tk, HKV, D]`` restricted to ``layout``.

    Differentiable in q, k and v. Returns the output ``[B, Tq, HQ, D]``, and with ``return_lse``
    also the log-sum-exp ``[B, HQ, Tq]`` (float32, -inf for a query that sees no key).
    Inputs may be strided views (e.g. transformers' ``[B, H, T, D]`` transposed): nothing is copied.
    """
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        from .block_sparse import block_sparse_attention_triton
        out, lse = block_sparse_attention_triton(q, k, v, layout, scale)
    else:
        out, lse = block_sparse_attention_ref(q, k, v, layout, scale)
    return (out, lse) if return_lse else out


__all__ = [
    "BACKENDS", "EMPTY", "preferred_block_sizes", "FULL", "PARTIAL", "BlockLayout", "TokenRule", "block_sparse_attention",
    "block_sparse_attention_ref", "check_layout", "check_qkv", "layout_from_block_mask", "layout_from_mask_mod",
    "layout_from_rule", "resolve_backend", "triton_available",
]
