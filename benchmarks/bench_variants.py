"""A/B of kernel variants against the kernels of another commit, in one process (issue 3's forward target).

The other commit's ``kernels/`` folder is unpacked beside this script as a package (``--baseline DIR``, made with
``git archive <rev> kernels | tar -x -C /tmp/base && mv /tmp/base/kernels benchmarks/baseline_kernels``), so both
versions run on the same inputs in the same call. At T (default 64k), 64/4 heads, d=128, bf16, union/token with
the paper's settings (n=16, l'=64, w=512, l/d=32/16):

1. the selected part's forward (window part given) and the selected attention's forward+backward: the baseline's
   kernels, and ours over the variants named in ``SELECTED_VARIANTS`` (how the loop finds the slots it visits,
   tokens per program);
2. the window part's forward over tile shapes, query heads per program and launch settings;
3. the whole NSA forward and forward+backward: baseline, ours, dense cuDNN beside them.

Every variant's output is compared with the baseline's (max abs difference). GPU only; writes
benchmarks/results/variants_<gpu>.json.

    python benchmarks/bench_variants.py --baseline baseline_kernels [--length 65536] [--sections selected window nsa]
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from common import ROOT, bench_ms, dense_cudnn_step, environment, gpu_slug, temporarily, write_rows
from nsa_viz.kernels import block_sparse, nsa_compressed, nsa_selected, nsa_topk
from nsa_viz.kernels.layout import TokenRule, layout_from_rule
from nsa_viz.kernels.nsa import nsa_attention

BLOCK, WINDOW = 64, 512
# (name, ascending rows, {nsa_selected setting: value}); the one-token forward's launch as "fwd": (warps, stages)
SELECTED_VARIANTS = [
    ("two tokens per program, owned slots read in order", True, dict(FWD_TOKENS_PER_PROGRAM=2)),
    ("one token, owned slots read in order", True, dict(FWD_TOKENS_PER_PROGRAM=1)),
    ("one token, cap 168", True, dict(FWD_TOKENS_PER_PROGRAM=1, fwd=(2, 2, 168))),
]
# the selected attention's forward+backward: (name, {nsa_selected setting: value}), the dQ launch as "dq"
SELECTED_FWD_BWD_VARIANTS = [("owned slots", dict())]
# the packed importance kernel: (name, {setting: value}, (warps, stages, register cap) or None for the committed one)
IMPORTANCE_VARIANTS = [("as committed", {}, None), ("8 warps, 3 stages, cap 128", {}, (8, 3, 128))]
# the whole-row top-n: (name, register cap)
TOPN_VARIANTS = [("as committed (cap 128)", None), ("cap 96", 96)]
# (block_q, block_kv, heads per program, warps, stages); the first is the committed setting, also the baseline's
WINDOW_VARIANTS = [(64, 64, 2, 4, 2), (64, 64, 2, 8, 2), (64, 64, 4, 8, 3)]


def settings(module, values: dict):
    """``temporarily`` changes for ``values``: launch overrides for kernel names ("fwd", "dq", "fwd_tokens", ...) of
    ``module``, else the attribute of that name in ``module`` or, failing that, in nsa_topk or nsa_compressed."""
    changes = []
    for name, value in values.items():
        if name in ("fwd", "dq", "fwd_tokens"):
            changes.append((module.LAUNCH_OVERRIDES, name, value))
        elif name == "packed_importance":
            changes.append((nsa_compressed.LAUNCH_OVERRIDES, name, value))
        else:
            owner = next(m for m in (module, nsa_topk, nsa_compressed) if hasattr(m, name))
            changes.append((owner, name, value))
    return temporarily(*changes)
# the whole forward with these settings (nsa_selected's, else nsa_topk's)
OURS_VARIANTS = [("as committed", {}), ("one token per selected program, cap 168",
                                        dict(FWD_TOKENS_PER_PROGRAM=1, fwd=(2, 2, 168))),
                 ("one token per selected program", dict(FWD_TOKENS_PER_PROGRAM=1))]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def inputs(device, t: int, hq: int, hkv: int, d: int, seed: int, grad: bool = False):
    torch.manual_seed(seed)
    return [torch.randn(1, t, h, d, device=device, dtype=torch.bfloat16, requires_grad=grad) for h in (hq, hkv, hkv)]


def selected_rows(base, device, env, t: int, hq: int = 64, hkv: int = 4, d: int = 128) -> list:
    q, k, v = inputs(device, t, hq, hkv, d, 0)
    scale = d ** -0.5
    with torch.no_grad():
        _, aux = nsa_attention(q, k, v, block=BLOCK, top_n=16, window=WINDOW, return_aux=True)
    idx = aux["block_idx"]
    last = torch.arange(t, device=device).view(1, 1, t, 1) - WINDOW
    owned = float(((idx >= 0) & (idx.long() * BLOCK <= last)).sum()) / (t * hkv)
    print(f"T={t}: {owned:.2f} of {idx.shape[3]} slots per token and kv head own keys before the window", flush=True)
    meta = dict(env, op="selected", T=t, HQ=hq, HKV=hkv, D=d, owned_slots_per_token=owned)
    rows = []
    o_win, lse_win = block_sparse.block_sparse_forward(q, k, v, nsa_selected.window_layout(t, t, WINDOW, d, device),
                                                       scale)
    base_step = lambda: base.nsa_selected.selected_part_forward(q, k, v, idx, o_win, lse_win, BLOCK, scale, WINDOW)
    want = base_step()[0]
    rows.append(dict(meta, case="baseline", ms=bench_ms(base_step), max_abs_diff_to_baseline=0.0))
    print(f"  {rows[-1]['case']}: {rows[-1]['ms']:.2f} ms", flush=True)
    for name, ascending, values in SELECTED_VARIANTS:
        with settings(nsa_selected, values):
            step = lambda: nsa_selected.selected_part_forward(q, k, v, idx, o_win, lse_win, BLOCK, scale, WINDOW,
                                                              ascending)
            try:
                err = max_diff(step()[0], want)
                ms = bench_ms(step)
            except Exception as exc:  # e.g. out of shared memory
                print(f"  {name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
        rows.append(dict(meta, case=name, ms=ms, ascending=ascending, settings=repr(values),
                         max_abs_diff_to_baseline=err))
        print(f"  {name}: {ms:.2f} ms (max abs diff {err:.2g})", flush=True)
    # forward + backward of the selected attention (window part included): the dQ kernel's loop changed too
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    runs = [("baseline", base.nsa_selected, {}, {})] + [(name, nsa_selected, values, dict(rows_from_top_n=True))
                                                        for name, values in SELECTED_FWD_BWD_VARIANTS]
    want = None
    for name, module, values, kw in runs:
        def fwd_bwd():
            out, _ = module.selected_attention_triton(qg, kg, vg, idx, block=BLOCK, scale=scale, window=WINDOW, **kw)
            return torch.autograd.grad(out, (qg, kg, vg), do)
        with settings(module, values):
            got = fwd_bwd()
            want = got if want is None else want
            err = max(max_diff(a, b) for a, b in zip(got, want))
            ms = bench_ms(fwd_bwd)
        rows.append(dict(meta, case=f"selected attention fwd+bwd, {name}", ms=ms, fwd_bwd=True, settings=repr(values),
                         max_abs_grad_diff_to_baseline=err))
        print(f"  {rows[-1]['case']}: {ms:.2f} ms (max abs grad diff {err:.2g})", flush=True)
    return rows


def topn_rows(base, device, env, t: int, hq: int = 64, hkv: int = 4, d: int = 128) -> list:
    """The whole-row top-n on the real 64k importance: the baseline's, then ours over register caps (indices
    compared with the baseline's)."""
    from nsa_viz.kernels.nsa import _pick_rows, compress_kv
    from nsa_viz.kernels.nsa_compressed import compressed_importance
    q, k, v = inputs(device, t, hq, hkv, d, 0)
    k_cmp, _ = compress_kv(k, v, None, 32, 16)
    importance = compressed_importance(q, k_cmp, cmp_block=32, cmp_stride=16, block=BLOCK, scale=d ** -0.5, kv_len=t,
                                       backend="triton")
    args = dict(block=BLOCK, window=WINDOW, select_outside_window=False, top_n=16, init_blocks=1, local_blocks=2,
                backend="triton")
    runs = [("baseline", base.nsa._pick_rows, base.nsa_topk, None)] + [(name, _pick_rows, nsa_topk, cap)
                                                                       for name, cap in TOPN_VARIANTS]
    rows, want = [], None
    for name, pick, module, cap in runs:
        step = lambda: pick(importance, torch.arange(t, device=device), **args)
        launch = dict(module.TOPN_WHOLE_ROW_LAUNCH, **({"maxnreg": cap} if cap else {}))
        with temporarily((module, "TOPN_WHOLE_ROW_LAUNCH", launch)):
            got = step()
            want = got if want is None else want
            same = bool(torch.equal(got, want))
            ms = bench_ms(step)
        rows.append(dict(env, op="top_n", case=name, T=t, HKV=hkv, ms=ms, max_registers=cap,
                         identical_to_baseline=same))
        print(f"  top-n, {name}: {ms:.2f} ms (identical indices: {same})", flush=True)
    return rows


def importance_rows(base, device, env, t: int, hq: int = 64, hkv: int = 4, d: int = 128) -> list:
    """The packed importance kernel (LSE and importance passes): the baseline's, then ours over the variants of
    ``IMPORTANCE_VARIANTS``; each result compared with the baseline's (largest difference relative to its largest
    value, and the share of rows whose top-n picks the baseline's blocks)."""
    from nsa_viz.kernels.nsa import _pick_rows, compress_kv
    q, k, v = inputs(device, t, hq, hkv, d, 0)
    k_cmp, _ = compress_kv(k, v, None, 32, 16)
    args = dict(cmp_block=32, cmp_stride=16, block=BLOCK, scale=d ** -0.5, kv_len=t)
    pick = lambda imp: _pick_rows(imp, torch.arange(t, device=device), block=BLOCK, window=WINDOW,
                                  select_outside_window=False, top_n=16, init_blocks=1, local_blocks=2,
                                  backend="triton")
    runs = [("baseline", base.nsa_compressed, {}, None)] + [(name, nsa_compressed, values, launch)
                                                           for name, values, launch in IMPORTANCE_VARIANTS]
    rows, want, chosen = [], None, None
    for name, module, values, launch in runs:
        step = lambda: module.compressed_importance_triton(q, k_cmp, **args)
        pinned = [(module.LAUNCH_OVERRIDES, "packed_importance", launch)] if launch else []
        with settings(module, values), temporarily(*pinned):
            try:
                got = step()
                want = got if want is None else want
                err = max_diff(got, want) / float(want.abs().max())
                picked = pick(got)
                chosen = picked if chosen is None else chosen
                same_rows = float((picked == chosen).all(-1).float().mean())
                ms = bench_ms(step)
            except Exception as exc:
                print(f"  importance, {name}: {type(exc).__name__}: {str(exc)[:160]}")
                continue
        rows.append(dict(env, op="importance", case=name, T=t, HQ=hq, HKV=hkv, D=d, ms=ms, settings=repr(values),
                         launch=repr(launch), max_rel_diff_to_baseline=err, rows_with_the_baselines_blocks=same_rows))
        print(f"  importance, {name}: {ms:.2f} ms (max diff {err:.2g} of the largest; rows picking the baseline's "
              f"blocks {same_rows:.6f})", flush=True)
    return rows


def window_rows(base, device, env, t: int, hq: int = 64, hkv: int = 4, d: int = 128) -> list:
    q, k, v = inputs(device, t, hq, hkv, d, 1)
    scale = d ** -0.5
    rows, want = [], None
    runs = [(base.block_sparse, "baseline, ") + WINDOW_VARIANTS[0]] + [(block_sparse, "") + w for w in WINDOW_VARIANTS]
    for module, who, block_q, block_kv, heads, warps, stages in runs:
        layout = layout_from_rule(TokenRule(causal=True, window=WINDOW), t, t, block_q, block_kv, device=device)
        with temporarily((module, "FWD_HEADS_PER_PROGRAM", heads),
                         (module.LAUNCH_OVERRIDES, "fwd", (warps, stages))):
            step = lambda: module.block_sparse_forward(q, k, v, layout, scale)
            try:
                got = step()
                want = got if want is None else want
                err = max(max_diff(got[0], want[0]), max_diff(got[1], want[1]))
                ms = bench_ms(step)
            except Exception as exc:  # e.g. out of shared memory or registers
                print(f"  window {block_q}x{block_kv}, {heads} heads, {warps}/{stages}: {type(exc).__name__}: "
                      f"{str(exc)[:160]}", flush=True)
                continue
        rows.append(dict(env, op="window_forward", case=f"{who}{block_q}x{block_kv} tiles, {heads} heads per program, "
                         f"{warps} warps, {stages} stages", T=t, HQ=hq, HKV=hkv, D=d, ms=ms, block_q=block_q,
                         block_kv=block_kv, heads_per_program=heads, warps=warps, stages=stages,
                         max_abs_diff_to_first=err))
        print(f"  {rows[-1]['case']}: {ms:.2f} ms (max abs diff {err:.2g})", flush=True)
    return rows


def nsa_rows(base, device, env, t: int, hq: int = 64, hkv: int = 4, d: int = 128) -> list:
    """The whole union/token forward and forward+backward: baseline, ours, dense cuDNN."""
    q, k, v = inputs(device, t, hq, hkv, d, 2, grad=True)
    do = torch.randn_like(q)

    def ours(values: dict):
        def step():
            with settings(nsa_selected, values):
                return nsa_attention(q, k, v)
        return step

    steps = {"dense cuDNN": dense_cudnn_step(q, k, v), "NSA union/token, baseline": lambda: base.nsa.nsa_attention(q, k, v)}
    steps.update({f"NSA union/token, ours, {name}": ours(values) for name, values in OURS_VARIANTS})
    rows, want = [], None
    for name, step in steps.items():
        with torch.no_grad():
            got = step()
            fwd = bench_ms(step)
        err = None if name.startswith("dense") else (0.0 if want is None else max_diff(got, want))
        want = got if (want is None and not name.startswith("dense")) else want
        fwd_bwd = bench_ms(lambda: torch.autograd.grad(step(), (q, k, v), do))
        rows.append(dict(env, op="end_to_end", case=name, T=t, HQ=hq, HKV=hkv, D=d, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                         max_abs_diff_to_baseline=err))
        print(f"  {name}: fwd {fwd:.2f} ms, fwd+bwd {fwd_bwd:.2f} ms (max abs diff {err})", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="package folder beside this script with the other kernels")
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--sections", nargs="*", default=["selected", "importance", "topn", "window", "nsa"],
                    choices=["selected", "importance", "topn", "window", "nsa"])
    ap.add_argument("--tag", default="", help="suffix of the result file")
    args = ap.parse_args()
    device = torch.device("cuda")
    env = environment(device)
    base = importlib.import_module(args.baseline)
    for name in ("nsa", "nsa_selected", "nsa_compressed", "block_sparse", "nsa_topk"):
        setattr(base, name, importlib.import_module(f"{args.baseline}.{name}"))
    rows = []
    if "selected" in args.sections:
        rows += selected_rows(base, device, env, args.length)
    if "importance" in args.sections:
        rows += importance_rows(base, device, env, args.length)
    if "topn" in args.sections:
        rows += topn_rows(base, device, env, args.length)
    if "window" in args.sections:
        rows += window_rows(base, device, env, args.length)
    if "nsa" in args.sections:
        rows += nsa_rows(base, device, env, args.length)
    write_rows(rows, ROOT / "benchmarks" / "results" / f"variants_{gpu_slug(device)}{args.tag}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
