"""Where NSA's time goes on a GPU, kernel by kernel (torch.profiler), for the two issue-3 targets still missed.

1. Decoding one token (checked against the oracle first) (``nsa_decode`` + ``NSACache``, union/token, 64/4 heads, d=128, bf16) against a cache
   of 8k and 64k: per-kernel GPU time of one eager step, the step's CUDA-graph time and dense cuDNN's.
   The graph time minus the summed kernel time is what launching and waiting cost.
2. The 64k union/token forward: per-kernel GPU time (scoring, top-n, selected+window, compression).

    python benchmarks/profile_nsa.py [--smoke]

Prints the tables and writes benchmarks/results/nsa_profile_<gpu>.json (and $OUT).
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch
import torch.nn.functional as F

from common import ROOT, bench_ms, capture_graph, environment, gpu_slug, rel_err, write_rows
from nsa_viz.kernels.nsa import nsa_attention
from nsa_viz.kernels.nsa_decode import NSACache, nsa_decode
from nsa_viz.kernels.nsa_ref import nsa_attention_reference

PARAMS = dict(block=64, top_n=16, window=512, cmp_block=32, cmp_stride=16, combine="union", granularity="token")


def kernel_table(fn, device, steps: int = 5) -> list:
    """[(kernel name, GPU microseconds per call, launches per call)] of ``fn``, largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    total, count = collections.Counter(), collections.Counter()
    for e in prof.events():
        if device.type == "cuda" and e.device_type.name != "CUDA":
            continue
        if device.type != "cuda" and not e.name.startswith("aten::"):
            continue
        us = e.device_time if device.type == "cuda" else e.cpu_time
        total[e.name[:90]] += us
        count[e.name[:90]] += 1
    return [(name, total[name] / steps, count[name] / steps) for name, _ in total.most_common(25)]


def show(title: str, table: list) -> None:
    print(f"\n{title}\n{'us/call':>9} {'launches':>8}  kernel", flush=True)
    for name, us, n in table:
        print(f"{us:9.1f} {n:8.1f}  {name}", flush=True)
    print(f"{sum(us for _, us, _ in table):9.1f} {sum(n for _, _, n in table):8.1f}  (sum)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    hq, hkv, d = (4, 2, 32) if args.smoke else (64, 4, 128)
    rows = []
    env = environment(device)
    for t in ([700] if args.smoke else [8192, 65536]):
        kc, vc = (torch.randn(1, t, hkv, d, device=device, dtype=dtype) for _ in range(2))
        q1 = torch.randn(1, 1, hq, d, device=device, dtype=dtype)
        cache = NSACache(PARAMS["cmp_block"], PARAMS["cmp_stride"])
        cache.update(kc, vc)
        cache.queries_until = t - 1
        step = lambda: nsa_decode(q1, kc, vc, cache, **PARAMS)
        with torch.no_grad():
            got, aux = nsa_decode(q1, kc, vc, cache, **PARAMS, return_aux=True)
            want, want_aux = nsa_attention_reference(q1, kc, vc, **PARAMS, return_aux=True)
            err = rel_err(got, want)
            same = bool(torch.equal(aux["block_idx"], want_aux["block_idx"]))
            print(f"T={t}: decode vs oracle rel err {err:.1e}, identical blocks {same}", flush=True)
            table = kernel_table(step, device)
            show(f"decode one token, T={t}: kernels of one eager step", table)
            row = dict(env, op="decode", T=t, kernels=table, rel_err_vs_oracle=err, identical_blocks=same)
            if device.type == "cuda":
                graph = capture_graph(step)
                row["graph_ms"] = bench_ms(graph.replay)
                from torch.nn.attention import SDPBackend, sdpa_kernel
                qt, kt, vt = q1.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)

                def dense():
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
                row["dense_cudnn_ms"] = bench_ms(dense)
                print(f"graph {row['graph_ms'] * 1e3:.1f} us, dense cuDNN {row['dense_cudnn_ms'] * 1e3:.1f} us", flush=True)
        rows.append(row)
    t = 640 if args.smoke else 65536
    q, k, v = (torch.randn(1, t, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    with torch.no_grad():
        table = kernel_table(lambda: nsa_attention(q, k, v, **PARAMS), device, steps=2)
    show(f"union/token forward, T={t}: kernels", table)
    rows.append(dict(env, op="forward", T=t, kernels=table))
    write_rows(rows, ROOT / "benchmarks" / "results" / f"nsa_profile_{gpu_slug(device)}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
