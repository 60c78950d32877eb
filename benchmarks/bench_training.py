"""Training with native sparsity, measured: SmolLM2 retrofit perplexity at 4k, and dense vs NSA from scratch.

    # 1. retrofit SmolLM2 (frozen) with trainable NSA, perplexity at 4k on held-out code and docs
    python benchmarks/bench_training.py retrofit --threads 1 \\
        --out benchmarks/results/training_retrofit_cpu.json
    # 2. a tiny Llama-style model from scratch, dense vs NSA (same data, initial weights, batches, seed)
    python benchmarks/bench_training.py scratch --threads 1 --seeds 0 \\
        --out benchmarks/results/training_scratch_cpu.json --figure docs/training_scratch_cpu.html
    # both at toy sizes (a smoke test, minutes): add --small

**retrofit.** NSA (default: the paper's l'=64, n=16, w=512, l=32, d=16, gated) in all 30 layers of
SmolLM2-135M; only the NSA parameters (compression MLPs, gates) train, by layer-wise attention transfer
with selection distillation (``nsa_viz.training.retrofit_train``, ``objective="transfer"``,
``selection_weight=1``) on windows of ``--train-len`` tokens of code + docs. Text: each dataset's documents
in seeded order, tokenised, cut 90 / 10: training windows come from the first 90 %, evaluation windows
(``--eval-windows`` consecutive windows of ``--eval-len`` tokens) from the held-out last 10 %, i.e. whole
documents that training never saw (except the one document cut in two at the boundary). Perplexity
rows: dense (the model's own attention), NSA training-free (``union``: one softmax over selected blocks
and window, mean-pooled compression), NSA retrofitted, and with ``--with-gated-init`` NSA gated at
initialisation (where training starts).
The dense forward of each evaluation window runs once and is shared by all rows.

**scratch.** ``nsa_viz.training.compare_from_scratch``: a byte-level Llama (2 layers, hidden 128, 4/2
heads) trained with dense attention and with gated NSA (compression and gates learn with the model).
Curves (training loss per step, validation loss every ``eval_every`` steps, wall seconds) go to the JSON;
``--figure`` writes a plotly HTML (loss against step and against seconds; plotly.js from its CDN) and,
when Chromium and Playwright are installed, a PNG beside it.

Both parts checkpoint (under ``--checkpoint-dir``) and resume: rerun the same command after an interruption.
The JSON is rewritten after every stage, so a cut run keeps what it measured. ``--time-budget-min`` stops
retrofit training at a checkpoint when the budget is spent; the evaluation then uses that checkpoint and
the JSON says how many of the planned steps ran.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # last: the root's kernels/ must not shadow Hugging Face's `kernels` (common.py)

from nsa_viz.patterns import NSA  # noqa: E402
from nsa_viz.tradeoffs import environment  # noqa: E402

DATASETS = ("code", "docs")
PAPER_NSA = NSA(block=64, top_n=16, window=512, cmp_block=32, cmp_stride=16, combine="gated")
SMALL_NSA = NSA(block=16, top_n=4, window=32, cmp_block=8, cmp_stride=4, combine="gated")
SCRATCH_NSA = NSA(block=16, top_n=4, window=32, cmp_block=16, cmp_stride=8, combine="gated")


class BudgetSpent(Exception):
    """Raised by :class:`_Budgeted` when the training time budget is used up."""


class _Budgeted:
    """A TokenStream that refuses to hand out a batch once ``seconds`` have passed since it was made,
    so training stops between steps (after the last checkpoint it wrote)."""

    def __init__(self, stream, seconds: float):
        self.stream, self.deadline = stream, time.monotonic() + seconds

    def batch(self, step, *args, **kwargs):
        if time.monotonic() > self.deadline:
            raise BudgetSpent(step)
        return self.stream.batch(step, *args, **kwargs)


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def _records(df) -> list:
    """DataFrame rows as plain dicts without NaN (JSON has no NaN)."""
    import math

    out = []
    for row in df.to_dict("records"):
        out.append({k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))})
    return out


def _meta(args, part: str) -> dict:
    env = environment("cpu" if args.device == "cpu" else args.device)
    env.update(part=part, threads=torch.get_num_threads(),
               command="python benchmarks/bench_training.py " + " ".join(sys.argv[1:]),
               note="wall-clock seconds on a CPU shared with other jobs (load_avg at start); indicative only")
    return env


# --------------------------------------------------------------------------- 1. retrofit
def run_retrofit(args) -> dict:
    from nsa_viz import load_model
    from nsa_viz.nsa_module import NSARetrofit
    from nsa_viz.training import (RetrofitConfig, TokenStream, load_checkpoint, retrofit_perplexity,
                                  retrofit_train)

    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() and not args.fresh else {}
    earlier = doc.get("meta", {})
    doc["meta"] = _meta(args, "retrofit")
    # a rerun adds rows (e.g. --with-gated-init) to the same file: keep every command that wrote to it
    doc["meta"]["commands"] = earlier.get("commands", [earlier["command"]] if "command" in earlier else []) + \
        [doc["meta"]["command"]]
    doc.setdefault("perplexity", [])
    spec = SMALL_NSA if args.small else PAPER_NSA
    model, tokenizer = load_model(args.model, device=args.device)
    streams = {name: TokenStream.from_dataset(name, tokenizer, max_chars=args.max_chars, seed=args.seed)
               for name in args.datasets}
    train_stream = TokenStream.combine(list(streams.values()))
    windows = {name: s.windows(args.eval_windows, args.eval_len, split="val") for name, s in streams.items()}
    doc["data"] = {name: {"train_tokens": int(s.train.numel()), "heldout_tokens": int(s.val.numel()),
                          "eval": f"{args.eval_windows} consecutive windows of {args.eval_len} tokens from the "
                                  f"start of the held-out tail (last 10 % of the tokens: whole documents not in "
                                  f"the training part, except the one cut at the boundary)"}
                   for name, s in streams.items()}
    doc["nsa"] = dataclasses.asdict(spec)
    cfg = RetrofitConfig(steps=args.steps, seq_len=args.train_len, objective="transfer",
                         transfer_queries=min(args.transfer_queries, args.train_len), selection_weight=1.0,
                         lr=args.lr, warmup=max(1, args.steps // 10), monitor_every=max(1, args.steps // 6),
                         checkpoint_every=1, seed=args.seed)
    doc["train_config"] = dataclasses.asdict(cfg)
    _write(out, doc)
    dense_cache = {name: [None] * len(w) for name, w in windows.items()}
    done = {(r["dataset"], r["label"]) for r in doc["perplexity"]}

    def evaluate(label, retro):
        for name, wins in windows.items():
            if (name, label) in done:
                print(f"[skip] {name} / {label}: already in {out}")
                continue
            df = retrofit_perplexity(model, retro, wins, label=label, dense_hidden=dense_cache[name],
                                     progress=not args.no_progress)
            pooled = df.iloc[-1].to_dict()
            row = {"dataset": name, "label": label, "length": args.eval_len, "windows": len(wins),
                   **{k: pooled[k] for k in ("tokens", "ppl", "dense_ppl", "ppl_ratio", "kl_vs_dense",
                                             "top1_agree", "seconds")},
                   "per_window_ppl": [float(x) for x in df["ppl"].iloc[:-1]]}
            doc["perplexity"].append(row)
            done.add((name, label))
            _write(out, doc)
            print(f"{name:5s} {label:28s} ppl {row['ppl']:.3f} dense {row['dense_ppl']:.3f} "
                  f"ratio {row['ppl_ratio']:.4f} KL {row['kl_vs_dense']:.4f}")

    torch.manual_seed(args.seed)
    union = NSARetrofit(model, dataclasses.replace(spec, combine="union"), learn_compression=False)
    evaluate("NSA training-free (union)", union)
    torch.manual_seed(args.seed)
    retro = NSARetrofit(model, spec)
    if args.with_gated_init:
        evaluate("NSA gated at init", retro)

    ckdir = Path(args.checkpoint_dir) / "retrofit"
    t0 = time.perf_counter()
    try:
        hist = retrofit_train(model, retro, _Budgeted(train_stream, args.time_budget_min * 60), cfg,
                              checkpoint_dir=ckdir, progress=not args.no_progress)
        stopped = None
    except BudgetSpent as exc:
        stopped = int(exc.args[0])
        print(f"time budget of {args.time_budget_min} min spent before step {stopped + 1}; "
              f"evaluating the checkpoint")
    state = load_checkpoint(ckdir / "checkpoint.pt", module=retro)
    history = state["history"]
    calls = doc.get("training", {}).get("calls", [])
    steps_before = doc.get("training", {}).get("steps_done", 0)
    calls.append({"steps_run": int(state["step"]) - steps_before, "wall_seconds": time.perf_counter() - t0})
    doc["training"] = {"steps_done": int(state["step"]), "steps_planned": cfg.steps,
                       "stopped_by_budget": stopped is not None,
                       "train_seconds": float(sum(r["seconds"] for r in history)),
                       "calls": calls,
                       "trainable_parameters": sum(p.numel() for p in retro.parameters()),
                       "history": history}
    _write(out, doc)
    label = f"NSA retrofitted ({state['step']} steps)"
    evaluate(label, retro)
    return doc


# --------------------------------------------------------------------------- 2. from scratch
def run_scratch(args) -> dict:
    from nsa_viz.training import ScratchConfig, TokenStream, compare_from_scratch

    out = Path(args.out)
    doc = {"meta": _meta(args, "scratch"), "runs": []}
    chars = args.max_chars // 2
    stream = TokenStream.combine([TokenStream.from_dataset(name, max_chars=chars, seed=0) for name in DATASETS])
    doc["data"] = (f"bytes (vocabulary 256) of code + docs, {chars} characters each, cut 90/10; validation "
                   f"batches from the held-out 10 %; train tokens {stream.train.numel()}, held out "
                   f"{stream.val.numel()}")
    spec = SMALL_NSA if args.small else SCRATCH_NSA
    doc["nsa"] = dataclasses.asdict(spec)
    for seed in args.seeds:
        if args.small:
            cfg = ScratchConfig(steps=args.steps or 12, seq_len=128, batch_size=2, hidden_size=64, num_heads=2,
                                num_kv_heads=1, intermediate_size=128, eval_every=4, eval_batches=1,
                                monitor_every=4, checkpoint_every=4, saturation_weight=1.0, seed=seed)
        else:
            cfg = ScratchConfig(steps=args.steps or 200, seq_len=512, batch_size=4, hidden_size=128, num_heads=4,
                                num_kv_heads=2, intermediate_size=384, num_layers=2, eval_every=20,
                                monitor_every=10, eval_batches=4, checkpoint_every=10, lr=3e-3,
                                saturation_weight=1.0, seed=seed)
        curves = compare_from_scratch(stream, spec, cfg, checkpoint_dir=Path(args.checkpoint_dir) / f"scratch_s{seed}",
                                      progress=not args.no_progress, device=args.device)
        for label, hist in curves.items():
            val = hist.dropna(subset=["val_loss"])
            run = {"label": label, "seed": seed, "config": dataclasses.asdict(cfg), "steps": int(len(hist)),
                   "train_seconds": float(hist["elapsed"].iloc[-1]),
                   "final_val_loss": float(val["val_loss"].iloc[-1]),
                   "final_train_loss_10": float(hist["lm_loss"].tail(10).mean()),
                   "curve": _records(hist[[c for c in hist.columns if c != "attention"]])}
            doc["runs"] = [r for r in doc["runs"] if (r["label"], r["seed"]) != (label, seed)] + [run]
            print(f"seed {seed} {label:5s}: {run['steps']} steps, {run['train_seconds']:.0f} s, final validation "
                  f"loss {run['final_val_loss']:.3f} nats/byte")
        _write(out, doc)
    if args.figure:
        write_figure(doc, Path(args.figure))
    return doc


def curves_figure(doc: dict):
    """Plotly figure from a scratch JSON: loss against step (left) and against wall seconds (right);
    training loss as a 10-step mean (lines), validation loss (markers)."""
    import pandas as pd
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss per step", "loss per second of training"),
                        shared_yaxes=True, horizontal_spacing=0.06)
    colors = {"dense": "#1f77b4", "nsa": "#d62728"}
    dashes = ["solid", "dot", "dash"]
    for run in doc["runs"]:
        df = pd.DataFrame(run["curve"])
        name = f"{run['label']} seed {run['seed']}"
        color, dash = colors.get(run["label"], None), dashes[int(run["seed"]) % len(dashes)]
        smooth = df["lm_loss"].rolling(10, min_periods=1).mean()
        val = df.dropna(subset=["val_loss"]) if "val_loss" in df else df.iloc[:0]
        for col, x, xv in ((1, df["step"], val["step"]), (2, df["elapsed"], val["elapsed"])):
            fig.add_trace(go.Scatter(x=x, y=smooth, mode="lines", line=dict(color=color, dash=dash),
                                     name=f"{name} train (10-step mean)", legendgroup=name + "t",
                                     showlegend=col == 1), row=1, col=col)
            fig.add_trace(go.Scatter(x=xv, y=val["val_loss"], mode="markers", marker=dict(color=color, size=6),
                                     name=f"{name} validation", legendgroup=name + "v", showlegend=col == 1),
                          row=1, col=col)
    meta = doc["meta"]
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_xaxes(title_text="seconds (wall)", row=1, col=2)
    fig.update_yaxes(title_text="loss (nats/byte)", row=1, col=1)
    fig.update_layout(title=f"tiny Llama from scratch, dense vs NSA — {meta['device']}, torch {meta['torch']}, "
                            f"{meta['date']}", width=1100, height=450, template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    return fig


def write_figure(doc: dict, path: Path) -> None:
    """``path`` (.html, plotly.js inline so it opens offline) and a PNG beside it when a headless
    Chromium can be driven by Playwright (no plotly image engine is installed here)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fig = curves_figure(doc)
    fig.write_html(str(path), include_plotlyjs="cdn", full_html=True)   # small file; needs the CDN to view
    png = path.with_suffix(".png")
    try:
        from playwright.sync_api import sync_playwright

        offline = Path(tempfile.mkdtemp(prefix="nsa_viz_fig_")) / "figure.html"
        fig.write_html(str(offline), include_plotlyjs=True, full_html=True)   # no network here

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                              "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1120, "height": 470})
            page.goto(offline.as_uri())
            page.wait_for_selector(".main-svg")
            page.locator(".js-plotly-plot").first.screenshot(path=str(png))
            browser.close()
        print(f"figure: {path} and {png}")
    except Exception as exc:  # the PNG is a convenience for the README; the HTML is the figure
        print(f"figure: {path} (no PNG: {type(exc).__name__}: {exc})")


# --------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["retrofit", "scratch", "figure"],
                    help="what to run ('figure': redraw --figure from an existing scratch --out JSON)")
    ap.add_argument("--out", required=True, help="results JSON (rewritten after every stage)")
    ap.add_argument("--small", action="store_true", help="toy sizes: a smoke test in minutes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy shared CPU)")
    ap.add_argument("--checkpoint-dir", default=str(ROOT / ".cache" / "bench_training"))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--max-chars", type=int, default=1_000_000, help="characters of text per dataset")
    ap.add_argument("--fresh", action="store_true", help="retrofit: ignore rows already in --out")
    # retrofit
    ap.add_argument("--model", default=None, help="model folder / GGUF / hub id (default SmolLM2-135M-Instruct)")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--eval-len", type=int, default=4096)
    ap.add_argument("--eval-windows", type=int, default=1)
    ap.add_argument("--train-len", type=int, default=2048)
    ap.add_argument("--transfer-queries", type=int, default=256,
                    help="train on the last N positions of each window (every key still counts)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--time-budget-min", type=float, default=25.0, help="retrofit training wall-time budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-gated-init", action="store_true",
                    help="also evaluate gated NSA before training (costs one more NSA forward per window)")
    # scratch
    ap.add_argument("--steps", type=int, default=None, help="training steps (retrofit default 40, scratch 200)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--figure", default=None, help="scratch: write the loss-curve figure here (.html, + .png)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "figure":
        if not args.figure:
            ap.error("figure needs --figure")
        write_figure(json.loads(Path(args.out).read_text()), Path(args.figure))
        return 0
    if args.part == "retrofit":
        if args.small:
            args.eval_len, args.train_len = min(args.eval_len, 256), min(args.train_len, 128)
            args.transfer_queries, args.eval_windows = min(args.transfer_queries, 64), 1
            args.max_chars = min(args.max_chars, 100_000)
        args.steps = args.steps or (4 if args.small else 40)
        run_retrofit(args)
    else:
        if args.small:
            args.max_chars = min(args.max_chars, 100_000)
        run_scratch(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
