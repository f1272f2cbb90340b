#!/usr/bin/env bash
# Create .venv (if missing) and install cppo with its test dependencies into it.
# Reinstalls only when pyproject.toml has changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "cppo needs Python >= 3.11"'
    "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python

stamp=.venv/.cppo-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
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
"$PY" -m pip install --quiet -e ".[dev]"
echo "$wanted" > "$stamp"
