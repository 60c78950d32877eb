"""Decoding one token with NSA against dense SDPA decoding (issue 3's decode target), on a GPU.

For each GQA shape and cache length T: the step through ``nsa_decode`` with its ``NSACache`` (union and gated,
per-token selection, n=16, l'=64, w=512, compression 32/16), checked against the oracle first (identical blocks, output
error), then timed eager and captured in one CUDA graph; the general decode chain (the one-token path switched
off) beside it; dense SDPA decoding with each backend, eager and in a CUDA graph (the best is the baseline).
At the longest T, the kernels of one eager step (torch.profiler).

    python benchmarks/bench_nsa_decode.py [--smoke] [--lengths 8192 65536] [--configs 64/4/128 9/3/64]

Writes benchmarks/results/nsa_decode_<gpu>[_b<batch>].json (and $OUT) and prints a table last.
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import (ROOT, bench_ms, capture_graph, dense_decode_steps, environment, gpu_slug, rel_err, temporarily,
                    write_rows)
from nsa_viz.kernels import nsa_decode_kernels
from nsa_viz.kernels.nsa_decode import NSACache, nsa_decode
from nsa_viz.kernels.nsa_ref import nsa_attention_reference
from profile_nsa import kernel_table, show

PARAMS = dict(block=64, top_n=16, window=512, cmp_block=32, cmp_stride=16, combine="union", granularity="token")


def timed(step, graph: bool) -> float:
    if not graph:
        return bench_ms(step)
    g = capture_graph(step)
    return bench_ms(g.replay)


def sweep_launches(step, rows: list, base: dict) -> None:
    """Graph time of the one-token step per (warps, stages) of its two main kernels, one changed at a time."""
    for name, options in (("scores", [(2, 1), (4, 1), (8, 1)]), ("select", [(2, 1), (4, 1), (4, 2), (8, 1)])):
        for warps, stages in options:
            with temporarily((nsa_decode_kernels.TOKEN_DECODE_LAUNCH, name, (warps, stages))):
                ms = timed(step, graph=True)
            rows.append(dict(base, impl="nsa_viz_token_decode", mode="graph", sweep=name, warps=warps, stages=stages,
                             ms=ms))
            print(f"  sweep {name} warps={warps} stages={stages}: {ms * 1e3:.1f} us", flush=True)


def time_nsa(step, graph: bool, chain: bool = True) -> tuple:
    """(one-token path ms, general decode chain ms or None) of the same step."""
    fast = timed(step, graph)
    if not chain:
        return fast, None
    with temporarily((nsa_decode_kernels, "TOKEN_DECODE_MAX_BLOCKS", 0)):  # the general decode chain
        return fast, timed(step, graph)


def stacked_layers(q1, kc, vc, params: dict, layers: int) -> dict:
    """Per-layer graph time of ``layers`` decode steps captured in ONE graph, each over its own cache (the first
    is ``kc``/``vc``, the others fresh random ones): how a model's whole token step runs (one graph for all
    layers), so the graph launch is shared. {"nsa": ms, dense backend: ms}."""
    stack = [(kc, vc)] + [(torch.randn_like(kc), torch.randn_like(vc)) for _ in range(layers - 1)]
    caches = []
    for k_l, v_l in stack:
        caches.append(NSACache(PARAMS["cmp_block"], PARAMS["cmp_stride"]))
        caches[-1].update(k_l, v_l)
        caches[-1].queries_until = kc.shape[1] - 1
    per_layer = {"nsa": timed(lambda: [nsa_decode(q1, k_l, v_l, cache, **params)
                                       for (k_l, v_l), cache in zip(stack, caches)], graph=True) / layers}
    dense = [dense_decode_steps(q1, k_l, v_l) for k_l, v_l in stack]
    for name in dense[0]:
        try:
            per_layer[name] = timed(lambda: [steps[name]() for steps in dense], graph=True) / layers
        except Exception as exc:  # a backend may refuse the shape or the capture
            print(f"  {name} x{layers}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    return per_layer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (TRITON_INTERPRET=1): checks only")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--configs", nargs="+", default=["64/4/128", "32/8/128", "9/3/64"], help="HQ/HKV/D")
    ap.add_argument("--combines", nargs="+", default=["union", "gated"], choices=["union", "gated"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--skip-chain", action="store_true", help="do not time the general decode chain")
    ap.add_argument("--layers", type=int, default=1, help="also time this many layers' steps in one graph (each "
                    "over its own cache; per-layer time), as a model's token step runs")
    ap.add_argument("--sweep", action="store_true", help="also time launch settings of the one-token kernels "
                    "(first config and combine, longest T)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    lengths = [700, 1500] if args.smoke else args.lengths
    configs = ["4/2/32"] if args.smoke else args.configs
    env = environment(device)
    rows, table = [], []
    for config in configs:
        hq, hkv, d = (int(x) for x in config.split("/"))
        for t in lengths:
            torch.manual_seed(t)
            kc, vc = (torch.randn(args.batch, t, hkv, d, device=device, dtype=dtype) for _ in range(2))
            q1 = torch.randn(args.batch, 1, hq, d, device=device, dtype=dtype)
            dense = {}
            for combine in args.combines:
                params = dict(PARAMS, combine=combine,
                              gates=torch.rand(args.batch, 1, hq, 3, device=device) if combine == "gated" else None)
                cache = NSACache(PARAMS["cmp_block"], PARAMS["cmp_stride"])
                cache.update(kc, vc)  # what the prefill and the earlier steps left: all complete blocks compressed
                cache.queries_until = t - 1
                step = lambda: nsa_decode(q1, kc, vc, cache, **params)
                base = dict(env, op="decode", config=config, HQ=hq, HKV=hkv, D=d, T=t, B=args.batch, dtype=str(dtype),
                            **{k: v for k, v in params.items() if k != "gates"})
                with torch.no_grad():
                    got, aux = nsa_decode(q1, kc, vc, cache, **params, return_aux=True)
                    want, want_aux = nsa_attention_reference(q1, kc, vc, **params, return_aux=True)
                    err = rel_err(got, want)
                    same = float((aux["block_idx"] == want_aux["block_idx"]).all(-1).float().mean())
                    print(f"{config} T={t} {combine}: one-token path vs oracle rel err {err:.1e}, rows with identical "
                          f"blocks {same:.3f}", flush=True)
                    if device.type != "cuda":
                        assert same == 1.0 and err < 1e-4
                        continue
                    line = {"config": config, "T": t, "combine": combine}
                    for graph in (False, True):
                        kind = "graph" if graph else "eager"
                        fast, chain = time_nsa(step, graph, chain=not args.skip_chain)
                        rows.append(dict(base, impl="nsa_viz_token_decode", mode=kind, ms=fast, rel_err_vs_oracle=err,
                                         identical_block_rows=same))
                        if chain is not None:
                            rows.append(dict(base, impl="nsa_viz_general_decode", mode=kind, ms=chain))
                        line[f"nsa {kind}"], line[f"chain {kind}"] = fast, chain
                        for name, dense_step in dense_decode_steps(q1, kc, vc).items():
                            if (name, kind) not in dense:
                                try:
                                    dense[name, kind] = timed(dense_step, graph)
                                except Exception as exc:  # a backend may refuse the shape or the capture
                                    print(f"  {name} {kind}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                                    dense[name, kind] = None
                                if dense[name, kind] is not None:
                                    rows.append(dict(base, impl=name, mode=kind, ms=dense[name, kind], combine=None))
                            if dense[name, kind] is not None:
                                line[f"{name} {kind}"] = dense[name, kind]
                    line["dense best"] = min(v for k, v in line.items() if k.startswith("sdpa"))
                    line["speedup"] = line["dense best"] / line["nsa graph"]
                    if args.layers > 1:
                        stacked = stacked_layers(q1, kc, vc, params, args.layers)
                        mode = f"graph_{args.layers}_layers_per_layer"
                        for name, ms in stacked.items():
                            rows.append(dict(base, impl="nsa_viz_token_decode" if name == "nsa" else name, mode=mode,
                                             ms=ms, layers=args.layers, **({} if name == "nsa" else {"combine": None})))
                        line[f"nsa x{args.layers}"] = stacked["nsa"]
                        best = min((v for k, v in stacked.items() if k != "nsa"), default=None)
                        line[f"dense best x{args.layers}"] = best
                        line[f"speedup x{args.layers}"] = None if best is None else best / stacked["nsa"]
                    table.append(line)
                    print("  " + ", ".join(f"{k} {v * 1e3:.1f} us" if isinstance(v, float) and k != "speedup"
                                           else f"{k} {v}" for k, v in line.items()
                                           if v is not None and not k.startswith("speedup x")), flush=True)
                    if args.sweep and t == max(lengths) and config == configs[0] and combine == args.combines[0]:
                        sweep_launches(step, rows, base)
                    if t == max(lengths):
                        kernels = kernel_table(step, device)
                        show(f"{config} T={t} {combine}: kernels of one eager step", kernels)
                        rows.append(dict(base, impl="nsa_viz_token_decode", mode="kernels", kernels=kernels))
            if device.type == "cuda":  # after every length: a run cut short keeps what it measured
                # batch and stacked layers get files of their own: the plain one holds the README's table
                suffix = ("" if args.batch == 1 else f"_b{args.batch}") + ("" if args.layers == 1 else f"_layers{args.layers}")
                write_rows(rows, ROOT / "benchmarks" / "results" / f"nsa_decode_{gpu_slug(device)}{suffix}.json")
    if device.type == "cuda":
        print("\nconfig, T, combine, NSA graph us, general chain graph us, best dense us (graph or eager), speedup")
        for line in table:
            chain = "-" if line["chain graph"] is None else f"{line['chain graph'] * 1e3:.1f}"
            print(f"{line['config']}, {line['T']}, {line['combine']}, {line['nsa graph'] * 1e3:.1f}, {chain}, "
                  f"{line['dense best'] * 1e3:.1f}, {line['speedup']:.2f}x"
                  + (f"; {args.layers} layers in one graph, per layer: NSA {line[f'nsa x{args.layers}'] * 1e3:.1f}"
                     + (f", dense {line[f'dense best x{args.layers}'] * 1e3:.1f}, {line[f'speedup x{args.layers}']:.2f}x"
                        if line[f"dense best x{args.layers}"] is not None else ", no dense backend")
                     if args.layers > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
