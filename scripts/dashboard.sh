#!/usr/bin/env bash
# The README's main command: sets everything up (scripts/setup.sh), then serves the dashboard with Voila on
# 127.0.0.1 and prints its URL (the embedded SmolLM2 model and text already on this machine; no network).
# Options go to `nsa-viz dashboard`, e.g.: bash scripts/dashboard.sh --port 0 --tokens 1024 --dataset code
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec nsa-viz dashboard "$@"
