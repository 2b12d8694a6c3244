#!/usr/bin/env bash
# Set up, then run the whole test suite: fast tests on a tiny in-process LLaMA and the slow
# end-to-end tests on the embedded default model (converted once into the user cache).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
