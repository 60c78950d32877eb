"""Compile one of our Triton kernels for a Hopper GPU on a machine without one, and show what the GPU would run:
registers per thread, spill stack, shared memory (cuobjdump on the cubin), and the TTGIR operations that matter
for speed (layout conversions through shared memory, wgmma, reductions) or precision (fp32 products lowered to
TF32 ``tt.dot``). Free, unlike device time: use it before a GPU call to see whether a change fits, e.g. whether a
register cap lets one more program onto an SM.

    python benchmarks/inspect_kernel.py packed_importance [--warps 8] [--stages 2] [--maxnreg 128] [--dump DIR]
    python benchmarks/inspect_kernel.py selected_fwd --warps 4
    python benchmarks/inspect_kernel.py window_fwd --sass   # instructions per loop iteration, by opcode

Integer arguments are specialised as a real launch does (1 becomes a constant, multiples of 16 are marked so),
from the 64k shapes of the presets below. The Triton installed here compiles: the GPU image's version (3.6) can
differ in details; install it beside (``pip install --target DIR triton==3.6.0``) and put DIR first on PYTHONPATH
to match it exactly.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from common import ROOT  # noqa: F401  (puts the checkout on the path)

T = 65536
# (module, kernel, representative arguments, constexprs): 64k tokens, 64 query / 4 kv heads, d=128, bf16
PRESETS = {
    "packed_importance": ("nsa_compressed", "_packed_importance_kernel", dict(
        Q="*bf16", K="*bf16", LSE="*fp32", IMP="*fp32", sqb=T * 8192, sqt=8192, sqh=128, sqd=1, skb=4095 * 512,
        skt=512, skh=128, skd=1, slb=0, slt=0, slh=0, sib=4 * T * 1024, sih=T * 1024, sit=1024, sis=1, q_len=T,
        num_cmp=4095, num_sel=1024, num_kv_heads=4, q_offset=0, qk_scale_log2=0.1), dict(
        GROUP=16, GROUP_P=16, TOKENS=16, HEAD_DIM=128, BLOCK_N=64, NUM_SEL=16, CMP_BLOCK=32, CMP_STRIDE=16,
        SEL_BLOCK=64, PRECISION="tf32", FIND_LSE=True, BY_BLOCKS=True, SPREAD=True)),
    "topn_whole_rows": ("nsa_topk", "_topn_whole_rows_kernel", dict(
        S="*fp32", CUR="*i32", OUT="*i32", ssb=4 * T * 1024, ssh=T * 1024, ssr=1024, sss=1, sob=4 * T * 16, soh=T * 16,
        sor=16, son=1, n_rows=T, num_sel=1024, num_heads=4, init_blocks=1, local_blocks=2), dict(
        TOP_N=16, NP=16, BLOCK_R=4, COLS=1024)),
    "selected_fwd": ("nsa_selected", "_sel_fwd_kernel", dict(
        Q="*bf16", K="*bf16", V="*bf16", IDX="*i32", O="*bf16", LSE="*fp32", OW="*bf16", LSEW="*fp32",
        sqb=T * 8192, sqt=8192, sqh=128, sqd=1, skb=T * 512, skt=512, skh=128, skd=1, svb=T * 512, svt=512,
        svh=128, svd=1, sob=T * 8192, sot=8192, soh=128, sod=1, sib=4 * T * 16, sih=T * 16, sit=16, sin=1,
        swb=T * 8192, swt=8192, swh=128, swd=1, q_len=T, num_q_heads=64, num_kv_heads=4, n_slots=16, q_offset=0,
        qk_scale_log2=0.1), dict(GROUP=16, ROWS=16, HEAD_DIM=128, BLOCK=64, BLOCK_N=64, WINDOW=512, PRECISION="tf32", SLOTS=16, ASCENDING=True)),
}
# the NSA window part: block-sparse forward on a sliding-window layout, two query heads per program
PRESETS["window_fwd"] = ("block_sparse", "_fwd_kernel", dict(
    Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", sqb=T * 8192, sqt=8192, sqh=128, sqd=1, skb=T * 512,
    skt=512,
    skh=128, skd=1, svb=T * 512, svt=512, svh=128, svd=1, sob=T * 8192, sot=8192, soh=128, sod=1, FULL_IDX="*i32",
    FULL_CNT="*i32", PART_IDX="*i32", PART_CNT="*i32", PART_TID="*i32", layout_heads=1, num_rows=1024, full_w=16,
    part_w=16, GLOB="*i8", BITS="*i8", q_len=T, kv_len=T, num_q_heads=64, q_offset=0, qk_scale_log2=0.1), dict(
    GROUP=16, HEAD_DIM=128, BLOCK_Q=64, BLOCK_KV=64, CAUSAL=True, WINDOW=512, SINK=0, DIL_BLOCK=1, DIL_STRIDE=1,
    HAS_GLOBAL=False, HAS_BITS=False, LAYOUT_PER_BATCH=False, LAYOUT_PER_HEAD=False, PRECISION="tf32", HEADS=2))
# the same launch with two query tokens per program (one warp each)
PRESETS["selected_fwd_tokens"] = ("nsa_selected", "_sel_fwd_tokens_kernel", PRESETS["selected_fwd"][2],
                                  dict(PRESETS["selected_fwd"][3], TOKENS=2))
# what each preset's kernel is launched with on the GPU: (warps, stages, register cap or None)
LAUNCHES = {"window_fwd": (4, 2, None), "packed_importance": (8, 2, 128), "topn_whole_rows": (2, 2, 128),
            "selected_fwd": (2, 2, None), "selected_fwd_tokens": (2, 2, None)}
# pointer arguments that are not bf16 tensors whatever the preset (the packed importance kernel's row order)
INT_POINTERS = {"ROW_TOKEN": "*i32", "ROW_HEAD": "*i32"}
# TTGIR operations worth counting: data through shared memory, tensor-core products, reductions
WATCHED = ("ttg.convert_layout", "ttg.local_alloc", "ttg.local_load", "ttng.warp_group_dot ", "tt.dot ", '"tt.reduce"(')


def _constexpr(text: str):
    """A ``--set`` value: True, False, an int or a float."""
    if text in ("True", "False"):
        return text == "True"
    return float(text) if "." in text else int(text)


def signature(fn, consts: dict, args: dict):
    """``(signature, constexprs, attributes)`` as a launch with ``args`` would specialise them; an argument missing
    from ``args`` is an int32 pointer if INT_POINTERS names it, a bf16 pointer if its name is upper case, else a
    32-bit integer."""
    sig, consts, attrs = {}, dict(consts), {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        value = args.get(name, INT_POINTERS.get(name, "*bf16" if name.isupper() else 16))
        if isinstance(value, str):  # a pointer type: allocations are 16-byte aligned
            sig[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_for_gpu(fn, consts: dict, args: dict | None = None, *, capability: int = 90, **options):
    """The ``triton.compile`` result of jitted ``fn`` for ``sm_<capability>`` (``options``: num_warps, num_stages,
    maxnreg); its ``asm`` holds ttir, ttgir, ptx and cubin. Needs no GPU, and no interpreter: run it in a
    process without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, consts, attrs = signature(fn, consts, args or {})
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", capability, 32),
                          options=options)


def resources(compiled, folder: Path) -> dict:
    """Registers per thread, stack (spills) and static shared memory of the cubin, read by Triton's cuobjdump."""
    import triton
    cubin = folder / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", text))
    return dict(registers=int(found["REG"]), stack_bytes=int(found["STACK"]),
                shared_bytes=int(compiled.metadata.shared))


def loop_opcodes(cubin: Path, top: int = 12) -> list:
    """``[(start, end, instructions, [(opcode, count), ...])]`` for each loop of the cubin's SASS (a branch back to an
    earlier address; bodies of at most 4000 instructions, so not the unrolled whole-kernel jumps): where a kernel
    spends its instructions per iteration, e.g. address arithmetic against products and exponentials."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*)", text)
    ins = [(int(at, 16), op.split(".")[0], arg) for at, op, arg in found]
    loops = []
    for at, op, arg in ins:
        target = re.search(r"0x([0-9a-f]+)", arg) if op == "BRA" else None
        if target and int(target.group(1), 16) < at:
            body = [o for a, o, _ in ins if int(target.group(1), 16) <= a <= at]
            if len(body) <= 4000:
                counts = sorted(((o, body.count(o)) for o in set(body)), key=lambda x: -x[1])
                loops.append((int(target.group(1), 16), at, len(body), counts[:top]))
    return loops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("--warps", type=int, default=None, help="default: the kernel's own launch (LAUNCHES)")
    ap.add_argument("--stages", type=int, default=None)
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread (a launch option)")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override constexprs (ints, floats, True or False)")
    ap.add_argument("--dump", type=Path, default=None, help="write ttgir, ptx and the cubin here")
    ap.add_argument("--sass", action="store_true", help="count each loop's SASS instructions by opcode")
    args = ap.parse_args()
    import importlib
    import tempfile
    module, name, values, consts = PRESETS[args.preset]
    fn = getattr(importlib.import_module(f"nsa_viz.kernels.{module}"), name)
    consts = dict(consts, **{k: _constexpr(v) for k, v in (item.split("=") for item in args.set)})
    own_warps, own_stages, own_cap = LAUNCHES[args.preset]
    if args.warps is None and args.stages is None and args.maxnreg is None:
        args.maxnreg = own_cap
    args.warps = own_warps if args.warps is None else args.warps
    args.stages = own_stages if args.stages is None else args.stages
    options = dict(num_warps=args.warps, num_stages=args.stages)
    if args.maxnreg:
        options["maxnreg"] = args.maxnreg
    compiled = compile_for_gpu(fn, consts, values, **options)
    folder = args.dump or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    use = resources(compiled, folder)
    # an SM's 64K registers go to warps in units of 256; 228 KiB of shared memory at most, 1 KiB of it reserved per
    # program (the driver may choose a smaller carve-out: ncu's "Block Limit Shared Mem" says what it did)
    per_warp = -(-32 * use["registers"] // 256) * 256
    by_registers = 65536 // per_warp // args.warps
    by_shared = (228 * 1024) // (use["shared_bytes"] + 1024)
    print(f"{name}, {args.warps} warps, {args.stages} stages, cap {args.maxnreg}: {use['registers']} registers, "
          f"{use['stack_bytes']} bytes of stack, {use['shared_bytes'] / 1024:.1f} KiB shared: programs per SM: "
          f"registers allow {by_registers}, shared memory at most {by_shared}")
    ttgir = compiled.asm["ttgir"]
    print("  " + ", ".join(f"{re.sub(r'[^a-z_.]', '', op)} {ttgir.count(op)}" for op in WATCHED))
    if args.sass:
        for start, end, n, counts in loop_opcodes(folder / "kernel.cubin"):
            print(f"  loop {start:#x}-{end:#x}: {n} instructions: " + ", ".join(f"{o} {c}" for o, c in counts))
    if args.dump:
        for ext in ("ttgir", "ptx"):
            (folder / f"kernel.{ext}").write_text(compiled.asm[ext])
        print(f"  written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
