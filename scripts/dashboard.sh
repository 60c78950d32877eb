#!/usr/bin/env bash
# Sets up everything, then launches the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec nsa-viz dashboard "$@"
