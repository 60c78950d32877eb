"""The dashboard: ipywidgets panels over :mod:`nsa_viz.dashboard.compute` and :mod:`nsa_viz.plots`.

``Dashboard().widget`` is the whole page (``notebooks/dashboard.ipynb`` displays it under Voila):

- **Data & model**: the model (embedded SmolLM2 by default), the text (``docs``/``code``/``legal`` or a
  file), its length and the layers to record; one dense forward pass records them (in the background).
- **Locality audit**: cumulative attention mass against distance, per layer or per head; the share within
  a distance and on the first tokens, per head; the audit's head classes where ``nsa_viz.audit`` has them.
- **Pattern tuner**: a pattern and its parameters; its tiles drawn over dense block mass, the recall of
  dense mass per layer and head and the density, updated as the parameters move.
- **NSA explorer**: for a layer, head group and query: the blocks NSA picks, dense mass and NSA's
  importance per block, and the text with the picked tokens highlighted.
- **Trade-offs**: measured speed and memory from ``benchmarks/results`` and speed / memory / accuracy
  tables of ``nsa-viz bench`` from ``data/results``, each labelled with its device.

Heavy work (model loading, a capture) runs on one background thread with a progress bar and elapsed
time; results are cached so that returning to earlier settings redraws at once. Errors are shown as a
message in the page, never as a traceback.
"""
from __future__ import annotations

import html
import json
import os
import threading
import time
from pathlib import Path
from typing import Optional

from .. import plots
from ..patterns import NSA, Dilated, GlobalLocal, Pattern, SlidingWindow
from . import compute, sources
from .worker import Worker

DEFAULT_TOKENS = 512
DEFAULT_LAYER_COUNT = 4
DEFAULT_BLOCK = 32
ENV_PREFIX = "NSA_VIZ_DASHBOARD_"
PATTERN_NAMES = ("SlidingWindow", "GlobalLocal", "Dilated", "NSA")
MODEL_LABEL = "SmolLM2-135M-Instruct (embedded)"
TUNER_TAB, EXPLORER_TAB = 2, 3


def repository_root() -> Path:
    """The checkout holding ``benchmarks/results`` (an editable install), else the working directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "benchmarks").is_dir() else Path.cwd()


def _one_at_a_time(method):
    """Draws run one at a time: widget events (kernel thread) and finished jobs (worker thread) both draw."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


def figure_output(fig) -> dict:
    """A plotly figure as one display output (the plotly MIME type that Voila and JupyterLab render)."""
    import plotly.io as pio

    spec = json.loads(pio.to_json(fig, validate=False))
    spec["config"] = {"displaylogo": False, "responsive": True}
    return {"output_type": "display_data", "metadata": {},
            "data": {"application/vnd.plotly.v1+json": spec, "text/plain": f"<figure: {fig.layout.title.text or ''}>"}}


def message_html(text: str, kind: str = "info") -> str:
    colors = {"info": ("#e8f1fb", "#1f5f9e"), "warning": ("#fff4e0", "#8a5300"), "error": ("#fdeaea", "#a11d1d"),
              "ok": ("#eaf7ee", "#1d6b35")}
    bg, fg = colors.get(kind, colors["info"])
    return (f'<div class="nsa-message nsa-message-{kind}" style="background:{bg};color:{fg};padding:6px 10px;'
            f'border-radius:4px;margin:4px 0;white-space:pre-wrap">{html.escape(text)}</div>')


class Dashboard:
    """The application. Arguments give the first settings (the page can change them):

    ``model``: None for the embedded SmolLM2, or a local model folder / GGUF file; ``dataset``: one of
    ``docs``, ``code``, ``legal`` or ``file`` (with ``path``); ``tokens``: text length; ``layers``: layer
    spec (``"0, 9, 19, 29"``; default: 4 spread over the model); ``block``: block size of the maps;
    ``results_root``: folder holding ``benchmarks/results`` and ``data/results``; ``loader``: a function
    ``(model) -> (model, tokenizer)`` (default :func:`nsa_viz.load_model`); ``synchronous``: run heavy
    work inline (tests).
    """

    def __init__(self, *, model: Optional[str] = None, dataset: str = "docs", path: str = "", tokens: int = DEFAULT_TOKENS,
                 layers: Optional[str] = None, block: int = DEFAULT_BLOCK, max_rows: int = 512,
                 results_root=None, loader=None, synchronous: bool = False):
        import ipywidgets as W

        self.W = W
        self.loader = loader or _default_loader
        self.max_rows = max_rows
        self.results_root = Path(results_root) if results_root else repository_root()
        self.worker = Worker(self._on_busy, synchronous=synchronous)
        self.captures = compute.ResultCache(4)     # data key -> (model, tokenizer, text info, Recording)
        self.nsa_captures = compute.ResultCache(8)  # (data key, NSA) -> Recording
        self.recalls = compute.ResultCache(64)      # (data key, pattern) -> (recall table, density)
        self.figures = compute.ResultCache(128)     # (what, ...) -> display output
        self.state: Optional[dict] = None           # the capture on show
        self.last_error = ""
        self._lock = threading.RLock()
        self._build(model, dataset, path, tokens, layers, block)

    # ================================================================== construction
    @classmethod
    def from_env(cls, **overrides) -> "Dashboard":
        """Settings from ``NSA_VIZ_DASHBOARD_*`` variables (``nsa-viz dashboard`` sets them for the kernel)."""
        env = {k[len(ENV_PREFIX):].lower(): v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
        kw = {}
        if env.get("model"):
            kw["model"] = env["model"]
        for key in ("dataset", "path", "layers", "results_root"):
            if env.get(key):
                kw[key] = env[key]
        for key in ("tokens", "block", "max_rows"):
            if env.get(key):
                try:
                    kw[key] = int(env[key])
                except ValueError:
                    pass  # a bad value falls back to the default; the page lets the user fix it
        kw.update(overrides)
        return cls(**kw)

    def _build(self, model, dataset, path, tokens, layers, block) -> None:
        W = self.W
        self.title = W.HTML("<h2 style='margin:4px 0'>nsa-viz: native sparse attention, seen and measured</h2>")
        self.status = W.HTML(self._status_html("starting"))
        self.status.add_class("nsa-status")
        self.progress = W.IntProgress(value=0, min=0, max=100, layout=W.Layout(width="320px"))
        self.progress.add_class("nsa-progress")
        self.message = W.HTML("")
        self.message.add_class("nsa-message-area")

        # ---- data & model
        style = {"description_width": "110px"}
        wide = lambda: W.Layout(width="460px")  # one Layout per widget: hiding one must not hide others
        slider = lambda: dict(continuous_update=False, style=style, layout=wide())
        self.w_model = W.Text(value=model or "", placeholder=MODEL_LABEL, description="model", style=style, layout=wide())
        self.w_dataset = W.Dropdown(options=sources.CHOICES,
                                    value=dataset if dataset in sources.DATASETS + (sources.FILE,) else "docs",
                                    description="text", style=style, layout=wide())
        self.w_path = W.Text(value=path, placeholder="/path/to/file.txt, a folder or a .jsonl", description="file", style=style, layout=wide())
        self.w_tokens = W.IntText(value=tokens, description="tokens", style=style, layout=W.Layout(width="220px"))
        self.w_layers = W.Text(value=layers or "", placeholder="e.g. 0, 9, 19, 29 (default: 4 spread)",
                               description="layers", style=style, layout=wide())
        self.w_block = W.Dropdown(options=[16, 32, 64], value=block if block in (16, 32, 64) else DEFAULT_BLOCK,
                                  description="block size", style=style, layout=W.Layout(width="220px"))
        self.w_run = W.Button(description="Record attention", button_style="primary")
        self.w_run.add_class("nsa-run")
        self.w_run.on_click(lambda _b: self.run_capture())
        self.w_path.layout.display = "" if self.w_dataset.value == sources.FILE else "none"
        self.w_dataset.observe(lambda ch: setattr(self.w_path.layout, "display",
                                                  "" if ch["new"] == sources.FILE else "none"), names="value")
        self.data_info = W.HTML("")
        self.data_info.add_class("nsa-data-info")
        data_tab = W.VBox([W.HTML("<p>Choose a model and a text; one dense forward pass records the chosen layers "
                                  "(attention mass by block and distance, and every query's attention row up to "
                                  f"{self.max_rows} queries). Keep it small on a CPU: 512 tokens and a few layers take "
                                  "seconds.</p>"),
                           self.w_model, self.w_dataset, self.w_path, W.HBox([self.w_tokens, self.w_block]),
                           self.w_layers, self.w_run, self.data_info])

        # ---- locality audit
        self.w_audit_layer = W.Dropdown(options=[("all recorded layers", -1)], value=-1, description="curves of",
                                        style=style)
        self.w_audit_metric = W.Dropdown(options=[], description="per head", style=style)
        self.out_distance = self._output("nsa-distance-plot")
        self.out_locality = self._output("nsa-locality-plot")
        self.out_taxonomy = self._output("nsa-taxonomy-plot")
        self.out_audit_recall = self._output("nsa-audit-recall-plot")
        self.taxonomy_note = W.HTML("")
        self.taxonomy_note.add_class("nsa-audit-note")
        self.w_audit_docs = W.IntSlider(value=2, min=1, max=16, description="documents", **slider())
        self.w_audit_target = W.FloatSlider(value=0.9, min=0.5, max=0.99, step=0.01, description="target recall",
                                            **slider())
        self.w_audit_run = W.Button(description="Run the audit", button_style="info")
        self.w_audit_run.add_class("nsa-run-audit")
        self.w_audit_run.on_click(lambda _b: self._guard(self.run_audit))
        self.w_audit_apply = W.Button(description="Try it in the pattern tuner →", layout=W.Layout(display="none", width="auto"))
        self.w_audit_apply.on_click(lambda _b: self._guard(self._recommendation_to_tuner))
        self.recommendation = W.HTML("")
        self.recommendation.add_class("nsa-recommendation")
        self.audit_result = None
        self.w_audit_layer.observe(lambda _c: self._guard(self.draw_audit), names="value")
        self.w_audit_metric.observe(lambda _c: self._guard(self.draw_audit), names="value")
        self.w_audit_target.observe(lambda _c: self._guard(self.draw_audit_result), names="value")
        audit_tab = W.VBox([
            W.HTML("<p>From the recording (the recorded layers, this text):</p>"),
            W.HBox([self.w_audit_layer, self.w_audit_metric]), self.out_distance, self.out_locality,
            W.HTML("<p><b>The locality audit</b> (<code>nsa_viz.audit</code>) runs every layer over several documents "
                   "of the chosen data at this length, classifies the heads and recommends a pattern for a target "
                   "recall (cached on disk; about a forward pass per document).</p>"),
            W.HBox([self.w_audit_docs, self.w_audit_run]), self.w_audit_target, self.taxonomy_note,
            self.recommendation, self.w_audit_apply, W.HBox([self.out_taxonomy, self.out_audit_recall])])

        # ---- pattern tuner
        self.w_pattern = W.Dropdown(options=PATTERN_NAMES, value="SlidingWindow", description="pattern", style=style)
        self.w_pattern.add_class("nsa-pattern")
        self.w_window = W.IntSlider(value=64, min=1, max=tokens, description="window", **slider())
        self.w_window.add_class("nsa-window")
        self.w_sink = W.IntSlider(value=4, min=0, max=128, description="sink tokens", **slider())
        self.w_sink.add_class("nsa-sink")
        self.w_stride = W.IntSlider(value=4, min=1, max=16, description="stride (blocks)", **slider())
        self.w_dil_block = W.Dropdown(options=[16, 32, 64, 128], value=32, description="dilation block", style=style)
        self.w_top_n = W.IntSlider(value=4, min=1, max=32, description="top-n blocks", **slider())
        self.w_top_n.add_class("nsa-top-n")
        self.w_nsa_block = W.Dropdown(options=[16, 32, 64], value=32, description="selection block", style=style)
        # NSA(select_outside_window=True): top-n slots only for blocks the window does not hold
        self.w_nsa_outside = W.Checkbox(value=False, description="pick only blocks before the window", indent=False)
        self.w_nsa_outside.add_class("nsa-outside-window")
        self.w_tune_layer = W.Dropdown(options=[], description="layer", style=style)
        self.w_tune_head = W.Dropdown(options=[("mean of heads", -1)], value=-1, description="head", style=style)
        self.out_layout = self._output("nsa-layout-plot")
        self.out_recall = self._output("nsa-recall-plot")
        self.recall_summary = W.HTML("")
        self.recall_summary.add_class("nsa-recall-summary")
        self.tune_note = W.HTML("")
        self.tune_note.add_class("nsa-tune-note")
        for w in (self.w_pattern, self.w_window, self.w_sink, self.w_stride, self.w_dil_block, self.w_top_n,
                  self.w_nsa_block, self.w_nsa_outside, self.w_tune_layer, self.w_tune_head):
            w.observe(lambda _c: self._guard(self.draw_tuner), names="value")
        self.w_pattern.observe(lambda _c: self._show_params(), names="value")
        self._show_params()
        tuner_tab = W.VBox([W.HBox([self.w_pattern, self.w_tune_layer, self.w_tune_head]),
                            W.VBox([self.w_window, self.w_sink, self.w_stride, self.w_dil_block, self.w_top_n,
                                    self.w_nsa_block, self.w_nsa_outside]),
                            self.recall_summary, self.tune_note, W.HBox([self.out_layout, self.out_recall])])

        # ---- NSA explorer
        self.w_x_top_n = W.IntSlider(value=4, min=1, max=32, description="top-n blocks", **slider())
        self.w_x_block = W.Dropdown(options=[16, 32, 64], value=32, description="selection block", style=style)
        self.w_x_window = W.IntSlider(value=64, min=0, max=tokens, description="window", **slider())
        self.w_x_outside = W.Checkbox(value=False, description="pick only blocks before the window", indent=False)
        self.w_x_layer = W.Dropdown(options=[], description="layer", style=style)
        self.w_x_group = W.Dropdown(options=[], description="head group", style=style)
        self.w_x_query = W.IntSlider(value=max(0, tokens - 1), min=0, max=max(0, tokens - 1), description="query", **slider())
        self.w_x_query.add_class("nsa-query")
        self.out_nsa = self._output("nsa-explorer-plot")
        self.nsa_tokens = W.HTML("")
        self.nsa_tokens.add_class("nsa-tokens-view")
        self.nsa_note = W.HTML("")
        self.nsa_note.add_class("nsa-explorer-note")
        self.nsa_stats = W.HTML("")
        for w in (self.w_x_top_n, self.w_x_block, self.w_x_window, self.w_x_outside, self.w_x_layer, self.w_x_group,
                  self.w_x_query):
            w.observe(lambda _c: self._guard(self.draw_explorer), names="value")
        explorer_tab = W.VBox([W.HBox([self.w_x_layer, self.w_x_group]), self.w_x_query,
                               W.HBox([self.w_x_top_n, self.w_x_block]), W.HBox([self.w_x_window, self.w_x_outside]),
                               self.nsa_note, self.out_nsa, self.nsa_tokens, self.nsa_stats])

        # ---- trade-offs
        self.w_t_source = W.Dropdown(options=[], description="results", style=style, layout=wide())
        self.w_t_view = W.Dropdown(description="show", style=style, layout=wide())
        self.out_tradeoff = self._output("nsa-tradeoff-plot")
        self.tradeoff_note = W.HTML("")
        self.w_t_source.observe(lambda _c: self._guard(self._tradeoff_views), names="value")
        self.w_t_view.observe(lambda _c: self._guard(self.draw_tradeoffs), names="value")
        trade_tab = W.VBox([self.w_t_source, self.w_t_view, self.tradeoff_note, self.out_tradeoff])

        self.tabs = W.Tab(children=[data_tab, audit_tab, tuner_tab, explorer_tab, trade_tab])
        for i, name in enumerate(("Data & model", "Locality audit", "Pattern tuner", "NSA explorer", "Trade-offs")):
            self.tabs.set_title(i, name)
        self.tabs.observe(lambda _c: self._guard(self._on_tab), names="selected_index")
        self.widget = W.VBox([self.title, W.HBox([self.progress, self.status]), self.message, self.tabs])
        self.widget.add_class("nsa-dashboard")

    def _output(self, css: str):
        out = self.W.Output(layout=self.W.Layout(min_width="420px", min_height="120px"))
        out.add_class(css)
        return out

    # ================================================================== helpers
    def start(self) -> "Dashboard":
        """Load the trade-off tables and start the first recording (in the background)."""
        self._guard(self._load_tradeoffs)
        self.run_capture()
        return self

    def show(self):
        """Display the page (in a notebook or under Voila) and start."""
        from IPython.display import display

        display(self.widget)
        return self.start()

    def set_message(self, text: str = "", kind: str = "info") -> None:
        self.message.value = message_html(text, kind) if text else ""
        if kind == "error":
            self.last_error = text

    def _guard(self, fn, *args):
        """Run a widget callback; an exception becomes a message in the page instead of a traceback."""
        try:
            return fn(*args)
        except Exception as exc:
            self.set_message(_describe(exc), "error")
            return None

    def _on_busy(self, label: Optional[str], seconds: float) -> None:
        if label is None:
            self.status.value = self._status_html("ready")
            if self.progress.bar_style != "danger":
                self.progress.value, self.progress.bar_style = 100, "success"
            return
        self.status.value = self._status_html(f"{label} … {seconds:.0f} s")

    def _progress_fn(self, start: int, end: int):
        def report(done: int, total: int, what: str):
            self.progress.bar_style = "info"
            self.progress.value = int(start + (end - start) * done / max(total, 1))
            self.status.value = self._status_html(f"{what}: layer {done}/{total}")
        return report

    @staticmethod
    def _status_html(text: str) -> str:
        return f'<span class="nsa-status-text" style="margin-left:8px">{html.escape(text)}</span>'

    def _show(self, out, fig_output: dict) -> None:
        out.outputs = (fig_output,)

    def _figure(self, key, make):
        """The display output of a figure, from the cache or made now."""
        hit = self.figures.get(key)
        if hit is None:
            hit = self.figures.put(key, figure_output(make()))
        return hit

    # ================================================================== recording
    def data_settings(self) -> dict:
        """The data tab's settings, validated (a ValueError says what to fix)."""
        tokens = self.w_tokens.value
        if not isinstance(tokens, int) or tokens < 16:
            raise ValueError(f"tokens must be at least 16, got {tokens}")
        if tokens > 8192:
            raise ValueError(f"tokens must be at most 8192 here (the model's context), got {tokens}")
        return {"model": self.w_model.value.strip() or None, "dataset": self.w_dataset.value,
                "path": self.w_path.value.strip() if self.w_dataset.value == sources.FILE else "",
                "tokens": tokens, "layers": self.w_layers.value.strip(), "block": int(self.w_block.value)}

    def run_capture(self) -> None:
        """Record dense attention for the data tab's settings (cached), in the background."""
        try:
            settings = self.data_settings()
        except ValueError as exc:
            self.set_message(str(exc), "error")
            return
        self.set_message("")
        self.progress.value, self.progress.bar_style = 0, "info"

        def job():
            return self._capture(settings)

        def done(state):
            self.state = state
            self._guard(self._after_capture)

        self.worker.submit("capture", job, done, self._job_failed, label="recording attention")

    def _capture(self, s: dict) -> dict:
        t0 = time.monotonic()
        self.status.value = self._status_html("loading the model")
        model, tok = self.loader(s["model"])
        self.progress.value = 30
        n_layers = model.config.num_hidden_layers
        layers = (compute.parse_layers(s["layers"], n_layers) if s["layers"]
                  else compute.spread_layers(n_layers, DEFAULT_LAYER_COUNT))
        key = (s["model"], s["dataset"], s["path"], s["tokens"], tuple(layers), s["block"], self.max_rows)
        hit = self.captures.get(key)
        if hit is not None:
            return hit
        ids, where = sources.sample_ids(s["dataset"], tok, s["tokens"], path=s["path"])
        rec = compute.dense_capture(model, tok, ids, layers, block=s["block"], max_rows=self.max_rows,
                                    progress=self._progress_fn(35, 100))
        state = {"key": key, "model": model, "tokenizer": tok, "rec": rec, "layers": layers, "tokens": s["tokens"],
                 "block": s["block"], "ids": ids, "where": where, "model_name": s["model"] or MODEL_LABEL,
                 "seconds": time.monotonic() - t0, "num_layers": n_layers,
                 "token_strings": compute.token_texts(tok, ids[0])}
        return self.captures.put(key, state)

    def _job_failed(self, exc: Exception) -> None:
        self.progress.bar_style = "danger"
        self.set_message(_describe(exc), "error")

    @_one_at_a_time
    def _after_capture(self) -> None:
        st = self.state
        rec = st["rec"]
        lr0 = rec.layers[st["layers"][0]]
        hq, hkv = lr0.num_q_heads, lr0.num_kv_heads
        self.data_info.value = (
            f"<p><b>{html.escape(str(st['model_name']))}</b> · {st['num_layers']} layers · {hq} query / {hkv} key-value heads"
            f"<br>text: {html.escape(st['where'])} · {st['tokens']} tokens"
            f"<br>recorded layers {', '.join(map(str, st['layers']))} at block {st['block']} "
            f"({len(lr0.row_index)} query rows) in {st['seconds']:.1f} s</p>"
            f"<pre style='max-height:160px;overflow:auto;background:#f6f6f6;padding:6px;white-space:pre-wrap'>"
            f"{html.escape(''.join(st['token_strings'][:300]))} …</pre>")
        layer_opts = [(f"layer {i}", i) for i in st["layers"]]
        with self.hold_sync():
            self.w_tune_layer.options = layer_opts
            self.w_tune_layer.value = st["layers"][len(st["layers"]) // 2]
            self.w_tune_head.options = [("mean of heads", -1)] + [(f"head {h}", h) for h in range(hq)]
            self.w_audit_layer.options = [("all recorded layers", -1)] + layer_opts
            self.w_x_layer.options = layer_opts
            self.w_x_layer.value = st["layers"][len(st["layers"]) // 2]
            self.w_x_group.options = [(f"group {g} (heads {g * (hq // hkv)}–{(g + 1) * (hq // hkv) - 1})", g)
                                      for g in range(hkv)]
            self.w_x_group.value = 0
            T = st["tokens"]
            for w in (self.w_window, self.w_x_window):
                w.max = T + 64
            self.w_x_query.max = T - 1
            self.w_x_query.value = T - 1
        self.set_message("")
        self.draw_all()

    def hold_sync(self):
        """Widget updates of several widgets at once, without redrawing after each one."""
        app = self

        class _Hold:
            def __enter__(self):
                app._quiet = True

            def __exit__(self, *exc):
                app._quiet = False
                return False

        return _Hold()

    _quiet = False

    def draw_all(self) -> None:
        for fn in (self.draw_tuner, self.draw_audit):
            self._guard(fn)
        if self.tabs.selected_index == EXPLORER_TAB:  # NSA selections cost a forward pass: only when looked at
            self._guard(self.draw_explorer)

    def _on_tab(self) -> None:
        if self.tabs.selected_index == EXPLORER_TAB:
            self.draw_explorer()

    # ================================================================== tuner
    def current_pattern(self) -> Pattern:
        """The tuner's pattern from its widgets (a ValueError from the pattern names what is wrong)."""
        name = self.w_pattern.value
        if name == "SlidingWindow":
            return SlidingWindow(window=self.w_window.value)
        if name == "GlobalLocal":
            return GlobalLocal(window=self.w_window.value, sink=self.w_sink.value)
        if name == "Dilated":
            return Dilated(stride=self.w_stride.value, block=self.w_dil_block.value, window=self.w_window.value)
        block = self.w_nsa_block.value
        return NSA(block=block, top_n=self.w_top_n.value, window=self.w_window.value, cmp_block=block,
                   cmp_stride=min(16, block), init_blocks=1, local_blocks=min(2, self.w_top_n.value - 1),
                   select_outside_window=self.w_nsa_outside.value)

    def _show_params(self) -> None:
        name = self.w_pattern.value
        visible = {"SlidingWindow": {self.w_window}, "GlobalLocal": {self.w_window, self.w_sink},
                   "Dilated": {self.w_window, self.w_stride, self.w_dil_block},
                   "NSA": {self.w_window, self.w_top_n, self.w_nsa_block, self.w_nsa_outside}}[name]
        for w in (self.w_window, self.w_sink, self.w_stride, self.w_dil_block, self.w_top_n, self.w_nsa_block,
                  self.w_nsa_outside):
            w.layout.display = "" if w in visible else "none"

    @_one_at_a_time
    def draw_tuner(self) -> None:
        if self._quiet or self.state is None:
            return
        st = self.state
        try:
            pattern = self.current_pattern()
        except ValueError as exc:
            self.tune_note.value = message_html(str(exc), "error")
            return
        notes = compute.warnings_for(pattern, st["tokens"])
        layer, head = self.w_tune_layer.value, self.w_tune_head.value
        if layer is None:
            return
        if isinstance(pattern, NSA):
            from ..attention import nsa_kernels_available

            if not nsa_kernels_available():
                self.tune_note.value = message_html(
                    "NSA needs the NSA kernels (nsa_viz.kernels.nsa), which are not in this installation yet; the "
                    "static patterns work without them.", "warning")
                return
            nsa_rec = self._nsa_recording(pattern, then=self.draw_tuner)
            if nsa_rec is None:
                self.tune_note.value = message_html("computing what NSA selects on the recorded layers …", "info")
                return
            rkey = (st["key"], pattern)
            hit = self.recalls.get(rkey)
            if hit is None:  # NSA's density depends on the layer (what it selected there): averaged
                per_layer = [compute.nsa_tiles(nsa_rec, i, pattern)[1] for i in st["layers"]]
                hit = self.recalls.put(rkey, (compute.recall_from_compare(nsa_rec, pattern.label),
                                              sum(per_layer) / len(per_layer)))
            table, density = hit
            group = None if head == -1 else head // (st["rec"].layers[layer].num_q_heads // st["rec"].layers[layer].num_kv_heads)
            tkey = ("nsa-tiles", st["key"], pattern, layer, group)
            tiles, layer_density = self.figures.get(tkey) or self.figures.put(
                tkey, compute.nsa_tiles(nsa_rec, layer, pattern, group=group))
        else:
            rkey = (st["key"], pattern)
            hit = self.recalls.get(rkey)
            if hit is None:
                layout = compute.pattern_layout(pattern, st["tokens"], st["block"])
                hit = self.recalls.put(rkey, (compute.recall_from_rows(st["rec"], pattern), layout.density))
            table, density = hit
            tiles = compute.pattern_layout(pattern, st["tokens"], st["block"]).tile_class[0, 0]
            layer_density = density
        lr = st["rec"].layers[layer]
        head_label = "mean of heads" if head == -1 else f"head {head}"
        layer_recall = table[table["layer"] == layer]["recall"]
        sel = table if head == -1 else table[table["head"] == head]
        fig_l = self._figure(("layout", st["key"], pattern, layer, head),
                             lambda: plots.layout_over_mass(
                                 compute.block_share(lr, None if head == -1 else head), tiles, block=st["block"],
                                 title=f"{pattern.label}<br><sup>over dense attention, layer {layer}, {head_label}; "
                                       f"density {layer_density:.3f}, recall here "
                                       f"{float(sel[sel['layer'] == layer]['recall'].mean()):.3f}</sup>"))
        mean, worst = float(table["recall"].mean()), table.loc[table["recall"].idxmin()]
        fig_r = self._figure(("recall", st["key"], pattern),
                             lambda: plots.recall_heatmap(table, title=f"recall of dense attention mass<br><sup>mean "
                                                                       f"{mean:.3f} · density {density:.3f}</sup>"))
        self._show(self.out_layout, fig_l)
        self._show(self.out_recall, fig_r)
        self.recall_summary.value = (
            f'<div class="nsa-recall-values" data-recall="{mean:.6f}" data-density="{density:.6f}" '
            f'style="font-size:14px;margin:6px 0"><b>{html.escape(pattern.label)}</b>: density <b>{density:.3f}</b> '
            f"of the causal area · mean recall <b>{mean:.3f}</b> (layer {layer}: {float(layer_recall.mean()):.3f}) · "
            f"worst head: layer {int(worst['layer'])} head {int(worst['head'])} at {float(worst['recall']):.3f}</div>")
        self.tune_note.value = "".join(message_html(n, "warning") for n in notes)

    # ================================================================== NSA
    def _nsa_recording(self, pattern: NSA, then):
        """The NSA selections for the current capture (cached), or None after starting their computation;
        ``then`` is called again once they are there."""
        from ..attention import nsa_kernels_available

        if not nsa_kernels_available():
            raise RuntimeError("the NSA kernels (nsa_viz.kernels.nsa) are not installed in this version: the NSA "
                               "views need them; the static patterns work without")
        st = self.state
        key = (st["key"], pattern)
        hit = self.nsa_captures.get(key)
        if hit is not None:
            return hit

        def job():
            rec = compute.nsa_capture(st["model"], st["tokenizer"], st["ids"], st["layers"], pattern,
                                      block=st["block"], progress=self._progress_fn(0, 100))
            return self.nsa_captures.put(key, rec)

        self.worker.submit(f"nsa-{id(then)}", job, lambda _r: self._guard(then), self._job_failed,
                           label="NSA selections")
        return None

    @_one_at_a_time
    def draw_explorer(self) -> None:
        if self._quiet or self.state is None:
            return
        from ..attention import nsa_kernels_available

        if not nsa_kernels_available():
            self.nsa_note.value = message_html(
                "NSA explorer: the NSA kernels (nsa_viz.kernels.nsa) are not in this installation yet, so there are no "
                "selections to show. The other panels work without them.", "warning")
            return
        st = self.state
        layer, group, query = self.w_x_layer.value, self.w_x_group.value, self.w_x_query.value
        if layer is None or group is None:
            return
        try:
            block = self.w_x_block.value
            top_n = self.w_x_top_n.value
            pattern = NSA(block=block, top_n=top_n, window=self.w_x_window.value, cmp_block=block,
                          cmp_stride=min(16, block), init_blocks=1, local_blocks=min(2, top_n - 1),
                          select_outside_window=self.w_x_outside.value)
        except ValueError as exc:
            self.nsa_note.value = message_html(str(exc), "error")
            return
        rec = self._nsa_recording(pattern, then=self.draw_explorer)
        if rec is None:
            self.nsa_note.value = message_html("computing what NSA selects on the recorded layers …", "info")
            return
        view = compute.nsa_query_view(st["rec"], rec, layer, group, query, pattern)
        fig = self._figure(("nsa", st["key"], pattern, layer, group, query), lambda: plots.nsa_selection(
            view["dense_mass"], view["importance"], view["selected"], block=block, query_pos=view["query_pos"],
            window=pattern.window,
            title=f"layer {layer}, group {group}, query {query}: {len(view['selected'])} blocks picked<br>"
                  f"<sup>NSA keeps {view['recall']:.3f} of dense attention here (picked blocks alone "
                  f"{view['recall_selected']:.3f})</sup>"))
        self._show(self.out_nsa, fig)
        self.nsa_note.value = "".join(message_html(n, "warning") for n in compute.warnings_for(pattern, st["tokens"]))
        self.nsa_tokens.value = plots.highlighted_tokens_html(
            st["token_strings"], query=query, selected=view["selected_tokens"], window=view["window_tokens"],
            weights=view["weights"], max_tokens=600)
        self.nsa_stats.value = self._selection_stats_html(rec, layer, pattern)

    def _selection_stats_html(self, rec, layer: int, pattern: NSA) -> str:
        from ..capture import selection_stats

        df = selection_stats(rec)
        df = df[(df["layer"] == layer) & (df["source"] == pattern.label)]
        if df.empty:
            return ""
        cols = ["kv_group", "forced_only", "window_only", "pick_entropy_norm", "distinct_blocks", "mean_pick_distance",
                "recall", "recall_selected"]
        table = df[[c for c in cols if c in df.columns]].to_html(index=False, float_format=lambda x: f"{x:.3f}",
                                                                 border=0)
        return ("<p><b>Collapse and diversity</b> on this layer (forced_only: queries whose picks are only the forced "
                "first/local blocks; window_only: picks that duplicate the window; pick_entropy_norm: 1 = picks "
                f"spread over all blocks)</p>{table}")

    # ================================================================== audit
    @_one_at_a_time
    def draw_audit(self) -> None:
        if self._quiet or self.state is None:
            return
        st = self.state
        rec = st["rec"]
        layer = self.w_audit_layer.value
        if layer == -1:
            fig = self._figure(("dist", st["key"]), lambda: plots.distance_curves(
                compute.distance_table(rec), series="layer", marks=[64, 256],
                title="where attention goes: share within a distance, heads averaged"))
        else:
            fig = self._figure(("dist", st["key"], layer), lambda: plots.distance_curves(
                compute.distance_table(rec, layer=layer), series="head", marks=[64, 256],
                title=f"layer {layer}: share of attention within a distance, per head"))
        self._show(self.out_distance, fig)
        summary = self.figures.get(("locality-table", st["key"]))
        if summary is None:
            summary = self.figures.put(("locality-table", st["key"]), compute.locality_summary(rec))
        metrics = [c for c in summary.columns if c not in ("layer", "head")]
        if list(self.w_audit_metric.options) != metrics:
            with self.hold_sync():
                self.w_audit_metric.options = metrics
                self.w_audit_metric.value = metrics[0]
        metric = self.w_audit_metric.value or metrics[0]
        fig2 = self._figure(("locality", st["key"], metric), lambda: plots.recall_heatmap(
            summary, value=metric, colorscale="Blues", title=f"share of each head's attention: {metric}"))
        self._show(self.out_locality, fig2)

    def run_audit(self) -> None:
        """Run ``nsa_viz.audit.audit`` over the data tab's text at the recorded length (background, cached)."""
        if self.state is None:
            self.set_message("record attention first (Data & model)", "warning")
            return
        st = self.state
        settings = self.data_settings()
        data = settings["path"] if settings["dataset"] == sources.FILE else settings["dataset"]
        n_docs = int(self.w_audit_docs.value)
        key = (st["key"], data, n_docs)
        hit = self.figures.get(("audit", key))
        if hit is not None:
            self.audit_result = hit
            self.draw_audit_result()
            return
        self.taxonomy_note.value = message_html(f"auditing {n_docs} document(s) of {st['tokens']} tokens …", "info")
        self.progress.value, self.progress.bar_style = 0, "info"

        def job():
            from .. import audit

            hooks = compute._with_progress(st["model"], self._progress_fn(0, 100), "audit forward pass")
            try:
                return audit.audit(st["model"], st["tokenizer"], data, length=st["tokens"], n_docs=n_docs,
                                   block=st["block"], rows=min(64, st["tokens"]), progress=False,
                                   model_name=str(st["model_name"]))
            finally:
                for h in hooks:
                    h.remove()

        def done(result):
            self.audit_result = self.figures.put(("audit", key), result)
            self._guard(self.draw_audit_result)

        self.worker.submit("audit", job, done, self._job_failed, label="locality audit")

    @_one_at_a_time
    def draw_audit_result(self) -> None:
        result = self.audit_result
        if result is None:
            return
        from .. import audit

        rec = audit.recommend(result, target_recall=float(self.w_audit_target.value))
        self.recommendation_pattern = rec.uniform
        meta = result.meta
        self.taxonomy_note.value = message_html(
            f"audit of {meta.get('n_docs')} document(s) of {meta.get('length')} tokens ({meta.get('dataset')}) in "
            f"{meta.get('wall_seconds', 0):.0f} s ({meta.get('cache_hits', 0)} from the cache)", "ok")
        self.recommendation.value = (f'<div style="font-size:14px;margin:6px 0"><b>Recommendation</b>: '
                                     f"{html.escape(rec.describe())}</div>")
        self.w_audit_apply.layout.display = "" if isinstance(rec.uniform, (SlidingWindow, GlobalLocal, Dilated)) else "none"
        heads = result.heads()
        self._show(self.out_taxonomy, figure_output(plots.head_taxonomy(
            heads, kind="head_class", title="head classes (nsa_viz.audit)", height=max(360, 18 * result.num_layers))))
        figs = audit.figures(result, rec)
        if "recall_vs_density" in figs:
            fig = figs["recall_vs_density"]
            fig.update_layout(template="plotly_white", height=max(360, 18 * result.num_layers))
            self._show(self.out_audit_recall, figure_output(fig))

    def _recommendation_to_tuner(self) -> None:
        p = getattr(self, "recommendation_pattern", None)
        if not isinstance(p, (SlidingWindow, GlobalLocal, Dilated)):
            return
        with self.hold_sync():
            self.w_pattern.value = type(p).__name__
            self.w_window.value = min(p.window, self.w_window.max)
            if isinstance(p, GlobalLocal):
                self.w_sink.value = min(p.sink, self.w_sink.max)
            if isinstance(p, Dilated):
                self.w_stride.value, self.w_dil_block.value = p.stride, p.block
        self.tabs.selected_index = TUNER_TAB
        self.draw_tuner()

    # ================================================================== trade-offs
    def _load_tradeoffs(self) -> None:
        files = compute.results_files(self.results_root)
        opts = [(f"benchmarks/results/{p.name}", ("benchmarks", str(p))) for p in files["benchmarks"]]
        if files["tradeoffs"]:
            opts.append(("data/results (nsa-viz bench tables)", ("tradeoffs", str(self.results_root / "data" / "results"))))
        if not opts:
            self.tradeoff_note.value = message_html(
                f"no measured results under {self.results_root} (benchmarks/results/*.json or data/results/): run "
                "`nsa-viz bench` or the GPU benchmarks", "info")
            return
        self.w_t_source.options = opts
        self.w_t_source.value = opts[0][1]
        self._tradeoff_views()

    def _tradeoff_table(self):
        kind, path = self.w_t_source.value
        key = ("table", kind, path)
        table = self.figures.get(key)
        if table is None:
            if kind == "benchmarks":
                table = compute.benchmark_table([path])
            else:
                from ..tradeoffs import add_derived, read_table

                table = add_derived(read_table(path))
            self.figures.put(key, table)
        return kind, table

    def _tradeoff_views(self) -> None:
        if self.w_t_source.value is None:
            return
        kind, table = self._tradeoff_table()
        if kind == "benchmarks":
            views = []
            names = {"ms": "time (ms)", "speedup_vs_dense": "speedup over the best dense SDPA",
                     "peak_mem_mb": "peak memory (MB)"}
            for shape in sorted(table["shape"].unique(), key=lambda x: -len(table[table["shape"] == x])):
                for p in ("fwd", "fwd_bwd", "decode"):
                    rows = table[(table["pass"] == p) & (table["shape"] == shape)]
                    for value, label in names.items():
                        if rows[value].notna().any():
                            views.append((f"{p} · {shape} · {label}", ((p, shape), value)))
        else:
            figs = plots.tradeoff_figures(table) if plots.tradeoff_figures else {}
            views = [(name.replace("_", " "), ("tradeoffs", name)) for name in figs]
        if not views:
            self.tradeoff_note.value = message_html("this results table has nothing to draw", "warning")
            return
        self.w_t_view.options = views
        self.w_t_view.value = views[0][1]
        self.draw_tradeoffs()

    @_one_at_a_time
    def draw_tradeoffs(self) -> None:
        if self.w_t_view.value is None or self.w_t_source.value is None:
            return
        kind, table = self._tradeoff_table()
        what, value = self.w_t_view.value
        key = ("tradeoff-fig", self.w_t_source.value, what, value)
        if kind == "benchmarks":
            pass_, shape = what
            label = {"ms": "time", "speedup_vs_dense": "speedup over dense", "peak_mem_mb": "peak memory"}.get(value, value)
            fig = self._figure(key, lambda: plots.benchmark_speed(
                table, pass_=pass_, value=value, shape=shape,
                title=f"attention {pass_.replace('_', '+')}: {label} against length"))
        else:
            fig = self._figure(key, lambda: plots.tradeoff_figures(table)[value])
        self.tradeoff_note.value = ""
        self._show(self.out_tradeoff, fig)


def _default_loader(name):
    from ..models import load_model

    try:  # transformers' own progress bars would print into the page
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass
    return load_model(name)


def _describe(exc: BaseException) -> str:
    """One readable line for a failure (the message, and the kind when the message alone is unclear)."""
    from ..capture import CaptureBudgetError

    msg = str(exc).strip() or exc.__class__.__name__
    if isinstance(exc, CaptureBudgetError):
        return f"too much to record: {msg}"
    if isinstance(exc, (ValueError, TypeError)):
        return msg
    if isinstance(exc, (FileNotFoundError, OSError)):
        return f"cannot read: {msg}"
    return f"{exc.__class__.__name__}: {msg}"


__all__ = ["Dashboard", "figure_output", "message_html", "repository_root"]
