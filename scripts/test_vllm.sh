#!/usr/bin/env bash
# Set up .venv-vllm (built once per machine and set of inputs: scripts/setup_vllm.sh) and run the vLLM engine's
# tests in it (pytest -m vllm).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh || exit 1
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# In-process engines (the colocated mode), without vLLM's own OpenMP thread pinning on a shared CPU.
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_OMP_THREADS_BIND=nobind
.venv-vllm/bin/python -m pytest -q -n 2 --dist loadgroup --durations=0 -m vllm "$@"
code=$?
if [ "$code" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$code"
