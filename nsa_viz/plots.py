"""Plotly figures of recordings and measured tables: they draw, they do not compute.

Every function takes arrays or tidy tables that the library already produced (``nsa_viz.capture``,
``nsa_viz.audit``, ``nsa_viz.tradeoffs``, or the reductions in ``nsa_viz.dashboard.compute``) and only
selects, reshapes and labels them. Arrays may be numpy arrays, torch tensors or nested lists.

- :func:`layout_over_mass`: where dense attention went, block by block, with a pattern's tiles drawn over it.
- :func:`recall_heatmap`: recall of dense attention mass per layer and head.
- :func:`distance_curves`: cumulative attention mass against query-key distance.
- :func:`head_taxonomy`: one class per (layer, head) from the locality audit.
- :func:`nsa_selection`: for one query, the selection blocks NSA picked against dense mass and importance.
- :func:`highlighted_tokens_html`: the text with the tokens a query attends to highlighted (HTML).
- :func:`benchmark_speed`: measured time against length, one line per pattern and implementation.
- trade-off figures of ``nsa_viz.tradeoffs`` tables, re-exported from :mod:`nsa_viz.plots_tradeoffs`.
"""
from __future__ import annotations

import html
from typing import Optional, Sequence

try:  # the trade-off figures live beside us; re-exported so that one import gives every figure
    from .plots_tradeoffs import accuracy_vs_density, memory_vs_length, time_vs_length, tradeoff_figures
except ImportError:  # pragma: no cover - only while that module is being written
    accuracy_vs_density = memory_vs_length = time_vs_length = tradeoff_figures = None

TOKEN_COLORS = {"query": "#d62728", "selected": "rgba(255,140,0,0.55)", "window": "rgba(31,119,180,0.30)",
                "both": "rgba(148,103,189,0.50)"}
HEAD_KIND_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _array(x, name: str, ndim: int):
    """``x`` as a float numpy array of ``ndim`` dimensions, or a ValueError naming ``name``."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=float)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {a.shape}")
    return a


def _frame(table, columns: Sequence[str], name: str):
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        df = table
    elif isinstance(table, (list, tuple)):
        df = pd.DataFrame(list(table))
    else:
        raise TypeError(f"{name} must be a pandas DataFrame or a list of row dicts, got {type(table).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} lacks the column(s) {missing}; it has {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{name} has no rows to draw")
    return df


def _go():
    import plotly.graph_objects as go

    return go


# --------------------------------------------------------------------------- block maps
def layout_over_mass(mass, tile_class=None, *, block: int, title: str = "", height: int = 460):
    """Heat map of a block-level attention map split by a pattern's tiles: blue where the pattern computes
    the tile (attention it keeps), red where it skips it (attention it drops); a dot marks tiles computed
    with a token mask (partly kept).

    ``mass [NQB, NKB]``: the share of each query block's attention that lands on each key block (rows
    sum to 1 for dense attention; ``nsa_viz.dashboard.compute.block_share`` makes it from a capture).
    ``tile_class [NQB, NKB]`` (optional): the pattern's ``BlockLayout.tile_class`` for the same blocks
    (0 empty, 1 partial, 2 full). ``block``: tokens per block, for the axis labels.
    """
    import numpy as np

    go = _go()
    m = _array(mass, "mass", 2)
    nqb, nkb = m.shape
    tc = np.full(m.shape, 2.0) if tile_class is None else _array(tile_class, "tile_class", 2)
    if tc.shape != m.shape:
        raise ValueError(f"tile_class has shape {tc.shape} but mass has {m.shape}: compile the pattern with the "
                         f"capture's block size ({block})")
    # log colour scale: attention mass spans orders of magnitude; zeros (future keys) stay blank
    with np.errstate(divide="ignore"):
        logm = np.where(m > 0, np.log10(np.maximum(m, 1e-6)), np.nan)
    kept = tc > 0
    hover = np.stack([np.broadcast_to((np.arange(nkb) * block)[None, :], m.shape).astype(str),
                      np.broadcast_to((np.arange(nqb) * block)[:, None], m.shape).astype(str),
                      np.round(m, 4).astype(str),
                      np.where(tc == 2, "kept", np.where(tc == 1, "partly kept (token mask)", "dropped"))], -1)
    ticks = dict(tickvals=[-4, -3, -2, -1, 0], ticktext=["1e-4", "1e-3", "0.01", "0.1", "1"], len=0.45)
    template = ("queries from %{customdata[1]}<br>keys from %{customdata[0]}<br>share %{customdata[2]}"
                "<br>%{customdata[3]}<extra></extra>")
    fig = go.Figure()
    fig.add_trace(go.Heatmap(z=np.where(kept, logm, np.nan), customdata=hover, hovertemplate=template, zmin=-4, zmax=0,
                             colorscale="Blues", name="kept", colorbar=dict(title="kept", y=0.78, **ticks)))
    if tile_class is not None:
        fig.add_trace(go.Heatmap(z=np.where(kept, np.nan, logm), customdata=hover, hovertemplate=template, zmin=-4,
                                 zmax=0, colorscale="Reds", name="dropped", colorbar=dict(title="dropped", y=0.22, **ticks)))
        qi, kj = np.nonzero(tc == 1)
        if len(qi):
            fig.add_trace(go.Scatter(x=kj, y=qi, mode="markers", hoverinfo="skip", name="tile computed with a token mask",
                                     marker=dict(size=4, color="rgba(0,0,0,0.55)")))
    tick = max(1, nkb // 8)
    fig.update_xaxes(title=f"key block ({block} tokens)", tickvals=list(range(0, nkb, tick)),
                     ticktext=[str(j * block) for j in range(0, nkb, tick)], constrain="domain", showgrid=False)
    fig.update_yaxes(title=f"query block ({block} tokens)", autorange="reversed", tickvals=list(range(0, nqb, tick)),
                     ticktext=[str(i * block) for i in range(0, nqb, tick)], scaleanchor="x", showgrid=False)
    fig.update_layout(title=title, template="plotly_white", height=height, margin=dict(l=60, r=20, t=70, b=50),
                      legend=dict(orientation="h", y=-0.15), showlegend=tile_class is not None)
    return fig


def recall_heatmap(table, *, value: str = "recall", title: str = "", height: int = 360, colorscale: str = "RdYlGn"):
    """Recall of dense attention mass per layer (rows) and query head (columns), values written in the cells.

    ``table``: tidy rows with columns ``layer``, ``head`` and ``value`` (``nsa_viz.capture.recall_table``
    or ``nsa_viz.dashboard.compute.recall_from_rows`` make them); any share in [0, 1] draws the same way
    (e.g. ``compute.locality_summary`` columns, with a neutral ``colorscale`` such as ``"Blues"``).
    """
    go = _go()
    df = _frame(table, ("layer", "head", value), "table")
    grid = df.pivot_table(index="layer", columns="head", values=value, aggfunc="first").sort_index()
    z = grid.to_numpy(dtype=float)
    text = [[("" if v != v else f"{v:.2f}") for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=[f"h{h}" for h in grid.columns], y=[f"layer {i}" for i in grid.index],
                               zmin=0, zmax=1, colorscale=colorscale, text=text, texttemplate="%{text}",
                               hovertemplate=f"%{{y}}, %{{x}}: {value} %{{z:.3f}}<extra></extra>",
                               colorbar=dict(title=value)))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, template="plotly_white", height=height, margin=dict(l=70, r=20, t=60, b=40))
    return fig


def distance_curves(table, *, x: str = "distance", y: str = "cum_mass", series: str = "layer", title: str = "",
                    marks: Sequence[int] = (), height: int = 400):
    """Cumulative attention mass against query-key distance (log x), one line per ``series`` value.

    ``table``: tidy rows ``series, distance, cum_mass`` (the fraction of attention within that distance;
    ``nsa_viz.dashboard.compute.distance_table`` makes them from a capture). ``marks``: distances to
    draw as dotted vertical lines (e.g. a window size).
    """
    go = _go()
    df = _frame(table, (x, y, series), "table")
    fig = go.Figure()
    for i, (name, s) in enumerate(df.groupby(series, sort=True)):
        s = s.sort_values(x)
        fig.add_trace(go.Scatter(x=s[x] + 1, y=s[y], mode="lines", name=f"{series} {name}",
                                 line=dict(color=HEAD_KIND_COLORS[i % len(HEAD_KIND_COLORS)]),
                                 hovertemplate=f"{series} {name}<br>distance < %{{x}}: %{{y:.3f}}<extra></extra>"))
    for d in marks:
        fig.add_vline(x=d, line=dict(dash="dot", color="#777777"))
    fig.update_xaxes(type="log", title="distance query − key + 1 (tokens)")
    fig.update_yaxes(title="share of attention within that distance", range=[0, 1.02])
    fig.update_layout(title=title, template="plotly_white", height=height, margin=dict(l=60, r=20, t=60, b=50))
    return fig


def head_taxonomy(table, *, kind: str = "kind", title: str = "", height: int = 360):
    """One colour per head class (local, sink, strided, long-range, ...) for every (layer, head).

    ``table``: tidy rows ``layer, head, <kind>`` (the locality audit's head classification).
    """
    go = _go()
    df = _frame(table, ("layer", "head", kind), "table")
    kinds = sorted(df[kind].astype(str).unique())
    code = {k: i for i, k in enumerate(kinds)}
    grid = df.assign(_code=df[kind].astype(str).map(code)).pivot_table(index="layer", columns="head", values="_code",
                                                                       aggfunc="first").sort_index()
    labels = df.assign(_k=df[kind].astype(str)).pivot_table(index="layer", columns="head", values="_k",
                                                            aggfunc="first").reindex(index=grid.index, columns=grid.columns)
    n = max(len(kinds), 1)
    scale = []
    for i in range(n):  # a discrete colour scale: one flat band per class
        c = HEAD_KIND_COLORS[i % len(HEAD_KIND_COLORS)]
        scale += [[i / n, c], [(i + 1) / n, c]]
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(dtype=float), x=[f"h{h}" for h in grid.columns],
                               y=[f"layer {i}" for i in grid.index], zmin=-0.5, zmax=n - 0.5, colorscale=scale,
                               text=labels.to_numpy(), texttemplate="%{text}", hovertemplate="%{y}, %{x}: %{text}<extra></extra>",
                               colorbar=dict(tickvals=list(range(n)), ticktext=kinds, title=kind)))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, template="plotly_white", height=height, margin=dict(l=70, r=20, t=60, b=40))
    return fig


# --------------------------------------------------------------------------- NSA
def nsa_selection(dense_mass, importance, selected: Sequence[int], *, block: int, query_pos: int, window: int = 0,
                  title: str = "", height: int = 380):
    """For one query: dense attention mass per selection block (bars; picked blocks orange), NSA's importance
    (compressed-branch scores per block, line), the sliding window's reach (shaded) and the query (red line).

    ``dense_mass [NSEL]`` and ``importance [NSEL]`` are per selection block of ``block`` tokens;
    ``selected``: the picked block indices (-1 entries are ignored).
    """
    import numpy as np

    go = _go()
    dm = _array(dense_mass, "dense_mass", 1)
    imp = _array(importance, "importance", 1)
    if dm.shape != imp.shape:
        raise ValueError(f"dense_mass {dm.shape} and importance {imp.shape} must both have one value per block")
    picked = {int(s) for s in selected if int(s) >= 0}
    x = np.arange(len(dm))
    colors = [TOKEN_COLORS["selected"].replace("0.55", "0.95") if j in picked else "#9ecae1" for j in x]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=x, y=dm, marker_color=colors, name="dense attention mass (bars; orange = selected)",
                         hovertemplate="block %{x}: dense mass %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=imp, mode="lines+markers", name="NSA importance", yaxis="y2",
                             line=dict(color="#444444"), marker=dict(size=5),
                             hovertemplate="block %{x}: importance %{y:.3f}<extra></extra>"))
    qb = query_pos / block
    if window > 0:
        fig.add_vrect(x0=max(-0.5, (query_pos - window + 1) / block - 0.5), x1=qb - 0.5 + 1 / block, fillcolor="#1f77b4",
                      opacity=0.10, line_width=0, annotation_text="window", annotation_position="top left")
    fig.add_vline(x=qb - 0.5, line=dict(color=TOKEN_COLORS["query"], width=2))
    fig.update_xaxes(title=f"key selection block ({block} tokens)")
    fig.update_yaxes(title="dense attention mass", rangemode="tozero")
    fig.update_layout(title=title, template="plotly_white", height=height, bargap=0.1,
                      yaxis2=dict(title="importance", overlaying="y", side="right", rangemode="tozero", showgrid=False),
                      legend=dict(orientation="h", y=-0.25), margin=dict(l=60, r=60, t=60, b=60))
    return fig


def highlighted_tokens_html(tokens: Sequence[str], *, query: int, selected=None, window=None, weights=None,
                            max_tokens: Optional[int] = None) -> str:
    """The text as HTML, each token shaded by what a query sees: ``selected`` (bool per token: in a picked
    block), ``window`` (bool per token: in the sliding window), ``weights`` (dense probability per token,
    shown on hover and as underline strength). The query token is outlined in red. ``max_tokens`` keeps
    only the last tokens up to the query (long texts)."""
    n = len(tokens)
    if not 0 <= query < n:
        raise ValueError(f"query must index a token in [0, {n - 1}], got {query}")
    lo = 0 if max_tokens is None else max(0, query + 1 - max_tokens)
    parts = ['<div class="nsa-tokens" style="font-family: monospace; font-size: 12px; line-height: 1.9; '
             'white-space: pre-wrap; word-break: break-all; max-height: 420px; overflow-y: auto; '
             'border: 1px solid #ddd; padding: 6px">']
    if lo:
        parts.append(f'<span style="color:#888">… {lo} earlier tokens …</span>')
    for i in range(lo, n):
        tok = str(tokens[i])
        sel = bool(selected[i]) if selected is not None else False
        win = bool(window[i]) if window is not None else False
        style = []
        if sel and win:
            style.append(f"background:{TOKEN_COLORS['both']}")
        elif sel:
            style.append(f"background:{TOKEN_COLORS['selected']}")
        elif win:
            style.append(f"background:{TOKEN_COLORS['window']}")
        if i > query:
            style.append("color:#bbb")  # the future: nothing there is visible to the query
        if i == query:
            style.append(f"outline:2px solid {TOKEN_COLORS['query']}")
        hover = f"token {i}"
        if weights is not None:
            w = float(weights[i])
            hover += f": dense p={w:.4f}"
            if w > 0.01:
                style.append(f"border-bottom:{min(4, 1 + int(w * 20))}px solid #000")
        parts.append(f'<span title="{html.escape(hover)}" style="{";".join(style)}">{html.escape(tok)}</span>')
    parts.append("</div>")
    legend = (f'<div style="font-size:12px;margin:4px 0"><span style="background:{TOKEN_COLORS["selected"]}">selected block'
              f'</span> · <span style="background:{TOKEN_COLORS["window"]}">window</span> · '
              f'<span style="background:{TOKEN_COLORS["both"]}">both</span> · '
              f'<span style="outline:2px solid {TOKEN_COLORS["query"]}">query</span> · underline: dense attention ≥ 1%</div>')
    return legend + "".join(parts)


# --------------------------------------------------------------------------- measured speed
def benchmark_speed(table, *, pass_: str = "fwd", value: str = "ms", shape: Optional[str] = None, title: str = "",
                    height: int = 440):
    """Measured ``value`` (``ms``, ``speedup_vs_dense``, ``peak_mem_mb``) against length on log axes, one line per
    ``series`` (pattern and implementation), for one ``shape`` (needed when the table holds several); the
    device and shape go in the title.

    ``table``: tidy rows with columns ``device, pass, T, series, shape`` and ``value``
    (``nsa_viz.dashboard.compute.benchmark_table`` makes them from ``benchmarks/results/*.json``).
    """
    go = _go()
    df = _frame(table, ("device", "pass", "T", "series", "shape", value), "table")
    df = df[(df["pass"] == pass_) & df[value].notna()]
    if shape is not None:
        df = df[df["shape"] == shape]
    if df.empty:
        raise ValueError(f"no rows with pass={pass_!r}{f', shape {shape!r}' if shape else ''} and a {value!r} value")
    shapes = sorted(df["shape"].astype(str).unique())
    if len(shapes) > 1:
        raise ValueError(f"the rows hold several shapes {shapes}: choose one with shape=")
    fig = go.Figure()
    for i, (name, s) in enumerate(df.groupby("series", sort=True)):
        s = s.sort_values("T")
        dense = str(name).lower().startswith("dense")
        fig.add_trace(go.Scatter(x=s["T"], y=s[value], mode="lines+markers", name=str(name),
                                 line=dict(dash="dash" if dense else "solid",
                                           color=HEAD_KIND_COLORS[i % len(HEAD_KIND_COLORS)]),
                                 hovertemplate=f"{name}<br>T=%{{x}}<br>{value}=%{{y:.4g}}<extra></extra>"))
    if value == "speedup_vs_dense":
        fig.add_hline(y=1.0, line=dict(dash="dash", color="#444444"))
    devices = ", ".join(sorted(df["device"].astype(str).unique()))
    fig.update_xaxes(type="log", title="sequence length T (tokens)")
    fig.update_yaxes(type="log", title={"ms": "time per call (ms)", "speedup_vs_dense": "speedup over dense SDPA (×)",
                                        "peak_mem_mb": "peak memory (MB)"}.get(value, value))
    sub = f"measured on {devices} · {shapes[0]}"
    fig.update_layout(title=f"{title}<br><sup>{sub}</sup>" if title else sub,
                      template="plotly_white", height=height, legend_title_text="pattern [implementation]",
                      margin=dict(l=60, r=20, t=70, b=50))
    return fig


__all__ = ["layout_over_mass", "recall_heatmap", "distance_curves", "head_taxonomy", "nsa_selection",
           "highlighted_tokens_html", "benchmark_speed", "time_vs_length", "memory_vs_length", "accuracy_vs_density",
           "tradeoff_figures"]
