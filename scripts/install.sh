#!/usr/bin/env bash
# Install flatlm and everything it needs into the active Python environment.
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh --test   # runtime + test dependencies
# torch is pinned to the CPU build that lies on these machines' disk. On a GPU machine FLATLM_TORCH chooses your
# own: it is split into words and passed to pip as they are, so it may be a whole pip specification, e.g.
#   FLATLM_TORCH="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128" bash scripts/install.sh
# (a CUDA build from PyTorch's index), or FLATLM_TORCH=torch (PyPI's default build, CUDA on Linux x86_64).
# Each step says what it installs before it starts (pip itself runs quietly) and how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[test]"; fi
PIP="python -m pip --disable-pip-version-check -q"
started=$SECONDS
step_start=$SECONDS
step() { echo "[install] $*"; step_start=$SECONDS; }
done_step() { echo "[install]   done in $((SECONDS - step_start)) s"; }

torch_spec="${FLATLM_TORCH:-torch==2.13.0}"
read -r -a torch_args <<<"$torch_spec"  # words: a requirement plus pip options (--index-url ...), never a shell
if [[ ${#torch_args[@]} -eq 0 ]]; then
    echo "[install] error: FLATLM_TORCH is set but empty; unset it for the default torch==2.13.0 or give a pip spec" >&2
    exit 2
fi
step "torch (${torch_args[*]}): the largest download, a minute or more from a registry"
$PIP install "${torch_args[@]}"
done_step
step "flatlm${extras} in editable mode, with transformers, datasets, accelerate, sentencepiece, tensorboard${extras:+, pytest, ruff, lion-pytorch}"
$PIP install -e ".${extras}"
done_step
# DeepSpeed builds its ops lazily; it must see the installed torch (no build isolation). flatlm's ZeRO backends read
# DeepSpeed internals checked on this version only (flatlm.parallel.zero_views.DEEPSPEED_CHECKED; they refuse others).
deepspeed_version="0.19.8"
if ! python -c "import deepspeed, sys; sys.exit(deepspeed.__version__ != '$deepspeed_version')" >/dev/null 2>&1; then
    step "deepspeed==$deepspeed_version (DS_BUILD_OPS=0, no build isolation: its ops compile on first use, not now)"
    DS_BUILD_OPS=0 $PIP install --no-build-isolation "deepspeed==$deepspeed_version"
    done_step
else
    echo "[install] deepspeed $deepspeed_version: already installed"
fi
echo "[install] flatlm is installed ($((SECONDS - started)) s); try: flatlm train --help"
