"""Recording what attention did inside a model: block-level attention mass, chosen rows, NSA selections.

``with capture(model, rows=[-1]) as rec: model(input_ids)`` records, for every layer (or the ones
asked for), where dense attention put its mass and where the layer's pattern put it, at block level
(``T/b × T/b``, computed blockwise by ``nsa_viz.kernels.attention_stats``: never a T×T matrix), the
full probability rows of a few chosen query positions, the exact fraction of dense mass each query
keeps under the pattern (recall), and for NSA layers the selected blocks, importance and gates.
A memory budget is checked before anything is computed. ``Recording.save`` / ``Recording.load``
keep it in one file of plain tensors.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .kernels.attention_stats import attention_mass_stats
from .patterns import NSA, Dense, Pattern

FORMAT_TAG = "nsa_viz.recording"
FORMAT_VERSION = 1
DEFAULT_BUDGET = 512 * 2**20


class CaptureBudgetError(MemoryError):
    """A capture request would exceed its memory budget (raised before anything is computed)."""


@dataclass
class LayerRecord:
    """What one layer did in the first forward pass under :func:`capture`.

    Shapes use B batch, HQ query heads, HKV key/value heads, Tq queries, Tk keys, b = ``block``,
    NQB = ceil(Tq / b), NKB = ceil(Tk / b), R chosen rows. All float tensors are float32 on the CPU.

    - ``layer``: layer index; ``pattern``: label of what the layer ran (``"model"`` for the model's
      own attention; ``"g0: ..., g1: ..."`` for per-group patterns); ``block``: b.
    - ``q_len``, ``kv_len``, ``q_offset`` (= Tk - Tq: query i sits at absolute position i + q_offset),
      ``num_q_heads``, ``num_kv_heads``.
    - ``dense_block_mass [B, HQ, NQB, NKB]``: dense causal attention probability summed over the
      queries of query block i and the keys of key block j (a row of blocks sums to its number of queries).
    - ``dense_distance_mass [B, HQ, Tk]``: dense probability summed per distance ``q_pos - k_pos``
      (sums to Tq per head).
    - ``pattern_block_mass``, ``pattern_distance_mass``: the same for the pattern's own attention
      (None when every head ran dense attention).
    - ``recall [B, HQ, Tq]``: per query, the fraction of its dense attention mass that falls on keys the
      pattern lets it see (exactly ``exp(lse_pattern - lse_dense)``); 1 for dense.
    - ``compare_recall {label: [B, HQ, Tq]}``: the same for the extra patterns asked for with ``compare``
      (static ones through their layout, NSA through its per-token selection on this layer's q, k).
    - ``compare_nsa {label: {name: tensor}}``: for NSA patterns in ``compare``, what the layer would have
      selected (``block_idx``, ``block_count``, ``importance``, ``recall_selected``; see ``nsa``).
    - ``row_index [R]`` (query indices), ``dense_rows`` / ``pattern_rows [B, HQ, R, Tk]``: full probability rows.
    - ``nsa``: for NSA layers, keyed by name (per group as ``nsa["g<k>.<name>"]`` when the layer ran
      per-group patterns), None otherwise:
      ``block_idx [B, HKV, Tq, top_n]`` int32 selected selection-block indices (ascending, -1 unused),
      ``block_count [B, HKV, Tq]`` int32, ``importance [B, HKV, Tq, NSEL]`` (compressed-branch scores
      per selection block, summed over the group's query heads), ``recall_selected [B, HQ, Tq]`` (dense
      mass on the selected blocks alone, window excluded), ``gates [B, Tq, HQ, 3]`` when gated.
      For NSA the pattern maps and ``recall`` describe one softmax over selected blocks ∪ window (what
      ``union`` computes; for ``gated`` the keys its branches may read).
    - ``nsa_params``: the NSA pattern's parameters (per group as ``nsa_params["g<k>"]`` for per-group patterns).
    """

    layer: int
    pattern: str
    block: int
    q_len: int
    kv_len: int
    q_offset: int
    num_q_heads: int
    num_kv_heads: int
    dense_block_mass: torch.Tensor
    dense_distance_mass: torch.Tensor
    recall: torch.Tensor
    pattern_block_mass: Optional[torch.Tensor] = None
    pattern_distance_mass: Optional[torch.Tensor] = None
    compare_recall: Dict[str, torch.Tensor] = field(default_factory=dict)
    compare_nsa: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    row_index: Optional[torch.Tensor] = None
    dense_rows: Optional[torch.Tensor] = None
    pattern_rows: Optional[torch.Tensor] = None
    nsa: Optional[Dict[str, torch.Tensor]] = None
    nsa_params: Optional[Dict[str, object]] = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerRecord":
        if not isinstance(d, dict):
            raise ValueError(f"a layer record must be a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(d)
        if missing:
            raise ValueError(f"layer record is missing fields {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def mean_recall(self) -> torch.Tensor:
        """[HQ]: recall averaged over batch and queries."""
        return self.recall.mean(dim=(0, 2))


@dataclass
class Recording:
    """Everything recorded under one :func:`capture` (see :class:`LayerRecord` for a layer's fields).

    - ``layers {layer index: LayerRecord}``: ``rec.layers[i].dense_block_mass`` etc.
    - ``tokens [B, T]`` (int64): the input ids of the recorded forward pass; ``token_strings`` (list per
      sequence) when a tokenizer was given.
    - ``meta``: model type, head counts, block size, the requested rows and budget.
    - ``ignored_calls``: forward passes after the first (e.g. decode steps), which are not recorded.
    """

    layers: Dict[int, LayerRecord] = field(default_factory=dict)
    tokens: Optional[torch.Tensor] = None
    token_strings: Optional[List[List[str]]] = None
    meta: Dict[str, object] = field(default_factory=dict)
    ignored_calls: int = 0

    def nbytes(self) -> int:
        total = 0
        for rec in self.layers.values():
            for v in rec.to_dict().values():
                total += _nbytes(v)
        return total

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """One file (``torch.save`` of plain tensors, strings and numbers) with a format tag and version."""
        payload = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "meta": dict(self.meta),
                   "tokens": self.tokens, "token_strings": self.token_strings, "ignored_calls": self.ignored_calls,
                   "layers": {int(i): r.to_dict() for i, r in self.layers.items()}}
        torch.save(payload, os.fspath(path))

    @classmethod
    def load(cls, path) -> "Recording":
        """Read a file written by :meth:`save`; a corrupt or foreign file gives a ValueError saying so."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no recording at {path!r}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and weights-only errors all mean "not ours or damaged"
            raise ValueError(f"{path!r} is not a readable nsa_viz recording (corrupt or foreign file: "
                             f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
            raise ValueError(f"{path!r} is not a nsa_viz recording (no '{FORMAT_TAG}' format tag)")
        version = payload.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path!r} is a nsa_viz recording of format version {version!r}; this version of "
                             f"nsa_viz reads version {FORMAT_VERSION}")
        try:
            layers = {int(i): LayerRecord.from_dict(d) for i, d in payload["layers"].items()}
            return cls(layers=layers, tokens=payload.get("tokens"), token_strings=payload.get("token_strings"),
                       meta=dict(payload.get("meta") or {}), ignored_calls=int(payload.get("ignored_calls") or 0))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{path!r} is a damaged nsa_viz recording: {exc}") from exc

    def __repr__(self) -> str:
        return (f"Recording({len(self.layers)} layers, tokens={None if self.tokens is None else tuple(self.tokens.shape)}, "
                f"{self.nbytes() / 2**20:.1f} MiB)")


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, dict):
        return sum(_nbytes(x) for x in v.values())
    return 0


# --------------------------------------------------------------------------- budget
def estimate_layer_bytes(batch: int, q_heads: int, kv_heads: int, q_len: int, kv_len: int, block: int = 64,
                         rows: int = 0, pattern: bool = True, compare: int = 0, nsa_top_n: int = 0,
                         compare_nsa: Sequence[Pattern] = (), nsa_block: int = 64) -> int:
    """Bytes one layer's record will hold (float32 maps, distance masses, rows, recall, NSA selections).

    ``nsa_top_n``: the layer runs NSA with that ``top_n`` (selection block ``nsa_block``);
    ``compare_nsa``: the NSA patterns among ``compare``, whose selections are kept too.
    """
    nqb, nkb = math.ceil(q_len / block), math.ceil(kv_len / block)
    per_map = batch * q_heads * nqb * nkb * 4
    per_dist = batch * q_heads * kv_len * 4
    per_rows = batch * q_heads * rows * kv_len * 4
    per_recall = batch * q_heads * q_len * 4
    total = per_map + per_dist + per_rows + per_recall * (1 + compare)
    if pattern:
        total += per_map + per_dist + per_rows
    selections = [(nsa_top_n, nsa_block)] if nsa_top_n else []
    selections += [(p.top_n, p.block) for p in compare_nsa]
    for top_n, sel_block in selections:
        nsel = math.ceil(kv_len / sel_block)
        # block_idx (int32), block_count (int32), importance (float32), recall_selected (float32)
        total += batch * kv_heads * q_len * (top_n + 1 + nsel) * 4 + per_recall
    return int(total)


def estimate_bytes(model, seq_len: int, *, batch: int = 1, layers: Optional[Iterable[int]] = None, rows: int = 0,
                   block: int = 64, compare: Sequence[Pattern] = ()) -> int:
    """Bytes a :func:`capture` of one forward pass of ``seq_len`` tokens would record (NSA layers and NSA
    patterns in ``compare`` counted with their selections)."""
    if isinstance(compare, int):  # older callers passed the number of static compare patterns
        compare = [Dense()] * compare
    from .models import attention_modules
    from .attention import SPEC_ATTR

    cfg = model.config
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    mods = attention_modules(model)
    chosen = list(mods) if layers is None else list(layers)
    total = 0
    for i in chosen:
        spec = getattr(mods[i], SPEC_ATTR, None)
        total += estimate_layer_bytes(batch, hq, hkv, seq_len, seq_len, block, rows, pattern=_has_pattern(spec),
                                      compare=len(compare), nsa_top_n=_nsa_top_n(spec), nsa_block=_nsa_block(spec),
                                      compare_nsa=[p for p in compare if isinstance(p, NSA)])
    return total


def _patterns_of(spec) -> List[Pattern]:
    if spec is None:
        return []
    if isinstance(spec, Pattern):
        return [spec]
    return list(spec.values())


def _has_pattern(spec) -> bool:
    return any(not isinstance(p, Dense) for p in _patterns_of(spec))


def _nsa_top_n(spec) -> int:
    return max([p.top_n for p in _patterns_of(spec) if isinstance(p, NSA)], default=0)


def _nsa_block(spec) -> int:
    return min([p.block for p in _patterns_of(spec) if isinstance(p, NSA)], default=64)


def _label(spec) -> str:
    if spec is None:
        return "model"
    if isinstance(spec, Pattern):
        return spec.label
    return ", ".join(f"g{g}: {p.label}" for g, p in sorted(spec.items()))


# --------------------------------------------------------------------------- the recorder
class Recorder:
    """Collects :class:`LayerRecord` objects while attached to a model's attention modules."""

    def __init__(self, recording: Recording, layers: Optional[set], rows: Sequence[int], block: int,
                 compare: Sequence[Pattern], budget_bytes: int, n_layers: int):
        self.rec = recording
        self.layers = layers
        self.rows = list(rows)
        self.block = block
        self.compare = list(compare)
        self.budget = budget_bytes
        self.n_layers = n_layers
        self.checked = False
        self.calls_seen = 0

    def wants(self, module) -> bool:
        i = int(module.layer_idx)
        if self.layers is not None and i not in self.layers:
            return False
        return i not in self.rec.layers and self.calls_seen <= 1

    def _check_budget(self, q, k, spec_of_layer) -> None:
        b, tq, hq, _ = q.shape
        tk, hkv = k.shape[1], k.shape[2]
        chosen = range(self.n_layers) if self.layers is None else sorted(self.layers)
        need = sum(estimate_layer_bytes(b, hq, hkv, tq, tk, self.block, len(self.rows),
                                        pattern=_has_pattern(spec_of_layer(i)), compare=len(self.compare),
                                        nsa_top_n=_nsa_top_n(spec_of_layer(i)), nsa_block=_nsa_block(spec_of_layer(i)),
                                        compare_nsa=[p for p in self.compare if isinstance(p, NSA)])
                   for i in chosen)
        if need > self.budget:
            raise CaptureBudgetError(
                f"capture would record about {need / 2**20:.1f} MiB ({len(list(chosen))} layers, batch {b}, "
                f"{tq} queries x {tk} keys, block {self.block}, {len(self.rows)} rows) but budget_bytes is "
                f"{self.budget / 2**20:.1f} MiB: record fewer layers, fewer rows, a larger block or a shorter "
                f"input, or raise budget_bytes")

    def _rows(self, tq: int) -> Optional[List[int]]:
        if not self.rows:
            return None
        out = []
        for r in self.rows:
            rr = r + tq if r < 0 else r
            if not 0 <= rr < tq:
                raise ValueError(f"rows must be query indices in [-{tq}, {tq - 1}] for this input, got {r}")
            out.append(rr)
        return sorted(set(out))  # the order attention_mass_stats returns rows in

    @torch.no_grad()
    def record(self, module, q, k, v, scale, spec, infos) -> None:
        """Called by the attention function with ``q [B, Tq, HQ, D]``, ``k, v [B, Tk, HKV, D]`` and what the
        kernels returned (``infos``: list of (kv-group slice, pattern, info dict) or None for the model's own)."""
        from .attention import SPEC_ATTR, run_pattern
        from .models import attention_modules  # noqa: F401  (import cycle guard)

        if not self.checked:
            mods = {int(m.layer_idx): m for m in _sibling_modules(module)}
            self._check_budget(q, k, lambda i: getattr(mods.get(i), SPEC_ATTR, None))
            self.checked = True
        b, tq, hq, d = q.shape
        tk, hkv = k.shape[1], k.shape[2]
        g = hq // hkv
        rows = self._rows(tq)
        blk = self.block
        # one blockwise pass gives every dense figure: maps, rows, the LSE, and what the NSA comparisons need
        # (each query's mass by selection block and on the first, partial block of its window)
        nsa_compare = [cp for cp in self.compare if isinstance(cp, NSA)]
        spans = {_span_name(cp): _window_head_span(tq, tk, cp.block, cp.window, q.device)
                 for cp in nsa_compare if cp.window > 0}
        dense = attention_mass_stats(q, k, block=blk, scale=scale, causal=True, rows=rows,
                                     row_blocks=sorted({cp.block for cp in nsa_compare}), spans=spans)
        dense_lse = dense["lse"]

        recall = torch.ones(b, hq, tq, dtype=torch.float32, device=q.device)
        pat_block = pat_dist = pat_rows = None
        nsa_out, nsa_params = None, None
        if _has_pattern(spec):
            pat_block = dense["block_mass"].clone()
            pat_dist = dense["distance_mass"].clone()
            pat_rows = dense["rows"].clone() if rows is not None else None
            per_group = not isinstance(spec, Pattern)
            for sl, pat, info in infos:
                if isinstance(pat, Dense):
                    continue
                hs = slice(sl.start * g, sl.stop * g)
                qg, kg = q[:, :, hs], k[:, :, sl]
                if isinstance(pat, NSA):
                    st, lse, keep = _nsa_stats(qg, kg, scale, pat, info, blk, rows, dense_lse[:, hs])
                    prefix = f"g{sl.start}." if per_group else ""
                    nsa_out = dict(nsa_out or {})
                    nsa_out.update({prefix + name: t for name, t in keep.items()})
                    nsa_params = dict(nsa_params or {})
                    if per_group:
                        nsa_params[f"g{sl.start}"] = _nsa_params(pat)  # groups may run different NSA settings
                    else:
                        nsa_params.update(_nsa_params(pat))
                else:
                    st = attention_mass_stats(qg, kg, block=blk, scale=scale, causal=True, layout=info["layout"],
                                              rows=rows)
                    lse = info["lse"]
                pat_block[:, hs] = st["block_mass"]
                pat_dist[:, hs] = st["distance_mass"]
                if rows is not None:
                    pat_rows[:, hs] = st["rows"]
                recall[:, hs] = _recall(lse, dense_lse[:, hs])
        compare, compare_nsa = {}, {}
        for cp in self.compare:
            if isinstance(cp, NSA):
                # NSA's selection only (compression, importance, top-n): its recall follows from the dense
                # probabilities already reduced above, so NSA's own attention need not run
                keep = _nsa_compare_selection(q, k, scale, cp, _backend(module))
                rec_sel, rec_all = selection_recall(dense["row_block_mass"][cp.block], keep["block_idx"], cp.block,
                                                    cp.window, tk, dense.get("span_mass", {}).get(_span_name(cp)))
                keep["recall_selected"] = rec_sel
                compare_nsa[cp.label] = {name: t.detach().cpu() for name, t in keep.items()}
                compare[cp.label] = rec_all.cpu()
            else:
                _, info = run_pattern(cp, q, k, v, scale, backend=_backend(module), return_info=True)
                compare[cp.label] = _recall(info["lse"], dense_lse).cpu()

        cpu = lambda t: None if t is None else t.detach().float().cpu()
        self.rec.layers[int(module.layer_idx)] = LayerRecord(
            layer=int(module.layer_idx), pattern=_label(spec), block=blk, q_len=tq, kv_len=tk, q_offset=tk - tq,
            num_q_heads=hq, num_kv_heads=hkv,
            dense_block_mass=cpu(dense["block_mass"]), dense_distance_mass=cpu(dense["distance_mass"]),
            recall=cpu(recall), pattern_block_mass=cpu(pat_block), pattern_distance_mass=cpu(pat_dist),
            compare_recall=compare, compare_nsa=compare_nsa,
            row_index=None if rows is None else torch.tensor(rows, dtype=torch.long),
            dense_rows=cpu(dense.get("rows")) if rows is not None else None, pattern_rows=cpu(pat_rows),
            nsa=None if nsa_out is None else {k2: t.detach().cpu() for k2, t in nsa_out.items()},
            nsa_params=nsa_params)


def _recall(lse_pattern: torch.Tensor, lse_dense: torch.Tensor) -> torch.Tensor:
    """exp(lse_pattern - lse_dense): the dense probability mass on the keys the pattern keeps (0 if none)."""
    r = torch.exp(lse_pattern.float() - lse_dense.float())
    return torch.where(torch.isinf(lse_pattern) & (lse_pattern < 0), torch.zeros_like(r), r).clamp_(0.0, 1.0)


def _backend(module) -> str:
    from .attention import BACKEND_ATTR
    return getattr(module, BACKEND_ATTR, "auto") or "auto"


_MODULES_OF: Dict[int, list] = {}


def _sibling_modules(module) -> list:
    return _MODULES_OF.get(id(getattr(module, "_nsa_viz_recorder", None)), [module])


class SelectionMask:
    """Token visibility under an NSA selection, in the form ``BlockLayout.token_mask`` has, so that the
    blockwise statistics of :func:`nsa_viz.kernels.attention_stats.attention_mass_stats` run on it.

    ``block_idx [B, HKV, Tq, n]`` (selection blocks of ``block`` tokens, -1 unused): a query at position
    ``p`` sees the keys of its selected blocks up to ``p`` and, with ``window``, the ``window`` most
    recent keys up to ``p``.
    """

    def __init__(self, block_idx: torch.Tensor, block: int, window: int, kv_len: int):
        self.block_idx, self.block, self.window, self.kv_len = block_idx, block, window, kv_len
        self.q_offset = kv_len - block_idx.shape[2]

    def token_mask(self, q_start: int = 0, q_end: Optional[int] = None) -> torch.Tensor:
        """bool ``[B, HKV, rows, Tk]`` for query rows ``[q_start, q_end)``."""
        q_end = self.block_idx.shape[2] if q_end is None else q_end
        idx = self.block_idx[:, :, q_start:q_end].long()
        dev = idx.device
        nsel = math.ceil(self.kv_len / self.block)
        chosen = torch.zeros(*idx.shape[:3], nsel + 1, dtype=torch.bool, device=dev)
        chosen.scatter_(-1, torch.where(idx < 0, torch.full_like(idx, nsel), idx), True)
        t = torch.arange(self.kv_len, device=dev)
        q_pos = torch.arange(q_start, q_end, device=dev)[:, None] + self.q_offset
        causal = t[None, :] <= q_pos
        mask = chosen[..., t // self.block] & causal
        if self.window > 0:
            mask = mask | (causal & (q_pos - t[None, :] < self.window))
        return mask


@torch.no_grad()
def masked_lse(q: torch.Tensor, k: torch.Tensor, scale: float, mask_source, max_bytes: int = 128 * 2**20) -> torch.Tensor:
    """Log-sum-exp ``[B, HQ, Tq]`` (float32) of ``q``'s scores restricted to ``mask_source.token_mask``,
    chunked over query rows; -inf for a query that sees nothing."""
    from .kernels.block_sparse_ref import rows_per_chunk

    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    kf = k.float()
    step = max(1, rows_per_chunk(b, hq, tk, max_bytes))
    for r0 in range(0, tq, step):
        r1 = min(r0 + step, tq)
        s = torch.einsum("brhgd,bthd->bhgrt", q[:, r0:r1].float().view(b, r1 - r0, hkv, g, d), kf) * scale
        s = s.masked_fill(~mask_source.token_mask(r0, r1)[:, :, None], float("-inf"))
        out[:, :, r0:r1] = torch.logsumexp(s, -1).reshape(b, hq, r1 - r0)
    return out


def _nsa_params(pat: NSA) -> Dict[str, object]:
    return {f.name: getattr(pat, f.name) for f in fields(pat)}


def _nsa_selection(q, k, scale, pat: NSA, info, dense_lse):
    """(lse of selected ∪ window [B, HQ, Tq], tensors to keep) from what the NSA kernels returned."""
    aux = info["aux"]
    tk = k.shape[1]
    block_idx = aux["block_idx"]
    if "lse" in aux:  # union: the kernels' own log-sum-exp, [B, Tq, HQ]
        lse = aux["lse"].float().transpose(1, 2)
    else:
        lse = masked_lse(q, k, scale, SelectionMask(block_idx, pat.block, pat.window, tk))
    sel_lse = masked_lse(q, k, scale, SelectionMask(block_idx, pat.block, 0, tk))
    keep = {"block_idx": block_idx.to(torch.int32), "block_count": aux["block_count"].to(torch.int32),
            "importance": aux["importance"].float(), "recall_selected": _recall(sel_lse, dense_lse)}
    if info.get("gates") is not None:
        keep["gates"] = info["gates"].float()
    return lse, keep


def _span_name(pat: NSA) -> str:
    return f"nsa_window_head:{pat.block}:{pat.window}"


def _window_head_span(q_len: int, kv_len: int, block: int, window: int, device) -> tuple:
    """Per query (at position p): the keys of its window inside the window's first selection block,
    ``[max(0, p - window + 1), min(end of that block, p + 1))``, as (start [Tq], stop [Tq])."""
    pos = torch.arange(kv_len - q_len, kv_len, device=device)
    lo = (pos - window + 1).clamp(min=0)
    return lo, torch.minimum((lo // block + 1) * block, pos + 1)


def _nsa_compare_selection(q, k, scale, pat: NSA, backend: str) -> Dict[str, torch.Tensor]:
    """What ``nsa_attention`` would select on this q, k (mean-pooled compression, union scoring), without
    running its attention: ``block_idx``, ``block_count``, ``importance`` as the NSA kernels return them."""
    from .kernels import resolve_backend
    from .kernels.nsa import compress_mean, select_blocks
    from .kernels.nsa_compressed import compressed_importance

    backend = resolve_backend(backend, q.device)
    tk = k.shape[1]
    k_cmp = compress_mean(k, pat.cmp_block, pat.cmp_stride)
    importance = compressed_importance(q, k_cmp, cmp_block=pat.cmp_block, cmp_stride=pat.cmp_stride, block=pat.block,
                                       scale=scale, kv_len=tk, backend=backend)
    block_idx = select_blocks(importance, top_n=pat.top_n, block=pat.block, init_blocks=pat.init_blocks,
                              local_blocks=pat.local_blocks, kv_len=tk, granularity=pat.granularity, backend=backend,
                              window=pat.window, select_outside_window=pat.select_outside_window)
    return {"block_idx": block_idx.to(torch.int32), "block_count": (block_idx >= 0).sum(-1, dtype=torch.int32),
            "importance": importance.float()}


def selection_recall(row_block_mass: torch.Tensor, block_idx: torch.Tensor, block: int, window: int, kv_len: int,
                     window_head: Optional[torch.Tensor] = None):
    """Dense mass kept by an NSA selection, per query: ``(on the selected blocks, on selected ∪ window)``,
    each ``[B, HQ, Tq]``.

    ``row_block_mass [B, HQ, Tq, NSEL]``: each query's dense mass by selection block (causal: a block
    counts only up to the query); ``block_idx [B, HKV, Tq, n]`` (-1 unused); ``window_head [B, HQ, Tq]``:
    each query's mass on the part of its window inside the window's first block (see
    ``_window_head_span``). The window adds the blocks after that first one that were not selected, and
    the first block's part when that block was not selected; nothing is counted twice."""
    b, hq, tq, nsel = row_block_mass.shape
    g = hq // block_idx.shape[1]
    idx = block_idx.long().repeat_interleave(g, dim=1)
    valid = idx >= 0
    chosen = torch.zeros(b, hq, tq, nsel + 1, dtype=torch.bool, device=idx.device)
    chosen.scatter_(-1, torch.where(valid, idx, torch.full_like(idx, nsel)), True)
    chosen = chosen[..., :nsel]
    selected = (row_block_mass * chosen).sum(-1)
    if window <= 0:
        return selected.clamp_(0.0, 1.0), selected.clone()
    pos = torch.arange(kv_len - tq, kv_len, device=idx.device)
    first = ((pos - window + 1).clamp(min=0) // block)[:, None]  # the window's first block
    last = (pos // block)[:, None]
    s = torch.arange(nsel, device=idx.device)[None, :]
    later = (s > first) & (s <= last)  # [Tq, NSEL] blocks wholly inside the window up to the query
    union = selected + (row_block_mass * (later & ~chosen)).sum(-1)
    head_free = ~torch.gather(chosen, -1, first.expand(b, hq, tq, 1)).squeeze(-1)
    union = union + head_free * window_head
    return selected.clamp_(0.0, 1.0), union.clamp_(0.0, 1.0)


def _nsa_stats(q, k, scale, pat: NSA, info, block, rows, dense_lse):
    """Block/distance mass and rows of an NSA layer's attention, its lse and the tensors to keep."""
    lse, keep = _nsa_selection(q, k, scale, pat, info, dense_lse)
    mask = SelectionMask(keep["block_idx"], pat.block, pat.window, k.shape[1])
    st = attention_mass_stats(q, k, block=block, scale=scale, causal=True, layout=mask, rows=rows)
    return st, lse, keep


# --------------------------------------------------------------------------- the context manager
@contextmanager
def capture(model, *, layers: Optional[Iterable[int]] = None, rows: Sequence[int] = (), block: int = 64,
            compare: Sequence[Pattern] = (), budget_bytes: int = DEFAULT_BUDGET, tokenizer=None):
    """Record what attention does in the first forward pass of ``model`` inside the ``with`` block.

    ``layers``: layer indices to record (default all). ``rows``: query indices (negative from the end)
    whose full probability rows are kept. ``block``: block size b of the block-level maps.
    ``compare``: extra patterns whose recall of dense mass is measured on every recorded layer's own
    q and k (static ones through their layout; NSA through the blocks it would select there, which are
    kept in ``LayerRecord.compare_nsa``). ``budget_bytes``:
    the most the recording may hold; a request over it raises :class:`CaptureBudgetError` before any
    statistic is computed. ``tokenizer``: to store token strings beside the ids.

    Works whether or not a pattern is applied: layers left to the model's own attention are routed
    through the nsa_viz function only for the duration (their outputs are the model's own), and are
    recorded as ``pattern="model"``. Only the first forward pass is recorded (``generate`` records its
    prefill); later calls are counted in ``Recording.ignored_calls``.
    """
    from .attention import ATTN_NAME, RECORDER_ATTR
    from .kernels.layout import check_block_size
    from .models import apply_pattern, attention_modules

    check_block_size("block", block)
    if not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be a positive integer, got {budget_bytes!r}")
    compare = list(compare)
    for cp in compare:
        if not isinstance(cp, Pattern) or getattr(cp, "causal", True) is False:
            raise ValueError(f"compare must hold causal nsa_viz patterns (static ones or NSA), got {cp!r}")
        if isinstance(cp, NSA) and cp.combine == "gated":
            raise ValueError(f"compare: NSA(combine='gated') needs the model's gates; compare NSA(combine='union'), got {cp!r}")
    labels = [cp.label for cp in compare]
    if len(set(labels)) != len(labels):
        raise ValueError(f"compare holds the same pattern twice: {labels}")
    mods = attention_modules(model)
    n = len(mods)
    chosen = None
    if layers is not None:
        chosen = set()
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ValueError(f"layers must be integers in [-{n}, {n - 1}], got {i!r}")
            chosen.add(i % n)
    for r in rows:
        if isinstance(r, bool) or not isinstance(r, int):
            raise ValueError(f"rows must be integer query indices, got {r!r}")
    if any(getattr(m, RECORDER_ATTR, None) is not None for m in mods.values()):
        raise RuntimeError("a capture is already active on this model; nest nothing, finish it first")

    cfg = model.config
    rec = Recording(meta={"model_type": cfg.model_type, "num_layers": n, "num_q_heads": cfg.num_attention_heads,
                          "num_kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
                          "block": block, "rows": list(rows), "budget_bytes": budget_bytes,
                          "compare": [cp.label for cp in compare],
                          "compare_nsa_params": {cp.label: _nsa_params(cp) for cp in compare if isinstance(cp, NSA)},
                          "format": FORMAT_TAG, "version": FORMAT_VERSION})
    recorder = Recorder(rec, chosen, rows, block, compare, budget_bytes, n)
    _MODULES_OF[id(recorder)] = list(mods.values())
    handle = None
    if cfg._attn_implementation != ATTN_NAME:
        handle = apply_pattern(model, {})  # route every layer through nsa_viz, each still running the model's own

    def pre_hook(_mod, args, kwargs):
        recorder.calls_seen += 1
        if recorder.calls_seen > 1:
            rec.ignored_calls += 1
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            rec.tokens = ids.detach().cpu().clone()
            if tokenizer is not None:
                rec.token_strings = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in rec.tokens]
        return None

    hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    for m in mods.values():
        setattr(m, RECORDER_ATTR, recorder)
    try:
        yield rec
    finally:
        hook.remove()
        for m in mods.values():
            if hasattr(m, RECORDER_ATTR):
                delattr(m, RECORDER_ATTR)
        _MODULES_OF.pop(id(recorder), None)
        if handle is not None:
            handle.restore()


# --------------------------------------------------------------------------- derived measures
def recall_table(rec: Recording):
    """Tidy table: one row per (layer, query head) with the mean recall of dense mass by the layer's
    pattern (``recall``) and by each ``compare`` pattern (``recall[<label>]`` columns)."""
    import pandas as pd

    out = []
    for i, lr in sorted(rec.layers.items()):
        g = lr.num_q_heads // lr.num_kv_heads
        base = lr.recall.mean(dim=(0, 2))
        comp = {f"recall[{k}]": v.mean(dim=(0, 2)) for k, v in lr.compare_recall.items()}
        for h in range(lr.num_q_heads):
            row = {"layer": i, "head": h, "kv_group": h // g, "pattern": lr.pattern, "recall": float(base[h])}
            row.update({k: float(v[h]) for k, v in comp.items()})
            out.append(row)
    return pd.DataFrame(out)


def _nsa_sources(lr: LayerRecord, compare_params: dict):
    """(source, kv-group offset, tensors, params) for the layer's own NSA selections and each NSA compare."""
    out = []
    if lr.nsa:
        params = lr.nsa_params or {}
        prefixes = sorted({k.split(".", 1)[0] for k in lr.nsa if k.startswith("g") and "." in k})
        for pre in prefixes or [""]:
            dot = f"{pre}." if pre else ""
            keep = {k[len(dot):]: t for k, t in lr.nsa.items() if k.startswith(dot) and (pre or "." not in k)}
            if "block_idx" in keep:
                out.append(("pattern", int(pre[1:]) if pre else 0, keep, params.get(pre, params) if pre else params))
    for label, keep in (lr.compare_nsa or {}).items():
        out.append((label, 0, keep, compare_params.get(label, {})))
    return out


def selection_stats(rec: Recording):
    """NSA selection diversity and collapse: one tidy row per (layer, source, kv group).

    ``source`` is ``"pattern"`` for a layer that ran NSA, or the label of an NSA pattern given to
    ``capture(compare=...)`` (what it would have selected on that layer). Columns:

    - ``rows_with_choice``: query rows that see more blocks than the forced ones (the others are skipped
      by the two collapse measures, which would count them trivially);
    - ``forced_only``: fraction of those rows whose picks are all forced blocks (the first
      ``init_blocks`` and the ``local_blocks`` ending at the query; with ``select_outside_window`` only the
      first ``init_blocks`` that start before the window): scoring added nothing;
    - ``window_only``: fraction of rows past the window (position >= ``window``) with a choice whose
      non-forced picks all lie inside the sliding window: selection duplicated the window (under ``union``);
    - ``picks_in_window``: fraction of all non-forced picks that lie wholly inside the window (budget
      that adds no key under ``union``);
    - ``pick_entropy``: entropy in bits of how often each key block is picked among non-forced picks;
      ``pick_entropy_norm`` that over log2(number of key blocks) (1 = spread evenly, 0 = one block always);
    - ``distinct_blocks``: key blocks picked (non-forced) at least once;
    - ``mean_pick_distance``: mean distance in blocks from the query's block to its non-forced picks;
    - ``mean_block_count``: selected blocks per query; ``recall``: mean dense mass on selected ∪ window
      (for a compare source: of that pattern); ``recall_selected``: the same on the selected blocks alone.
    """
    import pandas as pd

    out = []
    for i, lr in sorted(rec.layers.items()):
        g = lr.num_q_heads // lr.num_kv_heads
        for source, grp0, keep, params in _nsa_sources(lr, rec.meta.get("compare_nsa_params") or {}):
            sel = keep["block_idx"]
            for grp in range(sel.shape[1]):
                kv_group = grp0 + grp
                heads = slice(kv_group * g, (kv_group + 1) * g)
                if source == "pattern":
                    rec_all = lr.recall[:, heads]
                else:
                    rec_all = lr.compare_recall.get(source, torch.full((1,), float("nan")))[:, heads]
                row = {"layer": i, "source": source, "kv_group": kv_group, **_pick_stats(sel[:, grp], lr, params),
                       "recall": float(rec_all.mean())}
                rs = keep.get("recall_selected")
                row["recall_selected"] = float(rs[:, grp * g:(grp + 1) * g].mean()) if rs is not None else float("nan")
                out.append(row)
    cols = ["layer", "source", "kv_group", "rows_with_choice", "forced_only", "window_only", "picks_in_window",
            "pick_entropy",
            "pick_entropy_norm", "distinct_blocks", "mean_pick_distance", "mean_block_count", "recall",
            "recall_selected"]
    return pd.DataFrame(out, columns=cols)


def _pick_stats(sel: torch.Tensor, lr: LayerRecord, params: dict) -> dict:
    """``sel [B, Tq, n]`` (int, -1 = unused slot): one group's selected blocks per query token."""
    blk = int(params.get("block", 64))
    init_b, local_b = int(params.get("init_blocks", 1)), int(params.get("local_blocks", 2))
    window = int(params.get("window", 0))
    sel = sel.long()
    q_pos = torch.arange(sel.shape[1]) + lr.q_offset
    cur = (q_pos // blk)[None, :, None]
    valid = sel >= 0
    if params.get("select_outside_window"):  # candidates start before the window; only initial blocks are forced
        # a query block's shared selection counts from its first position (its window is the earliest)
        first = q_pos // blk * blk if params.get("granularity") == "block" else q_pos
        candidates = torch.clamp(torch.div(first - window, blk, rounding_mode="floor") + 1, min=0)
        forced = sel < init_b
        n_forced = torch.clamp(candidates, max=init_b)
    else:
        candidates = cur[0, :, 0] + 1
        forced = (sel < init_b) | (((cur - sel) < local_b) & (sel <= cur))
        n_forced = torch.clamp(torch.clamp(candidates - local_b, min=0), max=init_b) + torch.clamp(candidates, max=local_b)
    free = valid & ~forced
    choice = (candidates > n_forced)[None].expand(sel.shape[0], -1)  # more candidate blocks than forced ones
    has_free = free.any(-1)
    forced_only = float((~has_free)[choice].float().mean()) if choice.any() else float("nan")
    inside = free & (q_pos[None, :, None] - sel * blk < window)  # the whole block is in the window
    past = (q_pos >= window)[None].expand(sel.shape[0], -1) & choice if window > 0 else torch.zeros_like(choice)
    win_only = (~(free & ~inside).any(-1))[past]
    nkb = math.ceil(lr.kv_len / blk)
    counts = torch.bincount(sel[free].flatten(), minlength=nkb).float()
    p = counts / counts.sum().clamp(min=1)
    ent = float(-(p[p > 0] * p[p > 0].log2()).sum())
    dist = (cur - sel).float()
    return {"rows_with_choice": int(choice.sum()), "forced_only": forced_only,
            "window_only": float(win_only.float().mean()) if win_only.numel() else float("nan"),
            "picks_in_window": float(inside.sum() / free.sum()) if free.any() and window > 0 else float("nan"),
            "pick_entropy": ent, "pick_entropy_norm": ent / math.log2(nkb) if nkb > 1 else 0.0,
            "distinct_blocks": int((counts > 0).sum()),
            "mean_pick_distance": float(dist[free].mean()) if free.any() else float("nan"),
            "mean_block_count": float(valid.sum(-1).float().mean())}


__all__ = ["capture", "Recording", "LayerRecord", "CaptureBudgetError", "estimate_bytes", "estimate_layer_bytes",
           "recall_table", "selection_stats", "SelectionMask", "masked_lse", "FORMAT_TAG", "FORMAT_VERSION"]
