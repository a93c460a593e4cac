#!/usr/bin/env bash
# Create .venv in the repo, install torch==2.13.0 first (CPU build here), then the project + dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -e ".[dev]"
# Insurance: a torchvision wheel here is a CUDA build that breaks transformers' image processors.
if python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  echo "torchvision is installed in .venv: remove it (pip uninstall -y torchvision)" >&2; exit 1
fi
