#!/usr/bin/env bash
# Set up, then run the lint and the test suite (tiny random models, offline; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q
