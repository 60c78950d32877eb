"""GPU check and timing of the NSA speed pieces (issue 3, run 2) against what nsa_attention uses now.

New pieces: ``nsa_topk.pick_top_blocks`` (Triton top-n instead of ``select_blocks``' PyTorch ranking),
``compressed_lse`` (LSE-only compressed pass for union), ``selection_importance`` split over its output
columns for decode, ``compressed_lse(splits=S)`` and ``nsa_decode_kernels.selected_window_decode``
(flash-decoding). One call: correctness on the GPU first (identical indices, bit-equal LSE, reference
errors), then B=1, 64/4 heads, d=128, bf16, n=16, l'=64, w=512, cmp 32/16 at 16k and 64k:
each piece old vs new, the composed union/token forward as wired now (``nsa_attention``) and the same
chain with the new pieces (``new_chain``: what the wiring patch makes ``nsa_attention`` run), and
decoding one token (CUDA graphs) old chain vs new chain vs dense SDPA.

    python benchmarks/bench_nsa_pieces.py [--lengths 16384 65536] [--smoke]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from common import ROOT, bench_ms, capture_graph, environment, rel_err, write_rows
from nsa_viz.kernels import nsa_compressed, nsa_topk
from nsa_viz.kernels.nsa import _pick_in_chunks, compress_mean, nsa_attention, query_block_importance, select_blocks
from nsa_viz.kernels.nsa_compressed import compressed_attention, compressed_lse, selection_importance
from nsa_viz.kernels.nsa_decode_kernels import selected_window_decode
from nsa_viz.kernels.nsa_selected import selected_attention
from nsa_viz.kernels.nsa_topk import pick_top_blocks

T0 = time.time()
BUDGET_S = 150  # stop starting new prefill lengths after this; decode lengths stop at 190 s


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--decode-lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU interpreter: tests the script only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    env = environment(device)
    log(env)
    if args.smoke:
        B, HQ, HKV, D, dtype = 1, 4, 2, 32, torch.float32
        lengths, dec_lengths, check_t = [256], [256], 256
        block, top_n, window, l, s = 16, 4, 32, 32, 16
        timing = dict(warmup_ms=1, rep_ms=1)
    else:
        B, HQ, HKV, D, dtype = 1, 64, 4, 128, torch.bfloat16
        lengths, dec_lengths, check_t = args.lengths, args.decode_lengths, 4096
        block, top_n, window, l, s = 64, 16, 512, 32, 16
        timing = dict(warmup_ms=25, rep_ms=150)
        # run 1's launch sweep (benchmarks/results/nsa_h100.json rows' "launch"): same settings for old and new
        nsa_compressed.LAUNCH_OVERRIDES.update({"fwd": (4, 3), "importance": (4, 3)})
    params = dict(top_n=top_n, block=block, window=window, cmp_block=l, cmp_stride=s, init_blocks=1, local_blocks=2)
    sel = dict(top_n=top_n, init_blocks=1, local_blocks=2)
    ck = dict(cmp_block=l, cmp_stride=s)
    out_path = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "nsa_pieces_smoke.json" if args.smoke
                                                else ROOT / "benchmarks" / "results" / "nsa_pieces_h100.json")  # run 2 merged into nsa_h100.json
    rows, checks = [], []

    def row(op, impl, t, pass_, ms, note="", **extra):
        rows.append({"device": env["device"], "torch": env["torch"], "triton": env["triton"], "date": env["date"],
                     "op": op, "impl": impl, "B": B, "T": t, "HQ": HQ, "HKV": HKV, "D": D,
                     "dtype": str(dtype).replace("torch.", ""), "params": {**params, **extra}, "pass": pass_,
                     "ms": ms, "peak_mem_mb": None, "note": note})
        log(f"{op:12s} {impl:44s} T={t:6d} {pass_:7s} {ms:9.4f} ms  {note}")
        write_rows(rows, out_path)

    def bench(fn):
        return bench_ms(fn, device=device, **timing)

    def attempt(label, fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one failing piece must not end the run
            log(f"FAILED {label}: {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def check(name, ok, detail=""):
        checks.append(bool(ok))
        log(f"check {name}: {'OK' if ok else 'FAILED'} {detail}")

    def new_chain(q, k, v):
        """Union/token NSA with the new pieces: what nsa_attention runs once the wiring patch is applied."""
        tk = k.shape[1]
        k_cmp = compress_mean(k, l, s)
        lse = compressed_lse(q, k_cmp, **ck, kv_len=tk)
        imp = selection_importance(q, k_cmp, lse, **ck, block=block, kv_len=tk)
        cur = torch.arange(tk - q.shape[1], tk, device=q.device) // block
        idx = pick_top_blocks(imp, cur, **sel)
        return selected_attention(q, k, v, idx, block=block, window=window)[0]

    # ------------------------------------------------------------------ correctness on the GPU
    def run_checks():
        t = check_t
        g = torch.Generator(device=device).manual_seed(1)
        mk = lambda *sh: torch.randn(*sh, device=device, dtype=dtype, generator=g)
        q, k, v = mk(B, t, HQ, D), mk(B, t, HKV, D), mk(B, t, HKV, D)
        k_cmp, v_cmp = compress_mean(k, l, s), compress_mean(v, l, s)
        _, lse_old = compressed_attention(q, k_cmp, v_cmp, **ck, kv_len=t)
        lse = compressed_lse(q, k_cmp, **ck, kv_len=t)
        check("compressed_lse == compressed_attention lse (bitwise)", torch.equal(lse, lse_old))
        lse_ref = compressed_lse(q, k_cmp, **ck, kv_len=t, backend="reference")
        check("compressed_lse vs reference", rel_err(lse, lse_ref) < 1e-2, f"rel {rel_err(lse, lse_ref):.2e}")
        imp = selection_importance(q, k_cmp, lse, **ck, block=block, kv_len=t)
        cur = torch.arange(t, device=device) // block
        for name, scores in (("random", imp), ("ties (rounded to 0.05)", (imp * 20).round() / 20)):
            want = select_blocks(scores, block=block, kv_len=t, granularity="token", **sel)
            got = pick_top_blocks(scores, cur, **sel)
            check(f"pick_top_blocks == select_blocks, {name}", torch.equal(got, want),
                  f"{(got != want).any(-1).sum().item()} rows differ")
        per_block = query_block_importance(imp, 0, block)
        cb = torch.arange(per_block.shape[2], device=device)
        check("pick_top_blocks == ranking, block granularity",
              torch.equal(pick_top_blocks(per_block, cb, **sel), _pick_in_chunks(per_block, cb, **sel)))
        out_old = nsa_attention(q, k, v, **params)
        out_new = new_chain(q, k, v)
        check("new chain == nsa_attention (union/token)", torch.equal(out_new, out_old),
              f"rel {rel_err(out_new, out_old):.2e}")
        # decode rows against a longer cache
        td = dec_lengths[-1]
        kc, vc, q1 = mk(B, td, HKV, D), mk(B, td, HKV, D), mk(B, 1, HQ, D)
        kcc = compress_mean(kc, l, s)
        lse1 = compressed_lse(q1, kcc, **ck, kv_len=td)
        lse1s = compressed_lse(q1, kcc, **ck, kv_len=td, splits=16)
        check("decode compressed_lse split vs single", rel_err(lse1s, lse1) < 1e-5, f"rel {rel_err(lse1s, lse1):.2e}")
        i1 = selection_importance(q1, kcc, lse1, **ck, block=block, kv_len=td, splits=1)
        i2 = selection_importance(q1, kcc, lse1, **ck, block=block, kv_len=td)
        check("decode importance split == unsplit (bitwise)", torch.equal(i1, i2))
        i3 = selection_importance(q1, kcc, lse1s, **ck, block=block, kv_len=td)
        cur1 = torch.tensor([td - 1], device=device) // block
        same = torch.equal(pick_top_blocks(i3, cur1, **sel), pick_top_blocks(i1, cur1, **sel))
        check("decode selection with split LSE == unsplit", same)
        idx1 = pick_top_blocks(i1, cur1, **sel)
        o_old, l_old = selected_attention(q1, kc, vc, idx1, block=block, window=window)
        o_new, l_new = selected_window_decode(q1, kc, vc, idx1, block=block, window=window)
        check("selected_window_decode vs selected_attention", rel_err(o_new, o_old) < 2e-2 and rel_err(l_new, l_old) < 1e-3,
              f"out rel {rel_err(o_new, o_old):.2e}, lse rel {rel_err(l_new, l_old):.2e}")
        o_ref, _ = selected_attention(q1.float(), kc.float(), vc.float(), idx1, block=block, window=window,
                                      backend="reference")
        check("selected_window_decode vs fp32 reference", rel_err(o_new, o_ref) < 2e-2, f"rel {rel_err(o_new, o_ref):.2e}")
    attempt("checks", run_checks)
    log(f"correctness: {sum(checks)}/{len(checks)} OK")

    # ------------------------------------------------------------------ top-n launch settings
    best = dict(nsa_topk.TOPN_LAUNCH)
    if not args.smoke:
        def sweep():
            t = 16384
            nsel = t // block
            scores = torch.rand(B, HKV, t, nsel, device=device)
            cur = torch.arange(t, device=device) // block
            results = []
            for br, chunk, warps in ((16, 128, 4), (8, 128, 4), (32, 64, 4), (16, 256, 8), (8, 256, 4), (4, 128, 2),
                                     (32, 128, 8)):
                nsa_topk.TOPN_LAUNCH.update(block_r=br, chunk=chunk, num_warps=warps)
                results.append((bench(lambda: pick_top_blocks(scores, cur, **sel)), (br, chunk, warps)))
            results.sort()
            log("top-n sweep at 16k (ms, (rows, chunk, warps)):", [(round(a, 3), c) for a, c in results])
            br, chunk, warps = results[0][1]
            best.update(block_r=br, chunk=chunk, num_warps=warps)
        attempt("sweep", sweep)
        nsa_topk.TOPN_LAUNCH.update(best)

    # ------------------------------------------------------------------ prefill pieces and composed forward
    for t in lengths:
        if time.time() - T0 > BUDGET_S:
            log(f"budget reached: skipping T={t}")
            continue

        def run_prefill(t=t):
            torch.manual_seed(t)
            mk = lambda *sh: torch.randn(*sh, device=device, dtype=dtype)
            q, k, v = mk(B, t, HQ, D), mk(B, t, HKV, D), mk(B, t, HKV, D)
            with torch.no_grad():
                k_cmp, v_cmp = compress_mean(k, l, s), compress_mean(v, l, s)
                row("nsa_piece", "compressed_attention (old, out+lse)", t, "fwd",
                    bench(lambda: compressed_attention(q, k_cmp, v_cmp, **ck, kv_len=t)))
                row("nsa_piece", "compressed_lse (new, lse only)", t, "fwd", bench(lambda: compressed_lse(q, k_cmp, **ck, kv_len=t)))
                lse = compressed_lse(q, k_cmp, **ck, kv_len=t)
                row("nsa_piece", "selection_importance", t, "fwd",
                    bench(lambda: selection_importance(q, k_cmp, lse, **ck, block=block, kv_len=t)))
                imp = selection_importance(q, k_cmp, lse, **ck, block=block, kv_len=t)
                cur = torch.arange(t, device=device) // block
                row("nsa_piece", "select_blocks (old, torch)", t, "fwd",
                    bench(lambda: select_blocks(imp, block=block, kv_len=t, granularity="token", **sel)))
                row("nsa_piece", "pick_top_blocks (new, triton)", t, "fwd", bench(lambda: pick_top_blocks(imp, cur, **sel)),
                    note=f"launch {best}")
                idx = pick_top_blocks(imp, cur, **sel)
                del imp
                row("nsa_piece", "selected_attention+window", t, "fwd",
                    bench(lambda: selected_attention(q, k, v, idx, block=block, window=window)))
                row("nsa", "nsa_attention union/token (as wired now)", t, "fwd", bench(lambda: nsa_attention(q, k, v, **params)),
                    combine="union", granularity="token")
                row("nsa", "new_chain union/token (after wiring patch)", t, "fwd", bench(lambda: new_chain(q, k, v)),
                    combine="union", granularity="token")
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                if device.type == "cuda":
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    def dense():
                        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                    row("dense", "sdpa_cudnn", t, "fwd", bench(dense))
        attempt(f"prefill {t}", run_prefill)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ decode: one token against a cache of t
    for t in dec_lengths:
        if time.time() - T0 > BUDGET_S + 40:
            log(f"budget reached: skipping decode T={t}")
            continue

        def run_decode(t=t):
            torch.manual_seed(t + 1)
            mk = lambda *sh: torch.randn(*sh, device=device, dtype=dtype)
            kc, vc, q1 = mk(B, t, HKV, D), mk(B, t, HKV, D), mk(B, 1, HQ, D)
            k_cmp, v_cmp = compress_mean(kc, l, s), compress_mean(vc, l, s)  # the incremental cache holds these
            kw = dict(**ck, kv_len=t)
            cur1 = torch.tensor([t - 1], device=device) // block

            def old_step():
                _, lse = compressed_attention(q1, k_cmp, v_cmp, **kw)
                imp = selection_importance(q1, k_cmp, lse, **kw, block=block, splits=1)
                idx = select_blocks(imp, block=block, kv_len=t, granularity="token", **sel)
                return selected_attention(q1, kc, vc, idx, block=block, window=window)[0]

            def new_step(splits):
                lse = compressed_lse(q1, k_cmp, **kw, splits=splits)
                imp = selection_importance(q1, k_cmp, lse, **kw, block=block)
                idx = pick_top_blocks(imp, cur1, **sel)
                return selected_window_decode(q1, kc, vc, idx, block=block, window=window)[0]

            steps = {"old chain (cmp fwd, importance, select_blocks, selected)": old_step,
                     "new chain, exact (lse, split importance, top-n, split sel+win)": lambda: new_step(1),
                     "new chain, split lse x16": lambda: new_step(16)}
            with torch.no_grad():
                ref = old_step()
                for name, fn in steps.items():
                    err = rel_err(fn(), ref)
                    if device.type == "cuda":
                        graph = capture_graph(fn)
                        row("decode", "nsa_viz " + name, t, "decode", bench(graph.replay),
                            note=f"CUDA graph; out rel err vs old chain {err:.1e}")
                    else:
                        row("decode", "nsa_viz " + name, t, "decode", bench(fn), note=f"rel err vs old {err:.1e}")
                if device.type == "cuda":
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    qt, kt, vt = q1.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
                    def dense():
                        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
                    row("decode", "sdpa_cudnn", t, "decode", bench(dense))
                    # the decode pieces alone (eager launches)
                    lse = compressed_lse(q1, k_cmp, **kw)
                    row("decode_piece", "compressed_attention (old)", t, "decode",
                        bench(lambda: compressed_attention(q1, k_cmp, v_cmp, **kw)))
                    row("decode_piece", "compressed_lse splits=1", t, "decode", bench(lambda: compressed_lse(q1, k_cmp, **kw)))
                    row("decode_piece", "compressed_lse splits=16", t, "decode",
                        bench(lambda: compressed_lse(q1, k_cmp, **kw, splits=16)))
                    row("decode_piece", "selection_importance splits=1 (old)", t, "decode",
                        bench(lambda: selection_importance(q1, k_cmp, lse, **kw, block=block, splits=1)))
                    row("decode_piece", "selection_importance auto split", t, "decode",
                        bench(lambda: selection_importance(q1, k_cmp, lse, **kw, block=block)))
                    idx = pick_top_blocks(selection_importance(q1, k_cmp, lse, **kw, block=block), cur1, **sel)
                    row("decode_piece", "selected_attention+window (old)", t, "decode",
                        bench(lambda: selected_attention(q1, kc, vc, idx, block=block, window=window)))
                    row("decode_piece", "selected_window_decode (new)", t, "decode",
                        bench(lambda: selected_window_decode(q1, kc, vc, idx, block=block, window=window)))
        attempt(f"decode {t}", run_decode)

    log(f"correctness: {sum(checks)}/{len(checks)} OK; rows -> {out_path}")
    print("\nop           impl                                             T      pass      ms")
    for r in rows:
        print(f"{r['op']:12s} {r['impl']:48s} {r['T']:<6d} {r['pass']:8s} {r['ms']:9.4f}")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
