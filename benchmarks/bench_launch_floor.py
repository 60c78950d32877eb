"""What a decode step costs before it does any work: the time of near-empty Triton kernels in a CUDA graph,
timed as every decode benchmark here times (``triton.testing.do_bench``: L2 flushed before each call).

Rows: one empty program; 256 programs that each load a 64 x 128 bf16 tile (one trip to memory); the same with
``rounds`` dependent loads in a row (each address depends on the value loaded before), which is what a chain
of dependent stages costs at least. GPU only; writes benchmarks/results/launch_floor_<gpu>.json.

    python benchmarks/bench_launch_floor.py
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from common import ROOT, bench_ms, capture_graph, environment, gpu_slug, write_rows


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


def main() -> int:
    device = torch.device("cuda")
    programs, n, d = 256, 64, 128
    x = torch.zeros(programs * n * d, device=device, dtype=torch.bfloat16)
    out = torch.empty(programs, device=device)
    steps = {"empty kernel, 1 program": lambda: _empty_kernel[(1,)](x)}
    for rounds in (1, 2, 4, 8):
        steps[f"{programs} programs, {rounds} dependent loads of 16 KB"] = (
            lambda r=rounds: _chained_loads_kernel[(programs,)](x, out, r, N=n, D=d))
    env = environment(device)
    rows = []
    for name, step in steps.items():
        step()
        eager = bench_ms(step) * 1e3
        graph = bench_ms(capture_graph(step).replay) * 1e3
        rows.append(dict(env, op="launch_floor", case=name, eager_us=eager, graph_us=graph))
        print(f"{name}: eager {eager:.1f} us, graph {graph:.1f} us", flush=True)
    write_rows(rows, ROOT / "benchmarks" / "results" / f"launch_floor_{gpu_slug(device)}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
