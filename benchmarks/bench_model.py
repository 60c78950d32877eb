"""SmolLM2 accuracy and prefill time per pattern against its own attention, on this machine's CPU (or GPU).

    python benchmarks/bench_model.py --lengths 1024 2048 --out benchmarks/results/smollm2_accuracy_cpu.json

For each length: perplexity on the Python reference manual (``pydoc_data``) and on standard-library
source, mean KL(dense || pattern) of the next-token distributions, top-1 agreement with dense, and the
wall time of the forward pass (``nsa_viz.accuracy.perplexity_table``); optionally passkey accuracy
(``--passkey``) and NSA selection statistics from a capture (``--capture``). Writes one JSON file of
tidy rows (``{"meta": ..., "perplexity": [...], "passkey": [...], "selection": [...]}``) and prints tables.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nsa_viz import NSA, Dense, GlobalLocal, SlidingWindow, load_model  # noqa: E402
from nsa_viz.accuracy import default_filler, passkey_table, perplexity_table  # noqa: E402

PATTERNS = {
    "model (sdpa)": None,
    "Dense (nsa_viz)": Dense(),
    "SlidingWindow(256)": SlidingWindow(256),
    "SlidingWindow(512)": SlidingWindow(512),
    "GlobalLocal(w=256, sink=4)": GlobalLocal(window=256, sink=4),
    "NSA union n16 l'64 w512": NSA(block=64, top_n=16, window=512),
    "NSA union per-block n16 l'64 w512": NSA(block=64, top_n=16, window=512, granularity="block"),
    "NSA union n8 l'64 w256": NSA(block=64, top_n=8, window=256),
}


def stdlib_text(min_chars: int) -> str:
    """Standard-library source, modules in sorted order, until ``min_chars`` characters."""
    import glob
    import sysconfig

    out, n = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        out.append(text)
        n += len(text)
        if n >= min_chars:
            break
    return "\n\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--texts", nargs="+", default=["pydoc"], choices=["pydoc", "stdlib"])
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), help="labels of PATTERNS to run")
    ap.add_argument("--passkey", action="store_true", help="also passkey accuracy (3 depths x --trials)")
    ap.add_argument("--passkey-patterns", nargs="+", default=None, help="labels for passkey (default: --patterns)")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--capture", action="store_true", help="NSA selection statistics at the longest length")
    ap.add_argument("--skip-perplexity", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/smollm2_accuracy_cpu.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import pandas as pd

    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    model, tok = load_model(device=args.device)
    pats = {k: PATTERNS[k] for k in args.patterns}
    texts = {}
    if "pydoc" in args.texts:
        texts["pydoc"] = default_filler()[: 12 * max(args.lengths)]
    if "stdlib" in args.texts:
        texts["stdlib"] = stdlib_text(12 * max(args.lengths))
    result = {"meta": {"device": str(torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "model": "SmolLM2-135M-Instruct (GGUF, float32)",
                       "patterns": {k: (None if v is None else v.label) for k, v in pats.items()}}}
    t0 = time.time()

    def save():  # after every stage, so that a long run interrupted later keeps what it measured
        result["meta"]["seconds_total"] = round(time.time() - t0, 1)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    if not args.skip_perplexity:
        ppl = perplexity_table(model, tok, texts, pats, args.lengths)
        result["perplexity"] = ppl.to_dict("records")
        save()
        print(ppl.drop(columns=["nll"]).to_string(index=False), flush=True)
    if args.passkey:
        pk_pats = {k: PATTERNS[k] for k in (args.passkey_patterns or args.patterns)}
        pk = passkey_table(model, tok, pk_pats, args.lengths, depths=(0.1, 0.5, 0.9), trials=args.trials)
        result["passkey"] = pk.to_dict("records")
        save()
        print(pk.groupby(["length", "pattern"], sort=False).correct.mean().unstack(0).to_string(), flush=True)
    if args.capture:
        from nsa_viz.capture import capture, selection_stats

        n = max(args.lengths)
        ids = tok(texts[next(iter(texts))], return_tensors="pt").input_ids[:, :n].to(args.device)
        nsas = [p for p in pats.values() if isinstance(p, NSA)]
        with torch.no_grad(), capture(model, layers=[0, 3, 7, 11, 15, 19, 23, 27, 29], compare=nsas,
                                      budget_bytes=2**31) as rec:
            model.get_decoder()(input_ids=ids, use_cache=False)
        st = selection_stats(rec)
        result["selection"] = st.to_dict("records")
        print(st.groupby("source").mean(numeric_only=True).drop(columns=["layer", "kv_group"]).to_string(), flush=True)
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
