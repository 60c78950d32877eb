"""Where a call waits on the GPU: the device-to-host reads (``torch.cuda.set_sync_debug_mode``) of one NSA forward,
each with the line of our code that asked for it. A layout or index built on every call that reads a width or
a count back makes the GPU idle while the host catches up, which shows at short lengths (NOTES run 16).

    python benchmarks/find_syncs.py [--length 8192] [--heads 9/3/64] [--granularity block]

GPU only (on the CPU nothing synchronises).
"""
from __future__ import annotations

import argparse
import sys
import traceback
import warnings

import torch

from common import ROOT  # noqa: F401  (puts the checkout on the path)
from nsa_viz.kernels.nsa import nsa_attention


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", default="9/3/64", help="query heads / kv heads / head dim")
    ap.add_argument("--granularity", default="block", choices=["token", "block"])
    args = ap.parse_args()
    hq, hkv, d = (int(x) for x in args.heads.split("/"))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.length, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    step = lambda: nsa_attention(q, k, v, granularity=args.granularity)
    step()  # compile and cache first
    torch.cuda.synchronize()
    seen = []

    def record(message, category, filename, lineno, file=None, line=None):
        ours = [f"{f.filename.split('/')[-2]}/{f.filename.split('/')[-1]}:{f.lineno} {f.line}"
                for f in traceback.extract_stack()[:-1] if "nsa_viz" in f.filename or "/kernels/" in f.filename]
        seen.append((str(message)[:80], ours[-1] if ours else "(not our code)"))
    old = warnings.showwarning
    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
    print(f"{args.heads} T={args.length} {args.granularity}: {len(seen)} synchronising calls in one forward")
    for message, where in seen:
        print(f"  {where}  ({message})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
