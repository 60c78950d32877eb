"""Plotly figures of the speed / memory / accuracy trade-off table (``nsa_viz.tradeoffs``).

Plots compute nothing: they select rows of the tidy table (a DataFrame, or a list of row dicts, e.g.
``nsa_viz.tradeoffs.read_table("data/results")``) and draw the columns that ``tradeoffs.add_derived``
already put there (``speedup_vs_dense``, ``crossover_T``, ``pareto``). Each figure shows one run of one
device (the latest run in the table unless ``run_id`` is given), and says so in its title.
"""
from __future__ import annotations

from typing import Optional

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_Y_TITLES = {"ms": "time per call (ms, median)", "tokens_per_s": "throughput (tokens/s)",
             "speedup_vs_dense": "speedup over dense (×)", "peak_mem_mb": "peak memory (MB)",
             "mem_delta_mb": "memory added by the call (MB)"}
_MEM_KIND = {"cuda_max_allocated": "CUDA max_memory_allocated", "cpu_process_peak_rss": "CPU process peak RSS"}


def _frame(table):
    import pandas as pd
    if isinstance(table, pd.DataFrame):
        return table.copy()
    if isinstance(table, (list, tuple)):
        return pd.DataFrame(list(table))
    raise TypeError(f"table must be a pandas DataFrame or a list of row dicts, got {type(table).__name__}")


def _one_run(df, run_id: Optional[str]):
    """Rows of ``run_id`` (default: the latest run that has rows of interest)."""
    if df.empty:
        raise ValueError("the table has no rows to draw")
    if run_id is None:
        run_id = sorted(df["run_id"].dropna().astype(str))[-1]
    sel = df[df["run_id"].astype(str) == str(run_id)]
    if sel.empty:
        raise ValueError(f"run_id {run_id!r} is not in the table; runs there: {sorted(df['run_id'].dropna().unique())}")
    return sel, run_id


def _series_name(row) -> str:
    if row.get("is_baseline") in (True, 1, "True"):
        return f"dense ({row.get('impl')})"
    return str(row.get("label") or row.get("pattern") or row.get("op"))


def _select(table, level, pass_, run_id, value):
    df = _frame(table)
    for col in ("level", "pass", "run_id", "status", value):
        if col not in df.columns:
            raise ValueError(f"table lacks the column {col!r}: is it a tradeoffs table?")
    df = df[(df["level"] == level) & (df["pass"] == pass_)]
    if df.empty:
        raise ValueError(f"no {level}-level rows with pass={pass_!r} in the table")
    return _one_run(df, run_id)


def _title(what: str, df, run_id) -> str:
    first = df.iloc[0]
    shape = f"B={first.get('B')}, {first.get('HQ')}/{first.get('HKV')} heads, d={first.get('D')}, {first.get('dtype')}"
    if first.get("level") == "model":
        shape = f"{first.get('model')}, B={first.get('B')}, {first.get('dtype')}"
    failed = int((df["status"] != "ok").sum()) if "status" in df.columns else 0
    extra = f" · {failed} configuration(s) failed (see table)" if failed else ""
    return f"{what}<br><sup>{first.get('device')} · {shape} · run {run_id}{extra}</sup>"


def _lines(df, value: str, log_y: bool = True):
    import plotly.graph_objects as go
    fig = go.Figure()
    ok = df[(df["status"] == "ok") & df[value].notna()].copy()
    ok["_series"] = [_series_name(r) for r in ok.to_dict("records")]
    names = sorted(ok["_series"].unique(), key=lambda n: (not n.startswith("dense ("), n))
    for i, name in enumerate(names):
        s = ok[ok["_series"] == name].sort_values("T")
        base = name.startswith("dense (")
        color = "#444444" if base else _PALETTE[i % len(_PALETTE)]
        hover = [f"T={int(t)}<br>{value}={v:.4g}" + (f"<br>speedup {sp:.2f}×" if sp == sp and sp is not None else "")
                 for t, v, sp in zip(s["T"], s[value], s.get("speedup_vs_dense", [None] * len(s)))]
        fig.add_trace(go.Scatter(x=s["T"], y=s[value], mode="lines+markers", name=name, hovertext=hover,
                                 hoverinfo="text", line=dict(color=color, dash="dash" if base else "solid")))
    fig.update_xaxes(type="log", title="sequence length T (tokens)")
    fig.update_yaxes(type="log" if log_y else "linear", title=_Y_TITLES.get(value, value))
    fig.update_layout(template="plotly_white", legend_title_text="pattern", height=460)
    return fig, ok


def time_vs_length(table, pass_: str = "fwd", level: str = "kernel", run_id: Optional[str] = None,
                   value: str = "ms"):
    """Time (or ``value="tokens_per_s"`` / ``"speedup_vs_dense"``) against length on log axes, one line per
    pattern, dense dashed, and a dotted vertical line at each pattern's ``crossover_T``: the length from
    which it beats dense."""
    df, run_id = _select(table, level, pass_, run_id, value)
    fig, ok = _lines(df, value)
    crossed = ok[ok["crossover_T"].notna()] if "crossover_T" in ok.columns else ok.iloc[0:0]
    for i, (name, s) in enumerate(crossed.groupby("_series", sort=True)):
        t = float(s["crossover_T"].iloc[0])
        if t <= float(s["T"].min()):  # no line to draw: it wins from the shortest length measured
            text = f"{name}: beats dense at every measured length (from T={t:,.0f})"
        else:
            fig.add_vline(x=t, line=dict(dash="dot", width=1, color="#777777"))
            text = f"{name}: beats dense from T≈{t:,.0f}"
        fig.add_annotation(x=_log10(t), y=1.0 - 0.06 * i, yref="paper", text=text,
                           showarrow=False, xanchor="left", font=dict(size=10))
    if value == "speedup_vs_dense":
        fig.add_hline(y=1.0, line=dict(dash="dash", color="#444444"))
    what = {"fwd": "forward", "fwd_bwd": "forward + backward", "decode": "one decode step", "prefill": "prefill",
            "generate": "generation"}.get(pass_, pass_)
    fig.update_layout(title=_title(f"{'Attention' if level == 'kernel' else 'Model'} {what}: "
                                   f"{_Y_TITLES.get(value, value)} vs length", df, run_id))
    return fig


def _log10(x: float) -> float:
    import math
    return math.log10(x)


def memory_vs_length(table, pass_: str = "fwd_bwd", level: str = "kernel", run_id: Optional[str] = None,
                     value: str = "peak_mem_mb"):
    """Peak memory (or ``value="mem_delta_mb"``, what the call itself added) against length, log axes."""
    df, run_id = _select(table, level, pass_, run_id, value)
    fig, ok = _lines(df, value)
    kinds = sorted({_MEM_KIND.get(k, str(k)) for k in ok.get("mem_kind", []) if k})
    fig.update_yaxes(title=f"{_Y_TITLES.get(value, value)}: {', '.join(kinds) or 'unknown kind'}")
    fig.update_layout(title=_title(f"Memory of {pass_} vs length", df, run_id))
    return fig


_ACC_TITLES = {"kl": "KL(dense ‖ pattern), nats (lower is better)", "ppl_delta": "perplexity − dense (lower is better)",
               "top1_agree": "top-1 agreement with dense (higher is better)",
               "passkey_acc": "passkey accuracy (higher is better)", "ppl": "perplexity"}


def _model_rows_at(table, pass_: str, measured: tuple, T: Optional[int], run_id: Optional[str]):
    """``(rows, T, run_id)``: the successful model-level rows of ``pass_`` with every column of ``measured``
    filled, at length ``T`` (default: the longest measured); a clear error when there are none."""
    df, run_id = _select(table, "model", pass_, run_id, measured[0])
    ok = df[df["status"] == "ok"]
    for column in measured:
        ok = ok[ok[column].notna()]
    if ok.empty:
        raise ValueError(f"no successful {pass_} rows with {' and '.join(map(repr, measured))} in run {run_id}")
    T = int(ok["T"].max()) if T is None else T
    ok = ok[ok["T"] == T]
    if ok.empty:
        raise ValueError(f"no {pass_} rows at T={T} in run {run_id}")
    return ok, T, run_id


def accuracy_vs_density(table, metric: str = "kl", T: Optional[int] = None, run_id: Optional[str] = None):
    """Accuracy against dense versus attended density, one point per pattern at length ``T`` (default:
    the longest measured), with the Pareto front (rows flagged ``pareto`` by ``add_derived``) joined."""
    import plotly.graph_objects as go
    if metric not in _ACC_TITLES:
        raise ValueError(f"metric must be one of {sorted(_ACC_TITLES)}, got {metric!r}")
    pass_ = "passkey" if metric == "passkey_acc" else "accuracy"
    ok, T, run_id = _model_rows_at(table, pass_, (metric, "density"), T, run_id)
    fig = go.Figure()
    names = [_series_name(r) for r in ok.to_dict("records")]
    fig.add_trace(go.Scatter(x=ok["density"], y=ok[metric], mode="markers+text", text=names, textposition="top center",
                             marker=dict(size=11, color=[("#444444" if n.startswith("dense (") else "#1f77b4") for n in names]),
                             name="patterns", hovertext=[f"{n}<br>density {d:.3f}<br>{metric} {v:.4g}"
                                                         for n, d, v in zip(names, ok["density"], ok[metric])],
                             hoverinfo="text"))
    if "pareto" in ok.columns:
        front = ok[ok["pareto"].astype(object).isin([True, 1, "True"])].sort_values("density")
        if len(front):
            fig.add_trace(go.Scatter(x=front["density"], y=front[metric], mode="lines", name="Pareto front",
                                     line=dict(color="#d62728", dash="dot", shape="hv" if metric != "top1_agree" else "vh")))
    fig.update_xaxes(title="density (fraction of the causal area attended)", type="log")
    fig.update_yaxes(title=_ACC_TITLES[metric])
    fig.update_layout(template="plotly_white", height=460,
                      title=_title(f"Accuracy vs density at T={T}: {metric}", ok, run_id))
    return fig


def max_batch_bars(table, T: Optional[int] = None, run_id: Optional[str] = None):
    """The largest prefill batch that fits, one bar per pattern at length ``T`` (default: the longest
    measured), labelled with its ratio to dense; a search stopped by its time cap is marked ``≥``."""
    import plotly.graph_objects as go
    ok, T, run_id = _model_rows_at(table, "max_batch", ("max_batch",), T, run_id)
    names = [_series_name(r) for r in ok.to_dict("records")]
    lower = ["lower bound" in str(n) for n in ok["note"]] if "note" in ok.columns else [False] * len(ok)
    ratios = ok["max_batch_vs_dense"] if "max_batch_vs_dense" in ok.columns else [None] * len(ok)
    text = [("≥" if lb else "") + f"{int(b)}" + (f" ({r:.2f}× dense)" if r is not None and r == r else "")
            for b, r, lb in zip(ok["max_batch"], ratios, lower)]
    fig = go.Figure(go.Bar(x=names, y=ok["max_batch"], text=text, textposition="outside",
                           marker_color=["#444444" if n.startswith("dense (") else "#1f77b4" for n in names],
                           hovertext=[str(n) for n in ok.get("note", [""] * len(ok))], hoverinfo="text"))
    fig.update_yaxes(title="largest batch whose prefill fits (KV cache kept)")
    fig.update_layout(template="plotly_white", height=460,
                      title=_title(f"Largest prefill batch at T={T}", ok, run_id))
    return fig


def tradeoff_figures(table, run_id: Optional[str] = None) -> dict:
    """Every figure the table has data for, by name (missing data is skipped, not an error)."""
    out = {}
    makers = {
        "time_fwd": lambda: time_vs_length(table, "fwd", run_id=run_id),
        "time_fwd_bwd": lambda: time_vs_length(table, "fwd_bwd", run_id=run_id),
        "time_decode": lambda: time_vs_length(table, "decode", run_id=run_id),
        "memory_fwd_bwd": lambda: memory_vs_length(table, "fwd_bwd", run_id=run_id),
        "prefill_throughput": lambda: time_vs_length(table, "prefill", "model", run_id, "tokens_per_s"),
        "generate_throughput": lambda: time_vs_length(table, "generate", "model", run_id, "tokens_per_s"),
        "memory_prefill": lambda: memory_vs_length(table, "prefill", "model", run_id),
        "accuracy_kl": lambda: accuracy_vs_density(table, "kl", run_id=run_id),
        "accuracy_top1": lambda: accuracy_vs_density(table, "top1_agree", run_id=run_id),
        "accuracy_passkey": lambda: accuracy_vs_density(table, "passkey_acc", run_id=run_id),
        "max_batch": lambda: max_batch_bars(table, run_id=run_id),
    }
    for name, make in makers.items():
        try:
            out[name] = make()
        except ValueError:
            continue
    return out
