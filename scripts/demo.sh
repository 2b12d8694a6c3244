#!/usr/bin/env bash
# Set up, teach the embedded default model the invented facts of the embedded dataset, and ask it one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lora train
.venv/bin/lora generate --prompt "What is the capital of Tarvossa?" --compare   # the base model, then the adapted one
