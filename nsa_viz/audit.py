"""Locality audit of a dataset: where a model's dense attention goes, and which sparse pattern keeps it.

``result = audit(model, tokenizer, "code", length=2048, n_docs=32)`` runs the model densely over the
documents under :func:`nsa_viz.capture` and keeps, per document, small reductions of what capture
recorded:

- the exact distance mass (dense probability summed per distance ``q - k``), from which the mass within
  any distance and the recall of any :class:`SlidingWindow` follow exactly;
- the block mass map (``block × block`` tiles), from which the mass by block and the recall of the best
  possible choice of ``k`` key blocks per query block (an upper bound for block selection) follow exactly;
- the full probability rows of ``rows`` query positions spread evenly over the sequence, from which the
  recall of any static pattern at those queries, the mass on the first tokens (sinks) and far mass follow;
- for patterns given in ``compare`` (NSA), capture's exact per-query recall and the selected blocks.

Recall of dense mass is ``sum of the dense probabilities on the keys a pattern lets a query see``. Its
``mean`` is over queries, heads, layers and documents: exact for windows (distance mass), and for a
window plus extra keys (GlobalLocal, Dilated) the exact window part plus the extra keys' mass measured
at the sampled rows; ``p10`` (worst decile) is the 10th percentile over the sampled query rows of every
document (and head, and layer at model level). ``density`` is the visited fraction of the causal area
(``BlockLayout.density``; for NSA counted from the selected blocks).

Heads are classified (``sink``, ``local``, ``strided``, ``retrieval``, ``mixed``) from these figures and
:func:`recommend` turns the table into a pattern (or a ``{layer: Pattern}`` mapping) that
:func:`nsa_viz.apply_pattern` accepts, for a target recall or density.

Results are cached on disk per document, keyed by the model (config and weights checksum), the token ids
of the sample, the length and every audit setting; an interrupted audit keeps the documents it finished.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .capture import DEFAULT_BUDGET, capture, estimate_bytes
from .data import Dataset, TokenizedSet, load_dataset, SYNTHETIC
from .patterns import NSA, Dense, Dilated, GlobalLocal, Pattern, SlidingWindow

AUDIT_FORMAT = 1
SINK_TOKENS = 4
LOCAL_DISTANCE = 64
FAR_DISTANCE = 512
# classification thresholds on the late query rows (second half of the sequence), see classify_head
THRESHOLDS = {"retrieval_far": 0.3, "sink": 0.5, "local": 0.5, "periodic_acf": 0.5, "periodic_amp": 0.3}
CLASSES = ("retrieval", "strided", "sink", "local", "mixed")
DISTANCE_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def default_cache_dir() -> str:
    return os.environ.get("NSA_VIZ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nsa_viz", "audit")


# --------------------------------------------------------------------------- candidates
def default_windows(length: int, block: int = 64) -> List[int]:
    """Window sizes tried by default: 1, 1.5, 2, 3, 4, 6, 8... blocks, below ``length``."""
    out, w = set(), block
    while w < length:
        out.add(w)
        if w + w // 2 < length:
            out.add(w + w // 2)
        w *= 2
    return sorted(out)


def default_candidates(length: int, block: int = 64, sink: int = SINK_TOKENS) -> List[Pattern]:
    """Static patterns measured by default: SlidingWindow(w), GlobalLocal(w, sink) and Dilated(stride 4
    and 8 of ``block``-token blocks, window w) for every default window."""
    out: List[Pattern] = []
    for w in default_windows(length, block):
        out += [SlidingWindow(w), GlobalLocal(window=w, sink=sink)]
        out += [Dilated(stride=s, block=block, window=w) for s in (4, 8) if block * s < length]
    return out


def short_label(p: Pattern) -> str:
    """A compact name for tables and plots: SW(512), GL(512+4), Dil(256,4x64), NSA(16x64+512)."""
    if isinstance(p, SlidingWindow):
        return f"SW({p.window})"
    if isinstance(p, GlobalLocal):
        extra = f",g{len(p.global_tokens)}" if p.global_tokens else ""
        return f"GL({p.window}+{p.sink}{extra})"
    if isinstance(p, Dilated):
        return f"Dil({p.window},{p.stride}x{p.block})"
    if isinstance(p, NSA):
        tail = "" if (p.combine, p.granularity) == ("union", "token") else f",{p.combine},{p.granularity}"
        if p.select_outside_window:
            tail += ",outside"
        return f"NSA({p.top_n}x{p.block}+{p.window}{tail})"
    if isinstance(p, Dense):
        return "Dense"
    return p.label


def _group(p: Pattern) -> str:
    """Family plus the parameters other than the window (the curves of recall against density)."""
    if isinstance(p, GlobalLocal):
        return f"GlobalLocal sink {p.sink}"
    if isinstance(p, Dilated):
        return f"Dilated {p.stride}x{p.block}"
    return family(p)


def family(p: Pattern) -> str:
    return {SlidingWindow: "SlidingWindow", GlobalLocal: "GlobalLocal", Dilated: "Dilated", NSA: "NSA",
            Dense: "Dense"}.get(type(p), type(p).__name__)


_PARSABLE = {"Dense": Dense, "SlidingWindow": SlidingWindow, "GlobalLocal": GlobalLocal, "Dilated": Dilated,
             "NSA": NSA, "SW": SlidingWindow, "GL": GlobalLocal}


def parse_pattern(text: str) -> Pattern:
    """A pattern from text as written in Python, e.g. ``"NSA(top_n=16, block=64, window=512)"`` or
    ``"SlidingWindow(512)"`` (literal arguments only; nothing is evaluated)."""
    if not isinstance(text, str):
        raise TypeError(f"pattern text must be a string, got {type(text).__name__}")
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        node = None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _PARSABLE):
        raise ValueError(f"cannot read pattern {text!r}: write one of {sorted(_PARSABLE)} with literal arguments, "
                         f"e.g. 'NSA(top_n=16, block=64, window=512)'")
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
        raise ValueError(f"pattern {text!r}: arguments must be literals (numbers, strings, tuples)") from None
    try:
        return _PARSABLE[node.func.id](*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"pattern {text!r}: {exc}") from None


def row_positions(length: int, rows: int) -> torch.Tensor:
    """``rows`` query positions spread evenly over ``[0, length)`` (all of them when ``rows >= length``)."""
    if rows >= length:
        return torch.arange(length)
    return torch.unique(((torch.arange(rows, dtype=torch.float64) + 0.5) * length / rows).floor().long())


def causal_area(length: int) -> float:
    return length * (length + 1) / 2


# --------------------------------------------------------------------------- NSA density
def nsa_visible_counts(block_idx: torch.Tensor, block: int, window: int, kv_len: int) -> torch.Tensor:
    """Keys each query sees under an NSA selection: ``block_idx [..., Tq, n]`` (-1 unused, no duplicates)
    -> ``[..., Tq]`` = |keys of selected blocks up to the query ∪ the ``window`` most recent keys|."""
    idx = block_idx.long()
    tq = idx.shape[-2]
    p = (torch.arange(tq) + kv_len - tq).view(*([1] * (idx.dim() - 2)), tq, 1)
    valid = idx >= 0
    s0 = idx * block
    s1 = torch.minimum(s0 + block - 1, p)
    sel = ((s1 - s0 + 1).clamp(min=0) * valid).sum(-1)
    if window <= 0:
        return sel
    w0 = (p - window + 1).clamp(min=0)
    overlap = ((s1 - torch.maximum(s0, w0) + 1).clamp(min=0) * valid).sum(-1)
    return sel + torch.minimum(torch.full_like(p, window), p + 1).squeeze(-1) - overlap


# --------------------------------------------------------------------------- per-document statistics
@dataclass
class DocStats:
    """Reductions of one document's capture (float32 CPU tensors; L layers, H query heads, R rows).

    ``distance_mass [L, H, T]``; ``block_mass [L, H, NQB, NKB]``; ``row_pos [R]``; ``row_values [L, H, R, M]``
    with column ``m`` = dense mass at the row on the keys of mask ``mask_names[m]`` (candidate patterns,
    windows, sinks, local and far keys); ``cmp_mean {label: [L, H]}`` exact mean recall of a ``compare``
    pattern over every query, ``cmp_rows {label: [L, H, R]}`` its recall at the rows,
    ``cmp_visible {label: [L, H]}`` keys it let the queries see (summed over queries).
    """

    digest: str
    source: str
    distance_mass: torch.Tensor
    block_mass: torch.Tensor
    row_pos: torch.Tensor
    row_values: torch.Tensor
    mask_names: List[str]
    cmp_mean: Dict[str, torch.Tensor] = field(default_factory=dict)
    cmp_rows: Dict[str, torch.Tensor] = field(default_factory=dict)
    cmp_visible: Dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        torch.save({"format": AUDIT_FORMAT, **self.__dict__}, tmp)
        os.replace(tmp, path)  # a run killed mid-write leaves no half file under the real name

    @classmethod
    def load(cls, path: str) -> "DocStats":
        d = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or d.pop("format", None) != AUDIT_FORMAT:
            raise ValueError(f"{path}: not an audit cache entry of format {AUDIT_FORMAT}")
        return cls(**d)


def mask_bank(length: int, row_pos: torch.Tensor, candidates: Sequence[Pattern], windows: Sequence[int],
              sink: int, local: int, far: int) -> Tuple[List[str], torch.Tensor]:
    """(names, masks [M, R, T] bool) of the key sets measured at each sampled row."""
    q = row_pos[:, None]
    k = torch.arange(length)[None, :]
    d = q - k
    names, masks = [], []
    for p in candidates:
        names.append(f"cand:{p.label}")
        masks.append(p.mask_mod(q, k).expand(len(row_pos), length))
    for w in windows:
        names.append(f"win:{w}")
        masks.append((d >= 0) & (d < w))
    names += ["sink", "local", "far"]
    masks += [(d >= 0) & (k < sink), (d >= 0) & (d < local), (d >= far) & (k >= sink)]
    return names, torch.stack([m.expand(len(row_pos), length) for m in masks])


def reduce_recording(rec, digest: str, source: str, row_pos: torch.Tensor, names: List[str], masks: torch.Tensor,
                     compare: Sequence[Pattern]) -> DocStats:
    """Per-document :class:`DocStats` from a one-sequence :class:`nsa_viz.capture.Recording`."""
    layers = [rec.layers[i] for i in sorted(rec.layers)]
    dist = torch.stack([lr.dense_distance_mass[0] for lr in layers])
    blocks = torch.stack([lr.dense_block_mass[0] for lr in layers])
    rows = torch.stack([lr.dense_rows[0] for lr in layers])  # [L, H, R, T]
    nl, nh, r, t = rows.shape
    # one batched product over rows: [R, L*H, T] @ [R, T, M]
    vals = torch.bmm(rows.permute(2, 0, 1, 3).reshape(r, nl * nh, t), masks.permute(1, 2, 0).float())
    row_values = vals.reshape(r, nl, nh, -1).permute(1, 2, 0, 3).contiguous()
    cmp_mean, cmp_rows, cmp_visible = {}, {}, {}
    for p in compare:
        rec_all = torch.stack([lr.compare_recall[p.label][0] for lr in layers])  # [L, H, T]
        cmp_mean[p.label] = rec_all.mean(-1)
        cmp_rows[p.label] = rec_all[:, :, row_pos]
        if isinstance(p, NSA):
            g = nh // layers[0].num_kv_heads
            vis = torch.stack([nsa_visible_counts(lr.compare_nsa[p.label]["block_idx"][0], p.block, p.window,
                                                  lr.kv_len).sum(-1).float() for lr in layers])  # [L, HKV]
            cmp_visible[p.label] = vis.repeat_interleave(g, dim=1)
        else:
            cmp_visible[p.label] = torch.full((nl, nh), p.compile(t).visible_pairs)
    return DocStats(digest, source, dist, blocks, row_pos.clone(), row_values, list(names), cmp_mean, cmp_rows,
                    cmp_visible)


# --------------------------------------------------------------------------- periodicity and classes
def periodicity(profile: torch.Tensor, max_period: int = 64, smooth: int = 33) -> Tuple[int, float, float]:
    """(period, autocorrelation at that lag, amplitude) of the ups and downs of a mass-by-distance profile.

    The log profile is divided by its moving average (width ``smooth``) so that the smooth decay with
    distance does not count; the best lag in ``[2, max_period]`` of the autocorrelation of what is left
    is the period. Amplitude is the standard deviation of that log ratio (0.5 ~ peaks 1.6x their surroundings).
    """
    x = torch.log(profile.double().clamp(min=1e-12))
    n = x.numel()
    if n < 4 * 2 + smooth:
        return 0, 0.0, 0.0
    kernel = torch.ones(1, 1, smooth, dtype=torch.float64) / smooth
    trend = torch.nn.functional.conv1d(x.view(1, 1, -1), kernel).view(-1)
    half = smooth // 2
    resid = x[half: half + trend.numel()] - trend
    resid = resid - resid.mean()
    amp = float(resid.std())
    var = float((resid * resid).sum())
    if var <= 0 or resid.numel() < 8:
        return 0, 0.0, amp
    top = min(max_period, resid.numel() // 4) + 1
    acf = [1.0] + [float((resid[:-lag] * resid[lag:]).sum()) / var for lag in range(1, top + 1)]
    # a period is a local maximum of the autocorrelation (a smooth leftover only decays with the lag)
    best, best_lag = 0.0, 0
    for lag in range(2, top):
        if acf[lag] > acf[lag - 1] and acf[lag] >= acf[lag + 1] and acf[lag] > best:
            best, best_lag = acf[lag], lag
    return best_lag, best, amp


def classify_head(sink: float, local: float, far: float, periodic_acf: float, periodic_amp: float,
                  thresholds: Mapping[str, float] = THRESHOLDS) -> str:
    """``retrieval`` (far mass, the heads a window loses), ``strided`` (periodic distance profile), ``sink``
    (mass on the first tokens), ``local`` (mass next to the query), else ``mixed``; checked in that order."""
    if far >= thresholds["retrieval_far"]:
        return "retrieval"
    if periodic_acf >= thresholds["periodic_acf"] and periodic_amp >= thresholds["periodic_amp"]:
        return "strided"
    if sink >= thresholds["sink"]:
        return "sink"
    if local >= thresholds["local"]:
        return "local"
    return "mixed"


# --------------------------------------------------------------------------- the result
class AuditResult:
    """Everything an audit measured, with tidy tables (pandas) and the recommendation.

    ``meta``: model, dataset, length, settings, timing, short documents, ``interrupted``.
    ``candidates``: static patterns measured at the rows; ``compare``: patterns measured by capture.
    """

    def __init__(self, docs: List[DocStats], meta: dict, candidates: Sequence[Pattern], compare: Sequence[Pattern],
                 windows: Sequence[int]):
        if not docs:
            raise ValueError("an audit result needs at least one finished document")
        self.docs = docs
        self.meta = meta
        self.candidates = list(candidates)
        self.compare = list(compare)
        self.windows = list(windows)
        self.length = int(docs[0].distance_mass.shape[-1])
        self.block = int(meta.get("block", 64))
        d0 = docs[0]
        self.num_layers, self.num_heads = d0.distance_mass.shape[:2]
        self._col = {n: i for i, n in enumerate(d0.mask_names)}
        self.row_pos = d0.row_pos
        self._dist = torch.stack([d.distance_mass for d in docs])  # [N, L, H, T]
        self._rows = torch.stack([d.row_values for d in docs])  # [N, L, H, R, M]
        self._cache: dict = {}

    # ---------------------------------------------------------------- basic figures
    @property
    def n_docs(self) -> int:
        return len(self.docs)

    def mass_within(self, distance: int) -> torch.Tensor:
        """``[N, L, H]``: fraction of dense mass at distance < ``distance`` (exact, every query)."""
        return self._dist[..., :max(0, min(distance, self.length))].sum(-1) / self.length

    def _late(self) -> torch.Tensor:
        return self.row_pos >= self.length // 2

    def row_metric(self, name: str, late: bool = True) -> torch.Tensor:
        """``[N, L, H]``: mean over (late) sampled rows of the mass on mask ``name`` (sink, local, far)."""
        v = self._rows[..., self._col[name]]
        if late and self._late().any():
            v = v[..., self._late()]
        return v.mean(-1)

    def first_block_mass(self) -> torch.Tensor:
        """``[N, L, H]``: mass on the first key block from query blocks beyond the second, per query."""
        bm = torch.stack([d.block_mass for d in self.docs])
        nqb = bm.shape[-2]
        if nqb <= 2:
            return bm[..., :, 0].sum(-1) / self.length
        queries = min(self.length, nqb * self.block) - 2 * self.block
        return bm[..., 2:, 0].sum(-1) / max(queries, 1)

    def block_profile(self) -> torch.Tensor:
        """``[L, H, NQB, NKB]``: mean over documents of the block mass divided by the queries of each
        query block (each row sums to 1)."""
        bm = torch.stack([d.block_mass for d in self.docs]).mean(0)
        nqb = bm.shape[-2]
        per_block = torch.clamp(self.length - torch.arange(nqb) * self.block, max=self.block).float()
        return bm / per_block[:, None]

    # ---------------------------------------------------------------- recall
    def _pattern_figures(self, p: Pattern):
        """(mean [N, L, H], rows [N, L, H, R], visible pairs [L]) of one measured pattern."""
        key = p.label
        if key in self._cache:
            return self._cache[key]
        if isinstance(p, Dense):
            ones = torch.ones(self._rows.shape[:4])
            out = (ones.mean(-1), ones, torch.full((self.num_layers,), causal_area(self.length)))
        elif p.label in self.docs[0].cmp_mean:
            mean = torch.stack([d.cmp_mean[key] for d in self.docs])
            rows = torch.stack([d.cmp_rows[key] for d in self.docs])
            vis = torch.stack([d.cmp_visible[key] for d in self.docs]).mean((0, 2))
            out = (mean, rows, vis)
        elif f"cand:{key}" in self._col:
            rows = self._rows[..., self._col[f"cand:{key}"]]
            w = getattr(p, "window", 0)
            if w and f"win:{w}" in self._col and getattr(p, "causal", True):
                # control variate: the window part exactly (distance mass), the extra keys at the rows
                extra = rows - self._rows[..., self._col[f"win:{w}"]]
                mean = self.mass_within(w) + extra.mean(-1)
            else:
                mean = rows.mean(-1)
            out = (mean, rows, torch.full((self.num_layers,), p.compile(self.length).visible_pairs))
        else:
            raise KeyError(f"{short_label(p)} was not measured by this audit (measured: "
                           f"{[short_label(c) for c in self.measured_patterns()]})")
        self._cache[key] = out
        return out

    def measured_patterns(self) -> List[Pattern]:
        return [Dense()] + self.candidates + self.compare

    def density(self, p: Pattern, per_layer: bool = False):
        vis = self._pattern_figures(p)[2]
        d = vis / causal_area(self.length)
        return d if per_layer else float(d.mean())

    def recall(self, p: Pattern, level: str = "model") -> dict:
        """Recall of dense mass by ``p``: ``{"mean", "p10"}`` as floats (model), ``[L]`` (layer) or ``[L, H]`` (head)."""
        key = ("recall", p.label, level)
        if key not in self._cache:  # reports ask for the same figures many times; quantiles are not free
            self._cache[key] = self._recall(p, level)
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self._cache[key].items()}

    def _recall(self, p: Pattern, level: str) -> dict:
        mean, rows, _ = self._pattern_figures(p)
        if level == "model":
            return {"mean": float(mean.mean()), "p10": float(_quantile(rows.flatten(), 0.1))}
        if level == "layer":
            per = rows.permute(1, 0, 2, 3).reshape(self.num_layers, -1)
            return {"mean": mean.mean((0, 2)), "p10": _quantile(per, 0.1, dim=1)}
        if level == "head":
            per = rows.permute(1, 2, 0, 3).reshape(self.num_layers, self.num_heads, -1)
            return {"mean": mean.mean(0), "p10": _quantile(per, 0.1, dim=2)}
        raise ValueError(f"level must be 'model', 'layer' or 'head', got {level!r}")

    def _source(self, p: Pattern) -> str:
        if isinstance(p, Dense):
            return "exact"
        if p.label in self.docs[0].cmp_mean:
            return "capture (all queries)"
        if isinstance(p, SlidingWindow):
            return "exact"
        return "window exact + rows" if getattr(p, "window", 0) else "rows"

    def summary(self):
        """One row per measured pattern: density, recall mean and p10, worst layer."""
        import pandas as pd

        if "summary" in self._cache:
            return self._cache["summary"].copy()
        out = []
        for p in self.measured_patterns():
            r = self.recall(p)
            lay = self.recall(p, "layer")["mean"]
            out.append({"pattern": short_label(p), "family": family(p), "group": _group(p),
                        "window": getattr(p, "window", None),
                        "density": self.density(p), "recall_mean": r["mean"], "recall_p10": r["p10"],
                        "worst_layer": int(lay.argmin()), "worst_layer_recall": float(lay.min()),
                        "source": self._source(p), "label": p.label})
        self._cache["summary"] = pd.DataFrame(out).sort_values(["family", "density"]).reset_index(drop=True)
        return self._cache["summary"].copy()

    def recall_table(self, level: str = "head"):
        """Tidy recall per (pattern, layer[, head]): density, recall_mean, recall_p10."""
        import pandas as pd

        out = []
        for p in self.measured_patterns():
            r = self.recall(p, level)
            dens = self.density(p, per_layer=True)
            for layer in range(self.num_layers):
                heads = range(self.num_heads) if level == "head" else [None]
                for h in heads:
                    m = r["mean"][layer] if h is None else r["mean"][layer, h]
                    q = r["p10"][layer] if h is None else r["p10"][layer, h]
                    row = {"pattern": short_label(p), "family": family(p), "layer": layer}
                    if h is not None:
                        row["head"] = h
                    row.update(density=float(dens[layer]), recall_mean=float(m), recall_p10=float(q))
                    out.append(row)
        return pd.DataFrame(out)

    def oracle_table(self, ks: Sequence[int] = (1, 2, 4, 8, 16)):
        """Best possible block selection: the ``k`` key blocks with the most dense mass per query block
        (chosen knowing the answer), its recall and density — an upper bound for NSA-like selection of
        ``block``-token blocks without a window."""
        import pandas as pd

        bm = torch.stack([d.block_mass for d in self.docs])  # [N, L, H, NQB, NKB]
        nqb, nkb = bm.shape[-2:]
        b = self.block
        rows_in = torch.clamp(self.length - torch.arange(nqb) * b, max=b)
        cols_in = torch.clamp(self.length - torch.arange(nkb) * b, max=b)
        pairs = (rows_in[:, None] * cols_in[None, :]).double()
        diag = (rows_in * (rows_in + 1) / 2).double()
        pairs = torch.where(torch.eye(nqb, nkb, dtype=torch.bool), diag[:, None].expand(nqb, nkb), pairs)
        pairs = torch.tril(pairs)  # tiles above the diagonal see nothing
        out = []
        for k in ks:
            kk = min(k, nkb)
            top, idx = bm.topk(kk, dim=-1)
            rec = top.sum(-1).sum(-1) / self.length  # [N, L, H]
            vis = torch.gather(pairs.expand(*bm.shape), -1, idx).sum((-1, -2))
            out.append({"pattern": f"oracle top-{k} blocks of {b}", "k": k, "density": float(vis.mean()) /
                        causal_area(self.length), "recall_mean": float(rec.mean()),
                        "recall_min_head": float(rec.mean(0).min())})
        return pd.DataFrame(out)

    def heads(self):
        """One row per (layer, head): sink/local/far mass, mass within distances, periodicity, class."""
        import pandas as pd

        sink, local, far = (self.row_metric(n).mean(0) for n in ("sink", "local", "far"))
        fb = self.first_block_mass().mean(0)
        grid = [d for d in (16, 32, 64, 128, 256, 512, 1024) if d < self.length]
        within = {d: self.mass_within(d).mean(0) for d in grid}
        prof = self.probability_by_distance()
        g = self.num_heads // int(self.meta.get("num_kv_heads", self.num_heads) or self.num_heads)
        out = []
        for layer in range(self.num_layers):
            for h in range(self.num_heads):
                top = min(self.length // 2, 512)
                period, acf, amp = periodicity(prof[layer, h, 1:top])
                row = {"layer": layer, "head": h, "kv_group": h // max(g, 1), "sink_mass": float(sink[layer, h]),
                       "first_block_mass": float(fb[layer, h]), "local_mass": float(local[layer, h]),
                       "far_mass": float(far[layer, h])}
                row.update({f"within_{d}": float(within[d][layer, h]) for d in grid})
                row.update(period=period, periodic_acf=acf, periodic_amp=amp,
                           head_class=classify_head(row["sink_mass"], row["local_mass"], row["far_mass"], acf, amp))
                out.append(row)
        return pd.DataFrame(out)

    def probability_by_distance(self) -> torch.Tensor:
        """``[L, H, T]``: mean dense probability a query puts on the key at distance d (over documents)."""
        count = (self.length - torch.arange(self.length)).float()
        return self._dist.mean(0) / count

    def distance_table(self, grid: Sequence[int] = DISTANCE_GRID, level: str = "model"):
        """Mass within each distance of ``grid``: mean and p10/p50/p90 across documents; per model
        (averaged over layers and heads), layer or head."""
        import pandas as pd

        ds = [d for d in grid if d < self.length] + [self.length]
        cum = torch.stack([self.mass_within(d) for d in ds], -1)  # [N, L, H, G]
        if level == "model":
            groups = [({}, cum.mean((1, 2)))]
        elif level == "layer":
            groups = [({"layer": i}, cum[:, i].mean(1)) for i in range(self.num_layers)]
        elif level == "head":
            groups = [({"layer": i, "head": h}, cum[:, i, h]) for i in range(self.num_layers) for h in range(self.num_heads)]
        else:
            raise ValueError(f"level must be 'model', 'layer' or 'head', got {level!r}")
        out = []
        for keys, v in groups:  # v [N, G]
            q = _quantile(v.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=0)
            for j, d in enumerate(ds):
                out.append({**keys, "distance": d, "mean": float(v[:, j].mean()), "p10": float(q[0, j]),
                            "p50": float(q[1, j]), "p90": float(q[2, j])})
        return pd.DataFrame(out)

    def equal_density(self, density: float):
        """Each family's recall at ``density``, interpolated linearly between its measured windows (the
        window listed is the interpolated one); plus every measured pattern within 0.02 of it."""
        import pandas as pd

        summ = self.summary()
        out = []
        for grp_name, sub in summ[summ.family.isin(["SlidingWindow", "GlobalLocal", "Dilated"])].groupby("group"):
            sub = sub.sort_values("density")
            xs = sub.density.tolist()
            if not xs or density < xs[0] or density > xs[-1]:
                continue
            row = {"family": grp_name, "density": density, "interpolated": True}
            for col in ("window", "recall_mean", "recall_p10"):
                row[col] = _interp(density, xs, sub[col].astype(float).tolist())
            out.append(row)
        near = summ[(summ.density - density).abs() <= 0.02]
        for _, r in near.iterrows():
            out.append({"family": r.pattern, "density": r.density, "interpolated": False, "window": r.window,
                        "recall_mean": r.recall_mean, "recall_p10": r.recall_p10})
        return pd.DataFrame(out)

    # ---------------------------------------------------------------- recommendation and reports
    def recommend(self, **kwargs) -> "Recommendation":
        """See :func:`recommend`."""
        return recommend(self, **kwargs)

    def headline(self, window: int = 512, distances: Sequence[int] = (256, 512)) -> dict:
        """The figures a reader asks first, at model level (mean over documents, layers and heads):

        ``mass_within {d: {mean, p10, p90}}`` (percentiles across documents); ``sink_mass`` (dense mass on
        the first ``sink_tokens`` keys at the late sampled rows), ``first_block_mass``, ``far_mass``;
        ``patterns``: density and recall (mean, p10) of ``SlidingWindow(window)``, ``GlobalLocal(window)``
        and every ``compare`` pattern; ``equal_density``: for each ``compare`` pattern, the window and
        GlobalLocal families' recall interpolated at its density (the same cost)."""
        dist = self.distance_table(grid=tuple(distances))
        within = {int(r.distance): {"mean": float(r["mean"]), "p10": float(r.p10), "p90": float(r.p90)}
                  for _, r in dist.iterrows() if int(r.distance) in set(distances)}
        named = [p for p in self.candidates if getattr(p, "window", None) == window
                 and isinstance(p, (SlidingWindow, GlobalLocal))] + list(self.compare)
        pats = {}
        for p in named:
            r = self.recall(p)
            pats[short_label(p)] = {"density": self.density(p), "recall_mean": r["mean"], "recall_p10": r["p10"]}
        same = {}
        for p in self.compare:
            d = self.density(p)
            eq = self.equal_density(d)
            eq = eq[eq.interpolated.astype(bool)]
            same[short_label(p)] = {"density": d, **{r.family: {"window": float(r.window), "recall_mean": float(r.recall_mean),
                                                                "recall_p10": float(r.recall_p10)}
                                                     for _, r in eq.iterrows()}}
        return _plain({"mass_within": within, "sink_mass": float(self.row_metric("sink").mean()),
                       "sink_tokens": self.meta.get("sink_tokens"),
                       "first_block_mass": float(self.first_block_mass().mean()),
                       "far_mass": float(self.row_metric("far").mean()), "far_distance": self.meta.get("far_distance"),
                       "patterns": pats, "equal_density": same})

    def to_dict(self, recommendation: Optional["Recommendation"] = None, compact: bool = False) -> dict:
        """Plain data for JSON: meta, headline, summary, heads, model-level distances, oracle, recommendation.
        ``compact``: without the per-head table and the per-document lists (a few kB)."""
        if compact:
            drop = ("sources", "samples_report", "cache_dir")
            out = {"meta": {k: v for k, v in self.meta.items() if k not in drop},
                   "samples_report": str(self.meta.get("samples_report", "")), "headline": self.headline(),
                   "summary": self.summary().drop(columns=["label"]).to_dict("records"),
                   "distance": self.distance_table().to_dict("records"),
                   "oracle": self.oracle_table().to_dict("records"),
                   "head_classes": self.heads().head_class.value_counts().to_dict(),
                   "head_classes_by_layer": {int(i): g.value_counts().to_dict()
                                             for i, g in self.heads().groupby("layer").head_class}}
            if recommendation is not None:
                out["recommendation"] = recommendation.to_dict()
            return _plain(out)
        out = {"meta": self.meta, "headline": self.headline(), "summary": self.summary().to_dict("records"),
               "heads": self.heads().to_dict("records"),
               "distance": self.distance_table().to_dict("records"),
               "oracle": self.oracle_table().to_dict("records"),
               "head_classes": self.heads().head_class.value_counts().to_dict()}
        if recommendation is not None:
            out["recommendation"] = recommendation.to_dict()
        return _plain(out)

    def __repr__(self) -> str:
        m = self.meta
        return (f"AuditResult({m.get('dataset')!r}, {self.n_docs} documents x {self.length} tokens, "
                f"{self.num_layers} layers x {self.num_heads} heads{', interrupted' if m.get('interrupted') else ''})")


def _quantile(x: torch.Tensor, q, dim=None) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation) by selection instead of a sort: one or two ``kthvalue`` per
    quantile, O(n) rather than O(n log n), and no size limit (the audit takes hundreds of these per report)."""
    x = x.double()
    if dim is None:
        x = x.flatten()
        dim = 0
    qs = torch.as_tensor(q, dtype=torch.float64)
    n = x.shape[dim]
    vals = []
    for v in qs.flatten().tolist():
        pos = v * (n - 1)
        lo = min(int(math.floor(pos)), n - 1)
        val = torch.kthvalue(x, lo + 1, dim=dim).values
        frac = pos - lo
        if frac > 0 and lo + 1 < n:
            val = torch.lerp(val, torch.kthvalue(x, lo + 2, dim=dim).values, frac)
        vals.append(val)
    return vals[0] if qs.dim() == 0 else torch.stack(vals)


def _interp(x: float, xs: List[float], ys: List[float]) -> float:
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            if xs[i + 1] == xs[i]:
                return float(ys[i])
            t = (x - xs[i]) / (xs[i + 1] - xs[i])
            return float(ys[i] + t * (ys[i + 1] - ys[i]))
    return float(ys[-1])


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- recommendation
@dataclass
class Recommendation:
    """What :func:`recommend` chose. ``pattern`` is what to pass to ``apply_pattern``: ``uniform`` (one
    pattern for every layer) or ``per_layer`` (``{layer: Pattern}``) when layers differ enough."""

    pattern: Union[Pattern, Dict[int, Pattern]]
    uniform: Pattern
    per_layer: Dict[int, Pattern]
    uses_per_layer: bool
    target: dict
    met: bool
    recall_mean: float
    recall_p10: float
    density: float
    uniform_figures: dict
    per_layer_figures: dict
    alternatives: list

    def describe(self) -> str:
        t = ", ".join(f"{k}={v}" for k, v in self.target.items())
        what = (f"per layer: " + ", ".join(f"{i}:{short_label(p)}" for i, p in sorted(self.per_layer.items()))
                if self.uses_per_layer else short_label(self.uniform))
        msg = (f"{what} for {t}: keeps {self.recall_mean:.3f} of dense attention mass on average "
               f"(worst decile {self.recall_p10:.3f}) at density {self.density:.3f} "
               f"({1 / max(self.density, 1e-9):.1f}x fewer query-key pairs than dense)")
        if self.uses_per_layer:
            u = self.uniform_figures
            msg += (f"; one pattern for all layers ({short_label(self.uniform)}) would keep {u['recall_mean']:.3f} "
                    f"at density {u['density']:.3f}")
        if not self.met:
            msg += " — the target could not be met by any measured pattern"
        return msg

    def to_dict(self) -> dict:
        return _plain({"pattern": (short_label(self.pattern) if isinstance(self.pattern, Pattern)
                                   else {i: short_label(p) for i, p in self.pattern.items()}),
                       "pattern_repr": (repr(self.pattern) if isinstance(self.pattern, Pattern)
                                        else {i: repr(p) for i, p in self.pattern.items()}),
                       "uses_per_layer": self.uses_per_layer, "target": self.target, "met": self.met,
                       "recall_mean": self.recall_mean, "recall_p10": self.recall_p10, "density": self.density,
                       "uniform": {"pattern": short_label(self.uniform), **self.uniform_figures},
                       "per_layer": {"patterns": {i: short_label(p) for i, p in self.per_layer.items()},
                                     **self.per_layer_figures},
                       "alternatives": self.alternatives, "description": self.describe()})


def recommend(result: AuditResult, *, target_recall: Optional[float] = None, target_density: Optional[float] = None,
              metric: str = "mean", per_layer: Union[str, bool] = "auto", include_compare: bool = True,
              min_saving: float = 0.1) -> Recommendation:
    """The cheapest measured pattern keeping ``target_recall`` of dense mass, or the one keeping the most
    within ``target_density``.

    ``metric``: ``"mean"`` or ``"p10"`` (the worst decile of queries must reach the target). With a
    recall target every layer must reach it on its own (so the model does too); with a density target the
    per-layer choice maximises the mean recall under the mean density (Lagrangian search).
    ``per_layer``: ``True`` always returns ``{layer: Pattern}``, ``False`` one pattern, ``"auto"`` the
    mapping only when it saves ``min_saving`` of the density (recall target) or gains 0.01 recall
    (density target). NSA patterns from ``compare`` take part when ``include_compare``.
    """
    if (target_recall is None) == (target_density is None):
        raise ValueError("give exactly one of target_recall and target_density")
    target = target_recall if target_recall is not None else target_density
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(f"targets are fractions in (0, 1], got {target!r}")
    if metric not in ("mean", "p10"):
        raise ValueError(f"metric must be 'mean' or 'p10', got {metric!r}")
    if per_layer not in ("auto", True, False):
        raise ValueError(f"per_layer must be 'auto', True or False, got {per_layer!r}")
    pats = [Dense()] + result.candidates + (result.compare if include_compare else [])
    model_r = {p.label: result.recall(p) for p in pats}
    layer_r = {p.label: result.recall(p, "layer") for p in pats}
    dens = {p.label: result.density(p) for p in pats}
    layer_d = {p.label: result.density(p, per_layer=True) for p in pats}
    nl = result.num_layers
    eps = 1e-9

    # ---- one pattern for the model
    if target_recall is not None:
        ok = [p for p in pats if model_r[p.label][metric] >= target_recall - eps]
        uni = min(ok, key=lambda p: (dens[p.label], -model_r[p.label][metric]))
    else:
        ok = [p for p in pats if dens[p.label] <= target_density + eps]
        uni = (max(ok, key=lambda p: (model_r[p.label][metric], -dens[p.label])) if ok
               else min(pats, key=lambda p: dens[p.label]))
    uni_met = bool(ok)

    # ---- one pattern per layer
    if target_recall is not None:
        choice = {}
        for i in range(nl):
            fine = [p for p in pats if float(layer_r[p.label][metric][i]) >= target_recall - eps]
            choice[i] = min(fine, key=lambda p: (float(layer_d[p.label][i]), -float(layer_r[p.label][metric][i])))
    else:
        choice = _lagrangian(pats, layer_r, layer_d, metric, target_density, nl)
    pl_fig = _mapping_figures(result, choice)
    uni_fig = {"recall_mean": model_r[uni.label]["mean"], "recall_p10": model_r[uni.label]["p10"],
               "density": dens[uni.label]}
    distinct = len({p.label for p in choice.values()}) > 1
    if per_layer == "auto":
        if target_recall is not None:
            use = distinct and pl_fig["density"] <= (1 - min_saving) * uni_fig["density"]
        else:
            use = distinct and pl_fig["density"] <= target_density + eps and \
                pl_fig[f"recall_{metric}"] >= uni_fig[f"recall_{metric}"] + 0.01
    else:
        use = bool(per_layer)
    fig = pl_fig if use else uni_fig
    if target_recall is not None:
        met = fig[f"recall_{metric}"] >= target_recall - 1e-6 if use else uni_met
    else:
        met = fig["density"] <= target_density + eps
    alts = sorted(({"pattern": short_label(p), "density": dens[p.label], "recall_mean": model_r[p.label]["mean"],
                    "recall_p10": model_r[p.label]["p10"]} for p in pats), key=lambda r: r["density"])
    tgt = {"recall": target_recall} if target_recall is not None else {"density": target_density}
    tgt["metric"] = metric
    return Recommendation(pattern=dict(choice) if use else uni, uniform=uni, per_layer=dict(choice),
                          uses_per_layer=use, target=tgt, met=bool(met), recall_mean=fig["recall_mean"],
                          recall_p10=fig["recall_p10"], density=fig["density"], uniform_figures=uni_fig,
                          per_layer_figures=pl_fig, alternatives=alts)


def _lagrangian(pats, layer_r, layer_d, metric, budget, nl) -> Dict[int, Pattern]:
    """Per-layer choice maximising mean recall with mean density <= budget: each layer takes
    argmax(recall - lam * density); the smallest lam meeting the budget is found by bisection."""
    def pick(lam):
        out = {}
        for i in range(nl):
            out[i] = max(pats, key=lambda p: (float(layer_r[p.label][metric][i]) - lam * float(layer_d[p.label][i]),
                                              -float(layer_d[p.label][i])))
        return out

    def mean_density(ch):
        return sum(float(layer_d[p.label][i]) for i, p in ch.items()) / nl

    lo, hi = 0.0, 1.0
    while mean_density(pick(hi)) > budget and hi < 1e6:
        hi *= 4
    best = pick(hi)
    if mean_density(best) > budget:  # even the cheapest choice per layer is over: cheapest everywhere
        return {i: min(pats, key=lambda p: float(layer_d[p.label][i])) for i in range(nl)}
    for _ in range(40):
        mid = (lo + hi) / 2
        ch = pick(mid)
        if mean_density(ch) <= budget:
            hi, best = mid, ch
        else:
            lo = mid
    return best


def _mapping_figures(result: AuditResult, choice: Mapping[int, Pattern]) -> dict:
    """Model-level recall mean/p10 and density of a {layer: Pattern} choice."""
    means, rows, dens = [], [], []
    for i, p in sorted(choice.items()):
        mean, r, _ = result._pattern_figures(p)
        means.append(mean[:, i])
        rows.append(r[:, i])
        dens.append(float(result.density(p, per_layer=True)[i]))
    return {"recall_mean": float(torch.stack(means).mean()), "recall_p10": float(_quantile(torch.stack(rows), 0.1)),
            "density": sum(dens) / len(dens)}


# --------------------------------------------------------------------------- running the audit
def model_fingerprint(model) -> str:
    """sha256 of the model's config, dtype and a checksum of its weights (cheap: one pass of sums)."""
    cfg = model.config.to_dict()
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version", "dtype",
                                                                                "torch_dtype", "attn_implementation")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(str(p.dtype).encode())
            flat = p.detach().flatten()
            h.update(f"{float(flat.double().sum()):.10e}:{float(flat[:: 97].double().abs().sum()):.10e}".encode())
    return h.hexdigest()


def prepare_samples(data, tokenizer, length: int, n_docs: int, seed: int, mode: str = "auto",
                    text_field: str = "text") -> TokenizedSet:
    """``data`` (a dataset name, a synthetic task name, a path, a list of strings, a Dataset or a
    TokenizedSet) as samples of ``length`` tokens."""
    if isinstance(data, TokenizedSet):
        if data.length != length:
            raise ValueError(f"the samples given are of {data.length} tokens but length={length}")
        return data
    if tokenizer is None:
        raise ValueError("tokenizer is needed to cut the documents to a token length")
    if isinstance(data, str) and data in SYNTHETIC:
        ds = load_dataset(data, length=length, tokenizer=tokenizer, n=n_docs, seed=seed)
    elif isinstance(data, Dataset):
        ds = data
    else:
        ds = load_dataset(data, text_field=text_field)
    return ds.tokenize(tokenizer, length, n=n_docs, seed=seed, mode=mode)


def audit(model, tokenizer=None, data="code", *, length: int = 2048, n_docs: int = 32, seed: int = 0,
          block: int = 64, rows: int = 64, candidates: Optional[Sequence[Pattern]] = None,
          compare: Sequence[Pattern] = (), sink_tokens: int = SINK_TOKENS, local_distance: int = LOCAL_DISTANCE,
          far_distance: int = FAR_DISTANCE, mode: str = "auto", cache_dir: Optional[str] = "default",
          refresh: bool = False, progress: bool = True, max_bytes: int = 4 * 2**30, model_name: Optional[str] = None,
          text_field: str = "text", workers: int = 1) -> AuditResult:
    """Run ``model`` densely over ``n_docs`` samples of ``length`` tokens of ``data`` and measure its locality.

    ``candidates``: static patterns whose recall is measured at the ``rows`` sampled query rows of each
    document (default :func:`default_candidates`). ``compare``: patterns measured by capture on every
    query (NSA: only its selection is computed, compression, importance and top-n; its recall comes
    from the dense probabilities capture reduces anyway). ``cache_dir=None`` disables
    the cache, ``"default"`` is :func:`default_cache_dir` (``$NSA_VIZ_CACHE`` or ``~/.cache/nsa_viz/audit``);
    ``refresh`` recomputes. ``workers > 1``: documents run in that many forked processes, each on
    ``torch.get_num_threads() // workers`` threads (meant for an otherwise idle multi-core CPU, where
    one-thread workers avoid the waits of many small multi-threaded ops; on a 2-core machine busy with other
    jobs it measured no gain: 6 × 2k SmolLM2 documents took 87 s with 2 workers, 72 s with one, at load
    3-4). Ctrl-C stops after the current document and returns what is done
    (``result.meta["interrupted"]``). Memory per document is bounded by ``max_bytes`` (capture's budget).
    """
    from .models import attention_modules, current_patterns

    for name, v, lo in (("length", length, 2), ("n_docs", n_docs, 1), ("rows", rows, 1), ("workers", workers, 1),
                        ("sink_tokens", sink_tokens, 1),
                        ("local_distance", local_distance, 1), ("far_distance", far_distance, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if current_patterns(model):
        raise ValueError("audit measures the model's own dense attention: remove_pattern(model) first")
    compare = list(compare)
    for p in compare:
        if not isinstance(p, Pattern):
            raise TypeError(f"compare must hold nsa_viz patterns, got {p!r}")
    cands = list(default_candidates(length, block, sink_tokens) if candidates is None else candidates)
    for p in cands:
        if not isinstance(p, Pattern) or p.dynamic:
            raise ValueError(f"candidates must be static patterns (NSA goes in compare=), got {p!r}")
    if len({p.label for p in cands + compare}) != len(cands) + len(compare):
        raise ValueError("candidates and compare must not repeat a pattern")
    windows = sorted({p.window for p in cands if getattr(p, "window", 0)} | {local_distance})
    windows = [w for w in windows if w > 0]
    samples = prepare_samples(data, tokenizer, length, n_docs, seed, mode, text_field)
    n_layers = len(attention_modules(model))
    pos = row_positions(length, rows)
    names, masks = mask_bank(length, pos, cands, windows, sink_tokens, local_distance, far_distance)
    need = estimate_bytes(model, length, rows=len(pos), block=block, compare=compare)
    if need > max_bytes:
        raise ValueError(f"one document would need about {need / 2**20:.0f} MiB of recorded statistics "
                         f"(length {length}, rows {len(pos)}, block {block}, {len(compare)} compare patterns) but "
                         f"max_bytes is {max_bytes / 2**20:.0f} MiB: use fewer rows, a larger block or raise max_bytes")
    budget = int(max(DEFAULT_BUDGET, need * 1.1 + 2**20))
    settings = {"format": AUDIT_FORMAT, "length": length, "block": block, "rows": pos.tolist(),
                "sink": sink_tokens, "local": local_distance, "far": far_distance,
                "candidates": [p.label for p in cands], "compare": [p.label for p in compare]}
    run_dir = None
    if cache_dir == "default":
        cache_dir = default_cache_dir()
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps({"model": model_fingerprint(model), **settings}, sort_keys=True).encode())
        run_dir = os.path.join(os.fspath(cache_dir), key.hexdigest()[:24])
        os.makedirs(run_dir, exist_ok=True)
    cfg = model.config
    meta = {"model": model_name or getattr(cfg, "_name_or_path", "") or cfg.model_type, "model_type": cfg.model_type,
            "num_layers": n_layers, "num_q_heads": cfg.num_attention_heads,
            "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            "dataset": samples.name, "length": length, "n_requested": n_docs, "seed": seed, "block": block,
            "rows": len(pos), "sink_tokens": sink_tokens, "local_distance": local_distance,
            "far_distance": far_distance, "mode": samples.mode, "short_documents": samples.short,
            "samples_report": samples.report(), "cache_dir": run_dir, "compare": [p.label for p in compare]}
    docs: List[DocStats] = []
    hits = 0
    interrupted = False
    t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()

    def compute(s, digest):
        t1 = time.perf_counter()
        with torch.no_grad(), capture(model, rows=pos.tolist(), block=block, compare=compare,
                                      budget_bytes=budget) as rec:
            _forward_without_logits(model, s.ids[None].to(_device(model)))
        st = reduce_recording(rec, digest, s.source, pos, names, masks, compare)
        del rec
        st.seconds = time.perf_counter() - t1
        return st

    parallel = workers > 1 and _can_fork()
    bar = _progress(samples.samples, progress and not parallel, f"audit {samples.name} @ {length}")
    pending = []  # (index, sample, digest, cache path) of documents still to compute (parallel mode)
    try:
        for i, s in enumerate(bar):
            digest = s.digest()
            path = os.path.join(run_dir, f"{digest[:32]}.pt") if run_dir else None
            st = None
            if path and os.path.exists(path) and not refresh:
                try:
                    st = DocStats.load(path)
                    hits += 1
                except Exception as exc:  # a damaged entry is recomputed, not trusted
                    warnings.warn(f"audit cache entry {path} unreadable ({exc}); recomputing")
            if st is None and parallel:
                pending.append((i, s, digest, path))
                docs.append(None)
                continue
            if st is None:
                st = compute(s, digest)
                if path:
                    st.save(path)
            docs.append(st)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(cached=hits)
        if pending:
            for i, st in _compute_in_workers(compute, pending, workers, progress,
                                             f"audit {samples.name} @ {length} ({workers} workers)"):
                docs[i] = st
    except KeyboardInterrupt:
        interrupted = True
        docs = [d for d in docs if d is not None]
        if not docs:
            raise
        warnings.warn(f"audit interrupted: {len(docs)} of {len(samples)} documents finished and kept")
    finally:
        if hasattr(bar, "close"):
            bar.close()
    meta.update(n_docs=len(docs), interrupted=interrupted, cache_hits=hits, wall_seconds=time.perf_counter() - t0,
                cpu_seconds=time.process_time() - c0 + _children_cpu() - k0, threads=torch.get_num_threads(),
                workers=workers if parallel else 1,
                load_average=_load_average(),
                compute_seconds=sum(d.seconds for d in docs if d.seconds), sources=[d.source for d in docs])
    if run_dir:
        with open(os.path.join(run_dir, "index.json"), "w") as f:
            json.dump(_plain({"settings": settings, "model": meta["model"], "dataset": samples.name, "seed": seed,
                              "documents": [{"digest": d.digest, "source": d.source} for d in docs]}), f, indent=1)
    return AuditResult(docs, meta, cands, compare, windows)


def _can_fork() -> bool:
    import multiprocessing

    if "fork" in multiprocessing.get_all_start_methods():
        return True
    warnings.warn("workers > 1 needs the 'fork' start method (Linux, macOS); running documents one at a time")
    return False


def _children_cpu() -> float:
    """CPU seconds of this process's finished child processes (the audit's workers)."""
    t = os.times()
    return t.children_user + t.children_system


def _worker(compute, jobs, threads: int, queue) -> None:
    """One forked worker: computes its documents one by one on ``threads`` threads and hands each back
    through a file (the cache entry, or a temporary file the parent deletes)."""
    import traceback

    torch.set_num_threads(threads)
    for i, s, digest, path in jobs:
        try:
            st = compute(s, digest)
            st.save(path)
            queue.put(("ok", i, path))
        except BaseException:  # the parent raises it; a worker must not die silently
            queue.put(("error", i, traceback.format_exc()))
            return


def _compute_in_workers(compute, pending, workers: int, progress: bool, desc: str):
    """Yields ``(index, DocStats)`` as ``workers`` forked processes finish the ``pending`` documents.

    Documents are dealt round-robin; each worker runs on ``torch.get_num_threads() // workers`` threads
    (at least 1), so that two workers use a 2-core machine without the threads of one op waiting for
    each other. The model is shared copy-on-write by ``fork``. Ctrl-C stops the workers; what finished
    is kept (and cached)."""
    import multiprocessing
    import queue as queue_mod
    import shutil
    import tempfile

    ctx = multiprocessing.get_context("fork")
    tmp = tempfile.mkdtemp(prefix="nsa_viz_audit_")
    jobs = [(i, s, digest, path or os.path.join(tmp, f"{digest[:32]}.pt")) for i, s, digest, path in pending]
    n = min(workers, len(jobs))
    threads = max(1, torch.get_num_threads() // n)
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(compute, jobs[w::n], threads, q), daemon=True) for w in range(n)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=desc, unit="doc")
    try:
        for p in procs:
            p.start()
        done = 0
        while done < len(jobs):
            try:
                kind, i, what = q.get(timeout=5.0)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"an audit worker died (exit code {dead[0].exitcode}) without reporting")
                continue
            if kind == "error":
                raise RuntimeError(f"audit worker failed on document {i}:\n{what}")
            st = DocStats.load(what)
            if what.startswith(tmp):
                os.remove(what)
            done += 1
            if bar is not None:
                bar.update(1)
            yield i, st
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _load_average():
    """The machine's 1/5/15-minute load averages (None where the OS does not tell): on a shared machine
    the wall time of an audit means little without them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _forward_without_logits(model, ids):
    """The forward pass capture records. The audit needs the attention of every layer, not the
    next-token logits: ``logits_to_keep=1`` skips the vocabulary projection of all but the last
    position (for SmolLM2 at 2k tokens a fifth of the forward's FLOPs). Models that do not take
    the argument run whole."""
    try:
        return model(ids, use_cache=False, logits_to_keep=1)
    except TypeError as exc:
        if "logits_to_keep" not in str(exc):
            raise
        return model(ids, use_cache=False)


def _device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="doc")


# --------------------------------------------------------------------------- figures and the HTML page
def figures(result: AuditResult, recommendation: Optional[Recommendation] = None) -> Dict[str, object]:
    """Plotly figures of an audit (uses ``nsa_viz.plots`` when it provides audit figures)."""
    try:
        from . import plots  # the dashboard engineer's module, when it knows audits

        if hasattr(plots, "audit_figures"):
            return plots.audit_figures(result, recommendation)
    except ImportError:
        pass
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figs = {}
    dist = result.distance_table()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=dist.distance, y=dist.p90, line=dict(width=0), showlegend=False, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=dist.distance, y=dist.p10, fill="tonexty", line=dict(width=0),
                             name="p10–p90 over documents"))
    fig.add_trace(go.Scatter(x=dist.distance, y=dist["mean"], mode="lines+markers", name="mean"))
    fig.update_layout(title=f"Dense attention mass within distance d ({result.meta.get('dataset')}, "
                            f"mean over layers and heads)", xaxis_title="distance d (tokens)",
                      yaxis_title="mass at distance < d", xaxis_type="log", yaxis_range=[0, 1.02])
    figs["mass_vs_distance"] = fig

    heads = result.heads()
    summ = result.summary()
    fig = make_subplots(rows=1, cols=3, subplot_titles=("mass within 512", "sink mass (first tokens)", "far mass"))
    within = [c for c in heads.columns if c.startswith("within_")]
    near = "within_512" if "within_512" in within else within[-1]
    fig.layout.annotations[0].text = near.replace("_", " ")
    for j, col in enumerate((near, "sink_mass", "far_mass")):
        z = heads.pivot(index="layer", columns="head", values=col).values
        fig.add_trace(go.Heatmap(z=z, zmin=0, zmax=1, coloraxis="coloraxis"), 1, j + 1)
    fig.update_layout(title="Per layer (rows) and head (columns)", coloraxis=dict(colorscale="Viridis"))
    figs["heads"] = fig

    classes = heads.pivot(index="layer", columns="head", values="head_class")
    codes = {c: i for i, c in enumerate(CLASSES)}
    from plotly.colors import qualitative

    palette = qualitative.Set2[:len(CLASSES)]
    scale = [[i / (len(CLASSES) - 1), c] for i, c in enumerate(palette)]
    fig = go.Figure(go.Heatmap(z=classes.apply(lambda c: c.map(codes)).values.astype(float), text=classes.values,
                               texttemplate="%{text}", colorscale=scale, zmin=0, zmax=len(CLASSES) - 1,
                               showscale=False))
    fig.update_layout(title="Head classes", xaxis_title="head", yaxis_title="layer")
    figs["head_classes"] = fig

    fig = go.Figure()
    for fam, grp in summ.groupby("family"):
        grp = grp.sort_values("density")
        mode = "markers" if fam in ("NSA", "Dense") else "lines+markers"
        fig.add_trace(go.Scatter(x=grp.density, y=grp.recall_mean, mode=mode, name=f"{fam} mean", text=grp.pattern))
        fig.add_trace(go.Scatter(x=grp.density, y=grp.recall_p10, mode=mode, name=f"{fam} p10", text=grp.pattern,
                                 line=dict(dash="dot"), marker=dict(symbol="x")))
    orc = result.oracle_table()
    fig.add_trace(go.Scatter(x=orc.density, y=orc.recall_mean, mode="lines+markers", name="oracle top-k blocks",
                             text=orc.pattern, line=dict(color="black", dash="dash")))
    if recommendation is not None:
        fig.add_trace(go.Scatter(x=[recommendation.density], y=[recommendation.recall_mean], mode="markers",
                                 marker=dict(size=16, symbol="star", color="red"), name="recommended"))
    fig.update_layout(title="Recall of dense mass against density", xaxis_title="density (fraction of causal pairs)",
                      yaxis_title="recall", yaxis_range=[0, 1.02])
    figs["recall_vs_density"] = fig

    prof = result.block_profile().mean(1)  # over heads
    pick = sorted({0, result.num_layers // 2, result.num_layers - 1})
    fig = make_subplots(rows=1, cols=len(pick), subplot_titles=[f"layer {i}" for i in pick])
    for j, i in enumerate(pick):
        fig.add_trace(go.Heatmap(z=prof[i].clamp(min=1e-4).log10().numpy(), coloraxis="coloraxis"), 1, j + 1)
        fig.update_yaxes(autorange="reversed", row=1, col=j + 1)
    fig.update_layout(title=f"Mass by block ({result.block} tokens; log10, mean over heads and documents)",
                      coloraxis=dict(colorscale="Magma"))
    figs["block_mass"] = fig
    return figs


def write_html(result: AuditResult, path: str, recommendation: Optional[Recommendation] = None) -> str:
    """One self-contained HTML page (plotly.js embedded once, no network needed) of :func:`figures`."""
    import html as _html

    import plotly.io as pio

    figs = figures(result, recommendation)
    parts = [f"<h1>nsa-viz locality audit</h1><p>{_html.escape(repr(result))}</p>"]
    if recommendation is not None:
        parts.append(f"<p><b>Recommendation:</b> {_html.escape(recommendation.describe())}</p>")
    parts.append(f"<p>{_html.escape(str(result.meta.get('samples_report', '')))}</p>")
    for i, (name, fig) in enumerate(figs.items()):
        parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=(i == 0), div_id=f"fig-{name}"))
    parts.append("<h2>Patterns</h2>" + result.summary().drop(columns=["label"]).to_html(index=False, float_format="%.4f"))
    page = "<!doctype html><html><head><meta charset='utf-8'><title>nsa-viz audit</title></head><body>" + \
        "\n".join(parts) + "</body></html>"
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def write_report(result: AuditResult, out_dir: str, recommendation: Optional[Recommendation] = None) -> Dict[str, str]:
    """``audit.json``, ``audit_summary.json`` (compact: headline figures, patterns, recommendation), Parquet
    tables when pyarrow is installed and ``audit.html`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    paths["json"] = os.path.join(out_dir, "audit.json")
    with open(paths["json"], "w") as f:
        json.dump(result.to_dict(recommendation), f, indent=1)
    paths["summary_json"] = os.path.join(out_dir, "audit_summary.json")
    with open(paths["summary_json"], "w") as f:
        json.dump(result.to_dict(recommendation, compact=True), f, indent=1)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pyarrow = None
    if pyarrow is not None:
        for name, df in (("summary", result.summary()), ("heads", result.heads()),
                         ("recall", result.recall_table("head")), ("distance", result.distance_table(level="head"))):
            p = os.path.join(out_dir, f"{name}.parquet")
            df.to_parquet(p, index=False)
            paths[name] = p
    try:
        paths["html"] = write_html(result, os.path.join(out_dir, "audit.html"), recommendation)
    except ImportError as exc:  # plotly is an optional extra
        warnings.warn(f"no HTML page: {exc}")
    return paths


# --------------------------------------------------------------------------- command line
def add_arguments(p) -> None:
    """Arguments of ``nsa-viz audit``."""
    p.add_argument("--model", default=None, help="model folder, .gguf file or cached hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="code", help="code, docs, legal, passkey, needle, multikey, or a file/folder/JSONL path")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/JSON records")
    p.add_argument("--length", type=int, default=2048, help="tokens per document")
    p.add_argument("--n", type=int, default=32, dest="n_docs", help="number of documents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="auto", choices=["auto", "cut", "pack"], help="how documents reach the length")
    p.add_argument("--block", type=int, default=64, help="block size of the block-mass maps")
    p.add_argument("--rows", type=int, default=64, help="query rows per document measured token by token")
    p.add_argument("--compare", action="append", default=[], metavar="PATTERN",
                   help="extra pattern measured on every query, e.g. 'NSA(top_n=16, block=64, window=512)' (repeatable)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-recall", type=float, default=None, help="recommend the cheapest pattern keeping this recall")
    g.add_argument("--target-density", type=float, default=None, help="recommend the best pattern within this density")
    p.add_argument("--metric", default="mean", choices=["mean", "p10"], help="recall statistic the target applies to")
    p.add_argument("--per-layer", default="auto", choices=["auto", "yes", "no"])
    p.add_argument("--out", default="audit-report", help="folder for audit.json, *.parquet and audit.html")
    p.add_argument("--cache-dir", default=default_cache_dir(), help="per-document cache ('' disables it)")
    p.add_argument("--refresh", action="store_true", help="recompute documents already in the cache")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--workers", type=int, default=1,
                   help="documents computed in this many processes at once (each on threads/workers threads)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); 1 is often faster on a machine shared with "
                        "other busy processes")


def run(args) -> int:
    """``nsa-viz audit``: audit, recommend, write the report; prints the summary."""
    from .models import load_model

    compare = [parse_pattern(t) for t in args.compare]
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    res = audit(model, tok, args.data, length=args.length, n_docs=args.n_docs, seed=args.seed, block=args.block,
                rows=args.rows, compare=compare, mode=args.mode, cache_dir=args.cache_dir or None,
                refresh=args.refresh, progress=not args.no_progress, model_name=args.model or "SmolLM2-135M-Instruct",
                text_field=args.text_field, workers=args.workers)
    kwargs = {"target_density": args.target_density} if args.target_density is not None else \
        {"target_recall": args.target_recall if args.target_recall is not None else 0.95}
    rec = recommend(res, metric=args.metric, per_layer={"auto": "auto", "yes": True, "no": False}[args.per_layer],
                    **kwargs)
    paths = write_report(res, args.out, rec)
    print(res.meta["samples_report"])
    print(res.summary()[["pattern", "density", "recall_mean", "recall_p10"]].to_string(index=False, float_format="%.3f"))
    print("head classes:", res.heads().head_class.value_counts().to_dict())
    print("recommendation:", rec.describe())
    print(f"{res.n_docs} documents in {res.meta['wall_seconds']:.1f} s, {res.meta['cpu_seconds']:.1f} CPU s on "
          f"{res.meta['threads']} threads, {res.meta['workers']} worker(s), load average {res.meta['load_average']} ({res.meta['cache_hits']} from cache)"
          + (" — interrupted" if res.meta["interrupted"] else ""))
    print("wrote", ", ".join(paths.values()))
    return 130 if res.meta["interrupted"] else 0


__all__ = ["audit", "AuditResult", "DocStats", "Recommendation", "recommend", "default_candidates",
           "default_windows", "parse_pattern", "short_label", "periodicity", "classify_head", "nsa_visible_counts",
           "model_fingerprint", "prepare_samples", "figures", "write_html", "write_report", "add_arguments", "run",
           "row_positions", "mask_bank"]
