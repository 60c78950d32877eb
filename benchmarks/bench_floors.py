"""Hardware floors under our two missed targets (issue 3), measured the way the benchmarks time the kernels.

1. Decode: what a step costs before it does any work. Near-empty Triton kernels in a CUDA graph: one empty
   program; 256 programs that each load a 64 x 128 bf16 tile (one trip to memory); the same with ``rounds``
   dependent loads in a row (each address depends on the value loaded before), what a chain of dependent
   stages costs at least.
2. Forward at token granularity: the selected branch's bytes. At T (default 64k), 64/4 heads, d=128, bf16,
   on the blocks the real selection picks (union/token, paper settings): a kernel that only loads the K and V
   tiles the selected-block kernel loads, in the same order (its time is the gather's floor on this GPU),
   against the selected-block kernel itself over a few launch settings, the window part alone beside them,
   the selected attention's forward+backward over dQ launch settings; then the whole NSA forward (and
   forward+backward), dense cuDNN beside it.

GPU only; writes benchmarks/results/floors_<gpu>.json.

    python benchmarks/bench_floors.py [--length 65536] [--skip-launch]
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from common import ROOT, bench_ms, capture_graph, dense_cudnn_step, environment, gpu_slug, temporarily, write_rows
from nsa_viz.kernels import nsa_selected
from nsa_viz.kernels.block_sparse import _strides, block_sparse_forward
from nsa_viz.kernels.nsa import nsa_attention
from nsa_viz.kernels.nsa_selected import _slot_tile

BLOCK, WINDOW = 64, 512


@triton.jit
def _empty_kernel(X):
    pass


@triton.jit
def _chained_loads_kernel(X, OUT, rounds, N: tl.constexpr, D: tl.constexpr):
    """Each program loads an [N, D] tile, then ``rounds - 1`` more whose offset depends on the last one's sum
    (always 0 here, but the hardware cannot know): ``rounds`` trips to memory in series."""
    pid = tl.program_id(0)
    offs = tl.arange(0, N)[:, None] * D + tl.arange(0, D)[None, :]
    shift = pid * N * D
    total = tl.zeros([], tl.float32)
    for _ in range(rounds):
        x = tl.load(X + shift + offs).to(tl.float32)
        total += tl.sum(x)
        shift += (total * 0.0).to(tl.int32)
    tl.store(OUT + pid, total)


@triton.jit
def _gather_selected_kernel(K, V, IDX, OUT, skb, skt, skh, skd, sib, sih, sit, sin, num_kv_heads, n_slots, q_offset,
                            BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr):
    """The loads of ``_sel_fwd_kernel`` (same grid, same blocks, same keys) and nothing else: the K and V tiles
    are summed so that they must be read."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    hk = bh % num_kv_heads
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    base = b.to(tl.int64) * skb + hk * skh
    idx_base = IDX + b.to(tl.int64) * sib + hk * sih + i.to(tl.int64) * sit
    last = q_offset + i - WINDOW
    total = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for n in range(0, n_slots):
        one = tl.arange(0, 1)
        first, kmask = _slot_tile(tl.load(idx_base + n * sin + one), 0, offs_n, tl.full([1], last, tl.int32), BLOCK)
        ptrs = base + (tl.sum(first, 0).to(tl.int64) + offs_n[:, None]) * skt + offs_d[None, :] * skd
        total += tl.load(K + ptrs, mask=tl.trans(kmask), other=0.0).to(tl.float32)
        total += tl.load(V + ptrs, mask=tl.trans(kmask), other=0.0).to(tl.float32)
    tl.store(OUT + bh * tl.num_programs(0) + i, tl.sum(total))


def launch_rows(device, env) -> list:
    programs, n, d = 256, 64, 128
    x = torch.zeros(programs * n * d, device=device, dtype=torch.bfloat16)
    out = torch.empty(programs, device=device)
    steps = {"empty kernel, 1 program": lambda: _empty_kernel[(1,)](x)}
    for rounds in (1, 2, 4, 8):
        steps[f"{programs} programs, {rounds} dependent loads of 16 KB"] = (
            lambda r=rounds: _chained_loads_kernel[(programs,)](x, out, r, N=n, D=d))
    rows = []
    for name, step in steps.items():
        step()
        eager = bench_ms(step) * 1e3
        graph = bench_ms(capture_graph(step).replay) * 1e3
        rows.append(dict(env, op="launch_floor", case=name, eager_us=eager, graph_us=graph))
        print(f"{name}: eager {eager:.1f} us, graph {graph:.1f} us", flush=True)
    return rows


# the selected kernel's launch settings timed: (warps, stages, key tile, register cap per thread or None). At 2 warps
# it takes 204 registers uncapped, so registers hold it to 4 programs (8 warps) per SM; 168 allows 6 and 128 allows
# 8, where shared memory (38 KiB a program) allows at most 5 (benchmarks/inspect_kernel.py selected_fwd) and ncu
# reported 4 at 16k (the driver's carve-out): so a cap could not add programs there (NOTES run 13)
SELECTED_LAUNCHES = [(2, 2, 64, None), (2, 2, 64, 168), (2, 2, 64, 128), (4, 2, 64, None), (2, 2, 32, 128)]
# the batched kernel, tokens per program (one warp per token at 2 warps): (tokens, warps, stages, register cap)
SELECTED_TOKEN_LAUNCHES = [(2, 2, 2, None), (2, 2, 2, 168), (2, 4, 2, None), (4, 4, 2, None), (2, 2, 3, None)]


def launch_settings(kernel: str, warps: int, stages: int, tile: int, max_registers=None, tokens: int = 1):
    """One selected-attention kernel's launch settings (a register cap per thread if given) and key tile for a
    ``with`` block; the forward with ``tokens`` query tokens per program ("fwd_tokens" when more than one)."""
    tiles = "fwd" if kernel == "fwd_tokens" else kernel  # both forward kernels read the forward's key tile
    return temporarily((nsa_selected.LAUNCH_OVERRIDES, kernel, (warps, stages, max_registers)),
                       (nsa_selected.TILE_OVERRIDES, tiles, tile), (nsa_selected, "FWD_TOKENS_PER_PROGRAM", tokens))


def selected_rows(device, env, t: int, hq: int = 64, hkv: int = 4, d: int = 128) -> list:
    torch.manual_seed(0)
    q = torch.randn(1, t, hq, d, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, t, hkv, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    scale = d ** -0.5
    with torch.no_grad():
        _, aux = nsa_attention(q, k, v, block=BLOCK, top_n=16, window=WINDOW, return_aux=True)
    idx = aux["block_idx"]
    del aux
    # the bytes the selected part must move: keys of valid slots that lie before the window
    last = torch.arange(t, device=device).view(1, 1, t, 1) - WINDOW
    start = idx.long() * BLOCK
    keys = torch.where(idx >= 0, (last - start + 1).clamp(0, BLOCK), 0)
    gbytes = float(keys.sum()) * d * 2 * 2 / 1e9
    base = dict(env, op="selected_floor", T=t, HQ=hq, HKV=hkv, D=d, block=BLOCK, window=WINDOW, gbytes=gbytes,
                blocks_per_token=float((keys > 0).sum()) / (t * hkv))
    print(f"T={t}: the selected part reads {gbytes:.1f} GB ({base['blocks_per_token']:.2f} blocks per token and "
          f"kv head outside the window)", flush=True)
    rows = []

    def record(case, ms, **extra):
        rows.append(dict(base, case=case, ms=ms, tb_per_s=gbytes / ms, **extra))
        print(f"  {case}: {ms:.2f} ms, {gbytes / ms:.2f} TB/s", flush=True)

    out = torch.empty(hkv, t, device=device)
    gather = lambda: _gather_selected_kernel[(t, hkv)](k, v, idx, out, *_strides(k), *_strides(idx), hkv,
                                                       idx.shape[3], 0, BLOCK=BLOCK, HEAD_DIM=d, WINDOW=WINDOW,
                                                       num_warps=4, num_stages=2)
    record("loads only (gather floor)", bench_ms(gather))
    layout = nsa_selected.window_layout(t, t, WINDOW, d, device)
    window = lambda: block_sparse_forward(q, k, v, layout, scale)
    o_win, lse_win = window()
    record("window part (block-sparse kernel), for reference", bench_ms(window))
    reference = None
    for warps, stages, tile, cap in SELECTED_LAUNCHES:
        with launch_settings("fwd", warps, stages, tile, cap):
            step = lambda: nsa_selected.selected_part_forward(q, k, v, idx, o_win, lse_win, BLOCK, scale, WINDOW,
                                                              True)  # the top-n's rows, as nsa_attention runs them
            try:
                got = step()[0]
                same = reference is None or bool(torch.equal(got, reference))
                reference = got if reference is None else reference
                record(f"selected kernel, {warps} warps, {stages} stages, {tile}-key tiles, register cap {cap}",
                       bench_ms(step), warps=warps, stages=stages, key_tile=tile, max_registers=cap,
                       bit_equal_to_first=same)
            except Exception as exc:  # e.g. out of shared memory
                print(f"  {warps}/{stages}/{tile}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    for tokens, warps, stages, cap in SELECTED_TOKEN_LAUNCHES:
        with launch_settings("fwd_tokens", warps, stages, BLOCK, cap, tokens):
            step = lambda: nsa_selected.selected_part_forward(q, k, v, idx, o_win, lse_win, BLOCK, scale, WINDOW,
                                                              True)  # the top-n's rows, as nsa_attention runs them
            try:
                got = step()[0]
                err = float((got.float() - reference.float()).abs().max())
                record(f"selected kernel, {tokens} tokens per program, {warps} warps, {stages} stages, register cap "
                       f"{cap}", bench_ms(step), tokens_per_program=tokens, warps=warps, stages=stages,
                       max_registers=cap, max_abs_diff_to_first=err)
            except Exception as exc:
                print(f"  {tokens} tokens {warps}/{stages}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    # the same kernel with every slot that selects keys pointing at block 0 instead: the same loop, masks and
    # products, but its loads hit the cache (one 32 KB block per kv head): what its compute chain costs alone
    cached = torch.where(keys > 0, 0, -1).to(idx.dtype)
    step = lambda: nsa_selected.selected_part_forward(q, k, v, cached, o_win, lse_win, BLOCK, scale, WINDOW)
    record("selected kernel (default launch), every selecting slot on block 0: the compute chain alone",
           bench_ms(step), cached_loads=True)
    # forward + backward of the whole selected attention (window part included) over dQ launch settings
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)

    def fwd_bwd():
        out, _ = nsa_selected.selected_attention_triton(qg, kg, vg, idx, block=BLOCK, scale=scale, window=WINDOW,
                                                        rows_from_top_n=True)
        return torch.autograd.grad(out, (qg, kg, vg), do)

    first = None
    for warps, stages in ((4, 2), (2, 2), (8, 2)):
        with launch_settings("dq", warps, stages, 64):
            got = fwd_bwd()
            same = first is None or all(torch.equal(a, b) for a, b in zip(got, first))
            first = got if first is None else first
            ms = bench_ms(fwd_bwd)
            rows.append(dict(base, case=f"selected attention fwd+bwd, dQ {warps} warps, {stages} stages", ms=ms,
                             dq_warps=warps, dq_stages=stages, grads_bit_equal_to_first=same, fwd_bwd=True))
            print(f"  {rows[-1]['case']}: {ms:.2f} ms", flush=True)
    return rows


def end_to_end_rows(device, env, t: int, hq: int = 64, hkv: int = 4, d: int = 128) -> list:
    """NSA union/token forward and forward+backward (default launch settings), dense cuDNN beside them."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, t, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
               for h in (hq, hkv, hkv))
    do = torch.randn_like(q)
    rows = []
    dense = dense_cudnn_step(q, k, v)

    def nsa(tokens_per_program: int):
        def step():
            with temporarily((nsa_selected, "FWD_TOKENS_PER_PROGRAM", tokens_per_program)):
                return nsa_attention(q, k, v, block=BLOCK, window=WINDOW)
        return step

    steps = {"dense cuDNN": dense, "NSA union/token, selected forward 1 token per program": nsa(1),
             "NSA union/token, selected forward 2 tokens per program": nsa(2)}
    for name, step in steps.items():
        with torch.no_grad():
            fwd = bench_ms(step)
        fwd_bwd = bench_ms(lambda: torch.autograd.grad(step(), (q, k, v), do))
        rows.append(dict(env, op="end_to_end", case=name, T=t, HQ=hq, HKV=hkv, D=d, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd))
        print(f"  {name}: fwd {fwd:.2f} ms, fwd+bwd {fwd_bwd:.2f} ms", flush=True)
    return rows


def overlap_rows(device, env, t: int, hq: int = 64, hkv: int = 4, d: int = 128) -> list:
    """The union/token forward as its four steps (compression, importance, top-n, window + selected), with the
    window part run serially or on a second stream while the importance and the top-n run (it needs no
    selection): whether the two kernels, each short of warps per SM, fill each other's idle issue slots."""
    from nsa_viz.kernels.nsa import _pick_rows, compress_kv
    from nsa_viz.kernels.nsa_compressed import compressed_importance
    torch.manual_seed(2)
    q = torch.randn(1, t, hq, d, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, t, hkv, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    scale = d ** -0.5
    layout = nsa_selected.window_layout(t, t, WINDOW, d, device)
    side = torch.cuda.Stream(device)

    def forward(overlap: bool):
        main = torch.cuda.current_stream(device)
        if overlap:
            side.wait_stream(main)
            with torch.cuda.stream(side):
                o_win, lse_win = block_sparse_forward(q, k, v, layout, scale)
        k_cmp, _ = compress_kv(k, v, None, 32, 16)
        importance = compressed_importance(q, k_cmp, cmp_block=32, cmp_stride=16, block=BLOCK, scale=scale, kv_len=t,
                                           backend="triton")
        chosen = _pick_rows(importance, torch.arange(t, device=device), block=BLOCK, window=WINDOW,
                            select_outside_window=False, top_n=16, init_blocks=1, local_blocks=2, backend="triton")
        if overlap:
            main.wait_stream(side)
            for x in (o_win, lse_win):
                x.record_stream(main)
        else:
            o_win, lse_win = block_sparse_forward(q, k, v, layout, scale)
        return nsa_selected.selected_part_forward(q, k, v, chosen, o_win, lse_win, BLOCK, scale, WINDOW, True)[0]

    with torch.no_grad():
        whole = nsa_attention(q, k, v, block=BLOCK, window=WINDOW, backend="triton")
        rows = []
        for overlap in (False, True):
            same = bool(torch.equal(forward(overlap), whole))
            ms = bench_ms(lambda: forward(overlap))
            case = "window on a second stream" if overlap else "steps in one stream"
            rows.append(dict(env, op="forward_overlap", case=case, T=t, HQ=hq, HKV=hkv, D=d, fwd_ms=ms,
                             bit_equal_to_nsa_attention=same))
            print(f"  union/token forward, {case}: {ms:.2f} ms (equal to nsa_attention: {same})", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--skip-launch", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda")
    env = environment(device)
    rows = [] if args.skip_launch else launch_rows(device, env)
    rows += selected_rows(device, env, args.length)
    rows += overlap_rows(device, env, args.length)
    rows += end_to_end_rows(device, env, args.length)
    suffix = "_no_launch" if args.skip_launch else ""  # a partial run does not replace the full file
    write_rows(rows, ROOT / "benchmarks" / "results" / f"floors_{gpu_slug(device)}{suffix}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
