"""Learnable native sparse attention (arXiv 2502.11089) and how to put it inside a transformers model.

The NSA kernels (``nsa_viz.kernels.nsa.nsa_attention``) compute the three branches; what is *learned*
lives here:

- :class:`BlockCompressor` — the paper's compression φ: an MLP over each block of ``l`` keys (or
  values) with an intra-block position encoding. It is built as *mean pooling plus a learned
  correction* (position encoding and the MLP's output layer start at zero, pooling weights at 1/l),
  so at initialisation it is exactly the training-free mean compression and a pretrained model
  starts from the behaviour it already has.
- :class:`BranchGates` — the per-head gates ``g_cmp, g_slc, g_win`` = sigmoid(MLP(hidden state)).
  The output layer starts at zero weight with a bias giving the chosen initial gate values, so every
  token starts with the same, chosen mix (see :data:`DEFAULT_GATE_INIT`).
- :class:`NSAAttention` — both, around one call of ``nsa_attention``; optionally it keeps the
  selection-diversity and gate statistics of its last call and an auxiliary loss against selection
  collapse (the guards: :func:`selection_diversity`, :func:`gate_stats`, :func:`compressed_entropy`).
- :class:`NSARetrofit` — one :class:`NSAAttention` per layer of a Llama-family model, installed through
  transformers' ``AttentionInterface`` under its own name (``"nsa_viz_trainable"``). The gates need
  the attention layer's input hidden state, which an attention function does not receive: a forward
  pre-hook on each attention module hands it over. Nothing of the model is replaced, and
  :meth:`NSARetrofit.remove` restores the model's own attention.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .patterns import NSA

TRAIN_ATTN_NAME = "nsa_viz_trainable"
LAYER_ATTR = "_nsa_viz_trainable"         # on an attention module: its NSAAttention (not a registered submodule)
HIDDEN_ATTR = "_nsa_viz_trainable_hidden"  # on an attention module: the hidden state of the running forward

# Gate probabilities (cmp, slc, win) at initialisation, summing to 1 so the output keeps its scale.
# Measured on SmolLM2 at 1k tokens (NSA l'=16, n=16, w=128, l=8, d=4), KL to dense per token on a
# docs / code window: (.03,.95,.02) 0.017 / 0.024, (.03,.87,.10) 0.028 / 0.042, (.03,.67,.30)
# 0.118 / 0.192, (.03,.47,.50) 0.291 / 0.494; training-free union 0.0135 / 0.0178.
# A pretrained dense model is best approximated by trusting the selected blocks (they always hold the
# query's own and the previous block, and the blocks the model attends to most); mixing in the
# window-only output pulls toward pure locality. cmp and win start low but not at 0, where their
# sigmoid would pass no gradient.
DEFAULT_GATE_INIT = (0.03, 0.94, 0.03)

BACKENDS = ("auto", "triton", "reference", "oracle")


def nsa_function(backend: str = "auto"):
    """The NSA attention to call: ``nsa_attention`` from the kernels, or its naive oracle
    ``nsa_attention_reference`` for ``backend="oracle"`` (or when the kernels are not installed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "oracle":
        try:
            from .kernels.nsa import nsa_attention
            return lambda *a, **kw: nsa_attention(*a, backend=backend, **kw)
        except ImportError:
            pass
    from .kernels.nsa_ref import nsa_attention_reference
    return lambda *a, **kw: nsa_attention_reference(*a, **kw)


def _num_compressed(kv_len: int, cmp_block: int, cmp_stride: int) -> int:
    from .kernels.nsa_compressed_ref import num_compressed
    return num_compressed(kv_len, cmp_block, cmp_stride)


def _logit(p: float) -> float:
    if not 0.0 < p < 1.0:
        raise ValueError(f"gate initial values must lie strictly between 0 and 1, got {p!r}")
    return math.log(p / (1.0 - p))


# --------------------------------------------------------------------------- guards
# Thresholds of the collapse and saturation flags; heuristics, documented so users can judge them.
COLLAPSE_WINDOW_LIKE = 0.9      # free picks are just the most recent blocks in >= 90 % of rows
COLLAPSE_ENTROPY_RATIO = 0.5    # free picks spread less than half as much (in entropy) as random picks
GATE_SATURATION = 0.01          # a gate within 0.01 of 0 or 1 passes almost no gradient (g(1-g) < 0.01)
GATE_MARGIN = 0.02              # the saturation penalty starts where a gate leaves [0.02, 0.98]


def selection_diversity(block_idx: torch.Tensor, *, block: int, kv_len: int, init_blocks: int = 1,
                        local_blocks: int = 2) -> dict:
    """How varied NSA's block selection is, from ``block_idx [B, HKV, Tq, N]`` (-1 = unused slot; the
    queries sit at the last ``Tq`` of ``kv_len`` positions). Cheap enough to run during training.

    Only *informative* rows count: those with more free candidates (visible, non-forced blocks) than
    free picks, where the selection had a choice. Returns

    - ``window_like``: fraction of those rows whose free picks are exactly the most recent free
      candidates, i.e. NSA degenerated into a sliding window of blocks;
    - ``pick_entropy_ratio``: entropy of the histogram of free picks over key blocks, divided by the
      entropy the same rows would give with uniformly random picks (≈1 spread like random, →0 the same
      few blocks for everyone);
    - ``distinct_fraction``: key blocks picked at least once / key blocks that could be picked;
    - ``informative_rows`` and ``collapsed`` (``window_like > 0.9`` or ``pick_entropy_ratio < 0.5``).
    """
    if block_idx.dim() != 4:
        raise ValueError(f"block_idx must be [batch, kv_heads, q_len, top_n], got shape {tuple(block_idx.shape)}")
    sel = block_idx.long()
    tq = sel.shape[2]
    nkb = -(-kv_len // block)
    pos = torch.arange(kv_len - tq, kv_len, device=sel.device)
    cur = (pos // block)[None, None, :, None]                           # [1,1,Tq,1]
    valid = sel >= 0
    forced = valid & ((sel < init_blocks) | ((cur - sel < local_blocks) & (sel <= cur)))
    free = valid & ~forced
    n_free = free.sum(-1)                                               # [B,HKV,Tq]
    cur_r = pos // block
    n_forced_possible = torch.clamp(cur_r + 1, max=init_blocks) + torch.clamp(
        cur_r + 1 - init_blocks, min=0).clamp(max=local_blocks)
    n_cand = (cur_r + 1 - n_forced_possible)[None, None].expand_as(n_free)   # free candidates per row
    informative = (n_cand > n_free) & (n_free > 0)
    rows = int(informative.sum())
    out = {"informative_rows": rows}
    if rows == 0:
        out.update(window_like=0.0, pick_entropy_ratio=1.0, distinct_fraction=1.0, collapsed=False)
        return out
    # most recent free candidates: distances local_blocks .. local_blocks + n_free - 1 from the query's block
    dist = cur - sel
    recent = free & (dist >= local_blocks) & (dist < local_blocks + n_free[..., None])
    window_like = float(((recent.sum(-1) == n_free) & informative).sum()) / rows
    # histogram of actual free picks vs the expected histogram of random picks over the same rows
    rows_mask = informative[..., None] & free
    counts = torch.bincount(sel[rows_mask], minlength=nkb).double()
    cand_lo = torch.clamp(cur_r + 1, max=init_blocks)                   # first non-init block
    cand_hi = cur_r - local_blocks                                       # last free candidate (inclusive)
    share = n_free.double() / n_cand.clamp(min=1).double()              # each candidate's pick probability
    b_range = torch.arange(nkb, device=sel.device)
    in_cand = (b_range[None, :] >= cand_lo[:, None]) & (b_range[None, :] <= cand_hi[:, None])   # [Tq, NKB]
    expected = torch.einsum("bht,tk->k", (share * informative).double(), in_cand.double())

    def entropy(c):
        p = c / c.sum().clamp(min=1e-12)
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    h_rand = entropy(expected)
    ratio = entropy(counts) / h_rand if h_rand > 0 else 1.0
    possible = int((expected > 0).sum())
    distinct = float((counts > 0).sum()) / possible if possible else 1.0
    out.update(window_like=window_like, pick_entropy_ratio=ratio, distinct_fraction=distinct,
               collapsed=bool(window_like > COLLAPSE_WINDOW_LIKE or ratio < COLLAPSE_ENTROPY_RATIO))
    return out


def gate_stats(gates: torch.Tensor) -> dict:
    """Gate health from ``gates [B, T, HQ, 3]`` (cmp, slc, win): per branch the mean gate
    (``gate_cmp`` ...) and the fraction of saturated gates (``saturated_cmp`` ...: within
    :data:`GATE_SATURATION` of 0 or 1, where the sigmoid passes almost no gradient), and
    ``gates_saturated`` when more than half of any branch is saturated."""
    if gates.dim() != 4 or gates.shape[-1] != 3:
        raise ValueError(f"gates must be [batch, seq, heads, 3], got shape {tuple(gates.shape)}")
    g = gates.detach().float()
    out = {}
    worst = 0.0
    for i, name in enumerate(("cmp", "slc", "win")):
        gi = g[..., i]
        sat = float(((gi < GATE_SATURATION) | (gi > 1 - GATE_SATURATION)).float().mean())
        out[f"gate_{name}"] = float(gi.mean())
        out[f"saturated_{name}"] = sat
        worst = max(worst, sat)
    out["gates_saturated"] = worst > 0.5
    return out


# --------------------------------------------------------------------------- compression φ
class BlockCompressor(nn.Module):
    """Compress ``x [B, T, HKV, D]`` into ``[B, NC, HKV, D]``: one vector per block of ``cmp_block``
    tokens taken every ``cmp_stride`` tokens (only complete blocks, as the NSA contract says).

    ``φ(block) = Σ_i w_hi (x_i + pe_hi) + MLP(concat_i (x_i + pe_hi))`` with a per-key-head intra-block
    position encoding ``pe [HKV, l, D]`` and pooling weights ``w [HKV, l]``; the MLP (``l·D → hidden →
    D``, GELU) is shared by the heads. Initialised to ``pe = 0``, ``w = 1/l`` and a zero output layer,
    which is exactly mean pooling (``compress_mean``): learning starts from the training-free default.
    """

    def __init__(self, head_dim: int, num_kv_heads: int, cmp_block: int, cmp_stride: int, hidden: Optional[int] = None):
        super().__init__()
        for name, val in (("head_dim", head_dim), ("num_kv_heads", num_kv_heads), ("cmp_block", cmp_block),
                          ("cmp_stride", cmp_stride)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"BlockCompressor.{name} must be a positive integer, got {val!r}")
        if cmp_block % cmp_stride:
            raise ValueError(f"BlockCompressor.cmp_block ({cmp_block}) must be a multiple of cmp_stride ({cmp_stride})")
        hidden = head_dim if hidden is None else hidden
        self.head_dim, self.num_kv_heads = head_dim, num_kv_heads
        self.cmp_block, self.cmp_stride = cmp_block, cmp_stride
        self.pos = nn.Parameter(torch.zeros(num_kv_heads, cmp_block, head_dim))
        self.pool = nn.Parameter(torch.full((num_kv_heads, cmp_block), 1.0 / cmp_block))
        self.up = nn.Linear(cmp_block * head_dim, hidden)
        self.down = nn.Linear(hidden, head_dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2] != self.num_kv_heads or x.shape[3] != self.head_dim:
            raise ValueError(f"BlockCompressor expects x [batch, seq, {self.num_kv_heads}, {self.head_dim}], "
                             f"got shape {tuple(x.shape)}")
        b, t, h, d = x.shape
        nc = _num_compressed(t, self.cmp_block, self.cmp_stride)
        if nc == 0:
            # keep the graph connected so that callers may always backpropagate
            return x[:, :0] + 0.0 * self.pos.sum().to(x.dtype)
        dt = x.dtype
        blocks = x[:, :(nc - 1) * self.cmp_stride + self.cmp_block].unfold(1, self.cmp_block, self.cmp_stride)
        blocks = blocks.transpose(-1, -2) + self.pos.to(dt)            # [B, NC, HKV, l, D]
        pooled = torch.einsum("bnhld,hl->bnhd", blocks, self.pool.to(dt))
        hid = F.gelu(F.linear(blocks.flatten(-2), self.up.weight.to(dt), self.up.bias.to(dt)))
        return pooled + F.linear(hid, self.down.weight.to(dt), self.down.bias.to(dt))

    def extra_repr(self) -> str:
        return f"l={self.cmp_block}, d={self.cmp_stride}, heads={self.num_kv_heads}, head_dim={self.head_dim}"


# --------------------------------------------------------------------------- gates
class BranchGates(nn.Module):
    """Per-token, per-head gates ``[B, T, HQ, 3]`` (order: cmp, slc, win) = sigmoid(MLP(hidden)).

    The output layer starts at zero weight and a bias of ``logit(init)``: every token starts with the
    gate values ``init``; the hidden layer is a normal random init so that learning is not stuck.
    """

    def __init__(self, hidden_size: int, num_heads: int, hidden: int = 32,
                 init: Sequence[float] = DEFAULT_GATE_INIT):
        super().__init__()
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads), ("hidden", hidden)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"BranchGates.{name} must be a positive integer, got {val!r}")
        init = tuple(float(p) for p in init)
        if len(init) != 3:
            raise ValueError(f"BranchGates.init must give 3 values (cmp, slc, win), got {init!r}")
        self.num_heads = num_heads
        self.up = nn.Linear(hidden_size, hidden)
        self.down = nn.Linear(hidden, num_heads * 3)
        nn.init.zeros_(self.down.weight)
        with torch.no_grad():
            self.down.bias.copy_(torch.tensor([_logit(p) for p in init]).repeat(num_heads))

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dt = hidden_states.dtype
        h = F.silu(F.linear(hidden_states, self.up.weight.to(dt), self.up.bias.to(dt)))
        out = F.linear(h, self.down.weight.to(dt), self.down.bias.to(dt))
        return out.view(*hidden_states.shape[:-1], self.num_heads, 3)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden_states))


def saturation_penalty(gate_logits: torch.Tensor, margin: float = GATE_MARGIN) -> torch.Tensor:
    """Mean of ``relu(|logit| - logit(1 - margin))²`` over gates: zero while every gate stays within
    ``[margin, 1 - margin]``, growing once one drifts into the flat ends of the sigmoid, where it
    would stop passing gradient (and a branch switched off that way never comes back)."""
    edge = math.log((1.0 - margin) / margin)
    x = gate_logits if gate_logits.dtype == torch.float64 else gate_logits.float()
    return F.relu(x.abs() - edge).square().mean()


# --------------------------------------------------------------------------- the attention module
class NSAAttention(nn.Module):
    """NSA with learnable compression and gates, for ``q [B, Tq, HQ, D]``, ``k, v [B, Tk, HKV, D]``
    and the attention layer's input ``hidden [B, Tq, hidden_size]`` (needed for the gates).

    ``spec`` (an :class:`nsa_viz.patterns.NSA`) gives the geometry and ``combine``: ``"gated"`` is the
    paper's trainable form (gradients reach compression and gates); ``"union"`` ignores the gates and
    uses the compression only to score blocks (the selection is discrete, so the compression then
    receives no gradient: use it for training-free runs).

    Guards (all off by default, so a plain forward costs one ``nsa_attention`` call):

    - ``track = True``: the next forwards keep ``last_stats`` — selection diversity
      (:func:`selection_diversity`) and gate saturation (:func:`gate_stats`).
    - ``entropy_weight > 0``: ``aux_loss`` holds ``-entropy_weight ·`` the mean normalised entropy of
      the compressed-branch attention (the scores that choose the blocks). Adding it to the training
      loss keeps the scores from collapsing onto one block, which would turn the selection into a
      fixed pattern and starve the other blocks of gradient.
    - ``selection_weight > 0``: ``aux_loss`` also holds ``selection_weight ·``
      :func:`selection_distillation` — the block scores pulled toward the dense attention's block mass
      (a teacher that a retrofit has; it costs a dense ``q·k`` pass).
    - ``saturation_weight > 0``: ``aux_loss`` also holds ``saturation_weight ·``
      :func:`saturation_penalty` of the gate logits, which keeps gates out of the sigmoid's flat ends.
    """

    def __init__(self, spec: NSA, *, num_heads: int, num_kv_heads: int, head_dim: int,
                 hidden_size: Optional[int] = None, learn_compression: bool = True, learn_gates: Optional[bool] = None,
                 gate_init: Sequence[float] = DEFAULT_GATE_INIT, gate_hidden: int = 32,
                 compress_hidden: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        if not isinstance(spec, NSA):
            raise TypeError(f"spec must be a nsa_viz.patterns.NSA, got {type(spec).__name__}")
        if spec.select_outside_window:
            raise ValueError("NSAAttention trains the paper's selection (forced local blocks, candidates up to the "
                             "query): spec.select_outside_window must be False; it is an inference option of union")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        learn_gates = spec.combine == "gated" if learn_gates is None else learn_gates
        if spec.combine == "gated" and not learn_gates:
            raise ValueError("combine='gated' needs gates: learn_gates must be True (or use combine='union')")
        if learn_gates and spec.combine != "gated":
            raise ValueError("learnable gates need spec.combine='gated' (union mode has no gates)")
        if learn_gates and hidden_size is None:
            raise ValueError("hidden_size is needed for the gates (they read the attention layer's input)")
        self.spec, self.backend = spec, backend
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        if learn_compression:
            self.compress_k = BlockCompressor(head_dim, num_kv_heads, spec.cmp_block, spec.cmp_stride, compress_hidden)
            self.compress_v = BlockCompressor(head_dim, num_kv_heads, spec.cmp_block, spec.cmp_stride, compress_hidden)
        else:
            self.compress_k = self.compress_v = None
        self.gates = BranchGates(hidden_size, num_heads, gate_hidden, gate_init) if learn_gates else None
        self.track = False
        self.entropy_weight = 0.0
        self.selection_weight = 0.0
        self.saturation_weight = 0.0
        self.last_stats: Optional[dict] = None
        self.aux_loss: Optional[torch.Tensor] = None

    def kernel_kwargs(self) -> dict:
        s = self.spec
        return dict(block=s.block, top_n=s.top_n, window=s.window, cmp_block=s.cmp_block, cmp_stride=s.cmp_stride,
                    init_blocks=s.init_blocks, local_blocks=s.local_blocks, combine=s.combine,
                    granularity=s.granularity)

    def compressed(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(k_cmp, v_cmp)`` ``[B, NC, HKV, D]``: learned, or mean pooling when compression is not learned."""
        if self.compress_k is not None:
            return self.compress_k(k), self.compress_v(v)
        try:
            from .kernels.nsa import compress_mean
        except ImportError:
            from .kernels.nsa_ref import _mean_blocks as compress_mean
        s = self.spec
        return compress_mean(k, s.cmp_block, s.cmp_stride), compress_mean(v, s.cmp_block, s.cmp_stride)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: Optional[torch.Tensor] = None, *,
                scale: Optional[float] = None, return_aux: bool = False):
        gates = gate_logits = None
        if self.gates is not None:
            if hidden is None:
                raise ValueError("NSAAttention with gates needs the attention layer's input hidden state")
            if hidden.shape[:2] != q.shape[:2]:
                raise ValueError(f"hidden must be [batch, q_len, hidden_size] matching q {tuple(q.shape[:2])}, "
                                 f"got {tuple(hidden.shape)}")
            gate_logits = self.gates.logits(hidden)
            gates = torch.sigmoid(gate_logits).to(q.dtype)
        compress = None
        kc = None
        if self.compress_k is not None:
            kc, vc = self.compressed(k, v)
            # compressed once here (the aux loss needs k_cmp too); the kernel receives the results
            compress = (lambda _x, _c=kc: _c, lambda _x, _c=vc: _c)
        want_aux = return_aux or self.track
        fn = nsa_function(self.backend)
        res = fn(q, k, v, **self.kernel_kwargs(), gates=gates, compress=compress, scale=scale, return_aux=want_aux)
        out, aux = res if want_aux else (res, None)
        self.aux_loss = None
        if self.training and self.saturation_weight > 0 and gate_logits is not None:
            self.aux_loss = self.saturation_weight * saturation_penalty(gate_logits)
        if self.training and (self.entropy_weight > 0 or self.selection_weight > 0):
            if kc is None or k.requires_grad:
                # these losses train the compression only, never what produced q and k
                kc, _ = self.compressed(k.detach(), v.detach())
            losses = []
            if self.entropy_weight > 0:
                losses.append(-self.entropy_weight * compressed_entropy(q.detach(), kc, self.spec, scale=scale,
                                                                         kv_len=k.shape[1]))
            if self.selection_weight > 0:
                losses.append(self.selection_weight * selection_distillation(q, k, kc, self.spec, scale=scale))
            if self.aux_loss is not None:
                losses.append(self.aux_loss)
            self.aux_loss = sum(losses[1:], losses[0])
        if self.track:
            s = self.spec
            stats = selection_diversity(aux["block_idx"], block=s.block, kv_len=k.shape[1],
                                        init_blocks=s.init_blocks, local_blocks=s.local_blocks)
            if gates is not None:
                stats.update(gate_stats(gates.detach()))
            self.last_stats = stats
        return (out, aux) if return_aux else out

    def extra_repr(self) -> str:
        return f"{self.spec!r}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}"


def compressed_entropy(q: torch.Tensor, k_cmp: torch.Tensor, spec: NSA, *, scale: Optional[float] = None,
                       kv_len: Optional[int] = None) -> torch.Tensor:
    """Mean over queries and heads of the normalised entropy (0..1) of the compressed-branch softmax,
    differentiable in ``q`` and ``k_cmp``. Queries seeing fewer than two compressed keys are left out.

    This is the distribution whose group sums choose the blocks: when it piles onto one block for
    every query (entropy near 0), selection stops depending on the input.
    """
    from .kernels.nsa_compressed_ref import compressed_visibility

    b, tq, hq, d = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    kv_len = tq if kv_len is None else kv_len
    scale = d ** -0.5 if scale is None else scale
    if nc < 2:
        return q.new_zeros((), dtype=torch.float32)
    vis = compressed_visibility(0, tq, kv_len - tq, nc, spec.cmp_block, spec.cmp_stride, q.device)  # [Tq, NC]
    n_vis = vis.sum(-1)
    keep = n_vis >= 2
    if not bool(keep.any()):
        return q.new_zeros((), dtype=torch.float32)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(work).view(b, tq, hkv, hq // hkv, d)
    s = torch.einsum("bthgd,bjhd->bthgj", qg, k_cmp.to(work)) * scale
    s = s.masked_fill(~vis[None, :, None, None, :], float("-inf"))
    logp = torch.log_softmax(s, -1)
    ent = -(logp.exp() * logp.masked_fill(~vis[None, :, None, None, :], 0.0)).sum(-1)   # [B,Tq,HKV,G]
    norm = torch.log(n_vis.clamp(min=2).to(work))[None, :, None, None]
    return (ent / norm)[:, keep].mean()


def selection_distillation(q: torch.Tensor, k: torch.Tensor, k_cmp: torch.Tensor, spec: NSA, *,
                           scale: Optional[float] = None, max_bytes: int = 64 << 20) -> torch.Tensor:
    """How far NSA's block scores are from where dense attention really goes: the mean over rows (and
    key/value groups) of ``KL(dense block mass || importance)``, both restricted to the *free* candidate
    blocks (visible and not forced) and renormalised there, over the rows where selection has a choice.

    The target is the dense softmax of ``q`` over ``k`` summed per selection block and over the query
    heads of a group (no gradient); the prediction is NSA's importance — the compressed-branch softmax
    mapped to selection blocks (eq. 9 overlap weights) and summed over the group — differentiable in
    ``k_cmp`` only. Selection itself is discrete, so without this term the compression learns only
    from its share of the gated output (``g_cmp · o_cmp``), not from the quality of the blocks it
    picks: the selected branch starves it of signal. A retrofit has the dense attention at hand as a
    teacher for the scorer; this loss uses it.
    """
    from .kernels.nsa_compressed_ref import compressed_to_selection, compressed_visibility

    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    nc = k_cmp.shape[1]
    scale = d ** -0.5 if scale is None else scale
    blk, nsel = spec.block, -(-tk // spec.block)
    if nc == 0:
        return k_cmp.sum() * 0.0
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    weights = compressed_to_selection(nc, nsel, spec.cmp_block, spec.cmp_stride, blk, q.device).to(work)
    qd, kd, kc = q.detach().to(work), k.detach().to(work), k_cmp.to(work)
    offset = tk - tq
    pad = nsel * blk - tk
    total, rows = kc.new_zeros(()), 0
    step = max(1, int(max_bytes // max(1, b * hq * tk * 4 * 3)))
    for r0 in range(0, tq, step):
        r1 = min(r0 + step, tq)
        pos = torch.arange(r0, r1, device=q.device) + offset
        cur = (pos // blk)[:, None]
        sel = torch.arange(nsel, device=q.device)[None, :]
        visible = sel <= cur
        free = visible & (sel >= spec.init_blocks) & (sel <= cur - spec.local_blocks)        # [r, NSEL]
        n_forced = (visible & ~free).sum(-1)
        informative = free.sum(-1) > (spec.top_n - n_forced).clamp(min=0)                  # a real choice
        if not bool(informative.any()):
            continue
        qr = qd[:, r0:r1].reshape(b, r1 - r0, hkv, g, d)
        with torch.no_grad():
            sc = torch.einsum("brhgd,bthd->brhgt", qr, kd) * scale
            causal = torch.arange(tk, device=q.device)[None, :] <= pos[:, None]
            sc = sc.masked_fill(~causal[None, :, None, None, :], float("-inf"))
            p = torch.softmax(sc, -1).sum(3)                                                  # [b, r, hkv, Tk]
            mass = F.pad(p, (0, pad)).view(b, r1 - r0, hkv, nsel, blk).sum(-1)
            target = mass * free[None, :, None, :]
            target = target / target.sum(-1, keepdim=True).clamp(min=1e-30)
        vis_c = compressed_visibility(r0, r1, offset, nc, spec.cmp_block, spec.cmp_stride, q.device)
        cs = torch.einsum("brhgd,bjhd->brhgj", qr, kc) * scale
        cs = cs.masked_fill(~vis_c[None, :, None, None, :], float("-inf"))
        pc = torch.softmax(cs, -1).nan_to_num(0.0).sum(3)                                     # [b, r, hkv, NC]
        imp = (pc @ weights) * free[None, :, None, :]
        pred = imp / imp.sum(-1, keepdim=True).clamp(min=1e-30)
        kl = (target * (torch.log(target.clamp(min=1e-30)) - torch.log(pred.clamp(min=1e-30)))).sum(-1)
        keep = informative[None, :, None].expand_as(kl)
        total = total + kl[keep].sum()
        rows += int(keep.sum())
    return total / max(rows, 1)


# --------------------------------------------------------------------------- inside a transformers model
def _model_dims(config) -> dict:
    heads = config.num_attention_heads
    return dict(num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                hidden_size=config.hidden_size)


def _trainable_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function registered as ``"nsa_viz_trainable"``: runs the module's
    :class:`NSAAttention` (query ``[B, HQ, Tq, D]``, key/value ``[B, HKV, Tk, D]``), or the model's
    own attention for layers without one or while the retrofit's ``mode`` is ``"dense"``.

    In ``"transfer"`` mode it returns the dense output (so every layer sees the dense model's inputs)
    and appends to the retrofit's ``transfer_losses`` how far the NSA output is from it after the
    layer's output projection: ``|W_o (o_nsa - o_dense)|² / |W_o o_dense|²``. The NSA module runs on
    detached inputs, so the backward pass touches nothing but the NSA parameters.
    """
    layer = getattr(module, LAYER_ATTR, None)
    hidden = module.__dict__.pop(HIDDEN_ATTR, None)
    retrofit = getattr(layer, "_retrofit", None) if layer is not None else None
    mode = retrofit.mode if retrofit is not None else "nsa"
    if layer is None or mode in ("dense", "transfer"):
        from . import attention as _attn
        fn = _attn._base_attention_fn(module, _attn.base_implementation(module.config))
        if layer is None or mode == "dense":
            return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        with torch.no_grad():
            dense, _ = fn(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **kwargs)
    if dropout and module.training:
        raise ValueError("nsa_viz_trainable attention does not implement attention dropout; "
                         "set config.attention_dropout=0")
    padded = getattr(attention_mask, "_nsa_viz_padded", None) if attention_mask is not None else False
    if padded is None or padded:
        raise ValueError("nsa_viz_trainable attention does not support padded batches or custom 4-D masks: "
                         "batch sequences of equal length (attention_mask all ones)")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if mode == "transfer":
        n = retrofit.transfer_queries or q.shape[1]
        # only the last n queries (the ones furthest from the start, where sparsity drops the most keys)
        qs = q[:, -n:].detach()
        hs = None if hidden is None else hidden[:, -n:].detach()
        out = layer(qs, k.detach(), v.detach(), hs, scale=scaling)
        b, t = out.shape[:2]
        proj_dense = module.o_proj(dense[:, -n:].reshape(b, t, -1).to(out.dtype))
        proj_nsa = module.o_proj(out.reshape(b, t, -1))
        err = (proj_nsa.float() - proj_dense.float()).square().sum() / proj_dense.float().square().sum().clamp(min=1e-12)
        retrofit.transfer_losses.append(err)
        return dense, None
    out = layer(q, k, v, hidden, scale=scaling)
    return out, None


_REGISTERED = False


def register_trainable_attention() -> str:
    """Register ``"nsa_viz_trainable"`` with transformers' attention and mask interfaces (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        from .attention import nsa_viz_mask

        AttentionInterface.register(TRAIN_ATTN_NAME, _trainable_attention)
        AttentionMaskInterface.register(TRAIN_ATTN_NAME, nsa_viz_mask)
        _REGISTERED = True
    return TRAIN_ATTN_NAME


def _hand_over_hidden(module, args, kwargs):
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    module.__dict__[HIDDEN_ATTR] = hidden


class NSARetrofit(nn.Module):
    """One learnable :class:`NSAAttention` per chosen layer of a Llama-family transformers model.

    ``NSARetrofit(model, NSA(..., combine="gated"))`` builds the modules (dims from ``model.config``);
    :meth:`install` puts them in the model, :meth:`remove` takes them out (the model's own attention
    again, exactly). Its ``state_dict`` holds only the NSA parameters, so checkpoints stay small and the
    base model is untouched. ``mode`` says what an installed retrofit does: ``"nsa"`` (run NSA),
    ``"dense"`` (the model's own attention: the distillation teacher; ``with retrofit.disabled():``) or
    ``"transfer"`` (layer-wise attention transfer, see :meth:`transfer`).
    """

    def __init__(self, model, spec: NSA, *, layers: Optional[Iterable[int]] = None, **module_kwargs):
        super().__init__()
        from .models import attention_modules

        mods = attention_modules(model)
        layers = sorted(mods) if layers is None else sorted(set(int(i) for i in layers))
        bad = [i for i in layers if i not in mods]
        if bad:
            raise ValueError(f"layers must be in [0, {len(mods) - 1}], got {bad}")
        dims = _model_dims(model.config)
        self.spec = spec
        self.layers = nn.ModuleDict({str(i): NSAAttention(spec, **dims, **module_kwargs) for i in layers})
        self.mode = "nsa"
        self.transfer_losses: list = []
        self.transfer_queries: Optional[int] = None
        object.__setattr__(self, "_model", None)   # a plain reference: the model is not ours to save
        self._hooks = []
        self._previous_impl = None
        for lay in self.layers.values():
            object.__setattr__(lay, "_retrofit", self)   # back-reference, not a submodule

    # -- installation
    def install(self, model) -> "NSARetrofit":
        """Make ``model`` run these NSA modules (switches it to ``attn_implementation="nsa_viz_trainable"``)."""
        from . import attention as _attn
        from .models import attention_modules

        if self._model is not None:
            raise RuntimeError("this NSARetrofit is already installed; remove() it first")
        config = model.config
        current = config._attn_implementation
        if current == _attn.ATTN_NAME:
            raise ValueError("the model runs nsa_viz patterns (apply_pattern); remove_pattern(model) before installing "
                             "a trainable NSA retrofit")
        if any(getattr(m, LAYER_ATTR, None) is not None for m in attention_modules(model).values()):
            raise RuntimeError("the model already has a trainable NSA retrofit installed")
        if getattr(config, "attention_dropout", 0.0):
            raise ValueError("NSA retrofit needs config.attention_dropout == 0")
        register_trainable_attention()
        mods = attention_modules(model)
        device = next(model.parameters()).device
        self.to(device)
        for key, lay in self.layers.items():
            mod = mods[int(key)]
            object.__setattr__(mod, LAYER_ATTR, lay)
            self._hooks.append(mod.register_forward_pre_hook(_hand_over_hidden, with_kwargs=True))
        if current != TRAIN_ATTN_NAME:
            _attn.set_base_implementation(config, current or "sdpa")
            model.set_attn_implementation(TRAIN_ATTN_NAME)
        object.__setattr__(self, "_model", model)
        self._previous_impl = current
        return self

    def remove(self) -> None:
        """Take the modules out of the model and restore its own attention implementation."""
        from . import attention as _attn
        from .models import attention_modules

        model = self._model
        if model is None:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for mod in attention_modules(model).values():
            if getattr(mod, LAYER_ATTR, None) is not None:
                object.__delattr__(mod, LAYER_ATTR)
            mod.__dict__.pop(HIDDEN_ATTR, None)
        if model.config._attn_implementation == TRAIN_ATTN_NAME:
            model.set_attn_implementation(self._previous_impl or "sdpa")
        _attn.clear_base_implementation(model.config)
        object.__setattr__(self, "_model", None)

    @contextlib.contextmanager
    def installed(self, model):
        """``with retrofit.installed(model): ...`` installs for the block and removes after."""
        self.install(model)
        try:
            yield self
        finally:
            self.remove()

    @contextlib.contextmanager
    def disabled(self):
        """Run the installed model densely inside the block (its own attention; e.g. the teacher)."""
        prev = self.mode
        self.mode = "dense"
        try:
            yield self
        finally:
            self.mode = prev

    @contextlib.contextmanager
    def transfer(self, queries: Optional[int] = None):
        """Layer-wise attention transfer inside the block: the model computes its dense outputs while
        each NSA layer's distance to its dense attention output (after ``o_proj``) is collected in
        ``transfer_losses`` (cleared on entry), ready to be summed and backpropagated.

        ``queries``: compare only the last ``queries`` positions of each sequence (all keys still
        count); NSA's cost then scales with ``queries`` instead of the length, and the late positions
        are where the sparse pattern leaves out most keys."""
        if queries is not None and (isinstance(queries, bool) or not isinstance(queries, int) or queries < 1):
            raise ValueError(f"queries must be a positive integer or None, got {queries!r}")
        prev, prev_q = self.mode, self.transfer_queries
        self.mode, self.transfer_queries = "transfer", queries
        self.transfer_losses = []
        try:
            yield self
        finally:
            self.mode, self.transfer_queries = prev, prev_q

    # -- guards
    def set_tracking(self, on: bool = True) -> None:
        """Keep selection-diversity and gate statistics of the next forwards (``last_stats`` per layer)."""
        for lay in self.layers.values():
            lay.track = on
            if not on:
                lay.last_stats = None

    def set_entropy_weight(self, weight: float) -> None:
        """Weight of the anti-collapse auxiliary loss (see :class:`NSAAttention`)."""
        if weight < 0:
            raise ValueError(f"entropy weight must be >= 0, got {weight!r}")
        for lay in self.layers.values():
            lay.entropy_weight = float(weight)

    def set_saturation_weight(self, weight: float) -> None:
        """Weight of the gate saturation penalty (see :func:`saturation_penalty`)."""
        if weight < 0:
            raise ValueError(f"saturation weight must be >= 0, got {weight!r}")
        for lay in self.layers.values():
            lay.saturation_weight = float(weight)

    def set_selection_weight(self, weight: float) -> None:
        """Weight of the selection-distillation loss (block scores toward the dense block mass)."""
        if weight < 0:
            raise ValueError(f"selection weight must be >= 0, got {weight!r}")
        for lay in self.layers.values():
            lay.selection_weight = float(weight)

    def aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the layers' auxiliary losses from the last forward (None when there are none)."""
        losses = [lay.aux_loss for lay in self.layers.values() if lay.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def stats(self) -> Dict[int, dict]:
        """{layer: statistics of the last tracked forward}."""
        return {int(k): lay.last_stats for k, lay in self.layers.items() if lay.last_stats is not None}


__all__ = ["BlockCompressor", "BranchGates", "NSAAttention", "NSARetrofit", "compressed_entropy", "nsa_function",
           "selection_distillation", "saturation_penalty",
           "selection_diversity", "gate_stats",
           "register_trainable_attention", "DEFAULT_GATE_INIT", "TRAIN_ATTN_NAME"]
