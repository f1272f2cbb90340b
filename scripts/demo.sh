#!/usr/bin/env bash
# Set up (first run only) and run the main job on the embedded default: a tiny offline PPO run.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh ppo.steps=80`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/cppo train configs/ppo_tiny.yaml "$@"
