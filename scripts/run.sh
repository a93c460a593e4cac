#!/usr/bin/env bash
# Set up (idempotent) and run the main job: GRPO on the embedded default (tiny-cpu scenario).
# Extra arguments are config overrides, e.g. `bash scripts/run.sh trainer.steps=4`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m trainer --config deploy/configs/tiny-cpu.yaml "$@"
