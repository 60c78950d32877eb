#!/usr/bin/env bash
# `nsa-viz bench` in full mode on the lent GPU, in one device call (see ../shared/GPU.md):
#
#   run(command="bash benchmarks/run_tradeoffs_gpu.sh", timeout_s=420)
#
# Kernel rows at 8k-64k (dense SDPA, window 512, global+local, NSA when kernels/nsa.py is there;
# 64 query / 4 key-value heads, d=128, bf16) and SmolLM2-135M end to end. The device image has no
# GGUF reader, so the model is built from SmolLM2's config with random weights (--random-weights):
# its speed and memory rows are those of the real architecture; accuracy rows come from the CPU run.
# The table is a copy of data/results/tradeoffs_h100.json with this run appended; it comes back
# under $OUT (copy it to data/results/). The run saves its rows after every length, so a run cut
# short by its time limit keeps what it measured.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
# the package without installing it: nsa_viz with kernels/ as nsa_viz.kernels (what pyproject maps)
pkg=/tmp/nsa_viz_pkg
rm -rf "$pkg" && mkdir -p "$pkg" && cp -r nsa_viz "$pkg/" && cp -r kernels "$pkg/nsa_viz/kernels"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
[ -f data/results/tradeoffs_h100.json ] && cp data/results/tradeoffs_h100.json "$out/"
python3 -m nsa_viz.cli bench --random-weights --out "$out/tradeoffs_h100.json" --no-progress "$@" 2>&1 | tee "$out/bench.log"
