#!/usr/bin/env bash
# Install flatlm and everything it needs into the active Python environment.
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh --test   # runtime + test dependencies
# torch is pinned to the CPU build that lies on these machines' disk; on a GPU
# machine set FLATLM_TORCH="torch" (or a CUDA wheel spec) to choose your own.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[test]"; fi
PIP="python -m pip --disable-pip-version-check -q"
$PIP install "${FLATLM_TORCH:-torch==2.13.0}"
$PIP install -e ".${extras}"
# DeepSpeed builds its ops lazily; it must see the installed torch (no build isolation).
if ! python -c "import deepspeed" >/dev/null 2>&1; then
    DS_BUILD_OPS=0 $PIP install --no-build-isolation "deepspeed>=0.16"
fi
