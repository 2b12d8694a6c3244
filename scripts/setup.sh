#!/usr/bin/env bash
# Create .venv (if needed) and install lora with its pinned stack. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet --no-deps -e ".[test]"
.venv/bin/python -m pip install --quiet pytest
