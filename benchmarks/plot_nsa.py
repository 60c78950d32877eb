"""Figures of the NSA GPU benchmark (issue 3) as self-contained SVG, with no plotting dependency.

    python benchmarks/plot_nsa.py [--results benchmarks/results/nsa_h200.json] [--out docs]

reads the rows that ``benchmarks/bench_nsa.py`` wrote and writes two figures named after the results file
(``nsa_<gpu>.json`` gives ``nsa_<gpu>.svg`` and ``nsa_gqa_<gpu>.svg``):

* ``nsa_<gpu>.svg``: three log-log panels for one head shape (64/4/128 by default): forward time, and
  forward+backward time against T for dense cuDNN, fla-core ``parallel_nsa``, our NSA (union/token,
  union/block, gated/token) and FlexAttention's 512-window as a dashed reference; decode time per token
  (microseconds) for dense cuDNN against our CUDA-graphed ``nsa_decode``.
* ``nsa_gqa_<gpu>.svg``: forward+backward speedup of our NSA over dense cuDNN against T, one line per
  head shape, a panel per selection granularity (union combine), with the break-even line at 1x.

The SVG elements are written by hand (the machines that draw these have neither matplotlib nor
kaleido), so the figures stay a few kilobytes of text that review well in a diff.

Where the file holds several rows for one measurement, the row whose note names the newest run wins
(``NEWEST_RUN_TAG``), else the first one. A point whose row was measured before a fix (its note says
``before its fix``) is drawn with a hollow marker, and the legend and caption say so.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "nsa_h200.json"
DEFAULT_OUT = ROOT / "docs"
REQUIRED_FIELDS = ("op", "impl", "HQ", "HKV", "D", "T", "pass", "ms")
NEWEST_RUN_TAG = "[run 5]"
BEFORE_FIX_TAG = "before its fix"
MAIN_HEADS = (64, 4, 128)
GQA_HEADS = ((64, 4, 128), (32, 8, 128), (9, 3, 64))

FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
CHAR_W = 6.3  # rough width of one 11 px character of FONT; SVG cannot measure text, so layout estimates


# ----------------------------------------------------------------------------------------- rows
def load_rows(path: Path) -> list[dict]:
    """The benchmark rows of ``path``; ValueError naming the file when it is not a list of such rows."""
    path = Path(path)
    text = path.read_text()
    what = f"a JSON list of NSA benchmark rows (fields {', '.join(REQUIRED_FIELDS)}), as benchmarks/bench_nsa.py writes"
    if not text.strip():
        raise ValueError(f"results file {path} is empty; expected {what}")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"results file {path} is not JSON ({err}); expected {what}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"results file {path} holds {type(rows).__name__} {str(rows)[:60]!r}; expected {what}")
    for i, row in enumerate(rows):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise ValueError(f"results file {path}: row {i} lacks {', '.join(missing)}; expected {what}")
    return rows


def _note(row: dict) -> str:
    return str(row.get("note") or "")


def _params(row: dict) -> dict:
    return row.get("params") or {}


def row_key(row: dict) -> tuple:
    """What one measurement is: the same key twice means the same thing measured in two runs."""
    p = _params(row)
    return (row["op"], row["impl"], row["HQ"], row["HKV"], row["D"], row["T"], row["pass"],
            p.get("combine"), p.get("granularity"))


def pick_rows(rows: list[dict], newest_tag: str = NEWEST_RUN_TAG) -> dict[tuple, dict]:
    """One row per measurement: the first whose note contains ``newest_tag``, else the first of all."""
    chosen: dict[tuple, dict] = {}
    for row in rows:
        key = row_key(row)
        if key not in chosen or (newest_tag in _note(row) and newest_tag not in _note(chosen[key])):
            chosen[key] = row
    return chosen


def before_fix(row: dict) -> bool:
    return BEFORE_FIX_TAG in _note(row)


@dataclass(frozen=True)
class Series:
    """Which rows make one line, and how it looks."""

    label: str
    op: str
    impl: str
    color: str
    marker: str = "circle"
    combine: str | None = None
    granularity: str | None = None
    dashed: bool = False

    def matches(self, row: dict, heads: tuple[int, int, int], pass_: str) -> bool:
        p = _params(row)
        return (row["op"] == self.op and row["impl"] == self.impl and row["pass"] == pass_
                and (row["HQ"], row["HKV"], row["D"]) == tuple(heads)
                and (self.combine is None or p.get("combine") == self.combine)
                and (self.granularity is None or p.get("granularity") == self.granularity))


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    hollow: bool


# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), plus a marker shape each.
DENSE = Series("dense SDPA cuDNN", "dense", "sdpa_cudnn", "#000000", "square")
FLA = Series("fla parallel_nsa (cmp+slc only)", "nsa", "fla_nsa", "#CC79A7", "diamond")
UNION_TOKEN = Series("ours union / token", "nsa", "nsa_viz", "#0072B2", "circle", "union", "token")
UNION_BLOCK = Series("ours union / block", "nsa", "nsa_viz", "#009E73", "triangle", "union", "block")
GATED_TOKEN = Series("ours gated / token", "nsa", "nsa_viz", "#E69F00", "circle", "gated", "token")
FLEX_WINDOW = Series("FlexAttention window 512 (reference)", "sliding_window", "flex", "#777777", "none", dashed=True)
DENSE_DECODE = Series(DENSE.label, "decode", "sdpa_cudnn", DENSE.color, DENSE.marker)
OURS_DECODE = Series("ours nsa_decode (union/token, one CUDA graph)", "decode", "nsa_viz_cudagraph", "#D55E00", "circle")
TIME_SERIES = (DENSE, FLA, UNION_TOKEN, UNION_BLOCK, GATED_TOKEN, FLEX_WINDOW)
HEAD_STYLE = {(64, 4, 128): ("#0072B2", "circle"), (32, 8, 128): ("#E69F00", "square"), (9, 3, 64): ("#009E73", "triangle")}


def series_points(chosen: dict[tuple, dict], series: Series, heads, pass_: str, scale: float = 1.0) -> list[Point]:
    rows = [r for r in chosen.values() if series.matches(r, heads, pass_)]
    return sorted((Point(r["T"], r["ms"] * scale, before_fix(r)) for r in rows if r["ms"]), key=lambda p: p.x)


def speedup_points(chosen: dict[tuple, dict], series: Series, heads, pass_: str = "fwd_bwd") -> list[Point]:
    """dense cuDNN ms / ours ms at each T where both exist; hollow when either row predates a fix."""
    dense = {r["T"]: r for r in chosen.values() if DENSE.matches(r, heads, pass_)}
    ours = [r for r in chosen.values() if series.matches(r, heads, pass_)]
    pts = [Point(r["T"], dense[r["T"]]["ms"] / r["ms"], before_fix(r) or before_fix(dense[r["T"]]))
           for r in ours if r["T"] in dense and r["ms"]]
    return sorted(pts, key=lambda p: p.x)


# ----------------------------------------------------------------------------------------- SVG
def _fmt(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def fmt_tokens(t: float) -> str:
    return f"{t / 1024:g}k" if t >= 1024 and t % 1024 == 0 else f"{t:g}"


def nice_floor(x: float) -> float:
    """The largest 1-2-5 value at most x (axis ends land on a tick)."""
    e = math.floor(math.log10(x))
    return max(m * 10.0 ** e for m in (1, 2, 5) if m * 10.0 ** e <= x * (1 + 1e-9))


def nice_ceil(x: float) -> float:
    e = math.floor(math.log10(x))
    return min(m * 10.0 ** k for k in (e, e + 1) for m in (1, 2, 5) if m * 10.0 ** k >= x * (1 - 1e-9))


def log_ticks(lo: float, hi: float) -> list[float]:
    """Major ticks of a log axis: 1-2-5 per decade over up to 3 decades, 1 per decade beyond."""
    mults = (1, 2, 5) if math.log10(hi / lo) <= 3.2 else (1,)
    out = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        out += [m * 10.0 ** e for m in mults if lo * (1 - 1e-9) <= m * 10.0 ** e <= hi * (1 + 1e-9)]
    return out


def minor_ticks(lo: float, hi: float) -> list[float]:
    out = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        out += [m * 10.0 ** e for m in range(2, 10) if lo < m * 10.0 ** e < hi]
    return out


class Svg:
    """Collects SVG elements; ``render`` gives the whole document."""

    def __init__(self, width: int, height: int, title: str, desc: str = ""):
        self.width, self.height, self.title, self.desc = width, height, title, desc
        self.parts: list[str] = []

    def add(self, tag: str, text: str | None = None, **attrs) -> None:
        a = " ".join(f"{k.rstrip('_').replace('_', '-')}={quoteattr(str(v))}" for k, v in attrs.items() if v is not None)
        self.parts.append(f"<{tag} {a}/>" if text is None else f"<{tag} {a}>{escape(text)}</{tag}>")

    def text(self, x, y, s, size=11, anchor="start", **attrs) -> None:
        self.add("text", s, x=_fmt(x), y=_fmt(y), font_size=size, text_anchor=anchor, **attrs)

    def line(self, x1, y1, x2, y2, stroke="#000", width=1.0, **attrs) -> None:
        self.add("line", x1=_fmt(x1), y1=_fmt(y1), x2=_fmt(x2), y2=_fmt(y2), stroke=stroke, stroke_width=width, **attrs)

    def marker(self, shape: str, x: float, y: float, color: str, hollow: bool, size: float = 4.0) -> None:
        if shape == "none":
            return
        style = dict(fill="#ffffff" if hollow else color, stroke=color, stroke_width=1.6 if hollow else 1.0,
                     class_="marker hollow" if hollow else "marker")
        if shape == "circle":
            self.add("circle", cx=_fmt(x), cy=_fmt(y), r=_fmt(size), **style)
        elif shape == "square":
            s = size * 0.9
            self.add("rect", x=_fmt(x - s), y=_fmt(y - s), width=_fmt(2 * s), height=_fmt(2 * s), **style)
        else:
            s = size * 1.25
            pts = ([(x, y - s), (x + s, y + s * 0.8), (x - s, y + s * 0.8)] if shape == "triangle"
                   else [(x, y - s), (x + s, y), (x, y + s), (x - s, y)])
            self.add("polygon", points=" ".join(f"{_fmt(a)},{_fmt(b)}" for a, b in pts), **style)

    def render(self) -> str:
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" font-family={quoteattr(FONT)}>')
        meta = f"<title>{escape(self.title)}</title>" + (f"<desc>{escape(self.desc)}</desc>" if self.desc else "")
        bg = f'<rect x="0" y="0" width="{self.width}" height="{self.height}" fill="#ffffff"/>'
        return "\n".join([head, meta, bg, *self.parts, "</svg>"]) + "\n"


@dataclass
class LogPanel:
    """One log-log plot area at (x0, y0) of size w x h, in data limits xlim, ylim."""

    svg: Svg
    x0: float
    y0: float
    w: float
    h: float
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def px(self, x: float) -> float:
        lo, hi = (math.log10(v) for v in self.xlim)
        return self.x0 + (math.log10(x) - lo) / (hi - lo) * self.w

    def py(self, y: float) -> float:
        lo, hi = (math.log10(v) for v in self.ylim)
        return self.y0 + self.h - (math.log10(y) - lo) / (hi - lo) * self.h

    def axes(self, title: str, xlabel: str, ylabel: str, xticks: list[float], yfmt=lambda v: f"{v:g}") -> None:
        s, x1, y1 = self.svg, self.x0 + self.w, self.y0 + self.h
        s.text(self.x0 + self.w / 2, self.y0 - 10, title, size=13, anchor="middle", font_weight="bold")
        for v in minor_ticks(*self.ylim):
            s.line(self.x0, self.py(v), x1, self.py(v), stroke="#eeeeee", width=0.8)
        for v in log_ticks(*self.ylim):
            y = self.py(v)
            s.line(self.x0, y, x1, y, stroke="#d9d9d9", width=0.8)
            s.line(self.x0 - 4, y, self.x0, y, stroke="#333333")
            s.text(self.x0 - 7, y + 4, yfmt(v), size=10.5, anchor="end", fill="#333333")
        for v in xticks:
            x = self.px(v)
            s.line(x, self.y0, x, y1, stroke="#d9d9d9", width=0.8)
            s.line(x, y1, x, y1 + 4, stroke="#333333")
            s.text(x, y1 + 16, fmt_tokens(v), size=10.5, anchor="middle", fill="#333333")
        s.add("rect", x=_fmt(self.x0), y=_fmt(self.y0), width=_fmt(self.w), height=_fmt(self.h),
              fill="none", stroke="#333333", stroke_width=1)
        s.text(self.x0 + self.w / 2, y1 + 33, xlabel, size=11, anchor="middle")
        cx, cy = self.x0 - 44, self.y0 + self.h / 2
        s.text(cx, cy, ylabel, size=11, anchor="middle", transform=f"rotate(-90 {_fmt(cx)} {_fmt(cy)})")

    def series(self, label: str, pts: list[Point], color: str, marker: str, dashed: bool = False) -> None:
        if not pts:
            return
        self.svg.add("polyline", points=" ".join(f"{_fmt(self.px(p.x))},{_fmt(self.py(p.y))}" for p in pts),
                     fill="none", stroke=color, stroke_width=1.8, stroke_dasharray="6 4" if dashed else None,
                     class_="series", data_label=label)
        for p in pts:
            self.svg.marker(marker, self.px(p.x), self.py(p.y), color, p.hollow)

    def hline(self, y: float, label: str) -> None:
        self.svg.line(self.x0, self.py(y), self.x0 + self.w, self.py(y), stroke="#444444", width=1.2,
                      stroke_dasharray="4 3", class_="reference")
        self.svg.text(self.x0 + self.w - 4, self.py(y) + 13, label, size=10, anchor="end", fill="#444444")

    def empty(self, why: str) -> None:
        self.svg.text(self.x0 + self.w / 2, self.y0 + self.h / 2, why, size=11, anchor="middle", fill="#999999")


def data_limits(values: list[float], pad: float = 1.12) -> tuple[float, float]:
    if not values:
        return 1.0, 10.0
    return nice_floor(min(values) / pad), nice_ceil(max(values) * pad)


def x_limits(ts: list[float]) -> tuple[float, float]:
    return (min(ts) / 1.25, max(ts) * 1.25) if ts else (1024.0, 65536.0)


def legend(svg: Svg, x0: float, y0: float, width: float, entries: list[tuple[str, str, str, bool, bool]]) -> float:
    """Entries (label, colour, marker, dashed, hollow) flowed into rows; returns the y below the last row."""
    x, y, row_h = x0, y0, 18
    for label, color, marker, dashed, hollow in entries:
        w = 40 + CHAR_W * len(label) + 18
        if x + w > x0 + width and x > x0:
            x, y = x0, y + row_h
        if not hollow or dashed:  # the hollow-marker key shows the marker alone: it is no series
            svg.line(x, y, x + 30, y, stroke=color, width=1.8, stroke_dasharray="6 4" if dashed else None)
        svg.marker(marker, x + 15, y, color, hollow)
        svg.text(x + 38, y + 4, label, size=11)
        x += w
    return y + row_h


def _heads_name(heads) -> str:
    return "/".join(str(h) for h in heads)


def _reason_before_fix(rows: list[dict]) -> str:
    """What the notes say about the pre-fix rows, e.g. 'run 4: packed importance before its fix (...)'."""
    for r in rows:
        m = re.search(r"\[([^\];]*" + re.escape(BEFORE_FIX_TAG) + r"[^\];]*)", _note(r))
        if m:
            return m.group(1).strip()
    return BEFORE_FIX_TAG


def _setup(chosen: dict[tuple, dict]) -> dict:
    """Device, dtype and NSA parameters for the caption, from the rows themselves."""
    rows = list(chosen.values())
    nsa = next((r for r in rows if r["op"] == "nsa" and r["impl"] == "nsa_viz"), rows[0])
    p = _params(nsa)
    return dict(device=nsa.get("device", "unknown device"), dtype=nsa.get("dtype", "?"), B=nsa.get("B", "?"),
                torch=nsa.get("torch", "?"), triton=nsa.get("triton", "?"), date=nsa.get("date", "?"),
                n=p.get("top_n", "?"), block=p.get("block", "?"), window=p.get("window", "?"),
                cmp=f"{p.get('cmp_block', '?')}/{p.get('cmp_stride', '?')}")


def _versions(setup: dict) -> str:
    parts = [f"{k} {setup[k]}" for k in ("torch", "triton") if setup[k] != "?"] + [setup["date"]] * (setup["date"] != "?")
    return " · " + ", ".join(parts) if parts else ""


def _caption_lines(svg: Svg, y: float, paragraphs: list[str]) -> float:
    """Caption paragraphs wrapped to the figure's width (estimated: SVG text does not wrap itself)."""
    for para in paragraphs:
        for line in textwrap.wrap(para, int((svg.width - 32) / CHAR_W)):
            svg.text(16, y, line, size=11, fill="#444444", class_="caption")
            y += 15
    return y


def _hollow_caption(hollow_rows: list[dict], what: str) -> str:
    where = sorted({(r["HQ"], r["HKV"], r["D"], r["T"]) for r in hollow_rows})
    at = "; ".join(f"{hq}/{hkv}/{d}, T={fmt_tokens(t)}" for hq, hkv, d, t in where)
    reason = _reason_before_fix(hollow_rows).replace(": ", ", ", 1)  # "run 4: packed ..." reads as "run 4, packed ..."
    return (f"Hollow markers ({what} {at}): {reason}; "
            "the other points are from the newest run.")


# ----------------------------------------------------------------------------------------- figures
PANEL_W, PLOT_TOP, PLOT_H, PLOT_LEFT, PLOT_RIGHT = 400, 62, 250, 66, 14


def time_figure(chosen: dict[tuple, dict], heads=MAIN_HEADS) -> str:
    """Forward, forward+backward (ms) and decode (us) against T for one head shape."""
    panels = [("forward", "fwd", TIME_SERIES, 1.0, "ms"),
              ("forward + backward", "fwd_bwd", TIME_SERIES, 1.0, "ms"),
              ("decode one token vs a cache of T", "decode", (DENSE_DECODE, OURS_DECODE), 1000.0, "µs")]
    data = [[(s, series_points(chosen, s, heads, pass_, scale)) for s in series] for _, pass_, series, scale, _ in panels]
    if not any(pts for panel in data for _, pts in panel):
        raise ValueError(f"no NSA benchmark rows for heads {_heads_name(heads)} (ops dense/nsa/sliding_window/decode "
                         f"with impls sdpa_cudnn, fla_nsa, nsa_viz, flex, nsa_viz_cudagraph)")
    setup = _setup(chosen)
    ts = sorted({p.x for panel in data for _, pts in panel for p in pts})
    title = (f"NSA on {setup['device']}: time against sequence length T "
             f"({heads[0]} query / {heads[1]} key-value heads, head dim {heads[2]})")
    svg = Svg(PANEL_W * len(panels), 470, title, "Log-log plots of median time per call from benchmarks/results.")
    svg.text(16, 24, title, size=15, font_weight="bold")
    for i, ((name, _, _, _, unit), panel) in enumerate(zip(panels, data)):
        ys = [p.y for _, pts in panel for p in pts]
        lp = LogPanel(svg, i * PANEL_W + PLOT_LEFT, PLOT_TOP, PANEL_W - PLOT_LEFT - PLOT_RIGHT, PLOT_H,
                      x_limits(ts), data_limits(ys))
        lp.axes(name, "sequence length T (tokens)" if i < 2 else "cache length T (tokens)",
                f"time per call ({unit})" if i < 2 else f"time per token ({unit})", ts)
        for s, pts in panel:
            lp.series(s.label, pts, s.color, s.marker, s.dashed)
        if not ys:
            lp.empty("no rows")
    drawn = {s: pts for panel in data for s, pts in panel if pts}
    hollow_rows = [r for s in drawn for r in chosen.values()
                   if before_fix(r) and any(s.matches(r, heads, p) for p in ("fwd", "fwd_bwd", "decode"))]
    entries = [(s.label, s.color, s.marker, s.dashed, False) for s in drawn if s is not DENSE_DECODE or DENSE not in drawn]
    if hollow_rows:
        entries.append(("hollow marker: measured before its fix", "#555555", "circle", False, True))
    y = legend(svg, 24, PLOT_TOP + PLOT_H + 58, svg.width - 48, entries)
    caption = [f"{setup['device']} · {setup['dtype']} · B={setup['B']} · heads {_heads_name(heads)} (query/key-value/dim) · "
               f"NSA n={setup['n']} selected blocks of l'={setup['block']}, window w={setup['window']}, "
               f"compression l/d={setup['cmp']}", "Median time per call" + _versions(setup)]
    if FLA in drawn:
        caption.append("fla parallel_nsa (fla-core) runs only the compression and selection branches (no window), "
                       "with its fixed l = d = 64 compression.")
    if hollow_rows:
        caption.append(_hollow_caption(hollow_rows, "our NSA at"))
    y = _caption_lines(svg, y + 6, caption)
    svg.height = int(y + 4)
    return svg.render()


def gqa_figure(chosen: dict[tuple, dict], heads_list=GQA_HEADS) -> str:
    """Forward+backward speedup over dense cuDNN against T, one line per head shape, a panel per granularity."""
    panels = [(UNION_TOKEN, "union / token"), (UNION_BLOCK, "union / block")]
    data = [[(h, speedup_points(chosen, s, h)) for h in heads_list] for s, _ in panels]
    ys = [p.y for panel in data for _, pts in panel for p in pts]
    if not ys:
        raise ValueError("no pair of dense sdpa_cudnn and nsa_viz union fwd_bwd rows at the same T and heads; "
                         "nothing to compare")
    setup = _setup(chosen)
    ts = sorted({p.x for panel in data for _, pts in panel for p in pts})
    lo, hi = data_limits(ys + [1.0])
    title = "NSA forward+backward speedup over dense cuDNN, per head shape"
    svg = Svg(PANEL_W * len(panels), 440, title, "Dense cuDNN ms / our NSA ms, log-log; above 1 is faster than dense.")
    svg.text(16, 24, title, size=15, font_weight="bold")
    for i, ((_, name), panel) in enumerate(zip(panels, data)):
        lp = LogPanel(svg, i * PANEL_W + PLOT_LEFT, PLOT_TOP, PANEL_W - PLOT_LEFT - PLOT_RIGHT, PLOT_H, x_limits(ts), (lo, hi))
        lp.axes(f"ours {name}", "sequence length T (tokens)", "speedup: dense ms / ours ms", ts, yfmt=lambda v: f"{v:g}×")
        lp.hline(1.0, "dense = 1×")
        for heads, pts in panel:
            color, marker = HEAD_STYLE.get(tuple(heads), ("#555555", "circle"))
            lp.series(f"{_heads_name(heads)}", pts, color, marker)
    drawn = [h for h in heads_list if any(h2 == h and pts for panel in data for h2, pts in panel)]
    entries = [(f"heads {_heads_name(h)} (query/key-value/dim)", *HEAD_STYLE.get(tuple(h), ("#555555", "circle")), False, False)
               for h in drawn]
    hollow_rows = [r for r in chosen.values() if before_fix(r) and r["pass"] == "fwd_bwd"
                   and any(s.matches(r, h, "fwd_bwd") for s in (DENSE, UNION_TOKEN, UNION_BLOCK) for h in drawn)]
    if hollow_rows:
        entries.append(("hollow marker: measured before its fix", "#555555", "circle", False, True))
    y = legend(svg, 24, PLOT_TOP + PLOT_H + 58, svg.width - 48, entries)
    caption = [f"{setup['device']} · {setup['dtype']} · B={setup['B']} · NSA n={setup['n']}, l'={setup['block']}, "
               f"w={setup['window']}, compression l/d={setup['cmp']} · union combine · speedup = median fwd+bwd ms of dense cuDNN / of ours; above 1× ours is faster"]
    if hollow_rows:
        caption.append(_hollow_caption(hollow_rows, "NSA at"))
    y = _caption_lines(svg, y + 6, caption)
    svg.height = int(y + 4)
    return svg.render()


def write_figures(results: Path, out: Path) -> list[Path]:
    """The two figures, named after the results file: nsa_h200.json -> nsa_h200.svg and nsa_gqa_h200.svg."""
    chosen = pick_rows(load_rows(results))
    out.mkdir(parents=True, exist_ok=True)
    gpu = results.stem.removeprefix("nsa_")
    written = []
    for name, svg in ((f"nsa_{gpu}.svg", time_figure(chosen)), (f"nsa_gqa_{gpu}.svg", gqa_figure(chosen))):
        (out / name).write_text(svg, encoding="utf-8")
        written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="rows from benchmarks/bench_nsa.py")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for nsa_<gpu>.svg and nsa_gqa_<gpu>.svg")
    args = parser.parse_args(argv)
    try:
        for path in write_figures(args.results, args.out):
            print(path)
    except (ValueError, FileNotFoundError) as err:
        print(f"plot_nsa: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
