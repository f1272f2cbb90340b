#!/usr/bin/env bash
# The GPU benchmark, one script of about ten minutes on one GPU: bf16, cppo (GRPO, with its defaults: shared
# prompts, log-probs in vocabulary chunks) against TRL's GRPOTrainer on random-weight models in the shapes of
# SmolLM2-135M, Qwen2.5-0.5B and Llama-3.2-1B (builtin:random-*, nothing to download), transformers' generate as
# the engine; then PPO with transformers' generate against vLLM's where vLLM is installed. Step time, phases,
# tokens/s, MFU and peak memory per model, with the GPU's name, in OUT (default docs/results/gpu).
#
#   bash scripts/benchmark_gpu.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results/gpu}
python=${PYTHON:-python}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv"
cat "$out/gpu.csv"
for model in random-smollm2-135m random-qwen2.5-0.5b random-llama-3.2-1b; do
    "$python" scripts/benchmark_step.py --models "$model" --impls cppo-grpo trl-grpo --precision bf16 \
        --generations 8 --batch 64 --new-tokens 128 --beta 0.04 --rounds 3 --warmup 1 \
        --workdir "$out/work" --out "$out/grpo_$model.json"
done
if "$python" -c "import vllm" 2>/dev/null; then
    "$python" scripts/benchmark_step.py --models random-qwen2.5-0.5b --impls cppo cppo-vllm --precision bf16 \
        --batch 64 --new-tokens 128 --rounds 3 --warmup 1 --workdir "$out/work" --out "$out/vllm_qwen2.5-0.5b.json"
fi
