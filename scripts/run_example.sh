#!/usr/bin/env bash
# The main job: set up this machine (torch, the extension), then train the tiny MoE language model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python examples/train_tiny_lm.py --out examples/results "$@"
