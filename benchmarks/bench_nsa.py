"""GPU check and benchmark of native sparse attention (issue 3), in one call.

1. Correctness on the GPU against the PyTorch references (fresh random inputs): the primitives
   (selected attention with window, compressed attention, selection importance; out, LSE, grads) and,
   when ``kernels/nsa.py`` is there, ``nsa_attention`` against ``nsa_attention_reference``.
2. Timings, B=1, 64/4 heads, d=128, bf16, T = 8k..64k, n=16, l'=64, w=512, cmp 32/16:
   our NSA (union and gated, token and block granularity; forward and forward+backward), each
   branch alone, dense SDPA (cuDNN, flash), FlexAttention window 512, and fla-core's
   ``parallel_nsa`` (compression + selection only: ``g_swa=None, window_size=0``; its compression is
   l = d = l' = 64, fixed by the library) when the carried wheel is importable.
3. Decoding one token against a cache of T: ``nsa_decode`` with its ``NSACache`` (eager and CUDA graph)
   vs dense SDPA.

``--configs 64/4/128 32/8/128 9/3/64`` adds GQA shapes (dense cuDNN and ours; fla-core's kernel needs
>= 16 query heads per key/value head and is skipped there, saying so).

Rows go to benchmarks/results/nsa_<gpu>.json (nsa_h100.json, nsa_h200.json) (schema in GPU.md); a table is printed last.

    python benchmarks/bench_nsa.py [--lengths 8192 16384 32768 65536] [--smoke]

``--smoke`` runs every code path at toy sizes on the CPU (TRITON_INTERPRET=1) to test the script.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (ROOT, bench_ms, capture_graph, dense_decode_steps, environment, gpu_slug, peak_mb, rel_err,
                    write_rows)
from nsa_viz.kernels.nsa_compressed import compressed_attention, compressed_importance, selection_importance
from nsa_viz.kernels.nsa_compressed_ref import num_compressed
from nsa_viz.kernels.nsa_selected import selected_attention

HAVE_NSA = importlib.util.find_spec("nsa_viz.kernels.nsa") is not None
T0 = time.time()
BUDGET_S = 430  # stop starting new lengths after this (the device call is cut at 600 s)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def mean_pool(x, l, d):
    """[B, T, H, D] -> [B, NC, H, D] means over complete blocks (only used when kernels/nsa.py is absent)."""
    nc = num_compressed(x.shape[1], l, d)
    return x.unfold(1, l, d)[:, :nc].mean(-1)


def random_selection(b, hkv, t, kv_len, n, block, device, seed=0):
    """top-n of random importance over visible blocks, with the first and the 2 local blocks forced (like NSA)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nsel = -(-kv_len // block)
    pos = torch.arange(t, device=device) + kv_len - t
    cur = (pos // block)[:, None]
    blk = torch.arange(nsel, device=device)[None, :]
    score = torch.rand(b, hkv, t, nsel, device=device, generator=gen)
    score = torch.where((blk == 0) | (blk == cur) | (blk == cur - 1), 2.0, score)
    score = torch.where(blk <= cur, score, -1.0)
    val, idx = score.topk(min(n, nsel), dim=-1)
    return torch.where(val >= 0, idx, -1).to(torch.int32).contiguous()


def grads(fn, inputs, do):
    out = fn()
    return torch.autograd.grad(out, inputs, do)


# ----------------------------------------------------------------------------- correctness
def check_correctness(device, smoke: bool) -> list:
    results = []
    t = 200 if smoke else 1500
    cases = [(4, 2, 32, torch.float32)] if smoke else [(64, 4, 128, torch.bfloat16), (9, 3, 64, torch.float16),
                                                        (32, 8, 128, torch.bfloat16)]
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
    for hq, hkv, d, dtype in cases:
        torch.manual_seed(hq)
        mk = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_()
        q, k, v = mk(1, t, hq, d), mk(1, t, hkv, d), mk(1, t, hkv, d)
        do = torch.randn(1, t, hq, d, device=device, dtype=dtype)
        idx = random_selection(1, hkv, t, t, 8, 64 if not smoke else 16, device)
        blk = 64 if not smoke else 16
        res = {}
        for backend in ("triton", "reference"):
            out, lse = selected_attention(q, k, v, idx, block=blk, window=100, backend=backend)
            res[backend] = (out, lse, *torch.autograd.grad(out, (q, k, v), do))
        errs = [rel_err(a, r) for a, r in zip(res["triton"], res["reference"])]
        ok = max(errs) < tol[dtype] and not any(torch.isnan(x).any().item() for x in res["triton"])
        results.append(ok)
        log(f"check selected+window {hq}/{hkv} d={d} {dtype}: " + " ".join(f"{e:.1e}" for e in errs) + (" OK" if ok else " FAIL"))

        kc, vc = mk(1, num_compressed(t, 32, 16), hkv, d), mk(1, num_compressed(t, 32, 16), hkv, d)
        res = {}
        for backend in ("triton", "reference"):
            out, lse = compressed_attention(q, kc, vc, cmp_block=32, cmp_stride=16, backend=backend)
            imp = selection_importance(q.detach(), kc.detach(), lse, cmp_block=32, cmp_stride=16, block=blk, kv_len=t,
                                       backend=backend)
            res[backend] = (out, lse, imp, *torch.autograd.grad(out, (q, kc, vc), do))
        errs = [rel_err(a, r) for a, r in zip(res["triton"], res["reference"])]
        ok = max(errs) < tol[dtype]
        results.append(ok)
        log(f"check compressed+importance {hq}/{hkv} d={d} {dtype}: " + " ".join(f"{e:.1e}" for e in errs) + (" OK" if ok else " FAIL"))

        if HAVE_NSA:
            from nsa_viz.kernels.nsa import nsa_attention
            from nsa_viz.kernels.nsa_ref import nsa_attention_reference
            kw = dict(block=blk, top_n=8, window=100, cmp_block=32, cmp_stride=16)
            try:
                res = {}
                for name, fn in (("triton", nsa_attention), ("reference", nsa_attention_reference)):
                    extra = dict(backend="triton") if name == "triton" else {}
                    out, aux = fn(q, k, v, **kw, **extra, return_aux=True)
                    res[name] = (out, aux["block_idx"], *torch.autograd.grad(out, (q, k, v), do))
                same = (res["triton"][1] == res["reference"][1]).float().mean().item()
                errs = [rel_err(a, r) for a, r in zip(res["triton"][2:], res["reference"][2:])]
                eo = rel_err(res["triton"][0], res["reference"][0])
                ok = eo < tol[dtype] and same > 0.99
                log(f"check nsa_attention union/token {hq}/{hkv} d={d} {dtype}: same indices {same:.4f} out {eo:.1e} grads "
                    + " ".join(f"{e:.1e}" for e in errs) + (" OK" if ok else " FAIL (ties in half precision may flip)"))
                results.append(ok)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                results.append(False)
    return results


# ----------------------------------------------------------------------------- launch-setting sweep
def sweep(device, t=16384, budget_s=70.0, dims=(1, 64, 4, 128, torch.bfloat16), only_packed=False):
    """Pick (warps, stages) per kernel at one length, timing the call each kernel dominates; the winners
    stay pinned in LAUNCH_OVERRIDES for the rest of the run. Returns {kernel: (config, ms, {config: ms})}."""
    from nsa_viz.kernels import nsa_compressed as nc_mod
    from nsa_viz.kernels import nsa_selected as ns_mod
    B, HQ, HKV, D, dtype = dims
    start = time.time()
    mk = lambda *sh: torch.randn(*sh, device=device, dtype=dtype).requires_grad_()
    q, k, v = mk(B, t, HQ, D), mk(B, t, HKV, D), mk(B, t, HKV, D)
    do = torch.randn_like(q)
    idx = random_selection(B, HKV, t, t, 16, 64, device)
    k_cmp = mean_pool(k.detach(), 32, 16).requires_grad_()
    v_cmp = mean_pool(v.detach(), 32, 16).requires_grad_()
    ck = dict(cmp_block=32, cmp_stride=16)
    with torch.no_grad():
        _, lse = compressed_attention(q, k_cmp, v_cmp, **ck)

    def sel_fwd():
        return selected_attention(q, k, v, idx, block=64, window=0)

    def sel_bwd():
        out = selected_attention(q, k, v, idx, block=64, window=0)[0]
        torch.autograd.grad(out, (q, k, v), do)

    def cmp_fwd():
        return compressed_attention(q, k_cmp, v_cmp, **ck)

    def cmp_bwd():
        out = compressed_attention(q, k_cmp, v_cmp, **ck)[0]
        torch.autograd.grad(out, (q, k_cmp, v_cmp), do)

    def imp():
        return selection_importance(q, k_cmp, lse, **ck, block=64, kv_len=t)

    def packed_imp():
        return compressed_importance(q, k_cmp, **ck, block=64, kv_len=t)

    # the packed importance kernel: rows per program (tokens x padded group) and launch (warps, stages[, register
    # cap]), timed on the union call; the default launch is one of the candidates
    times = {}
    candidates = [(nc_mod.PACKED_ROWS, nc_mod.PACKED_LAUNCH)] + [(rows, (warps, 2)) for rows, warps in
                                                                  ((128, 4), (128, 8), (64, 4), (256, 8), (32, 4))]
    for rows, launch in candidates:
        nc_mod.PACKED_ROWS = rows
        nc_mod.LAUNCH_OVERRIDES["packed_importance"] = launch
        try:
            times[(rows, launch)] = bench_ms(packed_imp, warmup_ms=25, rep_ms=100)
        except Exception as exc:  # noqa: BLE001
            log(f"sweep packed_importance {(rows, launch)}: {type(exc).__name__}: {str(exc)[:120]}")
    chosen = {}
    if times:
        best = min(times, key=times.get)
        nc_mod.PACKED_ROWS = best[0]
        nc_mod.LAUNCH_OVERRIDES["packed_importance"] = best[1]
        chosen["nsa_compressed:packed_importance(rows,launch)"] = (best, times[best], times)
        log("sweep packed_importance (rows, launch): " + ", ".join(f"{c}={m:.3f}" for c, m in times.items()) + f" -> {best}")
        # the chain it replaces (union): compressed LSE pass + per-head importance kernel; keep whichever is faster
        from nsa_viz.kernels.nsa_compressed import compressed_lse
        keep = nc_mod.PACKED_MIN_QUERIES
        nc_mod.PACKED_MIN_QUERIES = 1 << 40
        old_ms = bench_ms(lambda: selection_importance(q, k_cmp, compressed_lse(q, k_cmp, **ck, kv_len=t), **ck, block=64,
                                                       kv_len=t), warmup_ms=25, rep_ms=100)
        nc_mod.PACKED_MIN_QUERIES = keep if times[best] <= old_ms else 1 << 40
        log(f"union scoring at {t}: packed {times[best]:.3f} ms, LSE + per-head importance {old_ms:.3f} ms -> "
            + ("packed" if times[best] <= old_ms else "per-head"))
        chosen["union scoring: per-head chain ms"] = ("per-head" if times[best] > old_ms else "packed", old_ms, {})
    if only_packed:
        return chosen

    plan = [
        # 16-row tiles at d <= 128 run the two-token forward, which reads its own launch entry
        (ns_mod, "fwd_tokens", sel_fwd, [(2, 2), (4, 2), (2, 3)]) if ns_mod.FWD_TOKENS_PER_PROGRAM > 1 else
        (ns_mod, "fwd", sel_fwd, [(4, 2), (2, 2), (8, 2), (4, 3)]),
        (ns_mod, "dkdv", sel_bwd, [(4, 2), (8, 2), (4, 3)]),
        (ns_mod, "dq", sel_bwd, [(4, 2), (2, 2), (8, 2)]),
        (nc_mod, "importance", imp, [(4, 2), (8, 2), (4, 3)]),
        (nc_mod, "fwd", cmp_fwd, [(8, 3), (4, 3), (8, 2)]),
        (nc_mod, "dkdv", cmp_bwd, [(4, 2), (8, 2)]),
        (nc_mod, "dq", cmp_bwd, [(4, 2), (8, 2)]),
    ]
    for mod, kernel, fn, cfgs in plan:
        times = {}
        for cfg in cfgs:
            if time.time() - start > budget_s:
                break
            mod.LAUNCH_OVERRIDES[kernel] = cfg
            try:
                times[cfg] = bench_ms(fn, warmup_ms=25, rep_ms=100)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                log(f"sweep {mod.__name__.split('.')[-1]}:{kernel} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
        if times:
            best = min(times, key=times.get)
            mod.LAUNCH_OVERRIDES[kernel] = best
            chosen[f"{mod.__name__.split('.')[-1]}:{kernel}"] = (best, times[best], times)
            log(f"sweep {mod.__name__.split('.')[-1]}:{kernel}: " + ", ".join(f"{c}={m:.3f}" for c, m in times.items())
                + f" -> {best}")
        else:
            mod.LAUNCH_OVERRIDES.pop(kernel, None)
    return chosen


# ----------------------------------------------------------------------------- timing helpers
def fwd_and_fwd_bwd(fn, inputs, do, want_mem=True):
    fwd = bench_ms(lambda: fn())
    def fb():
        out = fn()
        torch.autograd.grad(out, inputs, do)
    total = bench_ms(fb)
    mem = peak_mb(fb) if want_mem else None
    return fwd, total, mem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 32768, 16384, 8192],
                    help="longest first: the run is cut at 10 minutes and 64k is the target")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU interpreter: tests the script only")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sweep-packed-only", action="store_true", help="sweep only the packed importance kernel")
    ap.add_argument("--configs", nargs="+", default=["64/4/128"],
                    help="heads q/kv/head_dim; the first gets every baseline, the others dense + ours")
    ap.add_argument("--no-branches", action="store_true", help="skip the per-branch rows")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop starting new lengths after this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    env = environment(device)
    log(env, "nsa_attention available:", HAVE_NSA)
    if not args.skip_check:
        checks = check_correctness(device, args.smoke)
        log(f"correctness: {sum(checks)}/{len(checks)} OK")

    if args.no_sweep:
        tuned = {}
    elif args.smoke:
        tuned = sweep(device, t=128, budget_s=600, dims=(1, 4, 2, 32, torch.float32), only_packed=args.sweep_packed_only)
    else:
        tuned = sweep(device, only_packed=args.sweep_packed_only)

    if args.smoke:
        B, dtype = 1, torch.float32
        configs = [(4, 2, 32)] + [tuple(int(x) for x in c.split("/")) for c in args.configs[1:]]
        configs = [(min(hq, 6), min(hkv, 3), 32) for hq, hkv, _ in configs]
        lengths, block, top_n, window, l, s = [256], 16, 4, 32, 32, 16
    else:
        B, dtype = 1, torch.bfloat16
        configs = [tuple(int(x) for x in c.split("/")) for c in args.configs]
        lengths, block, top_n, window, l, s = args.lengths, 64, 16, 512, 32, 16
    params = dict(top_n=top_n, block=block, window=window, cmp_block=l, cmp_stride=s, init_blocks=1, local_blocks=2)
    default = Path(tempfile.gettempdir()) / "nsa_smoke.json" if args.smoke else ROOT / "benchmarks" / "results" / f"nsa_{gpu_slug(device)}.json"
    out_path = args.out or default
    rows = []

    HQ, HKV, D = configs[0]

    def row(op, impl, t, pass_, ms, mem=None, note="", **extra):
        r = {"device": env["device"], "torch": env["torch"], "triton": env["triton"], "date": env["date"], "op": op,
             "impl": impl, "B": B, "T": t, "HQ": HQ, "HKV": HKV, "D": D, "dtype": str(dtype).replace("torch.", ""),
             "params": {**params, **extra}, "pass": pass_, "launch": {k_: v_[0] for k_, v_ in tuned.items()}, "ms": ms, "peak_mem_mb": mem, "note": note}
        rows.append(r)
        log(f"{op:14s} {impl:28s} T={t:6d} {pass_:8s} {ms if ms is None else round(ms, 3)} ms  mem {mem}  {note}")
        write_rows(rows, out_path)  # after every row: a run cut short keeps what it measured

    def attempt(label, fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a failing baseline must not end the run
            log(f"FAILED {label}: {type(exc).__name__}: {str(exc)[:300]}")
            torch.cuda.empty_cache() if device.type == "cuda" else None

    fla = None
    if not args.smoke:
        try:
            from fla.ops.nsa import parallel_nsa as fla
        except Exception as exc:  # noqa: BLE001
            log(f"fla-core not importable ({exc}); its rows are skipped")

    plan = [(cfg, t) for cfg in configs for t in lengths]
    for (HQ, HKV, D), t in plan:
        first_config = (HQ, HKV, D) == configs[0]
        if time.time() - T0 > args.budget_s:
            log(f"time budget reached: skipping {HQ}/{HKV} d={D} T={t}")
            continue
        torch.manual_seed(t)
        mk = lambda *sh: torch.randn(*sh, device=device, dtype=dtype).requires_grad_()
        q, k, v = mk(B, t, HQ, D), mk(B, t, HKV, D), mk(B, t, HKV, D)
        do = torch.randn(B, t, HQ, D, device=device, dtype=dtype)
        qkv = (q, k, v)
        # ---------------- dense baselines (SDPA on [B, H, T, D] views)
        if not args.smoke:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            qt, kt, vt = (x.transpose(1, 2) for x in qkv)
            dense_backends = (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION))
            for name, backend in dense_backends[: 2 if first_config else 1]:
                def dense():
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                def run_dense(name=name, dense=dense):
                    f, fb, mem = fwd_and_fwd_bwd(dense, qkv, do.transpose(1, 2))
                    row("dense", name, t, "fwd", f)
                    row("dense", name, t, "fwd_bwd", fb, mem)
                attempt(name, run_dense)

            def run_flex():
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                bm = create_block_mask(lambda b_, h_, qi, ki: (qi >= ki) & (qi - ki < window), None, None, t, t, device=device)
                comp = torch.compile(flex_attention, dynamic=False)
                f, fb, mem = fwd_and_fwd_bwd(lambda: comp(qt, kt, vt, block_mask=bm, enable_gqa=True), qkv, do.transpose(1, 2))
                row("sliding_window", "flex", t, "fwd", f)
                row("sliding_window", "flex", t, "fwd_bwd", fb, mem)
            if first_config:
                attempt("flex", run_flex)
            if fla is not None and HQ // HKV < 16:
                log(f"fla-core parallel_nsa needs >= 16 query heads per kv head: not run for {HQ}/{HKV}")
            elif fla is not None:
                def run_fla():
                    g = torch.full((B, t, HQ), 0.5, device=device, dtype=dtype)
                    fn = lambda: fla(q, k, v, g_cmp=g, g_slc=g, g_swa=None, block_counts=top_n, block_size=block, window_size=0)
                    f, fb, mem = fwd_and_fwd_bwd(fn, qkv, do)
                    note = "fla-core 0.6.0 parallel_nsa: compression (l=d=64, fixed) + selection only, g_swa=None, window_size=0"
                    row("nsa", "fla_nsa", t, "fwd", f, note=note)
                    row("nsa", "fla_nsa", t, "fwd_bwd", fb, mem, note=note)
                attempt("fla", run_fla)

        # ---------------- our NSA, composed (kernels/nsa.py)
        if HAVE_NSA:
            from nsa_viz.kernels.nsa import nsa_attention
            gates = torch.sigmoid(torch.randn(B, t, HQ, 3, device=device, dtype=dtype)).requires_grad_()
            for combine, gran in (("union", "token"), ("gated", "token"), ("union", "block")):
                def run_ours(combine=combine, gran=gran):
                    kw = dict(params, combine=combine, granularity=gran)
                    inputs = qkv
                    if combine == "gated":
                        kw["gates"] = gates
                        inputs = qkv + (gates,)
                    f, fb, mem = fwd_and_fwd_bwd(lambda: nsa_attention(q, k, v, **kw), inputs, do)
                    row("nsa", "nsa_viz", t, "fwd", f, combine=combine, granularity=gran)
                    row("nsa", "nsa_viz", t, "fwd_bwd", fb, mem, combine=combine, granularity=gran)
                attempt(f"nsa {combine}/{gran}", run_ours)

        # ---------------- each branch alone (primitives), token granularity
        def run_branches():
            k_cmp = mean_pool(k.detach(), l, s).requires_grad_()
            v_cmp = mean_pool(v.detach(), l, s).requires_grad_()
            ck = dict(cmp_block=l, cmp_stride=s)
            f, fb, mem = fwd_and_fwd_bwd(lambda: compressed_attention(q, k_cmp, v_cmp, **ck)[0], (q, k_cmp, v_cmp), do)
            row("nsa_branch", "nsa_viz:compressed_attention", t, "fwd", f)
            row("nsa_branch", "nsa_viz:compressed_attention", t, "fwd_bwd", fb, mem)
            with torch.no_grad():
                _, lse = compressed_attention(q, k_cmp, v_cmp, **ck)
            row("nsa_branch", "nsa_viz:selection_importance", t, "fwd",
                bench_ms(lambda: selection_importance(q, k_cmp, lse, **ck, block=block, kv_len=t)),
                note="packed kernel, LSE given (gated mode)")
            row("nsa_branch", "nsa_viz:compressed_importance", t, "fwd",
                bench_ms(lambda: compressed_importance(q, k_cmp, **ck, block=block, kv_len=t)),
                note="packed kernel finding the LSE itself (union mode)")
            from nsa_viz.kernels import nsa_compressed as nc_mod
            keep = nc_mod.PACKED_MIN_QUERIES
            nc_mod.PACKED_MIN_QUERIES = 1 << 40
            try:
                row("nsa_branch", "nsa_viz:selection_importance_per_head", t, "fwd",
                    bench_ms(lambda: selection_importance(q, k_cmp, lse, **ck, block=block, kv_len=t)),
                    note="the previous per-head kernel (before packing)")
            finally:
                nc_mod.PACKED_MIN_QUERIES = keep
            idx = random_selection(B, HKV, t, t, top_n, block, device)
            for w in (window, 0):
                name = "nsa_viz:selected_attention" + ("+window" if w else "")
                f, fb, mem = fwd_and_fwd_bwd(lambda: selected_attention(q, k, v, idx, block=block, window=w)[0], qkv, do)
                row("nsa_branch", name, t, "fwd", f, note="random top-n selection (first + 2 local forced)", sel_window=w)
                row("nsa_branch", name, t, "fwd_bwd", fb, mem, note="random top-n selection", sel_window=w)
            if HAVE_NSA:
                from nsa_viz.kernels.nsa import select_blocks
                imp = selection_importance(q, k_cmp, lse, **ck, block=block, kv_len=t)
                row("nsa_branch", "nsa_viz:select_blocks", t, "fwd", bench_ms(lambda: select_blocks(
                    imp, top_n=top_n, block=block, init_blocks=1, local_blocks=2, kv_len=t, granularity="token")))
        if first_config and not args.no_branches:
            attempt("branches", run_branches)
        del q, k, v, do, qkv
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # ---------------- decoding one token against a cache of t
        def run_decode():
            """One new token against a cache of t through nsa_decode (NSACache: compressed keys kept, as in
            generation); the step repeated against the same cache state, eager and in a CUDA graph."""
            from nsa_viz.kernels.nsa_decode import NSACache, nsa_decode
            kc = torch.randn(B, t, HKV, D, device=device, dtype=dtype)
            vc = torch.randn(B, t, HKV, D, device=device, dtype=dtype)
            q1 = torch.randn(B, 1, HQ, D, device=device, dtype=dtype)
            cache = NSACache(l, s)
            cache.update(kc, vc)  # what the prefill and the earlier steps left: all complete blocks compressed
            cache.queries_until = t - 1
            kw = dict(params, combine="union", granularity="token")
            step = lambda: nsa_decode(q1, kc, vc, cache, **kw)
            with torch.no_grad():
                want = nsa_attention(q1, kc, vc, **kw) if HAVE_NSA else None
                got = step()
                err = rel_err(got, want) if want is not None else float("nan")
            if device.type == "cuda":
                for name, dense in dense_decode_steps(q1, kc, vc).items():
                    attempt(f"decode {name}", lambda name=name, dense=dense: row("decode", name, t, "decode", bench_ms(dense)))
            with torch.no_grad():
                row("decode", "nsa_viz", t, "decode", bench_ms(step), note=f"nsa_decode with NSACache, eager; rel err vs nsa_attention {err:.1e}")
                if device.type == "cuda":
                    def graphed():
                        graph = capture_graph(step)
                        row("decode", "nsa_viz_cudagraph", t, "decode", bench_ms(graph.replay),
                            note="nsa_decode step captured in one CUDA graph")
                    attempt("decode graph", graphed)
        attempt("decode", run_decode)

    write_rows(rows, out_path)
    # ---------------- summary table
    key = lambda r, impl=None, op=None, pass_=None: (op or r["op"], impl or r["impl"], r["HQ"], r["HKV"], r["D"], r["T"],
                                                     pass_ or r["pass"], r["params"].get("combine"), r["params"].get("granularity"))
    by = {key(r): r["ms"] for r in rows}
    for name, (cfg, ms, times) in tuned.items():
        print(f"launch {name}: {cfg} ({ms:.3f} ms at 16k; tried {times})")
    print("\nheads   T      impl                                pass      ms      vs dense cuDNN")
    for r in sorted(rows, key=lambda r: (-r["HQ"], r["T"], r["op"] != "dense")):
        base = dict(r, params={})
        dense = by.get(key(base, "sdpa_cudnn", "decode" if r["pass"] == "decode" else "dense"))
        name = r["impl"] + (f" {r['params'].get('combine')}/{r['params'].get('granularity')}" if "combine" in r["params"] else "")
        ratio = f"{dense / r['ms']:.2f}x" if dense and r["ms"] else ""
        print(f"{r['HQ']}/{r['HKV']}/{r['D']:<3d} {r['T']:<6d} {name:35s} {r['pass']:8s} {r['ms']:8.3f} {ratio}")


if __name__ == "__main__":
    sys.exit(main())
