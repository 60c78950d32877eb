"""What the selection settings that SmolLM2 needs cost on a GPU (issue 4's accuracy fix, timed for issue 3).

On SmolLM2 at 4k (benchmarks/NOTES.md, run 6) NSA union reaches dense perplexity only with
``select_outside_window=True`` and keys compressed over 4 tokens (``cmp_block = cmp_stride = 4``) instead
of the paper's 32/16: the compressed keys, the scoring work and its bytes grow 4x. This times, in one run,
the union forward (token and block granularity) of

- ``paper``: cmp 32/16 (the issue-3 configuration),
- ``outside``: cmp 32/16 + select_outside_window,
- ``fine``: cmp 4/4 + select_outside_window,

against dense SDPA (cuDNN, its best backend here) for two shapes: 64/4 heads d=128 (issue 3's) and
SmolLM2's 9/3 d=64; B=1, bf16, n=16, l'=64, w=512, T = 8k..64k. First it checks the Triton path against
the PyTorch oracle on the GPU for the two new settings (identical selections, output error).

    python benchmarks/bench_nsa_selection.py [--lengths 8192 16384 32768 65536] [--smoke]

Rows go to benchmarks/results/nsa_selection_<gpu>.json (and $OUT); a table is printed last.
``--smoke``: toy sizes on the CPU (TRITON_INTERPRET=1) to test the script.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from common import ROOT, bench_ms, environment, gpu_slug, rel_err, write_rows
from nsa_viz.kernels.nsa import nsa_attention
from nsa_viz.kernels.nsa_ref import nsa_attention_reference

SETTINGS = {
    "paper": dict(cmp_block=32, cmp_stride=16),
    "outside": dict(cmp_block=32, cmp_stride=16, select_outside_window=True),
    "fine": dict(cmp_block=4, cmp_stride=4, select_outside_window=True),
}
SHAPES = {"64/4/128": (64, 4, 128), "9/3/64": (9, 3, 64)}
BUDGET_S = 420


def check(device, dtype, t, hq, hkv, d) -> list:
    """Triton vs the oracle for the two new settings (token and block granularity)."""
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, t, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    for name in ("outside", "fine"):
        for gran in ("token", "block"):
            kw = dict(block=64, top_n=16, window=512, granularity=gran, **SETTINGS[name])
            with torch.no_grad():
                out, aux = nsa_attention(q, k, v, **kw, return_aux=True)
                ref, ref_aux = nsa_attention_reference(q, k, v, **kw, return_aux=True)
            same = float((aux["block_idx"] == ref_aux["block_idx"]).all(-1).float().mean())
            rows.append({"setting": name, "granularity": gran, "T": t, "rows_with_identical_selection": same,
                         "rel_err_out": rel_err(out, ref)})
            print(f"check {name}/{gran} T={t}: identical selections {same:.4f}, rel err {rows[-1]['rel_err_out']:.2e}",
                  flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384, 32768, 65536])
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    lengths = [640] if args.smoke else args.lengths
    env = environment(device)
    checks = check(device, dtype, 640 if args.smoke else 2048, 4, 2, 32 if args.smoke else 64)
    rows = []
    for shape, (hq, hkv, d) in SHAPES.items():
        for t in lengths:
            if time.time() - t0 > BUDGET_S:
                print(f"budget: skipping {shape} T={t}", flush=True)
                continue
            q, k, v = (torch.randn(1, t, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
            base = dict(op="nsa_union_fwd", shape=shape, HQ=hq, HKV=hkv, D=d, T=t, B=1, dtype=str(dtype), **env)
            if device.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

                def dense():
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                try:
                    rows.append(dict(base, impl="sdpa_cudnn", setting="dense", granularity="", ms=bench_ms(dense)))
                except Exception as exc:  # noqa: BLE001 - a missing backend is a row, not a crash
                    print(f"dense {shape} T={t}: {exc}", flush=True)
            for name, extra in SETTINGS.items():
                for gran in ("token", "block"):
                    kw = dict(block=64, top_n=16, window=512, granularity=gran, **extra)
                    with torch.no_grad():
                        ms = bench_ms(lambda: nsa_attention(q, k, v, **kw), warmup_ms=20 if args.smoke else 100,
                                      rep_ms=20 if args.smoke else 400)
                    rows.append(dict(base, impl="nsa_viz", setting=name, granularity=gran, params=kw, ms=ms))
            del q, k, v
    out = write_rows([{"kind": "check", **r} for r in checks] + rows,
                     ROOT / "benchmarks" / "results" / f"nsa_selection_{gpu_slug(device)}.json")
    dense = {(r["shape"], r["T"]): r["ms"] for r in rows if r["impl"] == "sdpa_cudnn"}
    print(f"\nshape     T      setting  gran    ms       vs dense   ({out})")
    for r in rows:
        base = dense.get((r["shape"], r["T"]))
        ratio = f"{base / r['ms']:.2f}x" if base else ""
        print(f"{r['shape']:9s} {r['T']:<6d} {r['setting']:8s} {r['granularity']:6s} {r['ms']:8.3f} {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
