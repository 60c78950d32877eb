"""What the dashboard shows, as plain functions a notebook can call too: no widgets here.

The heavy steps run the model once under :func:`nsa_viz.capture.capture` and are cached by the app:

- :func:`dense_capture`: one dense forward pass recording the chosen layers' block-level attention mass,
  distance mass and the full probability rows of (up to ``max_rows``) query positions;
- :func:`nsa_capture`: the same pass with an NSA pattern in ``compare``, which records what NSA would
  select on each recorded layer's own queries and keys (the model's outputs are left dense).

Everything else is cheap and reads those recordings:

- :func:`recall_from_rows`: recall of dense attention mass by a static pattern, per layer and head,
  from the recorded rows and the pattern's ``BlockLayout.token_mask`` (the same number that
  ``capture(compare=[pattern])`` measures through log-sum-exps, without running the model again);
- :func:`block_share`, :func:`distance_table`, :func:`nsa_query_view`, :func:`nsa_tiles`: the arrays and
  tables that :mod:`nsa_viz.plots` draws;
- :func:`benchmark_table`: rows of ``benchmarks/results/*.json`` with the speedup over the best dense SDPA.
"""
from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..patterns import NSA, Pattern

ProgressFn = Callable[[int, int, str], None]  # (done, total, what)


# --------------------------------------------------------------------------- inputs
def parse_layers(spec, num_layers: int) -> List[int]:
    """Layer indices from ``"0, 9, 19"``, ``"0-3"``, ``"all"`` or a list of ints (negative from the end)."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(num_layers))
        out = []
        for part in filter(None, (p.strip() for p in re.split(r"[,\s]+", text))):
            m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"layers must be integers like '0, 9, 19', a range '0-3' or 'all'; got {part!r}")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            out.extend(range(lo, hi + 1))
        spec = out
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    layers = []
    for i in spec:
        if isinstance(i, bool) or not isinstance(i, int) or not -num_layers <= i < num_layers:
            raise ValueError(f"layers must lie in [0, {num_layers - 1}] for this model (it has {num_layers} layers), "
                             f"got {i!r}")
        layers.append(i % num_layers)
    if not layers:
        raise ValueError("choose at least one layer to record")
    return sorted(set(layers))


def spread_layers(num_layers: int, count: int) -> List[int]:
    """``count`` layer indices spread evenly from the first to the last layer."""
    count = max(1, min(count, num_layers))
    if count == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})


def query_rows(num_tokens: int, max_rows: int = 512) -> List[int]:
    """Query positions whose full attention rows are recorded: all of them up to ``max_rows``, else evenly
    spaced ones ending at the last token (so recall is measured on a uniform sample of queries)."""
    if max_rows <= 0:
        return []
    if num_tokens <= max_rows:
        return list(range(num_tokens))
    step = num_tokens / max_rows
    return sorted({num_tokens - 1 - int(i * step) for i in range(max_rows)})


# --------------------------------------------------------------------------- heavy steps
def _with_progress(model, progress: Optional[ProgressFn], what: str):
    """Forward pre-hooks on the attention modules reporting ``progress(layer + 1, num_layers, what)``."""
    from ..models import attention_modules

    if progress is None:
        return []
    mods = attention_modules(model)
    n = len(mods)
    return [m.register_forward_pre_hook(lambda _m, _a, i=i: progress(i + 1, n, what)) for i, m in mods.items()]


@torch.no_grad()
def dense_capture(model, tokenizer, ids: torch.Tensor, layers: Sequence[int], *, block: int = 32, max_rows: int = 512,
                  compare: Sequence[Pattern] = (), progress: Optional[ProgressFn] = None, budget_bytes: Optional[int] = None):
    """One forward pass of ``ids`` recording ``layers`` (see :func:`nsa_viz.capture.capture`): block mass at
    ``block``, distance mass and the rows of :func:`query_rows`. ``compare`` adds patterns measured on the
    same q and k (NSA included). Raises ``CaptureBudgetError`` (a MemoryError) before computing if too big."""
    from ..capture import DEFAULT_BUDGET, capture

    rows = query_rows(int(ids.shape[-1]), max_rows)
    hooks = _with_progress(model, progress, "forward pass")
    try:
        with capture(model, layers=list(layers), rows=rows, block=block, compare=list(compare), tokenizer=tokenizer,
                     budget_bytes=budget_bytes or DEFAULT_BUDGET) as rec:
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return rec


def nsa_capture(model, tokenizer, ids: torch.Tensor, layers: Sequence[int], pattern: NSA, *, block: int = 32,
                progress: Optional[ProgressFn] = None):
    """What ``pattern`` would select on each of ``layers`` for ``ids`` (the model itself runs dense):
    a recording whose layers hold ``compare_nsa[pattern.label]`` and ``compare_recall[pattern.label]``."""
    if not isinstance(pattern, NSA):
        raise TypeError(f"pattern must be an NSA pattern, got {type(pattern).__name__}")
    from ..attention import nsa_kernels_available

    if not nsa_kernels_available():
        raise RuntimeError("the NSA kernels (nsa_viz.kernels.nsa) are not in this installation yet")
    return dense_capture(model, tokenizer, ids, layers, block=block, max_rows=0, compare=[pattern], progress=progress)


# --------------------------------------------------------------------------- block maps and recall
def block_share(layer_record, head: Optional[int] = None):
    """``[NQB, NKB]`` numpy: the share of each query block's dense attention on each key block, for one
    query head or (``head=None``) averaged over heads. Rows sum to 1."""
    mass = layer_record.dense_block_mass[0]  # [HQ, NQB, NKB]
    if head is not None:
        if not 0 <= head < mass.shape[0]:
            raise ValueError(f"head must be in [0, {mass.shape[0] - 1}], got {head}")
        mass = mass[head:head + 1]
    rows = mass.sum(-1, keepdim=True).clamp_min(1e-12)
    return (mass / rows).mean(0).numpy()


def pattern_layout(pattern: Pattern, num_tokens: int, block: int):
    """The pattern's layout on ``block × block`` tiles for a text of ``num_tokens`` (so it lines up with the
    capture's block mass). A static pattern only: NSA's layout depends on the text (see :func:`nsa_tiles`)."""
    if not isinstance(pattern, Pattern) or pattern.dynamic:
        raise ValueError(f"pattern_layout needs a static pattern, got {pattern!r}")
    return pattern.compile(num_tokens, block_q=block, block_kv=block)


def warnings_for(pattern: Pattern, num_tokens: int) -> List[str]:
    """Parameter choices that are legal but say something the user should know (shown beside the plot)."""
    out = []
    window = getattr(pattern, "window", None)
    if isinstance(window, int) and window >= num_tokens:
        out.append(f"window {window} is at least as long as the text ({num_tokens} tokens): every query sees all "
                   f"earlier tokens, so this is dense attention (density 1, recall 1)")
    sink = getattr(pattern, "sink", 0)
    if isinstance(sink, int) and sink >= num_tokens:
        out.append(f"sink {sink} covers the whole text ({num_tokens} tokens): dense attention")
    if isinstance(pattern, NSA) and pattern.top_n * pattern.block >= num_tokens:
        out.append(f"top_n × block = {pattern.top_n * pattern.block} ≥ {num_tokens} tokens: NSA selects every block")
    return out


@torch.no_grad()
def recall_from_rows(rec, pattern: Pattern):
    """Tidy table (layer, head, kv_group, recall, rows): the mean share of dense attention that ``pattern``
    lets each recorded query keep, on the rows the recording holds (all queries when the text is at most
    ``max_rows`` tokens long). Static patterns; for NSA use the recording of :func:`nsa_capture`."""
    import pandas as pd

    out = []
    for i, lr in sorted(rec.layers.items()):
        if lr.dense_rows is None or lr.row_index is None:
            raise ValueError(f"layer {i} of this recording holds no attention rows: record it with dense_capture")
        layout = pattern.compile(lr.q_len, lr.kv_len, block_q=lr.block, block_kv=lr.block)
        rows = lr.row_index.long()
        mask = layout.token_mask(0, lr.q_len)[:, :, rows]  # [LB, LH, R, Tk]
        g = lr.num_q_heads // lr.num_kv_heads
        if mask.shape[1] > 1:  # a layout per key/value head: each query head reads its group's
            mask = mask.repeat_interleave(g, dim=1)
        kept = (lr.dense_rows * mask.to(lr.dense_rows.dtype)).sum(-1)  # [B, HQ, R]
        per_head = kept.mean(dim=(0, 2))
        for h in range(lr.num_q_heads):
            out.append({"layer": i, "head": h, "kv_group": h // g, "recall": float(per_head[h]), "rows": len(rows)})
    return pd.DataFrame(out)


def recall_from_compare(rec, label: str):
    """Tidy table (layer, head, kv_group, recall) of the recall that ``capture(compare=[...])`` measured for
    the compare pattern ``label`` (e.g. an NSA pattern's label)."""
    import pandas as pd

    out = []
    for i, lr in sorted(rec.layers.items()):
        if label not in lr.compare_recall:
            raise ValueError(f"layer {i} has no recall for {label!r}; it has {sorted(lr.compare_recall)}")
        per_head = lr.compare_recall[label].mean(dim=(0, 2))
        g = lr.num_q_heads // lr.num_kv_heads
        out += [{"layer": i, "head": h, "kv_group": h // g, "recall": float(per_head[h])} for h in range(lr.num_q_heads)]
    return pd.DataFrame(out)


@torch.no_grad()
def nsa_tiles(rec, layer: int, pattern: NSA, *, group: Optional[int] = None):
    """(tile_class ``[NQB, NKB]`` numpy, density) of what NSA visited on ``layer`` in units of the capture's
    block: a tile is full (2) when every causal (query, key) pair of it was visited by every query row of
    the group(s), partial (1) when some were, empty (0) otherwise. Density: visited share of the causal area."""
    from ..capture import SelectionMask

    lr = rec.layers[layer]
    keep = lr.compare_nsa.get(pattern.label)
    if keep is None:
        raise ValueError(f"layer {layer} holds no selection for {pattern.label}")
    idx = keep["block_idx"]
    if group is not None:
        idx = idx[:, group:group + 1]
    mask = SelectionMask(idx, pattern.block, pattern.window, lr.kv_len).token_mask()  # [B, G, Tq, Tk]
    q_pos = torch.arange(lr.q_len)[:, None] + lr.q_offset
    causal = torch.arange(lr.kv_len)[None, :] <= q_pos
    b = lr.block
    visited = _tile_sum(mask.float().mean(dim=(0, 1)), b)
    possible = _tile_sum(causal.float(), b)
    share = torch.where(possible > 0, visited / possible.clamp_min(1), torch.zeros_like(visited))
    tiles = torch.zeros_like(share, dtype=torch.int8)
    tiles[share > 0] = 1
    tiles[share >= 1 - 1e-6] = 2
    density = float(mask.float().mean(dim=(0, 1)).sum() / causal.float().sum())
    return tiles.numpy(), density


def _tile_sum(x: torch.Tensor, block: int) -> torch.Tensor:
    """Sum of a ``[Tq, Tk]`` map over ``block × block`` tiles (edges padded with zeros)."""
    tq, tk = x.shape
    x = torch.nn.functional.pad(x, (0, (-tk) % block, 0, (-tq) % block))
    return x.view(x.shape[0] // block, block, x.shape[1] // block, block).sum(dim=(1, 3))


def distance_table(rec, *, layer: Optional[int] = None):
    """Tidy table of cumulative dense attention mass against distance: one series per recorded layer (heads
    averaged), or per head of ``layer``. Columns: ``layer`` or ``head``, ``distance``, ``cum_mass``."""
    import pandas as pd

    out = []
    items = sorted(rec.layers.items()) if layer is None else [(layer, rec.layers[layer])]
    for i, lr in items:
        dm = lr.dense_distance_mass[0] / lr.q_len  # [HQ, Tk]: share of attention at each distance
        cum = dm.cumsum(-1)
        pts = _log_points(cum.shape[-1])
        if layer is None:
            c = cum.mean(0)
            out += [{"layer": i, "distance": d, "cum_mass": float(c[d])} for d in pts]
        else:
            for h in range(cum.shape[0]):
                out += [{"head": h, "distance": d, "cum_mass": float(cum[h, d])} for d in pts]
    return pd.DataFrame(out)


def _log_points(n: int, per_decade: int = 24) -> List[int]:
    """Distances 0..n-1 thinned to about ``per_decade`` points per decade (curves on a log axis)."""
    pts = {0, n - 1}
    for e in range(int(per_decade * math.log10(max(n, 2))) + 1):
        pts.add(min(n - 1, int(round(10 ** (e / per_decade))) - 1))
    return sorted(p for p in pts if p >= 0)


def locality_summary(rec, distances: Sequence[int] = (64, 256)):
    """Tidy table per (layer, head): share of dense attention within each of ``distances`` tokens and on
    the first key block (attention sinks), from the recorded distance and block masses."""
    import pandas as pd

    out = []
    for i, lr in sorted(rec.layers.items()):
        dm = lr.dense_distance_mass[0] / lr.q_len
        cum = dm.cumsum(-1)
        first = lr.dense_block_mass[0][:, :, 0].sum(-1) / lr.q_len
        for h in range(lr.num_q_heads):
            row = {"layer": i, "head": h, f"first {lr.block} tokens": float(first[h])}
            for d in distances:
                row[f"within {d}"] = float(cum[h, min(d, cum.shape[-1]) - 1])
            out.append(row)
    return pd.DataFrame(out)


def token_texts(tokenizer, ids) -> List[str]:
    """The text of each token id, as a reader sees it (byte-level vocabularies decoded one token at a time;
    a character split over two tokens shows as the replacement character)."""
    ids = [int(i) for i in (ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids)]
    if hasattr(tokenizer, "decode"):
        try:
            return [tokenizer.decode([i]) for i in ids]
        except Exception:  # a tokenizer that cannot decode single ids: fall back to its token strings
            pass
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(t).replace("Ġ", " ").replace("Ċ", "\n") for t in tokenizer.convert_ids_to_tokens(ids)]
    return [str(i) for i in ids]


# --------------------------------------------------------------------------- NSA explorer
def nsa_query_view(dense_rec, nsa_rec, layer: int, group: int, query: int, pattern: NSA) -> dict:
    """Everything the NSA explorer shows for one query of one layer and key/value head group.

    Returns ``selected`` (picked selection blocks), ``dense_mass`` and ``importance`` per selection block
    (dense mass: the group's query heads averaged, from the recorded row), ``selected_tokens`` /
    ``window_tokens`` (bool per key), ``weights`` (dense probability per key), ``recall`` (the group's
    share of dense mass kept by NSA at this query) and ``recall_selected`` (by the picked blocks alone).
    """
    lr = dense_rec.layers[layer]
    nlr = nsa_rec.layers[layer]
    keep = nlr.compare_nsa.get(pattern.label)
    if keep is None:
        raise ValueError(f"layer {layer} holds no selection for {pattern.label}")
    hkv = lr.num_kv_heads
    if not 0 <= group < hkv:
        raise ValueError(f"head group must be in [0, {hkv - 1}] (one per key/value head), got {group}")
    rows = lr.row_index.tolist() if lr.row_index is not None else []
    if query not in rows:
        raise ValueError(f"query {query} has no recorded attention row; recorded rows run from {rows[0]} to {rows[-1]}"
                         if rows else "this recording holds no attention rows")
    r = rows.index(query)
    g = lr.num_q_heads // hkv
    heads = slice(group * g, (group + 1) * g)
    weights = lr.dense_rows[0, heads, r].mean(0)  # [Tk]
    blk = pattern.block
    nsel = math.ceil(lr.kv_len / blk)
    dense_mass = torch.nn.functional.pad(weights, (0, nsel * blk - lr.kv_len)).view(nsel, blk).sum(-1)
    sel = keep["block_idx"][0, group, query].long()
    selected = sorted(int(s) for s in sel.tolist() if s >= 0)
    imp = keep["importance"][0, group, query]
    t = torch.arange(lr.kv_len)
    pos = query + lr.q_offset
    in_sel = torch.zeros(lr.kv_len, dtype=torch.bool)
    for s in selected:
        in_sel[s * blk:(s + 1) * blk] = True
    in_sel &= t <= pos
    in_win = (t <= pos) & (pos - t < pattern.window) if pattern.window > 0 else torch.zeros_like(in_sel)
    out = {"selected": selected, "dense_mass": dense_mass.numpy(), "importance": imp.numpy(),
           "selected_tokens": in_sel.numpy(), "window_tokens": in_win.numpy(), "weights": weights.numpy(),
           "query_pos": pos, "block": blk, "window": pattern.window,
           "recall": float(nlr.compare_recall[pattern.label][0, heads, query].mean()),
           "recall_selected": float(keep["recall_selected"][0, heads, query].mean())
           if "recall_selected" in keep else float("nan")}
    return out


# --------------------------------------------------------------------------- measured results
def benchmark_table(paths: Sequence) -> "object":
    """Rows of ``benchmarks/results/*.json`` files (device, op, impl, pass, T, ms, peak_mem_mb, params, ...) as
    one tidy table with ``series`` (pattern [implementation]), ``shape`` (batch, heads, head dim, dtype as
    one label) and ``speedup_vs_dense``: the fastest dense SDPA (``impl`` sdpa*)
    row of the same file, device, shape and pass divided by the row's time. When a file holds the same
    measurement twice (a later run), the later row counts."""
    import pandas as pd

    rows = []
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read results file {str(path)!r}: {exc}") from exc
        if not isinstance(data, list):
            raise ValueError(f"results file {str(path)!r} must hold a JSON list of rows")
        for r in data:
            if isinstance(r, dict) and {"device", "op", "impl", "pass", "T", "ms"} <= set(r):
                rows.append({**r, "source": path.name})
    cols = ["source", "device", "op", "impl", "pass", "B", "T", "HQ", "HKV", "D", "dtype", "params", "ms",
            "peak_mem_mb", "date", "series", "shape", "speedup_vs_dense"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    for c in cols:
        if c not in df.columns:
            df[c] = None
    df["params_key"] = [json.dumps(p, sort_keys=True) for p in df["params"]]
    shape = ["source", "device", "pass", "B", "T", "HQ", "HKV", "D", "dtype"]
    df = df.drop_duplicates(subset=shape + ["op", "impl", "params_key"], keep="last").copy()
    df["series"] = [_series(op, impl, p) for op, impl, p in zip(df["op"], df["impl"], df["params"])]
    df["shape"] = [f"B={b}, {hq}/{hkv} heads, d={d}, {dt}" for b, hq, hkv, d, dt in
                   zip(df["B"], df["HQ"], df["HKV"], df["D"], df["dtype"])]
    sdpa = df[df["impl"].astype(str).str.startswith("sdpa")]  # dense SDPA, whatever the op column calls it
    best = sdpa.groupby(shape, dropna=False)["ms"].min().rename("dense_ms").reset_index()
    df = df.merge(best, on=shape, how="left")
    df["speedup_vs_dense"] = df["dense_ms"] / df["ms"]
    return df[cols].reset_index(drop=True)


def _series(op, impl, params) -> str:
    """``Pattern(its own parameters) [implementation]``: a results file may attach one run's settings to every
    row (NSA's to the dense baseline too); only the parameters the op's pattern has are named."""
    import dataclasses

    from ..tradeoffs import PATTERN_NAMES

    cls = PATTERN_NAMES.get(str(op))
    if cls is None:  # not a pattern (e.g. one NSA branch timed alone): the implementation names it
        return f"{op} [{impl}]"
    params = params if isinstance(params, dict) else {}
    if cls is NSA and {"top_n", "block", "window"} <= set(params):  # the budget first, briefly: n×l' + window
        extra = [str(params[k]) for k in ("combine", "granularity") if k in params]
        args = ", ".join([f"{params['top_n']}×{params['block']} + window {params['window']}"] + extra)
    else:
        own = {f.name for f in dataclasses.fields(cls)} - {"causal"}
        args = ", ".join(f"{k}={v}" for k, v in params.items() if k in own)
    return f"{cls.__name__}({args}) [{impl}]"


def results_files(root) -> Dict[str, List[Path]]:
    """The measured result files under a checkout: ``benchmarks`` (``benchmarks/results/*.json``) and
    ``tradeoffs`` (``data/results/tradeoffs*`` tables written by ``nsa-viz bench``)."""
    root = Path(root)
    # Only files of kernel rows (a JSON list); other measurements there (e.g. accuracy, a JSON object) are
    # drawn elsewhere.
    bench = [p for p in sorted((root / "benchmarks" / "results").glob("*.json")) if p.read_text()[:64].lstrip().startswith("[")]
    trade = sorted(p for p in (root / "data" / "results").glob("tradeoffs*") if p.suffix in (".json", ".csv", ".parquet"))
    return {"benchmarks": bench, "tradeoffs": trade}


# --------------------------------------------------------------------------- caching
class ResultCache:
    """A small least-recently-used map from a hashable key to a computed result (so moving a slider back
    to an earlier value redraws at once)."""

    def __init__(self, size: int = 32):
        self.size = size
        self._items: "OrderedDict[object, object]" = OrderedDict()
        self._lock = threading.Lock()  # the page's thread and the worker's both use it
        self.hits = self.misses = 0

    def get(self, key, default=None):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return default

    def __contains__(self, key) -> bool:
        return key in self._items

    def put(self, key, value):
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


__all__ = ["parse_layers", "spread_layers", "query_rows", "dense_capture", "nsa_capture", "block_share",
           "pattern_layout", "warnings_for", "recall_from_rows", "recall_from_compare", "nsa_tiles", "distance_table",
           "locality_summary", "token_texts", "nsa_query_view", "benchmark_table", "results_files", "ResultCache"]
