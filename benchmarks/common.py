"""What every GPU benchmark here shares: environment facts, timing, result rows (schema in README)."""
from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a bare checkout too


def environment() -> dict:
    import triton
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat()}


def bench_ms(fn, warmup_ms: int = 100, rep_ms: int = 400) -> float:
    """Median milliseconds with CUDA events (triton.testing.do_bench), after warm-up."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def write_rows(rows: list, path: Path) -> None:
    """Write the rows of this run (a list of objects, one per implementation × shape × pass)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    out = os.environ.get("OUT")
    if out:
        Path(out, path.name).write_text(json.dumps(rows, indent=1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    return ((a - b)[finite].norm() / b[finite].norm().clamp_min(1e-6)).item()
