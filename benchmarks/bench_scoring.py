"""Where the union/token scoring's time goes (the packed importance kernel and the top-n: after the selected
branch, the largest pieces of the 64k forward).

1. The packed importance kernel timed as it is and with one part of its work taken out at a time. Each variant
   is the kernel's own source (``nsa_compressed._packed_importance_kernel`` and its per-tile helpers
   ``_raw_lse_step``, ``_importance_tile``) with one textual substitution,
   compiled from a temporary module and launched through ``nsa_compressed._packed_importance`` (so tiles and
   launch settings are the real ones). The variants compute wrong numbers on purpose; only their time matters.
   Then the kernel as it is under other launch settings.
2. The top-n on that importance in both forms of ``nsa_topk.pick_top_blocks`` (the chunked merge, rows held
   whole with the counting search) over a few launch settings; identical indices checked.
3. Precision: the importance of the kernel as it is and with its old mapping against the fp32 reference, and the
   share of rows whose top-n then matches the reference's.

GPU only (or ``--smoke``: tiny sizes under TRITON_INTERPRET=1, to check that every variant still compiles);
writes benchmarks/results/scoring_<gpu>.json.

    python benchmarks/bench_scoring.py [--length 65536]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import sys
import tempfile
from pathlib import Path

import torch

from common import ROOT, bench_ms, environment, gpu_slug, temporarily, write_rows
from nsa_viz.kernels import nsa_compressed, nsa_topk
from nsa_viz.kernels.nsa import compress_mean

# the kernel and the two helpers whose work the variants take out (since run 16 the per-tile steps live there): the
# variants' module defines its own copies, which the kernel then calls
KERNEL = "\n\n".join(inspect.getsource(f.fn) for f in (nsa_compressed._raw_lse_step, nsa_compressed._importance_tile,
                                                       nsa_compressed._packed_importance_kernel))
IMPORTANCE_EXP = "_head_sum(tl.math.exp2(x),"
NO_IMPORTANCE_EXP = "_head_sum(x,"
LSE_STEP = """    m_new, p, alpha = _scaled_softmax_step(m_i, s, qk_scale_log2, MASKED)
    return m_new, l_i * alpha + tl.sum(p, 1)"""
NO_LSE_EXP = "    return tl.maximum(m_i, tl.max(s, 1)), l_i + tl.sum(s, 1)"
MAPPING = ("own = tl.dot(psum, w_own, input_precision=\"ieee\") + carry",
           "carry = tl.dot(psum, w_next, input_precision=\"ieee\")")
# the second pass alone: the LSE comes from compressed_lse (timed on its own as well)
GIVEN_LSE = "importance pass only (LSE given)"
CHEAP_MAP = ("own = tl.sum(tl.reshape(psum, [TOKENS, NUM_SEL, BLOCK_N // NUM_SEL]), 2) + carry", "carry = own * 0.5")
# the mapping as the kernel had it until run 13: an fp32 broadcast-multiply-sum, which Triton 3.6 lowers to TF32 dots
# (Triton 3.9 to IEEE ones)
ONE_TF32 = "eq. 9 mapping as a broadcast-multiply-sum (TF32 dots on Triton 3.6)"

# the mapping's forms below replace the general products, which the paper's setting took until run 14: they
# switch its by-blocks form off first
PRODUCTS = ("if BY_BLOCKS:", "if False:")
VARIANTS = {
    "as is": [],
    "eq. 9 mapping as products (until run 14)": [PRODUCTS],
    "importance pass without exp2": [(IMPORTANCE_EXP, NO_IMPORTANCE_EXP)],
    "LSE pass without exp2 (max and plain sum)": [(LSE_STEP, NO_LSE_EXP)],
    "no exp2 in either pass": [(IMPORTANCE_EXP, NO_IMPORTANCE_EXP), (LSE_STEP, NO_LSE_EXP)],
    "eq. 9 mapping replaced by a reshape-sum": [PRODUCTS] + list(zip(MAPPING, CHEAP_MAP)),
    ONE_TF32: [PRODUCTS] + list(zip(MAPPING, (
        "own = tl.sum(psum[:, :, None] * w_own[None, :, :], 1) + carry",
        "carry = tl.sum(psum[:, :, None] * w_next[None, :, :], 1)"))),
    "eq. 9 mapping as two tf32x3 tl.dot": [PRODUCTS] + list(zip(MAPPING, (
        "own = tl.dot(psum, w_own, input_precision=\"tf32x3\") + carry",
        "carry = tl.dot(psum, w_next, input_precision=\"tf32x3\")"))),
    GIVEN_LSE: [],
}
# the kernel as it is under other launch settings: (rows per program, warps, stages, register cap or None). The caps
# are the largest that give one more program per SM: 256 rows / 8 warps takes 166 registers uncapped (one program,
# 8 warps per SM), capped at 128 it spills 8 bytes (two); 128 rows / 4 warps takes 190 (two programs), 168 spills
# nothing (three: then shared memory, 66 KiB a program, is the limit). 128 rows of a group of 16 are 8 tokens: the
# mapping then takes the multiply-add form, not tl.dot. Counted with benchmarks/inspect_kernel.py on Triton 3.6.
LAUNCHES = [(256, 4, 2, None), (256, 8, 2, None), (256, 8, 2, 128), (128, 4, 2, None), (128, 4, 2, 168)]
PARTS = ("ablation", "launches", "top-n", "precision")
# whole-row top-n settings timed: (rows per program, warps, register cap or None). Uncapped, 2 warps take 202 registers
# (4 programs, 8 warps per SM); capped at 128 (8 bytes spilled) 8 programs fit, at 96 (24 bytes) 10; 4 warps at 96
# spill nothing (5 programs, 20 warps) (benchmarks/inspect_kernel.py topn_whole_rows, Triton 3.6)
TOPN_WHOLE_ROW_SETTINGS = [(4, 2, None), (4, 2, 128), (4, 2, 96), (4, 4, 96), (8, 4, None), (8, 4, 128)]


def variant_kernel(name: str, subs: list, folder: Path):
    source = KERNEL
    for old, new in subs:
        if old not in source:
            raise RuntimeError(f"variant {name!r}: the kernel no longer contains {old!r}; update this benchmark")
        source = source.replace(old, new)
    module = folder / f"importance_variant_{abs(hash(name))}.py"
    module.write_text("import triton\nimport triton.language as tl\n"
                      "from nsa_viz.kernels.nsa_compressed import (_visible_count, _overlap_weights, _tile_weights,"
                      " _map_by_blocks, _head_sum, _key_tile)\n"
                      "from nsa_viz.kernels.block_sparse import _mm, _scaled_softmax_step\n\n" + source)
    spec = importlib.util.spec_from_file_location(module.stem, module)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded._packed_importance_kernel


def top_n_rows(env, importance: torch.Tensor, t: int, hkv: int) -> list:
    cur = torch.arange(t, device=importance.device) // 64
    pick = lambda: nsa_topk.pick_top_blocks_triton(importance, cur, 16, 1, 2)
    rows, want = [], None
    merge = (0, nsa_topk.TOPN_LAUNCH["block_r"], nsa_topk.TOPN_LAUNCH["num_warps"])  # the merge's own settings
    settings = [merge + (None,)] + [(1024, *setting) for setting in TOPN_WHOLE_ROW_SETTINGS]
    launch = nsa_topk.TOPN_WHOLE_ROW_LAUNCH
    for whole_max, block_r, warps, cap in settings:
        with temporarily((nsa_topk, "TOPN_WHOLE_ROW_MAX", whole_max), (launch, "block_r", block_r),
                         (launch, "num_warps", warps), (launch, "maxnreg", cap)):
            got = pick()
            want = got if want is None else want
            ms = bench_ms(pick)
        form = "whole rows" if whole_max else "chunked merge"
        rows.append(dict(env, op="top_n", form=form, block_r=block_r, warps=warps, max_registers=cap, T=t, HKV=hkv,
                         ms=ms, identical_to_merge=bool(torch.equal(got, want))))
        print(f"top-n, {form}" + (f", {block_r} rows, {warps} warps, register cap {cap}" if whole_max else "") +
              f": {ms:.2f} ms, identical to the merge: {rows[-1]['identical_to_merge']}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="ablation variants to time (default: all)")
    ap.add_argument("--precision-length", type=int, default=16384,
                    help="tokens of the precision part (its fp32 reference is slow and large)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    t, hq, hkv, d = (600, 4, 2, 32) if args.smoke else (args.length, 64, 4, 128)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(1, t, hq, d, device=device, dtype=dtype)
    k_cmp = compress_mean(torch.randn(1, t, hkv, d, device=device, dtype=dtype), 32, 16)
    block_n, num_sel = nsa_compressed._importance_tiling(32, 16, 64)
    lse = nsa_compressed.compressed_lse_triton(q, k_cmp, cmp_block=32, cmp_stride=16, kv_len=t)
    runs = {given: (lambda given=given: nsa_compressed._packed_importance(
        q, k_cmp, lse if given else None, 32, 16, 64, d ** -0.5, t, block_n, num_sel)) for given in (False, True)}
    env, rows = environment(device), []
    if "ablation" in args.parts:
        rows += ablation_rows(env, runs, q, k_cmp, t, hq, hkv, d, args.smoke, args.variants)
    if "precision" in args.parts:
        rows += precision_rows(env, device, dtype, 96 if args.smoke else args.precision_length, hq, hkv, d)
    if args.smoke:
        return 0
    if "launches" in args.parts:
        rows += launch_rows(env, runs[False], t, hq, hkv, d)
    if "top-n" in args.parts:
        rows += top_n_rows(env, runs[False](), t, hkv)
    # a run of some parts only gets its own file: the full one keeps all parts
    parts = "" if set(args.parts) == set(PARTS) else "_" + "_".join(args.parts).replace("-", "")
    write_rows(rows, ROOT / "benchmarks" / "results" / f"scoring_{gpu_slug(device)}{parts}.json")
    return 0


@contextlib.contextmanager
def variant_kernels(names):
    """``{name: kernel}`` compiled from temporary modules, importable inside the ``with`` block."""
    with tempfile.TemporaryDirectory() as folder:
        sys.path.append(folder)
        try:
            yield {name: variant_kernel(name, VARIANTS[name], Path(folder)) for name in names}
        finally:
            sys.path.remove(folder)


def precision_rows(env, device, dtype, t, hq, hkv, d) -> list:
    """The importance of the kernel as it is and with the mapping it had until run 13 (one TF32 product) against the
    fp32 reference, and how many rows then pick the same blocks as the reference's importance."""
    torch.manual_seed(1)
    q = torch.randn(1, t, hq, d, device=device, dtype=dtype)
    k_cmp = compress_mean(torch.randn(1, t, hkv, d, device=device, dtype=dtype), 32, 16)
    setting = dict(cmp_block=32, cmp_stride=16, block=64, kv_len=t)
    want = nsa_compressed.compressed_importance_reference(q, k_cmp, **setting)
    cur = torch.arange(t, device=device) // 64
    pick = lambda importance: nsa_topk.pick_top_blocks_triton(importance, cur, 16, 1, 2).sort(-1).values
    want_pick = pick(want)
    rows = []
    with variant_kernels(["as is", ONE_TF32]) as kernels:
        for name, kernel in kernels.items():
            with temporarily((nsa_compressed, "_packed_importance_kernel", kernel)):
                got = nsa_compressed.compressed_importance_triton(q, k_cmp, **setting)
            err = float(((got - want).abs().max() / want.abs().max()).item())
            same = float((pick(got) == want_pick).all(-1).float().mean().item())
            rows.append(dict(env, op="importance_precision", variant=name, T=t, HQ=hq, HKV=hkv, D=d,
                             max_err_vs_fp32_reference=err, rows_same_blocks_as_reference=same))
            print(f"precision, {name}: max |err| / max {err:.1e}, rows picking the reference's blocks {same:.4%}",
                  flush=True)
    return rows


def ablation_rows(env, runs, q, k_cmp, t, hq, hkv, d, smoke: bool, names) -> list:
    """The kernel with one part of its work taken out at a time."""
    rows = []
    if not smoke:
        ms = bench_ms(lambda: nsa_compressed.compressed_lse_triton(q, k_cmp, cmp_block=32, cmp_stride=16, kv_len=t))
        rows.append(dict(env, op="importance_ablation", variant="compressed_lse alone (for reference)", T=t, HQ=hq,
                         HKV=hkv, D=d, ms=ms))
        print(f"compressed_lse alone (for reference): {ms:.2f} ms", flush=True)
    baseline = None
    names = ["as is"] + [name for name in names if name != "as is"]  # the others are compared with it
    with variant_kernels(names) as kernels:
        for name, kernel in kernels.items():
            run = runs[name == GIVEN_LSE]
            with temporarily((nsa_compressed, "_packed_importance_kernel", kernel)):
                got = run()
                baseline = got if baseline is None else baseline
                diff = float(((got - baseline).abs().max() / baseline.abs().max()).item())
                ms = None if smoke else bench_ms(run)
            rows.append(dict(env, op="importance_ablation", variant=name, T=t, HQ=hq, HKV=hkv, D=d, ms=ms,
                             max_diff_vs_as_is=diff))
            print(f"{name}: " + ("compiles and runs" if ms is None else f"{ms:.2f} ms") +
                  f" (max |diff| / max |as is| {diff:.1e})", flush=True)
    return rows


def launch_rows(env, run, t, hq, hkv, d) -> list:
    """The kernel as it is under other launch settings."""
    rows = []
    want = run()
    for rows_per_program, warps, stages, max_registers in LAUNCHES:
        launch = (warps, stages, max_registers)  # no cap where None (block_sparse.launch_options)
        name = f"{rows_per_program} rows, {warps} warps, {stages} stages, register cap {max_registers}"
        try:
            with temporarily((nsa_compressed, "PACKED_ROWS", rows_per_program),
                             (nsa_compressed.LAUNCH_OVERRIDES, "packed_importance", launch)):
                diff = float(((run() - want).abs().max() / want.abs().max()).item())
                ms = bench_ms(run)
        except Exception as exc:  # e.g. out of shared memory
            print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append(dict(env, op="importance_launch", rows_per_program=rows_per_program, warps=warps,
                         stages=stages, max_registers=max_registers, T=t, HQ=hq, HKV=hkv, D=d, ms=ms,
                         max_diff_vs_default=diff))
        print(f"as is, {name}: {ms:.2f} ms (max |diff| / max {diff:.1e})", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
