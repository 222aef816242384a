#!/usr/bin/env bash
# Set up, then check the code (ruff, the import-linter layer rules) and run the tests on tiny random models, offline.
#   bash scripts/test.sh           all tests but those marked slow (5 to 8 minutes on 2 cores)
#   bash scripts/test.sh --slow    the slow ones: processes killed and restarted, defenses against attacks, Ray actors
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/lint-imports
if [ "${1:-}" = "--slow" ]; then
  .venv/bin/python -m pytest -q -n 2 -m slow
else
  .venv/bin/python -m pytest -q -n 2 -m "not slow"
fi
