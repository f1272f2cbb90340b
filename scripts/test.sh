#!/usr/bin/env bash
# Set up (first run only) and run the main test suite; `-m slow`, `-m long`, `-m backends` select the other CI
# steps (pyproject.toml's markers). Two pytest workers (pytest-xdist), each test file on one worker (its module
# fixtures built once), one torch thread per process: on 2 cores this was faster than one worker with two threads
# (docs/results/test_suite.md).
# CPPO_TEST_WORKERS=1 runs the tests in one process.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
workers=${CPPO_TEST_WORKERS:-2}
if [ "$workers" -gt 1 ]; then
    parallel=(-n "$workers" --dist loadfile)
else
    parallel=(-p no:xdist)
fi
.venv/bin/python -m pytest -q "${parallel[@]}" --durations=10 "$@"
code=$?
if [ "$code" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$code"
