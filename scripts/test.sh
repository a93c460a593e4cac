#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. pytest's exit 5 (no tests ran) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
start=$(date +%s)
python -m pytest tests "$@"
rc=$?
echo "test suite wall time: $(( $(date +%s) - start )) s"
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi
exit "$rc"
