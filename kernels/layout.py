"""Block layouts: which key blocks each query block visits, and the token rule inside partial tiles.

A layout is the one object that the kernels execute, capture records and the plots draw.
It classifies every (query block, key block) tile as empty, partial (token mask needed) or
full, and keeps that classification as ``tile_class``; the index lists the kernels walk are
derived from it.  Query ``i`` sits at absolute position ``i + kv_len - q_len`` so that a
decode step (``q_len < kv_len``) sees the cache before it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Optional

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2


def _is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


def check_block_size(name: str, value: int, low: int = 16, high: int = 256) -> None:
    if not _is_power_of_two(value) or not (low <= value <= high):
        raise ValueError(f"{name} must be a power of two between {low} and {high}, got {value!r}")


@dataclass(frozen=True)
class TokenRule:
    """Token-level visibility, evaluated by the kernels only inside partial tiles.

    visible(q, k) = causal_ok and (in_window or k < sink or dilated_ok(k) or global[k] or global[q])

    ``window == 0`` means no distance limit (every key that passes ``causal`` is in the window).
    With ``causal`` the window is ``0 <= q - k < window``; without it ``|q - k| < window``.
    ``dilation_stride > 1`` also admits every key whose block of ``dilation_block`` tokens has an
    index divisible by the stride.
    """

    causal: bool = True
    window: int = 0
    sink: int = 0
    dilation_block: int = 0
    dilation_stride: int = 1

    def __post_init__(self):
        for name in ("window", "sink", "dilation_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TokenRule.{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.dilation_stride, int) or self.dilation_stride < 1:
            raise ValueError(f"TokenRule.dilation_stride must be an integer >= 1, got {self.dilation_stride!r}")
        if self.dilation_stride > 1 and not _is_power_of_two(self.dilation_block):
            raise ValueError(f"TokenRule.dilation_block must be a power of two when dilation_stride > 1, got {self.dilation_block!r}")

    @property
    def limited(self) -> bool:
        """True when some causally visible key can be hidden (a window exists)."""
        return self.window > 0

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor, is_global: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Broadcasting boolean visibility of absolute positions ``q_pos`` against ``k_pos``."""
        diff = q_pos - k_pos
        ok = diff >= 0 if self.causal else torch.ones_like(diff, dtype=torch.bool)
        if not self.limited:
            return ok
        reach = diff if self.causal else diff.abs()
        admitted = reach < self.window
        if self.sink:
            admitted = admitted | (k_pos < self.sink)
        if self.dilation_stride > 1:
            admitted = admitted | ((k_pos // self.dilation_block) % self.dilation_stride == 0)
        if is_global is not None:
            n = is_global.numel()
            admitted = admitted | is_global[k_pos.clamp(0, n - 1)] | is_global[q_pos.clamp(0, n - 1)]
        return ok & admitted


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Tile classification of a (q_len × kv_len) attention problem plus the in-tile rule.

    ``tile_class`` has shape ``[LB, LH, NQB, NKB]`` (int8: 0 empty, 1 partial, 2 full) where
    ``LB`` is 1 or the batch size and ``LH`` is 1 or the number of key/value heads: a static
    pattern has one layout for every sequence and head, NSA one per sequence and GQA group.
    ``tile_masks[tile_index[..]]`` optionally refines partial tiles with an explicit bitmap
    (custom ``mask_mod`` patterns).
    """

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    tile_class: torch.Tensor
    rule: TokenRule = field(default_factory=TokenRule)
    is_global: Optional[torch.Tensor] = None
    tile_masks: Optional[torch.Tensor] = None
    tile_index: Optional[torch.Tensor] = None
    name: str = "custom"
    # index lists as wide as the rows of tile_class instead of its busiest row: no device-to-host read to find that
    # width, which a layout built on every call (NSA's per-block selection) would otherwise wait for
    full_width_lists: bool = False

    def __post_init__(self):
        check_block_size("block_q", self.block_q)
        check_block_size("block_kv", self.block_kv)
        if self.q_len < 1 or self.kv_len < 1:
            raise ValueError(f"q_len and kv_len must be >= 1, got {self.q_len} and {self.kv_len}")
        if self.q_len > self.kv_len:
            raise ValueError(f"q_len ({self.q_len}) must not exceed kv_len ({self.kv_len})")
        expected = (self.num_q_blocks, self.num_kv_blocks)
        if self.tile_class.dim() != 4 or tuple(self.tile_class.shape[2:]) != expected:
            raise ValueError(f"tile_class must have shape [LB, LH, {expected[0]}, {expected[1]}], got {tuple(self.tile_class.shape)}")
        if (self.tile_masks is None) != (self.tile_index is None):
            raise ValueError("tile_masks and tile_index go together")

    # ----------------------------------------------------------------- geometry
    @property
    def q_offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.kv_len / self.block_kv)

    @property
    def device(self) -> torch.device:
        return self.tile_class.device

    def to(self, device) -> "BlockLayout":
        move = lambda t: None if t is None else t.to(device)
        return BlockLayout(self.q_len, self.kv_len, self.block_q, self.block_kv, self.tile_class.to(device), self.rule,
                           move(self.is_global), move(self.tile_masks), move(self.tile_index), self.name,
                           self.full_width_lists)

    # ------------------------------------------------------------ index lists
    @staticmethod
    def _compact(cls: torch.Tensor, wanted: int, full_width: bool = False):
        hit = cls == wanted
        counts = hit.sum(-1, dtype=torch.int32)
        width = cls.shape[-1] if full_width else max(int(counts.max().item()) if counts.numel() else 0, 1)
        order = torch.argsort((~hit).to(torch.int8), dim=-1, stable=True)[..., :width]
        return order.to(torch.int32).contiguous(), counts.contiguous()

    @cached_property
    def full_blocks(self):
        """(indices [LB, LH, NQB, W] int32, counts [LB, LH, NQB] int32) of full key blocks per query block."""
        return self._compact(self.tile_class, FULL, self.full_width_lists)

    @cached_property
    def partial_blocks(self):
        """Same for partial key blocks (token mask applied inside)."""
        return self._compact(self.tile_class, PARTIAL, self.full_width_lists)

    @cached_property
    def full_blocks_t(self):
        """Transposed: for each key block, the query blocks that visit it fully (for dK/dV)."""
        return self._compact(self.tile_class.transpose(-1, -2), FULL, self.full_width_lists)

    @cached_property
    def partial_blocks_t(self):
        return self._compact(self.tile_class.transpose(-1, -2), PARTIAL, self.full_width_lists)

    @cached_property
    def partial_tile_ids(self) -> Optional[torch.Tensor]:
        """For custom bitmaps: tile_index gathered along ``partial_blocks`` order (or None)."""
        if self.tile_index is None:
            return None
        idx, _ = self.partial_blocks
        return torch.gather(self.tile_index, -1, idx.long()).to(torch.int32).contiguous()

    @cached_property
    def partial_tile_ids_t(self) -> Optional[torch.Tensor]:
        if self.tile_index is None:
            return None
        idx, _ = self.partial_blocks_t
        return torch.gather(self.tile_index.transpose(-1, -2), -1, idx.long()).to(torch.int32).contiguous()

    # ----------------------------------------------------------- token level
    def token_mask(self, q_start: int = 0, q_end: Optional[int] = None) -> torch.Tensor:
        """Exact visibility of query rows ``[q_start, q_end)`` against every key: bool ``[LB, LH, rows, kv_len]``.

        Costs rows × kv_len per (LB, LH): callers chunk over rows.
        """
        q_end = self.q_len if q_end is None else q_end
        dev = self.device
        rows = torch.arange(q_start, q_end, device=dev)
        cols = torch.arange(self.kv_len, device=dev)
        qb = (rows // self.block_q)[:, None]
        kb = (cols // self.block_kv)[None, :]
        cls = self.tile_class[:, :, qb, kb]  # [LB, LH, rows, kv]
        q_pos = (rows + self.q_offset)[:, None]
        rule_ok = self.rule.visible(q_pos, cols[None, :], self.is_global)
        partial_ok = rule_ok
        if self.tile_masks is not None:
            tid = self.tile_index[:, :, qb, kb].long()
            bit = self.tile_masks[tid.clamp(min=0), (rows % self.block_q)[:, None], (cols % self.block_kv)[None, :]]
            partial_ok = partial_ok & (bit | (tid < 0))
        return (cls == FULL) | ((cls == PARTIAL) & partial_ok)

    def _visible_pairs(self) -> torch.Tensor:
        """Exact number of visible (query, key) pairs per [LB, LH], counted tile by tile: full tiles by their
        area, partial tiles by evaluating the token rule on those tiles only (O(partial tiles × block²),
        not O(q_len × kv_len) as a token mask of whole rows would be)."""
        bq, bk = self.block_q, self.block_kv
        dev = self.device
        rows_in = torch.clamp(self.q_len - torch.arange(self.num_q_blocks, device=dev) * bq, max=bq)
        cols_in = torch.clamp(self.kv_len - torch.arange(self.num_kv_blocks, device=dev) * bk, max=bk)
        full_area = (rows_in[:, None] * cols_in[None, :]).to(torch.float64)
        total = ((self.tile_class == FULL).to(torch.float64) * full_area).sum((-1, -2))
        part = (self.tile_class == PARTIAL).any(0).any(0).nonzero()  # [P, 2] (query block, key block)
        step = max(1, (8 * 2**20) // (bq * bk * max(1, self.tile_class.shape[0] * self.tile_class.shape[1])))
        ii = torch.arange(bq, device=dev)
        jj = torch.arange(bk, device=dev)
        for p0 in range(0, part.shape[0], step):
            qb, kb = part[p0:p0 + step, 0], part[p0:p0 + step, 1]
            rows = qb[:, None] * bq + ii[None, :]  # [P, bq] query indices
            cols = kb[:, None] * bk + jj[None, :]  # [P, bk] key indices
            inside = (rows < self.q_len)[:, :, None] & (cols < self.kv_len)[:, None, :]
            ok = self.rule.visible((rows + self.q_offset)[:, :, None], cols[:, None, :], self.is_global) & inside
            is_partial = self.tile_class[:, :, qb, kb] == PARTIAL  # [LB, LH, P]
            if self.tile_masks is not None:
                tid = self.tile_index[:, :, qb, kb].long()  # [LB, LH, P]
                bits = self.tile_masks[tid.clamp(min=0)]  # [LB, LH, P, bq, bk]
                ok = ok & (bits | (tid < 0)[..., None, None])
                counts = ok.sum((-1, -2))
            else:
                counts = ok.sum((-1, -2))[None, None]
            total = total + (is_partial * counts).sum(-1).to(torch.float64)
        return total

    def reference_area(self) -> float:
        """Pairs visible to dense attention with the same causality (query i sees offset + i + 1 keys)."""
        if not self.rule.causal:
            return float(self.q_len * self.kv_len)
        return self.q_len * (self.q_offset + 1) + self.q_len * (self.q_len - 1) / 2

    @cached_property
    def visible_pairs(self) -> float:
        """Mean over sequences and heads of the exact visible (query, key) pairs."""
        return float(self._visible_pairs().mean().item())

    @property
    def density(self) -> float:
        """Visited fraction of the causal (or bidirectional) area, at token level."""
        return self.visible_pairs / self.reference_area()

    @property
    def tile_density(self) -> float:
        """Fraction of the area covered by the tiles the kernel actually computes."""
        visited = (self.tile_class != EMPTY).to(torch.float64).mean().item()
        all_tiles = self.num_q_blocks * self.num_kv_blocks * self.block_q * self.block_kv
        return visited * all_tiles / self.reference_area()

    def flops(self, num_q_heads: int, head_dim: int, batch: int = 1, backward: bool = False) -> float:
        """Useful matmul FLOPs (2 per multiply-add; QK^T and PV forward, 2.5x that for backward)."""
        fwd = 4.0 * self.visible_pairs * head_dim * num_q_heads * batch
        return fwd * (2.5 if backward else 1.0)

    def summary(self) -> dict:
        return {"name": self.name, "q_len": self.q_len, "kv_len": self.kv_len, "block_q": self.block_q,
                "block_kv": self.block_kv, "density": self.density, "tile_density": self.tile_density}

    def __repr__(self) -> str:
        return (f"BlockLayout({self.name}, q_len={self.q_len}, kv_len={self.kv_len}, blocks={self.block_q}x{self.block_kv}, "
                f"tiles={tuple(self.tile_class.shape)}, density={self.density:.4f})")


# --------------------------------------------------------------------------- builders
def _tile_bounds(length: int, block: int, offset: int, device):
    starts = torch.arange(0, length, block, device=device)
    ends = torch.clamp(starts + block, max=length) - 1
    return starts + offset, ends + offset


def layout_from_rule(rule: TokenRule, q_len: int, kv_len: int, block_q: int = 64, block_kv: int = 64,
                     is_global: Optional[torch.Tensor] = None, device=None, name: str = "rule") -> BlockLayout:
    """Classify every tile by interval arithmetic on the rule (no token-level work, O(NQB × NKB))."""
    check_block_size("block_q", block_q)
    check_block_size("block_kv", block_kv)
    device = torch.device(device) if device is not None else torch.device("cpu")
    offset = kv_len - q_len
    q_lo, q_hi = _tile_bounds(q_len, block_q, offset, device)
    k_lo, k_hi = _tile_bounds(kv_len, block_kv, 0, device)
    q_lo, q_hi = q_lo[:, None], q_hi[:, None]
    k_lo, k_hi = k_lo[None, :], k_hi[None, :]
    ragged_kv = (k_hi - k_lo + 1) < block_kv  # kernels skip bounds checks in full tiles only

    if rule.causal:
        c_all, c_none = k_hi <= q_lo, k_lo > q_hi
    else:
        c_all = torch.ones_like(q_lo * k_lo, dtype=torch.bool)
        c_none = ~c_all
    if not rule.limited:
        a_all, a_none = torch.ones_like(c_all), torch.zeros_like(c_all)
    else:
        if rule.causal:
            d_min, d_max = q_lo - k_hi, q_hi - k_lo
            w_all, w_none = d_max < rule.window, d_min >= rule.window
        else:
            far = torch.maximum(q_hi - k_lo, k_hi - q_lo)
            near = torch.clamp(torch.maximum(k_lo - q_hi, q_lo - k_hi), min=0)
            w_all, w_none = far < rule.window, near >= rule.window
        a_all, a_none = w_all.clone(), w_none.clone()
        if rule.sink:
            a_all |= k_hi < rule.sink
            a_none &= ~(k_lo < rule.sink)
        if rule.dilation_stride > 1:
            blk_lo, blk_hi = k_lo // rule.dilation_block, k_hi // rule.dilation_block
            uniform = blk_lo == blk_hi
            hit = (blk_lo % rule.dilation_stride) == 0
            a_all |= uniform & hit
            a_none &= uniform & ~hit
        if is_global is not None:
            g = is_global.to(device=device, dtype=torch.bool)
            if g.numel() != kv_len:
                raise ValueError(f"is_global must have kv_len={kv_len} entries, got {g.numel()}")
            gk_any = torch.zeros(len(k_lo[0]), dtype=torch.bool, device=device)
            gk_all = torch.zeros_like(gk_any)
            padded = torch.nn.functional.pad(g, (0, (-kv_len) % block_kv))
            per_block = padded.view(-1, block_kv)
            gk_any, gk_all = per_block.any(-1), per_block.all(-1)
            gq = torch.nn.functional.pad(g[offset:], (0, (-q_len) % block_q)).view(-1, block_q).any(-1)
            a_all |= gk_all[None, :]
            a_none &= ~gk_any[None, :] & ~gq[:, None]
    full = c_all & a_all & ~ragged_kv
    empty = c_none | a_none
    cls = torch.full(full.shape, PARTIAL, dtype=torch.int8, device=device)
    cls[empty] = EMPTY
    cls[full & ~empty] = FULL
    return BlockLayout(q_len, kv_len, block_q, block_kv, cls[None, None].contiguous(), rule,
                       None if is_global is None else is_global.to(device=device, dtype=torch.bool), name=name)


MaskMod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def layout_from_mask_mod(mask_mod: MaskMod, q_len: int, kv_len: int, block_q: int = 64, block_kv: int = 64,
                         device=None, name: str = "mask_mod", max_elements: int = 1 << 25) -> BlockLayout:
    """Evaluate ``mask_mod(q_pos, k_pos)`` (broadcasting tensors of absolute positions) tile row by tile row.

    Partial tiles keep their bitmap, so any mask is represented exactly. Costs q_len × kv_len
    evaluations; rows are processed in chunks of at most ``max_elements``.
    """
    check_block_size("block_q", block_q)
    check_block_size("block_kv", block_kv)
    device = torch.device(device) if device is not None else torch.device("cpu")
    offset = kv_len - q_len
    nqb, nkb = math.ceil(q_len / block_q), math.ceil(kv_len / block_kv)
    kv_pad = nkb * block_kv
    cols = torch.arange(kv_pad, device=device)
    rows_per_chunk = max(block_q, (max_elements // kv_pad) // block_q * block_q)
    classes, bitmaps, index = [], [], []
    n_bitmaps = 0
    for r0 in range(0, nqb * block_q, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, nqb * block_q)
        rows = torch.arange(r0, r1, device=device)
        m = mask_mod(rows[:, None] + offset, cols[None, :])
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ValueError("mask_mod must return a boolean tensor (broadcast of q_idx and kv_idx)")
        m = m.expand(len(rows), kv_pad) & (rows[:, None] < q_len) & (cols[None, :] < kv_len)
        tiles = m.view(-1, block_q, nkb, block_kv).permute(0, 2, 1, 3)  # [qb, kb, bq, bk]
        any_ = tiles.any(-1).any(-1)
        # a tile is full when every in-range element is visible
        in_range = ((rows[:, None] < q_len) & (cols[None, :] < kv_len)).view(-1, block_q, nkb, block_kv).permute(0, 2, 1, 3)
        all_ = (tiles == in_range).all(-1).all(-1) & in_range.all(-1).all(-1)
        cls = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
        idx = torch.full(cls.shape, -1, dtype=torch.int32, device=device)
        part = cls == PARTIAL
        n_part = int(part.sum().item())
        idx[part] = torch.arange(n_bitmaps, n_bitmaps + n_part, dtype=torch.int32, device=device)
        bitmaps.append(tiles[part])
        n_bitmaps += n_part
        classes.append(cls)
        index.append(idx)
    cls = torch.cat(classes)[None, None].contiguous()
    tile_index = torch.cat(index)[None, None].contiguous()
    tile_masks = torch.cat(bitmaps) if n_bitmaps else torch.zeros(1, block_q, block_kv, dtype=torch.bool, device=device)
    return BlockLayout(q_len, kv_len, block_q, block_kv, cls, TokenRule(causal=False), None,
                       tile_masks.contiguous(), tile_index, name=name)


def layout_from_block_mask(block_mask: torch.Tensor, q_len: int, kv_len: int, block_q: int, block_kv: int,
                           causal: bool = True, name: str = "block_mask") -> BlockLayout:
    """A boolean block mask ``[NQB, NKB]`` (or ``[LB, LH, NQB, NKB]``) chooses tiles; ``causal`` masks inside them."""
    bm = block_mask.to(torch.bool)
    if bm.dim() == 2:
        bm = bm[None, None]
    nqb, nkb = math.ceil(q_len / block_q), math.ceil(kv_len / block_kv)
    if bm.dim() != 4 or tuple(bm.shape[-2:]) != (nqb, nkb):
        raise ValueError(f"block_mask must have shape [{nqb}, {nkb}] (or [LB, LH, {nqb}, {nkb}]) for "
                         f"q_len={q_len}, kv_len={kv_len}, blocks {block_q}x{block_kv}; got {tuple(block_mask.shape)}")
    base = layout_from_rule(TokenRule(causal=causal), q_len, kv_len, block_q, block_kv, device=bm.device)
    cls = torch.where(bm, base.tile_class, torch.zeros((), dtype=torch.int8, device=bm.device)).to(torch.int8)
    return BlockLayout(q_len, kv_len, block_q, block_kv, cls.contiguous(), base.rule, name=name)
