#!/usr/bin/env bash
# Set up (first run only) and run the embedded default: `cppo demo`, the whole continual-RLHF pipeline
# offline on CPU (synthetic preference domains, SFT, reward models, PPO and CPPO in order, report).
# Extra arguments go to `cppo demo`, e.g. `bash scripts/demo.sh --output-dir runs/demo2 --seed 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false
exec .venv/bin/cppo demo "$@"
