#!/usr/bin/env bash
# Set up, then split-fine-tune SmolLM2-135M-Instruct on Rotten Tomatoes (U-shape, LoRA, in-process) and
# print held-out perplexity before and after, plus a sample from the fine-tuned model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="runs/demo-$(date +%Y%m%d-%H%M%S)"
.venv/bin/splitlm train configs/demo.yaml "output_dir=$out" "$@"
echo "--- sample from the fine-tuned model ($out):"
.venv/bin/splitlm generate "$out" --prompt "Review: An unexpectedly moving film" --max-new-tokens 30 \
    --repetition-penalty 1.3
