"""Sparse attention patterns: small validated specs that compile to a ``BlockLayout``.

Each pattern states its meaning as ``mask_mod(q_pos, k_pos)`` (absolute positions, broadcasting
tensors, as in FlexAttention) and compiles to the tile layout that the kernels execute; tests
check that the two agree token by token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Callable, Optional, Tuple

import torch

from .kernels.layout import BlockLayout, TokenRule, layout_from_block_mask, layout_from_mask_mod, layout_from_rule


def _positive_int(owner: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")


def _power_of_two(owner: str, name: str, value, low: int = 16, high: int = 256) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > high or value & (value - 1):
        raise ValueError(f"{owner}.{name} must be a power of two between {low} and {high}, got {value!r}")


class Pattern:
    """Base class. Subclasses are frozen dataclasses defining ``rule()`` (or overriding ``compile``)."""

    dynamic = False  # True when the layout depends on the input (NSA)

    def rule(self) -> TokenRule:
        raise NotImplementedError

    def global_mask(self, kv_len: int, device) -> Optional[torch.Tensor]:
        return None

    def mask_mod(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Boolean visibility of absolute query positions against key positions (broadcasting)."""
        return self.rule().visible(q_pos, k_pos)

    def compile(self, q_len: int, kv_len: Optional[int] = None, *, block_q: int = 64, block_kv: int = 64,
                device=None) -> BlockLayout:
        """The layout for ``q_len`` queries at the end of ``kv_len`` keys (default ``kv_len = q_len``)."""
        kv_len = q_len if kv_len is None else kv_len
        _positive_int(type(self).__name__, "q_len", q_len)
        _positive_int(type(self).__name__, "kv_len", kv_len)
        if q_len > kv_len:
            raise ValueError(f"q_len ({q_len}) must not exceed kv_len ({kv_len})")
        dev = str(torch.device(device) if device is not None else torch.device("cpu"))
        return _compile_cached(self, q_len, kv_len, block_q, block_kv, dev)

    def _compile(self, q_len: int, kv_len: int, block_q: int, block_kv: int, device) -> BlockLayout:
        return layout_from_rule(self.rule(), q_len, kv_len, block_q, block_kv,
                                self.global_mask(kv_len, device), device=device, name=self.label)

    @property
    def label(self) -> str:
        return repr(self)


@lru_cache(maxsize=64)
def _compile_cached(pattern: Pattern, q_len: int, kv_len: int, block_q: int, block_kv: int, device: str) -> BlockLayout:
    return pattern._compile(q_len, kv_len, block_q, block_kv, torch.device(device))


@dataclass(frozen=True)
class Dense(Pattern):
    """Every key (up to the query, when causal)."""

    causal: bool = True

    def rule(self) -> TokenRule:
        return TokenRule(causal=self.causal)


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """The ``window`` most recent keys, the query itself included (``|q - k| < window`` when bidirectional)."""

    window: int = 512
    causal: bool = True

    def __post_init__(self):
        _positive_int("SlidingWindow", "window", self.window)

    def rule(self) -> TokenRule:
        return TokenRule(causal=self.causal, window=self.window)


@dataclass(frozen=True)
class Dilated(Pattern):
    """Every ``stride``-th key block of ``block`` tokens, plus a local window so each query sees its neighbours.

    The hardware-aligned form of strided attention: whole blocks, never single scattered keys.
    """

    stride: int = 4
    block: int = 64
    window: int = 64
    causal: bool = True

    def __post_init__(self):
        _positive_int("Dilated", "stride", self.stride)
        _power_of_two("Dilated", "block", self.block, 16, 4096)
        _positive_int("Dilated", "window", self.window)

    def rule(self) -> TokenRule:
        return TokenRule(causal=self.causal, window=self.window, dilation_block=self.block, dilation_stride=self.stride)


@dataclass(frozen=True)
class GlobalLocal(Pattern):
    """A sliding window plus ``sink`` leading tokens and ``global_tokens`` positions that every query sees
    (and that see every key, as in Longformer's global attention)."""

    window: int = 512
    sink: int = 4
    global_tokens: Tuple[int, ...] = ()
    causal: bool = True

    def __post_init__(self):
        _positive_int("GlobalLocal", "window", self.window)
        _positive_int("GlobalLocal", "sink", self.sink, minimum=0)
        if not isinstance(self.global_tokens, tuple):
            object.__setattr__(self, "global_tokens", tuple(self.global_tokens))
        for p in self.global_tokens:
            _positive_int("GlobalLocal", "global_tokens[i]", p, minimum=0)
        if self.sink == 0 and not self.global_tokens:
            raise ValueError("GlobalLocal needs sink >= 1 or at least one position in global_tokens; use SlidingWindow otherwise")

    def rule(self) -> TokenRule:
        return TokenRule(causal=self.causal, window=self.window, sink=self.sink)

    def global_mask(self, kv_len: int, device) -> Optional[torch.Tensor]:
        if not self.global_tokens:
            return None
        g = torch.zeros(kv_len, dtype=torch.bool, device=device)
        pos = torch.tensor([p for p in self.global_tokens if p < kv_len], dtype=torch.long, device=device)
        g[pos] = True
        return g

    def mask_mod(self, q_pos, k_pos):
        # written without .item() or data-dependent shapes so FlexAttention can vmap it
        vis = self.rule().visible(q_pos, k_pos)
        if self.global_tokens:
            g = torch.tensor(self.global_tokens, device=q_pos.device)
            is_global = lambda p: (p.unsqueeze(-1) == g).any(-1)
            causal_ok = (k_pos <= q_pos) if self.causal else torch.ones_like(vis)
            vis = vis | (causal_ok & (is_global(k_pos) | is_global(q_pos)))
        return vis


@dataclass(frozen=True, eq=False)
class Custom(Pattern):
    """Any mask given as ``mask_fn(q_pos, k_pos) -> bool tensor`` (broadcasting), stored exactly in tile bitmaps.

    Compiling evaluates the function on every (query, key) pair, so keep it to moderate lengths.
    """

    mask_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = None
    name: str = "custom"

    def __post_init__(self):
        if not callable(self.mask_fn):
            raise ValueError(f"Custom.mask_fn must be callable(q_pos, k_pos) -> bool tensor, got {self.mask_fn!r}")

    def mask_mod(self, q_pos, k_pos):
        return self.mask_fn(q_pos, k_pos)

    def _compile(self, q_len, kv_len, block_q, block_kv, device):
        return layout_from_mask_mod(self.mask_fn, q_len, kv_len, block_q, block_kv, device=device, name=self.name)

    @property
    def label(self) -> str:
        return f"Custom({self.name})"


@dataclass(frozen=True, eq=False)
class BlockSparse(Pattern):
    """An explicit boolean block mask ``[NQB, NKB]`` over tiles of ``block_q × block_kv`` (causal inside tiles)."""

    block_mask: torch.Tensor = None
    block_q: int = 64
    block_kv: int = 64
    causal: bool = True

    def __post_init__(self):
        if not isinstance(self.block_mask, torch.Tensor) or self.block_mask.dim() != 2:
            raise ValueError("BlockSparse.block_mask must be a 2-D boolean tensor [num_q_blocks, num_kv_blocks]")
        _power_of_two("BlockSparse", "block_q", self.block_q)
        _power_of_two("BlockSparse", "block_kv", self.block_kv)

    def mask_mod(self, q_pos, k_pos):
        bm = self.block_mask.to(q_pos.device, torch.bool)
        qb = (q_pos // self.block_q).clamp(max=bm.shape[0] - 1)
        kb = (k_pos // self.block_kv).clamp(max=bm.shape[1] - 1)
        vis = bm[qb, kb]
        return vis & (k_pos <= q_pos) if self.causal else vis

    def compile(self, q_len, kv_len=None, *, block_q=None, block_kv=None, device=None):
        kv_len = q_len if kv_len is None else kv_len
        if (block_q or self.block_q) != self.block_q or (block_kv or self.block_kv) != self.block_kv:
            raise ValueError(f"BlockSparse fixes its blocks at {self.block_q}x{self.block_kv}; got block_q={block_q}, block_kv={block_kv}")
        device = torch.device(device) if device is not None else self.block_mask.device
        return layout_from_block_mask(self.block_mask.to(device), q_len, kv_len, self.block_q, self.block_kv,
                                      self.causal, name="BlockSparse")


@dataclass(frozen=True)
class NSA(Pattern):
    """Native sparse attention (arXiv 2502.11089): compressed keys choose ``top_n`` blocks of ``block`` tokens
    per query (or per query block), plus a sliding ``window``.

    ``cmp_block``/``cmp_stride`` are the compression block length l and stride d; ``init_blocks`` leading
    and ``local_blocks`` most recent selection blocks are always chosen. ``combine="union"`` takes one
    softmax over the union of selected blocks and window (what a pretrained dense model needs);
    ``"gated"`` mixes the three branch outputs with caller-given gates. ``granularity="token"`` selects
    per query token (the paper), ``"block"`` once per query block of ``block`` tokens (faster).
    ``select_outside_window=True`` gives the ``top_n`` slots only to blocks starting before the query's
    window (a block inside it adds no key under ``union``) and forces no local block (the window holds
    them): on SmolLM2 at 4k it halves the union's perplexity gap (benchmarks/NOTES.md).
    The layout depends on the input, so ``compile`` is not available: the kernels build it.
    """

    dynamic = True
    block: int = 64
    top_n: int = 16
    window: int = 512
    cmp_block: int = 32
    cmp_stride: int = 16
    init_blocks: int = 1
    local_blocks: int = 2
    combine: str = "union"
    granularity: str = "token"
    select_outside_window: bool = False

    def __repr__(self) -> str:
        # the flag appears only when set, so that labels of results recorded before it existed still match
        names = [f.name for f in fields(self) if f.name != "select_outside_window" or self.select_outside_window]
        return "NSA(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"

    def __post_init__(self):
        _power_of_two("NSA", "block", self.block, 16, 256)
        _positive_int("NSA", "top_n", self.top_n)
        _positive_int("NSA", "window", self.window, minimum=0)
        _power_of_two("NSA", "cmp_stride", self.cmp_stride, 1, 256)
        _positive_int("NSA", "cmp_block", self.cmp_block)
        _positive_int("NSA", "init_blocks", self.init_blocks, minimum=0)
        _positive_int("NSA", "local_blocks", self.local_blocks, minimum=0)
        if self.cmp_block < self.cmp_stride or self.cmp_block % self.cmp_stride:
            raise ValueError(f"NSA.cmp_block must be a multiple of cmp_stride ({self.cmp_stride}), got {self.cmp_block}")
        if self.block % self.cmp_stride:
            raise ValueError(f"NSA.block (l'={self.block}) must be a multiple of cmp_stride (d={self.cmp_stride})")
        if self.top_n < self.init_blocks + self.local_blocks:
            raise ValueError(f"NSA.top_n ({self.top_n}) must be >= init_blocks + local_blocks "
                             f"({self.init_blocks} + {self.local_blocks}), the blocks that are always selected")
        if self.combine not in ("union", "gated"):
            raise ValueError(f"NSA.combine must be 'union' or 'gated', got {self.combine!r}")
        if self.granularity not in ("token", "block"):
            raise ValueError(f"NSA.granularity must be 'token' or 'block', got {self.granularity!r}")
        if not isinstance(self.select_outside_window, bool):
            raise ValueError(f"NSA.select_outside_window must be True or False, got {self.select_outside_window!r}")
        if self.select_outside_window and self.window < self.local_blocks * self.block:
            raise ValueError(f"NSA.select_outside_window=True leaves the local blocks to the window: window "
                             f"({self.window}) must be >= local_blocks * block ({self.local_blocks} * {self.block})")

    def compile(self, *args, **kwargs):
        raise TypeError("NSA chooses its key blocks per input; its layout comes from the NSA kernels "
                        "(nsa_viz.kernels.nsa), not from compile()")

    def mask_mod(self, q_pos, k_pos):
        raise TypeError("NSA has no fixed mask: its selection depends on the input")


__all__ = ["Pattern", "Dense", "SlidingWindow", "Dilated", "GlobalLocal", "Custom", "BlockSparse", "NSA"]
