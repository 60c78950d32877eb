"""GPU check and benchmark of block-sparse attention for fixed patterns (issue 2).

One call does everything: correctness against the reference on the GPU (fresh random inputs,
every pattern, GQA 9/3 and 32/8 and 64/4, head dims 64/128, fp16/bf16/fp32), a small sweep of
tile sizes and launch settings, then timings of our kernel against dense SDPA (cuDNN and flash
backends) and FlexAttention with the same mask, all in this process. Rows go to
benchmarks/results/block_sparse_<gpu>.json; a table is printed last.

    python benchmarks/bench_block_sparse.py [--lengths 8192 16384 32768 65536] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import ROOT, bench_ms, environment, peak_mb, rel_err, write_rows
from nsa_viz import Custom, Dense, Dilated, GlobalLocal, SlidingWindow
from nsa_viz.kernels import block_sparse as bs
from nsa_viz.kernels import block_sparse_attention


def check_correctness() -> list:
    torch.manual_seed(0)
    report = []
    cases = [
        (SlidingWindow(100), 2, 777, 9, 3, 64, torch.bfloat16),
        (Dense(), 1, 1000, 8, 2, 128, torch.float16),
        (Dense(causal=False), 1, 513, 4, 4, 64, torch.float32),
        (Dilated(stride=4, block=64, window=64), 1, 1100, 32, 8, 128, torch.bfloat16),
        (GlobalLocal(window=128, sink=4, global_tokens=(300, 301)), 2, 900, 9, 3, 64, torch.float16),
        (Custom(lambda q, k: ((q - k) % 3 == 0) & (k <= q), name="every3rd"), 1, 600, 8, 2, 64, torch.bfloat16),
        (SlidingWindow(512), 1, 4096, 64, 4, 128, torch.bfloat16),
    ]
    for pattern, b, t, hq, hkv, d, dtype in cases:
        for bq, bk in ((128, 64), (64, 64)):
            layout = pattern.compile(t, block_q=bq, block_kv=bk, device="cuda")
            q = torch.randn(b, hq, t, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
            k = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
            v = torch.randn(b, hkv, t, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
            do = torch.randn(b, t, hq, d, device="cuda", dtype=dtype)
            res = {}
            for backend in ("triton", "reference"):
                out, lse = block_sparse_attention(q, k, v, layout, backend=backend, return_lse=True)
                res[backend] = (out, lse, *torch.autograd.grad(out, (q, k, v), do))
            errs = [rel_err(a, r) for a, r in zip(res["triton"], res["reference"])]
            nan = any(torch.isnan(x).any().item() for x in res["triton"])
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            ok = max(errs) < tol and not nan
            report.append(ok)
            print(f"check {pattern.label[:48]:48s} B={b} T={t} {hq}/{hkv} d={d} {str(dtype)[6:]:8s} blocks {bq}x{bk}: "
                  f"out {errs[0]:.1e} lse {errs[1]:.1e} dq {errs[2]:.1e} dk {errs[3]:.1e} dv {errs[4]:.1e} {'OK' if ok else 'FAIL'}")
    return report


def flex_callables(mask_mod, t, hq, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    block_mask = create_block_mask(lambda b, h, q, k: mask_mod(q, k), None, None, t, t, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def time_pass(fn_fwd, q, k, v, do):
    """(fwd ms, fwd+bwd ms, peak MB of fwd+bwd) of a callable taking [B, H, T, D] tensors."""
    fwd = bench_ms(lambda: fn_fwd(q, k, v))
    def fwd_bwd():
        out = fn_fwd(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)
    total = bench_ms(fwd_bwd)
    mem = peak_mb(fwd_bwd)
    return fwd, total, mem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="time with the kernels' default settings")
    ap.add_argument("--patterns", nargs="+", default=None, help="subset of sliding_window global_local dilated dense")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    env = environment()
    print(env)
    if not args.skip_check:
        checks = check_correctness()
        print(f"correctness: {sum(checks)}/{len(checks)} OK")

    rows = []
    B, HQ, HKV, D, dtype = 1, 64, 4, 128, torch.bfloat16

    def ours(pattern, bq, bk):
        def fn(q, k, v):  # q [B, H, T, D] views, as transformers hands them
            layout = pattern.compile(q.shape[2], block_q=bq, block_kv=bk, device="cuda")
            return block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout).transpose(1, 2)
        return fn

    # ---- sweep: for each layout tile size, the forward, dK/dV and dQ kernels are tuned separately
    # (they are independent launches, so the best backward is the best of each), at 16k on the window.
    t = 16384
    q = torch.randn(B, t, HQ, D, device="cuda", dtype=dtype)
    k = torch.randn(B, t, HKV, D, device="cuda", dtype=dtype)
    v = torch.randn(B, t, HKV, D, device="cuda", dtype=dtype)
    do = torch.randn_like(q)
    window = SlidingWindow(512)
    scale = D ** -0.5
    fwd_cfgs = [(4, 3), (8, 2), (4, 2), (8, 3)]
    bwd_cfgs = [(sub, w, st) for sub in (16, 32, 64) for w, st in ((4, 2), (4, 3), (8, 2))]
    if args.quick:
        fwd_cfgs, bwd_cfgs = fwd_cfgs[:1], bwd_cfgs[:2]
    tuned = {}
    for bq, bk in (() if args.no_sweep else ((64, 64), (128, 64), (64, 128))):
        layout = window.compile(t, block_q=bq, block_kv=bk, device="cuda")
        res = {"fwd": None, "dkdv": None, "dq": None}
        for w, st in fwd_cfgs:
            bs.LAUNCH_OVERRIDES.clear(); bs.LAUNCH_OVERRIDES["fwd"] = (w, st)
            try:
                ms_ = bench_ms(lambda: bs.block_sparse_forward(q, k, v, layout, scale), 25, 150)
            except Exception as exc:
                print(f"  fwd {bq}x{bk} w{w} s{st}: {str(exc).splitlines()[0][:80]}"); continue
            if res["fwd"] is None or ms_ < res["fwd"][0]:
                res["fwd"] = (ms_, w, st)
        bs.LAUNCH_OVERRIDES["fwd"] = res["fwd"][1:] if res["fwd"] else (4, 2)
        out, lse = bs.block_sparse_forward(q, k, v, layout, scale)
        for kernel in ("dkdv", "dq"):
            for sub, w, st in bwd_cfgs:
                if sub > (bq if kernel == "dkdv" else bk):
                    continue
                bs.LAUNCH_OVERRIDES[kernel] = (w, st)
                bs.SUB_TILES[kernel] = sub
                try:
                    ms_ = bench_ms(lambda: bs.block_sparse_backward(do, q, k, v, out, lse, layout, scale), 25, 150)
                except Exception as exc:
                    print(f"  {kernel} {bq}x{bk} sub{sub} w{w} s{st}: {str(exc).splitlines()[0][:80]}"); continue
                if res[kernel] is None or ms_ < res[kernel][0]:
                    res[kernel] = (ms_, sub, w, st)
            bs.SUB_TILES[kernel] = res[kernel][1] if res[kernel] else 32
            bs.LAUNCH_OVERRIDES[kernel] = res[kernel][2:] if res[kernel] else (4, 2)
        bwd_ms = bench_ms(lambda: bs.block_sparse_backward(do, q, k, v, out, lse, layout, scale))
        tuned[(bq, bk)] = dict(fwd=res["fwd"], dkdv=res["dkdv"], dq=res["dq"], bwd_ms=bwd_ms,
                               total=(res["fwd"][0] if res["fwd"] else 1e9) + bwd_ms)
        print(f"sweep window512 16k blocks {bq}x{bk}: fwd {res['fwd']} dkdv {res['dkdv']} dq {res['dq']} bwd {bwd_ms:.3f} ms")
        bs.LAUNCH_OVERRIDES.clear()
    if args.no_sweep:
        best_fwd_blocks = best_fb_blocks = (64, 64)
        tuned[(64, 64)] = {kk: (0.0, "default") for kk in ("fwd", "dkdv", "dq")}
    else:
        best_fwd_blocks = min(tuned, key=lambda b: tuned[b]["fwd"][0] if tuned[b]["fwd"] else 1e9)
        best_fb_blocks = min(tuned, key=lambda b: tuned[b]["total"])
        print("best forward tiles", best_fwd_blocks, tuned[best_fwd_blocks]["fwd"], "best fwd+bwd tiles", best_fb_blocks, tuned[best_fb_blocks])
    del q, k, v, do

    def apply(blocks):
        cfg = tuned[blocks]
        if args.no_sweep:
            bs.LAUNCH_OVERRIDES.clear()
            return blocks
        bs.LAUNCH_OVERRIDES.clear()
        bs.LAUNCH_OVERRIDES["fwd"] = cfg["fwd"][1:]
        for kernel in ("dkdv", "dq"):
            bs.SUB_TILES[kernel] = cfg[kernel][1]
            bs.LAUNCH_OVERRIDES[kernel] = cfg[kernel][2:]
        return blocks

    patterns = {
        "sliding_window": (SlidingWindow(512), {"window": 512}),
        "global_local": (GlobalLocal(window=512, sink=64), {"window": 512, "sink": 64}),
        "dilated": (Dilated(stride=8, block=64, window=512), {"stride": 8, "block": 64, "window": 512}),
        "dense": (Dense(), {}),
    }
    if args.patterns:
        patterns = {name: patterns[name] for name in args.patterns}

    def record(op, impl, t, hq, hkv, d, params, pas, ms, mem, note="", extra=None):
        rows.append({**env, "op": op, "impl": impl, "B": B, "T": t, "HQ": hq, "HKV": hkv, "D": d, "dtype": "bfloat16",
                     "params": params, "pass": pas, "ms": ms, "peak_mem_mb": mem, "note": note, **(extra or {})})

    shapes = [(HQ, HKV, D, t) for t in args.lengths] + [(9, 3, 64, t) for t in args.lengths[:2]]
    for hq, hkv, d, t in shapes:
        torch.manual_seed(t)
        q = torch.randn(B, hq, t, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(B, hkv, t, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(B, hkv, t, d, device="cuda", dtype=dtype, requires_grad=True)
        do = torch.randn_like(q)
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            def sdpa(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            try:
                f, fb, mem = time_pass(sdpa, q, k, v, do)
                record("dense", name, t, hq, hkv, d, {}, "fwd", f, None)
                record("dense", name, t, hq, hkv, d, {}, "fwd_bwd", fb, mem)
            except Exception as exc:
                record("dense", name, t, hq, hkv, d, {}, "fwd", None, None, note=f"failed: {str(exc)[:200]}")
        for op, (pattern, params) in patterns.items():
            if op == "dense" and hq != HQ:
                continue
            for impl in ("nsa_viz", "flex"):
                try:
                    if impl == "nsa_viz":
                        bq, bk = apply(best_fwd_blocks)
                        f, _, _ = time_pass(ours(pattern, bq, bk), q, k, v, do)
                        bq2, bk2 = apply(best_fb_blocks)
                        _, fb, mem = time_pass(ours(pattern, bq2, bk2), q, k, v, do)
                        layout = pattern.compile(t, block_q=bq2, block_kv=bk2, device="cuda")
                        extra = {"density": layout.density, "tile_density": layout.tile_density,
                                 "config": {"fwd": [bq, bk, *tuned[best_fwd_blocks]["fwd"][1:]],
                                            "fwd_bwd": {"blocks": [bq2, bk2], **{kk: tuned[best_fb_blocks][kk][1:] for kk in ("fwd", "dkdv", "dq")}}}}
                    else:
                        fn = flex_callables(pattern.mask_mod, t, hq, "cuda")
                        f, fb, mem = time_pass(fn, q, k, v, do)
                        extra = {}
                    record(op, impl, t, hq, hkv, d, params, "fwd", f, None, extra=extra)
                    record(op, impl, t, hq, hkv, d, params, "fwd_bwd", fb, mem, extra=extra)
                    print(f"{op:15s} {impl:8s} T={t} {hq}/{hkv} d={d}: fwd {f:.3f} fwd+bwd {fb:.3f} peak {mem:.0f} MB")
                except Exception as exc:
                    traceback.print_exc()
                    record(op, impl, t, hq, hkv, d, params, "fwd", None, None, note=f"failed: {str(exc)[:200]}")
                finally:
                    bs.LAUNCH_OVERRIDES.clear()
                    if impl == "flex":
                        torch._dynamo.reset()
        del q, k, v, do
        gc.collect()
        torch.cuda.empty_cache()

    gpu = env["device"].split()[1].lower() if env["device"].startswith("NVIDIA") else "gpu"
    write_rows(rows, ROOT / "benchmarks" / "results" / f"block_sparse_{gpu}.json")
    # ---- table
    def ms(op, impl, t, hq, pas):
        for r in rows:
            if (r["op"], r["impl"], r["T"], r["HQ"], r["pass"]) == (op, impl, t, hq, pas) and r["ms"]:
                return r["ms"]
        return float("nan")
    print(f"\n{'op':15s} {'T':>6s} {'heads':>6s} | {'ours fwd':>9s} {'flex fwd':>9s} {'ratio':>6s} | {'ours f+b':>9s} {'flex f+b':>9s} {'ratio':>6s} | {'cudnn fwd':>9s} {'cudnn f+b':>9s}")
    for hq, hkv, d, t in shapes:
        for op in patterns:
            a, b_ = ms(op, "nsa_viz", t, hq, "fwd"), ms(op, "flex", t, hq, "fwd")
            c, e = ms(op, "nsa_viz", t, hq, "fwd_bwd"), ms(op, "flex", t, hq, "fwd_bwd")
            print(f"{op:15s} {t:6d} {hq:>3d}/{hkv:<2d} | {a:9.3f} {b_:9.3f} {a / b_:6.2f} | {c:9.3f} {e:9.3f} {c / e:6.2f} | "
                  f"{ms('dense', 'sdpa_cudnn', t, hq, 'fwd'):9.3f} {ms('dense', 'sdpa_cudnn', t, hq, 'fwd_bwd'):9.3f}")


if __name__ == "__main__":
    main()
