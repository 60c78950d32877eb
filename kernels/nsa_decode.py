"""NSA decoding: a few new queries against a KV cache, with the compressed keys kept up to date.

``NSACache`` holds what NSA needs beyond the caller's KV cache: the compressed keys/values of the
complete compression blocks seen so far (extended incrementally: a decode step compresses only the
blocks that its new tokens complete, so the cost per token does not grow with the context), and for
``granularity="block"`` the importance gathered by the queries of the current query block so far and
the finished sum of the block before it, because a block's shared selection is scored by the queries of
the block before it.

``nsa_decode(q_new, k_cache, v_cache, cache, **nsa_kwargs)`` gives exactly the last ``Tnew`` rows of
``nsa_attention`` over the whole sequence (``k_cache``/``v_cache`` include the new tokens), provided
every query of the sequence went through ``nsa_decode`` with this cache (a prefill is simply a call
whose queries are the whole prompt). It runs ``nsa.nsa_from_compressed`` on the cached compressed
keys with ``Tq = Tnew``. One new token per sequence (per-token selection, union or gated) takes
``nsa_decode_kernels.token_decode_triton``: three launches (scores of the compressed keys split over
programs beside the window, selection and selected blocks one program per slot, the merge). Up to
``nsa.DECODE_MAX_QUERIES`` queries otherwise take the decode-shaped chain (flash-decoding:
``nsa_decode_kernels.selected_window_decode`` splits the selected blocks and window over programs; the
importance and top-n kernels split their columns when few rows run), so a step's cost is bound by the
bytes it reads, not by a handful of serial programs.

The cache holds no autograd graph (decoding is inference): gradients of a decode step reach q, k, v
and the gates, not the compression's parameters.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import resolve_backend
from .checks import check_qkv
from .nsa import build_aux, compress_kv, nsa_from_compressed
from .nsa_ref import check_gates, check_nsa_params, num_compressed_blocks


class NSACache:
    """Compressed keys/values of one batch of sequences (and, for block granularity, the running
    importance of the current query block), updated by ``nsa_decode``.

    ``cmp_block``/``cmp_stride``/``compress`` may be given here or are taken from the first
    ``nsa_decode`` call; later calls must use the same ones. A ``compress`` module must be
    translation-equivariant (it is applied to the slice of tokens that the new blocks cover), which
    holds for mean pooling and for an MLP over each block with intra-block positions.
    """

    def __init__(self, cmp_block: Optional[int] = None, cmp_stride: Optional[int] = None, compress=None):
        self.cmp_block, self.cmp_stride, self.compress = cmp_block, cmp_stride, compress
        self.reset()

    def reset(self) -> None:
        """Forget the sequence (keeps the geometry and the compression)."""
        self.kv_len = 0           # tokens of the KV cache seen so far
        self.num_blocks = 0       # complete compressed blocks held
        self._k = self._v = None  # [B, capacity, HKV, D] buffers, doubled when full
        self.queries_until = 0    # position after the last query that went through nsa_decode
        self.carry_block = -1     # query block whose earlier queries' importance is in carry
        self.carry: Optional[torch.Tensor] = None  # [B, HKV, NSEL at the time] float32
        self.previous: Optional[torch.Tensor] = None  # finished sum of block carry_block - 1 (None: unknown)

    @property
    def k_cmp(self) -> Optional[torch.Tensor]:
        return None if self._k is None else self._k[:, : self.num_blocks]

    @property
    def v_cmp(self) -> Optional[torch.Tensor]:
        return None if self._v is None else self._v[:, : self.num_blocks]

    def configure(self, cmp_block: int, cmp_stride: int, compress) -> None:
        """Adopt the NSA geometry on first use; refuse a different one later."""
        if self.cmp_block is None and self.cmp_stride is None and self.kv_len == 0:
            self.cmp_block, self.cmp_stride, self.compress = cmp_block, cmp_stride, compress
            return
        if (self.cmp_block, self.cmp_stride) != (cmp_block, cmp_stride):
            raise ValueError(f"this NSACache compresses with cmp_block={self.cmp_block}, cmp_stride={self.cmp_stride}; "
                             f"got cmp_block={cmp_block}, cmp_stride={cmp_stride} (use a new cache)")
        if compress is not None and compress is not self.compress:
            raise ValueError("compress differs from the one this NSACache was built with (use a new cache)")

    def update(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Compress the blocks completed by the tokens appended since the last call."""
        if self.cmp_block is None or self.cmp_stride is None:
            raise ValueError("NSACache needs cmp_block and cmp_stride (give them to NSACache or call nsa_decode)")
        b, tk, h, d = k_cache.shape
        if tk < self.kv_len:
            raise ValueError(f"the KV cache holds {tk} tokens but this NSACache has seen {self.kv_len}: it belongs to "
                             "another (longer) sequence; call cache.reset()")
        if self._k is not None and (self._k.shape[0], self._k.shape[2], self._k.shape[3], self._k.dtype,
                                    self._k.device) != (b, h, d, k_cache.dtype, k_cache.device):
            raise ValueError(f"the KV cache changed batch/heads/head_dim/dtype/device from those of this NSACache "
                             f"({tuple(self._k.shape)}, {self._k.dtype}, {self._k.device}); call cache.reset()")
        total = num_compressed_blocks(tk, self.cmp_block, self.cmp_stride)
        if total > self.num_blocks:
            first = self.num_blocks
            # the tokens of blocks first .. total-1: a compression of this slice yields exactly those blocks
            lo, hi = first * self.cmp_stride, (total - 1) * self.cmp_stride + self.cmp_block
            with torch.no_grad():
                k_new, v_new = compress_kv(k_cache[:, lo:hi], v_cache[:, lo:hi], self.compress, self.cmp_block,
                                           self.cmp_stride)
            self._reserve(total, k_new)
            self._k[:, first:total] = k_new
            self._v[:, first:total] = v_new
            self.num_blocks = total
        elif self._k is None:
            self._reserve(1, k_cache.new_empty(b, 0, h, d))
        self.kv_len = tk

    def _reserve(self, blocks: int, like: torch.Tensor) -> None:
        if self._k is not None and self._k.shape[1] >= blocks:
            return
        capacity = max(blocks, 16, 2 * (0 if self._k is None else self._k.shape[1]))
        b, _, h, d = like.shape
        k = like.new_empty(b, capacity, h, d)
        v = like.new_empty(b, capacity, h, d)
        if self._k is not None:
            k[:, : self.num_blocks] = self._k[:, : self.num_blocks]
            v[:, : self.num_blocks] = self._v[:, : self.num_blocks]
        self._k, self._v = k, v

    def block_sums(self, q_start: int, block: int):
        """``(prefix, previous)`` for new queries starting at ``q_start`` (see ``nsa.block_selection_scores``):
        the importance of the earlier queries of ``q_start``'s block and the finished sum of the block before
        it, each None where this cache did not see those queries."""
        if self.carry is None or self.queries_until != q_start:
            return None, None
        current = q_start // block
        if current == self.carry_block:
            return self.carry, self.previous
        if current == self.carry_block + 1:  # the new queries open a block: carry is the finished one before it
            return None, self.carry
        return None, None

    def remember_blocks(self, block_importance: torch.Tensor, previous: Optional[torch.Tensor], kv_len: int,
                        block: int) -> None:
        """Keep the per-query-block sums of the last call (``block_importance [B, HKV, NQB, NSEL]``, its
        first block's sum already including the earlier queries) for the next call: the last block's running
        sum, and the finished sum of the block before it (``previous`` when the call stayed in one block)."""
        self.carry = block_importance[:, :, -1]
        self.previous = block_importance[:, :, -2] if block_importance.shape[2] > 1 else previous
        self.carry_block, self.queries_until = (kv_len - 1) // block, kv_len


def nsa_decode(q_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache: NSACache, *, block: int = 64,
               top_n: int = 16, window: int = 512, cmp_block: int = 32, cmp_stride: int = 16, init_blocks: int = 1,
               local_blocks: int = 2, combine: str = "union", granularity: str = "token",
               gates: Optional[torch.Tensor] = None, compress=None, scale: Optional[float] = None,
               backend: str = "auto", return_aux: bool = False, select_outside_window: bool = False):
    """NSA of the newest queries ``q_new [B, Tnew, HQ, D]`` (positions ``Tk - Tnew .. Tk - 1``) over the KV cache
    ``k_cache, v_cache [B, Tk, HKV, D]`` (new tokens included), updating ``cache``.

    Same keyword arguments and return values as ``nsa.nsa_attention``; equal to the last ``Tnew`` rows of
    ``nsa_attention`` over the whole sequence (see the module docstring for the block-granularity
    condition). ``compress`` defaults to the cache's.
    """
    check_nsa_params(block=block, top_n=top_n, window=window, cmp_block=cmp_block, cmp_stride=cmp_stride,
                     init_blocks=init_blocks, local_blocks=local_blocks, combine=combine, granularity=granularity,
                     backend=backend, select_outside_window=select_outside_window)
    if not isinstance(cache, NSACache):
        raise TypeError(f"cache must be an NSACache, got {type(cache).__name__}")
    scale = check_qkv(q_new, k_cache, v_cache, scale)
    check_gates(gates, combine, q_new)
    backend = resolve_backend(backend, q_new.device)
    cache.configure(cmp_block, cmp_stride, compress)
    cache.update(k_cache, v_cache)
    tnew, tk = q_new.shape[1], k_cache.shape[1]
    q_start = tk - tnew
    prefix, previous = cache.block_sums(q_start, block) if granularity == "block" else (None, None)
    out, parts = nsa_from_compressed(q_new, k_cache, v_cache, cache.k_cmp, cache.v_cmp, block=block, top_n=top_n,
                                     window=window, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                     init_blocks=init_blocks, local_blocks=local_blocks, combine=combine,
                                     granularity=granularity, gates=gates, scale=scale, backend=backend,
                                     block_prefix=prefix, block_previous=previous,
                                     select_outside_window=select_outside_window)
    if granularity == "block":
        cache.remember_blocks(parts["block_importance"], previous, tk, block)
    else:
        cache.queries_until = tk
    if not return_aux:
        return out
    return out, build_aux(parts, combine, q_start, tnew, block)


__all__ = ["NSACache", "nsa_decode"]
