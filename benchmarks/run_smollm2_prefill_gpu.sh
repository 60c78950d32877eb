#!/usr/bin/env bash
# SmolLM2-135M (real weights) prefill at 8k on the lent GPU: NSA union (token and per-block) and Dense
# through our kernel against the model's own SDPA; prefill time (median, synchronised) and logits
# agreement (max |dlogit|, KL, top-1) in float32 and bfloat16 (benchmarks/bench_model.py --gpu-prefill).
#
# The GGUF (98 MB) is over what one device call carries: ../shared/gpu/split-model.sh made two halves
# (.cache/model-a, .cache/model-b). Two calls, the second right after the first (the machine stays warm
# only about 30 s between calls):
#   run(command="mkdir -p /tmp/model && cp .cache/model-a/* /tmp/model/", carry=[".cache/model-a"])
#   run(command="bash benchmarks/run_smollm2_prefill_gpu.sh", carry=[".cache/model-b", ".whl"], timeout_s=420)
# The image has no gguf: its wheel travels in .whl (see ../shared/GPU.md). Results come back under $OUT:
# smollm2_prefill_h100.json and prefill.log (copy the JSON to benchmarks/results/).
# Extra arguments go to bench_model.py (e.g. --lengths 4096 8192, --dtype bfloat16).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
if [ ! -s /tmp/model/smollm2.gguf ]; then
  [ -f /tmp/model/part-00 ] || { echo "no /tmp/model/part-00: run the first call (copy .cache/model-a) just before" >&2; exit 2; }
  cat /tmp/model/part-00 .cache/model-b/part-01 > /tmp/model/smollm2.gguf || exit 2
fi
ls -l /tmp/model/smollm2.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl || exit 2
# the package without installing it: nsa_viz with kernels/ as nsa_viz.kernels (what pyproject maps)
pkg=/tmp/nsa_viz_pkg
rm -rf "$pkg" && mkdir -p "$pkg" && cp -r nsa_viz "$pkg/" && cp -r kernels "$pkg/nsa_viz/kernels"
export PYTHONPATH="$pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 benchmarks/bench_model.py --gpu-prefill --model /tmp/model/smollm2.gguf --device cuda \
  --dtype float32 bfloat16 --lengths 8192 --out "$out/smollm2_prefill_h100.json" "$@" 2>&1 | tee "$out/prefill.log"
