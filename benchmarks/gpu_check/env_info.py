"""gpu_check.sh part 0: Python, torch/CUDA and package versions (exits non-zero without CUDA unless quick)."""

import importlib
import importlib.util
import json
import os
import sys

print("python", sys.version.split()[0], sys.executable)
import torch  # noqa: E402

info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
        "threads": torch.get_num_threads()}
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
for name in ("transformers", "trl", "accelerate", "peft", "datasets", "tokenizers", "huggingface_hub",
             "safetensors", "numpy", "pyarrow", "fsspec", "dill", "multiprocess", "sacrebleu", "matplotlib",
             "yaml", "tqdm", "vaderSentiment.vaderSentiment", "rlgen"):
    try:
        m = importlib.import_module(name)
        info[name] = getattr(m, "__version__", "ok") + "  " + os.path.dirname(m.__file__)
    except Exception as e:  # noqa: BLE001
        info[name] = f"IMPORT FAILED: {type(e).__name__}: {e}"
spec = importlib.util.find_spec("chitchat_dataset")
info["chitchat_dataset"] = spec.origin if spec else "MISSING"
for k, v in info.items():
    print(f"{k:24s} {v}")
print(json.dumps({"env": {k: info[k] for k in ("torch", "cuda_available", "transformers", "trl", "accelerate")}}))
if os.environ.get("GPU_CHECK_QUICK") != "1" and not torch.cuda.is_available():
    sys.exit("CUDA NOT AVAILABLE")
